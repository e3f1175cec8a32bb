//! A bounded, lock-free, multi-producer ring with a consumption cursor.
//!
//! Positions are monotonically increasing `u64`s; position `p` lives in slot
//! `p & mask`. Writers claim positions with one atomic RMW on `head`, fill the
//! slot in place and publish it. Readers own their positions. The ring keeps
//! one *consumption cursor* (`read_position`): everything before it has been
//! consumed or dropped. A read at the cursor consumes what it returns (the
//! events count as read and free their space), so readers draining one ring
//! share its events, each handed out once; a read from behind the cursor
//! skips to it, reporting the gap as missed; a read ahead of it, or any
//! [`Ring::peek_batch`], is a non-consuming peek.
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
//! already holding a later sequence means a peeking reader was lapped and it
//! skips to the oldest live position, reporting how many events it missed. A
//! consuming reader enters the slots it is about to claim *before* moving the
//! cursor over them, and leaves each once its event is copied out, so no
//! writer can reuse a claimed slot early. A writer takes a slot only when it
//! holds an older sequence and no reader is inside. Writers never wait on the
//! ring being full: the overflow policy decides.
//!
//! Accounting is exact. Every accepted write claims a position (`head`), and
//! every position the cursor passes is attributed to exactly one counter by
//! whichever CAS moved the cursor over it:
//!
//! ```text
//! attempts = head + dropped_full
//! head     = cursor + available
//! cursor   = reads + dropped_oldest + dropped_failed + cleared
//! ```

use crate::sync::{AtomicU64, Backoff, Cell, Ordering};
use crossbeam_utils::CachePadded;

const STATE_BITS: u32 = 12;
const TOMB: u64 = 1 << 11;
const COUNT_MASK: u64 = TOMB - 1;
const WRITING: u64 = 0;
const READY: u64 = 1;
const MAX_READERS: u64 = COUNT_MASK - 1;

/// Largest capacity accepted by [`Ring::new`] (2^24 slots).
pub const MAX_CAPACITY: usize = 1 << 24;

#[inline]
fn stamp(seq1: u64, state: u64) -> u64 {
    (seq1 << STATE_BITS) | state
}
/// A slot's buffer hint: the address, and the cache lines to prefetch
/// from it in the top byte (0 for an empty buffer).
#[inline]
fn hint_word((addr, bytes): (usize, usize)) -> u64 {
    let lines = (bytes as u64).div_ceil(64).min(HINT_LINES);
    (addr as u64 & ((1 << 56) - 1)) | lines << 56
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
        self.dropped_full + self.dropped_oldest + self.dropped_failed + self.cleared
    }
}

/// How many positions ahead a write prefetches its slot.
const PREFETCH_AHEAD: u64 = 8;

/// Slot prefetching is on unless `ELIXIR_SCOPE_RING_PREFETCH=0` (read once;
/// for A/B benchmarks).
fn prefetch_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("ELIXIR_SCOPE_RING_PREFETCH").map_or(true, |v| v != "0"))
}

struct Slot<T> {
    stamp: AtomicU64,
    /// Where the value's heap buffer was when it was last written (see
    /// [`Ring::with_buffer_hint`]): address in the low 56 bits, cache lines
    /// to prefetch (at most [`HINT_LINES`]) above. A hint only: a reader of
    /// it never dereferences it, it may be stale.
    hint: AtomicU64,
    value: Cell<T>,
}

/// Most cache lines of a value's buffer a hint prefetches.
const HINT_LINES: u64 = 4;

enum SlotRead {
    Delivered,
    Tombstone,
    Overwritten,
    NotReady,
}

/// How a read treats the consumption cursor.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Mode {
    /// Consume from wherever the read stands at the cursor (`read_batch`).
    Auto,
    /// Start at the cursor and follow it (`consume_batch`).
    Consume,
    /// Never consume (`peek_batch`).
    Peek,
}

enum Enter {
    Held,
    Tomb,
    No,
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
    /// `(address, bytes)` of a value's heap buffer, if it has one worth
    /// prefetching (see [`Ring::with_buffer_hint`]).
    buffer_of: Option<BufferOf<T>>,
}

/// `(address, bytes)` of a value's heap buffer (see [`Ring::with_buffer_hint`]).
pub type BufferOf<T> = fn(&T) -> (usize, usize);

struct Counters {
    reads: AtomicU64,
    dropped_full: AtomicU64,
    dropped_oldest: AtomicU64,
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
                hint: AtomicU64::new(0),
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
                dropped_failed: AtomicU64::new(0),
                cleared: AtomicU64::new(0),
            }),
            slots,
            mask: capacity as u64 - 1,
            cap: capacity as u64,
            overflow,
            buffer_of: None,
        })
    }
}

impl<T> Ring<T> {
    /// Values keep their heap buffers across laps (an [`Event`]'s payload):
    /// in a big ring those buffers are cold when a writer comes back to a
    /// slot, and when a worker copies the event out. With `buffer_of`
    /// (the address and length of a value's buffer) every write records
    /// where its slot's buffer is, and writers and consuming readers
    /// prefetch the buffer of a slot [`PREFETCH_AHEAD`] positions ahead,
    /// whose slot itself was prefetched earlier (a write prefetches the
    /// slot `2 * PREFETCH_AHEAD` ahead).
    ///
    /// [`Event`]: crate::Event
    pub fn with_buffer_hint(mut self, buffer_of: BufferOf<T>) -> Self {
        self.buffer_of = Some(buffer_of);
        self
    }

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
                        .fetch_add(target - c, Ordering::Release);
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
        if self.buffer_of.is_some() {
            self.prefetch_slot(pos + 2 * PREFETCH_AHEAD);
            self.prefetch_buffer(pos + PREFETCH_AHEAD);
        } else {
            self.prefetch_slot(pos + PREFETCH_AHEAD);
        }
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
        unsafe {
            slot.value.with_mut(|v| {
                fill(&mut *v);
                if let Some(buffer_of) = self.buffer_of {
                    slot.hint
                        .store(hint_word(buffer_of(&*v)), Ordering::Relaxed);
                }
            })
        };
        guard.ok = true;
    }

    /// Prefetch the buffer the slot of `pos` recorded at its last write
    /// (see [`Ring::with_buffer_hint`]). A hint only: the address is never
    /// dereferenced, and a prefetch never faults.
    #[inline(always)]
    fn prefetch_buffer(&self, pos: u64) {
        #[cfg(target_arch = "x86_64")]
        if prefetch_on() {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let h = self.slots[(pos & self.mask) as usize]
                .hint
                .load(Ordering::Relaxed);
            let addr = (h & ((1 << 56) - 1)) as usize;
            for line in 0..(h >> 56) as usize {
                // SAFETY: only handed to a prefetch, which never faults nor
                // reads; `wrapping_add` keeps the arithmetic defined.
                unsafe { _mm_prefetch::<_MM_HINT_T0>((addr as *const i8).wrapping_add(line * 64)) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = pos;
    }

    /// Bring the slot of a later write into this core's cache (#15a): a
    /// big ring's slots are cold by the time a writer comes back to them,
    /// and the store miss otherwise stalls the writer's next full memory
    /// barrier (a traced process: the VM's own, right after the event).
    /// A hint only: no access is made.
    #[inline(always)]
    fn prefetch_slot(&self, pos: u64) {
        #[cfg(target_arch = "x86_64")]
        if prefetch_on() {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let i = (pos & self.mask) as usize;
            // SAFETY: `i` < slots.len() (mask = len - 1); the pointers are
            // only handed to a prefetch, which never faults nor reads.
            unsafe {
                let p = self.slots.as_ptr().add(i) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(p);
                _mm_prefetch::<_MM_HINT_T0>(p.add(std::mem::size_of::<Slot<T>>() - 1));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = pos;
    }

    /// Publish `pos` as a tombstone without filling it.
    fn fail_slot(&self, pos: u64) {
        let slot = &self.slots[(pos & self.mask) as usize];
        if let SlotClaim::Owned = self.claim_slot(slot, pos) {
            slot.stamp
                .store(stamp(pos + 1, READY | TOMB), Ordering::Release);
        }
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
    /// for each, in position order. A read from behind the cursor skips to
    /// it (the events between were consumed or dropped) and reports the gap
    /// in `missed`; at the cursor it consumes what it returns; ahead of the
    /// cursor it peeks until it reaches nothing more to read.
    pub fn read_batch<F: FnMut(u64, &T)>(&self, start: u64, max: usize, f: F) -> ReadOutcome {
        self.read_from(start, max, Mode::Auto, f)
    }

    /// Like [`read_batch`](Self::read_batch) but never consumes, even at the
    /// cursor, and may read behind it (events not yet overwritten): for
    /// observers that must not take events from the consuming readers.
    pub fn peek_batch<F: FnMut(u64, &T)>(&self, start: u64, max: usize, f: F) -> ReadOutcome {
        self.read_from(start, max, Mode::Peek, f)
    }

    /// Consume up to `max` events at the consumption cursor, wherever it is
    /// when the call runs: `read_batch(read_position(), ..)` without loading
    /// the position first.
    pub fn consume_batch<F: FnMut(u64, &T)>(&self, max: usize, f: F) -> ReadOutcome {
        self.read_from(self.cursor.load(Ordering::Acquire), max, Mode::Consume, f)
    }

    /// Enter the slot of `pos` as a reader if it holds that event.
    fn enter(&self, pos: u64) -> Enter {
        let slot = &self.slots[(pos & self.mask) as usize];
        loop {
            let s = slot.stamp.load(Ordering::Acquire);
            if seq1_of(s) != pos + 1 || count_of(s) == WRITING {
                return Enter::No;
            }
            if s & TOMB != 0 {
                return Enter::Tomb;
            }
            if count_of(s) - READY >= MAX_READERS {
                return Enter::No;
            }
            if slot
                .stamp
                .compare_exchange_weak(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Enter::Held;
            }
        }
    }

    /// Do we hold (as a reader) the slot of `pos`? Only meaningful for
    /// positions this call entered or found as tombstones: a held slot
    /// cannot change, a tombstone is never held.
    fn held(&self, pos: u64) -> bool {
        let s = self.slots[(pos & self.mask) as usize]
            .stamp
            .load(Ordering::Acquire);
        seq1_of(s) == pos + 1 && s & TOMB == 0
    }

    fn leave(&self, pos: u64) {
        self.slots[(pos & self.mask) as usize]
            .stamp
            .fetch_sub(1, Ordering::Release);
    }

    /// Consume events at the cursor `c` (== `p`): enter the ready prefix of
    /// at most `want` slots, claim it with one CAS on the cursor, then hand
    /// the events to `f`. Entering first means no writer can take a claimed
    /// slot before its event is copied out, so an accepted event is never
    /// lost between the claim and the read. Returns `None` if the cursor
    /// moved (retry), else `(claimed_end, delivered, tombstones)`.
    fn consume_at<F: FnMut(u64, &T)>(
        &self,
        c: u64,
        limit: u64,
        f: &mut F,
    ) -> Option<(u64, u64, u64)> {
        let mut q = c;
        while q < limit {
            match self.enter(q) {
                Enter::Held | Enter::Tomb => q += 1,
                Enter::No => break,
            }
        }
        // Leaves every still-held slot of [from, to) on exit, panics included.
        struct Held<'a, T> {
            ring: &'a Ring<T>,
            from: u64,
            to: u64,
        }
        impl<T> Drop for Held<'_, T> {
            fn drop(&mut self) {
                for pos in self.from..self.to {
                    if self.ring.held(pos) {
                        self.ring.leave(pos);
                    }
                }
            }
        }
        let mut held = Held {
            ring: self,
            from: c,
            to: q,
        };
        if q == c {
            return Some((c, 0, 0));
        }
        if self
            .cursor
            .compare_exchange(c, q, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return None;
        }
        let (mut got, mut failed) = (0u64, 0u64);
        for pos in c..q {
            if self.buffer_of.is_some() && pos + PREFETCH_AHEAD < q {
                self.prefetch_buffer(pos + PREFETCH_AHEAD);
            }
            if self.held(pos) {
                let slot = &self.slots[(pos & self.mask) as usize];
                // SAFETY: we hold a reader count on this slot (entered above,
                // not yet left), so no writer can take it; readers only share.
                unsafe { slot.value.with(|v| f(pos, &*v)) };
                self.leave(pos);
                got += 1;
            } else {
                failed += 1;
            }
            held.from = pos + 1;
        }
        let cs = &self.counters;
        cs.reads.fetch_add(got, Ordering::Release);
        if failed > 0 {
            cs.dropped_failed.fetch_add(failed, Ordering::Release);
        }
        Some((q, got, failed))
    }

    fn read_from<F: FnMut(u64, &T)>(
        &self,
        start: u64,
        max: usize,
        mode: Mode,
        mut f: F,
    ) -> ReadOutcome {
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
            let c = self.cursor.load(Ordering::Acquire);
            if mode != Mode::Peek && p < c {
                // Everything before the cursor was consumed or dropped (and
                // counted as such): it is gone for every consuming reader.
                missed += c - p;
                p = c;
                continue;
            }
            if p >= head {
                break;
            }
            if mode != Mode::Peek && p == c {
                // Saturating: `max` may be `usize::MAX` ("read everything").
                let limit = head.min(p.saturating_add((max - delivered) as u64));
                match self.consume_at(c, limit, &mut f) {
                    None => continue,
                    Some((q, _, _)) if q == p => break,
                    Some((q, got, failed)) => {
                        delivered += got as usize;
                        missed += failed;
                        p = q;
                    }
                }
                continue;
            }
            // A peek: ahead of the cursor, or anywhere for `peek_batch`.
            let oldest = head.saturating_sub(self.cap);
            if p < oldest {
                missed += oldest - p;
                p = oldest;
                continue;
            }
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
        // Move the cursor before raising the floor: a reader that sees the
        // new floor then also sees the cursor at or past it. (The other way
        // round, a consuming reader could skip to the floor while the cursor
        // is still behind it, peek the events there, and get them again from
        // its next read at the cursor.)
        let mut c = self.cursor.load(Ordering::Acquire);
        let mut n = 0;
        while c < h {
            match self
                .cursor
                .compare_exchange_weak(c, h, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.counters.cleared.fetch_add(h - c, Ordering::Release);
                    n = h - c;
                    break;
                }
                Err(actual) => c = actual,
            }
        }
        self.floor.fetch_max(h, Ordering::AcqRel);
        n
    }

    /// Reset the value of every idle slot behind the cursor (consumed or
    /// dropped) to `T::default()`, releasing its heap buffers. Live events,
    /// and slots in use by a writer or reader, are left alone.
    pub fn release_memory(&self)
    where
        T: Default,
    {
        let cursor = self.cursor.load(Ordering::Acquire);
        for slot in self.slots.iter() {
            let s = slot.stamp.load(Ordering::Acquire);
            let seq1 = seq1_of(s);
            // Only idle slots whose event is behind the cursor (`seq <
            // cursor`, i.e. `seq1 <= cursor`): live events stay readable.
            if count_of(s) != READY || seq1 == 0 || seq1 > cursor {
                continue;
            }
            if slot
                .stamp
                .compare_exchange(
                    s,
                    stamp(seq1, WRITING),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                // SAFETY: we hold the slot in WRITING state (see fill_slot).
                unsafe { slot.value.with_mut(|v| *v = T::default()) };
                // A tombstone: a peek behind the cursor skips it rather than
                // being handed the default value as an event.
                slot.stamp
                    .store(stamp(seq1, READY | TOMB), Ordering::Release);
            }
        }
    }

    /// A snapshot of the counters. Counters are read one by one, so under
    /// concurrent traffic the identities hold exactly only once writers and
    /// readers are quiescent.
    ///
    /// Downstream counters are read first (the consumed ones, then the
    /// cursor, then the head), so an event counted as consumed is always
    /// also counted as written: `write_position - (reads + dropped_oldest +
    /// dropped_failed + cleared)` never misses an event, even one a reader
    /// has claimed (cursor moved) but not yet counted in `reads`.
    pub fn stats(&self) -> RingStats {
        let cs = &self.counters;
        let reads = cs.reads.load(Ordering::Acquire);
        let dropped_oldest = cs.dropped_oldest.load(Ordering::Acquire);
        let dropped_failed = cs.dropped_failed.load(Ordering::Acquire);
        let cleared = cs.cleared.load(Ordering::Acquire);
        let dropped_full = cs.dropped_full.load(Ordering::Relaxed);
        let read_position = self.cursor.load(Ordering::Acquire);
        let write_position = self.head.load(Ordering::Acquire);
        RingStats {
            capacity: self.cap,
            write_position,
            read_position,
            reads,
            dropped_full,
            dropped_oldest,
            dropped_failed,
            cleared,
        }
    }
}
