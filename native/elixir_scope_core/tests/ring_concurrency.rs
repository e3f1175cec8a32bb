//! Multi-threaded stress tests of the ring: 8 writer threads push 100k
//! events each while a consuming reader drains the ring at the cursor (and,
//! in one test, two peeking readers follow their own positions).
//!
//! Every event is `(writer, seq)` spread over four redundant words (a torn
//! read would break their relation). Writers log the position each accepted
//! `push_with` returned, so every delivered `(position, event)` pair can be
//! checked against the write that really claimed that position: a stale
//! value (from an earlier lap) or a value from another position is caught
//! exactly, not just by ordering.

use elixir_scope_core::{Overflow, Ring, RingStats};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

const WRITERS: usize = 8;
const PER_WRITER: u64 = 100_000;
const NONE: u64 = u64::MAX;

type Ev = [u64; 4];

fn encode(w: usize, seq: u64) -> Ev {
    let tag = ((w as u64) << 32) | seq;
    [
        tag,
        !tag,
        tag.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15,
        tag.wrapping_mul(0x2545_f491_4f6c_dd1d),
    ]
}

/// Decodes an event, panicking if its words are inconsistent (torn or
/// never written).
fn decode(ev: &Ev) -> (usize, u64) {
    let tag = ev[0];
    assert_eq!(*ev, encode((tag >> 32) as usize, tag & 0xffff_ffff), "torn");
    let w = (tag >> 32) as usize;
    assert!(w < WRITERS, "bad writer in {ev:?}");
    (w, tag & 0xffff_ffff)
}

/// One delivered event: position, writer, seq.
type Seen = (u64, usize, u64);

/// What one reader saw.
#[derive(Default)]
struct ReaderLog {
    seen: Vec<Seen>,
    missed: u64,
    /// Position after the last read.
    end: u64,
}

/// Per-call checks shared by all readers: positions strictly increase
/// across everything this reader receives, each writer's sequence numbers
/// strictly increase, and every position advanced over in a call is either
/// delivered or reported as missed.
struct Checker {
    last_pos: Option<u64>,
    last_seq: [Option<u64>; WRITERS],
}

impl Checker {
    fn new() -> Self {
        Checker {
            last_pos: None,
            last_seq: [None; WRITERS],
        }
    }

    fn see(&mut self, log: &mut ReaderLog, pos: u64, ev: &Ev) {
        let (w, s) = decode(ev);
        if let Some(lp) = self.last_pos {
            assert!(pos > lp, "position {pos} after {lp}: duplicate or reorder");
        }
        self.last_pos = Some(pos);
        if let Some(ls) = self.last_seq[w] {
            assert!(s > ls, "writer {w}: seq {s} after {ls}");
        }
        self.last_seq[w] = Some(s);
        log.seen.push((pos, w, s));
    }
}

/// Writers on this 2-core machine would otherwise fill their whole quota
/// in one time slice, before the readers even start: yield often so that
/// writers and readers really interleave (and the ring both fills up and
/// drains many times).
/// The pattern is pseudo-random per writer (fixed seeds), so that the
/// writers do not settle into a regular round-robin with the readers.
fn pace(w: usize, seq: usize) {
    let mut x = ((w as u64) << 32 | seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    match x % 64 {
        0..=3 => thread::yield_now(),
        4..=7 => {
            for _ in 0..(x >> 40) % 256 {
                std::hint::spin_loop();
            }
        }
        _ => {}
    }
}

/// How the consuming reader reads.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Consumer {
    /// `consume_batch(max)`.
    ConsumeBatch,
    /// `read_batch(read_position(), max)`: the cursor may move between the
    /// two (see `stress_read_at_cursor`).
    ReadAtCursor,
}

/// How the other readers read from their own positions.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Peeker {
    /// `peek_batch`: never consumes.
    PeekBatch,
    /// `read_batch`: consumes at the cursor (and skips to it from behind),
    /// so these readers compete with the consumer.
    ReadBatch,
}

/// One stress scenario.
#[derive(Copy, Clone, Debug)]
struct Scenario {
    cap: usize,
    policy: Overflow,
    consumer: Consumer,
    peekers: usize,
    peeker: Peeker,
    /// Writers use `push_batch_with` (batches of 1..=8) instead of
    /// `push_with`. Positions are then not known to the writer.
    batches: bool,
    /// A thread calls `clear` every so many microseconds while writers run.
    clear_every_us: Option<u64>,
}

impl Scenario {
    fn new(cap: usize, policy: Overflow) -> Self {
        Scenario {
            cap,
            policy,
            consumer: Consumer::ConsumeBatch,
            peekers: 0,
            peeker: Peeker::PeekBatch,
            batches: false,
            clear_every_us: None,
        }
    }
}

/// Written by a batch writer, at a position it does not know.
const UNKNOWN: u64 = u64::MAX - 1;

/// What a run produced.
struct Outcome {
    /// `positions[w][seq]`: where `(w, seq)` was written (`NONE` if
    /// rejected, `UNKNOWN` if accepted at an unknown position).
    positions: Vec<Vec<u64>>,
    consumer: ReaderLog,
    peekers: Vec<ReaderLog>,
    stats: RingStats,
    /// Sum of what `clear` returned.
    cleared: u64,
}

/// Runs the scenario.
fn run(scenario: Scenario) -> Outcome {
    let Scenario {
        cap,
        policy,
        consumer,
        peekers,
        peeker,
        batches,
        clear_every_us,
    } = scenario;
    let ring: Ring<Ev> = Ring::new(cap, policy).unwrap();
    let done = AtomicUsize::new(0);
    let start = Barrier::new(WRITERS + 1 + peekers);
    thread::scope(|sc| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (ring, done, start) = (&ring, &done, &start);
                sc.spawn(move || {
                    start.wait();
                    // positions[seq] = where (writer, seq) was written.
                    let mut positions = vec![NONE; PER_WRITER as usize];
                    if batches {
                        let mut seq = 0usize;
                        while seq < positions.len() {
                            let n = (1 + (seq * 7 + w) % 8).min(positions.len() - seq);
                            let k =
                                ring.push_batch_with(n, |i, v| *v = encode(w, (seq + i) as u64));
                            positions[seq..seq + k].fill(UNKNOWN);
                            pace(w, seq);
                            seq += n;
                        }
                    } else {
                        for (seq, slot) in positions.iter_mut().enumerate() {
                            let ev = encode(w, seq as u64);
                            if let Ok(pos) = ring.push_with(|v| *v = ev) {
                                *slot = pos;
                            }
                            pace(w, seq);
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                    positions
                })
            })
            .collect();

        let consumer = {
            let (ring, done, start) = (&ring, &done, &start);
            sc.spawn(move || {
                start.wait();
                let mut log = ReaderLog::default();
                let mut ck = Checker::new();
                let mut round = 0usize;
                loop {
                    round += 1;
                    // Vary the batch size to vary the interleavings.
                    let max = 1 + (round * 37) % 300;
                    let (from, out) = match consumer {
                        Consumer::ConsumeBatch => {
                            let before = ring.read_position();
                            let out = ring.consume_batch(max, |pos, ev| ck.see(&mut log, pos, ev));
                            // It started wherever the cursor was when it ran
                            // (checked below: every position from there to
                            // `next` is delivered or missed).
                            let from = out.next - out.delivered as u64 - out.missed;
                            assert!(from >= before, "consume_batch started behind the cursor");
                            (from, out)
                        }
                        Consumer::ReadAtCursor => {
                            let from = ring.read_position();
                            (
                                from,
                                ring.read_batch(from, max, |pos, ev| ck.see(&mut log, pos, ev)),
                            )
                        }
                    };
                    assert!(out.delivered <= max);
                    assert_eq!(
                        out.next - from,
                        out.delivered as u64 + out.missed,
                        "consumer: positions advanced over must be delivered or missed"
                    );
                    log.missed += out.missed;
                    log.end = out.next;
                    if out.delivered == 0 {
                        if done.load(Ordering::Acquire) == WRITERS
                            && ring.read_position() == ring.write_position()
                        {
                            break;
                        }
                        thread::yield_now();
                    }
                }
                log
            })
        };

        let peekers: Vec<_> = (0..peekers)
            .map(|k| {
                let (ring, done, start) = (&ring, &done, &start);
                sc.spawn(move || {
                    start.wait();
                    let mut log = ReaderLog::default();
                    let mut ck = Checker::new();
                    let mut pos = 0u64;
                    let mut round = k;
                    loop {
                        round += 1;
                        let max = 1 + (round * 53) % 200;
                        let see = |p, ev: &Ev| ck.see(&mut log, p, ev);
                        let out = match peeker {
                            Peeker::PeekBatch => ring.peek_batch(pos, max, see),
                            Peeker::ReadBatch => ring.read_batch(pos, max, see),
                        };
                        assert!(out.next >= pos, "peeker moved backwards");
                        assert_eq!(
                            out.next - pos,
                            out.delivered as u64 + out.missed,
                            "peeker: positions advanced over must be delivered or missed"
                        );
                        log.missed += out.missed;
                        pos = out.next;
                        log.end = pos;
                        if out.delivered == 0 {
                            if done.load(Ordering::Acquire) == WRITERS
                                && pos >= ring.write_position()
                            {
                                break;
                            }
                            thread::yield_now();
                        }
                    }
                    log
                })
            })
            .collect();

        let clearer = clear_every_us.map(|us| {
            let (ring, done) = (&ring, &done);
            sc.spawn(move || {
                let mut cleared = 0;
                while done.load(Ordering::Acquire) < WRITERS {
                    thread::sleep(Duration::from_micros(us));
                    cleared += ring.clear();
                }
                cleared
            })
        });

        let positions: Vec<Vec<u64>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
        let consumer = consumer.join().unwrap();
        let peekers: Vec<ReaderLog> = peekers.into_iter().map(|h| h.join().unwrap()).collect();
        let cleared = clearer.map_or(0, |h| h.join().unwrap());
        Outcome {
            positions,
            consumer,
            peekers,
            stats: ring.stats(),
            cleared,
        }
    })
}

/// Every delivered event is exactly the one written at its position.
fn check_against_writers(positions: &[Vec<u64>], log: &ReaderLog, who: &str) {
    for &(pos, w, s) in &log.seen {
        let written_at = positions[w][s as usize];
        assert_ne!(written_at, NONE, "{who}: got ({w},{s}), which was rejected");
        if written_at == UNKNOWN {
            continue;
        }
        assert_eq!(
            written_at, pos,
            "{who}: got ({w},{s}) at position {pos}, but it was written at {written_at}"
        );
    }
}

/// Checks everything that holds in every scenario; returns the outcome for
/// scenario-specific checks.
fn run_and_check(sc: Scenario) -> Outcome {
    let t = Instant::now();
    let o = run(sc);
    let s = &o.stats;
    let attempts = WRITERS as u64 * PER_WRITER;

    // The documented identities, exactly, once quiescent and drained.
    assert_eq!(attempts, s.write_position + s.dropped_full, "{s:?}");
    assert_eq!(
        s.read_position,
        s.reads + s.dropped_oldest + s.dropped_failed + s.cleared,
        "{s:?}"
    );
    assert_eq!(s.read_position, s.write_position, "not drained: {s:?}");
    assert_eq!(attempts, s.reads + s.dropped_total(), "{s:?}");
    assert_eq!(s.dropped_failed, 0, "{s:?}");
    assert_eq!(s.cleared, o.cleared, "clear() return values: {s:?}");
    if sc.clear_every_us.is_none() {
        assert_eq!(s.cleared, 0, "{s:?}");
    }
    match sc.policy {
        // Only writers under DropOldest move the cursor by themselves; a
        // reader holds the slots it claims until it has copied them out, so
        // under DropNewest nothing accepted is ever lost.
        Overflow::DropNewest => assert_eq!(s.dropped_oldest, 0, "{s:?}"),
        Overflow::DropOldest => assert_eq!(s.dropped_full, 0, "{s:?}"),
    }
    if sc.cap as u64 >= attempts && sc.clear_every_us.is_none() {
        assert_eq!(s.dropped_total(), 0, "nothing can overflow: {s:?}");
    }
    let accepted = o.positions.iter().flatten().filter(|&&p| p != NONE).count() as u64;
    assert_eq!(
        accepted, s.write_position,
        "accepted writes = write position"
    );

    // Every delivered event is the one written at its position.
    check_against_writers(&o.positions, &o.consumer, "consumer");
    for (k, p) in o.peekers.iter().enumerate() {
        check_against_writers(&o.positions, p, &format!("peeker {k}"));
        // Started at 0 and ended at the write position: every position is
        // accounted for as delivered or missed, exactly once.
        assert_eq!(p.end, s.write_position, "peeker {k}");
        assert_eq!(p.seen.len() as u64 + p.missed, p.end, "peeker {k}");
    }

    let got = o.consumer.seen.len() as u64;
    let exact = sc.peekers == 0 || sc.peeker == Peeker::PeekBatch;
    if exact {
        // The consumer is the only reader that consumes, and it never peeks
        // (a consuming read behind the cursor skips to it): what it received
        // is exactly what the ring counts as read, so
        // written = received + dropped.
        assert_eq!(got, s.reads, "{s:?}");
        assert_eq!(attempts, got + s.dropped_total(), "{s:?}");
    }
    eprintln!(
        "{sc:?}\n  {s:?}\n  consumer got {got} (missed {}), peekers got {:?}, {:?}",
        o.consumer.missed,
        o.peekers.iter().map(|p| p.seen.len()).collect::<Vec<_>>(),
        t.elapsed()
    );
    o
}

#[test]
fn stress_small_drop_oldest() {
    run_and_check(Scenario::new(64, Overflow::DropOldest));
}

#[test]
fn stress_small_drop_newest() {
    run_and_check(Scenario::new(64, Overflow::DropNewest));
}

#[test]
fn stress_big_drop_oldest() {
    run_and_check(Scenario::new(1 << 20, Overflow::DropOldest));
}

#[test]
fn stress_big_drop_newest() {
    run_and_check(Scenario::new(1 << 20, Overflow::DropNewest));
}

#[test]
fn stress_batches_small_drop_oldest() {
    run_and_check(Scenario {
        batches: true,
        ..Scenario::new(64, Overflow::DropOldest)
    });
}

#[test]
fn stress_batches_small_drop_newest() {
    run_and_check(Scenario {
        batches: true,
        ..Scenario::new(64, Overflow::DropNewest)
    });
}

/// The consumer uses `read_batch(read_position(), ..)`. When the cursor
/// moves between the two calls (a `DropOldest` writer making room), the
/// read starts behind the cursor and must skip to it, never handing out
/// events already counted as dropped: the view stays exact (checked in
/// `run_and_check`).
fn stress_read_at_cursor(cap: usize, policy: Overflow) {
    run_and_check(Scenario {
        consumer: Consumer::ReadAtCursor,
        ..Scenario::new(cap, policy)
    });
}

#[test]
fn stress_read_at_cursor_small_drop_oldest() {
    stress_read_at_cursor(64, Overflow::DropOldest);
}

#[test]
fn stress_read_at_cursor_small_drop_newest() {
    stress_read_at_cursor(64, Overflow::DropNewest);
}

/// A consumer plus two readers that follow their own positions from 0 with
/// `peek_batch`: they never consume (the consumer's view stays exact), see
/// only increasing positions, and account for every position.
fn stress_with_peekers(cap: usize, policy: Overflow) {
    run_and_check(Scenario {
        peekers: 2,
        ..Scenario::new(cap, policy)
    });
}

#[test]
fn stress_peekers_small_drop_oldest() {
    stress_with_peekers(64, Overflow::DropOldest);
}

#[test]
fn stress_peekers_small_drop_newest() {
    stress_with_peekers(64, Overflow::DropNewest);
}

#[test]
fn stress_peekers_big_drop_oldest() {
    stress_with_peekers(1 << 20, Overflow::DropOldest);
}

/// Same with `read_batch` readers, which consume whenever they stand at
/// the cursor: the consumer then receives only part of what is read.
fn stress_with_read_batch_readers(cap: usize, policy: Overflow) {
    let o = run_and_check(Scenario {
        peekers: 2,
        peeker: Peeker::ReadBatch,
        ..Scenario::new(cap, policy)
    });
    assert!(o.consumer.seen.len() as u64 <= o.stats.reads);
}

#[test]
fn stress_read_batch_readers_small_drop_oldest() {
    stress_with_read_batch_readers(64, Overflow::DropOldest);
}

#[test]
fn stress_read_batch_readers_small_drop_newest() {
    stress_with_read_batch_readers(64, Overflow::DropNewest);
}

/// A thread clears the ring every 200 µs while everything runs: the
/// consumer and the peekers skip what was cleared, never get an event twice
/// and the accounting stays exact.
fn stress_with_clears(cap: usize, policy: Overflow) {
    let o = run_and_check(Scenario {
        peekers: 2,
        clear_every_us: Some(200),
        ..Scenario::new(cap, policy)
    });
    assert!(o.stats.cleared > 0, "{:?}", o.stats);
}

#[test]
fn stress_clears_small_drop_oldest() {
    stress_with_clears(64, Overflow::DropOldest);
}

#[test]
fn stress_clears_small_drop_newest() {
    stress_with_clears(64, Overflow::DropNewest);
}

#[test]
fn stress_clears_big_drop_newest() {
    stress_with_clears(1 << 20, Overflow::DropNewest);
}

/// `read_batch(read_position(), ..)` consumer and `read_batch` readers
/// racing with clears: still no duplicates and exact counters.
#[test]
fn stress_clears_read_batch_everywhere() {
    for policy in [Overflow::DropOldest, Overflow::DropNewest] {
        run_and_check(Scenario {
            consumer: Consumer::ReadAtCursor,
            peekers: 2,
            peeker: Peeker::ReadBatch,
            clear_every_us: Some(100),
            ..Scenario::new(64, policy)
        });
    }
}
