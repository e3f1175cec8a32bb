//! Tests of the worker pool: exactly-once, per-shard order, flush, scaling
//! under load, panic / error handling, the dead-letter bound, idling and
//! shutdown.
//!
//! Events are `(shard, producer, seq)`; the recording stage logs
//! `(producer, seq)` per shard so exactly-once delivery and per-producer
//! order inside each shard can be checked exactly.

use elixir_scope_core::{Overflow, PoolConfig, Ring, Stage, StageCtx, WorkerPool};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

type Ev = (usize, usize, u64);

const SHARDS: usize = 4;

fn shards(n: usize, cap: usize) -> Vec<Arc<Ring<Ev>>> {
    (0..n)
        .map(|_| Arc::new(Ring::new(cap, Overflow::DropNewest).unwrap()))
        .collect()
}

fn config(workers: usize, batch_size: usize) -> PoolConfig {
    PoolConfig {
        workers,
        batch_size,
        flush_interval: Duration::from_millis(5),
        max_dead_letters: 16,
        // Off: these tests count retries and dead letters per batch.
        breaker_threshold: 0,
        ..PoolConfig::default()
    }
}

/// Push one event, retrying (and waking the pool) while the shard is full.
fn push(ring: &Ring<Ev>, pool: Option<&WorkerPool<Ev>>, ev: Ev) {
    loop {
        if ring.push_with(|v| *v = ev).is_ok() {
            return;
        }
        if let Some(p) = pool {
            p.notify();
        }
        thread::yield_now();
    }
}

type Log = Arc<Mutex<Vec<Vec<(usize, u64)>>>>;

fn recorder() -> (Log, Stage<Ev>) {
    let log: Log = Arc::new(Mutex::new(vec![Vec::new(); SHARDS]));
    let l = Arc::clone(&log);
    let stage: Stage<Ev> = Arc::new(move |ctx: &StageCtx, batch: &[Ev]| {
        let mut log = l.lock().unwrap();
        for &(shard, p, seq) in batch {
            assert_eq!(shard, ctx.shard, "event from another shard");
            log[shard].push((p, seq));
        }
        Ok(())
    });
    (log, stage)
}

/// Producer `p` writes `m` events, event `seq` to shard `(p + seq) % 4`.
fn produce(rings: &[Arc<Ring<Ev>>], pool: &WorkerPool<Ev>, producers: usize, m: u64) {
    thread::scope(|s| {
        for p in 0..producers {
            s.spawn(move || {
                for seq in 0..m {
                    let shard = (p + seq as usize) % SHARDS;
                    push(&rings[shard], Some(pool), (shard, p, seq));
                    if seq % 256 == 0 {
                        pool.notify();
                    }
                }
            });
        }
    });
}

/// Every event of `producers × m` seen exactly once, and each producer's
/// events in increasing order within every shard.
fn check_log(log: &Log, producers: usize, m: u64) {
    let log = log.lock().unwrap();
    let mut seen = vec![vec![false; m as usize]; producers];
    for (shard, entries) in log.iter().enumerate() {
        let mut last = vec![None::<u64>; producers];
        for &(p, seq) in entries {
            assert_eq!((p + seq as usize) % SHARDS, shard, "wrong shard");
            if let Some(prev) = last[p] {
                assert!(seq > prev, "shard {shard}: producer {p} reordered");
            }
            last[p] = Some(seq);
            assert!(!seen[p][seq as usize], "duplicate ({p}, {seq})");
            seen[p][seq as usize] = true;
        }
    }
    let missing = seen.iter().flatten().filter(|s| !**s).count();
    assert_eq!(missing, 0, "events lost");
}

fn ring_reads(rings: &[Arc<Ring<Ev>>]) -> u64 {
    rings.iter().map(|r| r.stats().reads).sum()
}

#[test]
fn exactly_once_and_per_shard_order() {
    let rings = shards(SHARDS, 1024);
    let (log, stage) = recorder();
    let pool = WorkerPool::new(rings.clone(), config(2, 64), stage);
    produce(&rings, &pool, 4, 20_000);
    assert!(pool.flush(Duration::from_secs(2)));
    check_log(&log, 4, 20_000);
    let m = pool.metrics();
    assert_eq!(m.events_processed, 80_000);
    assert_eq!(m.dead_lettered_events, 0);
    assert_eq!(
        ring_reads(&rings),
        m.events_processed + m.dead_lettered_events
    );
    assert_eq!(m.workers, 2);
    assert_eq!(m.per_worker.len(), 2);
    let (ev, b): (usize, usize) = m
        .per_worker
        .iter()
        .fold((0, 0), |a, w| (a.0 + w.0, a.1 + w.1));
    assert_eq!(ev as u64, m.events_processed);
    assert_eq!(b as u64, m.batches);
    assert!(pool.shutdown());
}

#[test]
fn flush_waits_for_events_written_before_the_call() {
    let rings = shards(SHARDS, 256);
    let open = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (o, d) = (Arc::clone(&open), Arc::clone(&done));
    let stage: Stage<Ev> = Arc::new(move |_ctx: &StageCtx, batch: &[Ev]| {
        while !o.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(1));
        }
        d.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    });
    let pool = WorkerPool::new(rings.clone(), config(2, 8), stage);
    // Nothing written: immediately flushed.
    assert!(pool.flush(Duration::ZERO));
    for i in 0..40u64 {
        let shard = i as usize % SHARDS;
        push(&rings[shard], None, (shard, 0, i));
    }
    // The stage is blocked: the flush times out.
    let t = Instant::now();
    assert!(!pool.flush(Duration::from_millis(50)));
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert!(done.load(Ordering::SeqCst) < 40);
    open.store(true, Ordering::Release);
    assert!(pool.flush(Duration::from_secs(1)));
    // Everything written before the call had been processed on return.
    assert_eq!(done.load(Ordering::SeqCst), 40);
    assert_eq!(pool.metrics().events_processed, 40);
}

#[test]
fn notify_wakes_idle_workers() {
    let rings = shards(SHARDS, 64);
    let (log, stage) = recorder();
    let mut cfg = config(2, 16);
    cfg.flush_interval = Duration::from_secs(10);
    let pool = WorkerPool::new(rings.clone(), cfg, stage);
    thread::sleep(Duration::from_millis(20)); // let the workers park
    push(&rings[1], None, (1, 0, 0));
    pool.notify();
    let t = Instant::now();
    while log.lock().unwrap()[1].is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5), "not woken");
        thread::sleep(Duration::from_millis(1));
    }
    // Dropping a pool whose workers park for 10 s must not wait for them
    // (bounds are generous: they only tell "woken" from "waited 10 s").
    let t = Instant::now();
    drop(pool);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn scale_up_and_down_under_load() {
    let rings = shards(SHARDS, 512);
    let (log, inner) = recorder();
    // A slow stage keeps the shards backed up while the pool is rescaled.
    let stage: Stage<Ev> = Arc::new(move |ctx: &StageCtx, batch: &[Ev]| {
        thread::sleep(Duration::from_micros(50));
        inner(ctx, batch)
    });
    let pool = WorkerPool::new(rings.clone(), config(1, 32), stage);
    let stop = AtomicBool::new(false);
    let steps = thread::scope(|s| {
        let producer = s.spawn(|| produce(&rings, &pool, 4, 25_000));
        let scaler = s.spawn(|| {
            let mut steps = 0;
            for n in [4, 2, 3, 1, 5, 2, 4, 1, 3].into_iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                pool.scale(n);
                assert_eq!(pool.workers(), n);
                steps += 1;
                thread::sleep(Duration::from_millis(1));
            }
            steps
        });
        producer.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        scaler.join().unwrap()
    });
    assert!(steps >= 9, "only {steps} scale steps under load");
    assert!(pool.flush(Duration::from_secs(2)));
    check_log(&log, 4, 25_000);
    let m = pool.metrics();
    assert_eq!(m.events_processed, 100_000);
    assert_eq!(m.per_worker.len(), m.workers);
    assert_eq!(
        ring_reads(&rings),
        m.events_processed + m.dead_lettered_events
    );
    pool.scale(0); // clamped to one worker
    assert_eq!(pool.workers(), 1);
    push(&rings[3], None, (3, 9, 0));
    assert!(pool.flush(Duration::from_secs(1)));
    assert_eq!(pool.metrics().events_processed, 100_001);
}

/// A pool over one pre-filled shard (100 events, batches of 10 from
/// position 0), so batch boundaries are deterministic.
fn prefilled(stage: Stage<Ev>, max_dead_letters: usize) -> (Vec<Arc<Ring<Ev>>>, WorkerPool<Ev>) {
    let rings = shards(1, 256);
    for seq in 0..100 {
        push(&rings[0], None, (0, 0, seq));
    }
    let mut cfg = config(1, 10);
    cfg.max_dead_letters = max_dead_letters;
    let pool = WorkerPool::new(rings.clone(), cfg, stage);
    (rings, pool)
}

fn has(batch: &[Ev], seq: u64) -> bool {
    batch.iter().any(|e| e.2 == seq)
}

#[test]
fn panic_on_first_attempt_is_retried() {
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    let stage: Stage<Ev> = Arc::new(move |ctx: &StageCtx, batch: &[Ev]| {
        if ctx.attempt == 0 && has(batch, 25) {
            panic!("transient");
        }
        c.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    });
    let (rings, pool) = prefilled(stage, 4);
    assert!(pool.flush(Duration::from_secs(1)));
    let m = pool.metrics();
    assert_eq!(count.load(Ordering::SeqCst), 100);
    assert_eq!((m.panics, m.restarts, m.retries), (1, 1, 1));
    assert_eq!((m.events_processed, m.batches), (100, 10));
    assert_eq!((m.dead_lettered_events, m.dead_letter_overflow), (0, 0));
    assert!(pool.dead_letters().is_empty());
    assert_eq!(ring_reads(&rings), 100);
}

#[test]
fn persistent_panic_is_dead_lettered_and_pool_keeps_working() {
    let (log, inner) = recorder();
    let stage: Stage<Ev> = Arc::new(move |ctx: &StageCtx, batch: &[Ev]| {
        if has(batch, 25) {
            panic!("poison at {}", ctx.first_position);
        }
        inner(ctx, batch)
    });
    let (rings, pool) = prefilled(stage, 4);
    assert!(pool.flush(Duration::from_secs(1)));
    let m = pool.metrics();
    assert_eq!((m.panics, m.restarts, m.retries), (2, 2, 1));
    assert_eq!((m.events_processed, m.batches), (90, 9));
    assert_eq!((m.dead_lettered_events, m.dead_letter_overflow), (10, 0));
    let dead = pool.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].shard, 0);
    assert_eq!(dead[0].first_position, 20);
    assert_eq!(dead[0].reason, "panic: poison at 20");
    let seqs: Vec<u64> = dead[0].events.iter().map(|e| e.2).collect();
    assert_eq!(seqs, (20..30).collect::<Vec<_>>());
    // Still working afterwards.
    for seq in 100..150 {
        push(&rings[0], None, (0, 0, seq));
    }
    assert!(pool.flush(Duration::from_secs(1)));
    let m = pool.metrics();
    assert_eq!(m.events_processed, 140);
    assert_eq!(
        ring_reads(&rings),
        m.events_processed + m.dead_lettered_events
    );
    let got: Vec<u64> = log.lock().unwrap()[0].iter().map(|e| e.1).collect();
    let want: Vec<u64> = (0..150).filter(|s| !(20..30).contains(s)).collect();
    assert_eq!(got, want);
}

#[test]
fn stage_errors_are_retried_then_dead_lettered() {
    let stage: Stage<Ev> = Arc::new(move |ctx: &StageCtx, batch: &[Ev]| {
        if has(batch, 5) && ctx.attempt == 0 {
            return Err("flaky".into());
        }
        if has(batch, 55) {
            return Err("bad batch".into());
        }
        Ok(())
    });
    let (rings, pool) = prefilled(stage, 4);
    assert!(pool.flush(Duration::from_secs(1)));
    let m = pool.metrics();
    assert_eq!((m.panics, m.restarts, m.retries), (0, 0, 2));
    assert_eq!((m.events_processed, m.dead_lettered_events), (90, 10));
    let dead = pool.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "error: bad batch");
    assert_eq!(dead[0].first_position, 50);
    assert_eq!(ring_reads(&rings), 100);
}

#[test]
fn dead_letter_queue_is_bounded() {
    let stage: Stage<Ev> = Arc::new(|_ctx: &StageCtx, _batch: &[Ev]| Err("always".into()));
    let (rings, pool) = prefilled(stage, 3);
    assert!(pool.flush(Duration::from_secs(1)));
    let m = pool.metrics();
    assert_eq!((m.events_processed, m.batches, m.retries), (0, 0, 10));
    assert_eq!((m.dead_lettered_events, m.dead_letter_overflow), (100, 7));
    let firsts: Vec<u64> = pool
        .dead_letters()
        .iter()
        .map(|d| d.first_position)
        .collect();
    assert_eq!(firsts, vec![70, 80, 90]);
    assert_eq!(ring_reads(&rings), 100);
    // A zero-capacity queue keeps nothing and counts every batch.
    let stage: Stage<Ev> = Arc::new(|_ctx: &StageCtx, _batch: &[Ev]| Err("always".into()));
    let (_rings, pool) = prefilled(stage, 0);
    assert!(pool.flush(Duration::from_secs(1)));
    assert!(pool.dead_letters().is_empty());
    assert_eq!(pool.metrics().dead_letter_overflow, 10);
}

#[test]
fn idle_workers_do_not_spin() {
    let rings = shards(SHARDS, 64);
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let stage: Stage<Ev> = Arc::new(move |_ctx: &StageCtx, _b: &[Ev]| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(())
    });
    let mut cfg = config(4, 16);
    cfg.flush_interval = Duration::from_millis(50);
    let pool = WorkerPool::new(rings, cfg, stage);
    thread::sleep(Duration::from_millis(20));
    let before = pool.metrics().loop_iterations;
    thread::sleep(Duration::from_millis(200));
    let spent = pool.metrics().loop_iterations - before;
    // 4 workers waking every 50 ms: ~16 iterations (spurious wake-ups
    // allowed for); a spinning worker would do millions.
    assert!(spent <= 40, "{spent} loop iterations while idle");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn shutdown_drains_and_joins() {
    let rings = shards(SHARDS, 1024);
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    let stage: Stage<Ev> = Arc::new(move |_ctx: &StageCtx, batch: &[Ev]| {
        thread::sleep(Duration::from_micros(200));
        c.fetch_add(batch.len() as u64, Ordering::SeqCst);
        Ok(())
    });
    let mut cfg = config(2, 16);
    cfg.flush_interval = Duration::from_secs(10);
    let pool = WorkerPool::new(rings.clone(), cfg, stage);
    for i in 0..2000u64 {
        let shard = i as usize % SHARDS;
        push(&rings[shard], None, (shard, 0, i));
    }
    let t = Instant::now();
    assert!(pool.shutdown());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(count.load(Ordering::SeqCst), 2000);
    assert_eq!(ring_reads(&rings), 2000);

    // Drop drains too, even when every batch fails.
    let stage: Stage<Ev> = Arc::new(|_ctx: &StageCtx, _batch: &[Ev]| Err("no".into()));
    let (rings, pool) = prefilled(stage, 2);
    let t = Instant::now();
    drop(pool);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(ring_reads(&rings), 100);
}

#[test]
fn circuit_breaker_opens_rejects_probes_and_closes() {
    // Fails while `failing` is set; counts stage calls.
    let failing = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU64::new(0));
    let (f, c) = (failing.clone(), calls.clone());
    let stage: Stage<Ev> = Arc::new(move |_ctx: &StageCtx, _batch: &[Ev]| {
        c.fetch_add(1, Ordering::SeqCst);
        if f.load(Ordering::SeqCst) {
            Err("store down".into())
        } else {
            Ok(())
        }
    });
    let rings = shards(1, 1024);
    let pool = WorkerPool::new(
        rings.clone(),
        PoolConfig {
            workers: 1,
            batch_size: 1,
            flush_interval: Duration::from_millis(1),
            max_dead_letters: 4,
            breaker_threshold: 3,
            breaker_open_for: Duration::from_millis(200),
        },
        stage,
    );
    let push_n = |from: u64, n: u64| {
        for s in from..from + n {
            push(&rings[0], Some(&pool), (0, 0, s));
        }
        assert!(pool.flush(Duration::from_secs(5)));
    };
    // 3 failing batches (each tried twice) open it; 10 more are rejected
    // without a stage call.
    push_n(0, 3);
    assert_eq!(pool.breaker().state, elixir_scope_core::BreakerState::Open);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    push_n(3, 10);
    assert_eq!(calls.load(Ordering::SeqCst), 6, "open: no stage calls");
    let b = pool.breaker();
    assert_eq!((b.opens, b.rejected_events), (1, 10));
    // After the open period a failing probe opens it again.
    thread::sleep(Duration::from_millis(250));
    push_n(13, 1);
    let b = pool.breaker();
    assert_eq!(b.state, elixir_scope_core::BreakerState::Open);
    assert_eq!((b.opens, b.probes), (2, 1));
    // The store is back: the next probe closes it and batches flow again.
    failing.store(false, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(250));
    push_n(14, 5);
    let b = pool.breaker();
    assert_eq!(b.state, elixir_scope_core::BreakerState::Closed);
    assert_eq!(b.probes, 2);
    let m = pool.metrics();
    // Every event: processed or dead-lettered (rejected ones included).
    assert_eq!(m.events_processed, 5);
    assert_eq!(m.dead_lettered_events, 3 + 10 + 1);
    assert_eq!(
        ring_reads(&rings),
        m.events_processed + m.dead_lettered_events
    );
    assert!(
        m.dead_letter_overflow > 0,
        "the dead-letter area is bounded"
    );
    assert_eq!(pool.dead_letters().len(), 4);
}

/// Wait (bounded) until `f` holds.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn an_orphaned_lease_parks_its_worker_and_a_new_holder_resumes_it() {
    use elixir_scope_core::LeaseState;
    let rings = shards(SHARDS, 4096);
    let (log, stage) = recorder();
    // 2 workers: worker 1 drains shards 1 and 3.
    let pool = WorkerPool::new(rings.clone(), config(2, 64), stage);
    let g0 = pool.hold(0).unwrap();
    let g1 = pool.hold(1).unwrap();
    assert_eq!(pool.leases().state(1), LeaseState::Held(g1));
    produce(&rings, &pool, 2, 1000);
    assert!(pool.flush(Duration::from_secs(5)));

    // Worker 1's owner dies: its shards stay where they stand.
    assert!(pool.orphan(1, g1));
    assert!(!pool.orphan(1, g1), "only once");
    assert_eq!(pool.leases().state(1), LeaseState::Orphaned);
    assert!(eventually(|| pool.metrics().parked_workers == 1));
    let before: Vec<u64> = rings.iter().map(|r| r.read_position()).collect();
    produce(&rings, &pool, 2, 1000);
    pool.notify();
    // Worker 0's shards drain; worker 1's do not.
    assert!(eventually(|| rings[0].read_position()
        == rings[0].write_position()
        && rings[2].read_position() == rings[2].write_position()));
    thread::sleep(Duration::from_millis(30));
    assert_eq!(rings[1].read_position(), before[1]);
    assert_eq!(rings[3].read_position(), before[3]);
    assert!(!pool.flush(Duration::from_millis(20)));

    // A new owner: worker 1 resumes at each shard's cursor.
    let g1b = pool.hold(1).unwrap();
    assert!(g1b > g1);
    assert!(!pool.orphan(1, g1), "a stale generation changes nothing");
    assert!(pool.flush(Duration::from_secs(5)));
    // Events are `(shard, producer, seq)` keyed by the second round too.
    let log_len: usize = log.lock().unwrap().iter().map(|l| l.len()).sum();
    assert_eq!(log_len, 4000);
    let m = pool.metrics();
    assert_eq!(m.parked_workers, 0);
    assert_eq!(m.events_processed, 4000);
    assert_eq!(ring_reads(&rings), 4000);
    assert_eq!(m.per_worker_errors, vec![0, 0]);

    // Released: runs freely; an orphan at shutdown is drained anyway.
    assert!(pool.release(0, g0));
    assert_eq!(pool.leases().state(0), LeaseState::Free);
    assert!(pool.orphan(1, g1b));
    produce(&rings, &pool, 1, 100);
    assert!(pool.shutdown());
    let total: usize = log.lock().unwrap().iter().map(|l| l.len()).sum();
    assert_eq!(total, 4100);
    assert_eq!(ring_reads(&rings), 4100);
}

#[test]
fn leases_beyond_the_table_are_refused() {
    let rings = shards(1, 64);
    let (_log, stage) = recorder();
    let pool = WorkerPool::new(rings, config(1, 8), stage);
    assert!(pool.hold(elixir_scope_core::MAX_LEASES).is_none());
    assert!(!pool.orphan(elixir_scope_core::MAX_LEASES, 2));
    assert!(!pool.leases().forget_orphan(0));
    let g = pool.hold(0).unwrap();
    assert!(pool.orphan(0, g));
    assert!(pool.leases().forget_orphan(0));
    assert!(pool.shutdown());
}
