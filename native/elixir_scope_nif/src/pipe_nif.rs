//! `pipe_*` NIFs: the native pipeline behind `PipelineManager` and
//! `AsyncWriterPool` — sharded rings, worker threads, correlator and store
//! (`elixir_scope_core::pipeline`).
//!
//! `pipe_new` returns three handles over one pipeline: the pipeline itself,
//! a `%RingBuffer{}` resource over its shards (what `Ingestor` writes to),
//! and a read-only `%DataAccess{}` resource over its store. NIFs that wait
//! (flush, scale, shutdown) run on dirty I/O schedulers, the others on dirty
//! CPU schedulers: all take the pipeline's read lock, which waits while a
//! shutdown is waiting for a flush, and some the store or correlator lock.

use elixir_scope_core::{
    Accounting, BreakerState, CorrelatorConfig, Event, Overflow, Pipeline, PipelineConfig,
    PoolConfig, StoreConfig,
};
use rustler::sys::{ErlNifResourceType, ErlNifTerm as ERL_NIF_TERM};
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use crate::atoms;
use crate::error::badarg;
use crate::event_term::{event_to_term, Scratch};
use crate::handle::{self, Handle, Ref};
use crate::ring_nif::{monotonic_ns_passive, now_ns, RingRes, Shedder};
use crate::store_nif::StoreRes;

/// Longest wait of one `pipe_flush` / `pipe_shutdown` call.
const MAX_WAIT_MS: u64 = 600_000;
/// How long shutdown waits, after closing the ring, for writes already
/// under way (a write NIF call takes microseconds).
const WRITE_GRACE: Duration = Duration::from_millis(2);
/// Most events one `pipe_process_ring` call consumes.
const MAX_DRAIN: usize = 10_000;

/// The pipeline resource. `None` once shut down.
pub struct PipeRes {
    pipeline: RwLock<Option<Pipeline>>,
    /// The `destroyed` flag of the ring resource over its shards (set on
    /// shutdown, so later writes get `{:error, :destroyed}`); `None` when
    /// the pipeline drains a ring it does not own.
    ring_closed: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The load-shedding policy of the ring it drains.
    shed: Arc<Shedder>,
    /// The pipeline's `QueryCoordinator` server (see `sub_nif`).
    watcher: crate::sub_nif::WatcherCell,
}

static PIPE_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for PipeRes {
    const NAME: &'static CStr = c"elixir_scope_pipeline";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &PIPE_TYPE
    }
    fn drop_off_scheduler(&self) -> bool {
        // Dropping joins the workers after draining.
        true
    }
}

impl PipeRes {
    /// The subscription hub of a running pipeline, and its watcher cell.
    pub fn subscription_hub(
        &self,
        env: Env,
    ) -> NifResult<(
        Arc<elixir_scope_core::subscribe::Hub>,
        crate::sub_nif::WatcherCell,
    )> {
        let pipe = self.get(env)?;
        Ok((Arc::clone(pipe.engine().hub()), Arc::clone(&self.watcher)))
    }

    /// The running pipeline (raises once shut down), for the other NIF
    /// modules.
    pub(crate) fn pipeline<'s>(
        &'s self,
        env: Env,
    ) -> NifResult<impl std::ops::Deref<Target = Pipeline> + 's> {
        self.get(env)
    }

    fn get<'s>(&'s self, env: Env) -> NifResult<PipeGuard<'s>> {
        let g = self.pipeline.read().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            return badarg(env, "the pipeline has been shut down");
        }
        Ok(PipeGuard(g))
    }
}

struct PipeGuard<'s>(RwLockReadGuard<'s, Option<Pipeline>>);

impl std::ops::Deref for PipeGuard<'_> {
    type Target = Pipeline;
    fn deref(&self) -> &Pipeline {
        self.0.as_ref().expect("checked in PipeRes::get")
    }
}

/// The engine's clock, read on worker threads: see
/// [`monotonic_ns_passive`].
fn clock() -> i64 {
    monotonic_ns_passive()
}

fn key(env: Env, name: &str) -> Atom {
    Atom::from_str(env, name).expect("valid atom name")
}

/// A map of `name => u64` pairs.
fn counters<'a>(env: Env<'a>, pairs: &[(&str, u64)]) -> NifResult<Term<'a>> {
    let mut m = map_new(env);
    for &(k, v) in pairs {
        m = m.map_put(key(env, k), v)?;
    }
    Ok(m)
}

/// Options of `pipe_new`, positional (the Elixir wrapper validates and
/// orders them).
#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn pipe_new<'a>(
    env: Env<'a>,
    over: Term<'a>,
    shards: u64,
    shard_capacity: u64,
    strategy: Atom,
    max_event_bytes: u64,
    workers: u64,
    batch_size: u64,
    flush_interval_us: u64,
    max_dead_letters: u64,
    ttl_ms: u64,
    max_correlations: u64,
    max_events: u64,
    max_age_ms: u64,
    sweep_interval_ms: u64,
    correlation_enabled: bool,
) -> NifResult<Term<'a>> {
    let overflow = if strategy == atoms::drop_oldest() {
        Overflow::DropOldest
    } else if strategy == atoms::drop_newest() || strategy == atoms::block() {
        Overflow::DropNewest
    } else {
        return Ok((atoms::error(), atoms::invalid_overflow_strategy()).encode(env));
    };
    // Make sure the clock offsets the workers read are set (we are on a
    // scheduler here).
    let _ = now_ns();
    if !(1..=256).contains(&shards) {
        return badarg(env, "shards must be an integer in 1..256");
    }
    if !(64..=(1 << 20)).contains(&max_event_bytes) {
        return badarg(env, "max_event_bytes must be an integer in 64..1048576");
    }
    if !(1..=64).contains(&workers) {
        return badarg(env, "pool size must be an integer in 1..64");
    }
    if max_events == 0 || max_events > elixir_scope_core::store::MAX_EVENTS_LIMIT as u64 {
        return badarg(env, "max_events out of range");
    }
    let config = PipelineConfig {
        shards: shards as usize,
        shard_capacity: shard_capacity as usize,
        overflow,
        pool: PoolConfig {
            workers: workers as usize,
            batch_size: batch_size.clamp(1, 1 << 20) as usize,
            flush_interval: Duration::from_micros(flush_interval_us.max(1)),
            max_dead_letters: max_dead_letters as usize,
            // Set by `pipe_configure` (:breaker_threshold, :breaker_open_ms).
            ..PoolConfig::default()
        },
        correlator: CorrelatorConfig {
            ttl_ns: (ttl_ms.min(i64::MAX as u64 / 1_000_000) * 1_000_000) as i64,
            max_correlations: max_correlations.max(1) as usize,
        },
        store: StoreConfig {
            max_events: max_events as usize,
            max_age_ns: (max_age_ms > 0)
                .then(|| (max_age_ms.min(i64::MAX as u64 / 1_000_000) * 1_000_000) as i64),
        },
        sweep_interval: Duration::from_millis(sweep_interval_ms.max(1)),
        correlation_enabled,
    };
    // Drain an existing ring (AsyncWriterPool over a user's RingBuffer), or
    // build fresh shards.
    let existing: Option<Ref<RingRes>> = if over == atoms::nil().encode(env) {
        None
    } else {
        let rb: Ref<RingRes> = over
            .decode()
            .map_err(|_| crate::error::badarg_err(env, "expected a ring buffer or nil"))?;
        rb.check_live(env)?;
        Some(rb)
    };
    if let Some(rb) = existing {
        let over_shed = Arc::clone(&rb.shed);
        let pipeline = Pipeline::with_shards(rb.shards.to_vec(), config, clock);
        let store = StoreRes::shared(Arc::clone(pipeline.engine().store()));
        let pipe = PipeRes {
            pipeline: RwLock::new(Some(pipeline)),
            ring_closed: None,
            shed: Arc::clone(&over_shed),
            watcher: Default::default(),
        };
        return Ok((
            atoms::ok(),
            handle::make(env, pipe),
            over,
            handle::make(env, store),
        )
            .encode(env));
    }
    let pipeline = match Pipeline::new(config, clock) {
        Ok(p) => p,
        Err(elixir_scope_core::RingError::NotPowerOfTwo) => {
            return Ok((atoms::error(), atoms::size_must_be_power_of_2()).encode(env))
        }
        Err(elixir_scope_core::RingError::InvalidCapacity) => {
            return Ok((atoms::error(), atoms::invalid_size()).encode(env))
        }
    };
    let ring = RingRes::new(
        pipeline.shards().to_vec(),
        max_event_bytes as usize,
        strategy,
    );
    let store = StoreRes::shared(Arc::clone(pipeline.engine().store()));
    let pipe = PipeRes {
        pipeline: RwLock::new(Some(pipeline)),
        ring_closed: Some(Arc::clone(&ring.destroyed)),
        shed: Arc::clone(&ring.shed),
        watcher: Default::default(),
    };
    Ok((
        atoms::ok(),
        handle::make(env, pipe),
        handle::make(env, ring),
        handle::make(env, store),
    )
        .encode(env))
}

/// Wait until everything written before the call is stored: `true`, or
/// `false` after `timeout_ms`.
#[rustler::nif(schedule = "DirtyIo")]
fn pipe_flush(env: Env, p: Ref<PipeRes>, timeout_ms: u64) -> NifResult<bool> {
    let pipe = p.get(env)?;
    Ok(pipe.flush(Duration::from_millis(timeout_ms.min(MAX_WAIT_MS))))
}

/// Resize the worker pool (shards move between workers at batch
/// boundaries).
#[rustler::nif(schedule = "DirtyIo")]
fn pipe_scale(env: Env, p: Ref<PipeRes>, workers: u64) -> NifResult<Atom> {
    if !(1..=64).contains(&workers) {
        return badarg(env, "pool size must be an integer in 1..64");
    }
    let pipe = p.get(env)?;
    pipe.pool().scale(workers as usize);
    Ok(atoms::ok())
}

/// Apply one live setting: `:batch_size`, `:flush_interval_us`,
/// `:sweep_interval_ms`, `:correlation_ttl_ms`, `:max_correlations`,
/// `:max_events`, `:max_age_ms` (integers; `max_age_ms` 0 = no age bound),
/// `:correlation_enabled` (boolean). Lowered bounds evict at once
/// (counted). Takes the correlator or store lock: dirty CPU.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_configure<'a>(
    env: Env<'a>,
    p: Ref<PipeRes>,
    name: Atom,
    value: Term<'a>,
) -> NifResult<Atom> {
    let pipe = p.get(env)?;
    let int = |v: Term| -> NifResult<u64> {
        v.decode::<u64>()
            .map_err(|_| crate::error::badarg_err(env, "expected a non-negative integer"))
    };
    if name == key(env, "batch_size") {
        pipe.pool()
            .set_batch_size(int(value)?.clamp(1, 1 << 20) as usize);
    } else if name == key(env, "flush_interval_us") {
        pipe.pool()
            .set_flush_interval(Duration::from_micros(int(value)?.max(1)));
    } else if name == key(env, "sweep_interval_ms") {
        pipe.engine()
            .set_sweep_interval(Duration::from_millis(int(value)?.max(1)));
    } else if name == key(env, "correlation_ttl_ms") || name == key(env, "max_correlations") {
        let v = int(value)?.max(1);
        pipe.engine().with_correlator(|c| {
            let mut cfg = c.config();
            if name == key(env, "max_correlations") {
                cfg.max_correlations = v.min(1 << 32) as usize;
            } else {
                cfg.ttl_ns = (v.min(i64::MAX as u64 / 1_000_000) * 1_000_000) as i64;
            }
            c.set_config(cfg);
        });
    } else if name == key(env, "max_events") || name == key(env, "max_age_ms") {
        let v = int(value)?;
        let mut store = elixir_scope_core::pipeline::lock(pipe.engine().store());
        let mut cfg = store.config();
        if name == key(env, "max_events") {
            cfg.max_events = v.clamp(1, elixir_scope_core::store::MAX_EVENTS_LIMIT as u64) as usize;
        } else {
            cfg.max_age_ns =
                (v > 0).then(|| (v.min(i64::MAX as u64 / 1_000_000) * 1_000_000) as i64);
        }
        store.set_limits(cfg);
    } else if name == key(env, "breaker_threshold") || name == key(env, "breaker_open_ms") {
        let v = int(value)?;
        let b = pipe.pool().breaker();
        if name == key(env, "breaker_threshold") {
            pipe.pool()
                .set_breaker(v.min(u32::MAX as u64) as u32, b.open_for);
        } else {
            pipe.pool()
                .set_breaker(b.threshold, Duration::from_millis(v.clamp(1, MAX_WAIT_MS)));
        }
    } else if name == key(env, "shed_keep_one_in") {
        let (_, low) = p.shed.policy();
        p.shed.set(int(value)?.min(u32::MAX as u64) as u32, low);
    } else if name == key(env, "shed_low_priority") {
        let on: bool = value
            .decode()
            .map_err(|_| crate::error::badarg_err(env, "expected a boolean"))?;
        let (n, _) = p.shed.policy();
        p.shed.set(n, on);
    } else if name == key(env, "correlation_enabled") {
        let on: bool = value
            .decode()
            .map_err(|_| crate::error::badarg_err(env, "expected a boolean"))?;
        pipe.engine().set_correlation_enabled(on);
    } else {
        return badarg(env, "unknown live setting");
    }
    Ok(atoms::ok())
}

fn accounting_term<'a>(env: Env<'a>, a: &Accounting) -> NifResult<Term<'a>> {
    counters(
        env,
        &[
            ("accepted", a.accepted),
            ("buffer_full", a.buffer_full),
            ("stored", a.stored),
            ("evicted", a.evicted),
            ("expired", a.expired),
            ("duplicates", a.duplicates),
            ("store_rejected", a.store_rejected),
            ("dead_lettered", a.dead_lettered),
            ("overflow", a.overflow),
            ("failed", a.failed),
            ("cleared", a.cleared),
            ("in_flight", a.in_flight),
        ],
    )?
    .map_put(key(env, "unaccounted"), a.unaccounted())
}

/// Every counter of the pipeline, as nested maps.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_metrics<'a>(env: Env<'a>, p: Ref<PipeRes>) -> NifResult<Term<'a>> {
    let pipe = p.get(env)?;
    let acc = pipe.accounting();
    let pool = pipe.pool().metrics();
    let eng = pipe.engine().metrics();
    let cor = pipe.engine().correlator_metrics();
    let store = elixir_scope_core::pipeline::lock(pipe.engine().store()).stats();
    let (mut cap, mut avail) = (0u64, 0u64);
    let mut per_shard: Vec<Term> = Vec::with_capacity(pipe.shards().len());
    for r in pipe.shards() {
        let s = r.stats();
        cap += s.capacity;
        avail += s.available();
        per_shard.push((s.write_position, s.read_position, s.available(), s.capacity).encode(env));
    }
    let per_worker: Vec<Term> = pool
        .per_worker
        .iter()
        .map(|&(e, b)| (e as u64, b as u64).encode(env))
        .collect();
    let pool_t = counters(
        env,
        &[
            ("workers", pool.workers as u64),
            ("batches", pool.batches),
            ("events_processed", pool.events_processed),
            ("panics", pool.panics),
            ("restarts", pool.restarts),
            ("retries", pool.retries),
            ("dead_lettered_events", pool.dead_lettered_events),
            ("dead_letter_overflow", pool.dead_letter_overflow),
            ("batch_size", pipe.pool().batch_size() as u64),
            (
                "flush_interval_us",
                pipe.pool().flush_interval().as_micros() as u64,
            ),
            ("shards", pipe.pool().shards() as u64),
        ],
    )?
    .map_put(key(env, "per_worker"), per_worker)?;
    let eng_t = counters(
        env,
        &[
            ("handled", eng.handled),
            ("batches", eng.batches),
            ("late_links", eng.late_links),
            ("late_link_misses", eng.late_link_misses),
            ("sweeps", eng.sweeps),
            ("busy_ns", eng.busy_ns),
            ("latency_p50_ns", eng.latency_p50_ns),
            ("latency_p95_ns", eng.latency_p95_ns),
            ("latency_p99_ns", eng.latency_p99_ns),
            ("latency_samples", eng.latency_samples),
        ],
    )?
    .map_put(
        key(env, "correlation_enabled"),
        pipe.engine().correlation_enabled(),
    )?;
    let cor_t = counters(
        env,
        &[
            ("calls", cor.calls),
            ("returns", cor.returns),
            ("sends", cor.sends),
            ("receives", cor.receives),
            ("matched_receives", cor.matched_receives),
            ("unmatched_returns", cor.unmatched_returns),
            ("unwound_frames", cor.unwound_frames),
            ("orphaned_calls", cor.orphaned_calls),
            ("expired", cor.expired),
            ("evicted", cor.evicted),
            ("refused", cor.refused),
            ("active", cor.active),
        ],
    )?;
    let store_t = counters(
        env,
        &[
            ("total_events", store.total as u64),
            ("max_events", store.max_events as u64),
            ("inserted", store.inserted),
            ("evicted", store.evicted),
            ("expired", store.expired),
            ("duplicates", store.duplicates),
            ("segments", store.segments as u64),
            ("memory_bytes", store.memory_bytes as u64),
            ("payload_bytes", store.payload_bytes as u64),
        ],
    )?;
    let ring_t = counters(
        env,
        &[
            ("capacity", cap),
            ("available", avail),
            ("shards", pipe.shards().len() as u64),
        ],
    )?
    .map_put(key(env, "per_shard"), per_shard)?
    .map_put(
        atoms::utilization(),
        if cap == 0 {
            0.0
        } else {
            avail as f64 / cap as f64
        },
    )?;
    let br = pipe.pool().breaker();
    let state = match br.state {
        BreakerState::Closed => atoms::closed(),
        BreakerState::Open => atoms::open(),
        BreakerState::HalfOpen => atoms::half_open(),
    };
    let breaker_t = counters(
        env,
        &[
            ("consecutive_failures", br.consecutive_failures as u64),
            ("opens", br.opens),
            ("probes", br.probes),
            ("rejected_events", br.rejected_events),
            ("threshold", br.threshold as u64),
            ("open_ms", br.open_for.as_millis() as u64),
        ],
    )?
    .map_put(key(env, "state"), state)?;
    let (keep, low) = p.shed.policy();
    let shed_t = counters(
        env,
        &[
            ("keep_one_in", keep as u64),
            ("sampled", p.shed.sampled.load(Ordering::Relaxed)),
            ("low_priority", p.shed.low_priority.load(Ordering::Relaxed)),
            ("total", p.shed.total()),
        ],
    )?
    .map_put(key(env, "drop_low_priority"), low)?;
    map_new(env)
        .map_put(key(env, "breaker"), breaker_t)?
        .map_put(key(env, "shedding"), shed_t)?
        .map_put(atoms::accounting(), accounting_term(env, &acc)?)?
        .map_put(key(env, "pool"), pool_t)?
        .map_put(key(env, "engine"), eng_t)?
        .map_put(key(env, "correlator"), cor_t)?
        .map_put(key(env, "store"), store_t)?
        .map_put(key(env, "ring"), ring_t)
}

/// The dead letters (newest `limit`): `[{reason, shard, first_position,
/// events}]`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_dead_letters<'a>(env: Env<'a>, p: Ref<PipeRes>, limit: u64) -> NifResult<Term<'a>> {
    let pipe = p.get(env)?;
    let letters = pipe.pool().dead_letters();
    let mut scratch = Scratch::for_call(env);
    let skip = letters.len().saturating_sub(limit as usize);
    let out: Vec<ERL_NIF_TERM> = letters
        .iter()
        .skip(skip)
        .map(|l| {
            let evs: Vec<ERL_NIF_TERM> = l
                .events
                .iter()
                .map(|e| event_to_term(env, e, &mut scratch).as_c_arg())
                .collect();
            (
                l.reason.as_str(),
                l.shard as u64,
                l.first_position,
                crate::codec::make_list(env, &evs),
            )
                .encode(env)
                .as_c_arg()
        })
        .collect();
    Ok(crate::codec::make_list(env, &out))
}

/// The correlator's state for debugging (see `Correlator::dump`):
/// `%{stacks: [{pid, depth, untracked, innermost_ids}], open_calls: n, ...}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_correlation_dump<'a>(env: Env<'a>, p: Ref<PipeRes>, limit: u64) -> NifResult<Term<'a>> {
    let pipe = p.get(env)?;
    let d = pipe
        .engine()
        .with_correlator(|c| c.dump(limit.min(1 << 20) as usize));
    let stacks: Vec<Term> = d
        .stacks
        .iter()
        .map(|st| {
            // SAFETY: pids in the correlator are raw words of local pids.
            let pid = unsafe { Term::new(env, crate::codec::from_word(st.pid)) };
            (
                pid,
                st.depth as u64,
                st.untracked as u64,
                st.innermost.clone(),
            )
                .encode(env)
        })
        .collect();
    counters(
        env,
        &[
            (
                "processes_with_open_calls",
                d.processes_with_open_calls as u64,
            ),
            ("open_calls", d.open_calls as u64),
            ("queued_sends", d.queued_sends as u64),
            ("pending_receives", d.pending_receives as u64),
            ("calls_indexed", d.calls_indexed as u64),
            ("tree_entries", d.tree_entries as u64),
            ("active", d.metrics.active),
            ("max_correlations", d.config.max_correlations as u64),
            ("ttl_ms", (d.config.ttl_ns / 1_000_000) as u64),
        ],
    )?
    .map_put(key(env, "stacks"), stacks)
}

/// Fault injection: every batch takes `us` µs longer (0: off).
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_inject_delay(env: Env, p: Ref<PipeRes>, us: u64) -> NifResult<Atom> {
    p.get(env)?.engine().inject_delay(us.min(10_000_000));
    Ok(atoms::ok())
}

/// Fault injection: the next `n` batches fail before touching any state.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_inject_failures(env: Env, p: Ref<PipeRes>, n: u64) -> NifResult<Atom> {
    p.get(env)?.engine().inject_failures(n);
    Ok(atoms::ok())
}

/// Consume up to `max` events from a single-shard ring at its cursor and
/// correlate and store them in this pipeline (the `AsyncWriter` path):
/// `{consumed, missed}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_process_ring<'a>(
    env: Env<'a>,
    p: Ref<PipeRes>,
    rb: Ref<RingRes>,
    max: u64,
) -> NifResult<Term<'a>> {
    let pipe = p.get(env)?;
    rb.check_live(env)?;
    if rb.shards.len() != 1 {
        return badarg(env, "the ring buffer must be a single-shard ring");
    }
    let ring = &rb.shards[0];
    let max = (max as usize).min(MAX_DRAIN);
    let mut batch: Vec<Event> = Vec::with_capacity(max.min(1024));
    let out = ring.consume_batch(max, |_, ev| batch.push(ev.clone()));
    let n = batch.len() as u64;
    match pipe.process_external(&batch) {
        Ok(()) => Ok((n, out.missed).encode(env)),
        Err(reason) => Ok((atoms::error(), reason).encode(env)),
    }
}

/// Run the correlator's TTL sweep now: entries removed.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_sweep(env: Env, p: Ref<PipeRes>) -> NifResult<u64> {
    Ok(p.get(env)?.engine().sweep() as u64)
}

/// The write→stored latency histogram for Prometheus: `{cumulative counts
/// below 2^k ns for k in 10..34, count, sum_ns}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_latency_buckets<'a>(env: Env<'a>, p: Ref<PipeRes>) -> NifResult<Term<'a>> {
    let (below, count, sum) = p.get(env)?.engine().latency_histogram(10, 34);
    Ok((below, count, sum).encode(env))
}

/// Forget the write→stored latency samples.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_reset_latency(env: Env, p: Ref<PipeRes>) -> NifResult<Atom> {
    p.get(env)?.engine().reset_latency();
    Ok(atoms::ok())
}

/// Close the pipeline's ring to writers (they get `{:error, :destroyed}`),
/// then stop the workers after draining it (up to `timeout_ms`):
/// `{:ok, drained?}`; `{:ok, true}` again once shut down.
#[rustler::nif(schedule = "DirtyIo")]
fn pipe_shutdown<'a>(env: Env<'a>, p: Ref<PipeRes>, timeout_ms: u64) -> Term<'a> {
    if let Some(closed) = &p.ring_closed {
        if !closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            // A write that saw the ring open just before is a few µs from
            // done: give it time to land so the drain below includes it.
            std::thread::sleep(WRITE_GRACE);
        }
    }
    let taken = p.pipeline.write().unwrap_or_else(|e| e.into_inner()).take();
    let drained = match taken {
        Some(pipe) => pipe.shutdown(Duration::from_millis(timeout_ms.min(MAX_WAIT_MS))),
        None => true,
    };
    (atoms::ok(), drained).encode(env)
}

/// Is the pipeline running?
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_alive(p: Ref<PipeRes>) -> bool {
    p.pipeline
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .is_some()
}
