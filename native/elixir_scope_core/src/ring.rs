//! A bounded, lock-free, multi-producer broadcast ring.
//!
//! Positions are monotonically increasing `u64`s; position `p` lives in slot
//! `p & mask`. Writers claim positions with one atomic RMW on `head`, fill the
//! slot in place and publish it. Readers own their positions: any number of
//! readers may read the same events. The ring also keeps one *consumption
//! cursor* (`read_position`): a read that starts exactly at the cursor claims
//! the events it returns (they count as read and free their space); a read at
//! any other position is a non-consuming peek.
//!
//! Every slot carries a *stamp* `(seq + 1) << 12 | state` that protects its
//! contents without a lock:
//!
//! * `state & !TOMB == 0` — a writer is filling the slot for `seq`;
//! * `state & !TOMB == 1 + n` — the slot holds `seq`, `n` readers inside;
//! * `TOMB` — the write of `seq` failed (its closure panicked): readers skip it.
//!
//! A reader enters a slot by incrementing `n` with a CAS that also checks the
//! sequence, so it can never observe a stale or half-written value: a slot
//! already holding a later sequence means the reader was lapped and it skips
//! to the oldest live position, reporting how many events it missed. A writer
//! takes a slot only when it holds an older sequence and no reader is inside.
//! Writers never wait on the ring being full: the overflow policy decides.
//!
//! Accounting is exact. Every accepted write claims a position (`head`), and
//! every position the cursor passes is attributed to exactly one counter by
//! whichever CAS moved the cursor over it:
//!
//! ```text
//! attempts = head + dropped_full
//! head     = cursor + available
//! cursor   = reads + dropped_oldest + dropped_lapped + dropped_failed + cleared
//! ```

use crate::sync::{AtomicU64, Backoff, Cell, Ordering};
use crossbeam_utils::CachePadded;

const STATE_BITS: u32 = 12;
const TOMB: u64 = 1 << 11;
const COUNT_MASK: u64 = TOMB - 1;
const WRITING: u64 = 0;
const READY: u64 = 1;
const MAX_READERS: u64 = COUNT_MASK - 1;

/// Largest capacity accepted by [`Ring::new`] (2^26 slots).
pub const MAX_CAPACITY: usize = 1 << 26;

#[inline]
fn stamp(seq1: u64, state: u64) -> u64 {
    (seq1 << STATE_BITS) | state
}
#[inline]
fn seq1_of(s: u64) -> u64 {
    s >> STATE_BITS
}
#[inline]
fn count_of(s: u64) -> u64 {
    s & COUNT_MASK
}

/// What a writer does when the ring holds `capacity` unconsumed events.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Overwrite the oldest unconsumed event (counted in `dropped_oldest`).
    DropOldest,
    /// Reject the new event (counted in `dropped_full`).
    DropNewest,
}

/// Why a ring could not be created.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RingError {
    /// Capacity is zero or above [`MAX_CAPACITY`].
    InvalidCapacity,
    /// Capacity is not a power of two.
    NotPowerOfTwo,
}

/// A write was rejected because the ring is full (`DropNewest`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Full;

/// Result of [`Ring::read_batch`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Position to pass to the next read.
    pub next: u64,
    /// Number of events handed to the callback.
    pub delivered: usize,
    /// Events this reader skipped because they were overwritten, cleared or
    /// failed before it could read them.
    pub missed: u64,
}

/// A snapshot of the ring's counters.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Slots in the ring.
    pub capacity: u64,
    /// Positions claimed by accepted writes (= accepted writes).
    pub write_position: u64,
    /// The consumption cursor.
    pub read_position: u64,
    /// Events consumed by reads at the cursor.
    pub reads: u64,
    /// Writes rejected because the ring was full (`DropNewest`).
    pub dropped_full: u64,
    /// Unconsumed events overwritten by writers (`DropOldest`).
    pub dropped_oldest: u64,
    /// Events claimed by a reader but overwritten before it could read them.
    pub dropped_lapped: u64,
    /// Writes whose fill closure panicked (published as tombstones).
    pub dropped_failed: u64,
    /// Unconsumed events discarded by [`Ring::clear`].
    pub cleared: u64,
}

impl RingStats {
    /// Events accepted but not yet consumed or dropped.
    pub fn available(&self) -> u64 {
        self.write_position.saturating_sub(self.read_position)
    }

    /// All drops, whatever the reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_full
            + self.dropped_oldest
            + self.dropped_lapped
            + self.dropped_failed
            + self.cleared
    }
}

struct Slot<T> {
    stamp: AtomicU64,
    value: Cell<T>,
}

enum SlotRead {
    Delivered,
    Tombstone,
    Overwritten,
    NotReady,
}

enum SlotClaim {
    Owned,
    Superseded,
}

/// The ring. `T` is filled in place by writers (its heap buffers are reused
/// across laps) and lent to readers by reference.
pub struct Ring<T> {
    head: CachePadded<AtomicU64>,
    cursor: CachePadded<AtomicU64>,
    floor: CachePadded<AtomicU64>,
    counters: CachePadded<Counters>,
    slots: Box<[Slot<T>]>,
    mask: u64,
    cap: u64,
    overflow: Overflow,
}

struct Counters {
    reads: AtomicU64,
    dropped_full: AtomicU64,
    dropped_oldest: AtomicU64,
    dropped_lapped: AtomicU64,
    dropped_failed: AtomicU64,
    cleared: AtomicU64,
}

// SAFETY: slot contents are only accessed under the stamp protocol: a writer
// has exclusive access between taking the slot (CAS to WRITING) and
// publishing it; readers share access only while their count is in the
// stamp, and a writer takes a slot only when that count is zero. `T: Send`
// is needed because values written on one thread are dropped or read on
// another; `T: Sync` because several readers may hold `&T` at once.
unsafe impl<T: Send> Send for Ring<T> {}
unsafe impl<T: Send + Sync> Sync for Ring<T> {}

impl<T: Default> Ring<T> {
    /// A ring of `capacity` slots (a power of two, at most [`MAX_CAPACITY`]).
    pub fn new(capacity: usize, overflow: Overflow) -> Result<Self, RingError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(RingError::InvalidCapacity);
        }
        if !capacity.is_power_of_two() {
            return Err(RingError::NotPowerOfTwo);
        }
        let slots = (0..capacity)
            .map(|_| Slot {
                stamp: AtomicU64::new(stamp(0, READY)),
                value: Cell::new(T::default()),
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        Ok(Self {
            head: CachePadded::new(AtomicU64::new(0)),
            cursor: CachePadded::new(AtomicU64::new(0)),
            floor: CachePadded::new(AtomicU64::new(0)),
            counters: CachePadded::new(Counters {
                reads: AtomicU64::new(0),
                dropped_full: AtomicU64::new(0),
                dropped_oldest: AtomicU64::new(0),
                dropped_lapped: AtomicU64::new(0),
                dropped_failed: AtomicU64::new(0),
                cleared: AtomicU64::new(0),
            }),
            slots,
            mask: capacity as u64 - 1,
            cap: capacity as u64,
            overflow,
        })
    }
}

impl<T> Ring<T> {
    /// Number of slots.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// The overflow policy.
    pub fn overflow(&self) -> Overflow {
        self.overflow
    }

    /// Positions claimed so far (= accepted writes).
    pub fn write_position(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The consumption cursor.
    pub fn read_position(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    /// Write one event: `fill` gets exclusive access to the slot's value
    /// (reuse its buffers; reset every field you rely on). Returns the
    /// position written, or `Err(Full)` under `DropNewest` when full.
    ///
    /// If `fill` panics, the slot is published as a tombstone (counted in
    /// `dropped_failed` when consumed) and the panic resumes.
    pub fn push_with<F: FnOnce(&mut T)>(&self, fill: F) -> Result<u64, Full> {
        let pos = match self.overflow {
            Overflow::DropNewest => self.claim_bounded(1)?.0,
            Overflow::DropOldest => {
                let pos = self.head.fetch_add(1, Ordering::AcqRel);
                self.make_room(pos + 1);
                pos
            }
        };
        self.fill_slot(pos, fill);
        Ok(pos)
    }

    /// Write up to `n` events with one claim. `fill(i, value)` fills item `i`
    /// (in order). Under `DropNewest` only as many as fit are written (the
    /// rest are counted in `dropped_full`); returns how many were accepted.
    pub fn push_batch_with<F: FnMut(usize, &mut T)>(&self, n: usize, mut fill: F) -> usize {
        if n == 0 {
            return 0;
        }
        let (first, accepted) = match self.overflow {
            Overflow::DropNewest => match self.claim_bounded(n as u64) {
                Ok((first, k)) => (first, k as usize),
                Err(Full) => return 0,
            },
            Overflow::DropOldest => {
                let first = self.head.fetch_add(n as u64, Ordering::AcqRel);
                self.make_room(first + n as u64);
                (first, n)
            }
        };
        // If `fill` panics, `fill_slot` publishes the failed item as a
        // tombstone, but the items after it are claimed too: publish them as
        // tombstones as well, or the cursor would stop at them forever (and a
        // `DropNewest` ring would end up permanently full).
        struct Rest<'a, T> {
            ring: &'a Ring<T>,
            next: u64,
            end: u64,
        }
        impl<T> Drop for Rest<'_, T> {
            fn drop(&mut self) {
                for pos in self.next..self.end {
                    self.ring.fail_slot(pos);
                }
            }
        }
        let mut rest = Rest {
            ring: self,
            next: first,
            end: first + accepted as u64,
        };
        for i in 0..accepted {
            let pos = first + i as u64;
            rest.next = pos + 1;
            self.fill_slot(pos, |v| fill(i, v));
        }
        accepted
    }

    /// Claim up to `n` positions without passing `cursor + cap`; returns the
    /// first position and how many were claimed (the rest count as dropped).
    fn claim_bounded(&self, n: u64) -> Result<(u64, u64), Full> {
        let mut h = self.head.load(Ordering::Acquire);
        loop {
            let c = self.cursor.load(Ordering::Acquire);
            let free = self.cap.saturating_sub(h.saturating_sub(c));
            if free == 0 {
                self.counters.dropped_full.fetch_add(n, Ordering::Relaxed);
                return Err(Full);
            }
            let k = n.min(free);
            match self
                .head
                .compare_exchange_weak(h, h + k, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if k < n {
                        self.counters
                            .dropped_full
                            .fetch_add(n - k, Ordering::Relaxed);
                    }
                    return Ok((h, k));
                }
                Err(actual) => h = actual,
            }
        }
    }

    /// Drop-oldest: before positions `< end` are written, make sure the
    /// cursor is at least `end - cap`, counting what it passes as dropped.
    fn make_room(&self, end: u64) {
        if end <= self.cap {
            return;
        }
        let target = end - self.cap;
        let mut c = self.cursor.load(Ordering::Acquire);
        while c < target {
            match self
                .cursor
                .compare_exchange_weak(c, target, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.counters
                        .dropped_oldest
                        .fetch_add(target - c, Ordering::Relaxed);
                    return;
                }
                Err(actual) => c = actual,
            }
        }
    }

    fn claim_slot(&self, slot: &Slot<T>, pos: u64) -> SlotClaim {
        let backoff = Backoff::new();
        loop {
            let s = slot.stamp.load(Ordering::Acquire);
            if seq1_of(s) > pos + 1 {
                // A later lap already owns the slot: this event was counted
                // as dropped when that writer moved the cursor past it.
                return SlotClaim::Superseded;
            }
            if count_of(s) == READY {
                if slot
                    .stamp
                    .compare_exchange_weak(
                        s,
                        stamp(pos + 1, WRITING),
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    return SlotClaim::Owned;
                }
                continue;
            }
            // An older write is still in progress or readers are inside:
            // both finish in bounded time (one value copy).
            backoff.snooze();
        }
    }

    fn fill_slot<F: FnOnce(&mut T)>(&self, pos: u64, fill: F) {
        let slot = &self.slots[(pos & self.mask) as usize];
        if let SlotClaim::Superseded = self.claim_slot(slot, pos) {
            return;
        }
        struct Publish<'a> {
            stamp: &'a AtomicU64,
            pos: u64,
            ok: bool,
        }
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                let state = if self.ok { READY } else { READY | TOMB };
                self.stamp
                    .store(stamp(self.pos + 1, state), Ordering::Release);
            }
        }
        let mut guard = Publish {
            stamp: &slot.stamp,
            pos,
            ok: false,
        };
        // SAFETY: the stamp is WRITING for `pos`: readers refuse to enter and
        // other writers wait or find themselves superseded, so this is the
        // only access until `guard` publishes the slot.
        unsafe { slot.value.with_mut(|v| fill(&mut *v)) };
        guard.ok = true;
    }

    /// Publish `pos` as a tombstone without filling it.
    fn fail_slot(&self, pos: u64) {
        let slot = &self.slots[(pos & self.mask) as usize];
        if let SlotClaim::Owned = self.claim_slot(slot, pos) {
            slot.stamp
                .store(stamp(pos + 1, READY | TOMB), Ordering::Release);
        }
    }

    /// Is the event at `pos` published?
    fn is_ready(&self, pos: u64) -> bool {
        let s = self.slots[(pos & self.mask) as usize]
            .stamp
            .load(Ordering::Acquire);
        seq1_of(s) == pos + 1 && count_of(s) != WRITING
    }

    fn read_slot<F: FnMut(u64, &T)>(&self, pos: u64, f: &mut F) -> SlotRead {
        let slot = &self.slots[(pos & self.mask) as usize];
        let backoff = Backoff::new();
        loop {
            let s = slot.stamp.load(Ordering::Acquire);
            let seq1 = seq1_of(s);
            if seq1 > pos + 1 {
                return SlotRead::Overwritten;
            }
            if seq1 < pos + 1 || count_of(s) == WRITING {
                return SlotRead::NotReady;
            }
            if s & TOMB != 0 {
                return SlotRead::Tombstone;
            }
            if count_of(s) - READY >= MAX_READERS {
                backoff.snooze();
                continue;
            }
            if slot
                .stamp
                .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            struct Leave<'a>(&'a AtomicU64);
            impl Drop for Leave<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::Release);
                }
            }
            let _leave = Leave(&slot.stamp);
            // SAFETY: our reader count is in the stamp, so no writer can take
            // the slot until `_leave` removes it; readers only share access.
            unsafe { slot.value.with(|v| f(pos, &*v)) };
            return SlotRead::Delivered;
        }
    }

    /// Read up to `max` events from `start`, calling `f(position, &event)`
    /// for each, in position order. Events before the oldest live position
    /// are skipped and reported in `missed`. A read that starts at the
    /// consumption cursor consumes what it returns.
    pub fn read_batch<F: FnMut(u64, &T)>(&self, start: u64, max: usize, mut f: F) -> ReadOutcome {
        let mut p = start;
        let mut delivered = 0usize;
        let mut missed = 0u64;
        let floor = self.floor.load(Ordering::Acquire);
        if p < floor {
            missed += floor - p;
            p = floor;
        }
        while delivered < max {
            let head = self.head.load(Ordering::Acquire);
            if p >= head {
                break;
            }
            let oldest = head.saturating_sub(self.cap);
            if p < oldest {
                missed += oldest - p;
                p = oldest;
                continue;
            }
            let c = self.cursor.load(Ordering::Acquire);
            if p == c {
                // Saturating: `max` may be `usize::MAX` ("read everything"),
                // and a wrapped sum would make `limit < p` (nothing read).
                let limit = head.min(p.saturating_add((max - delivered) as u64));
                let mut q = p;
                while q < limit && self.is_ready(q) {
                    q += 1;
                }
                if q == p {
                    break;
                }
                if self
                    .cursor
                    .compare_exchange(c, q, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    continue;
                }
                let (mut got, mut failed, mut lapped) = (0u64, 0u64, 0u64);
                for pos in p..q {
                    match self.read_slot(pos, &mut f) {
                        SlotRead::Delivered => got += 1,
                        SlotRead::Tombstone => failed += 1,
                        // Claimed while ready, so only a later lap can have
                        // replaced it.
                        SlotRead::Overwritten | SlotRead::NotReady => lapped += 1,
                    }
                }
                delivered += got as usize;
                missed += failed + lapped;
                let cs = &self.counters;
                cs.reads.fetch_add(got, Ordering::Relaxed);
                if failed > 0 {
                    cs.dropped_failed.fetch_add(failed, Ordering::Relaxed);
                }
                if lapped > 0 {
                    cs.dropped_lapped.fetch_add(lapped, Ordering::Relaxed);
                }
                p = q;
            } else {
                match self.read_slot(p, &mut f) {
                    SlotRead::Delivered => {
                        delivered += 1;
                        p += 1;
                    }
                    SlotRead::Tombstone => {
                        missed += 1;
                        p += 1;
                    }
                    SlotRead::Overwritten => {
                        let head = self.head.load(Ordering::Acquire);
                        let oldest = head.saturating_sub(self.cap).max(p + 1);
                        missed += oldest - p;
                        p = oldest;
                    }
                    SlotRead::NotReady => break,
                }
            }
        }
        ReadOutcome {
            next: p,
            delivered,
            missed,
        }
    }

    /// Discard every unconsumed event (counted in `cleared`). Readers at
    /// older positions skip to the current write position.
    pub fn clear(&self) -> u64 {
        let h = self.head.load(Ordering::Acquire);
        self.floor.fetch_max(h, Ordering::AcqRel);
        let mut c = self.cursor.load(Ordering::Acquire);
        while c < h {
            match self
                .cursor
                .compare_exchange_weak(c, h, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.counters.cleared.fetch_add(h - c, Ordering::Relaxed);
                    return h - c;
                }
                Err(actual) => c = actual,
            }
        }
        0
    }

    /// Reset every idle slot's value to `T::default()`, releasing its heap
    /// buffers. Slots in use by a writer or reader are left alone.
    pub fn release_memory(&self)
    where
        T: Default,
    {
        for slot in self.slots.iter() {
            let s = slot.stamp.load(Ordering::Acquire);
            if count_of(s) != READY {
                continue;
            }
            let seq1 = seq1_of(s);
            if slot
                .stamp
                .compare_exchange(s, stamp(seq1, WRITING), Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                // SAFETY: we hold the slot in WRITING state (see fill_slot).
                unsafe { slot.value.with_mut(|v| *v = T::default()) };
                slot.stamp
                    .store(stamp(seq1, READY | (s & TOMB)), Ordering::Release);
            }
        }
    }

    /// A snapshot of the counters. Counters are read one by one, so under
    /// concurrent traffic the identities hold exactly only once writers and
    /// readers are quiescent.
    pub fn stats(&self) -> RingStats {
        let cs = &self.counters;
        RingStats {
            capacity: self.cap,
            write_position: self.head.load(Ordering::Acquire),
            read_position: self.cursor.load(Ordering::Acquire),
            reads: cs.reads.load(Ordering::Relaxed),
            dropped_full: cs.dropped_full.load(Ordering::Relaxed),
            dropped_oldest: cs.dropped_oldest.load(Ordering::Relaxed),
            dropped_lapped: cs.dropped_lapped.load(Ordering::Relaxed),
            dropped_failed: cs.dropped_failed.load(Ordering::Relaxed),
            cleared: cs.cleared.load(Ordering::Relaxed),
        }
    }
}
