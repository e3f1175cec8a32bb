//! The native pipeline: sharded rings → worker pool → correlator → store.
//!
//! * [`Engine`] is the correlate-and-store stage: it turns a batch of
//!   [`Event`]s into correlator inputs (by the header conventions of
//!   [`crate::event`]), correlates them under one lock, applies late links
//!   and inserts the batch into the shared [`EventStore`] under its lock. It
//!   records the write→stored latency of every event. It is usable on its
//!   own (an Elixir-driven writer hands it batches) and as the pool's stage.
//! * [`Pipeline`] owns `S` ring shards (a producer picks its shard with
//!   [`shard_of`], by process, so per-process order survives), a
//!   [`WorkerPool`] draining them into the engine, and the accounting.
//!
//! # Accounting
//!
//! [`Pipeline::accounting`] reports, per reason, where every offered event
//! went. With `offered = accepted + buffer_full`:
//!
//! ```text
//! accepted = stored + evicted + expired + duplicates + store_rejected
//!          + dead_lettered + overflow + failed + cleared + in_flight
//! ```
//!
//! where `in_flight` is measured (events in the rings plus events consumed
//! but not yet through the engine), not derived. Counters are read without
//! a global stop, so under load the two sides may differ by the events that
//! moved while they were read; once [`Pipeline::flush`] returned with
//! producers quiet, `in_flight` is 0 and the identity is exact.
//!
//! A batch whose stage fails is retried once, then dead-lettered. The
//! engine's injected faults ([`Engine::inject_failures`]) strike before the
//! batch touches any state, so a retried batch is never stored twice; a real
//! panic part-way through the store loop would make the retry count the
//! events already stored as `duplicates`.

use crate::correlator::{
    CorrInput, CorrKind, CorrType, Correlation, Correlator, CorrelatorConfig, Link, LinkKind,
};
use crate::event::{Event, EventKind, CALLBACK_MASK};
use crate::pool::{PoolConfig, PoolMetrics, Stage, WorkerPool};
use crate::ring::{Overflow, Ring, RingError};
use crate::store::{
    CorrelationFields, EventStore, InsertOutcome, Order, StoreConfig, StoreStats, StoredEvent,
};
use crate::subscribe::{view_with_aux, Hub};
use crate::CorrelatorMetrics;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A monotonic clock on the same scale as event timestamps (ns).
pub type Clock = fn() -> i64;

/// Locks a mutex, recovering from poisoning: the correlator and the store
/// are consistent between calls, a poisoned lock only means a panic
/// happened elsewhere while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shard of `key` (a process word) among `shards`.
#[inline]
pub fn shard_of(key: u64, shards: usize) -> usize {
    // Fibonacci hashing: pids differ in their middle bits.
    let h = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 32) as usize * shards) >> 32
}

// ---- latency histogram -----------------------------------------------------

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB;

/// A lock-free log-linear histogram of nanosecond values (relative error
/// under 12.5%), for latency percentiles.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

#[inline]
fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let sub = (v >> (msb - SUB_BITS)) as usize & (SUB - 1);
    ((msb - SUB_BITS + 1) as usize) * SUB + sub
}

/// The upper bound of bucket `b`'s values.
fn bucket_high(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let e = (b / SUB) as u32 + SUB_BITS - 1;
    let sub = (b % SUB) as u64;
    let base = (1u64 << e) | (sub << (e - SUB_BITS));
    // Grouped so the top bucket's bound (u64::MAX) does not overflow.
    base + ((1u64 << (e - SUB_BITS)) - 1)
}

impl Histogram {
    /// Adds a batch of local counts (see [`Histogram::local`]).
    pub fn merge(&self, local: &[u32]) {
        for (c, &n) in self.counts.iter().zip(local) {
            if n != 0 {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }

    /// A zeroed local count buffer for [`Histogram::merge`].
    pub fn local() -> Vec<u32> {
        vec![0; BUCKETS]
    }

    /// Counts `v` into a local buffer.
    #[inline]
    pub fn count(local: &mut [u32], v: u64) {
        local[bucket_of(v)] += 1;
    }

    /// Number of recorded values.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The value at quantile `q` (0..=1), as the upper bound of its bucket;
    /// 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_high(b);
            }
        }
        bucket_high(BUCKETS - 1)
    }

    /// Cumulative counts of the values below `2^k` for each `k` in
    /// `k_lo..=k_hi` (`3 <= k_lo`, `k_hi <= 63`): exact, since powers of two
    /// are bucket edges.
    pub fn below_pow2(&self, k_lo: u32, k_hi: u32) -> Vec<u64> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let mut out = Vec::new();
        let mut acc = 0u64;
        let mut b = 0usize;
        for k in k_lo.max(3)..=k_hi.min(63) {
            // The first bucket holding 2^k.
            let edge = (k as usize - 2) * SUB;
            while b < edge {
                acc += counts[b];
                b += 1;
            }
            out.push(acc);
        }
        out
    }

    /// Forgets every value.
    pub fn reset(&self) {
        for c in self.counts.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

// ---- engine ------------------------------------------------------------------

/// The correlator input for a stored event, by the header conventions of
/// [`crate::event`].
pub fn corr_input(ev: &Event) -> CorrInput {
    let kind = match ev.kind() {
        EventKind::FunctionCall => CorrKind::Call,
        EventKind::FunctionReturn => CorrKind::Return,
        EventKind::FunctionException => CorrKind::Exception,
        EventKind::MessageSend => CorrKind::Send,
        EventKind::MessageReceive => CorrKind::Receive,
        EventKind::ProcessSpawn => CorrKind::Spawn,
        EventKind::ProcessExit => CorrKind::Exit,
        EventKind::StateChange | EventKind::StateSnapshot => CorrKind::StateChange,
        _ => CorrKind::Other,
    };
    let mut c = CorrInput::new(ev.id, kind, ev.pid, ev.timestamp);
    let callback = ev.flags & CALLBACK_MASK;
    match kind {
        // An OTP callback's call carries its trigger's hash in `peer`.
        CorrKind::Call | CorrKind::Return if callback != 0 => {
            c.callback = ev.flags;
            if kind == CorrKind::Call {
                c.msg_hash = ev.peer;
            }
        }
        CorrKind::Call | CorrKind::Return | CorrKind::Exception => c.key = ev.peer,
        CorrKind::Send => {
            c.peer = ev.peer;
            c.msg_hash = ev.aux as u64;
        }
        CorrKind::Receive => c.msg_hash = ev.aux as u64,
        // Spawn events carry the child in `pid` and the parent in `peer`.
        CorrKind::Spawn => {
            c.pid = ev.peer;
            c.peer = ev.pid;
        }
        _ => {}
    }
    c
}

/// Counters of an [`Engine`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    /// Events that went through the store loop.
    pub handled: u64,
    /// Batches completed.
    pub batches: u64,
    /// Late links applied to stored receives.
    pub late_links: u64,
    /// Late links whose receive was no longer stored.
    pub late_link_misses: u64,
    /// Correlator TTL sweeps run, and entries they removed.
    pub sweeps: u64,
    /// Time spent correlating and storing, ns.
    pub busy_ns: u64,
    /// Write→stored latency percentiles (ns) and sample count.
    pub latency_p50_ns: u64,
    /// 95th percentile.
    pub latency_p95_ns: u64,
    /// 99th percentile.
    pub latency_p99_ns: u64,
    /// Samples behind the percentiles.
    pub latency_samples: u64,
}

/// The correlate-and-store stage (see the module docs).
pub struct Engine {
    correlator: Mutex<Correlator>,
    store: Arc<Mutex<EventStore>>,
    correlation_enabled: AtomicBool,
    clock: Clock,
    latency: Histogram,
    latency_sum_ns: AtomicU64,
    handled: AtomicU64,
    batches: AtomicU64,
    late_links: AtomicU64,
    late_link_misses: AtomicU64,
    sweeps: AtomicU64,
    busy_ns: AtomicU64,
    fail_next: AtomicU64,
    delay_us: AtomicU64,
    sweep_interval_ns: AtomicI64,
    last_sweep: AtomicI64,
    hub: Arc<Hub>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.hub.shutdown();
    }
}

/// A batch's correlation fields, each with the `aux` and `peer` to store.
type BatchFields = Vec<(CorrelationFields, i64, u64)>;

/// Store sequence numbers of a batch's events (`u64::MAX`: not stored).
type BatchSeqs = Vec<u64>;

thread_local! {
    static SCRATCH: std::cell::RefCell<(BatchFields, Vec<u32>, BatchSeqs)> =
        std::cell::RefCell::new((Vec::new(), Histogram::local(), Vec::new()));
}

#[inline]
fn seq_of(o: InsertOutcome) -> u64 {
    match o {
        InsertOutcome::Stored { seq } => seq,
        _ => u64::MAX,
    }
}

impl Engine {
    /// An engine correlating with `correlator` into `store`, timing with
    /// `clock`; the correlator's TTL sweep runs every `sweep_interval`.
    pub fn new(
        correlator: CorrelatorConfig,
        store: Arc<Mutex<EventStore>>,
        clock: Clock,
        sweep_interval: Duration,
    ) -> Engine {
        // The store keeps the parent chain: no call index needed here.
        let mut corr = Correlator::new(correlator);
        corr.disable_call_index();
        Engine {
            correlator: Mutex::new(corr),
            store,
            correlation_enabled: AtomicBool::new(true),
            clock,
            latency: Histogram::default(),
            latency_sum_ns: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            late_links: AtomicU64::new(0),
            late_link_misses: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            fail_next: AtomicU64::new(0),
            delay_us: AtomicU64::new(0),
            sweep_interval_ns: AtomicI64::new(
                sweep_interval.as_nanos().min(i64::MAX as u128) as i64
            ),
            last_sweep: AtomicI64::new(clock()),
            hub: Hub::new(clock),
        }
    }

    /// The live subscribers of the stored events.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The store the engine writes to.
    pub fn store(&self) -> &Arc<Mutex<EventStore>> {
        &self.store
    }

    /// Runs `f` on the locked correlator.
    pub fn with_correlator<R>(&self, f: impl FnOnce(&mut Correlator) -> R) -> R {
        f(&mut lock(&self.correlator))
    }

    /// Turns correlation on or off (off: events are stored with their own id
    /// as correlation id and no parent).
    pub fn set_correlation_enabled(&self, on: bool) {
        self.correlation_enabled.store(on, Ordering::Relaxed);
    }

    /// Is correlation on?
    pub fn correlation_enabled(&self) -> bool {
        self.correlation_enabled.load(Ordering::Relaxed)
    }

    /// Changes the TTL sweep interval.
    pub fn set_sweep_interval(&self, d: Duration) {
        let ns = d.as_nanos().min(i64::MAX as u128) as i64;
        self.sweep_interval_ns.store(ns, Ordering::Relaxed);
    }

    /// Makes the next `n` batches fail (panic) before touching any state:
    /// fault injection for tests.
    pub fn inject_failures(&self, n: u64) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Makes every batch take `us` µs longer (a slow store, before any
    /// lock is taken): fault injection for overload tests. 0 turns it off.
    pub fn inject_delay(&self, us: u64) {
        self.delay_us.store(us, Ordering::SeqCst);
    }

    /// Forgets the latency samples.
    pub fn reset_latency(&self) {
        self.latency.reset();
        self.latency_sum_ns.store(0, Ordering::Relaxed);
    }

    /// The write→stored latency histogram: cumulative counts below `2^k`
    /// ns for `k` in `k_lo..=k_hi`, the number of samples and their sum
    /// (ns).
    pub fn latency_histogram(&self, k_lo: u32, k_hi: u32) -> (Vec<u64>, u64, u64) {
        (
            self.latency.below_pow2(k_lo, k_hi),
            self.latency.total(),
            self.latency_sum_ns.load(Ordering::Relaxed),
        )
    }

    /// Correlates and stores one batch (in order).
    pub fn process(&self, events: &[Event]) -> Result<(), String> {
        if self.fail_next.load(Ordering::Relaxed) > 0
            && self
                .fail_next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            panic!("injected stage failure");
        }
        if events.is_empty() {
            return Ok(());
        }
        let delay = self.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        let started = (self.clock)();
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let (fields, local, seqs) = &mut *scratch;
            fields.clear();
            seqs.clear();
            let subscribed = !self.hub.is_empty();
            let (mut hits, mut misses) = (0, 0);
            if self.correlation_enabled() {
                let mut corr = lock(&self.correlator);
                for ev in events {
                    let c: Correlation = corr.correlate(&corr_input(ev));
                    // A return or exception written without a duration (the
                    // tracer's) is stored with the one the correlator
                    // measured from its call.
                    let aux = match (ev.kind(), c.duration_ns) {
                        (EventKind::FunctionReturn | EventKind::FunctionException, Some(d))
                            if ev.aux == 0 =>
                        {
                            d
                        }
                        _ => ev.aux,
                    };
                    // An OTP callback's call and return are stored with the
                    // event that triggered the callback in `peer`.
                    let peer = if ev.flags & CALLBACK_MASK != 0
                        && matches!(
                            ev.kind(),
                            EventKind::FunctionCall | EventKind::FunctionReturn
                        ) {
                        c.trigger.unwrap_or(0)
                    } else {
                        ev.peer
                    };
                    fields.push((
                        CorrelationFields {
                            correlation_id: c.correlation_id,
                            parent_id: c.parent_id.unwrap_or(0),
                            root_id: c.root_id.unwrap_or(0),
                        },
                        aux,
                        peer,
                    ));
                }
                let late = corr.take_late_links();
                let every = self.sweep_interval_ns.load(Ordering::Relaxed);
                let last = self.last_sweep.load(Ordering::Relaxed);
                if started.saturating_sub(last) >= every {
                    self.last_sweep.store(started, Ordering::Relaxed);
                    corr.sweep(started);
                    self.sweeps.fetch_add(1, Ordering::Relaxed);
                }
                // Take the store before letting go of the correlator: a
                // receive another worker has correlated is then already
                // stored when this batch's late links reach it.
                let mut store = lock(&self.store);
                drop(corr);
                for (ev, (f, aux, peer)) in events.iter().zip(fields.iter()) {
                    let out = store.insert_with_header(ev, *f, *aux, *peer);
                    if subscribed {
                        seqs.push(seq_of(out));
                    }
                }
                for l in &late {
                    if store.relink(l.event, l.link.target) {
                        hits += 1;
                    } else {
                        misses += 1;
                    }
                }
                if subscribed {
                    // Still under the store lock: subscribers see batches in
                    // store order, whichever worker stored them.
                    self.hub.dispatch(
                        events
                            .iter()
                            .zip(fields.iter())
                            .zip(seqs.iter())
                            .filter(|(_, &seq)| seq != u64::MAX)
                            .map(|((ev, (f, aux, peer)), &seq)| StoredEvent {
                                peer: *peer,
                                ..view_with_aux(ev, f, *aux, seq)
                            }),
                    );
                }
            } else {
                let mut store = lock(&self.store);
                for ev in events {
                    let f = CorrelationFields {
                        correlation_id: ev.id,
                        parent_id: 0,
                        root_id: 0,
                    };
                    let out = store.insert(ev, f);
                    if subscribed {
                        seqs.push(seq_of(out));
                        fields.push((f, ev.aux, ev.peer));
                    }
                }
                if subscribed {
                    self.hub.dispatch(
                        events
                            .iter()
                            .zip(fields.iter())
                            .zip(seqs.iter())
                            .filter(|(_, &seq)| seq != u64::MAX)
                            .map(|((ev, (f, aux, _)), &seq)| view_with_aux(ev, f, *aux, seq)),
                    );
                }
            }
            let now = (self.clock)();
            let mut sum = 0u64;
            for ev in events {
                let d = now.saturating_sub(ev.timestamp).max(0) as u64;
                sum = sum.wrapping_add(d);
                Histogram::count(local, d);
            }
            self.latency.merge(local);
            self.latency_sum_ns.fetch_add(sum, Ordering::Relaxed);
            local.iter_mut().for_each(|c| *c = 0);
            self.handled
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.late_links.fetch_add(hits, Ordering::Relaxed);
            self.late_link_misses.fetch_add(misses, Ordering::Relaxed);
            self.busy_ns
                .fetch_add(now.saturating_sub(started).max(0) as u64, Ordering::Relaxed);
        });
        Ok(())
    }

    /// Runs the correlator's TTL sweep now; returns the entries removed.
    pub fn sweep(&self) -> usize {
        let now = (self.clock)();
        self.last_sweep.store(now, Ordering::Relaxed);
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        lock(&self.correlator).sweep(now)
    }

    /// The correlator's counters.
    pub fn correlator_metrics(&self) -> CorrelatorMetrics {
        lock(&self.correlator).metrics()
    }

    /// The engine's counters and latency percentiles.
    pub fn metrics(&self) -> EngineMetrics {
        EngineMetrics {
            handled: self.handled.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            late_links: self.late_links.load(Ordering::Relaxed),
            late_link_misses: self.late_link_misses.load(Ordering::Relaxed),
            sweeps: self.sweeps.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            latency_p50_ns: self.latency.quantile(0.50),
            latency_p95_ns: self.latency.quantile(0.95),
            latency_p99_ns: self.latency.quantile(0.99),
            latency_samples: self.latency.total(),
        }
    }
}

// ---- pipeline ----------------------------------------------------------------

/// Everything a [`Pipeline`] is built from.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    /// Number of ring shards (at least 1).
    pub shards: usize,
    /// Capacity of each shard (a power of two).
    pub shard_capacity: usize,
    /// What a full shard does.
    pub overflow: Overflow,
    /// Workers, batch size, flush interval, dead-letter bound.
    pub pool: PoolConfig,
    /// Correlator TTL and bound.
    pub correlator: CorrelatorConfig,
    /// Store bounds.
    pub store: StoreConfig,
    /// How often the correlator's TTL sweep runs.
    pub sweep_interval: Duration,
    /// Correlate (or only store)?
    pub correlation_enabled: bool,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            shards: 4,
            shard_capacity: 1 << 16,
            overflow: Overflow::DropNewest,
            pool: PoolConfig::default(),
            correlator: CorrelatorConfig::default(),
            store: StoreConfig::default(),
            sweep_interval: Duration::from_secs(60),
            correlation_enabled: true,
        }
    }
}

/// Where every event offered to a pipeline went (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Writes accepted by the rings plus events handed in from outside.
    pub accepted: u64,
    /// Writes refused by a full ring (`:drop_newest`); not accepted.
    pub buffer_full: u64,
    /// Live in the store.
    pub stored: u64,
    /// Evicted from the store by `max_events`.
    pub evicted: u64,
    /// Expired from the store by age.
    pub expired: u64,
    /// Ignored by the store: the id was already stored.
    pub duplicates: u64,
    /// Refused by the store (payload over 4 GiB).
    pub store_rejected: u64,
    /// Failed twice in the stage, now in (or evicted from) the dead letters.
    pub dead_lettered: u64,
    /// Overwritten in a ring (`:drop_oldest`).
    pub overflow: u64,
    /// Tombstoned by a failed write.
    pub failed: u64,
    /// Removed by a ring clear.
    pub cleared: u64,
    /// In the rings, or consumed and not yet through the engine.
    pub in_flight: u64,
}

impl Accounting {
    /// Everything accounted for on the right-hand side of the identity.
    pub fn accounted(&self) -> u64 {
        self.stored
            + self.evicted
            + self.expired
            + self.duplicates
            + self.store_rejected
            + self.dead_lettered
            + self.overflow
            + self.failed
            + self.cleared
            + self.in_flight
    }

    /// `accepted - accounted` (0 when every event is accounted for).
    pub fn unaccounted(&self) -> i64 {
        self.accepted as i64 - self.accounted() as i64
    }
}

/// Sharded rings, a worker pool and an engine (see the module docs).
pub struct Pipeline {
    shards: Vec<Arc<Ring<Event>>>,
    engine: Arc<Engine>,
    pool: WorkerPool<Event>,
    /// Events handed to the engine by [`Pipeline::process_external`].
    external: AtomicU64,
    /// Of those, events whose batch failed twice.
    external_dead: AtomicU64,
}

impl Pipeline {
    /// Builds the rings, the store, the engine and starts the workers.
    pub fn new(config: PipelineConfig, clock: Clock) -> Result<Pipeline, RingError> {
        let shards = (0..config.shards.max(1))
            .map(|_| {
                Ring::new(config.shard_capacity, config.overflow)
                    .map(|r| Arc::new(r.with_buffer_hint(Event::payload_buffer)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::with_shards(shards, config, clock))
    }

    /// A pipeline draining existing rings (`config.shards`,
    /// `shard_capacity` and `overflow` are ignored). The rings should have
    /// no other consumer: events consumed elsewhere are not accounted here.
    pub fn with_shards(
        shards: Vec<Arc<Ring<Event>>>,
        config: PipelineConfig,
        clock: Clock,
    ) -> Pipeline {
        assert!(!shards.is_empty(), "a pipeline needs at least one ring");
        let store = Arc::new(Mutex::new(EventStore::new(config.store)));
        let engine = Arc::new(Engine::new(
            config.correlator,
            store,
            clock,
            config.sweep_interval,
        ));
        engine.set_correlation_enabled(config.correlation_enabled);
        let stage_engine = Arc::clone(&engine);
        let stage: Stage<Event> = Arc::new(move |_ctx, batch| stage_engine.process(batch));
        let pool = WorkerPool::new(shards.clone(), config.pool, stage);
        Pipeline {
            shards,
            engine,
            pool,
            external: AtomicU64::new(0),
            external_dead: AtomicU64::new(0),
        }
    }

    /// The ring shards (producers write to `shards()[shard_of(pid, n)]`).
    pub fn shards(&self) -> &[Arc<Ring<Event>>] {
        &self.shards
    }

    /// The correlate-and-store stage.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The worker pool.
    pub fn pool(&self) -> &WorkerPool<Event> {
        &self.pool
    }

    /// Correlates and stores a batch that did not come through the rings
    /// (counted as accepted). Like a worker's batch, a failing batch
    /// (error or panic) is retried once, then counted as dead-lettered
    /// (`Err` carries the reason; the events are not kept).
    pub fn process_external(&self, events: &[Event]) -> Result<(), String> {
        self.external
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        let attempt = || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.engine.process(events)))
                .unwrap_or_else(|_| Err("panic in the correlate/store stage".to_string()))
        };
        match attempt() {
            Ok(()) => Ok(()),
            Err(_) => attempt().inspect_err(|_| {
                self.external_dead
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
            }),
        }
    }

    /// Waits until everything written before the call is stored (or
    /// dead-lettered); `false` on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.pool.flush(timeout)
    }

    /// The accounting identity's terms (see the module docs).
    pub fn accounting(&self) -> Accounting {
        // Downstream first: an event moving while we read is then seen in
        // flight rather than nowhere. `handled` counts a batch after it is
        // stored, so it is read before the store (read after, a batch
        // finishing in between was counted in neither: a sample under load
        // showed `unaccounted > 0` with nothing in flight).
        let handled = self.engine.metrics().handled;
        let store: StoreStats = lock(self.engine.store()).stats();
        let pool: PoolMetrics = self.pool.metrics();
        let mut a = Accounting {
            stored: store.total as u64,
            evicted: store.evicted,
            expired: store.expired,
            duplicates: store.duplicates,
            store_rejected: store.rejected,
            dead_lettered: pool.dead_lettered_events,
            ..Accounting::default()
        };
        let mut reads = 0;
        let mut in_rings = 0;
        for r in &self.shards {
            let s = r.stats();
            reads += s.reads;
            a.overflow += s.dropped_oldest;
            a.failed += s.dropped_failed;
            a.cleared += s.cleared;
            a.buffer_full += s.dropped_full;
            a.accepted += s.write_position;
            // Not `write_position - read_position`: a reader moves the
            // cursor before it counts its `reads`, and events between the
            // two were in neither term (a soak sample under load showed
            // `unaccounted > 0` with nothing in flight).
            in_rings += s
                .write_position
                .saturating_sub(s.reads + s.dropped_oldest + s.dropped_failed + s.cleared);
        }
        let external = self.external.load(Ordering::Relaxed);
        let external_dead = self.external_dead.load(Ordering::Relaxed);
        a.accepted += external;
        a.dead_lettered += external_dead;
        // Consumed from the rings (or handed in) but not yet through the
        // engine.
        let in_workers =
            (reads + external).saturating_sub(handled + pool.dead_lettered_events + external_dead);
        a.in_flight = in_rings + in_workers;
        a
    }

    /// Stops the workers after draining (up to `timeout`); `true` if the
    /// rings were drained.
    pub fn shutdown(self, timeout: Duration) -> bool {
        self.pool.shutdown_timeout(timeout)
    }
}

// ---- queries over stored, correlated events ---------------------------------

/// The correlation type of a stored event kind.
pub fn corr_type_of(kind: EventKind) -> CorrType {
    match kind {
        EventKind::FunctionCall => CorrType::FunctionCall,
        EventKind::FunctionReturn | EventKind::FunctionException => CorrType::FunctionReturn,
        EventKind::MessageSend => CorrType::MessageSend,
        EventKind::MessageReceive => CorrType::MessageReceive,
        EventKind::ProcessSpawn => CorrType::ProcessSpawn,
        EventKind::ProcessExit => CorrType::ProcessExit,
        EventKind::StateChange | EventKind::StateSnapshot => CorrType::StateChange,
        _ => CorrType::Unknown,
    }
}

/// The links of a stored event, rebuilt from its kind and correlation
/// fields (what the correlator answered, including late links):
/// a call's caller (`CalledFrom`), a return's call (`Completes`), a
/// receive's send (`Receives`), a spawn's parent pid (`SpawnedBy`), a state
/// change's enclosing call (`StateIn`).
pub fn links_of(e: &StoredEvent<'_>) -> Vec<Link> {
    link_of(e).into_iter().collect()
}

/// The one link a stored event has, if any (what [`links_of`] lists,
/// without a vector).
#[inline]
pub fn link_of(e: &StoredEvent<'_>) -> Option<Link> {
    match EventKind::from_u8(e.kind) {
        EventKind::FunctionCall if e.parent_id != 0 => {
            Some(Link::new(LinkKind::CalledFrom, e.parent_id))
        }
        EventKind::FunctionReturn | EventKind::FunctionException if e.correlation_id != e.id => {
            Some(Link::new(LinkKind::Completes, e.correlation_id))
        }
        EventKind::MessageReceive if e.correlation_id != e.id => {
            Some(Link::new(LinkKind::Receives, e.correlation_id))
        }
        EventKind::ProcessSpawn if e.peer != 0 => Some(Link::new(LinkKind::SpawnedBy, e.peer)),
        EventKind::StateChange | EventKind::StateSnapshot if e.parent_id != 0 => {
            Some(Link::new(LinkKind::StateIn, e.parent_id))
        }
        _ => None,
    }
}

/// Everything inside call `call_id`, in store order: the call itself, the
/// events it caused directly or through nested calls (calls, sends,
/// receives, spawns, state changes — followed down the `parent_id` index)
/// and the returns of those calls, at most `limit` events. Cost: the size
/// of the result (each level is an index walk), not of the store.
pub fn call_contents<'s>(
    store: &'s EventStore,
    call_id: u64,
    limit: usize,
) -> Vec<StoredEvent<'s>> {
    match call_contents_unlimited(store, call_id, limit) {
        Some(out) => out,
        None => call_contents_limited(store, call_id, limit),
    }
}

/// [`call_contents`] when no chain query of its walk would be cut by
/// `limit`: the same walk (each call's correlation chain for its returns,
/// its parent chain for its children) with the events pushed straight into
/// the answer, no vector per chain query. `None` as soon as the walk meets
/// more than `limit` events in all (counting the root and every event of
/// every chain query, kept or not): then a query of the limited walk may
/// be cut, and which events it keeps depends on that walk's order, so
/// [`call_contents_limited`] answers. Otherwise every query of the limited
/// walk sees at most what is left of `limit`, so it keeps everything and
/// visits the same calls: the same set, sorted and deduplicated the same
/// way.
fn call_contents_unlimited<'s>(
    store: &'s EventStore,
    call_id: u64,
    limit: usize,
) -> Option<Vec<StoredEvent<'s>>> {
    let Some(root) = store.get(call_id) else {
        return Some(Vec::new());
    };
    // Events met so far (the root included).
    let mut met = 1usize;
    if met > limit {
        return None;
    }
    let mut out: Vec<StoredEvent<'s>> = Vec::with_capacity(16.min(limit));
    out.push(root);
    let mut frontier: Vec<u64> = Vec::with_capacity(8);
    frontier.push(call_id);
    while let Some(id) = frontier.pop() {
        store.visit_correlation(id, |e| {
            met += 1;
            if e.id != id && e.correlation_id == id {
                out.push(e);
            }
        });
        store.visit_children(id, |e| {
            met += 1;
            if EventKind::from_u8(e.kind) == EventKind::FunctionCall {
                frontier.push(e.id);
            }
            out.push(e);
        });
        if met > limit {
            return None;
        }
    }
    out.sort_unstable_by_key(|e| e.seq);
    out.dedup_by_key(|e| e.seq);
    Some(out)
}

/// [`call_contents`] by chain queries, each cut at what is left of `limit`.
fn call_contents_limited<'s>(
    store: &'s EventStore,
    call_id: u64,
    limit: usize,
) -> Vec<StoredEvent<'s>> {
    let mut out: Vec<StoredEvent<'s>> = Vec::new();
    let Some(root) = store.get(call_id) else {
        return out;
    };
    out.push(root);
    let mut frontier = vec![call_id];
    while let Some(id) = frontier.pop() {
        if out.len() >= limit {
            break;
        }
        // The call's own return(s) share its correlation id.
        for e in store.by_correlation(id, limit - out.len(), Order::Asc) {
            if e.id != id && e.correlation_id == id {
                out.push(e);
            }
        }
        if out.len() >= limit {
            break;
        }
        for e in store.children(id, limit - out.len()) {
            if EventKind::from_u8(e.kind) == EventKind::FunctionCall {
                frontier.push(e.id);
            }
            out.push(e);
        }
    }
    out.truncate(limit);
    out.sort_unstable_by_key(|e| e.seq);
    out.dedup_by_key(|e| e.seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CorrelationFields, StoreConfig};
    use proptest::prelude::*;

    /// One stored event of a random store: kind, and picks (indices into
    /// the earlier events, 0 for none) for its correlation and parent ids.
    type Spec = (u8, usize, usize, u64);

    fn random_store(specs: &[Spec], relinks: &[(usize, usize)], cap: usize) -> EventStore {
        let mut store = EventStore::new(StoreConfig {
            max_events: cap,
            ..StoreConfig::default()
        });
        let kinds = [
            EventKind::FunctionCall,
            EventKind::FunctionCall,
            EventKind::FunctionReturn,
            EventKind::FunctionException,
            EventKind::MessageSend,
            EventKind::MessageReceive,
            EventKind::ProcessSpawn,
            EventKind::StateChange,
        ];
        // Ids 1..=n; a pick of k > 0 names id ((k - 1) % n) + 1, so
        // links may point forwards, backwards, at the event itself or (for
        // an evicted event) at nothing.
        let n = specs.len() as u64;
        let pick = |k: usize| if k == 0 { 0 } else { (k as u64 - 1) % n + 1 };
        for (i, &(kind, corr, parent, pid)) in specs.iter().enumerate() {
            let id = i as u64 + 1;
            let kind = kinds[kind as usize % kinds.len()];
            let correlation_id = match pick(corr) {
                0 => id,
                c => c,
            };
            let ev = Event {
                id,
                timestamp: id as i64,
                pid: pid % 3 + 1,
                kind: kind as u8,
                ..Event::default()
            };
            store.insert(
                &ev,
                CorrelationFields {
                    correlation_id,
                    parent_id: pick(parent),
                    root_id: 0,
                },
            );
        }
        for &(a, b) in relinks {
            store.relink(pick(a + 1), pick(b));
        }
        store
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The walk without chain-query vectors answers exactly what the
        /// limited chain-query walk does, for every id and limit (limits
        /// around the answer's size included), with relinks and evictions.
        #[test]
        fn call_contents_matches_the_chain_query_walk(
            specs in proptest::collection::vec((0u8..8, 0usize..40, 0usize..40, 0u64..3), 1..60),
            relinks in proptest::collection::vec((0usize..60, 0usize..60), 0..4),
            cap in prop_oneof![Just(10_000usize), 8usize..40],
        ) {
            let store = random_store(&specs, &relinks, cap);
            let key = |v: Vec<StoredEvent<'_>>| -> Vec<(u64, u64, u64)> {
                v.iter().map(|e| (e.seq, e.id, e.correlation_id)).collect()
            };
            for id in 0..=specs.len() as u64 + 1 {
                // Bounded: a parent cycle makes the walk run to its limit.
                let full = call_contents_limited(&store, id, 400).len();
                for limit in [0, 1, 2, 3, full.saturating_sub(1), full, full + 1, full + 2, 100, 400] {
                    prop_assert_eq!(
                        key(call_contents(&store, id, limit)),
                        key(call_contents_limited(&store, id, limit)),
                        "id {} limit {}", id, limit
                    );
                }
            }
        }
    }

    #[test]
    fn histogram_buckets_bound_their_values() {
        let mut prev = 0;
        for v in (0..10_000u64).chain([1 << 20, 123_456_789, u64::MAX / 3, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS);
            assert!(b >= prev || v < 10_000, "buckets are monotone");
            prev = b;
            let hi = bucket_high(b);
            assert!(v <= hi, "{v} <= {hi}");
            // Relative error under 1/8.
            assert!(hi - v <= v / 8 + 1, "{v} in bucket up to {hi}");
        }
    }

    #[test]
    fn histogram_counts_below_powers_of_two_exactly() {
        let h = Histogram::default();
        let mut local = Histogram::local();
        let values: Vec<u64> = (0..5000u64).map(|i| i * i * 37 % 3_000_000).collect();
        for &v in &values {
            Histogram::count(&mut local, v);
        }
        h.merge(&local);
        let got = h.below_pow2(10, 22);
        for (i, k) in (10..=22).enumerate() {
            let want = values.iter().filter(|&&v| v < 1 << k).count() as u64;
            assert_eq!(got[i], want, "below 2^{k}");
        }
    }

    #[test]
    fn histogram_quantiles() {
        let h = Histogram::default();
        let mut local = Histogram::local();
        for v in 1..=1000u64 {
            Histogram::count(&mut local, v * 1000);
        }
        h.merge(&local);
        assert_eq!(h.total(), 1000);
        let p50 = h.quantile(0.5);
        assert!((500_000..=570_000).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((990_000..=1_120_000).contains(&p99), "{p99}");
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn shard_of_spreads_and_stays_in_range() {
        let mut counts = [0usize; 16];
        for pid in 0..16_000u64 {
            let s = shard_of(pid * 256 + 0x13, 16);
            counts[s] += 1;
        }
        assert!(counts.iter().all(|&c| c > 500), "{counts:?}");
        assert_eq!(shard_of(12345, 1), 0);
    }
}
