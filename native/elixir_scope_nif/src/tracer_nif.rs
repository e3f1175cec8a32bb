//! The erl_tracer NIF behind `ElixirScope.trace/2`: `ElixirScope.Native` is
//! the tracer module (`enabled/3` and `trace/5` are NIFs here), and the
//! tracer state is a [`TracerRes`] handle. Trace events go straight into the
//! pipeline's ring shards from the traced process's scheduler thread: no
//! trace message, no tracer process, no mailbox.
//!
//! Limits are enforced here, on the traced threads, so they trip at once:
//! total events (exact: the event over the limit is not written), events per
//! second (checked every `check_every` events, a power of two ≤ 1,024 and
//! ≤ max_rate/16) and duration (every event). A trip, or `tracer_stop`,
//! clears `active`: `enabled/3` then answers `discard` (and `remove` to the
//! VM's `trace_status` check), and the owner process is sent
//! `{:elixir_scope_trace_stopped, tracer, reason}` to switch the VM's trace
//! flags off. A full ring drops the event (counted), never blocks; a
//! dropped state record is also remembered per process (the first and last
//! time one was dropped), so that the store can answer "unknown" for the
//! times the lost state may have been in force instead of the state before
//! it (`tracer_state_drops`).

use elixir_scope_core::{shard_of, Event, EventKind, Ring, CALLBACK_MASK, FLAG_STATEM};
use rustler::sys::{enif_get_map_value, ErlNifTerm as ERL_NIF_TERM};
use rustler::types::map::map_new;
use rustler::types::LocalPid;
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::atoms;
use crate::codec::{
    content_hash, imm_word, is_immediate, list_cells, phash_content, small_int, tuple_items, word,
    TapeEncoder,
};
use crate::error::badarg;
use crate::handle::{self, Handle, Ref};
use crate::otp::{self, CallbackTable};
use crate::ring_nif::{begin, encode_payload, now_ns, RingRes, Shedder};

/// Why tracing stopped (0: it has not).
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reason {
    Active = 0,
    Stopped = 1,
    MaxEvents = 2,
    MaxRate = 3,
    Duration = 4,
    PipelineDown = 5,
}

impl Reason {
    fn from_u8(b: u8) -> Reason {
        match b {
            1 => Reason::Stopped,
            2 => Reason::MaxEvents,
            3 => Reason::MaxRate,
            4 => Reason::Duration,
            5 => Reason::PipelineDown,
            _ => Reason::Active,
        }
    }

    fn atom(self) -> Atom {
        match self {
            Reason::Active => atoms::nil(),
            Reason::Stopped => atoms::stopped(),
            Reason::MaxEvents => atoms::max_events(),
            Reason::MaxRate => atoms::max_rate(),
            Reason::Duration => atoms::duration(),
            Reason::PipelineDown => atoms::pipeline_down(),
        }
    }
}

/// One trace session's state (the erl_tracer `TracerState`).
pub struct TracerRes {
    shards: Box<[Arc<Ring<Event>>]>,
    ring_destroyed: Arc<AtomicBool>,
    shed: Arc<Shedder>,
    owner: LocalPid,
    /// Record arities only: no arguments, return values or message contents.
    arity_only: bool,
    /// False for a dry run: count trace calls, write nothing.
    record: bool,
    /// A stats-mode tracer (`tracer_discard/1`): the traced processes only
    /// carry the `call` flag for the VM's `call_time` counters, and
    /// `enabled/3` discards every event before it is built.
    discard_all: bool,
    /// Payload cap per event, bytes.
    limit: usize,
    /// Cap for what matters most: states (OTP callback returns,
    /// snapshots), exception values and exit reasons, bytes.
    state_limit: usize,
    /// OTP callbacks whose returns are recorded as state records (empty:
    /// states are not captured).
    callbacks: CallbackTable,
    /// Scoped traces (ExUnit): only calls of these `(module, function,
    /// arity)` patterns (`0` / `-1`: any) are recorded; `None`: all.
    only: Option<Vec<(u64, u64, i64)>>,
    /// The owner's pid word.
    owner_word: u64,
    /// While the owner takes snapshots, its system messages (and the
    /// replies to them) are not recorded.
    snapshotting: AtomicBool,
    /// State records written: callback returns and snapshots.
    states: AtomicU64,
    /// State records dropped by a full ring.
    states_dropped: AtomicU64,
    /// When they were dropped, per process (see [`StateDrops`]).
    state_drops: Mutex<StateDrops>,
    max_events: u64,
    max_rate: u64,
    check_mask: u64,
    /// VM monotonic ns after which tracing stops.
    deadline: i64,
    active: AtomicBool,
    reason: AtomicU8,
    stopped_at: AtomicI64,
    /// trace/5 calls while active (written + dropped_full + over_limit +
    /// shed). Written events are not counted apart: one atomic add less
    /// per event (see [`TracerRes::written`]).
    offered: AtomicU64,
    dropped_full: AtomicU64,
    /// Offered past a limit (not written).
    over_limit: AtomicU64,
    /// Shed by the pipeline's load-shedding policy (not written).
    shed_events: AtomicU64,
    /// trace/5 calls after the stop (the VM had not switched off yet).
    after_stop: AtomicU64,
    truncated: AtomicU64,
    window_start: AtomicI64,
    window_base: AtomicU64,
}

/// The processes whose state records a full ring dropped: per pid the
/// first and last timestamp of a dropped one; past [`MAX_DROP_PIDS`]
/// processes, one range for all processes.
#[derive(Default)]
struct StateDrops {
    by_pid: HashMap<u64, (i64, i64)>,
    all: Option<(i64, i64)>,
}

/// Processes [`StateDrops`] keeps apart.
const MAX_DROP_PIDS: usize = 65_536;

impl StateDrops {
    fn note(&mut self, pid: u64, ts: i64) {
        let widen = |r: &mut (i64, i64)| *r = (r.0.min(ts), r.1.max(ts));
        if let Some(r) = self.by_pid.get_mut(&pid) {
            widen(r);
        } else if self.by_pid.len() < MAX_DROP_PIDS {
            self.by_pid.insert(pid, (ts, ts));
        } else {
            widen(self.all.get_or_insert((ts, ts)));
        }
    }
}

static TRACER_TYPE: AtomicPtr<rustler::sys::ErlNifResourceType> =
    AtomicPtr::new(std::ptr::null_mut());

impl Handle for TracerRes {
    const NAME: &'static CStr = c"elixir_scope_tracer";
    fn type_slot() -> &'static AtomicPtr<rustler::sys::ErlNifResourceType> {
        &TRACER_TYPE
    }
}

impl TracerRes {
    /// A tracer that records nothing, with no limits, owned by `owner`
    /// (the base of [`tracer_new`] and [`tracer_discard`]).
    fn blank(env: Env, owner: LocalPid, now: i64) -> TracerRes {
        TracerRes {
            shards: Box::new([]),
            ring_destroyed: Arc::new(AtomicBool::new(false)),
            shed: Arc::new(Shedder::default()),
            owner_word: word(owner.encode(env).as_c_arg()),
            owner,
            arity_only: true,
            record: false,
            discard_all: false,
            limit: 0,
            state_limit: 0,
            callbacks: CallbackTable::default(),
            only: None,
            snapshotting: AtomicBool::new(false),
            states: AtomicU64::new(0),
            states_dropped: AtomicU64::new(0),
            state_drops: Mutex::new(StateDrops::default()),
            max_events: u64::MAX,
            max_rate: u64::MAX,
            check_mask: 1023,
            deadline: i64::MAX,
            active: AtomicBool::new(true),
            reason: AtomicU8::new(Reason::Active as u8),
            stopped_at: AtomicI64::new(0),
            offered: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
            over_limit: AtomicU64::new(0),
            shed_events: AtomicU64::new(0),
            after_stop: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            window_start: AtomicI64::new(now),
            window_base: AtomicU64::new(0),
        }
    }

    /// Events written: every offered event (counted before its outcome)
    /// that was not dropped by a full ring, over a limit or shed; none in a
    /// dry run. While tracing, an event being written at this moment may
    /// count already; exact once the VM has switched tracing off.
    fn written(&self) -> u64 {
        if !self.record {
            return 0;
        }
        // The outcomes first: each is counted after its offer, so the
        // difference never underflows.
        let lost = self.dropped_full.load(Ordering::Acquire)
            + self.over_limit.load(Ordering::Acquire)
            + self.shed_events.load(Ordering::Acquire);
        self.offered.load(Ordering::Acquire).saturating_sub(lost)
    }

    /// A state record of `pid` stamped `ts` was dropped (a full ring).
    fn state_dropped(&self, pid: u64, ts: i64) {
        self.states_dropped.fetch_add(1, Ordering::Relaxed);
        // A poisoned lock only means a panic elsewhere held it: the ranges
        // are still valid.
        let mut d = self.state_drops.lock().unwrap_or_else(|e| e.into_inner());
        d.note(pid, ts);
    }

    /// Stop recording for `why`; the first stop wins and notifies the owner.
    fn trip(&self, env: Env, state: Term, why: Reason) {
        if self
            .active
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.reason.store(why as u8, Ordering::Release);
            self.stopped_at.store(now_ns().0, Ordering::Relaxed);
            // The owner is never a tracee (ElixirScope.Tracer untraces
            // itself), so this send cannot recurse into the tracer.
            let _ = env.send(
                &self.owner,
                (atoms::elixir_scope_trace_stopped(), state, why.atom()),
            );
        }
    }

    /// Check the rate window; true when the rate limit tripped.
    #[cold]
    fn rate_exceeded(&self, n: u64, now: i64) -> bool {
        let start = self.window_start.load(Ordering::Relaxed);
        if now - start >= 1_000_000_000 {
            self.window_start.store(now, Ordering::Relaxed);
            self.window_base.store(n, Ordering::Relaxed);
            false
        } else {
            n - self.window_base.load(Ordering::Relaxed) > self.max_rate
        }
    }
}

#[inline]
fn same(t: Term, a: Atom) -> bool {
    t.as_c_arg() == a.as_c_arg()
}

/// `opts.extra` of a trace/5 call.
#[inline]
fn extra<'a>(env: Env<'a>, opts: Term<'a>) -> Option<Term<'a>> {
    let mut v: ERL_NIF_TERM = ERL_NIF_TERM::default();
    // SAFETY: valid env and terms; `v` is written on success.
    let ok = unsafe {
        enif_get_map_value(
            env.as_c_arg(),
            opts.as_c_arg(),
            atoms::extra().as_c_arg(),
            &mut v,
        )
    };
    // SAFETY: a term of `env`.
    (ok != 0).then(|| unsafe { Term::new(env, v) })
}

/// `tracer_new(ring, owner, arity_only, record, max_payload_bytes,
/// max_state_bytes, max_events, max_rate, duration_ms, callbacks, only)`: a
/// tracer writing into `ring`'s shards (`record` false: a dry run that
/// writes nothing). `callbacks`: `[{module, function, arity, flags}]`, the
/// OTP callbacks whose returns become state records; `only`: nil, or
/// `[{module, function | :_, arity | :_}]` patterns calls must match.
#[allow(clippy::too_many_arguments)]
#[rustler::nif]
fn tracer_new<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    owner: LocalPid,
    arity_only: bool,
    record: bool,
    max_payload_bytes: i64,
    max_state_bytes: i64,
    max_events: i64,
    max_rate: i64,
    duration_ms: i64,
    callbacks: Term<'a>,
    only: Term<'a>,
) -> NifResult<Term<'a>> {
    rb.check_live(env)?;
    if !(64..=rb.max_event_bytes as i64).contains(&max_payload_bytes) {
        return badarg(
            env,
            "max_payload_bytes must be at least 64 and at most the ring's max_event_bytes",
        );
    }
    if !(64..=rb.max_event_bytes as i64).contains(&max_state_bytes) {
        return badarg(
            env,
            "max_state_bytes must be at least 64 and at most the ring's max_event_bytes",
        );
    }
    if max_events < 1 || max_rate < 1 || duration_ms < 1 {
        return badarg(
            env,
            "max_events, max_rate and duration must be positive integers",
        );
    }
    let Ok(callbacks) = CallbackTable::from_term(callbacks) else {
        return badarg(
            env,
            "callbacks must be a list of {module, function, arity, flags}",
        );
    };
    let only = if only.as_c_arg() == atoms::nil().encode(env).as_c_arg() {
        None
    } else {
        match only_patterns(env, only) {
            Some(v) => Some(v),
            None => {
                return badarg(
                    env,
                    "only must be nil or a list of {module, function | :_, arity | :_}",
                )
            }
        }
    };
    let now = now_ns().0;
    // Check the rate every 2^k events, 2^k <= min(1024, max_rate / 16).
    let every = (max_rate as u64 / 16).clamp(1, 1024);
    let check_every = 1u64 << (63 - every.leading_zeros());
    let t = TracerRes {
        shards: rb.shards.clone(),
        ring_destroyed: rb.destroyed.clone(),
        shed: rb.shed.clone(),
        arity_only,
        record,
        limit: max_payload_bytes as usize,
        state_limit: max_state_bytes as usize,
        callbacks,
        only,
        max_events: max_events as u64,
        max_rate: max_rate as u64,
        check_mask: check_every - 1,
        deadline: now.saturating_add(duration_ms.saturating_mul(1_000_000)),
        ..TracerRes::blank(env, owner, now)
    };
    Ok(handle::make(env, t))
}

/// `tracer_discard(owner)`: the tracer of a stats session
/// (`ElixirScope.trace(targets, mode: :stats)`). The VM's `call_time`
/// counters only count in processes that have the `call` trace flag, and a
/// flag needs a tracer: this one records nothing and has `enabled/3`
/// discard every event (a stray trace pattern set by someone else costs
/// the traced code no event). Stopped with `tracer_stop/2` like any tracer.
#[rustler::nif]
fn tracer_discard(env: Env, owner: LocalPid) -> Term {
    let t = TracerRes {
        discard_all: true,
        ..TracerRes::blank(env, owner, now_ns().0)
    };
    handle::make(env, t)
}

/// `[{module, function | :_, arity | :_}]` as `(module, function or 0,
/// arity or -1)`; `None` if malformed.
fn only_patterns(env: Env, list: Term) -> Option<Vec<(u64, u64, i64)>> {
    let any = atoms::underscore().encode(env).as_c_arg();
    let mut out = Vec::new();
    for item in crate::codec::proper_list(list)? {
        let (m, f, a): (Term, Term, Term) = item.decode().ok()?;
        if !m.is_atom() || !f.is_atom() {
            return None;
        }
        let f = if f.as_c_arg() == any {
            0
        } else {
            word(f.as_c_arg())
        };
        let a = if a.as_c_arg() == any {
            -1
        } else {
            a.decode::<i64>().ok()?
        };
        out.push((word(m.as_c_arg()), f, a));
    }
    Some(out)
}

/// erl_tracer `enabled/3`.
#[rustler::nif]
fn enabled<'a>(env: Env<'a>, tag: Term<'a>, state: Term<'a>, _tracee: Term<'a>) -> Term<'a> {
    let Ok(t) = state.decode::<Ref<TracerRes>>() else {
        return atoms::remove().encode(env);
    };
    if !t.active.load(Ordering::Relaxed) {
        return if same(tag, atoms::trace_status()) {
            atoms::remove()
        } else {
            atoms::discard()
        }
        .encode(env);
    }
    if t.discard_all {
        // Stats mode: keep the tracer (trace_status), build no event.
        return if same(tag, atoms::trace_status()) {
            atoms::trace()
        } else {
            atoms::discard()
        }
        .encode(env);
    }
    if same(tag, atoms::call()) || same(tag, atoms::return_from()) {
        return atoms::trace().encode(env);
    }
    // Views of events recorded from the other side, and tags not recorded.
    if same(tag, atoms::spawned())
        || same(tag, atoms::getting_linked())
        || same(tag, atoms::getting_unlinked())
        || same(tag, atoms::register())
        || same(tag, atoms::unregister())
    {
        return atoms::discard().encode(env);
    }
    atoms::trace().encode(env)
}

/// erl_tracer `trace/5`: record one event.
#[rustler::nif]
fn trace<'a>(
    env: Env<'a>,
    tag: Term<'a>,
    state: Term<'a>,
    tracee: Term<'a>,
    term: Term<'a>,
    opts: Term<'a>,
) -> Term<'a> {
    let ok = atoms::ok().encode(env);
    let Ok(t) = state.decode::<Ref<TracerRes>>() else {
        return ok;
    };
    if !t.active.load(Ordering::Relaxed) {
        t.after_stop.fetch_add(1, Ordering::Relaxed);
        return ok;
    }
    let pid = tracee.as_c_arg();
    if !is_immediate(pid) {
        return ok;
    }
    if !t.record {
        // A dry run: what the VM's tracing costs with a tracer that keeps
        // nothing (benchmark baseline).
        t.offered.fetch_add(1, Ordering::Relaxed);
        return ok;
    }
    let kind = if same(tag, atoms::call()) {
        EventKind::FunctionCall
    } else if same(tag, atoms::return_from()) {
        EventKind::FunctionReturn
    } else if same(tag, atoms::exception_from()) {
        EventKind::FunctionException
    } else if same(tag, atoms::send()) || same(tag, atoms::send_to_non_existing_process()) {
        EventKind::MessageSend
    } else if same(tag, atoms::receive()) {
        EventKind::MessageReceive
    } else if same(tag, atoms::spawn()) {
        EventKind::ProcessSpawn
    } else if same(tag, atoms::exit()) {
        EventKind::ProcessExit
    } else if same(tag, atoms::link()) || same(tag, atoms::unlink()) {
        EventKind::ProcessLink
    } else {
        return ok;
    };
    // {M, F, Args | Arity} of a call, {M, F, Arity} of a return or exception.
    let mfa = match kind {
        EventKind::FunctionCall | EventKind::FunctionReturn | EventKind::FunctionException => {
            tuple_items(term)
        }
        _ => &[],
    };
    let (mut module, mut function, mut arity, mut args) = (0, 0, 0, None);
    if let [m, f, a] = *mfa {
        module = imm_word(m);
        function = imm_word(f);
        if let Some(n) = small_int(a) {
            // The `arity` flag's integer (payload: :arity): no argument list.
            arity = n;
        } else {
            // SAFETY: an element of a term of `env`.
            let a = unsafe { Term::new(env, a) };
            arity = call_arity(a);
            args = a.is_list().then_some(a);
        }
    }
    if let Some(only) = &t.only {
        if !mfa.is_empty()
            && !only
                .iter()
                .any(|&(m, f, a)| m == module && (f == 0 || f == function) && (a < 0 || a == arity))
        {
            return ok;
        }
    }
    if t.snapshotting.load(Ordering::Relaxed) && is_snapshot_traffic(env, &t, kind, term, opts) {
        return ok;
    }
    let n = t.offered.fetch_add(1, Ordering::Relaxed) + 1;
    if n > t.max_events {
        t.over_limit.fetch_add(1, Ordering::Relaxed);
        t.trip(env, state, Reason::MaxEvents);
        return ok;
    }
    let now = now_ns();
    if now.0 > t.deadline {
        t.over_limit.fetch_add(1, Ordering::Relaxed);
        t.trip(env, state, Reason::Duration);
        return ok;
    }
    if n & t.check_mask == 0 && t.rate_exceeded(n, now.0) {
        t.over_limit.fetch_add(1, Ordering::Relaxed);
        t.trip(env, state, Reason::MaxRate);
        return ok;
    }
    if t.ring_destroyed.load(Ordering::Relaxed) {
        t.over_limit.fetch_add(1, Ordering::Relaxed);
        t.trip(env, state, Reason::PipelineDown);
        return ok;
    }
    // OTP callbacks of the targets (a binary search, only when states are
    // captured): their calls carry the trigger's hash, their returns are
    // state records (never shed).
    let callback = if !t.callbacks.is_empty()
        && matches!(kind, EventKind::FunctionCall | EventKind::FunctionReturn)
    {
        t.callbacks.lookup(module, function, arity)
    } else {
        0
    };
    let state_record = callback != 0 && kind == EventKind::FunctionReturn;
    if !state_record && !t.shed.admit(kind) {
        t.shed_events.fetch_add(1, Ordering::Relaxed);
        return ok;
    }
    let pid_w = word(pid);
    let ring = &t.shards[shard_of(pid_w, t.shards.len())];
    let full = !t.arity_only;
    let limit = match kind {
        EventKind::FunctionException | EventKind::ProcessExit => t.state_limit,
        EventKind::FunctionReturn if callback != 0 => t.state_limit,
        _ => t.limit,
    };
    let trigger = if callback != 0 && kind == EventKind::FunctionCall {
        args.and_then(|a| otp::trigger(env, callback, function, a))
            .map_or(0, |msg| {
                // The hash a receive of that message carries: after the
                // receiver's pid (9 bytes) under the payload cap, or the
                // phash of the whole message when contents are not kept.
                if full {
                    content_hash(env, msg, t.limit.saturating_sub(9))
                } else {
                    phash_content(msg)
                }
            })
    } else {
        0
    };
    let mut recorded_state = false;
    let res = ring.push_with(|ev| {
        begin(ev, kind, now);
        ev.pid = pid_w;
        if !mfa.is_empty() {
            ev.module = module;
            ev.function = function;
            if kind == EventKind::FunctionCall {
                ev.aux = arity;
            }
        }
        if callback != 0 {
            ev.flags = callback;
            ev.peer = trigger;
        }
        if !full
            && callback == 0
            && matches!(kind, EventKind::FunctionCall | EventKind::FunctionReturn)
        {
            // Arity only: the header says it all (no payload to encode).
            ev.payload.clear();
            return;
        }
        let call_args = if kind == EventKind::FunctionCall && (full || callback != 0) {
            args
        } else {
            None
        };
        if encode_payload(env, ev, limit, |ev, enc| {
            fill(
                env, ev, enc, kind, tracee, term, opts, full, call_args, callback,
            )
        }) {
            t.truncated.fetch_add(1, Ordering::Relaxed);
        }
        recorded_state = state_record && ev.flags & CALLBACK_MASK != 0;
    });
    match res {
        Ok(_) => {
            if recorded_state {
                t.states.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            // A callback's return that may have set a state (its shape is
            // not known without encoding it): the state from then on is
            // unknown.
            if state_record {
                t.state_dropped(pid_w, now.0);
            }
            t.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }
    ok
}

/// While the owner takes snapshots: is this the owner's system message
/// arriving at a traced process, or the reply to it?
fn is_snapshot_traffic<'a>(
    env: Env<'a>,
    t: &TracerRes,
    kind: EventKind,
    term: Term<'a>,
    opts: Term<'a>,
) -> bool {
    match kind {
        EventKind::MessageSend => {
            extra(env, opts).is_some_and(|to| word(to.as_c_arg()) == t.owner_word)
        }
        EventKind::MessageReceive => match tuple_items(term) {
            &[tag, from, _] if word(tag) == word(atoms::system().encode(env).as_c_arg()) => {
                // SAFETY: an element of a term of `env`.
                match tuple_items(unsafe { Term::new(env, from) }) {
                    &[p, _] => word(p) == t.owner_word,
                    _ => false,
                }
            }
            _ => false,
        },
        _ => false,
    }
}

/// The arity in a call's trace term: the integer under the `arity` flag,
/// else the length of the argument list.
#[inline]
fn call_arity(a: Term) -> i64 {
    a.decode::<i64>().unwrap_or_else(|_| list_cells(a, 65_535))
}

/// Header fields beyond the function and payload of one trace event, in
/// the layouts of the Ingestor's events (see `ingest.rs`), with nil for
/// what is not captured; `args` is a call's argument list when captured.
/// An OTP callback's (`callback` != 0) arguments and return value are cut
/// element by element, and its return value is kept in both payload modes
/// (it holds the state), with the parts of the state it sets in the flags.
#[allow(clippy::too_many_arguments)]
#[inline]
fn fill<'a>(
    env: Env<'a>,
    ev: &mut Event,
    enc: &mut TapeEncoder,
    kind: EventKind,
    tracee: Term<'a>,
    term: Term<'a>,
    opts: Term<'a>,
    full: bool,
    args: Option<Term<'a>>,
    callback: u8,
) {
    let nil = atoms::nil().encode(env);
    match kind {
        EventKind::FunctionCall => {
            match args {
                Some(a) if callback != 0 => enc.field_elems(a),
                Some(a) => enc.field(a),
                None => enc.field(nil),
            }
            enc.field(tracee);
            enc.field(nil);
        }
        EventKind::FunctionReturn if callback != 0 => {
            let value = extra(env, opts).unwrap_or(nil);
            let shape = otp::shape(env, callback, value);
            if shape.matched {
                ev.flags |= shape.flags;
            } else {
                // Not a result this callback returns to OTP (a helper of the
                // same name and arity): a plain return.
                ev.flags &= !CALLBACK_MASK;
                ev.peer = 0;
            }
            enc.field_elems(value);
            enc.field(nil);
        }
        EventKind::FunctionReturn => {
            let value = if full { extra(env, opts) } else { None };
            enc.field(value.unwrap_or(nil));
            enc.field(nil);
        }
        EventKind::FunctionException => {
            // {Class, Value}: kept in both modes (a crash's reason).
            match extra(env, opts).map(tuple_items) {
                // SAFETY: elements of a term of `env`.
                Some(&[class, value]) => unsafe {
                    enc.field(Term::new(env, class));
                    enc.field(Term::new(env, value));
                },
                _ => {
                    enc.field(nil);
                    enc.field(nil);
                }
            }
            enc.field(nil);
        }
        EventKind::MessageSend => {
            let to = extra(env, opts).unwrap_or(nil);
            // A send to a registered name: the receive happens in the
            // process behind the name, so match with that pid.
            ev.peer = if to.is_atom() {
                env.whereis_pid(to)
                    .map_or(0, |p| word(p.encode(env).as_c_arg()))
            } else {
                imm_word(to.as_c_arg())
            };
            enc.field(tracee);
            enc.field(to);
            ev.aux = message_field(enc, term, full, nil);
        }
        EventKind::MessageReceive => {
            enc.field(tracee);
            ev.aux = message_field(enc, term, full, nil);
        }
        EventKind::ProcessSpawn => {
            // The tracee is the parent; the term is the child.
            ev.pid = imm_word(term.as_c_arg());
            ev.peer = word(tracee.as_c_arg());
            enc.field(term);
            enc.field(tracee);
        }
        EventKind::ProcessExit => {
            enc.field(tracee);
            enc.field(term);
        }
        EventKind::ProcessLink => {
            ev.peer = imm_word(term.as_c_arg());
            ev.aux = 1;
            enc.field(tracee);
            enc.field(term);
        }
        _ => {}
    }
}

/// Encode a message (or nil when contents are not captured) and return
/// its content hash, the same for its send and its receive.
#[inline]
fn message_field(enc: &mut TapeEncoder, msg: Term, full: bool, nil: Term) -> i64 {
    if full {
        enc.field_hashed(msg) as i64
    } else {
        enc.field(nil);
        phash_content(msg) as i64
    }
}

/// `tracer_stop(tracer, why)`: stop recording, for `why` (`:stopped` or
/// `:duration`) unless it stopped already; returns the reason tracing
/// stopped for (the first one).
#[rustler::nif]
fn tracer_stop<'a>(env: Env<'a>, tracer: Term<'a>, why: Atom) -> NifResult<Atom> {
    let t: Ref<TracerRes> = tracer.decode()?;
    let why = if why == atoms::stopped() {
        Reason::Stopped
    } else if why == atoms::duration() {
        Reason::Duration
    } else {
        return badarg(env, "the stop reason must be :stopped or :duration");
    };
    t.trip(env, tracer, why);
    Ok(Reason::from_u8(t.reason.load(Ordering::Acquire)).atom())
}

/// `tracer_stats(tracer)`: counters and state.
#[rustler::nif]
fn tracer_stats<'a>(env: Env<'a>, t: Ref<TracerRes>) -> NifResult<Term<'a>> {
    let active = t.active.load(Ordering::Acquire);
    let reason = Reason::from_u8(t.reason.load(Ordering::Acquire));
    let m = map_new(env)
        .map_put(atoms::active(), active)?
        .map_put(atoms::reason(), reason.atom())?
        .map_put(atoms::reason_at(), t.stopped_at.load(Ordering::Relaxed))?
        .map_put(atoms::offered(), t.offered.load(Ordering::Relaxed))?
        .map_put(atoms::written(), t.written())?
        .map_put(
            atoms::dropped_full(),
            t.dropped_full.load(Ordering::Relaxed),
        )?
        .map_put(atoms::over_limit(), t.over_limit.load(Ordering::Relaxed))?
        .map_put(atoms::shed(), t.shed_events.load(Ordering::Relaxed))?
        .map_put(atoms::after_stop(), t.after_stop.load(Ordering::Relaxed))?
        .map_put(atoms::truncated(), t.truncated.load(Ordering::Relaxed))?
        .map_put(atoms::states(), t.states.load(Ordering::Relaxed))?
        .map_put(
            atoms::states_dropped(),
            t.states_dropped.load(Ordering::Relaxed),
        )?;
    Ok(m)
}

/// `tracer_snapshotting(tracer, on)`: while on, the owner's system
/// messages to traced processes (and their replies) are not recorded.
#[rustler::nif]
fn tracer_snapshotting(t: Ref<TracerRes>, on: bool) -> Atom {
    t.snapshotting.store(on, Ordering::Release);
    atoms::ok()
}

/// `tracer_snapshot(tracer, state, module, statem)`: called *in* a traced
/// OTP process (from a `:sys.replace_state/2` function, between two of its
/// callbacks), records its state now as a state snapshot (under
/// `max_state_bytes`), in its own ring shard so it takes its place among
/// the process's events. Counted like a traced event; `:ok`, or
/// `{:error, :not_tracing}` once the trace stopped.
#[rustler::nif]
fn tracer_snapshot<'a>(
    env: Env<'a>,
    tracer: Term<'a>,
    state: Term<'a>,
    module: Atom,
    statem: bool,
) -> NifResult<Term<'a>> {
    let t: Ref<TracerRes> = tracer.decode()?;
    if !t.active.load(Ordering::Relaxed) || !t.record {
        return Ok((atoms::error(), atoms::not_tracing()).encode(env));
    }
    let n = t.offered.fetch_add(1, Ordering::Relaxed) + 1;
    if n > t.max_events {
        t.over_limit.fetch_add(1, Ordering::Relaxed);
        t.trip(env, tracer, Reason::MaxEvents);
        return Ok((atoms::error(), atoms::not_tracing()).encode(env));
    }
    let me = env.pid().encode(env);
    let pid_w = word(me.as_c_arg());
    let ring = &t.shards[shard_of(pid_w, t.shards.len())];
    let now = now_ns();
    let nil = atoms::nil().encode(env);
    let res = ring.push_with(|ev| {
        begin(ev, EventKind::StateSnapshot, now);
        ev.pid = pid_w;
        ev.module = word(module.encode(env).as_c_arg());
        if statem {
            ev.flags = FLAG_STATEM;
        }
        if encode_payload(env, ev, t.state_limit, |_, enc| {
            enc.field(me);
            enc.field(state);
            enc.field(atoms::trace_start().encode(env));
            enc.field(nil);
        }) {
            t.truncated.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(match res {
        Ok(_) => {
            t.states.fetch_add(1, Ordering::Relaxed);
            atoms::ok().encode(env)
        }
        Err(_) => {
            t.state_dropped(pid_w, now.0);
            t.dropped_full.fetch_add(1, Ordering::Relaxed);
            (atoms::error(), atoms::buffer_full()).encode(env)
        }
    })
}

/// `tracer_state_drops(tracer)`: `[{pid | :all, first_ts, last_ts}]`, the
/// processes whose state records a full ring dropped and the first and
/// last (monotonic ns) of those (`:all`: processes past the 65,536 kept
/// apart). For `ana_add_state_gaps/2`.
#[rustler::nif]
fn tracer_state_drops<'a>(env: Env<'a>, t: Ref<TracerRes>) -> Term<'a> {
    let d = t.state_drops.lock().unwrap_or_else(|e| e.into_inner());
    let mut out: Vec<Term<'a>> = d
        .by_pid
        .iter()
        .map(|(&pid, &(lo, hi))| {
            // SAFETY: a local pid's word (an immediate) from this VM.
            let p = unsafe { Term::new(env, crate::codec::from_word(pid)) };
            (p, lo, hi).encode(env)
        })
        .collect();
    if let Some((lo, hi)) = d.all {
        out.push((atoms::all(), lo, hi).encode(env));
    }
    out.encode(env)
}
