//! Snapshots: a whole-trace pass over `EventStore::snapshot()` while the
//! store goes on changing (inserts, evictions by count and age, arena
//! compaction, late links) gives exactly what the same pass gave over the
//! store frozen at the cut; and, with a real ingest thread, the pass equals
//! the pass over a fresh store holding the events up to the cut.
use elixir_scope_core::analysis::{
    call_stats, message_flow, message_flow_cut, top_call_trees, CallStats, Flow, StatKey, TopTrees,
};
use elixir_scope_core::{
    CorrelationFields, Event, EventKind, EventStore, Scan, StoreConfig, StoredEvent,
};
use proptest::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Event `k` of a deterministic trace of nested calls in a few processes:
/// per process, call f(k) ... return, with an occasional exception and a
/// message send in between. Ids are `k + 1`.
struct Gen {
    k: u64,
    ts: i64,
    /// Open call ids per process.
    stacks: Vec<Vec<u64>>,
    /// Recent send ids (their receives come later).
    sends: Vec<u64>,
}

impl Gen {
    fn new() -> Gen {
        Gen {
            k: 0,
            ts: 1_000,
            stacks: vec![Vec::new(); 4],
            sends: Vec::new(),
        }
    }

    fn next(&mut self, jitter: i64) -> (Event, CorrelationFields) {
        let k = self.k;
        self.k += 1;
        let id = k + 1;
        let x = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33;
        let p = (x % 4) as usize;
        self.ts += 10 + (x % 7) as i64;
        let ts = self.ts + jitter;
        let pid = 0x103 + ((p as u64) << 4);
        let depth = self.stacks[p].len();
        let open = (x >> 3) % 3 != 0 && depth < 6 || depth == 0;
        let (kind, corr, parent, f) = if (x >> 5) % 11 == 1 && !self.sends.is_empty() {
            let s = self.sends.remove((x as usize >> 9) % self.sends.len());
            (EventKind::MessageReceive, s, 0, 0)
        } else if (x >> 5) % 11 == 0 {
            if self.sends.len() >= 8 {
                self.sends.remove(0);
            }
            self.sends.push(id);
            (
                EventKind::MessageSend,
                id,
                self.stacks[p].last().copied().unwrap_or(0),
                0,
            )
        } else if open {
            let parent = self.stacks[p].last().copied().unwrap_or(0);
            self.stacks[p].push(id);
            (EventKind::FunctionCall, id, parent, (x >> 8) % 5)
        } else {
            let call = self.stacks[p].pop().expect("open call");
            let kind = if (x >> 7) % 9 == 0 {
                EventKind::FunctionException
            } else {
                EventKind::FunctionReturn
            };
            (kind, call, call, 0)
        };
        let ev = Event {
            id,
            timestamp: ts,
            wall_time: ts,
            pid,
            peer: pid ^ 0x10,
            module: 0x4B,
            function: (f << 6) | 0x0B,
            aux: if kind == EventKind::FunctionCall {
                (x % 3) as i64
            } else {
                0
            },
            kind: kind as u8,
            flags: 0,
            payload: vec![(x & 0xff) as u8; (x % 9) as usize],
        };
        let c = CorrelationFields {
            correlation_id: corr,
            parent_id: parent,
            root_id: 0,
        };
        (ev, c)
    }
}

type Owned = (u64, Event, CorrelationFields);

fn owned(e: &StoredEvent<'_>) -> Owned {
    (e.seq, e.to_event(), e.correlation())
}

fn all<S: Scan>(s: &S) -> Vec<Owned> {
    let mut v = Vec::new();
    s.scan_events(0, usize::MAX, |e| v.push(owned(e)));
    v
}

/// The same scan in chunks of `chunk` (as `ana_select` does).
fn chunked<S: Scan>(s: &S, chunk: usize) -> Vec<Owned> {
    let mut v = Vec::new();
    let mut at = Some(0);
    while let Some(from) = at {
        at = s.scan_events(from, chunk, |e| v.push(owned(e)));
    }
    v
}

fn stats_eq(a: &CallStats, b: &CallStats) -> bool {
    a.stats == b.stats && a.scanned == b.scanned && a.untracked == b.untracked
}

fn trees_eq(a: &TopTrees, b: &TopTrees) -> bool {
    a.trees == b.trees && a.distinct == b.distinct && a.untracked == b.untracked
}

#[derive(Clone, Debug)]
enum Op {
    /// Insert the next `n` generated events, timestamps shifted by jitter.
    Insert(u8, i8),
    /// Late link: event `k`-th from the newest gets correlation `c`.
    Relink(u8, u8),
    /// Expire events older than newest - age.
    Expire(u16),
    /// Change the count bound.
    Limit(u16),
    /// Take a snapshot (up to 3 are kept).
    Snap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u8..40, -30i8..30).prop_map(|(n, j)| Op::Insert(n, j)),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(k, c)| Op::Relink(k, c)),
        1 => (0u16..2000).prop_map(Op::Expire),
        1 => (1u16..400).prop_map(Op::Limit),
        2 => Just(Op::Snap),
    ]
}

struct Frozen {
    snap: elixir_scope_core::Snapshot,
    events: Vec<Owned>,
    stats: Vec<CallStats>,
    trees: TopTrees,
    /// message_flow of all processes and of one, in pages of 3.
    flows: Vec<Vec<OwnedFlow>>,
}

type OwnedFlow = (Owned, Option<Owned>, Option<Owned>);

fn owned_flows(v: &[Flow<'_>]) -> Vec<OwnedFlow> {
    v.iter()
        .map(|f| {
            (
                owned(&f.send),
                f.receive.as_ref().map(owned),
                f.in_call.as_ref().map(owned),
            )
        })
        .collect()
}

const FLOW_PIDS: [u64; 2] = [0, 0x113];

/// Every flow, in pages of 3 (as the Elixir loop pages).
fn paged(mut page: impl FnMut(u64) -> (Vec<OwnedFlow>, Option<u64>)) -> Vec<OwnedFlow> {
    let mut out = Vec::new();
    let mut at = Some(0);
    while let Some(from) = at {
        let (v, next) = page(from);
        out.extend(v);
        at = next;
    }
    out
}

const KEYS: [StatKey; 4] = [
    StatKey::Function,
    StatKey::Module,
    StatKey::Process,
    StatKey::ProcessFunction,
];

fn check(f: &Frozen, chunk: usize) {
    assert_eq!(all(&f.snap), f.events, "snapshot scan");
    assert_eq!(chunked(&f.snap, chunk), f.events, "chunked snapshot scan");
    assert_eq!(f.snap.len(), f.events.len());
    for (k, want) in KEYS.iter().zip(&f.stats) {
        assert!(stats_eq(&call_stats(&f.snap, *k, &[]), want), "{k:?}");
    }
    assert!(trees_eq(&top_call_trees(&f.snap, 20, 1, 1), &f.trees));
}

fn run(max: usize, max_age: Option<i64>, ops: &[Op], chunk: usize) {
    let mut store = EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: max_age,
    });
    let mut gen = Gen::new();
    let mut ids: Vec<u64> = Vec::new();
    let mut frozen: Vec<Frozen> = Vec::new();
    for op in ops {
        match *op {
            Op::Insert(n, j) => {
                for _ in 0..n {
                    let (e, c) = gen.next(j as i64);
                    ids.push(e.id);
                    store.insert(&e, c);
                }
            }
            Op::Relink(k, c) => {
                if let Some(&id) = ids.iter().rev().nth(k as usize % 64) {
                    store.relink(id, c as u64 + 1);
                }
            }
            Op::Expire(age) => {
                let newest = gen.ts;
                store.evict_older_than(newest - age as i64);
            }
            Op::Limit(m) => {
                store.set_limits(StoreConfig {
                    max_events: m as usize,
                    max_age_ns: max_age,
                });
            }
            Op::Snap => {
                let f = Frozen {
                    snap: store.snapshot(),
                    events: all(&store),
                    stats: KEYS.iter().map(|&k| call_stats(&store, k, &[])).collect(),
                    trees: top_call_trees(&store, 20, 1, 1),
                    flows: FLOW_PIDS
                        .iter()
                        .map(|&p| {
                            paged(|from| {
                                let (v, n) = message_flow(&store, p, from, 3);
                                (owned_flows(&v), n)
                            })
                        })
                        .collect(),
                };
                assert!(f.snap.end_seq() == store.next_seq());
                if frozen.len() == 3 {
                    frozen.remove(0);
                }
                frozen.push(f);
            }
        }
        // Every kept snapshot still shows its cut, however the store moved.
        if let Some(f) = frozen.first() {
            assert_eq!(all(&f.snap), f.events);
        }
    }
    for f in &frozen {
        check(f, chunk);
        for (p, want) in FLOW_PIDS.iter().zip(&f.flows) {
            let got = paged(|from| {
                let (v, n) = message_flow_cut(&f.snap, *p, from, 3, |ids, corrs| {
                    store.cut_heads(&f.snap, ids, corrs)
                });
                (owned_flows(&v), n)
            });
            assert_eq!(&got, want, "message flow of {p:#x}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn snapshot_passes_equal_frozen_passes(
        max in 1usize..400,
        age in prop::option::of(200i64..3000),
        chunk in 1usize..200,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        run(max, age, &ops, chunk);
    }
}

#[test]
fn snapshot_survives_compaction_and_full_turnover() {
    // Segments of 256 (max 1000): several sealed, shared segments; the
    // expiry compacts arenas a snapshot holds; then the whole store turns
    // over twice.
    let mut ops = vec![Op::Insert(250, 0); 6];
    ops.push(Op::Snap);
    ops.push(Op::Expire(3000));
    ops.push(Op::Relink(3, 9));
    ops.extend(vec![Op::Insert(250, 5); 10]);
    ops.push(Op::Snap);
    ops.extend(vec![Op::Insert(250, 0); 10]);
    run(1000, None, &ops, 777);
}

/// With a real ingest thread: the pass over a snapshot taken mid-ingest
/// equals the pass over a fresh store fed the events before the cut.
#[test]
fn pass_during_ingest_equals_pass_over_cut() {
    let store = Arc::new(Mutex::new(EventStore::new(StoreConfig {
        max_events: 1 << 20,
        max_age_ns: None,
    })));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut gen = Gen::new();
            while !stop.load(Ordering::Relaxed) && gen.k < 600_000 {
                let batch: Vec<_> = (0..256).map(|_| gen.next(0)).collect();
                let mut s = store.lock().unwrap();
                for (e, c) in &batch {
                    s.insert(e, *c);
                }
            }
        })
    };
    let mut checked = 0;
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let snap = store.lock().unwrap().snapshot();
        let got = call_stats(&snap, StatKey::Function, &[]);
        let trees = top_call_trees(&snap, 10, 2, 1);
        // The frozen copy: the first `end_seq` generated events.
        let mut copy = EventStore::new(StoreConfig {
            max_events: 1 << 20,
            max_age_ns: None,
        });
        let mut gen = Gen::new();
        for _ in 0..snap.end_seq() {
            let (e, c) = gen.next(0);
            copy.insert(&e, c);
        }
        assert_eq!(snap.len() as u64, snap.end_seq());
        assert!(stats_eq(&got, &call_stats(&copy, StatKey::Function, &[])));
        assert!(trees_eq(&trees, &top_call_trees(&copy, 10, 2, 1)));
        checked += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(checked, 5);
}
