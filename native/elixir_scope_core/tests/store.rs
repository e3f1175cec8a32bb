//! EventStore: every query against a brute-force reference model on random
//! data (out-of-order timestamps, duplicates, eviction by count and age,
//! late links), plus deterministic tests of counters, index cleanup, late
//! links and memory.
use elixir_scope_core::store::MAX_CHAIN_DEPTH;
use elixir_scope_core::{
    CorrelationFields, Event, EventStore, InsertOutcome, Order, StoreConfig, StoredEvent,
};
use proptest::prelude::*;

fn ev(id: u64, ts: i64, pid: u64, m: u64, f: u64) -> Event {
    Event {
        id,
        timestamp: ts,
        wall_time: ts + 1_000_000,
        pid,
        peer: pid ^ 1,
        module: m,
        function: f,
        aux: id as i64 * 3,
        kind: (id % 9) as u8,
        flags: (id % 2) as u8,
        payload: vec![id as u8; (id % 7) as usize],
    }
}

fn corr(c: u64, parent: u64, root: u64) -> CorrelationFields {
    CorrelationFields {
        correlation_id: c,
        parent_id: parent,
        root_id: root,
    }
}

/// Brute-force reference: live records in seq order.
struct Model {
    max: usize,
    next_seq: u64,
    live: Vec<(u64, Event, CorrelationFields)>,
    inserted: u64,
    evicted: u64,
    expired: u64,
    duplicates: u64,
}

impl Model {
    fn new(max: usize) -> Model {
        Model {
            max,
            next_seq: 0,
            live: vec![],
            inserted: 0,
            evicted: 0,
            expired: 0,
            duplicates: 0,
        }
    }

    fn insert(&mut self, e: &Event, c: CorrelationFields) -> InsertOutcome {
        self.inserted += 1;
        if self.live.iter().any(|(_, x, _)| x.id == e.id) {
            self.duplicates += 1;
            return InsertOutcome::Duplicate;
        }
        while self.live.len() >= self.max
            || (!self.live.is_empty() && self.next_seq - self.live[0].0 >= 2 * self.max as u64)
        {
            self.live.remove(0);
            self.evicted += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.live.push((seq, e.clone(), c));
        InsertOutcome::Stored { seq }
    }

    fn relink(&mut self, id: u64, correlation_id: u64) -> bool {
        match self.live.iter_mut().find(|(_, e, _)| e.id == id) {
            Some(r) => {
                r.2.correlation_id = correlation_id;
                true
            }
            None => false,
        }
    }

    fn expire(&mut self, cutoff: i64) -> usize {
        let before = self.live.len();
        self.live.retain(|(_, e, _)| e.timestamp >= cutoff);
        let n = before - self.live.len();
        self.expired += n as u64;
        n
    }

    fn get(&self, id: u64) -> Option<&(u64, Event, CorrelationFields)> {
        self.live.iter().find(|(_, e, _)| e.id == id)
    }

    fn select(
        &self,
        pred: impl Fn(&(u64, Event, CorrelationFields)) -> bool,
        limit: usize,
        order: Order,
    ) -> Vec<u64> {
        let mut v: Vec<u64> = self.live.iter().filter(|r| pred(r)).map(|r| r.0).collect();
        if order == Order::Desc {
            v.reverse();
        }
        v.truncate(limit);
        v
    }
}

fn seqs(v: &[StoredEvent<'_>]) -> Vec<u64> {
    v.iter().map(|e| e.seq).collect()
}

fn check_record(s: &StoredEvent<'_>, m: &(u64, Event, CorrelationFields)) {
    assert_eq!(s.seq, m.0);
    assert_eq!(s.to_event(), m.1);
    assert_eq!(s.correlation(), m.2);
}

const LIMITS: [usize; 4] = [0, 1, 3, usize::MAX];
const ORDERS: [Order; 2] = [Order::Asc, Order::Desc];

fn check_all(store: &EventStore, model: &Model, ids_used: &[u64], windows: &[(i64, i64)]) {
    let st = store.stats();
    assert_eq!(st.total, model.live.len());
    assert_eq!(store.len(), model.live.len());
    assert_eq!(st.inserted, model.inserted);
    assert_eq!(st.evicted, model.evicted);
    assert_eq!(st.expired, model.expired);
    assert_eq!(st.duplicates, model.duplicates);
    assert_eq!(
        st.inserted,
        st.total as u64 + st.evicted + st.expired + st.duplicates + st.rejected
    );
    assert_eq!(
        st.oldest_timestamp,
        model.live.iter().map(|r| r.1.timestamp).min()
    );
    assert_eq!(
        st.newest_timestamp,
        model.live.iter().map(|r| r.1.timestamp).max()
    );

    for &id in ids_used {
        match (store.get(id), model.get(id)) {
            (Some(s), Some(m)) => check_record(&s, m),
            (None, None) => {}
            (s, m) => panic!("get({id}): store {s:?} model {m:?}"),
        }
        // children
        for limit in LIMITS {
            let want = model.select(|r| r.2.parent_id == id, limit, Order::Asc);
            assert_eq!(seqs(&store.children(id, limit)), want, "children({id})");
        }
        // causal chain
        let mut want = vec![];
        let mut cur = model.get(id);
        while let Some(r) = cur {
            want.push(r.0);
            if r.2.parent_id == 0 || want.len() >= MAX_CHAIN_DEPTH {
                break;
            }
            cur = model.get(r.2.parent_id);
        }
        want.reverse();
        assert_eq!(seqs(&store.causal_chain(id)), want, "causal_chain({id})");
    }
    for order in ORDERS {
        for limit in LIMITS {
            for pid in 0..6 {
                let want = model.select(|r| r.1.pid == pid, limit, order);
                let got = store.by_pid(pid, limit, order);
                assert_eq!(seqs(&got), want, "by_pid({pid}, {limit}, {order:?})");
                for g in &got {
                    check_record(g, model.live.iter().find(|r| r.0 == g.seq).unwrap());
                }
            }
            for m in 0..3 {
                for f in 0..3 {
                    let want = model.select(|r| r.1.module == m && r.1.function == f, limit, order);
                    assert_eq!(seqs(&store.by_function(m, f, limit, order)), want);
                }
            }
            for c in 0..25 {
                let want = model.select(|r| r.2.correlation_id == c, limit, order);
                assert_eq!(
                    seqs(&store.by_correlation(c, limit, order)),
                    want,
                    "corr {c}"
                );
            }
            for &(t0, t1) in windows {
                let mut all: Vec<(i64, u64)> = model
                    .live
                    .iter()
                    .filter(|r| t0 <= r.1.timestamp && r.1.timestamp <= t1)
                    .map(|r| (r.1.timestamp, r.0))
                    .collect();
                all.sort();
                if order == Order::Desc {
                    all.reverse();
                }
                all.truncate(limit);
                let want: Vec<u64> = all.into_iter().map(|x| x.1).collect();
                let got = store.by_time_range(t0, t1, limit, order);
                assert_eq!(seqs(&got), want, "time [{t0}, {t1}] {limit} {order:?}");
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// (reuse an old id?, old id pick, pid, module, function, correlation,
    /// parent pick (0 = none), timestamp jitter)
    Insert(bool, usize, u64, u64, u64, u64, usize, i64),
    /// Expire everything older than `newest - back`.
    Expire(i64),
    /// Late link: (id pick, new correlation id).
    Relink(usize, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        40 => (
            prop::bool::weighted(0.1),
            any::<usize>(),
            0u64..6,
            0u64..3,
            0u64..3,
            0u64..25,
            any::<usize>(),
            -300i64..300
        )
            .prop_map(|(r, o, p, m, f, c, pa, j)| Op::Insert(r, o, p, m, f, c, pa, j)),
        1 => (0i64..3000).prop_map(Op::Expire),
        4 => (any::<usize>(), 0u64..25).prop_map(|(o, c)| Op::Relink(o, c)),
    ]
}

fn run(max: usize, ops: &[Op]) {
    let mut store = EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: None,
    });
    let mut model = Model::new(max);
    let mut ids_used: Vec<u64> = vec![];
    let mut next_id = 1u64;
    let mut newest = i64::MIN;
    for (k, o) in ops.iter().enumerate() {
        match *o {
            Op::Insert(reuse, old, pid, m, f, c, pa, jitter) => {
                let id = if reuse && !ids_used.is_empty() {
                    ids_used[old % ids_used.len()]
                } else {
                    next_id += 1;
                    ids_used.push(next_id);
                    next_id
                };
                let parent = if ids_used.is_empty() || pa % 4 == 0 {
                    0
                } else {
                    ids_used[pa % ids_used.len()]
                };
                let ts = k as i64 * 10 + jitter;
                newest = newest.max(ts);
                let e = ev(id, ts, pid, m, f);
                let cf = corr(c, parent, parent / 2);
                assert_eq!(store.insert(&e, cf), model.insert(&e, cf));
            }
            Op::Expire(back) => {
                let cutoff = newest.saturating_sub(back);
                assert_eq!(store.evict_older_than(cutoff), model.expire(cutoff));
            }
            Op::Relink(pick, c) => {
                if let Some(&id) = ids_used.get(pick % ids_used.len().max(1)) {
                    assert_eq!(
                        store.relink(id, c),
                        model.relink(id, c),
                        "relink({id}, {c})"
                    );
                }
            }
        }
        if k % 97 == 96 {
            check_all(&store, &model, &ids_used, &[(newest - 500, newest)]);
        }
    }
    let windows = [
        (i64::MIN, i64::MAX),
        (newest - 2000, newest - 1000),
        (newest - 37, newest - 37),
        (0, 50),
        (10, 5),
    ];
    check_all(&store, &model, &ids_used, &windows);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn queries_match_reference(max in 1usize..300, ops in prop::collection::vec(op(), 1..1200)) {
        run(max, &ops);
    }
}

#[test]
fn reference_large_store_several_segments() {
    // max 1000 → segments of 256: exercises sealed-segment binary search.
    let ops: Vec<Op> = (0..3000usize)
        .map(|k| {
            let x = (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 20;
            if k % 400 == 399 {
                Op::Expire(2500)
            } else {
                Op::Insert(
                    x % 13 == 0,
                    x as usize,
                    x % 6,
                    x % 3,
                    (x >> 3) % 3,
                    (x >> 5) % 25,
                    (x >> 7) as usize,
                    (x % 600) as i64 - 300,
                )
            }
        })
        .collect();
    run(1000, &ops);
}

#[test]
fn out_of_order_timestamps_time_range() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 10_000,
        max_age_ns: None,
    });
    // Reverse time order: every segment overlaps every other in arrival.
    for i in 0..5000u64 {
        let ts = 1_000_000 - (i as i64) * 7 % 9973;
        s.insert(&ev(i + 1, ts, 1, 0, 0), CorrelationFields::default());
    }
    for (t0, t1) in [(0, i64::MAX), (995_000, 996_000), (999_000, 999_000)] {
        let got = s.by_time_range(t0, t1, usize::MAX, Order::Asc);
        let mut want: Vec<(i64, u64)> = (0..5000u64)
            .map(|i| (1_000_000 - (i as i64) * 7 % 9973, i))
            .filter(|&(t, _)| t0 <= t && t <= t1)
            .collect();
        want.sort();
        assert_eq!(
            got.iter().map(|e| (e.timestamp, e.seq)).collect::<Vec<_>>(),
            want
        );
        let desc = s.by_time_range(t0, t1, 10, Order::Desc);
        let mut w = want.clone();
        w.reverse();
        w.truncate(10);
        assert_eq!(
            desc.iter()
                .map(|e| (e.timestamp, e.seq))
                .collect::<Vec<_>>(),
            w
        );
    }
}

#[test]
fn eviction_by_count_exact_counters() {
    let max = 1000;
    let mut s = EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: None,
    });
    for i in 0..10_000u64 {
        s.insert(
            &ev(i + 1, i as i64, i % 3, 0, 0),
            CorrelationFields::default(),
        );
    }
    let st = s.stats();
    assert_eq!(st.total, max);
    assert_eq!(st.evicted, 9000);
    assert_eq!(st.inserted, 10_000);
    assert_eq!(st.oldest_timestamp, Some(9000));
    assert_eq!(st.newest_timestamp, Some(9999));
    assert!(s.get(9000).is_none());
    assert_eq!(s.get(9001).unwrap().timestamp, 9000);
    // Memory is bounded: at most max + one segment of headers.
    assert!(st.segments <= max / s.segment_capacity() + 2);
}

#[test]
fn eviction_by_age_exact_counters() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 100_000,
        max_age_ns: Some(1000),
    });
    for i in 0..20_000u64 {
        // Mildly out of order.
        let ts = i as i64 * 2 + (i % 5) as i64 * 3;
        s.insert(&ev(i + 1, ts, 1, 0, 0), CorrelationFields::default());
    }
    s.expire();
    let st = s.stats();
    let newest = (0..20_000i64).map(|i| i * 2 + (i % 5) * 3).max().unwrap();
    let want_live = (0..20_000i64)
        .filter(|i| i * 2 + (i % 5) * 3 >= newest - 1000)
        .count();
    assert_eq!(st.total, want_live);
    assert_eq!(st.expired, 20_000 - want_live as u64);
    assert_eq!(st.evicted, 0);
    assert!(st.oldest_timestamp.unwrap() >= newest - 1000);
    assert_eq!(st.newest_timestamp, Some(newest));
    // Lazy expiry kept memory bounded while inserting.
    assert!(st.segments <= 3, "{st:?}");
    // Explicit cutoff.
    let n = s.evict_older_than(newest - 500);
    let st2 = s.stats();
    assert_eq!(st2.expired, st.expired + n as u64);
    assert_eq!(
        st2.inserted,
        st2.total as u64 + st2.evicted + st2.expired + st2.duplicates + st2.rejected
    );
    assert!(st2.oldest_timestamp.unwrap() >= newest - 500);
    assert_eq!(s.evict_older_than(newest - 500), 0);
}

#[test]
fn duplicates_are_ignored_and_counted() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 100,
        max_age_ns: None,
    });
    let mut a = ev(7, 10, 1, 0, 0);
    a.payload = b"first".to_vec();
    let mut b = a.clone();
    b.payload = b"second".to_vec();
    assert!(matches!(
        s.insert(&a, corr(1, 0, 0)),
        InsertOutcome::Stored { .. }
    ));
    assert_eq!(s.insert(&b, corr(1, 0, 0)), InsertOutcome::Duplicate);
    assert_eq!(s.len(), 1);
    assert_eq!(s.get(7).unwrap().payload, b"first");
    assert_eq!(s.by_pid(1, 10, Order::Asc).len(), 1);
    assert_eq!(s.by_correlation(1, 10, Order::Asc).len(), 1);
    let st = s.stats();
    assert_eq!((st.inserted, st.duplicates, st.total), (2, 1, 1));
    // Once expired, the id can be stored again.
    assert_eq!(s.evict_older_than(11), 1);
    assert!(matches!(
        s.insert(&b, corr(1, 0, 0)),
        InsertOutcome::Stored { .. }
    ));
    assert_eq!(s.get(7).unwrap().payload, b"second");
}

#[test]
fn limit_and_order() {
    let mut s = EventStore::new(StoreConfig::default());
    for i in 0..100u64 {
        s.insert(&ev(i + 1, i as i64, i % 2, 5, 6), corr(42, 0, 0));
    }
    let asc: Vec<u64> = s.by_pid(0, 3, Order::Asc).iter().map(|e| e.id).collect();
    assert_eq!(asc, vec![1, 3, 5]);
    let desc: Vec<u64> = s.by_pid(0, 3, Order::Desc).iter().map(|e| e.id).collect();
    assert_eq!(desc, vec![99, 97, 95]);
    assert_eq!(s.by_function(5, 6, usize::MAX, Order::Asc).len(), 100);
    assert!(s.by_function(5, 7, 10, Order::Asc).is_empty());
    assert_eq!(s.by_correlation(42, 0, Order::Asc).len(), 0);
    let t: Vec<u64> = s
        .by_time_range(10, 20, 4, Order::Desc)
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(t, vec![21, 20, 19, 18]);
}

#[test]
fn causal_chain_root_first_and_bounded() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 20_000,
        max_age_ns: None,
    });
    for i in 1..=10u64 {
        s.insert(&ev(i, i as i64, 1, 0, 0), corr(0, i - 1, 1));
    }
    let ids: Vec<u64> = s.causal_chain(10).iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    assert!(s.causal_chain(99).is_empty());
    let kids: Vec<u64> = s.children(4, 10).iter().map(|e| e.id).collect();
    assert_eq!(kids, vec![5]);
    // A cycle (1001 ↔ 1002) and a very deep chain stay bounded.
    s.insert(&ev(1001, 0, 1, 0, 0), corr(0, 1002, 0));
    s.insert(&ev(1002, 0, 1, 0, 0), corr(0, 1001, 0));
    assert_eq!(s.causal_chain(1001).len(), MAX_CHAIN_DEPTH);
    for i in 0..6000u64 {
        s.insert(&ev(10_000 + i, 0, 1, 0, 0), corr(0, 10_000 + i - 1, 0));
    }
    assert_eq!(s.causal_chain(15_999).len(), MAX_CHAIN_DEPTH);
    assert_eq!(s.causal_chain(15_999).last().unwrap().id, 15_999);
}

#[test]
fn index_cleanup_memory_does_not_grow_across_laps() {
    let max = 20_000usize;
    let mut s = EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: None,
    });
    let mut id = 0u64;
    let mut mem = vec![];
    for _lap in 0..10 {
        for _ in 0..max {
            id += 1;
            // Churning pids and correlation ids: new keys all the time.
            let e = ev(id, id as i64, id / 10, id % 50, 0);
            s.insert(&e, corr(id / 2, id - 1, 1));
        }
        mem.push(s.memory_bytes());
    }
    let st = s.stats();
    assert_eq!(st.total, max);
    assert_eq!(st.evicted, 9 * max as u64);
    // Old keys are gone from the indexes.
    assert!(s.by_pid(5, 10, Order::Asc).is_empty());
    assert!(s.by_correlation(3, 10, Order::Asc).is_empty());
    assert!(s.children(7, 10).is_empty());
    assert_eq!(s.by_pid(id / 10 - 1, 100, Order::Asc).len(), 10);
    eprintln!("memory per lap: {mem:?}");
    let steady = mem[1];
    for &m in &mem[2..] {
        assert!(m <= steady + steady / 10, "memory grew: {mem:?}");
    }
}

fn fill(n: usize) -> EventStore {
    let mut s = EventStore::new(StoreConfig {
        max_events: n,
        max_age_ns: None,
    });
    for i in 1..=n as u64 {
        let mut e = ev(
            i,
            i as i64 * 100 + (i % 7) as i64 * 50,
            i % 1000,
            i % 20,
            i % 200,
        );
        e.payload.clear();
        s.insert(&e, corr(i / 2, i - 1, i & !1023));
    }
    s
}

#[test]
fn bytes_per_event() {
    for n in [100_000usize, 1_000_000] {
        let s = fill(n);
        let st = s.stats();
        assert_eq!(st.total, n);
        let per = st.memory_bytes as f64 / n as f64;
        eprintln!(
            "store of {n}: {} bytes total, {per:.1} bytes/event (empty payloads)",
            st.memory_bytes
        );
        assert!(per <= 120.0, "{per} bytes/event");
    }
}

fn ids(v: &[StoredEvent<'_>]) -> Vec<u64> {
    v.iter().map(|e| e.id).collect()
}

#[test]
fn relink_visible_in_every_query() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 1000,
        max_age_ns: None,
    });
    // Receive 5 stored (own correlation id) before its send 8 is seen;
    // 6 and 9 already share correlation 8.
    for id in 1..=10u64 {
        let c = match id {
            6 | 9 => 8,
            _ => id,
        };
        s.insert(&ev(id, id as i64 * 10, id % 2, 1, 2), corr(c, id - 1, 1));
    }
    let before = s.stats();
    assert!(!s.relink(99, 8), "not stored");
    assert!(s.relink(5, 8));
    let after = s.stats();
    assert_eq!(
        (
            before.inserted,
            before.total,
            before.evicted,
            before.duplicates
        ),
        (after.inserted, after.total, after.evicted, after.duplicates)
    );
    assert_eq!(
        (after.expired, after.rejected),
        (before.expired, before.rejected)
    );
    assert!(after.memory_bytes > before.memory_bytes);

    assert_eq!(s.get(5).unwrap().correlation_id, 8);
    assert_eq!(s.get(5).unwrap().correlation().correlation_id, 8);
    assert_eq!(s.get(5).unwrap().parent_id, 4);
    // Store order, limits, both orders.
    assert_eq!(
        ids(&s.by_correlation(8, usize::MAX, Order::Asc)),
        [5, 6, 8, 9]
    );
    assert_eq!(ids(&s.by_correlation(8, 2, Order::Asc)), [5, 6]);
    assert_eq!(
        ids(&s.by_correlation(8, usize::MAX, Order::Desc)),
        [9, 8, 6, 5]
    );
    assert_eq!(ids(&s.by_correlation(8, 3, Order::Desc)), [9, 8, 6]);
    assert!(s.by_correlation(8, 0, Order::Asc).is_empty());
    assert!(s.by_correlation(5, usize::MAX, Order::Asc).is_empty());
    let corr_of = |v: Vec<StoredEvent<'_>>| -> Vec<(u64, u64)> {
        v.iter().map(|e| (e.id, e.correlation_id)).collect()
    };
    let want: Vec<(u64, u64)> = vec![(1, 1), (3, 3), (5, 8), (7, 7), (9, 8)];
    assert_eq!(corr_of(s.by_pid(1, usize::MAX, Order::Asc)), want);
    assert_eq!(corr_of(s.by_time_range(50, 50, 10, Order::Asc)), [(5, 8)]);
    assert_eq!(corr_of(s.by_function(1, 2, 10, Order::Asc))[4], (5, 8));
    assert_eq!(corr_of(s.children(4, 10)), [(5, 8)]);
    assert_eq!(s.causal_chain(7)[4].correlation_id, 8);

    // Relinking again replaces the link.
    assert!(s.relink(5, 3));
    assert_eq!(s.get(5).unwrap().correlation_id, 3);
    assert_eq!(ids(&s.by_correlation(8, usize::MAX, Order::Asc)), [6, 8, 9]);
    assert_eq!(ids(&s.by_correlation(3, usize::MAX, Order::Asc)), [3, 5]);
    assert_eq!(ids(&s.by_correlation(3, usize::MAX, Order::Desc)), [5, 3]);
    // Several relinked events under one id, merged in store order.
    assert!(s.relink(10, 3));
    assert!(s.relink(1, 3));
    assert_eq!(
        ids(&s.by_correlation(3, usize::MAX, Order::Asc)),
        [1, 3, 5, 10]
    );
    assert_eq!(ids(&s.by_correlation(3, 2, Order::Desc)), [10, 5]);
    // Back to their own correlation ids: the side map is empty again.
    for id in [1, 5, 10] {
        assert!(s.relink(id, id));
        assert_eq!(ids(&s.by_correlation(id, usize::MAX, Order::Asc)), [id]);
    }
    assert_eq!(ids(&s.by_correlation(3, usize::MAX, Order::Asc)), [3]);
    assert_eq!(s.stats().memory_bytes, before.memory_bytes);
    // A dead event cannot be relinked; its link disappears with it.
    assert!(s.relink(2, 8));
    assert_eq!(s.evict_older_than(25), 2);
    assert!(!s.relink(2, 8));
    assert_eq!(ids(&s.by_correlation(8, usize::MAX, Order::Asc)), [6, 8, 9]);
    let st = s.stats();
    assert_eq!(
        st.inserted,
        st.total as u64 + st.evicted + st.expired + st.duplicates + st.rejected
    );
}

#[test]
fn relinks_pruned_after_eviction() {
    let max = 5000usize;
    let new = || {
        EventStore::new(StoreConfig {
            max_events: max,
            max_age_ns: None,
        })
    };
    let (mut linked, mut plain) = (new(), new());
    let mut id = 0u64;
    let mut mem = vec![];
    for lap in 0..12 {
        for _ in 0..max {
            id += 1;
            let e = ev(id, id as i64, id % 7, 0, 0);
            linked.insert(&e, corr(id, 0, 0));
            plain.insert(&e, corr(id, 0, 0));
            // Laps 0..6: every event is relinked (to the previous one),
            // some twice; afterwards no more links.
            if lap < 6 && id > 1 {
                assert!(linked.relink(id, id - 1));
                if id % 3 == 0 {
                    assert!(linked.relink(id - 1, id + 7));
                }
            }
        }
        mem.push(linked.memory_bytes() - plain.memory_bytes());
        if lap == 5 {
            // Every live event relinked: the newest one, to the previous.
            assert_eq!(ids(&linked.by_correlation(id - 1, 10, Order::Asc)), [id]);
            assert!(linked.by_correlation(id, 10, Order::Asc).is_empty());
        }
    }
    eprintln!("relink side-map bytes per lap: {mem:?}");
    // Bounded while relinking: steady from lap 1 to lap 5.
    for &m in &mem[2..6] {
        assert!(m > 0 && m <= mem[1] + mem[1] / 5, "side maps grew: {mem:?}");
    }
    // Two hash maps of 17-byte buckets per link, for at most twice the
    // records in memory (~1.4 × max here) before a prune, rounded up to a
    // power of two: under 128 bytes per live event when all are relinked.
    assert!(mem[1] <= 128 * max, "{mem:?}");
    // Links of evicted events are pruned: the side maps are empty again.
    assert_eq!(mem[11], 0, "{mem:?}");
    assert_eq!(linked.stats().evicted, plain.stats().evicted);
    assert_eq!(ids(&linked.by_correlation(id, 10, Order::Asc)), [id]);
}

#[test]
fn pid_index_bounded_with_unique_pids() {
    // Every event has its own pid: the stale pid heads must be swept even
    // though each popped record leaves one.
    let max = 2000usize;
    let mut s = EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: None,
    });
    let mut mem = vec![];
    for lap in 0..20u64 {
        for k in 0..max as u64 {
            let id = lap * max as u64 + k + 1;
            s.insert(&ev(id, id as i64, 1_000_000 + id, 0, 0), corr(id, 0, 0));
        }
        mem.push(s.memory_bytes());
    }
    eprintln!("memory per lap: {mem:?}");
    for &m in &mem[3..] {
        assert!(m <= mem[2] + mem[2] / 5, "memory grew: {mem:?}");
    }
}

#[test]
fn duplicates_exact_with_out_of_order_ids() {
    // Ids mostly increasing with jitter, plus ids far behind (below the
    // recent-id filter), repeats, 0 and ids near u64::MAX: every outcome
    // matches the reference model.
    for max in [50usize, 3000] {
        let mut store = EventStore::new(StoreConfig {
            max_events: max,
            max_age_ns: None,
        });
        let mut model = Model::new(max);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut used = vec![];
        for k in 0..12_000u64 {
            let r = rnd();
            let id = match r % 16 {
                0 => used
                    .get((r >> 8) as usize % used.len().max(1))
                    .copied()
                    .unwrap_or(1),
                1 => k.saturating_sub((r >> 8) % 20_000),
                2 => u64::MAX - (r >> 8) % 300,
                3 => (r >> 8) % 3,
                _ => 4 * k + (r >> 8) % 700,
            };
            used.push(id);
            let e = ev(id, k as i64, k % 5, 0, 0);
            assert_eq!(
                store.insert(&e, corr(id, 0, 0)),
                model.insert(&e, corr(id, 0, 0)),
                "insert #{k} id {id}"
            );
            if k % 1000 == 999 {
                let cutoff = k as i64 - (r % 300) as i64;
                assert_eq!(store.evict_older_than(cutoff), model.expire(cutoff));
            }
        }
        let st = store.stats();
        assert_eq!(
            (st.total, st.duplicates),
            (model.live.len(), model.duplicates)
        );
        assert!(st.duplicates > 100, "{st:?}");
        for (_, e, _) in &model.live {
            assert_eq!(store.get(e.id).unwrap().timestamp, e.timestamp);
        }
    }
}

#[test]
fn limits_change_live_with_exact_counters() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 1000,
        max_age_ns: None,
    });
    for i in 0..1000u64 {
        s.insert(&ev(i + 1, i as i64, 7, 0, 0), CorrelationFields::default());
    }
    // Lowering evicts the oldest at once.
    assert_eq!(
        s.set_limits(StoreConfig {
            max_events: 100,
            max_age_ns: None
        }),
        900
    );
    let st = s.stats();
    assert_eq!((st.total, st.evicted, st.max_events), (100, 900, 100));
    assert_eq!(st.oldest_timestamp, Some(900));
    assert_eq!(s.by_pid(7, usize::MAX, Order::Asc).len(), 100);
    // Raising lets the store grow again; lookups stay exact.
    s.set_limits(StoreConfig {
        max_events: 5000,
        max_age_ns: None,
    });
    for i in 1000..6000u64 {
        s.insert(&ev(i + 1, i as i64, 7, 0, 0), CorrelationFields::default());
    }
    let st = s.stats();
    assert_eq!((st.total, st.evicted), (5000, 1000));
    assert_eq!(s.get(1001).unwrap().timestamp, 1000);
    assert!(s.get(1000).is_none());
    // An age bound expires at once.
    let n = s.set_limits(StoreConfig {
        max_events: 5000,
        max_age_ns: Some(999),
    });
    assert_eq!(n, 4000);
    let st = s.stats();
    assert_eq!((st.total, st.expired), (1000, 4000));
    assert_eq!(st.inserted, st.total as u64 + st.evicted + st.expired);
}

#[test]
fn time_windows_match_brute_force_over_many_sealed_segments() {
    // Timestamps arrive shuffled within blocks (as from several shards), so
    // segments overlap in time and the marks cover many blocks.
    let mut s = EventStore::new(StoreConfig {
        max_events: 50_000,
        max_age_ns: None,
    });
    let mut all = Vec::new();
    let mut x: u64 = 12345;
    for i in 0..40_000u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ts = (i as i64 / 500) * 500 + (x >> 40) as i64 % 2000;
        s.insert(&ev(i + 1, ts, 1, 0, 0), CorrelationFields::default());
        all.push((ts, i + 1));
    }
    all.sort();
    for k in 0..200 {
        let t0 = (k * 197) as i64 - 50;
        let t1 = t0 + (k as i64 % 7) * 300 + 1;
        let want: Vec<u64> = all
            .iter()
            .filter(|(ts, _)| t0 <= *ts && *ts <= t1)
            .map(|&(_, id)| id)
            .collect();
        let got: Vec<u64> = s
            .by_time_range(t0, t1, usize::MAX, Order::Asc)
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, want, "window {t0}..={t1}");
    }
}

#[test]
fn navigation_and_scan_match_a_brute_force_model() {
    // 3 processes interleaved irregularly, timestamps with ties and small
    // disorder, and eviction (max 500 of 1,200).
    let mut s = EventStore::new(StoreConfig {
        max_events: 500,
        ..StoreConfig::default()
    });
    let mut all: Vec<Event> = Vec::new();
    for id in 1..=1200u64 {
        let pid = [1, 2, 2, 3, 1, 1, 1, 2][(id * 7 % 8) as usize] as u64;
        let ts = (id as i64 / 3) * 10 + (id % 2) as i64;
        let e = ev(id, ts, pid, 5, 6);
        s.insert(&e, corr(id, 0, 0));
        all.push(e);
    }
    let live: Vec<&Event> = all.iter().skip(700).collect();
    // scan: in insertion order, resumable.
    let mut seen = vec![];
    let mut next = Some(0);
    while let Some(at) = next {
        next = s.scan(at, 77, |e| seen.push(e.id));
    }
    assert_eq!(seen, live.iter().map(|e| e.id).collect::<Vec<_>>());
    // Per-process prev/next.
    for (i, e) in live.iter().enumerate() {
        let next_same = live[i + 1..].iter().find(|x| x.pid == e.pid).map(|x| x.id);
        let prev_same = live[..i]
            .iter()
            .rev()
            .find(|x| x.pid == e.pid)
            .map(|x| x.id);
        assert_eq!(
            s.pid_next(e.id).map(|x| x.id),
            next_same,
            "next of {}",
            e.id
        );
        assert_eq!(
            s.pid_prev(e.id).map(|x| x.id),
            prev_same,
            "prev of {}",
            e.id
        );
    }
    // Global time order: (timestamp, insertion) neighbours.
    let mut by_time: Vec<&Event> = live.clone();
    by_time.sort_by_key(|e| (e.timestamp, e.id));
    for (i, e) in by_time.iter().enumerate() {
        let n = by_time.get(i + 1).map(|x| x.id);
        let p = i.checked_sub(1).map(|j| by_time[j].id);
        assert_eq!(s.time_neighbour(e.id, Order::Asc).map(|x| x.id), n);
        assert_eq!(s.time_neighbour(e.id, Order::Desc).map(|x| x.id), p);
    }
    assert!(s.pid_next(1).is_none(), "evicted");
}

fn payload_of(id: u64) -> Vec<u8> {
    (0..100 + (id % 50) as usize)
        .map(|k| (id as usize + k) as u8)
        .collect()
}

fn identity_holds(s: &EventStore) {
    let st = s.stats();
    assert_eq!(
        st.inserted,
        st.total as u64 + st.evicted + st.expired + st.duplicates + st.rejected,
        "{st:?}"
    );
}

#[test]
fn cleanup_compacts_payloads_and_memory_drops() {
    // One open segment (4,096 records): nothing is freed whole, so only
    // compaction can give memory back.
    let mut s = EventStore::new(StoreConfig {
        max_events: 1_000_000,
        max_age_ns: None,
    });
    for i in 1..=1000u64 {
        let mut e = ev(i, i as i64 * 10, i % 7, 1, 2);
        e.payload = payload_of(i);
        s.insert(&e, CorrelationFields::default());
    }
    let before = s.stats();
    assert_eq!(before.segments, 1);
    assert_eq!(s.evict_older_than(5001), 500);
    let after = s.stats();
    assert_eq!(after.total, 500);
    assert_eq!(after.expired, 500);
    assert!(
        after.memory_bytes < before.memory_bytes,
        "{before:?} {after:?}"
    );
    assert!(after.payload_bytes < before.payload_bytes);
    assert_eq!(after.compactions, 1);
    let freed: usize = (1..=500u64).map(|i| payload_of(i).len()).sum();
    assert!(after.reclaimed_bytes as usize >= freed, "{after:?}");
    identity_holds(&s);

    // Survivors read back whole, by every path.
    for i in 501..=1000u64 {
        let got = s.get(i).expect("live");
        assert_eq!(got.payload, &payload_of(i)[..]);
    }
    for i in 1..=500u64 {
        assert!(s.get(i).is_none());
    }
    let window = s.by_time_range(0, i64::MAX, usize::MAX, Order::Asc);
    assert_eq!(ids(&window), (501..=1000).collect::<Vec<_>>());
    for e in &window {
        assert_eq!(e.payload, &payload_of(e.id)[..]);
    }
    for e in s.by_pid(3, usize::MAX, Order::Desc) {
        assert_eq!(e.payload, &payload_of(e.id)[..]);
    }

    // Inserts after a compaction land behind the compacted payloads.
    for i in 1001..=1200u64 {
        let mut e = ev(i, i as i64 * 10, i % 7, 1, 2);
        e.payload = payload_of(i);
        s.insert(&e, CorrelationFields::default());
    }
    for i in 501..=1200u64 {
        assert_eq!(s.get(i).expect("live").payload, &payload_of(i)[..]);
    }
    // A second cleanup in the same segment compacts again.
    let mid = s.stats();
    assert_eq!(s.evict_older_than(8001), 300);
    let end = s.stats();
    assert!(end.memory_bytes < mid.memory_bytes);
    assert_eq!(end.compactions, 2);
    for i in 801..=1200u64 {
        assert_eq!(s.get(i).expect("live").payload, &payload_of(i)[..]);
    }
    identity_holds(&s);
}

#[test]
fn cleanup_of_everything_frees_the_open_segment() {
    // Segments of 1,024 records.
    let mut s = EventStore::new(StoreConfig {
        max_events: 4000,
        max_age_ns: None,
    });
    let empty = s.stats().memory_bytes;
    for i in 1..=2000u64 {
        let mut e = ev(i, i as i64, 1, 1, 2);
        e.payload = payload_of(i);
        s.insert(&e, CorrelationFields::default());
    }
    // Several segments, the last one open.
    assert!(s.stats().segments > 1);
    let full = s.stats().memory_bytes;
    assert_eq!(s.evict_older_than(i64::MAX), 2000);
    let st = s.stats();
    assert_eq!((st.total, st.segments), (0, 0));
    assert!(st.memory_bytes < full);
    // What is left is the empty store's tables plus the index maps' capacity.
    assert!(
        st.memory_bytes <= empty + 64 * 1024,
        "{st:?} (empty: {empty})"
    );
    identity_holds(&s);

    // The store works on.
    for i in 2001..=2100u64 {
        let mut e = ev(i, i as i64, 1, 1, 2);
        e.payload = payload_of(i);
        s.insert(&e, CorrelationFields::default());
    }
    assert_eq!(s.len(), 100);
    assert_eq!(
        ids(&s.by_pid(1, usize::MAX, Order::Asc)),
        (2001..=2100).collect::<Vec<_>>()
    );
    assert_eq!(s.get(2050).unwrap().payload, &payload_of(2050)[..]);
    identity_holds(&s);
}

#[test]
fn automatic_expiry_compacts_only_when_a_quarter_is_dead() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 1_000_000,
        max_age_ns: Some(1_000_000),
    });
    // Timestamps 0..=10_000: nothing is older than newest - max_age.
    for i in 1..=1000u64 {
        let mut e = ev(i, i as i64 * 10, 1, 1, 2);
        e.payload = payload_of(i);
        s.insert(&e, CorrelationFields::default());
    }
    // Raise the newest timestamp so that 100 records (10%) are too old.
    let mut e = ev(5000, 1_001_010, 1, 1, 2);
    e.payload = payload_of(5000);
    s.insert(&e, CorrelationFields::default());
    s.expire();
    let st = s.stats();
    assert_eq!(st.expired, 100);
    assert_eq!(st.compactions, 0, "10% dead: no copy yet");
    // 40% dead: compacted.
    let mut e = ev(5001, 1_004_010, 1, 1, 2);
    e.payload = payload_of(5001);
    s.insert(&e, CorrelationFields::default());
    s.expire();
    let st = s.stats();
    assert_eq!(st.expired, 400);
    assert_eq!(st.compactions, 1);
    for i in 401..=1000u64 {
        assert_eq!(s.get(i).unwrap().payload, &payload_of(i)[..]);
    }
    identity_holds(&s);
}

/// The header keeps the wall time as a 32-bit offset and the correlation,
/// parent and root ids as 32-bit deltas from the record's id; values that
/// do not fit (far-off wall times, ids far from the record's or above it,
/// extremes) are kept aside per segment and read back exactly, in every
/// query, in snapshots, and after the segment is sealed and evicted.
#[test]
fn header_fields_that_do_not_fit_the_compact_form_read_back_exactly() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 300,
        max_age_ns: None,
    });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut all = Vec::new();
    for id in 1..=1_000u64 {
        let pick = |r: u64, near: u64| match r % 6 {
            0 => 0,
            1 => near,
            2 => r,
            3 => u64::MAX - (r % 3),
            4 => id + (r % 5),
            _ => id.wrapping_sub(1 << 31).wrapping_add(r % 4),
        };
        let (r1, r2, r3, r4) = (rnd(), rnd(), rnd(), rnd());
        let ts = id as i64 * 1_000;
        let mut e = ev(id, ts, 1 + id % 3, 1, 2);
        e.wall_time = match r4 % 5 {
            0 => ts + 1_000_000,
            1 => i64::MIN + (r4 % 7) as i64,
            2 => i64::MAX - (r4 % 7) as i64,
            3 => r4 as i64,
            _ => ts + (1 << 31) + (r4 % 3) as i64 - 1,
        };
        let c = corr(pick(r1, id), pick(r2, id - 1), pick(r3, 1));
        assert!(matches!(s.insert(&e, c), InsertOutcome::Stored { .. }));
        all.push((e, c));
    }
    let snap = s.snapshot();
    let mut seen = 0;
    for (e, c) in &all[700..] {
        let got = s.get(e.id).expect("stored");
        assert_eq!(got.to_event(), *e);
        assert_eq!(got.correlation(), *c);
        if c.correlation_id != 0 {
            assert!(s
                .by_correlation(c.correlation_id, usize::MAX, Order::Asc)
                .iter()
                .any(|g| g.id == e.id));
        }
        if c.parent_id != 0 {
            assert!(s
                .children(c.parent_id, usize::MAX)
                .iter()
                .any(|g| g.id == e.id));
        }
        seen += 1;
    }
    assert_eq!(seen, 300);
    snap.scan(0, usize::MAX, |g| {
        let (e, c) = &all[g.id as usize - 1];
        assert_eq!(g.to_event(), *e);
        assert_eq!(g.correlation(), *c);
    });
}
