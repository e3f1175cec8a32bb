//! Loom models of the ring's lock-free protocol, on tiny configurations.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" cargo test -p elixir_scope_core --test loom --release
//! ```
//!
//! Each writer returns the `(position, value)` pairs its pushes got, each
//! reader the pairs it was handed; after the threads join, every delivered
//! value must be the one written at its position (no stale or torn reads —
//! loom's `UnsafeCell` tracking also fails the model on any unsynchronised
//! access to a slot), a reader's positions must strictly increase, and once
//! a final drain has run the documented accounting identities must hold.
#![cfg(loom)]

use elixir_scope_core::{Overflow, ReadOutcome, Ring, RingStats};
use loom::sync::Arc;
use loom::thread;
use std::collections::HashMap;

type Log = Vec<(u64, u64)>;

fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        // LOOM_MAX_PREEMPTIONS overrides.
        b.preemption_bound = Some(2);
    }
    b.check(f);
}

/// Pushes `n` values `base..base + n`; returns what was accepted where.
fn writer(ring: &Ring<u64>, base: u64, n: u64) -> Log {
    let mut log = Log::new();
    for v in base..base + n {
        if let Ok(pos) = ring.push_with(|slot| *slot = v) {
            log.push((pos, v));
        }
    }
    log
}

/// Checks a reader's log against what the writers wrote, and that its
/// positions strictly increase; returns its positions.
fn check_reader(written: &HashMap<u64, u64>, log: &Log, who: &str) {
    let mut last = None;
    for &(pos, v) in log {
        assert_eq!(
            written.get(&pos),
            Some(&v),
            "{who}: got {v} at {pos}: {log:?}"
        );
        if let Some(l) = last {
            assert!(pos > l, "{who}: positions {log:?}");
        }
        last = Some(pos);
    }
}

fn written(logs: &[Log]) -> HashMap<u64, u64> {
    let mut m = HashMap::new();
    for log in logs {
        for &(pos, v) in log {
            assert!(m.insert(pos, v).is_none(), "position {pos} written twice");
        }
    }
    m
}

/// Drains the ring at the cursor and checks the identities; returns the
/// final stats.
fn drain_and_check(ring: &Ring<u64>, attempts: u64, consumer: &mut Log) -> RingStats {
    ring.consume_batch(usize::MAX, |p, v| consumer.push((p, *v)));
    let s = ring.stats();
    assert_eq!(attempts, s.write_position + s.dropped_full, "{s:?}");
    assert_eq!(s.read_position, s.write_position, "{s:?}");
    assert_eq!(
        s.read_position,
        s.reads + s.dropped_oldest + s.dropped_failed + s.cleared,
        "{s:?}"
    );
    s
}

/// `pre` events pushed before the threads start, then 2 writers (1 push
/// each) and 1 reader consuming at the cursor twice. `read_at_cursor`: the reader
/// uses `read_batch(read_position())` instead of `consume_batch` (if the
/// cursor moved in between, the read skips to it).
fn writers_and_consumer(cap: usize, policy: Overflow, pre: u64, read_at_cursor: bool) {
    let per = 1;
    model(move || {
        let ring = Arc::new(Ring::<u64>::new(cap, policy).unwrap());
        let pre_log = writer(&ring, 0, pre);
        let ws: Vec<_> = (0..2u64)
            .map(|w| {
                let ring = ring.clone();
                thread::spawn(move || writer(&ring, 100 * (w + 1), per))
            })
            .collect();
        let r = {
            let ring = ring.clone();
            thread::spawn(move || {
                let mut log = Log::new();
                for _ in 0..2 {
                    let out = if read_at_cursor {
                        let start = ring.read_position();
                        let out = ring.read_batch(start, 2, |p, v| log.push((p, *v)));
                        assert_eq!(out.next - start, out.delivered as u64 + out.missed);
                        out
                    } else {
                        ring.consume_batch(2, |p, v| log.push((p, *v)))
                    };
                    assert!(out.delivered <= 2);
                }
                log
            })
        };
        let mut logs: Vec<Log> = ws.into_iter().map(|h| h.join().unwrap()).collect();
        logs.push(pre_log);
        let mut consumer = r.join().unwrap();
        let written = written(&logs);
        let s = drain_and_check(&ring, pre + 2 * per, &mut consumer);
        check_reader(&written, &consumer, "consumer");
        assert_eq!(written.len() as u64, s.write_position);
        // Reads behind the cursor skip to it, so whatever the reader got was
        // consumed by it, exactly once.
        assert_eq!(consumer.len() as u64, s.reads, "{s:?} {consumer:?}");
        match policy {
            Overflow::DropNewest => assert_eq!(s.dropped_oldest, 0, "{s:?}"),
            Overflow::DropOldest => assert_eq!(s.dropped_full, 0, "{s:?}"),
        }
        assert_eq!((s.dropped_failed, s.cleared), (0, 0), "{s:?}");
    });
}

#[test]
fn drop_oldest_cap1_two_writers_consumer() {
    writers_and_consumer(1, Overflow::DropOldest, 0, false);
}

#[test]
fn drop_oldest_cap2_two_writers_consumer() {
    writers_and_consumer(2, Overflow::DropOldest, 1, false);
}

#[test]
fn drop_oldest_cap1_two_writers_read_at_cursor() {
    writers_and_consumer(1, Overflow::DropOldest, 0, true);
}

#[test]
fn drop_oldest_cap2_two_writers_read_at_cursor() {
    writers_and_consumer(2, Overflow::DropOldest, 1, true);
}

#[test]
fn drop_newest_cap1_two_writers_consumer() {
    writers_and_consumer(1, Overflow::DropNewest, 0, false);
}

#[test]
fn drop_newest_cap2_two_writers_consumer() {
    writers_and_consumer(2, Overflow::DropNewest, 1, false);
}

#[test]
fn drop_newest_cap2_two_writers_read_at_cursor() {
    writers_and_consumer(2, Overflow::DropNewest, 1, true);
}

/// One writer laps a reader that peeks from position 0 with its own
/// position; the peeks must never consume and must account for every
/// position they pass.
/// The writer pushes `n` more events over a full ring.
fn writer_laps_peeker(cap: usize, n: u64) {
    model(move || {
        let ring = Arc::new(Ring::<u64>::new(cap, Overflow::DropOldest).unwrap());
        // Fill the ring first, so the writer overwrites what the peeker
        // is about to read.
        let mut pre = writer(&ring, 0, cap as u64);
        let w = {
            let ring = ring.clone();
            thread::spawn(move || writer(&ring, 100, n))
        };
        let r = {
            let ring = ring.clone();
            thread::spawn(move || {
                let mut log = Log::new();
                let mut pos = 0;
                let mut outs = Vec::new();
                for _ in 0..2 {
                    let out: ReadOutcome = ring.peek_batch(pos, 1, |p, v| log.push((p, *v)));
                    assert_eq!(out.next - pos, out.delivered as u64 + out.missed);
                    pos = out.next;
                    outs.push(out);
                }
                (log, outs)
            })
        };
        pre.extend(w.join().unwrap());
        let (log, _) = r.join().unwrap();
        let written = written(&[pre]);
        check_reader(&written, &log, "peeker");
        let s = ring.stats();
        assert_eq!(s.reads, 0, "peeks never consume: {s:?}");
        let mut consumer = Log::new();
        let s = drain_and_check(&ring, cap as u64 + n, &mut consumer);
        check_reader(&written, &consumer, "drain");
        assert_eq!(consumer.len() as u64, s.reads);
        assert_eq!(s.reads, cap as u64, "{s:?}");
        assert_eq!(s.dropped_oldest, n, "{s:?}");
    });
}

#[test]
fn writer_laps_peeker_cap1() {
    writer_laps_peeker(1, 2);
}

#[test]
fn writer_laps_peeker_cap2() {
    writer_laps_peeker(2, 2);
}

/// A `clear` races with a writer and a consumer: the consumer never gets an
/// event twice nor one that `clear` counted, and the counts add up.
fn clear_races_consumer(policy: Overflow) {
    model(move || {
        let ring = Arc::new(Ring::<u64>::new(2, policy).unwrap());
        let mut pre = writer(&ring, 0, 1);
        let w = {
            let ring = ring.clone();
            thread::spawn(move || writer(&ring, 100, 1))
        };
        let c = {
            let ring = ring.clone();
            thread::spawn(move || ring.clear())
        };
        let r = {
            let ring = ring.clone();
            thread::spawn(move || {
                let mut log = Log::new();
                for _ in 0..2 {
                    ring.consume_batch(2, |p, v| log.push((p, *v)));
                }
                log
            })
        };
        pre.extend(w.join().unwrap());
        let cleared = c.join().unwrap();
        let mut consumer = r.join().unwrap();
        let written = written(&[pre]);
        let s = drain_and_check(&ring, 2, &mut consumer);
        check_reader(&written, &consumer, "consumer");
        assert_eq!(s.cleared, cleared, "{s:?}");
        assert_eq!(consumer.len() as u64, s.reads, "{s:?} {consumer:?}");
    });
}

#[test]
fn clear_races_consumer_drop_oldest() {
    clear_races_consumer(Overflow::DropOldest);
}

#[test]
fn clear_races_consumer_drop_newest() {
    clear_races_consumer(Overflow::DropNewest);
}
