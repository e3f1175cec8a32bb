//! A cheap clock that follows another one: the OS monotonic clock plus an
//! estimated offset to a reference clock (the VM's monotonic time, whose
//! own reads take a lock), re-estimated from samples.
//!
//! A [`Sample`] is a reference reading taken between two OS readings, so
//! the true offset lies in `[reference - after, reference - before]`. The
//! estimate never exceeds a sample's lower bound by more than slewing
//! allows and never stays above an upper bound: a sample whose reads were
//! preempted (a wide window) cannot push the clock ahead, as keeping the
//! largest midpoint estimate did.
//!
//! * A lower bound above the offset in force moves it up at once (the clock
//!   steps forward).
//! * An upper bound below it moves it down by slewing: the offset falls by
//!   at most one [`SLEW_DIVISOR`]th of the OS time elapsed, so the clock
//!   keeps running, at no less than 15/16 speed, until it reaches the bound.
//!
//! The offset in force is a function of OS time (a segment: base time, base
//! offset, target) kept under a sequence lock, and a reading takes the OS
//! time inside the lock's read window: every reading is the same
//! continuous, non-decreasing function of the OS time it was taken at, so
//! readings never go backwards, across threads either. The writer's
//! critical section is a few stores; readers that meet it retry.

use std::sync::atomic::{fence, AtomicI64, AtomicU64, Ordering};

/// While slewing down, the offset falls by at most `elapsed / SLEW_DIVISOR`.
pub const SLEW_DIVISOR: i64 = 16;

/// A reference-clock reading taken between two OS clock readings (ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// OS time read just before the reference.
    pub before: i64,
    /// The reference clock's reading.
    pub reference: i64,
    /// OS time read just after the reference.
    pub after: i64,
}

impl Sample {
    /// The window's width: the estimate's uncertainty from this sample.
    pub fn width(&self) -> i64 {
        self.after.saturating_sub(self.before)
    }

    /// The smallest offset consistent with this sample.
    pub fn lower(&self) -> i64 {
        self.reference.saturating_sub(self.after)
    }

    /// The largest offset consistent with this sample.
    pub fn upper(&self) -> i64 {
        self.reference.saturating_sub(self.before)
    }

    /// The sample with the narrowest window (the most precise), if any.
    pub fn narrowest(samples: impl IntoIterator<Item = Sample>) -> Option<Sample> {
        samples.into_iter().min_by_key(Sample::width)
    }
}

const UNSET: i64 = i64::MIN;

/// The offset clock (see the module docs). `const`-constructible, for a
/// `static`.
#[derive(Debug)]
pub struct OffsetClock {
    seq: AtomicU64,
    base_os: AtomicI64,
    base: AtomicI64,
    target: AtomicI64,
}

impl Default for OffsetClock {
    fn default() -> Self {
        Self::new()
    }
}

/// The offset in force at OS time `os` in segment `(base_os, base, target)`.
#[inline]
fn offset_at(base_os: i64, base: i64, target: i64, os: i64) -> i64 {
    let slewed = os.saturating_sub(base_os).max(0) / SLEW_DIVISOR;
    base.saturating_sub(slewed).max(target)
}

impl OffsetClock {
    /// A clock with no estimate yet ([`OffsetClock::read`] answers offset
    /// `i64::MIN` until the first [`OffsetClock::update`]).
    pub const fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            base_os: AtomicI64::new(0),
            base: AtomicI64::new(UNSET),
            target: AtomicI64::new(UNSET),
        }
    }

    /// Whether an estimate was made.
    pub fn is_set(&self) -> bool {
        self.read(|| 0).0 != UNSET
    }

    /// `(offset, os)`: the OS time `os()` returns, read inside the lock's
    /// read window, and the offset in force at it. Lock-free for readers;
    /// retries only while an update is being written.
    #[inline]
    pub fn read(&self, os: impl Fn() -> i64) -> (i64, i64) {
        let mut spins = 0u32;
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let base_os = self.base_os.load(Ordering::Relaxed);
                let base = self.base.load(Ordering::Relaxed);
                let target = self.target.load(Ordering::Relaxed);
                let now = os();
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s1 {
                    if base == UNSET {
                        return (UNSET, now);
                    }
                    return (offset_at(base_os, base, target, now), now);
                }
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                // The writer was preempted in its few stores.
                std::thread::yield_now();
            }
        }
    }

    /// Re-estimates from `sample` (see the module docs), at OS time `os()`
    /// read inside the write section. Returns false (nothing changed) when
    /// another update is in progress.
    pub fn update(&self, sample: Sample, os: impl Fn() -> i64) -> bool {
        let s = self.seq.load(Ordering::Relaxed);
        if s & 1 == 1
            || self
                .seq
                .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        fence(Ordering::Release);
        let now = os();
        let base_os = self.base_os.load(Ordering::Relaxed);
        let base = self.base.load(Ordering::Relaxed);
        let target = self.target.load(Ordering::Relaxed);
        let (lo, hi) = (sample.lower(), sample.upper());
        let (new_base, new_target) = if base == UNSET {
            (lo, lo)
        } else {
            let current = offset_at(base_os, base, target, now);
            if lo > current {
                // Certainly behind: step forward to the lower bound.
                (lo, lo)
            } else {
                // Slew down towards the upper bound if above it (or go on
                // towards an earlier one), never below the lower bound.
                (current, target.min(hi).max(lo).min(current))
            }
        };
        self.base_os.store(now, Ordering::Relaxed);
        self.base.store(new_base, Ordering::Relaxed);
        self.target.store(new_target, Ordering::Relaxed);
        self.seq.store(s + 2, Ordering::Release);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(before: i64, reference: i64, after: i64) -> Sample {
        Sample {
            before,
            reference,
            after,
        }
    }

    #[test]
    fn first_estimate_is_the_lower_bound() {
        let c = OffsetClock::new();
        assert!(!c.is_set());
        assert!(c.update(sample(100, 1_150, 200), || 200));
        assert_eq!(c.read(|| 300), (950, 300));
    }

    #[test]
    fn a_wide_window_cannot_push_the_clock_ahead() {
        let c = OffsetClock::new();
        c.update(sample(0, 1_000, 10), || 10); // offset in [990, 1000]
                                               // A preempted sample: the reference read 5 ms late in a 5 ms window.
        c.update(sample(100, 5_001_100, 5_000_100), || 5_000_100);
        // Its lower bound (1_000) is all it may move the offset to.
        assert_eq!(c.read(|| 5_000_200).0, 1_000);
    }

    #[test]
    fn slews_down_without_going_back() {
        let c = OffsetClock::new();
        c.update(sample(0, 10_000, 0), || 0); // offset 10_000
                                              // The reference is now known to be 1_600 lower.
        c.update(sample(1_000, 9_400, 1_000), || 1_000);
        let mut last = i64::MIN;
        for os in (1_000..40_000).step_by(7) {
            let (off, at) = c.read(|| os);
            let t = at + off;
            assert!(t >= last, "went back at os {os}");
            assert!((8_400..=10_000).contains(&off));
            last = t;
        }
        // Reached the upper bound after 16 x 1_600 ns, then stays.
        assert_eq!(c.read(|| 1_000 + 16 * 1_600).0, 8_400);
        assert_eq!(c.read(|| 1_000_000).0, 8_400);
        // A new lower bound above: steps up.
        c.update(sample(2_000_000, 2_009_000, 2_000_000), || 2_000_000);
        assert_eq!(c.read(|| 2_000_001).0, 9_000);
    }

    #[test]
    fn slewing_never_goes_below_a_lower_bound() {
        let c = OffsetClock::new();
        c.update(sample(0, 10_000, 0), || 0);
        c.update(sample(0, 5_000, 0), || 0); // target 5_000
                                             // A later sample: the offset is at least 8_000.
        c.update(sample(100, 8_100, 100), || 100);
        assert_eq!(c.read(|| 10_000_000).0, 8_000);
    }

    #[test]
    fn narrowest_picks_the_most_precise_sample() {
        let s = [sample(0, 50, 100), sample(0, 5, 10), sample(0, 30, 60)];
        assert_eq!(Sample::narrowest(s), Some(sample(0, 5, 10)));
        assert_eq!(Sample::narrowest([]), None);
    }

    #[test]
    fn concurrent_readers_never_go_back_while_updates_slew_and_step() {
        use std::sync::Arc;
        use std::time::Instant;

        let clock = Arc::new(OffsetClock::new());
        let epoch = Instant::now();
        let os = move || epoch.elapsed().as_nanos() as i64;
        clock.update(sample(0, 1_000_000, 0), os);
        let last = Arc::new(AtomicI64::new(i64::MIN));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (clock, last) = (clock.clone(), last.clone());
                std::thread::spawn(move || {
                    let mut mine = i64::MIN;
                    for _ in 0..100_000 {
                        let (off, at) = clock.read(os);
                        let t = at + off;
                        assert!(t >= mine, "a thread's readings went back");
                        // Not earlier than any reading completed before it.
                        let seen = last.fetch_max(t, Ordering::AcqRel);
                        let (off2, at2) = clock.read(os);
                        assert!(at2 + off2 >= seen, "went back across threads");
                        mine = at2 + off2;
                    }
                })
            })
            .collect();
        // Updates that alternately claim a much lower and a higher offset,
        // for as long as the readers read.
        let mut i = 0u64;
        while readers.iter().any(|r| !r.is_finished()) {
            let now = os();
            let reference = if i % 2 == 0 { now } else { now + 2_000_000 };
            clock.update(sample(now, reference, now), os);
            i += 1;
            std::thread::yield_now();
        }
        for r in readers {
            r.join().unwrap();
        }
        assert!(i > 0);
    }
}
