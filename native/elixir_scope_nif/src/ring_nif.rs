//! `rb_*` NIFs: the `ElixirScope.Capture.RingBuffer` resource.

use elixir_scope_core::clock::{OffsetClock, Sample};
use elixir_scope_core::{
    next_event_id, shard_of, Event, EventKind, Overflow, Ring, RingError, RingStats, FLAG_TRUNCATED,
};
use rustler::sys::ErlNifResourceType;
use rustler::sys::{
    enif_monotonic_time, enif_time_offset, ErlNifTerm as ERL_NIF_TERM, ErlNifTimeUnit,
};
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::atoms;
use crate::codec::{encode_into, Scratch, TapeEncoder};
use crate::error::badarg;
use crate::event_term::event_to_term;
use crate::handle::{self, Handle, Ref};
use crate::runtime_structs::classify;

/// Most events one `rb_read_batch` / `rb_write_batch` call handles, so a
/// call stays around 1 ms or less on a normal scheduler; Elixir loops.
pub const CHUNK: usize = 1000;
/// Most payload bytes one batch call may copy (events of up to
/// `max_event_bytes` each): big events mean smaller chunks.
const CHUNK_BYTES: usize = 4 << 20;

/// Events per batch call for a ring; `RingBuffer.chunk_size/1` in Elixir
/// computes the same value.
fn chunk_for(max_event_bytes: usize) -> usize {
    CHUNK.min(CHUNK_BYTES / max_event_bytes).max(1)
}

/// Ring resources alive (created and not yet dropped), for leak tests.
static LIVE_RINGS: AtomicU64 = AtomicU64::new(0);

/// Load shedding at ingest (set by the BackpressureManager through the
/// pipeline): keep one event in `keep_one_in` (0 or 1: all), and/or drop
/// the low-priority kinds (generic terms, performance metrics). Exceptions,
/// exits, errors, spawns, links and state records (state changes,
/// snapshots, and the tracer's OTP callback returns) are never shed. Shed events are
/// counted by reason and never written.
#[derive(Default)]
pub struct Shedder {
    keep_one_in: AtomicU32,
    drop_low_priority: AtomicBool,
    counter: AtomicU64,
    pub sampled: AtomicU64,
    pub low_priority: AtomicU64,
}

impl Shedder {
    /// Should an event of `kind` be written?
    #[inline]
    pub fn admit(&self, kind: EventKind) -> bool {
        let n = self.keep_one_in.load(Ordering::Relaxed);
        let low = self.drop_low_priority.load(Ordering::Relaxed);
        if n <= 1 && !low {
            return true;
        }
        match kind {
            EventKind::FunctionException
            | EventKind::ProcessExit
            | EventKind::Error
            | EventKind::ProcessSpawn
            | EventKind::ProcessLink
            | EventKind::StateChange
            | EventKind::StateSnapshot => return true,
            EventKind::Term | EventKind::PerformanceMetric if low => {
                self.low_priority.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            _ => {}
        }
        if n > 1 && self.counter.fetch_add(1, Ordering::Relaxed) % n as u64 != 0 {
            self.sampled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Sets the policy.
    pub fn set(&self, keep_one_in: u32, drop_low_priority: bool) {
        self.keep_one_in.store(keep_one_in, Ordering::Relaxed);
        self.drop_low_priority
            .store(drop_low_priority, Ordering::Relaxed);
    }

    /// `(keep_one_in, drop_low_priority)`.
    pub fn policy(&self) -> (u32, bool) {
        (
            self.keep_one_in.load(Ordering::Relaxed),
            self.drop_low_priority.load(Ordering::Relaxed),
        )
    }

    /// Events shed, all reasons.
    pub fn total(&self) -> u64 {
        self.sampled.load(Ordering::Relaxed) + self.low_priority.load(Ordering::Relaxed)
    }
}

/// The ring resource behind `%RingBuffer{}`: one ring, or the shards of a
/// pipeline (a writer's shard is chosen by its pid, see [`RingRes::shard`]).
pub struct RingRes {
    pub shards: Box<[Arc<Ring<Event>>]>,
    pub max_event_bytes: usize,
    pub strategy: Atom,
    /// Shared with the owning pipeline, which sets it on shutdown.
    pub destroyed: Arc<AtomicBool>,
    pub truncated: AtomicU64,
    /// Load shedding, shared with the pipeline and tracers writing here.
    pub shed: Arc<Shedder>,
    /// The kept positions of the `AsyncWriter`s draining this ring.
    pub writers: crate::writer_nif::Writers,
}

impl Drop for RingRes {
    fn drop(&mut self) {
        LIVE_RINGS.fetch_sub(1, Ordering::Relaxed);
    }
}

static RING_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for RingRes {
    const NAME: &'static CStr = c"elixir_scope_ring";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &RING_TYPE
    }
    fn drop_off_scheduler(&self) -> bool {
        self.shards.iter().map(|r| r.capacity()).sum::<u64>() > 4096
    }
}

/// The offset from the OS monotonic clock to the VM's monotonic time (see
/// [`OffsetClock`]), the offset to wall-clock time (ns), and when they were
/// last re-estimated (OS monotonic ns; `i64::MIN` before the first).
static MONO: OffsetClock = OffsetClock::new();
static WALL_DELTA: AtomicI64 = AtomicI64::new(0);
static DELTAS_AT: AtomicI64 = AtomicI64::new(i64::MIN);
/// Re-read the VM clocks at most this often: both VM calls take a lock.
const DELTAS_TTL_NS: i64 = 1_000_000;
/// VM readings per re-estimate; the one in the narrowest OS window counts.
const SAMPLES: usize = 4;

#[inline]
fn os_monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC is always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// Monotonic and wall-clock time, ns, on the VM's clocks (what
/// `System.monotonic_time(:nanosecond)` and `System.system_time(:nanosecond)`
/// return). Read from the OS clock the VM uses (CLOCK_MONOTONIC) through
/// offsets to the VM clocks re-estimated every millisecond: the VM's own
/// calls take a read lock, which costs more than the rest of an event write.
///
/// Each re-estimate reads the VM clock [`SAMPLES`] times between two OS
/// readings and keeps the narrowest window; the monotonic offset only moves
/// within what that window allows (see `elixir_scope_core::clock`): it is
/// never set above a sample's upper bound, a preempted (wide) sample cannot
/// push it ahead, and when the VM's clock is found behind it slews back at
/// no more than 1/16 of the elapsed time. So the native clock is behind the
/// VM's by at most the narrowest window seen (well under a microsecond on
/// an idle machine) and ahead of it only by what the VM's time correction
/// moved its clock since the last re-estimate, until the slew catches up.
///
/// Monotonic timestamps never go backwards, across processes and threads:
/// every reading is the same non-decreasing function of the OS time it read.
/// (Before this estimator, the offset was the largest midpoint estimate
/// ever seen, so each preempted re-estimate pushed the clock further ahead:
/// 4.1-4.5 µs ahead of `System.monotonic_time/1` after a few minutes at
/// load 13; with it, every one of 300 readings bracketed by two VM
/// readings lay between them, same load.)
#[inline]
pub fn now_ns() -> (i64, i64) {
    let (offset, os) = read_fresh();
    (os + offset, os + WALL_DELTA.load(Ordering::Relaxed))
}

/// The VM's monotonic time alone (ns), as in [`now_ns`].
#[inline]
pub fn monotonic_now_ns() -> i64 {
    let (offset, os) = read_fresh();
    os + offset
}

/// `(offset, os)`, after re-estimating the offsets if they are over
/// [`DELTAS_TTL_NS`] old (one caller does it). Call on a scheduler thread.
#[inline]
fn read_fresh() -> (i64, i64) {
    let (offset, os) = MONO.read(os_monotonic_ns);
    let at = DELTAS_AT.load(Ordering::Relaxed);
    if at == i64::MIN || os.wrapping_sub(at) > DELTAS_TTL_NS {
        if DELTAS_AT
            .compare_exchange(at, os, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            // This caller re-estimates, then reads with the new estimate.
            refresh_deltas();
            return MONO.read(os_monotonic_ns);
        }
        if offset == i64::MIN {
            // Another caller is making the first estimate.
            return read_after_first_estimate();
        }
    }
    (offset, os)
}

#[cold]
fn read_after_first_estimate() -> (i64, i64) {
    loop {
        let (offset, os) = MONO.read(os_monotonic_ns);
        if offset != i64::MIN {
            return (offset, os);
        }
        // Another thread is making the first estimate.
        std::thread::yield_now();
    }
}

#[cold]
fn refresh_deltas() {
    let mut best: Option<(Sample, i64)> = None;
    for _ in 0..SAMPLES {
        let before = os_monotonic_ns();
        // SAFETY: plain reads of the VM clocks (we are on a scheduler).
        let (mono, offset) = unsafe {
            (
                enif_monotonic_time(ErlNifTimeUnit::ERL_NIF_NSEC),
                enif_time_offset(ErlNifTimeUnit::ERL_NIF_NSEC),
            )
        };
        let s = Sample {
            before,
            reference: mono,
            after: os_monotonic_ns(),
        };
        match best {
            Some((b, _)) if b.width() <= s.width() => {}
            _ => best = Some((s, offset)),
        }
    }
    if let Some((s, offset)) = best {
        MONO.update(s, os_monotonic_ns);
        // Wall time may jump: the window's midpoint, as is.
        let mid = s.before + s.width() / 2;
        WALL_DELTA.store(s.reference + offset - mid, Ordering::Relaxed);
    }
}

/// The VM's monotonic time (ns) for threads that are not schedulers (the
/// pipeline's workers): the OS clock plus the offset schedulers keep fresh
/// in [`now_ns`]. Never calls into the VM (its time functions are meant
/// for scheduler threads).
#[inline]
pub fn monotonic_ns_passive() -> i64 {
    let (offset, os) = MONO.read(os_monotonic_ns);
    os + offset
}

/// Reset `ev`'s header for a new event of `kind` written now.
#[inline]
pub fn begin(ev: &mut Event, kind: EventKind, (mono, wall): (i64, i64)) {
    ev.id = next_event_id();
    ev.timestamp = mono;
    ev.wall_time = wall;
    ev.kind = kind as u8;
    ev.flags = 0;
    ev.pid = 0;
    ev.peer = 0;
    ev.module = 0;
    ev.function = 0;
    ev.aux = 0;
}

/// Encode `ev`'s payload with `fill` under `limit` bytes, reusing the
/// slot's buffer; sets [`FLAG_TRUNCATED`] and returns true when a field was
/// cut.
#[inline]
pub fn encode_payload<F>(env: Env, ev: &mut Event, limit: usize, fill: F) -> bool
where
    F: FnOnce(&mut Event, &mut TapeEncoder),
{
    let mut payload = std::mem::take(&mut ev.payload);
    let cut = encode_into(env, &mut payload, limit, |enc| fill(ev, enc));
    if cut {
        ev.flags |= FLAG_TRUNCATED;
    }
    ev.payload = payload;
    cut
}

impl RingRes {
    /// A resource over `shards` (at least one).
    pub fn new(shards: Vec<Arc<Ring<Event>>>, max_event_bytes: usize, strategy: Atom) -> RingRes {
        LIVE_RINGS.fetch_add(1, Ordering::Relaxed);
        RingRes {
            shards: shards.into_boxed_slice(),
            max_event_bytes,
            strategy,
            destroyed: Arc::new(AtomicBool::new(false)),
            truncated: AtomicU64::new(0),
            shed: Arc::new(Shedder::default()),
            writers: Default::default(),
        }
    }

    /// The ring the calling process writes to: the only one, or its shard
    /// by pid (so one process's events stay in order).
    #[inline]
    pub fn shard(&self, env: Env) -> &Ring<Event> {
        if self.shards.len() == 1 {
            &self.shards[0]
        } else {
            let me = crate::codec::word(env.pid().encode(env).as_c_arg());
            &self.shards[shard_of(me, self.shards.len())]
        }
    }

    /// The single ring, for position-based reads; a sharded ring (drained
    /// by its pipeline's workers) raises.
    fn single(&self, env: Env) -> NifResult<&Ring<Event>> {
        if self.shards.len() == 1 {
            Ok(&self.shards[0])
        } else {
            badarg(
                env,
                "this ring buffer belongs to a pipeline (sharded, drained by its workers); \
                 position reads need a single-shard ring",
            )
        }
    }

    /// Write one event: `fill` sets the header fields beyond `begin` and
    /// encodes the payload fields.
    #[inline]
    pub fn push<'a, F>(&self, env: Env<'a>, kind: EventKind, fill: F) -> Term<'a>
    where
        F: FnOnce(&mut Event, &mut TapeEncoder),
    {
        if self.destroyed.load(Ordering::Relaxed) {
            return (atoms::error(), atoms::destroyed()).encode(env);
        }
        if !self.shed.admit(kind) {
            // Shed by policy: counted, reported as written.
            return atoms::ok().encode(env);
        }
        let now = now_ns();
        let limit = self.max_event_bytes;
        let res = self.shard(env).push_with(|ev| {
            begin(ev, kind, now);
            if encode_payload(env, ev, limit, fill) {
                self.truncated.fetch_add(1, Ordering::Relaxed);
            }
        });
        match res {
            Ok(_) => atoms::ok().encode(env),
            Err(_) => (atoms::error(), atoms::buffer_full()).encode(env),
        }
    }

    /// Counters summed over the shards.
    pub fn stats(&self) -> RingStats {
        let mut t = RingStats::default();
        for r in self.shards.iter() {
            let s = r.stats();
            t.capacity += s.capacity;
            t.write_position += s.write_position;
            t.read_position += s.read_position;
            t.reads += s.reads;
            t.dropped_full += s.dropped_full;
            t.dropped_oldest += s.dropped_oldest;
            t.dropped_failed += s.dropped_failed;
            t.cleared += s.cleared;
        }
        t
    }

    pub fn check_live(&self, env: Env) -> NifResult<()> {
        if self.destroyed.load(Ordering::Relaxed) {
            badarg(env, "the ring buffer has been destroyed")
        } else {
            Ok(())
        }
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn rb_new(env: Env, size: i64, strategy: Atom, max_event_bytes: i64) -> NifResult<Term> {
    let overflow = if strategy == atoms::drop_oldest() {
        Overflow::DropOldest
    } else if strategy == atoms::drop_newest() || strategy == atoms::block() {
        Overflow::DropNewest
    } else {
        return Ok((atoms::error(), atoms::invalid_overflow_strategy()).encode(env));
    };
    if size <= 0 {
        return Ok((atoms::error(), atoms::invalid_size()).encode(env));
    }
    if !(64..=(1 << 20)).contains(&max_event_bytes) {
        return badarg(env, "max_event_bytes must be an integer in 64..1048576");
    }
    match Ring::new(size as usize, overflow) {
        Ok(ring) => {
            let ring = ring.with_buffer_hint(Event::payload_buffer);
            let res = handle::make(
                env,
                RingRes::new(vec![Arc::new(ring)], max_event_bytes as usize, strategy),
            );
            Ok((atoms::ok(), res).encode(env))
        }
        Err(RingError::NotPowerOfTwo) => {
            Ok((atoms::error(), atoms::size_must_be_power_of_2()).encode(env))
        }
        Err(RingError::InvalidCapacity) => Ok((atoms::error(), atoms::invalid_size()).encode(env)),
    }
}

fn rb_write<'a>(env: Env<'a>, [rb, event]: [Term<'a>; 2]) -> NifResult<Term<'a>> {
    let rb: Ref<RingRes> = rb.decode()?;
    if let Some(special) = classify(env, event) {
        return Ok(rb.push(env, special.kind(), |ev, enc| special.fill(ev, enc)));
    }
    Ok(rb.push(env, EventKind::Term, |_, enc| enc.field(event)))
}
crate::ingest::lean_nif!("rb_write", 2, rb_write);

/// A snapshot's header and payload (`[server_pid, state, reason, seq]`).
pub fn fill_snapshot(ev: &mut Event, enc: &mut TapeEncoder, parts: [Term; 4]) {
    ev.pid = crate::codec::imm_word(parts[0].as_c_arg());
    for p in parts {
        enc.field(p);
    }
}

/// Write up to one chunk ([`chunk_for`]) of `list` with one claim; returns
/// `{accepted, rejected, rest}` (`rest` is the unprocessed tail) or
/// `{:error, :destroyed}`.
#[rustler::nif]
fn rb_write_batch<'a>(env: Env<'a>, rb: Ref<RingRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    if rb.destroyed.load(Ordering::Relaxed) {
        return Ok((atoms::error(), atoms::destroyed()).encode(env));
    }
    let mut items: Vec<Term<'a>> = Vec::with_capacity(64);
    let mut rest = list;
    let chunk = chunk_for(rb.max_event_bytes);
    while items.len() < chunk {
        match rest.list_get_cell() {
            Ok((head, tail)) => {
                items.push(head);
                rest = tail;
            }
            Err(_) => break,
        }
    }
    if !rest.is_list() {
        return badarg(env, "events must be a proper list");
    }
    // Shed events count as accepted (they were handled by policy).
    let offered = items.len();
    items.retain(|_| rb.shed.admit(EventKind::Term));
    let shed = offered - items.len();
    let now = now_ns();
    let limit = rb.max_event_bytes;
    let mut truncated = 0u64;
    let accepted = rb.shard(env).push_batch_with(items.len(), |i, ev| {
        let special = classify(env, items[i]);
        begin(
            ev,
            special.as_ref().map_or(EventKind::Term, |s| s.kind()),
            now,
        );
        if encode_payload(env, ev, limit, |ev, enc| match &special {
            Some(s) => s.fill(ev, enc),
            None => enc.field(items[i]),
        }) {
            truncated += 1;
        }
    });
    if truncated > 0 {
        rb.truncated.fetch_add(truncated, Ordering::Relaxed);
    }
    Ok((accepted + shed, items.len() - accepted, rest).encode(env))
}

/// Read up to `min(count, chunk)` events ([`chunk_for`]) from `pos`:
/// `{events, next_position, missed}`.
#[rustler::nif]
fn rb_read_batch<'a>(env: Env<'a>, rb: Ref<RingRes>, pos: u64, count: u64) -> NifResult<Term<'a>> {
    rb.check_live(env)?;
    let ring = rb.single(env)?;
    let max = (count as usize).min(chunk_for(rb.max_event_bytes));
    let avail = ring.write_position().saturating_sub(pos) as usize;
    let mut out: Vec<ERL_NIF_TERM> = Vec::with_capacity(max.min(avail));
    let mut scratch = Scratch::for_call(env);
    let outcome = ring.read_batch(pos, max, |_, ev| {
        out.push(event_to_term(env, ev, &mut scratch).as_c_arg());
    });
    let list = crate::codec::make_list(env, &out);
    Ok((list, outcome.next, outcome.missed).encode(env))
}

/// Read one event: `{:ok, event, next}`, `{:lapped, missed, event, next}`
/// or `:empty`.
#[rustler::nif]
fn rb_read<'a>(env: Env<'a>, rb: Ref<RingRes>, pos: u64) -> NifResult<Term<'a>> {
    rb.check_live(env)?;
    let ring = rb.single(env)?;
    let mut scratch = Scratch::new();
    let mut got: Option<Term<'a>> = None;
    let outcome = ring.read_batch(pos, 1, |_, ev| {
        got = Some(event_to_term(env, ev, &mut scratch))
    });
    Ok(match got {
        None => atoms::empty().encode(env),
        Some(ev) if outcome.missed > 0 => {
            (atoms::lapped(), outcome.missed, ev, outcome.next).encode(env)
        }
        Some(ev) => (atoms::ok(), ev, outcome.next).encode(env),
    })
}

#[rustler::nif]
fn rb_stats<'a>(env: Env<'a>, rb: Ref<RingRes>) -> NifResult<Term<'a>> {
    rb.check_live(env)?;
    let s = rb.stats();
    let available = s.available();
    let dropped = map_new(env)
        .map_put(atoms::buffer_full(), s.dropped_full)?
        .map_put(atoms::overflow(), s.dropped_oldest)?
        .map_put(atoms::failed(), s.dropped_failed)?
        .map_put(atoms::cleared(), s.cleared)?;
    let m = map_new(env)
        .map_put(atoms::size(), s.capacity)?
        .map_put(atoms::write_position(), s.write_position)?
        .map_put(atoms::read_position(), s.read_position)?
        .map_put(atoms::available_events(), available)?
        .map_put(atoms::total_writes(), s.write_position)?
        .map_put(atoms::total_reads(), s.reads)?
        .map_put(atoms::dropped_events(), s.dropped_total())?
        .map_put(atoms::dropped(), dropped)?
        .map_put(atoms::utilization(), available as f64 / s.capacity as f64)?
        .map_put(
            atoms::truncated_events(),
            rb.truncated.load(Ordering::Relaxed),
        )?
        .map_put(atoms::shed_events(), rb.shed.total())?
        .map_put(atoms::max_event_bytes(), rb.max_event_bytes as u64)?
        .map_put(atoms::overflow_strategy(), rb.strategy)?;
    Ok(m)
}

#[rustler::nif]
fn rb_clear(env: Env, rb: Ref<RingRes>) -> NifResult<Atom> {
    rb.check_live(env)?;
    rb.shards.iter().for_each(|r| {
        r.clear();
    });
    Ok(atoms::ok())
}

/// Mark destroyed, discard unread events and free payload buffers. The slot
/// array itself is freed when the last handle is garbage-collected.
#[rustler::nif(schedule = "DirtyCpu")]
fn rb_destroy(rb: Ref<RingRes>) -> Atom {
    if !rb.destroyed.swap(true, Ordering::AcqRel) {
        for r in rb.shards.iter() {
            r.clear();
            r.release_memory();
        }
    }
    atoms::ok()
}

/// Number of ring resources not yet freed (they are freed when the last
/// handle is garbage-collected).
#[rustler::nif]
fn rb_live_count() -> u64 {
    LIVE_RINGS.load(Ordering::Relaxed)
}

/// CPU time of the calling scheduler thread, ns (for benches on a loaded
/// machine: time the thread ran, not the time it waited for a core).
#[rustler::nif]
fn debug_thread_cpu_ns() -> i64 {
    cpu_clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of the whole VM process, ns (all threads: schedulers, dirty
/// schedulers, workers), for benches comparing paths that run on
/// different threads.
#[rustler::nif]
fn debug_process_cpu_ns() -> i64 {
    cpu_clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// A CPU-time clock's reading, ns.
fn cpu_clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; both CPU-time clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

#[rustler::nif(name = "next_event_id")]
fn next_event_id_nif() -> u64 {
    next_event_id()
}

/// The shard (of `shards`) a process's events are written to.
#[rustler::nif]
fn shard_of_pid(env: Env, pid: Term, shards: u64) -> NifResult<u64> {
    if !(1..=1 << 16).contains(&shards) {
        return badarg(env, "shards must be an integer in 1..65536");
    }
    if !pid.is_pid() || !crate::codec::is_immediate(pid.as_c_arg()) {
        return badarg(env, "expected a local pid");
    }
    let w = crate::codec::word(pid.as_c_arg());
    Ok(shard_of(w, shards as usize) as u64)
}
