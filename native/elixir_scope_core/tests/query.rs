//! Multi-dimensional queries: every plan gives the brute-force answer (a
//! filtered scan in seq order) on random stores and random filter
//! combinations, pages concatenate to the whole answer, and the planner
//! picks the selective index.
use elixir_scope_core::filter::{type_bit, EventFilter};
use elixir_scope_core::query::{self, correlation_search, Plan, Query};
use elixir_scope_core::{CorrelationFields, Event, EventKind, EventStore, Order, StoreConfig};
use proptest::prelude::*;

fn store_of(events: &[(u64, i64, u64, u64, u8, u64, u64)], max: usize) -> EventStore {
    let mut s = EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: None,
    });
    for &(id, ts, pid, mf, kind, corr, parent) in events {
        let ev = Event {
            id,
            timestamp: ts,
            pid,
            module: mf % 3 + 1,
            function: mf % 5 + 1,
            aux: (id % 4) as i64,
            kind,
            ..Event::default()
        };
        s.insert(
            &ev,
            CorrelationFields {
                correlation_id: corr,
                parent_id: parent,
                root_id: 0,
            },
        );
    }
    s
}

fn brute(s: &EventStore, q: &Query) -> Vec<u64> {
    let mut all = Vec::new();
    s.scan(0, usize::MAX, |e| {
        if q.filter.matches(e) {
            all.push(e.seq);
        }
    });
    if q.order == Order::Desc {
        all.reverse();
    }
    all
}

/// Every page of `q` on `plan`, concatenated.
fn paged(s: &EventStore, mut q: Query, plan: Plan) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..100_000 {
        let p = query::run(s, &q, None, plan, 0);
        out.extend(p.events.iter().map(|e| e.seq));
        match p.next {
            Some(n) => q.cursor = Some(n),
            None => return out,
        }
    }
    panic!("paging did not end");
}

fn filter_strategy() -> impl Strategy<Value = EventFilter> {
    (
        prop::option::of(1u64..6),
        prop::option::of(0u64..15),
        prop::option::of(0i64..4),
        prop::option::of(prop::collection::vec(1u8..13, 1..4)),
        prop::option::of(1u64..40),
        prop::option::of(1u64..400),
        prop::option::of((0i64..2000, 0i64..2000)),
    )
        .prop_map(|(pid, mf, arity, kinds, corr, linked, window)| {
            let mut f = EventFilter {
                pid,
                arity,
                correlation_id: corr,
                linked_to: linked,
                ..EventFilter::default()
            };
            if let Some(mf) = mf {
                f.module = Some(mf % 3 + 1);
                f.function = Some(mf % 5 + 1);
            }
            if let Some(k) = kinds {
                f.types = k.iter().fold(0, |m, &k| m | type_bit(k, 1));
            }
            if let Some((a, b)) = window {
                f.from_ts = Some(a.min(b));
                f.to_ts = Some(a.max(b));
            }
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_plan_gives_the_brute_force_answer_in_pages(
        raw in prop::collection::vec(
            (1u64..400, 0i64..2000, 1u64..6, 0u64..15, 1u8..13, 1u64..40, 0u64..400),
            0..600,
        ),
        max in 50usize..700,
        filter in filter_strategy(),
        limit in 1usize..40,
        desc in any::<bool>(),
        budget in 1usize..300,
    ) {
        let s = store_of(&raw, max);
        let q = Query {
            filter,
            order: if desc { Order::Desc } else { Order::Asc },
            limit,
            cursor: None,
            budget,
        };
        let want = brute(&s, &q);
        let mut plans = vec![Plan::Scan, Plan::Time];
        if filter.correlation_id.is_some() { plans.push(Plan::Correlation); }
        if filter.linked_to.is_some() { plans.push(Plan::LinkedTo); }
        if filter.pid.is_some() { plans.push(Plan::Pid); }
        if filter.module.is_some() { plans.push(Plan::Function); }
        for plan in plans {
            prop_assert_eq!(&paged(&s, q, plan), &want, "plan {:?}", plan);
        }
        // The planner's choice, one page at a time.
        let mut got = Vec::new();
        let mut q2 = q;
        loop {
            let p = query::query(&s, &q2, None);
            prop_assert!(p.events.len() <= limit);
            got.extend(p.events.iter().map(|e| e.seq));
            match p.next { Some(n) => q2.cursor = Some(n), None => break }
        }
        prop_assert_eq!(got, want);
    }
}

#[test]
fn the_planner_picks_the_selective_index() {
    // 20,000 events: 100 processes, 50 functions, time = seq.
    let raw: Vec<_> = (1..=20_000u64)
        .map(|i| (i, i as i64, i % 100 + 1, i % 50, 2u8, i, 0))
        .collect();
    let mut s = EventStore::new(StoreConfig {
        max_events: 100_000,
        max_age_ns: None,
    });
    for &(id, ts, pid, mf, kind, corr, parent) in &raw {
        let ev = Event {
            id,
            timestamp: ts,
            pid,
            module: mf + 1,
            function: 7,
            kind,
            ..Event::default()
        };
        s.insert(
            &ev,
            CorrelationFields {
                correlation_id: corr,
                parent_id: parent,
                root_id: 0,
            },
        );
    }
    let q = |f: EventFilter| Query {
        filter: f,
        order: Order::Asc,
        limit: 10,
        cursor: None,
        budget: 1_000_000,
    };
    let plan = |f| query::plan(&s, &q(f));
    assert_eq!(plan(EventFilter::default()).0, Plan::Scan);
    assert_eq!(
        plan(EventFilter {
            correlation_id: Some(5),
            pid: Some(6),
            ..EventFilter::default()
        })
        .0,
        Plan::Correlation
    );
    // A pid (200 events) beats a function (400 events), which beats a
    // window of 1,000.
    let (p, est) = plan(EventFilter {
        pid: Some(3),
        module: Some(4),
        function: Some(7),
        from_ts: Some(1000),
        to_ts: Some(1999),
        ..EventFilter::default()
    });
    assert_eq!(p, Plan::Pid);
    assert!((150..=260).contains(&est), "{est}");
    let (p, est) = plan(EventFilter {
        module: Some(4),
        function: Some(7),
        from_ts: Some(1000),
        to_ts: Some(1999),
        ..EventFilter::default()
    });
    assert_eq!(p, Plan::Function);
    assert!((300..=500).contains(&est), "{est}");
    let (p, est) = plan(EventFilter {
        module: Some(4),
        function: Some(7),
        from_ts: Some(1000),
        to_ts: Some(1099),
        ..EventFilter::default()
    });
    assert_eq!(p, Plan::Time);
    assert!((100..=200).contains(&est), "{est}");
    // A window holding most of the store is scanned in chunks instead.
    assert_eq!(
        plan(EventFilter {
            from_ts: Some(0),
            to_ts: Some(19_000),
            ..EventFilter::default()
        })
        .0,
        Plan::Scan
    );
}

#[test]
fn correlation_search_finds_call_return_parents_messages_and_state() {
    let mut s = EventStore::new(StoreConfig::default());
    let mut put = |id: u64, kind: EventKind, pid: u64, corr: u64, parent: u64| {
        s.insert(
            &Event {
                id,
                timestamp: id as i64,
                pid,
                kind: kind as u8,
                ..Event::default()
            },
            CorrelationFields {
                correlation_id: corr,
                parent_id: parent,
                root_id: 1,
            },
        );
    };
    use EventKind::*;
    put(1, FunctionCall, 10, 1, 0); // outer
    put(2, FunctionCall, 10, 2, 1); // the call we ask about
    put(3, FunctionCall, 10, 3, 2); // nested
    put(4, MessageSend, 10, 4, 3); // sent inside the nested call
    put(5, StateChange, 10, 5, 2);
    put(6, FunctionReturn, 10, 3, 2); // nested returns
    put(7, FunctionCall, 20, 7, 0); // the receiver's handler
    put(8, MessageReceive, 20, 4, 7); // receives 4
    put(9, FunctionReturn, 10, 2, 1); // our call returns
    put(10, FunctionReturn, 10, 1, 0);

    for id in [2, 9, 5] {
        let r = correlation_search(&s, id, 8, 1000);
        assert_eq!(r.call.map(|c| c.id), Some(2), "from {id}");
        assert_eq!(r.ret.map(|e| e.id), Some(9));
        assert_eq!(r.ancestors.iter().map(|e| e.id).collect::<Vec<_>>(), [1]);
        assert_eq!(
            r.inside.iter().map(|e| e.id).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        assert_eq!(r.messages.len(), 1);
        let (snd, rcv, handler) = r.messages[0];
        assert_eq!(
            (snd.id, rcv.map(|e| e.id), handler.map(|e| e.id)),
            (4, Some(8), Some(7))
        );
        assert_eq!(
            r.state_changes.iter().map(|e| e.id).collect::<Vec<_>>(),
            [5]
        );
    }
    // depth 1: only what happened directly inside.
    let r = correlation_search(&s, 2, 1, 1000);
    assert_eq!(r.inside.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 5, 6]);
    assert!(r.messages.is_empty());
    assert!(correlation_search(&s, 999, 3, 10).event.is_none());
    // The limit is reported.
    assert!(correlation_search(&s, 2, 8, 2).truncated);
}

#[test]
fn correlation_search_follows_a_message_into_the_callback_it_triggered() {
    let mut s = EventStore::new(StoreConfig::default());
    let mut put =
        |id: u64, kind: EventKind, pid: u64, corr: u64, parent: u64, flags: u8, peer: u64| {
            s.insert(
                &Event {
                    id,
                    timestamp: id as i64,
                    pid,
                    peer,
                    kind: kind as u8,
                    flags,
                    ..Event::default()
                },
                CorrelationFields {
                    correlation_id: corr,
                    parent_id: parent,
                    root_id: 0,
                },
            );
        };
    use EventKind::*;
    // A client call sends; a gen_server receives outside any call, then its
    // handle_call (callback class bits set) records the receive as trigger;
    // the callback's return is a state record.
    put(1, FunctionCall, 10, 1, 0, 0, 0);
    put(2, MessageSend, 10, 2, 1, 0, 20);
    put(3, MessageReceive, 20, 2, 0, 0, 0);
    put(4, FunctionCall, 20, 4, 0, 1 << 1, 3);
    put(5, FunctionReturn, 20, 4, 0, 1 << 1, 3);
    let r = correlation_search(&s, 1, 3, 100);
    assert_eq!(r.messages.len(), 1);
    let (snd, rcv, handler) = r.messages[0];
    assert_eq!(
        (snd.id, rcv.map(|e| e.id), handler.map(|e| e.id)),
        (2, Some(3), Some(4))
    );
    // From the callback, its return is the state record it left.
    let r = correlation_search(&s, 4, 3, 100);
    assert_eq!(r.ret.map(|e| e.id), Some(5));
    assert_eq!(
        r.state_changes.iter().map(|e| e.id).collect::<Vec<_>>(),
        [5]
    );
}
