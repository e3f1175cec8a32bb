//! Model-based tests of the ring: random sequences of operations run on one
//! thread against a simple sequential reference model (a `VecDeque` of the
//! last `capacity` positions plus the head / cursor / floor and counters).
//! After every operation the delivered events (positions and values), the
//! `ReadOutcome`, and the full `RingStats` must equal the model's, and the
//! accounting identities documented at the top of `ring.rs` must hold.

use elixir_scope_core::{Overflow, ReadOutcome, Ring, RingError, RingStats, MAX_CAPACITY};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

// ---------------------------------------------------------------------------
// Intentional panics
// ---------------------------------------------------------------------------

/// Payload of the panics the tests raise on purpose inside fill closures.
const FILL_PANIC: &str = "intentional fill panic (test)";

/// Silence the default hook for our own intentional panics only (they would
/// otherwise print hundreds of backtraces); every other panic is reported.
fn quiet_intentional_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&FILL_PANIC) {
                default(info);
            }
        }));
    });
}

fn is_fill_panic(err: &(dyn std::any::Any + Send)) -> bool {
    err.downcast_ref::<&str>() == Some(&FILL_PANIC)
}

/// Fill closures panic with this (a `&'static str` payload).
fn fill_panic() -> ! {
    panic::panic_any(FILL_PANIC)
}

// ---------------------------------------------------------------------------
// Reference model
// ---------------------------------------------------------------------------

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Entry {
    Val(u64),
    Tomb,
}

/// Sequential reference model of the ring.
#[derive(Debug)]
struct Model {
    cap: u64,
    policy: Overflow,
    head: u64,
    cursor: u64,
    floor: u64,
    /// Contents of positions `[written - window.len(), written)`; after every
    /// complete operation `written == head`.
    window: VecDeque<Entry>,
    written: u64,
    reads: u64,
    dropped_full: u64,
    dropped_oldest: u64,
    dropped_failed: u64,
    cleared: u64,
    /// Write attempts (accepted or rejected).
    attempts: u64,
}

impl Model {
    fn new(cap: u64, policy: Overflow) -> Self {
        Model {
            cap,
            policy,
            head: 0,
            cursor: 0,
            floor: 0,
            window: VecDeque::new(),
            written: 0,
            reads: 0,
            dropped_full: 0,
            dropped_oldest: 0,
            dropped_failed: 0,
            cleared: 0,
            attempts: 0,
        }
    }

    /// Claim `n` positions; returns `(first, accepted)`.
    fn claim(&mut self, n: u64) -> (u64, u64) {
        self.attempts += n;
        let first = self.head;
        match self.policy {
            Overflow::DropNewest => {
                let free = self.cap - (self.head - self.cursor);
                let k = n.min(free);
                self.dropped_full += n - k;
                self.head += k;
                (first, k)
            }
            Overflow::DropOldest => {
                self.head += n;
                if self.head > self.cap {
                    let target = self.head - self.cap;
                    if self.cursor < target {
                        self.dropped_oldest += target - self.cursor;
                        self.cursor = target;
                    }
                }
                (first, n)
            }
        }
    }

    /// Record the content of the next claimed position (in order).
    fn write(&mut self, pos: u64, e: Entry) {
        assert_eq!(pos, self.written, "model: writes must be in order");
        self.window.push_back(e);
        if self.window.len() as u64 > self.cap {
            self.window.pop_front();
        }
        self.written += 1;
    }

    fn get(&self, pos: u64) -> Entry {
        let base = self.written - self.window.len() as u64;
        assert!(pos >= base && pos < self.written, "model: {pos} not live");
        self.window[(pos - base) as usize]
    }

    /// What `read_batch(start, max)` returns, applying its effects.
    ///
    /// On one thread the cursor never moves during a read. A read that
    /// starts behind the cursor skips to it (the positions between count as
    /// missed); at the cursor it consumes (skipping and consuming
    /// tombstones); ahead of it, it peeks.
    /// `peek_only`: `peek_batch`, which never consumes.
    fn read(&mut self, start: u64, max: usize, peek_only: bool) -> (Vec<(u64, u64)>, ReadOutcome) {
        let mut out = Vec::new();
        let mut missed = 0u64;
        let mut p = start;
        if p < self.floor {
            missed += self.floor - p;
            p = self.floor;
        }
        while out.len() < max && p < self.head {
            if !peek_only && p < self.cursor {
                // Consumed or dropped: gone for every consuming reader.
                missed += self.cursor - p;
                p = self.cursor;
                continue;
            }
            let oldest = self.head.saturating_sub(self.cap);
            if p < oldest {
                missed += oldest - p;
                p = oldest;
                continue;
            }
            let consuming = p == self.cursor && !peek_only;
            match self.get(p) {
                Entry::Val(v) => {
                    out.push((p, v));
                    if consuming {
                        self.reads += 1;
                    }
                }
                Entry::Tomb => {
                    missed += 1;
                    if consuming {
                        self.dropped_failed += 1;
                    }
                }
            }
            p += 1;
            if consuming {
                self.cursor = p;
            }
        }
        let outcome = ReadOutcome {
            next: p,
            delivered: out.len(),
            missed,
        };
        (out, outcome)
    }

    fn clear(&mut self) -> u64 {
        let h = self.head;
        self.floor = self.floor.max(h);
        if self.cursor < h {
            let n = h - self.cursor;
            self.cleared += n;
            self.cursor = h;
            n
        } else {
            0
        }
    }

    fn stats(&self) -> RingStats {
        RingStats {
            capacity: self.cap,
            write_position: self.head,
            read_position: self.cursor,
            reads: self.reads,
            dropped_full: self.dropped_full,
            dropped_oldest: self.dropped_oldest,
            dropped_failed: self.dropped_failed,
            cleared: self.cleared,
        }
    }
}

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// `push_with`; the closure panics when `panic` is set.
    Push { panic: bool },
    /// `push_batch_with(n)`; the closure panics at item `panic_at` if any.
    PushBatch { n: usize, panic_at: Option<usize> },
    /// `read_batch` at the consumption cursor.
    ReadCursor { max: usize },
    /// `consume_batch`.
    Consume { max: usize },
    /// `read_batch` at `sel % (write_position + 4)`: older or newer than the
    /// cursor (and sometimes exactly at it).
    ReadAt { sel: u64, max: usize },
    /// `peek_batch` at `sel % (write_position + 4)`.
    Peek { sel: u64, max: usize },
    /// `clear`.
    Clear,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<u8>().prop_map(|b| Op::Push { panic: b < 16 }),
        2 => (0usize..40, any::<u8>(), 0usize..40).prop_map(|(n, b, i)| Op::PushBatch {
            n,
            panic_at: if b < 40 { Some(i) } else { None },
        }),
        2 => (0usize..24).prop_map(|max| Op::ReadCursor { max }),
        2 => (0usize..24).prop_map(|max| Op::Consume { max }),
        3 => (any::<u64>(), 0usize..24).prop_map(|(sel, max)| Op::ReadAt { sel, max }),
        2 => (any::<u64>(), 0usize..24).prop_map(|(sel, max)| Op::Peek { sel, max }),
        1 => Just(Op::Clear),
    ]
}

fn policy_strategy() -> impl Strategy<Value = Overflow> {
    prop_oneof![Just(Overflow::DropOldest), Just(Overflow::DropNewest)]
}

fn check_identities(s: &RingStats, attempts: u64) {
    assert_eq!(attempts, s.write_position + s.dropped_full, "{s:?}");
    assert_eq!(
        s.read_position,
        s.reads + s.dropped_oldest + s.dropped_failed + s.cleared,
        "{s:?}"
    );
    assert_eq!(s.write_position, s.read_position + s.available(), "{s:?}");
    assert!(s.read_position <= s.write_position, "{s:?}");
    assert!(s.available() <= s.capacity, "{s:?}");
}

/// Runs `ops` on a fresh ring and on the model, comparing after every step.
fn run(cap: u64, policy: Overflow, ops: &[Op]) {
    quiet_intentional_panics();
    let ring: Ring<u64> = Ring::new(cap as usize, policy).unwrap();
    let mut m = Model::new(cap, policy);
    // Every value written is unique, so a delivered value identifies the
    // write it came from.
    let mut next_val = 1u64;
    for (step, op) in ops.iter().enumerate() {
        let ctx = format!("step {step}: {op:?}");
        match *op {
            Op::Push { panic: false } => {
                let v = next_val;
                next_val += 1;
                let got = ring.push_with(|slot| *slot = v);
                let (first, k) = m.claim(1);
                if k == 1 {
                    m.write(first, Entry::Val(v));
                    assert_eq!(got, Ok(first), "{ctx}");
                } else {
                    assert_eq!(got, Err(elixir_scope_core::Full), "{ctx}");
                }
            }
            Op::Push { panic: true } => {
                let got = panic::catch_unwind(AssertUnwindSafe(|| {
                    ring.push_with(|slot| {
                        *slot = u64::MAX; // a half-done fill must never leak
                        fill_panic()
                    })
                }));
                let (first, k) = m.claim(1);
                if k == 1 {
                    let err = got.expect_err(&ctx);
                    assert!(is_fill_panic(&*err), "{ctx}");
                    m.write(first, Entry::Tomb);
                } else {
                    assert_eq!(got.ok(), Some(Err(elixir_scope_core::Full)), "{ctx}");
                }
            }
            Op::PushBatch { n, panic_at } => {
                let base = next_val;
                next_val += n as u64;
                let mut calls = Vec::new();
                let got = panic::catch_unwind(AssertUnwindSafe(|| {
                    ring.push_batch_with(n, |i, slot| {
                        calls.push(i);
                        *slot = base + i as u64;
                        if Some(i) == panic_at {
                            *slot = u64::MAX;
                            fill_panic();
                        }
                    })
                }));
                let (first, k) = m.claim(n as u64);
                match panic_at {
                    Some(i) if (i as u64) < k => {
                        let err = got.expect_err(&ctx);
                        assert!(is_fill_panic(&*err), "{ctx}");
                        // Items before the panic are written; the failed one
                        // and every claimed item after it are tombstones.
                        for j in 0..k {
                            let e = if j < i as u64 {
                                Entry::Val(base + j)
                            } else {
                                Entry::Tomb
                            };
                            m.write(first + j, e);
                        }
                        assert_eq!(calls, (0..=i).collect::<Vec<_>>(), "{ctx}");
                    }
                    _ => {
                        assert_eq!(got.ok(), Some(k as usize), "{ctx}");
                        for j in 0..k {
                            m.write(first + j, Entry::Val(base + j));
                        }
                        assert_eq!(calls, (0..k as usize).collect::<Vec<_>>(), "{ctx}");
                    }
                }
            }
            Op::ReadCursor { max } => {
                let start = ring.read_position();
                assert_eq!(start, m.cursor, "{ctx}");
                let mut got = Vec::new();
                let out = ring.read_batch(start, max, |p, v| got.push((p, *v)));
                let (want, want_out) = m.read(start, max, false);
                assert_eq!(got, want, "{ctx}");
                assert_eq!(out, want_out, "{ctx}");
            }
            Op::Consume { max } => {
                let start = m.cursor;
                let mut got = Vec::new();
                let out = ring.consume_batch(max, |p, v| got.push((p, *v)));
                let (want, want_out) = m.read(start, max, false);
                assert_eq!(got, want, "{ctx}");
                assert_eq!(out, want_out, "{ctx}");
            }
            Op::ReadAt { sel, max } => {
                let start = sel % (m.head + 4);
                let mut got = Vec::new();
                let out = ring.read_batch(start, max, |p, v| got.push((p, *v)));
                let (want, want_out) = m.read(start, max, false);
                assert_eq!(got, want, "{ctx} start={start}");
                assert_eq!(out, want_out, "{ctx} start={start}");
            }
            Op::Peek { sel, max } => {
                let start = sel % (m.head + 4);
                let mut got = Vec::new();
                let out = ring.peek_batch(start, max, |p, v| got.push((p, *v)));
                let (want, want_out) = m.read(start, max, true);
                assert_eq!(got, want, "{ctx} start={start}");
                assert_eq!(out, want_out, "{ctx} start={start}");
            }
            Op::Clear => {
                let n = ring.clear();
                assert_eq!(n, m.clear(), "{ctx}");
            }
        }
        let s = ring.stats();
        assert_eq!(s, m.stats(), "{ctx}");
        assert_eq!(ring.write_position(), m.head, "{ctx}");
        assert_eq!(ring.read_position(), m.cursor, "{ctx}");
        check_identities(&s, m.attempts);
    }

    // Final drain at the cursor: everything left is consumed or dropped.
    let start = ring.read_position();
    let mut got = Vec::new();
    let out = ring.read_batch(start, usize::MAX, |p, v| got.push((p, *v)));
    let (want, want_out) = m.read(start, usize::MAX, false);
    assert_eq!(got, want, "final drain");
    assert_eq!(out, want_out, "final drain");
    let s = ring.stats();
    assert_eq!(s, m.stats(), "final drain");
    assert_eq!(s.read_position, s.write_position, "drained");
    check_identities(&s, m.attempts);
}

/// Deterministic by default (fixed seed, 256 cases). For a longer sweep:
/// `PROPTEST_CASES=20000 RING_MODEL_SEED=7 cargo test --release --test ring_model`.
fn config() -> Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("PROPTEST_CASES").map_or(256, |n| n as u32),
        rng_seed: RngSeed::Fixed(env("RING_MODEL_SEED").unwrap_or(0x005e_ed0f_e11c_5c0e)),
        failure_persistence: None,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ring_matches_model(
        cap_log in 0u32..5,
        policy in policy_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..200),
    ) {
        run(1u64 << cap_log, policy, &ops);
    }

    /// Same, without panics or clears, with mostly pushes: long runs that
    /// lap the ring many times.
    #[test]
    fn ring_matches_model_many_laps(
        cap_log in 0u32..5,
        policy in policy_strategy(),
        ops in prop::collection::vec(
            prop_oneof![
                8 => Just(Op::Push { panic: false }),
                2 => (0usize..40).prop_map(|n| Op::PushBatch { n, panic_at: None }),
                1 => (0usize..24).prop_map(|max| Op::ReadCursor { max }),
                1 => (0usize..24).prop_map(|max| Op::Consume { max }),
                2 => (any::<u64>(), 0usize..24).prop_map(|(sel, max)| Op::ReadAt { sel, max }),
                1 => (any::<u64>(), 0usize..24).prop_map(|(sel, max)| Op::Peek { sel, max }),
            ],
            1..400,
        ),
    ) {
        run(1u64 << cap_log, policy, &ops);
    }
}

// ---------------------------------------------------------------------------
// Directed cases
// ---------------------------------------------------------------------------

#[test]
fn new_rejects_bad_capacities() {
    assert_eq!(
        Ring::<u64>::new(0, Overflow::DropOldest).err(),
        Some(RingError::InvalidCapacity)
    );
    assert_eq!(
        Ring::<u64>::new(MAX_CAPACITY * 2, Overflow::DropOldest).err(),
        Some(RingError::InvalidCapacity)
    );
    assert_eq!(
        Ring::<u64>::new(3, Overflow::DropNewest).err(),
        Some(RingError::NotPowerOfTwo)
    );
    let r = Ring::<u64>::new(1, Overflow::DropNewest).unwrap();
    assert_eq!(r.capacity(), 1);
    assert_eq!(r.overflow(), Overflow::DropNewest);
}

#[test]
fn panicking_push_is_a_tombstone() {
    quiet_intentional_panics();
    for policy in [Overflow::DropOldest, Overflow::DropNewest] {
        let ring: Ring<u64> = Ring::new(4, policy).unwrap();
        ring.push_with(|v| *v = 10).unwrap();
        let err = panic::catch_unwind(AssertUnwindSafe(|| {
            ring.push_with(|v| {
                *v = 99;
                fill_panic()
            })
        }))
        .unwrap_err();
        assert!(is_fill_panic(&*err));
        ring.push_with(|v| *v = 12).unwrap();
        assert_eq!(ring.write_position(), 3);

        // A peek skips the tombstone and reports it as missed, consuming
        // nothing.
        let mut got = vec![];
        let out = ring.read_batch(1, 10, |p, v| got.push((p, *v)));
        // The peek reaches the cursor only if it starts there; here it
        // starts ahead of it (cursor = 0).
        assert_eq!(got, vec![(2, 12)]);
        assert_eq!(
            out,
            ReadOutcome {
                next: 3,
                delivered: 1,
                missed: 1
            }
        );
        assert_eq!(ring.stats().dropped_failed, 0);

        // The consuming read skips it too and counts it in dropped_failed.
        let mut got = vec![];
        let out = ring.read_batch(0, 10, |p, v| got.push((p, *v)));
        assert_eq!(got, vec![(0, 10), (2, 12)]);
        assert_eq!(
            out,
            ReadOutcome {
                next: 3,
                delivered: 2,
                missed: 1
            }
        );
        let s = ring.stats();
        assert_eq!((s.reads, s.dropped_failed, s.read_position), (2, 1, 3));

        // The tombstoned slot is reusable.
        for i in 0..4 {
            ring.push_with(|v| *v = 100 + i).unwrap();
        }
        let mut got = vec![];
        ring.read_batch(3, 10, |_, v| got.push(*v));
        assert_eq!(got, vec![100, 101, 102, 103]);
    }
}

/// A panic in the middle of `push_batch_with` must not leave claimed
/// positions unpublished: the consumer would wait on them forever (and
/// under `DropNewest` the ring would stay full forever).
#[test]
fn panicking_batch_does_not_wedge_the_ring() {
    quiet_intentional_panics();
    for policy in [Overflow::DropOldest, Overflow::DropNewest] {
        let ring: Ring<u64> = Ring::new(8, policy).unwrap();
        let err = panic::catch_unwind(AssertUnwindSafe(|| {
            ring.push_batch_with(5, |i, v| {
                if i == 2 {
                    fill_panic();
                }
                *v = i as u64;
            })
        }))
        .unwrap_err();
        assert!(is_fill_panic(&*err));
        assert_eq!(ring.write_position(), 5);
        ring.push_with(|v| *v = 5).unwrap();

        let mut got = vec![];
        let out = ring.read_batch(0, 100, |p, v| got.push((p, *v)));
        assert_eq!(got, vec![(0, 0), (1, 1), (5, 5)], "{policy:?}");
        assert_eq!(out.next, 6);
        assert_eq!(out.missed, 3);
        let s = ring.stats();
        assert_eq!((s.reads, s.dropped_failed), (3, 3));
        assert_eq!(s.available(), 0);
        // The ring still accepts a full lap of writes.
        for i in 0..8 {
            assert!(ring.push_with(|v| *v = i).is_ok());
        }
    }
}

#[test]
fn drop_newest_full_then_consume_frees_space() {
    let ring: Ring<u64> = Ring::new(2, Overflow::DropNewest).unwrap();
    assert_eq!(ring.push_with(|v| *v = 1), Ok(0));
    assert_eq!(ring.push_with(|v| *v = 2), Ok(1));
    assert_eq!(ring.push_with(|v| *v = 3), Err(elixir_scope_core::Full));
    assert_eq!(ring.push_batch_with(3, |_, v| *v = 4), 0);
    let s = ring.stats();
    assert_eq!((s.write_position, s.dropped_full), (2, 4));
    let out = ring.read_batch(0, 1, |_, _| {});
    assert_eq!(out.next, 1);
    assert_eq!(ring.push_batch_with(3, |i, v| *v = 10 + i as u64), 1);
    assert_eq!(ring.stats().dropped_full, 6);
    let mut got = vec![];
    ring.read_batch(1, 10, |p, v| got.push((p, *v)));
    assert_eq!(got, vec![(1, 2), (2, 10)]);
}

#[test]
fn events_being_consumed_are_counted_as_not_yet_consumed() {
    // A consumer moves the cursor, copies the events out, then counts its
    // `reads`: a snapshot taken in between (here, from inside the read
    // callback) must still see the claimed events as unconsumed through
    // `write_position - (reads + dropped_oldest + dropped_failed + cleared)`
    // (the pipeline's accounting counts them in flight that way).
    let ring: Ring<u64> = Ring::new(8, Overflow::DropNewest).unwrap();
    assert_eq!(ring.push_batch_with(3, |i, v| *v = i as u64), 3);
    let mut mid = vec![];
    ring.consume_batch(8, |_, _| mid.push(ring.stats()));
    assert_eq!(mid.len(), 3);
    for s in &mid {
        assert_eq!(s.read_position, 3, "cursor moved before the copy");
        let unconsumed =
            s.write_position - (s.reads + s.dropped_oldest + s.dropped_failed + s.cleared);
        assert_eq!(unconsumed, 3, "{s:?}");
    }
    let s = ring.stats();
    assert_eq!((s.reads, s.write_position - s.reads), (3, 0));
}

#[test]
fn drop_oldest_overwrites_and_reports_missed() {
    let ring: Ring<u64> = Ring::new(4, Overflow::DropOldest).unwrap();
    for i in 0..10u64 {
        ring.push_with(|v| *v = i).unwrap();
    }
    let s = ring.stats();
    assert_eq!(
        (s.write_position, s.read_position, s.dropped_oldest),
        (10, 6, 6)
    );
    // A reader at 0 misses 0..6.
    let mut got = vec![];
    let out = ring.read_batch(0, 2, |p, v| got.push((p, *v)));
    assert_eq!(got, vec![(6, 6), (7, 7)]);
    assert_eq!(out.missed, 6);
    // A batch larger than the ring keeps only its last `cap` items.
    assert_eq!(ring.push_batch_with(9, |i, v| *v = 100 + i as u64), 9);
    let mut got = vec![];
    let start = ring.read_position();
    assert_eq!(start, 15);
    let out = ring.read_batch(start, 100, |p, v| got.push((p, *v)));
    assert_eq!(got, vec![(15, 105), (16, 106), (17, 107), (18, 108)]);
    assert_eq!(out.missed, 0);
    let s = ring.stats();
    assert_eq!(s.dropped_oldest, 6 + 7);
    assert_eq!(s.reads, 2 + 4);
}

#[test]
fn clear_moves_floor_for_readers_behind() {
    let ring: Ring<u64> = Ring::new(8, Overflow::DropNewest).unwrap();
    for i in 0..5u64 {
        ring.push_with(|v| *v = i).unwrap();
    }
    ring.read_batch(0, 2, |_, _| {});
    assert_eq!(ring.clear(), 3);
    assert_eq!(ring.clear(), 0);
    ring.push_with(|v| *v = 5).unwrap();
    // A peeker at 0 skips everything before the clear.
    let mut got = vec![];
    let out = ring.read_batch(0, 10, |p, v| got.push((p, *v)));
    assert_eq!(got, vec![(5, 5)]);
    assert_eq!(out.missed, 5);
    let s = ring.stats();
    assert_eq!((s.reads, s.cleared, s.read_position), (3, 3, 6));
}

/// `release_memory` resets idle slots; after a `clear` nothing observable
/// changes and the ring keeps working.
#[test]
fn release_memory_after_clear() {
    let ring: Ring<Vec<u8>> = Ring::new(4, Overflow::DropOldest).unwrap();
    for i in 0..6u8 {
        ring.push_with(|v| {
            v.clear();
            v.extend_from_slice(&[i; 64]);
        })
        .unwrap();
    }
    ring.clear();
    ring.release_memory();
    let mut n = 0;
    ring.read_batch(0, 100, |_, _| n += 1);
    assert_eq!(n, 0);
    ring.push_with(|v| v.push(7)).unwrap();
    let mut got = vec![];
    let start = ring.read_position();
    ring.read_batch(start, 100, |p, v| got.push((p, v.clone())));
    assert_eq!(got, vec![(6, vec![7])]);
}

/// A read that starts behind the cursor skips to it, reporting the gap as
/// missed (those events were consumed or dropped), and consumes from there;
/// `peek_batch` can still look behind the cursor without consuming.
#[test]
fn read_behind_the_cursor_skips_to_it() {
    let ring: Ring<u64> = Ring::new(8, Overflow::DropNewest).unwrap();
    for i in 0..6u64 {
        ring.push_with(|v| *v = i).unwrap();
    }
    ring.consume_batch(3, |_, _| {});
    assert_eq!(ring.read_position(), 3);
    let mut got = vec![];
    let out = ring.read_batch(1, 2, |p, v| got.push((p, *v)));
    assert_eq!(got, vec![(3, 3), (4, 4)]);
    assert_eq!((out.next, out.delivered, out.missed), (5, 2, 2));
    let s = ring.stats();
    assert_eq!((s.read_position, s.reads), (5, 5));
    // Nothing is handed out twice: a second reader from 0 gets only 5.
    let mut got = vec![];
    let out = ring.read_batch(0, 10, |p, v| got.push((p, *v)));
    assert_eq!(got, vec![(5, 5)]);
    assert_eq!((out.next, out.missed), (6, 5));
    // peek_batch never consumes, and may look behind the cursor.
    ring.push_with(|v| *v = 6).unwrap();
    let mut got = vec![];
    let out = ring.peek_batch(0, 100, |p, v| got.push((p, *v)));
    assert_eq!(got, (0..7).map(|i| (i, i)).collect::<Vec<_>>());
    assert_eq!(out.next, 7);
    let s = ring.stats();
    assert_eq!((s.read_position, s.reads), (6, 6));
}

/// `read_batch(start, usize::MAX)` means "everything": it must not overflow
/// `start + max`.
#[test]
fn read_with_huge_max() {
    for policy in [Overflow::DropOldest, Overflow::DropNewest] {
        let ring: Ring<u64> = Ring::new(16, policy).unwrap();
        for i in 0..10u64 {
            ring.push_with(|v| *v = i).unwrap();
        }
        let mut n = 0;
        let out = ring.read_batch(2, usize::MAX, |_, _| n += 1);
        assert_eq!((n, out.next), (8, 10), "peek {policy:?}");
        let out = ring.read_batch(0, usize::MAX, |_, _| n += 1);
        assert_eq!((n, out.next), (18, 10), "read at cursor {policy:?}");
        assert_eq!(ring.stats().reads, 10);
        ring.push_with(|v| *v = 10).unwrap();
        let out = ring.consume_batch(usize::MAX, |_, _| n += 1);
        assert_eq!((n, out.next), (19, 11), "consume {policy:?}");
    }
}

/// `release_memory` frees only events behind the cursor: live events read
/// back intact, and a peek behind the cursor skips the released slots
/// instead of being handed default values.
#[test]
fn release_memory_keeps_live_events() {
    let ring: Ring<Vec<u8>> = Ring::new(8, Overflow::DropNewest).unwrap();
    for i in 1..=3u8 {
        ring.push_with(|v| {
            v.clear();
            v.push(i);
        })
        .unwrap();
    }
    let mut got = vec![];
    ring.consume_batch(1, |_, v| got.push(v.clone()));
    assert_eq!(got, vec![vec![1]]);
    ring.release_memory();
    let mut peeked = vec![];
    let out = ring.peek_batch(0, 10, |p, v| peeked.push((p, v.clone())));
    assert_eq!(peeked, vec![(1, vec![2]), (2, vec![3])]);
    assert_eq!(out.missed, 1);
    let mut rest = vec![];
    ring.consume_batch(10, |_, v| rest.push(v.clone()));
    assert_eq!(rest, vec![vec![2], vec![3]]);
}

/// A ring whose values record where their buffers are (the prefetch hint
/// of `with_buffer_hint`) keeps every value intact across laps, through
/// overwrites (`DropOldest`), buffer growth and consuming reads.
#[test]
fn buffer_hints_leave_values_intact() {
    #[allow(clippy::ptr_arg)] // the hint function takes `&T`, T = Vec<u8>
    fn buf(v: &Vec<u8>) -> (usize, usize) {
        (v.as_ptr() as usize, v.len())
    }
    for overflow in [Overflow::DropOldest, Overflow::DropNewest] {
        let ring: Ring<Vec<u8>> = Ring::new(64, overflow).unwrap().with_buffer_hint(buf);
        let mut next = 0u64;
        let mut seen = 0u64;
        for round in 0..50u64 {
            for _ in 0..(40 + round % 30) {
                let n = next;
                let len = (n * 37 % 700) as usize;
                if ring
                    .push_with(|v| {
                        v.clear();
                        v.extend(std::iter::repeat(n as u8).take(len));
                        v.extend_from_slice(&n.to_le_bytes());
                    })
                    .is_ok()
                {
                    next += 1;
                }
            }
            ring.consume_batch(usize::MAX, |_, v| {
                let n = u64::from_le_bytes(v[v.len() - 8..].try_into().unwrap());
                assert!(n >= seen, "out of order: {n} after {seen}");
                let len = (n * 37 % 700) as usize;
                assert_eq!(v.len(), len + 8);
                assert!(v[..len].iter().all(|&b| b == n as u8));
                seen = n + 1;
            });
        }
        assert_eq!(seen, next);
    }
}
