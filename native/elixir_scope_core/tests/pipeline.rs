//! The pipeline end to end: sharded rings → pool → correlator → store, the
//! accounting identity, faults, scaling under load, and a property test of
//! per-process call correlation against a reference model.

use elixir_scope_core::{
    call_contents, links_of, next_event_id, shard_of, Event, EventKind, LinkKind, Order, Overflow,
    Pipeline, PipelineConfig, PoolConfig, StoreConfig,
};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn clock() -> i64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as i64 + 1
}

fn config(shards: usize, cap: usize, workers: usize, batch: usize) -> PipelineConfig {
    PipelineConfig {
        shards,
        shard_capacity: cap,
        overflow: Overflow::DropNewest,
        pool: PoolConfig {
            workers,
            batch_size: batch,
            flush_interval: Duration::from_millis(1),
            max_dead_letters: 16,
            breaker_threshold: 0,
            ..PoolConfig::default()
        },
        ..PipelineConfig::default()
    }
}

/// What a test producer writes.
#[derive(Clone, Copy, Debug)]
enum Op {
    Call { key: u64 },
    Return { key: u64 },
    Send { to: u64, hash: u64 },
    Recv { hash: u64 },
}

/// Writes `op` for process `pid` into its shard; returns the event id, or
/// `None` if the shard was full.
fn write(p: &Pipeline, pid: u64, op: Op) -> Option<u64> {
    let ring = &p.shards()[shard_of(pid, p.shards().len())];
    let id = next_event_id();
    let ok = ring.push_with(|ev| {
        *ev = Event {
            id,
            timestamp: clock(),
            pid,
            ..Event::default()
        };
        match op {
            Op::Call { key } => {
                ev.kind = EventKind::FunctionCall as u8;
                ev.peer = key;
                ev.module = 7;
                ev.function = 9;
            }
            Op::Return { key } => {
                ev.kind = EventKind::FunctionReturn as u8;
                ev.peer = key;
            }
            Op::Send { to, hash } => {
                ev.kind = EventKind::MessageSend as u8;
                ev.peer = to;
                ev.aux = hash as i64;
            }
            Op::Recv { hash } => {
                ev.kind = EventKind::MessageReceive as u8;
                ev.aux = hash as i64;
            }
        }
        ev.payload.clear();
        ev.payload.extend_from_slice(&id.to_le_bytes());
    });
    ok.ok().map(|_| id)
}

fn assert_balanced(p: &Pipeline) {
    let a = p.accounting();
    assert_eq!(a.in_flight, 0, "{a:?}");
    assert_eq!(a.unaccounted(), 0, "{a:?}");
}

#[test]
fn nested_calls_and_messages_from_many_threads() {
    let p = Arc::new(Pipeline::new(config(8, 1 << 14, 2, 64), clock).unwrap());
    let threads = 8u64;
    let per = 2_000u64;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                let pid = 1000 + t * 8;
                // (call id, parent id) ground truth; returns by key.
                let mut truth = Vec::new();
                let mut stack: Vec<(u64, u64)> = Vec::new();
                let mut sent = Vec::new();
                let mut n = 0;
                while n < per {
                    let depth = 1 + (n % 4);
                    for d in 0..depth {
                        let key = n * 10 + d + 1;
                        let id = loop {
                            if let Some(id) = write(&p, pid, Op::Call { key }) {
                                break id;
                            }
                            std::thread::yield_now();
                        };
                        truth.push((id, stack.last().map(|s| s.0)));
                        stack.push((id, key));
                    }
                    let to = 1000 + ((t + 1) % threads) * 8;
                    let hash = n % 3 + 1; // repeated identical content
                    while write(&p, pid, Op::Send { to, hash }).is_none() {
                        std::thread::yield_now();
                    }
                    sent.push((to, hash));
                    while let Some((_, key)) = stack.pop() {
                        while write(&p, pid, Op::Return { key }).is_none() {
                            std::thread::yield_now();
                        }
                    }
                    n += 1;
                }
                (pid, truth, sent)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    // Every process receives what was sent to it.
    for (_, _, sent) in &results {
        for &(to, hash) in sent {
            while write(&p, to, Op::Recv { hash }).is_none() {
                std::thread::yield_now();
            }
        }
    }
    assert!(p.flush(Duration::from_secs(30)));
    assert_balanced(&p);

    let store = p.engine().store().lock().unwrap();
    for (pid, truth, _) in &results {
        for &(id, parent) in truth {
            let e = store.get(id).expect("call stored");
            assert_eq!(e.parent_id, parent.unwrap_or(0), "pid {pid} call {id}");
            // Exactly one return completes it.
            let rets: Vec<_> = store
                .by_correlation(id, 10, Order::Asc)
                .into_iter()
                .filter(|r| r.kind == EventKind::FunctionReturn as u8)
                .collect();
            assert_eq!(rets.len(), 1, "call {id}");
            assert_eq!(
                links_of(&rets[0]),
                vec![elixir_scope_core::Link::new(LinkKind::Completes, id)]
            );
        }
        // Per-process order: store order equals write order.
        let evs = store.by_pid(*pid, usize::MAX, Order::Asc);
        assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
    }
    // Every receive matched exactly one send of the same receiver.
    let m = p.engine().correlator_metrics();
    assert_eq!(m.receives, threads * per);
    assert_eq!(m.matched_receives, threads * per);
    let mut used = HashMap::new();
    for (pid, _, _) in &results {
        for e in store.by_pid(*pid, usize::MAX, Order::Asc) {
            if e.kind == EventKind::MessageReceive as u8 {
                let send = store.get(e.correlation_id).expect("linked send stored");
                assert_eq!(send.kind, EventKind::MessageSend as u8);
                assert_eq!(send.peer, *pid);
                assert_eq!(send.aux, e.aux);
                assert!(used.insert(send.id, e.id).is_none(), "send used twice");
            }
        }
    }
}

#[test]
fn call_contents_follow_nesting() {
    let p = Pipeline::new(config(2, 1024, 1, 16), clock).unwrap();
    let pid = 42;
    let outer = write(&p, pid, Op::Call { key: 1 }).unwrap();
    let inner = write(&p, pid, Op::Call { key: 2 }).unwrap();
    let send = write(&p, pid, Op::Send { to: 9, hash: 5 }).unwrap();
    let r_inner = write(&p, pid, Op::Return { key: 2 }).unwrap();
    let r_outer = write(&p, pid, Op::Return { key: 1 }).unwrap();
    let other = write(&p, pid, Op::Call { key: 3 }).unwrap();
    assert!(p.flush(Duration::from_secs(5)));
    let store = p.engine().store().lock().unwrap();
    let ids: Vec<u64> = call_contents(&store, outer, 100)
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![outer, inner, send, r_inner, r_outer]);
    assert!(!ids.contains(&other));
    let chain: Vec<u64> = store.causal_chain(send).iter().map(|e| e.id).collect();
    assert_eq!(chain, vec![outer, inner, send]);
    assert_eq!(call_contents(&store, outer, 2).len(), 2);
}

#[test]
fn late_receive_is_relinked_in_the_store() {
    // One worker, receive's shard drained before the send is written.
    let p = Pipeline::new(config(4, 1024, 1, 16), clock).unwrap();
    let (a, b) = (1u64, 2u64);
    let recv = write(&p, b, Op::Recv { hash: 77 }).unwrap();
    assert!(p.flush(Duration::from_secs(5)));
    let send = write(&p, a, Op::Send { to: b, hash: 77 }).unwrap();
    assert!(p.flush(Duration::from_secs(5)));
    let store = p.engine().store().lock().unwrap();
    let r = store.get(recv).unwrap();
    assert_eq!(r.correlation_id, send);
    assert_eq!(
        links_of(&r),
        vec![elixir_scope_core::Link::new(LinkKind::Receives, send)]
    );
    assert_eq!(p.engine().metrics().late_links, 1);
}

#[test]
fn injected_failures_retry_then_dead_letter_with_exact_accounting() {
    let p = Pipeline::new(config(1, 1024, 1, 10), clock).unwrap();
    // One failure: the retry stores the batch.
    p.engine().inject_failures(1);
    for k in 0..10 {
        write(&p, 5, Op::Call { key: k + 1 }).unwrap();
    }
    assert!(p.flush(Duration::from_secs(5)));
    assert_eq!(p.accounting().stored, 10);
    assert_eq!(p.pool().metrics().retries, 1);
    // Two failures: the batch is dead-lettered, counted and inspectable.
    p.engine().inject_failures(2);
    for k in 0..10 {
        write(&p, 5, Op::Call { key: k + 100 }).unwrap();
    }
    assert!(p.flush(Duration::from_secs(5)));
    let a = p.accounting();
    assert_eq!(a.stored, 10);
    assert_eq!(a.dead_lettered, 10);
    assert_balanced(&p);
    let dead = p.pool().dead_letters();
    assert_eq!(dead.iter().map(|d| d.events.len()).sum::<usize>(), 10);
    assert!(dead[0].reason.contains("injected"));
    // It recovers.
    write(&p, 5, Op::Call { key: 999 }).unwrap();
    assert!(p.flush(Duration::from_secs(5)));
    assert_eq!(p.accounting().stored, 11);
    // The external path retries and dead-letters the same way.
    p.engine().inject_failures(2);
    let ev = Event {
        id: next_event_id(),
        kind: EventKind::Term as u8,
        ..Event::default()
    };
    assert!(p.process_external(std::slice::from_ref(&ev)).is_err());
    assert_eq!(p.accounting().dead_lettered, 11);
    assert_balanced(&p);
}

#[test]
fn scaling_under_load_loses_and_reorders_nothing() {
    let p = Arc::new(Pipeline::new(config(8, 1 << 12, 2, 32), clock).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..4u64)
        .map(|t| {
            let (p, stop) = (Arc::clone(&p), Arc::clone(&stop));
            std::thread::spawn(move || {
                let pid = 500 + t;
                let (mut ok, mut full) = (0u64, 0u64);
                let mut key = 0;
                while !stop.load(Ordering::Relaxed) {
                    key += 1;
                    match write(&p, pid, Op::Call { key }) {
                        Some(_) => ok += 1,
                        None => full += 1,
                    }
                }
                (pid, ok, full)
            })
        })
        .collect();
    for n in [1, 4, 2, 3, 1, 2] {
        std::thread::sleep(Duration::from_millis(40));
        p.pool().scale(n);
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = producers.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(p.flush(Duration::from_secs(30)));
    assert_balanced(&p);
    let a = p.accounting();
    let written: u64 = results.iter().map(|r| r.1).sum();
    let refused: u64 = results.iter().map(|r| r.2).sum();
    assert_eq!(a.accepted, written);
    assert_eq!(a.buffer_full, refused);
    assert_eq!(a.stored, written);
    let store = p.engine().store().lock().unwrap();
    for (pid, ok, _) in results {
        let evs = store.by_pid(pid, usize::MAX, Order::Asc);
        assert_eq!(evs.len() as u64, ok);
        assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
    }
}

#[test]
fn store_bounds_are_accounted() {
    let mut c = config(2, 1 << 12, 1, 64);
    c.store = StoreConfig {
        max_events: 100,
        max_age_ns: None,
    };
    let p = Pipeline::new(c, clock).unwrap();
    for k in 0..1000 {
        write(&p, 3, Op::Call { key: k + 1 }).unwrap();
    }
    assert!(p.flush(Duration::from_secs(5)));
    let a = p.accounting();
    assert_eq!((a.stored, a.evicted), (100, 900));
    assert_balanced(&p);
}

#[test]
fn overflow_drop_oldest_is_accounted() {
    let mut c = config(1, 64, 1, 8);
    c.overflow = Overflow::DropOldest;
    c.pool.flush_interval = Duration::from_millis(50);
    let p = Pipeline::new(c, clock).unwrap();
    for k in 0..5000 {
        write(&p, 3, Op::Call { key: k + 1 }).unwrap();
    }
    assert!(p.flush(Duration::from_secs(5)));
    let a = p.accounting();
    assert_eq!(a.accepted, 5000);
    assert!(a.overflow > 0);
    assert_eq!(a.stored + a.overflow, 5000);
    assert_balanced(&p);
}

#[test]
fn latency_histogram_reports_percentiles() {
    let p = Pipeline::new(config(1, 1024, 1, 16), clock).unwrap();
    for k in 0..100 {
        write(&p, 3, Op::Call { key: k + 1 }).unwrap();
    }
    assert!(p.flush(Duration::from_secs(5)));
    let m = p.engine().metrics();
    assert_eq!(m.latency_samples, 100);
    assert!(m.latency_p50_ns > 0 && m.latency_p50_ns <= m.latency_p99_ns);
    p.engine().reset_latency();
    assert_eq!(p.engine().metrics().latency_samples, 0);
}

// ---- property: per-process call correlation vs a reference model ----------

#[derive(Clone, Debug)]
enum POp {
    Call(u8),
    Return(u8),
}

fn pop() -> impl Strategy<Value = (u8, POp)> {
    (
        0u8..4,
        prop_oneof![(1u8..5).prop_map(POp::Call), (1u8..5).prop_map(POp::Return)],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn calls_and_returns_match_reference(ops in prop::collection::vec(pop(), 1..200), shards in 1usize..5, batch in 1usize..20) {
        let p = Pipeline::new(config(shards, 1024, 2, batch), clock).unwrap();
        // Reference: per pid, a stack of (call id, key).
        let mut stacks: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        let mut expect: Vec<(u64, u64, u64)> = Vec::new(); // (id, correlation, parent)
        for (proc_, op) in &ops {
            let pid = 100 + *proc_ as u64;
            let st = stacks.entry(pid).or_default();
            match op {
                POp::Call(k) => {
                    let id = write(&p, pid, Op::Call { key: *k as u64 }).unwrap();
                    expect.push((id, id, st.last().map_or(0, |f| f.0)));
                    st.push((id, *k as u64));
                }
                POp::Return(k) => {
                    let id = write(&p, pid, Op::Return { key: *k as u64 }).unwrap();
                    match st.iter().rposition(|f| f.1 == *k as u64) {
                        Some(i) => {
                            let call = st[i].0;
                            st.truncate(i);
                            let parent = st.last().map_or(0, |f| f.0);
                            expect.push((id, call, parent));
                        }
                        None => expect.push((id, id, 0)),
                    }
                }
            }
        }
        prop_assert!(p.flush(Duration::from_secs(10)));
        let store = p.engine().store().lock().unwrap();
        for (id, corr, parent) in expect {
            let e = store.get(id).unwrap();
            prop_assert_eq!(e.correlation_id, corr, "event {}", id);
            prop_assert_eq!(e.parent_id, parent, "event {}", id);
        }
    }
}
