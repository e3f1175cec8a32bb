//! A pool of native worker threads draining ring shards in batches.
//!
//! A [`WorkerPool`] owns `workers` threads that drain `S` [`Ring`] shards
//! (given at construction) at their consumption cursors, copy each batch out
//! of the ring (`T: Clone`) and hand it to a user [`Stage`].
//!
//! * **Assignment.** With `n` workers, shard `i` belongs to worker `i % n`.
//!   A shard is additionally protected by an *owner claim* (an `AtomicBool`)
//!   held for the whole batch — consume, stage, retry, dead letter — so a
//!   shard is never drained by two workers at once, even while
//!   [`WorkerPool::scale`] moves it from one worker to another (which
//!   therefore happens only at batch boundaries). Batches of one shard are
//!   processed one after the other, in position order.
//! * **Idling.** A worker that found nothing to do parks with a timeout of
//!   `flush_interval`: it never busy-spins, and it wakes at least every
//!   `flush_interval` to look at its shards. Producers may call
//!   [`WorkerPool::notify`] after pushing to wake the workers at once.
//! * **Failures.** A stage panic is caught (counted in `panics` and, as the
//!   worker carries on, in `restarts`); a panic or an `Err` makes the batch
//!   be retried once (`retries`); if the retry fails too, the batch goes to a
//!   bounded dead-letter queue (`dead_lettered_events`; batches evicted from
//!   the full queue are counted in `dead_letter_overflow`).
//! * **Circuit breaker.** After `breaker_threshold` consecutive batches
//!   failed (retry included), the breaker *opens*: for `breaker_open_for`,
//!   batches skip the stage and go straight to the dead-letter queue
//!   (counted in `dead_lettered_events` and `circuit_rejected_events`).
//!   Then it is *half open*: the next batch is a probe (other workers'
//!   batches are still dead-lettered meanwhile); its success closes the
//!   breaker, its failure opens it again. `breaker_threshold` 0 disables it.
//! * **Accounting.** Every event a worker consumed is either processed
//!   (`events_processed`) or dead-lettered (`dead_lettered_events`), so once
//!   [`WorkerPool::flush`] has returned `true` and producers are quiet, the
//!   sum of the shards' `reads` equals `events_processed +
//!   dead_lettered_events`.
//!
//! * **Leases.** A worker index can be *leased* by an owner outside the
//!   pool (the NIF binding leases each index to an Elixir process that
//!   stands for the thread): [`WorkerPool::hold`] takes the lease,
//!   [`WorkerPool::orphan`] marks it lost (its owner died) and
//!   [`WorkerPool::release`] gives it back. A worker whose lease is
//!   orphaned finishes the batch it is in and then parks, leaving its
//!   shards untouched (their events wait in the rings, at their cursors)
//!   until a new owner holds the lease: the worker then resumes where each
//!   shard stands, so nothing is lost, repeated or reordered. Indexes never
//!   leased, released, or at or above [`MAX_LEASES`] run freely; so does
//!   every worker once shutdown has begun (the drain needs them).
//!
//! `T::clone` must not panic: an event whose copy panics is lost (the worker
//! survives, counting a panic and a restart).

use crate::ring::Ring;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long [`WorkerPool::shutdown`] and `Drop` wait for the shards to drain.
pub const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Park timeout of a worker that is waiting for another worker to release a
/// shard it has just been assigned (during [`WorkerPool::scale`]).
const CONTENDED_PARK: Duration = Duration::from_millis(1);

/// Longest single wait of [`WorkerPool::flush`] between two checks.
const FLUSH_POLL: Duration = Duration::from_millis(10);

/// Worker indexes that can be leased (see the module docs).
pub const MAX_LEASES: usize = 64;
const LEASE_FREE: u64 = 0;
const LEASE_ORPHANED: u64 = 1;
/// Generations of held leases start here (0 and 1 are states).
const LEASE_FIRST_GEN: u64 = 2;

/// The state of one worker index's lease.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Not leased: the worker runs.
    Free,
    /// Held by an owner (generation `u64`): the worker runs.
    Held(u64),
    /// Its owner died: the worker parks until the lease is held again.
    Orphaned,
}

/// The lease table, shared with lease owners (see [`WorkerPool::leases`]).
pub struct Leases {
    slots: Box<[AtomicU64]>,
    next_gen: AtomicU64,
    /// Set at shutdown: orphaned workers run again, for the drain.
    draining: AtomicBool,
}

impl Leases {
    fn new() -> Leases {
        Leases {
            slots: (0..MAX_LEASES)
                .map(|_| AtomicU64::new(LEASE_FREE))
                .collect(),
            next_gen: AtomicU64::new(LEASE_FIRST_GEN),
            draining: AtomicBool::new(false),
        }
    }

    /// Takes the lease of `index` (whatever its state): its generation, or
    /// `None` for an index at or above [`MAX_LEASES`].
    pub fn hold(&self, index: usize) -> Option<u64> {
        let slot = self.slots.get(index)?;
        let g = self.next_gen.fetch_add(1, Ordering::Relaxed);
        slot.store(g, Ordering::SeqCst);
        Some(g)
    }

    /// Marks the lease of `index` orphaned if generation `gen` still holds
    /// it: `true` if it did.
    pub fn orphan(&self, index: usize, gen: u64) -> bool {
        self.swap_from(index, gen, LEASE_ORPHANED)
    }

    /// Gives the lease of `index` back (the worker runs freely) if
    /// generation `gen` still holds it: `true` if it did.
    pub fn release(&self, index: usize, gen: u64) -> bool {
        self.swap_from(index, gen, LEASE_FREE)
    }

    /// Frees an orphaned lease (its index will not get a new owner):
    /// `true` if it was orphaned.
    pub fn forget_orphan(&self, index: usize) -> bool {
        self.swap_from(index, LEASE_ORPHANED, LEASE_FREE)
    }

    fn swap_from(&self, index: usize, from: u64, to: u64) -> bool {
        match self.slots.get(index) {
            Some(slot) => slot
                .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok(),
            None => false,
        }
    }

    /// The state of `index`'s lease.
    pub fn state(&self, index: usize) -> LeaseState {
        match self.slots.get(index).map(|s| s.load(Ordering::SeqCst)) {
            None | Some(LEASE_FREE) => LeaseState::Free,
            Some(LEASE_ORPHANED) => LeaseState::Orphaned,
            Some(g) => LeaseState::Held(g),
        }
    }

    /// Must worker `index` stay parked?
    #[inline]
    fn parked(&self, index: usize) -> bool {
        match self.slots.get(index) {
            Some(slot) => {
                slot.load(Ordering::Acquire) == LEASE_ORPHANED
                    && !self.draining.load(Ordering::Acquire)
            }
            None => false,
        }
    }
}

/// The user stage: called with one batch of events of one shard, in order.
/// `Err(reason)` or a panic makes the batch be retried once, then
/// dead-lettered.
pub type Stage<T> = Arc<dyn Fn(&StageCtx, &[T]) -> Result<(), String> + Send + Sync>;

/// Context of one stage call.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StageCtx {
    /// Index of the worker running the stage.
    pub worker: usize,
    /// Index of the shard the batch was consumed from.
    pub shard: usize,
    /// Ring position of the first event of the batch.
    pub first_position: u64,
    /// `0` for the first attempt, `1` for the retry.
    pub attempt: u32,
}

/// Configuration of a [`WorkerPool`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Number of worker threads (at least 1; `0` is treated as 1).
    pub workers: usize,
    /// Most events handed to one stage call (at least 1).
    pub batch_size: usize,
    /// Longest time an idle worker parks before looking at its shards again.
    pub flush_interval: Duration,
    /// Capacity of the dead-letter queue, in batches.
    pub max_dead_letters: usize,
    /// Consecutive failed batches that open the circuit breaker (0: never).
    pub breaker_threshold: u32,
    /// How long an open breaker rejects batches before probing.
    pub breaker_open_for: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 256,
            flush_interval: Duration::from_millis(10),
            max_dead_letters: 64,
            breaker_threshold: 5,
            breaker_open_for: Duration::from_millis(1000),
        }
    }
}

/// State of the pool's circuit breaker.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum BreakerState {
    /// Batches go to the stage.
    #[default]
    Closed,
    /// Batches are dead-lettered without calling the stage.
    Open,
    /// One probe batch goes to the stage; the others are dead-lettered.
    HalfOpen,
}

const B_CLOSED: u8 = 0;
const B_OPEN: u8 = 1;
const B_HALF_OPEN: u8 = 2;

/// The circuit breaker around the stage (see the module docs).
struct Breaker {
    state: AtomicU8,
    /// Live-tunable threshold (0: disabled).
    threshold: AtomicU32,
    open_for_us: AtomicU64,
    consecutive_failures: AtomicU32,
    /// When it opened, µs since the pool's epoch.
    opened_at_us: AtomicU64,
    probing: AtomicBool,
    opens: AtomicU64,
    probes: AtomicU64,
    rejected_events: AtomicU64,
    epoch: Instant,
}

/// What the breaker lets a batch do.
enum Gate {
    Run,
    Probe,
    Reject,
}

impl Breaker {
    fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            state: AtomicU8::new(B_CLOSED),
            threshold: AtomicU32::new(threshold),
            open_for_us: AtomicU64::new(open_for.as_micros().min(u64::MAX as u128) as u64),
            consecutive_failures: AtomicU32::new(0),
            opened_at_us: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            opens: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            rejected_events: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            B_OPEN => BreakerState::Open,
            B_HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    fn gate(&self) -> Gate {
        match self.state.load(Ordering::Acquire) {
            B_CLOSED => Gate::Run,
            B_OPEN => {
                let since = self
                    .now_us()
                    .saturating_sub(self.opened_at_us.load(Ordering::Acquire));
                if since >= self.open_for_us.load(Ordering::Relaxed)
                    && self
                        .state
                        .compare_exchange(B_OPEN, B_HALF_OPEN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    self.claim_probe()
                } else {
                    Gate::Reject
                }
            }
            _ => self.claim_probe(),
        }
    }

    fn claim_probe(&self) -> Gate {
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.probes.fetch_add(1, Ordering::Relaxed);
            Gate::Probe
        } else {
            Gate::Reject
        }
    }

    fn open(&self) {
        self.opened_at_us.store(self.now_us(), Ordering::Release);
        if self.state.swap(B_OPEN, Ordering::AcqRel) != B_OPEN {
            self.opens.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record(&self, gate: &Gate, ok: bool) {
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            if matches!(gate, Gate::Probe) {
                self.state.store(B_CLOSED, Ordering::Release);
            }
        } else {
            let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
            let threshold = self.threshold.load(Ordering::Relaxed);
            if matches!(gate, Gate::Probe) || (threshold > 0 && n >= threshold) {
                self.open();
            }
        }
        if matches!(gate, Gate::Probe) {
            self.probing.store(false, Ordering::Release);
        }
    }
}

/// A snapshot of the circuit breaker.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct BreakerMetrics {
    /// Current state.
    pub state: BreakerState,
    /// Failed batches in a row.
    pub consecutive_failures: u32,
    /// Times it opened.
    pub opens: u64,
    /// Probe batches run while half open.
    pub probes: u64,
    /// Events dead-lettered without a stage call because it was open.
    pub rejected_events: u64,
    /// Threshold (0: disabled).
    pub threshold: u32,
    /// Open period.
    pub open_for: Duration,
}

/// A batch whose stage failed twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter<T> {
    /// Shard the batch came from.
    pub shard: usize,
    /// Ring position of its first event.
    pub first_position: u64,
    /// The events of the batch.
    pub events: Vec<T>,
    /// Why the last attempt failed (`"panic: .."` or `"error: .."`).
    pub reason: String,
}

/// A snapshot of the pool's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolMetrics {
    /// Current number of worker threads.
    pub workers: usize,
    /// Batches handed to the stage successfully (retries that succeeded
    /// included).
    pub batches: u64,
    /// Events of those batches.
    pub events_processed: u64,
    /// Stage panics caught.
    pub panics: u64,
    /// Times a worker carried on after a caught panic.
    pub restarts: u64,
    /// Batches retried after a first failed attempt.
    pub retries: u64,
    /// Events of batches that failed twice.
    pub dead_lettered_events: u64,
    /// Dead-letter batches evicted because the queue was full.
    pub dead_letter_overflow: u64,
    /// Worker loop iterations (a measure of idle wake-ups).
    pub loop_iterations: u64,
    /// `(events, batches)` processed by each current worker, by index.
    /// Workers removed by [`WorkerPool::scale`] are not listed.
    pub per_worker: Vec<(usize, usize)>,
    /// Failed stage attempts (errors and panics, retries included) of each
    /// current worker's batches, by index.
    pub per_worker_errors: Vec<usize>,
    /// How long ago each current worker finished its last pass over its
    /// shards (a poll, whether it found events or not), by index; `None`
    /// before its first.
    pub per_worker_last_poll: Vec<Option<Duration>>,
    /// Workers parked because their lease is orphaned.
    pub parked_workers: usize,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    events_processed: AtomicU64,
    panics: AtomicU64,
    restarts: AtomicU64,
    retries: AtomicU64,
    dead_lettered_events: AtomicU64,
    dead_letter_overflow: AtomicU64,
    loop_iterations: AtomicU64,
}

#[derive(Default)]
struct WorkerStats {
    events: AtomicUsize,
    batches: AtomicUsize,
    /// Failed stage attempts (errors and panics) of this worker's batches.
    errors: AtomicUsize,
    /// End of its last pass over its shards: ns since the pool's epoch,
    /// plus one (0: none yet).
    last_poll_ns: AtomicU64,
}

/// Per-shard state.
struct ShardState {
    /// Owner claim, held for the duration of a batch.
    busy: AtomicBool,
    /// Ring position up to which every event has been processed or
    /// dead-lettered (or was dropped by the ring).
    done: AtomicU64,
}

struct Shared<T> {
    shards: Vec<Arc<Ring<T>>>,
    state: Vec<ShardState>,
    stage: Stage<T>,
    /// Live-tunable (see [`WorkerPool::set_batch_size`]).
    batch_size: AtomicUsize,
    /// Park timeout in µs (see [`WorkerPool::set_flush_interval`]).
    flush_interval_us: AtomicU64,
    max_dead_letters: usize,
    breaker: Breaker,
    /// Current worker count; worker `w` exits once `w >= active`.
    active: AtomicUsize,
    stop: AtomicBool,
    counters: Counters,
    dead: Mutex<VecDeque<DeadLetter<T>>>,
    /// Flush waiters: a count (so workers skip the lock when nobody waits)
    /// and a condvar signalled after every batch while someone does.
    waiters: AtomicUsize,
    progress: Mutex<()>,
    progressed: Condvar,
    /// Unpark handles and stats of the current workers, by index.
    threads: RwLock<Vec<(Thread, Arc<WorkerStats>)>>,
    /// Worker leases (see the module docs).
    leases: Arc<Leases>,
    /// Origin of the workers' `last_poll_ns`.
    epoch: Instant,
}

/// Locks a mutex, ignoring poisoning (no pool code panics while holding
/// one; a poisoned lock only means a panic elsewhere).
fn lock<M>(m: &Mutex<M>) -> MutexGuard<'_, M> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Releases a shard's owner claim when dropped (also on unwind).
struct Claim<'a>(&'a AtomicBool);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// What a worker found on one shard.
enum Visit {
    Idle,
    Worked,
    Contended,
}

impl<T: Clone + Send + Sync + 'static> Shared<T> {
    fn worker_loop(&self, index: usize, stats: &WorkerStats) {
        let mut buf: Vec<T> = Vec::new();
        loop {
            self.counters
                .loop_iterations
                .fetch_add(1, Ordering::Relaxed);
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let n = self.active.load(Ordering::Acquire);
            if index >= n {
                return;
            }
            if self.leases.parked(index) {
                // Its owner died: leave the shards where they stand until a
                // new owner holds the lease (`hold` wakes the workers).
                thread::park_timeout(Duration::from_micros(
                    self.flush_interval_us.load(Ordering::Relaxed),
                ));
                continue;
            }
            let mut worked = false;
            let mut contended = false;
            for shard in (index..self.shards.len()).step_by(n) {
                if self.leases.parked(index) {
                    break;
                }
                let visit = catch_unwind(AssertUnwindSafe(|| {
                    self.visit(index, shard, stats, &mut buf)
                }));
                match visit {
                    Ok(Visit::Idle) => {}
                    Ok(Visit::Worked) => worked = true,
                    Ok(Visit::Contended) => contended = true,
                    Err(_) => {
                        // `T::clone` panicked (stage panics are caught in
                        // `run_stage`): the worker carries on.
                        buf.clear();
                        self.counters.panics.fetch_add(1, Ordering::Relaxed);
                        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
                        worked = true;
                    }
                }
            }
            stats.last_poll_ns.store(
                self.epoch.elapsed().as_nanos().min(u64::MAX as u128 - 1) as u64 + 1,
                Ordering::Relaxed,
            );
            if worked {
                continue;
            }
            thread::park_timeout(if contended {
                CONTENDED_PARK
            } else {
                Duration::from_micros(self.flush_interval_us.load(Ordering::Relaxed))
            });
        }
    }

    /// Claims `shard`, drains one batch from it and runs the stage on it.
    fn visit(&self, worker: usize, shard: usize, stats: &WorkerStats, buf: &mut Vec<T>) -> Visit {
        let st = &self.state[shard];
        if st
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Visit::Contended;
        }
        let _claim = Claim(&st.busy);
        // Copy into the previous batch's elements where possible
        // (`clone_from` reuses their allocations).
        let mut filled = 0;
        let mut first = None;
        let batch_size = self.batch_size.load(Ordering::Relaxed);
        let out = self.shards[shard].consume_batch(batch_size, |pos, ev| {
            first.get_or_insert(pos);
            match buf.get_mut(filled) {
                Some(slot) => slot.clone_from(ev),
                None => buf.push(ev.clone()),
            }
            filled += 1;
        });
        buf.truncate(filled);
        let visit = match first {
            None => Visit::Idle,
            Some(first_position) => {
                let ctx = StageCtx {
                    worker,
                    shard,
                    first_position,
                    attempt: 0,
                };
                self.process(ctx, stats, buf);
                Visit::Worked
            }
        };
        st.done.fetch_max(out.next, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.progress);
            self.progressed.notify_all();
        }
        visit
    }

    fn run_stage(&self, ctx: &StageCtx, stats: &WorkerStats, events: &[T]) -> Result<(), String> {
        let out = self.run_stage_inner(ctx, events);
        if out.is_err() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    fn run_stage_inner(&self, ctx: &StageCtx, events: &[T]) -> Result<(), String> {
        match catch_unwind(AssertUnwindSafe(|| (self.stage)(ctx, events))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("error: {e}")),
            Err(payload) => {
                self.counters.panics.fetch_add(1, Ordering::Relaxed);
                self.counters.restarts.fetch_add(1, Ordering::Relaxed);
                Err(format!("panic: {}", panic_message(&*payload)))
            }
        }
    }

    fn process(&self, mut ctx: StageCtx, stats: &WorkerStats, buf: &mut Vec<T>) {
        let gate = self.breaker.gate();
        let result = if matches!(gate, Gate::Reject) {
            self.breaker
                .rejected_events
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            Err("circuit open".to_string())
        } else {
            let mut result = self.run_stage(&ctx, stats, buf);
            if result.is_err() {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                ctx.attempt = 1;
                result = self.run_stage(&ctx, stats, buf);
            }
            self.breaker.record(&gate, result.is_ok());
            result
        };
        let n = buf.len();
        match result {
            Ok(()) => {
                let c = &self.counters;
                c.batches.fetch_add(1, Ordering::Relaxed);
                c.events_processed.fetch_add(n as u64, Ordering::Relaxed);
                stats.events.fetch_add(n, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                let letter = DeadLetter {
                    shard: ctx.shard,
                    first_position: ctx.first_position,
                    events: std::mem::take(buf),
                    reason,
                };
                let c = &self.counters;
                c.dead_lettered_events
                    .fetch_add(n as u64, Ordering::Relaxed);
                let mut q = lock(&self.dead);
                if self.max_dead_letters == 0 {
                    c.dead_letter_overflow.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                while q.len() >= self.max_dead_letters {
                    q.pop_front();
                    c.dead_letter_overflow.fetch_add(1, Ordering::Relaxed);
                }
                q.push_back(letter);
            }
        }
    }

    fn caught_up(&self, targets: &[u64]) -> bool {
        self.state
            .iter()
            .zip(targets)
            .all(|(s, &t)| s.done.load(Ordering::SeqCst) >= t)
    }

    fn notify(&self) {
        let threads = self.threads.read().unwrap_or_else(|e| e.into_inner());
        for (t, _) in threads.iter() {
            t.unpark();
        }
    }
}

/// Worker threads draining ring shards in batches (see the
/// [module docs](self)).
pub struct WorkerPool<T: Clone + Send + Sync + 'static> {
    shared: Arc<Shared<T>>,
    /// Join handles of the current workers, by index; also serialises
    /// [`scale`](Self::scale) and shutdown.
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl<T: Clone + Send + Sync + 'static> WorkerPool<T> {
    /// Starts `config.workers` threads draining `shards` into `stage`.
    ///
    /// The pool must be the only consumer of the shards (producers push with
    /// [`Ring::push_with`] and may call [`notify`](Self::notify)).
    ///
    /// # Panics
    ///
    /// If the OS refuses to spawn a thread.
    pub fn new(shards: Vec<Arc<Ring<T>>>, config: PoolConfig, stage: Stage<T>) -> Self {
        let state = shards
            .iter()
            .map(|r| ShardState {
                busy: AtomicBool::new(false),
                done: AtomicU64::new(r.read_position()),
            })
            .collect();
        let shared = Arc::new(Shared {
            shards,
            state,
            stage,
            batch_size: AtomicUsize::new(config.batch_size.max(1)),
            flush_interval_us: AtomicU64::new(config.flush_interval.as_micros().max(1) as u64),
            max_dead_letters: config.max_dead_letters,
            breaker: Breaker::new(config.breaker_threshold, config.breaker_open_for),
            active: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            dead: Mutex::new(VecDeque::new()),
            waiters: AtomicUsize::new(0),
            progress: Mutex::new(()),
            progressed: Condvar::new(),
            threads: RwLock::new(Vec::new()),
            leases: Arc::new(Leases::new()),
            epoch: Instant::now(),
        });
        let pool = Self {
            shared,
            handles: Mutex::new(Vec::new()),
        };
        pool.scale(config.workers);
        pool
    }

    /// Wakes every worker (cheap; for producers after a push). Workers also
    /// wake by themselves every `flush_interval`.
    pub fn notify(&self) {
        self.shared.notify();
    }

    /// Changes the batch size (at least 1) from the next batch on.
    pub fn set_batch_size(&self, n: usize) {
        self.shared.batch_size.store(n.max(1), Ordering::Relaxed);
    }

    /// The current batch size.
    pub fn batch_size(&self) -> usize {
        self.shared.batch_size.load(Ordering::Relaxed)
    }

    /// Changes how long an idle worker parks (at least 1 µs) from its next
    /// park on; wakes the workers so it applies at once.
    pub fn set_flush_interval(&self, d: Duration) {
        let us = d.as_micros().clamp(1, u64::MAX as u128) as u64;
        self.shared.flush_interval_us.store(us, Ordering::Relaxed);
        self.shared.notify();
    }

    /// The current flush interval.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_micros(self.shared.flush_interval_us.load(Ordering::Relaxed))
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shared.shards.len()
    }

    /// Current number of workers.
    pub fn workers(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Waits until every event written to any shard before the call has
    /// been processed (its stage call returned) or dead-lettered, or dropped
    /// by the ring. Returns `false` if `timeout` passed first.
    pub fn flush(&self, timeout: Duration) -> bool {
        let sh = &*self.shared;
        let targets: Vec<u64> = sh.shards.iter().map(|r| r.write_position()).collect();
        let deadline = Instant::now() + timeout;
        sh.waiters.fetch_add(1, Ordering::SeqCst);
        sh.notify();
        let mut guard = lock(&sh.progress);
        let ok = loop {
            if sh.caught_up(&targets) {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            let wait = (deadline - now).min(FLUSH_POLL);
            guard = sh
                .progressed
                .wait_timeout(guard, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(guard);
        sh.waiters.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    /// Changes the number of workers to `n` (at least 1). Shards move to
    /// their new workers at batch boundaries: a worker still in a batch of a
    /// shard keeps its claim until the batch is done, so no event is lost,
    /// duplicated or reordered. Removed workers are joined before returning.
    ///
    /// # Panics
    ///
    /// If the OS refuses to spawn a thread.
    pub fn scale(&self, n: usize) {
        let n = n.max(1);
        let sh = &self.shared;
        let mut handles = lock(&self.handles);
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let cur = handles.len();
        // Publish the new count first: new workers exit at once if they see
        // an older, smaller one; old workers beyond `n` exit on seeing it.
        sh.active.store(n, Ordering::Release);
        if n > cur {
            for index in cur..n {
                let stats = Arc::new(WorkerStats::default());
                let (shared, st) = (Arc::clone(sh), Arc::clone(&stats));
                let handle = thread::Builder::new()
                    .name(format!("es-pool-{index}"))
                    .spawn(move || shared.worker_loop(index, &st))
                    .expect("spawn pool worker");
                sh.threads
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((handle.thread().clone(), stats));
                handles.push(handle);
            }
            // Existing workers pick up their new (smaller) shard sets.
            sh.notify();
        } else if n < cur {
            let retired = handles.split_off(n);
            sh.notify();
            for h in retired {
                let _ = h.join();
            }
            sh.threads
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .truncate(n);
        }
    }

    /// The lease table (see the module docs), for owners that must outlive
    /// a borrow of the pool (an owner's death is noticed elsewhere).
    pub fn leases(&self) -> Arc<Leases> {
        Arc::clone(&self.shared.leases)
    }

    /// Takes the lease of worker `index` and wakes the workers, so a
    /// parked one resumes at once: the lease's generation, or `None` for an
    /// index at or above [`MAX_LEASES`].
    pub fn hold(&self, index: usize) -> Option<u64> {
        let g = self.shared.leases.hold(index);
        self.shared.notify();
        g
    }

    /// Marks worker `index`'s lease orphaned if generation `gen` holds it:
    /// the worker parks after its current batch.
    pub fn orphan(&self, index: usize, gen: u64) -> bool {
        self.shared.leases.orphan(index, gen)
    }

    /// Gives worker `index`'s lease back if generation `gen` holds it (the
    /// worker runs freely); wakes the workers.
    pub fn release(&self, index: usize, gen: u64) -> bool {
        let ok = self.shared.leases.release(index, gen);
        self.shared.notify();
        ok
    }

    /// Copies of the dead-letter queue, oldest first (at most
    /// `max_dead_letters` batches).
    pub fn dead_letters(&self) -> Vec<DeadLetter<T>> {
        lock(&self.shared.dead).iter().cloned().collect()
    }

    /// The circuit breaker's state and counters.
    pub fn breaker(&self) -> BreakerMetrics {
        let b = &self.shared.breaker;
        BreakerMetrics {
            state: b.state(),
            consecutive_failures: b.consecutive_failures.load(Ordering::Relaxed),
            opens: b.opens.load(Ordering::Relaxed),
            probes: b.probes.load(Ordering::Relaxed),
            rejected_events: b.rejected_events.load(Ordering::Relaxed),
            threshold: b.threshold.load(Ordering::Relaxed),
            open_for: Duration::from_micros(b.open_for_us.load(Ordering::Relaxed)),
        }
    }

    /// Changes the breaker's threshold (0 disables it: an open breaker
    /// still finishes its open period and probe) and open period.
    pub fn set_breaker(&self, threshold: u32, open_for: Duration) {
        let b = &self.shared.breaker;
        b.threshold.store(threshold, Ordering::Relaxed);
        b.open_for_us.store(
            open_for.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> PoolMetrics {
        let c = &self.shared.counters;
        let threads = self
            .shared
            .threads
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let per_worker = threads
            .iter()
            .map(|(_, s)| {
                (
                    s.events.load(Ordering::Relaxed),
                    s.batches.load(Ordering::Relaxed),
                )
            })
            .collect();
        let per_worker_errors = threads
            .iter()
            .map(|(_, s)| s.errors.load(Ordering::Relaxed))
            .collect();
        let since_epoch = self.shared.epoch.elapsed();
        let per_worker_last_poll = threads
            .iter()
            .map(|(_, s)| match s.last_poll_ns.load(Ordering::Relaxed) {
                0 => None,
                at => Some(since_epoch.saturating_sub(Duration::from_nanos(at - 1))),
            })
            .collect();
        let parked_workers = (0..threads.len())
            .filter(|&i| self.shared.leases.parked(i))
            .count();
        drop(threads);
        PoolMetrics {
            workers: self.workers(),
            batches: c.batches.load(Ordering::Relaxed),
            events_processed: c.events_processed.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            dead_lettered_events: c.dead_lettered_events.load(Ordering::Relaxed),
            dead_letter_overflow: c.dead_letter_overflow.load(Ordering::Relaxed),
            loop_iterations: c.loop_iterations.load(Ordering::Relaxed),
            per_worker,
            per_worker_errors,
            per_worker_last_poll,
            parked_workers,
        }
    }

    /// Drains the shards (waiting at most [`SHUTDOWN_DRAIN_TIMEOUT`]), stops
    /// the workers and joins them. Returns whether the drain completed.
    pub fn shutdown(self) -> bool {
        self.shutdown_timeout(SHUTDOWN_DRAIN_TIMEOUT)
    }

    /// [`shutdown`](Self::shutdown) with an explicit drain timeout.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> bool {
        self.stop_workers(timeout)
    }

    fn stop_workers(&mut self, timeout: Duration) -> bool {
        if self.shared.stop.load(Ordering::Acquire) {
            return true;
        }
        // Workers whose owner died drain too: the pool is going away.
        self.shared.leases.draining.store(true, Ordering::SeqCst);
        self.shared.notify();
        let drained = self.flush(timeout);
        let sh = &self.shared;
        let mut handles = lock(&self.handles);
        sh.stop.store(true, Ordering::Release);
        sh.notify();
        for h in handles.drain(..) {
            let _ = h.join();
        }
        sh.active.store(0, Ordering::Release);
        sh.threads
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        drained
    }
}

impl<T: Clone + Send + Sync + 'static> Drop for WorkerPool<T> {
    /// Like [`WorkerPool::shutdown`]: drains (bounded by
    /// [`SHUTDOWN_DRAIN_TIMEOUT`]) and joins; a stage that never returns is
    /// the only way to make it hang.
    fn drop(&mut self) {
        self.stop_workers(SHUTDOWN_DRAIN_TIMEOUT);
    }
}
