//! The event-type and AST-node indexes of records stored whole as terms
//! (`EventStore::insert_term`): every chain query and plan equals a
//! filtered scan on random stores with eviction and expiry, the index
//! sizes are exact, and keyed records read no peer, parent or root.
use elixir_scope_core::filter::EventFilter;
use elixir_scope_core::query::{self, Plan, Query};
use elixir_scope_core::{
    CorrelationFields, Event, EventKind, EventStore, IndexSizes, Order, StoreConfig, StoredEvent,
    TermKeys, TERM_FLAG_FUNCTION,
};
use proptest::prelude::*;

/// (id, ts, pid, type key index, ast key index, term?, function flag)
type Spec = (u64, i64, u64, u8, u8, bool, bool);

const TYPE_KEYS: [u64; 4] = [0, 1 << 63 | 11, 1 << 63 | 12, 1 << 63 | 13];
const AST_KEYS: [u64; 5] = [0, 1 << 63 | 21, 1 << 63 | 22, 1 << 63 | 23, 1 << 63 | 24];

fn insert(s: &mut EventStore, &(id, ts, pid, t, a, term, func): &Spec) {
    let corr = CorrelationFields {
        correlation_id: id / 3,
        parent_id: id / 2,
        root_id: 7,
    };
    if term {
        let ev = Event {
            id,
            timestamp: ts,
            pid,
            peer: 99,
            kind: EventKind::Term as u8,
            flags: if func { TERM_FLAG_FUNCTION } else { 0 },
            payload: vec![1, 2, 3],
            ..Event::default()
        };
        let keys = TermKeys {
            event_type: TYPE_KEYS[t as usize % TYPE_KEYS.len()],
            ast_node: AST_KEYS[a as usize % AST_KEYS.len()],
        };
        s.insert_term(&ev, corr, keys);
    } else {
        let ev = Event {
            id,
            timestamp: ts,
            pid,
            peer: 5,
            module: 1,
            function: 2,
            aux: 3,
            kind: EventKind::FunctionCall as u8,
            ..Event::default()
        };
        s.insert(&ev, corr);
    }
}

fn all(s: &EventStore) -> Vec<StoredEvent<'_>> {
    let mut v = Vec::new();
    s.scan(0, usize::MAX, |e| v.push(*e));
    v
}

fn seqs(v: &[StoredEvent<'_>]) -> Vec<u64> {
    v.iter().map(|e| e.seq).collect()
}

fn brute_sizes(s: &EventStore) -> IndexSizes {
    let v = all(s);
    let term = |e: &&StoredEvent| e.kind == EventKind::Term as u8;
    IndexSizes {
        total: v.len(),
        with_pid: v.iter().filter(|e| e.pid != 0).count(),
        with_function: v
            .iter()
            .filter(|e| {
                if term(e) {
                    e.flags & TERM_FLAG_FUNCTION != 0
                } else {
                    e.kind == EventKind::FunctionCall as u8
                }
            })
            .count(),
        event_type: v.iter().filter(term).filter(|e| e.aux != 0).count(),
        ast_node: v.iter().filter(|e| e.ast_node != 0).count(),
    }
}

fn spec_strategy() -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        (
            0i64..5_000,
            0u64..6,
            any::<u8>(),
            any::<u8>(),
            prop::bool::weighted(0.7),
            any::<bool>(),
        ),
        1..600,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ts, pid, t, a, term, f))| (i as u64 + 1, ts, pid, t, a, term, f))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn chains_plans_and_sizes_match_a_scan(
        specs in spec_strategy(),
        max in 16usize..400,
        cutoff in prop::option::of(0i64..3_000),
        limit in 1usize..50,
    ) {
        let mut s = EventStore::new(StoreConfig { max_events: max, max_age_ns: None });
        for sp in &specs {
            insert(&mut s, sp);
        }
        // Re-inserting ids already stored changes nothing.
        for sp in specs.iter().rev().take(20) {
            insert(&mut s, sp);
        }
        if let Some(c) = cutoff {
            s.evict_older_than(c);
        }
        prop_assert_eq!(s.index_sizes(), brute_sizes(&s));
        let everything = all(&s);
        for &k in TYPE_KEYS.iter().skip(1) {
            let want: Vec<u64> = everything
                .iter()
                .filter(|e| e.kind == EventKind::Term as u8 && e.aux as u64 == k)
                .map(|e| e.seq)
                .collect();
            prop_assert_eq!(seqs(&s.by_event_type(k, usize::MAX, Order::Asc)), want.clone());
            let mut desc = want.clone();
            desc.reverse();
            desc.truncate(limit);
            prop_assert_eq!(seqs(&s.by_event_type(k, limit, Order::Desc)), desc);
            let f = EventFilter { event_type: Some(k), ..EventFilter::default() };
            for plan in [Plan::EventType, Plan::Scan] {
                let q = Query { filter: f, order: Order::Asc, limit: usize::MAX, cursor: None, budget: usize::MAX };
                prop_assert_eq!(seqs(&query::run(&s, &q, None, plan, 0).events), want.clone());
            }
        }
        for &k in AST_KEYS.iter().skip(1) {
            let want: Vec<u64> = everything.iter().filter(|e| e.ast_node == k).map(|e| e.seq).collect();
            prop_assert_eq!(seqs(&s.by_ast_node(k, usize::MAX, Order::Asc)), want.clone());
            let f = EventFilter { ast_node: Some(k), pid: Some(2), ..EventFilter::default() };
            let both: Vec<u64> = everything
                .iter()
                .filter(|e| e.ast_node == k && e.pid == 2)
                .map(|e| e.seq)
                .collect();
            for plan in [Plan::AstNode, Plan::Pid, Plan::Scan] {
                let q = Query { filter: f, order: Order::Asc, limit: usize::MAX, cursor: None, budget: usize::MAX };
                prop_assert_eq!(seqs(&query::run(&s, &q, None, plan, 0).events), both.clone());
            }
        }
        // Key 0 is "none": never indexed.
        prop_assert!(s.by_event_type(0, usize::MAX, Order::Asc).is_empty());
        prop_assert!(s.by_ast_node(0, usize::MAX, Order::Asc).is_empty());
        // Keyed records read no peer, parent, root or internal flag; the
        // parent chains only hold the other records.
        for e in &everything {
            if e.kind == EventKind::Term as u8 {
                prop_assert_eq!((e.peer, e.parent_id, e.root_id), (0, 0, 0));
                prop_assert_eq!(e.flags & !TERM_FLAG_FUNCTION, 0);
            } else {
                prop_assert_eq!((e.peer, e.root_id, e.ast_node), (5, 7, 0));
            }
        }
        for e in everything
            .iter()
            .filter(|e| e.kind != EventKind::Term as u8 && e.parent_id != 0)
            .take(20)
        {
            let kids: Vec<u64> = everything
                .iter()
                .filter(|c| c.parent_id == e.parent_id)
                .map(|c| c.seq)
                .collect();
            prop_assert_eq!(seqs(&s.children(e.parent_id, usize::MAX)), kids);
        }
    }
}

#[test]
fn the_planner_picks_the_event_type_and_ast_chains() {
    let mut s = EventStore::new(StoreConfig {
        max_events: 100_000,
        max_age_ns: None,
    });
    for i in 1..=50_000u64 {
        // One event in 1,000 of type 1, one in 500 at AST node 1.
        let t = if i % 1000 == 0 { 1 } else { 2 };
        let a = if i % 500 == 0 { 1 } else { 0 };
        insert(&mut s, &(i, i as i64, i % 4, t, a, true, false));
    }
    let q = |f: EventFilter| Query {
        filter: f,
        order: Order::Asc,
        limit: 1000,
        cursor: None,
        budget: 50_000,
    };
    let typed = q(EventFilter {
        event_type: Some(TYPE_KEYS[1]),
        ..EventFilter::default()
    });
    let (plan, est) = query::plan(&s, &typed);
    assert_eq!(plan, Plan::EventType);
    assert_eq!(est, 50);
    assert_eq!(query::query(&s, &typed, None).events.len(), 50);
    let ast = q(EventFilter {
        ast_node: Some(AST_KEYS[1]),
        ..EventFilter::default()
    });
    assert_eq!(query::plan(&s, &ast), (Plan::AstNode, 100));
    // A type held by most events is not selective: a scan.
    let common = q(EventFilter {
        event_type: Some(TYPE_KEYS[2]),
        ..EventFilter::default()
    });
    assert_eq!(query::plan(&s, &common).0, Plan::Scan);
    let z = s.index_sizes();
    assert_eq!(
        (z.total, z.event_type, z.ast_node, z.with_pid),
        (50_000, 50_000, 100, 37_500)
    );
}
