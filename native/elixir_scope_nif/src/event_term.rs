//! Native event -> Elixir term. Generic events decode their stored term;
//! events built by the Ingestor become the `ElixirScope.Events` structs.
//!
//! Structs are maps of up to 15 keys. `enif_make_map_from_arrays` builds
//! a fresh keys tuple for every map and sorts it (a dozen atom-name
//! compares), which was most of a query's cost per event. A [`Scratch`]
//! made with [`Scratch::for_call`] keeps, per NIF call, one keys tuple per
//! struct [`Shape`] (built and sorted once by the VM), and each struct is
//! then a flatmap sharing it, as the VM's own map literals and map updates
//! do: 16 words per `%FunctionExecution{}` instead of 30, and no sort.
//! This writes the flatmap's words itself, so it is used only when a probe
//! at load found the VM's flatmap layout (see [`probe_shared_keys`]);
//! otherwise, and for a `Scratch::new()`, structs are built with
//! `enif_make_map_from_arrays`.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use elixir_scope_core::{
    is_runtime_struct, Event, EventKind, StoredEvent, CALLBACK_MASK, FLAG_TRUNCATED,
};
use rustler::sys::{
    enif_get_map_value, enif_is_identical, enif_make_map_from_arrays, enif_make_tuple_from_array,
    ErlNifTerm as ERL_NIF_TERM,
};
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::codec::{self, TapeDecoder};

/// Build a struct map from `(key, value)` pairs sorted by key.
pub(crate) fn make_struct<'a>(env: Env<'a>, keys: &[Atom], values: &[ERL_NIF_TERM]) -> Term<'a> {
    debug_assert_eq!(keys.len(), values.len());
    let mut k: [ERL_NIF_TERM; 24] = [ERL_NIF_TERM::default(); 24];
    for (i, a) in keys.iter().enumerate() {
        k[i] = a.encode(env).as_c_arg();
    }
    let mut out: ERL_NIF_TERM = ERL_NIF_TERM::default();
    // SAFETY: both arrays hold `len` valid terms of `env`; keys are distinct.
    let ok = unsafe {
        enif_make_map_from_arrays(
            env.as_c_arg(),
            k.as_ptr(),
            values.as_ptr(),
            keys.len(),
            &mut out,
        )
    };
    if ok == 0 {
        return atoms::undefined().encode(env);
    }
    // SAFETY: built in `env`.
    unsafe { Term::new(env, out) }
}

/// The keys of a struct, in term (sorted) order, interned on first use.
pub(crate) struct Shape {
    /// Slot in [`Scratch`]'s keys cache.
    id: usize,
    keys: fn() -> Vec<Atom>,
    interned: OnceLock<Vec<Atom>>,
}

impl Shape {
    /// A shape of cache slot `id` (unique below [`SHAPES`]) and `keys` in
    /// term order.
    pub(crate) const fn new(id: usize, keys: fn() -> Vec<Atom>) -> Shape {
        Shape {
            id,
            keys,
            interned: OnceLock::new(),
        }
    }

    fn keys(&self) -> &[Atom] {
        self.interned.get_or_init(self.keys)
    }
}

/// Slots of the per-call keys cache (one per [`Shape`]; slot 18 is
/// `corr_nif::CORRELATED_EVENT`).
const SHAPES: usize = 20;
/// A cache slot whose keys tuple could not be used (layout mismatch).
const UNUSABLE: u64 = 1;

/// Shared keys are on (the load probe passed and no bench switched them
/// off).
static SHARED_KEYS: AtomicBool = AtomicBool::new(false);
/// The load probe passed.
static SHARED_KEYS_OK: AtomicBool = AtomicBool::new(false);

/// Scratch stack of terms reused across containers while decoding, and,
/// when made with [`Scratch::for_call`], the keys tuples of the structs
/// built in that call.
pub struct Scratch {
    stack: Vec<ERL_NIF_TERM>,
    /// The env the cached keys tuples live in; 0: no cache.
    env: usize,
    keys: [u64; SHAPES],
}

impl Scratch {
    /// A scratch stack without a keys cache (safe to keep across calls and
    /// with an `OwnedEnv` that gets cleared).
    pub fn new() -> Scratch {
        Scratch {
            stack: Vec::with_capacity(32),
            env: 0,
            keys: [0; SHAPES],
        }
    }

    /// A scratch stack caching struct keys tuples built in `env`. The
    /// cached terms are valid while `env` is, so it must not outlive the
    /// NIF call (or `OwnedEnv` use) it was made for.
    pub fn for_call(env: Env) -> Scratch {
        let mut s = Scratch::new();
        if SHARED_KEYS.load(Ordering::Relaxed) {
            s.env = env.as_c_arg() as usize;
        }
        s
    }

    /// The keys tuple of `shape` in `env`, built on first use; `None`
    /// without a cache for `env`.
    #[inline]
    fn keys_tuple(&mut self, env: Env, shape: &Shape) -> Option<u64> {
        if self.env == 0 || self.env != env.as_c_arg() as usize {
            return None;
        }
        let slot = &mut self.keys[shape.id];
        if *slot == 0 {
            *slot = sorted_keys_tuple(env, shape.keys()).unwrap_or(UNUSABLE);
        }
        (*slot != UNUSABLE).then_some(*slot)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Deref for Scratch {
    type Target = Vec<ERL_NIF_TERM>;
    fn deref(&self) -> &Vec<ERL_NIF_TERM> {
        &self.stack
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<ERL_NIF_TERM> {
        &mut self.stack
    }
}

/// The keys tuple (raw word) of a map the VM builds from `keys`, if the VM
/// kept them in the given order (so values can be laid out in that order).
fn sorted_keys_tuple(env: Env, keys: &[Atom]) -> Option<u64> {
    let n = keys.len();
    if n == 0 || n > 32 || codec::flatmap_header() == 0 {
        return None;
    }
    let k: Vec<ERL_NIF_TERM> = keys.iter().map(|a| a.encode(env).as_c_arg()).collect();
    let mut map = ERL_NIF_TERM::default();
    // SAFETY: `n` valid atoms of `env` as keys and as values.
    if unsafe { enif_make_map_from_arrays(env.as_c_arg(), k.as_ptr(), k.as_ptr(), n, &mut map) }
        == 0
    {
        return None;
    }
    let (size, kp, _) = codec::flatmap_parts(map)?;
    if size != n {
        return None;
    }
    for (i, key) in k.iter().enumerate() {
        // SAFETY: `flatmap_parts` returned `size` keys of a live flatmap.
        if unsafe { *kp.add(i) } != codec::word(*key) {
            return None;
        }
    }
    // SAFETY: a flatmap's third word is its keys tuple (a boxed term).
    let p = (codec::word(map) & !0x3) as *const u64;
    Some(unsafe { *p.add(2) })
}

/// A flatmap of `values` sharing the keys tuple `keys` (`values.len()`
/// keys, sorted, see [`sorted_keys_tuple`]): the words `size, keys,
/// values...` are laid down as a tuple, whose header then becomes the
/// flatmap header.
#[inline]
fn shared_keys_map(env: Env, keys: u64, values: &[ERL_NIF_TERM]) -> ERL_NIF_TERM {
    let n = values.len();
    let mut words = [ERL_NIF_TERM::default(); 34];
    words[0] = codec::from_word(n as u64);
    words[1] = codec::from_word(keys);
    words[2..2 + n].copy_from_slice(values);
    // SAFETY: the tuple's words are copied as they are (no element is
    // read); its header, the only word changed, is replaced before anything
    // else can see the term by the probed flatmap header, whose layout
    // (`header, size, keys, values...`) is exactly these `n + 3` words.
    unsafe {
        let t = enif_make_tuple_from_array(env.as_c_arg(), words.as_ptr(), (n + 2) as u32);
        let p = (codec::word(t) & !0x3) as *mut u64;
        *p = codec::flatmap_header();
        t
    }
}

/// A struct of `shape` from `values` in key order: a map sharing the
/// call's keys tuple when `scratch` caches them, else built by the VM.
#[inline]
pub(crate) fn make_struct_in<'a>(
    env: Env<'a>,
    scratch: &mut Scratch,
    shape: &Shape,
    values: &[ERL_NIF_TERM],
) -> Term<'a> {
    let keys = shape.keys();
    debug_assert_eq!(keys.len(), values.len());
    if keys.len() == values.len() {
        if let Some(kt) = scratch.keys_tuple(env, shape) {
            // SAFETY: built in `env`.
            return unsafe { Term::new(env, shared_keys_map(env, kt, values)) };
        }
    }
    make_struct(env, keys, values)
}

/// Check at load that a map built by [`shared_keys_map`] is identical to
/// the VM's own and that lookups find its values; enables shared keys.
pub fn probe_shared_keys(env: Env) {
    let ok = (|| {
        let mut probe = Scratch::new();
        probe.env = env.as_c_arg() as usize;
        let values: Vec<ERL_NIF_TERM> = (0..FUNCTION_EXECUTION.keys().len())
            .map(|i| (i as i64 * 1_000_003 - 5).encode(env).as_c_arg())
            .collect();
        let kt = probe.keys_tuple(env, &FUNCTION_EXECUTION)?;
        let ours = shared_keys_map(env, kt, &values);
        let vm = make_struct(env, FUNCTION_EXECUTION.keys(), &values).as_c_arg();
        // SAFETY: terms of `env`; out-pointer valid.
        unsafe {
            if enif_is_identical(ours, vm) == 0 {
                return None;
            }
            for (k, v) in FUNCTION_EXECUTION.keys().iter().zip(&values) {
                let mut out = ERL_NIF_TERM::default();
                let key = k.encode(env).as_c_arg();
                if enif_get_map_value(env.as_c_arg(), ours, key, &mut out) == 0
                    || codec::word(out) != codec::word(*v)
                {
                    return None;
                }
            }
        }
        Some(())
    })()
    .is_some();
    SHARED_KEYS_OK.store(ok, Ordering::Relaxed);
    SHARED_KEYS.store(ok, Ordering::Relaxed);
}

/// Switch shared keys off (`false`, the `enif_make_map_from_arrays` path)
/// or back on (if the load probe allowed them); for same-run benches.
/// Returns whether they are on.
pub fn set_shared_keys(on: bool) -> bool {
    let on = on && SHARED_KEYS_OK.load(Ordering::Relaxed);
    SHARED_KEYS.store(on, Ordering::Relaxed);
    on
}

/// Bench switch (`ElixirScope.Native.debug_shared_struct_keys/1`): `true`
/// builds result structs with shared keys (the default when the load probe
/// passed), `false` with `enif_make_map_from_arrays`, the path before
/// #15; returns whether shared keys are now on. The results are equal.
#[rustler::nif]
fn debug_shared_struct_keys(on: bool) -> bool {
    set_shared_keys(on)
}

/// `%FunctionExecution{}` keys in term order.
static FUNCTION_EXECUTION: Shape = Shape::new(0, || {
    vec![
        atoms::struct_(),
        atoms::args(),
        atoms::arity(),
        atoms::caller_pid(),
        atoms::correlation_id(),
        atoms::duration_ns(),
        atoms::event_type(),
        atoms::function(),
        atoms::id(),
        atoms::module(),
        atoms::return_value(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// `%PerformanceMetric{}`.
static PERFORMANCE_METRIC: Shape = Shape::new(2, || {
    vec![
        atoms::struct_(),
        atoms::id(),
        atoms::metadata(),
        atoms::metric_name(),
        atoms::metric_type(),
        atoms::source_context(),
        atoms::timestamp(),
        atoms::unit(),
        atoms::value(),
        atoms::wall_time(),
    ]
});

/// `%ErrorEvent{}`.
static ERROR_EVENT: Shape = Shape::new(3, || {
    vec![
        atoms::struct_(),
        atoms::context(),
        atoms::error_class(),
        atoms::error_message(),
        atoms::error_type(),
        atoms::id(),
        atoms::recovery_action(),
        atoms::stacktrace(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// `%ProcessEvent{}`.
static PROCESS_EVENT: Shape = Shape::new(5, || {
    vec![
        atoms::struct_(),
        atoms::event_type(),
        atoms::id(),
        atoms::linked_pid(),
        atoms::parent_pid(),
        atoms::pid(),
        atoms::reason(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// `%MessageEvent{}`.
static MESSAGE_EVENT: Shape = Shape::new(6, || {
    vec![
        atoms::struct_(),
        atoms::event_type(),
        atoms::from_pid(),
        atoms::id(),
        atoms::message(),
        atoms::timestamp(),
        atoms::to_pid(),
        atoms::wall_time(),
    ]
});

/// `%ElixirScope.Analysis.Entry{}`.
static ANALYSIS_ENTRY: Shape = Shape::new(7, || {
    vec![
        atoms::struct_(),
        atoms::arity(),
        atoms::call_id(),
        atoms::data(),
        atoms::duration_ns(),
        atoms::function(),
        atoms::id(),
        atoms::link_id(),
        atoms::module(),
        atoms::parent_id(),
        atoms::peer(),
        atoms::pid(),
        atoms::timestamp(),
        atoms::truncated(),
        atoms::type_(),
    ]
});

/// The correlated-event map (`%{event, id, correlation_id, parent_id,
/// root_id, links, correlation_type, timestamp}`), keys in term order.
pub(crate) static CORRELATED: Shape = Shape::new(8, || {
    vec![
        atoms::correlation_id(),
        atoms::correlation_type(),
        atoms::event(),
        atoms::id(),
        atoms::links(),
        atoms::parent_id(),
        atoms::root_id(),
        atoms::timestamp(),
    ]
});

/// `{a, b}` of two terms of `env`.
fn pair(env: Env, a: ERL_NIF_TERM, b: ERL_NIF_TERM) -> ERL_NIF_TERM {
    // SAFETY: the caller passes terms built in (or valid in) `env`.
    unsafe { rustler::types::tuple::make_tuple(env, &[Term::new(env, a), Term::new(env, b)]) }
        .as_c_arg()
}

/// The term of a stored header word (nil for none; see
/// `portable::word_term` for keys of foreign pids).
#[inline]
fn word_or_nil(env: Env, w: u64) -> ERL_NIF_TERM {
    crate::portable::word_term(env, w)
}

/// The fields of an event that its term is built from, borrowed from a
/// ring [`Event`] or a stored record (no payload copy).
pub struct EvView<'p> {
    pub id: u64,
    pub pid: u64,
    pub timestamp: i64,
    pub wall_time: i64,
    pub module: u64,
    pub function: u64,
    pub aux: i64,
    pub kind: u8,
    pub flags: u8,
    pub payload: &'p [u8],
}

impl EvView<'_> {
    fn kind(&self) -> EventKind {
        EventKind::from_u8(self.kind)
    }
}

impl<'p> From<&'p Event> for EvView<'p> {
    fn from(ev: &'p Event) -> Self {
        EvView {
            id: ev.id,
            pid: ev.pid,
            timestamp: ev.timestamp,
            wall_time: ev.wall_time,
            module: ev.module,
            function: ev.function,
            aux: ev.aux,
            kind: ev.kind,
            flags: ev.flags,
            payload: &ev.payload,
        }
    }
}

impl<'p> From<&StoredEvent<'p>> for EvView<'p> {
    fn from(ev: &StoredEvent<'p>) -> Self {
        EvView {
            id: ev.id,
            pid: ev.pid,
            timestamp: ev.timestamp,
            wall_time: ev.wall_time,
            module: ev.module,
            function: ev.function,
            aux: ev.aux,
            kind: ev.kind,
            flags: ev.flags,
            payload: ev.payload,
        }
    }
}

/// The Elixir term for a ring event.
pub fn event_to_term<'a>(env: Env<'a>, ev: &Event, scratch: &mut Scratch) -> Term<'a> {
    view_to_term(env, &EvView::from(ev), scratch)
}

/// The Elixir term for an event's fields.
pub fn view_to_term<'a>(env: Env<'a>, ev: &EvView, scratch: &mut Scratch) -> Term<'a> {
    if is_runtime_struct(ev.kind, ev.flags) {
        if let Some(t) = crate::runtime_structs::decode(env, ev.kind(), ev.aux, ev.payload, scratch)
        {
            return t;
        }
    }
    let mut d = TapeDecoder::new(ev.payload);
    let mut next = |scratch: &mut Scratch| d.next(env, scratch).as_c_arg();
    let e = |t: Term<'a>| t.as_c_arg();
    let nil = atoms::nil().encode(env).as_c_arg();
    let id = e(ev.id.encode(env));
    let ts = e(ev.timestamp.encode(env));
    let wall = e(ev.wall_time.encode(env));
    match ev.kind() {
        EventKind::Term => d_next_term(env, ev, scratch),
        EventKind::FunctionCall => {
            let args = next(scratch);
            // No payload: a traced call recorded with its arity only; the
            // caller is the event's process.
            let caller = if ev.payload.is_empty() {
                word_or_nil(env, ev.pid)
            } else {
                next(scratch)
            };
            let corr = next(scratch);
            make_struct_in(
                env,
                scratch,
                &FUNCTION_EXECUTION,
                &[
                    e(atoms::function_execution().encode(env)),
                    args,
                    e(ev.aux.encode(env)),
                    caller,
                    corr,
                    nil,
                    e(atoms::call().encode(env)),
                    word_or_nil(env, ev.function),
                    id,
                    word_or_nil(env, ev.module),
                    nil,
                    ts,
                    wall,
                ],
            )
        }
        EventKind::FunctionReturn => {
            let ret = next(scratch);
            let corr = next(scratch);
            function_exit(
                env,
                scratch,
                atoms::return_(),
                id,
                ret,
                ev.aux,
                corr,
                ts,
                wall,
            )
        }
        EventKind::FunctionException => {
            let kind = next(scratch);
            let reason = next(scratch);
            let corr = next(scratch);
            let value = pair(env, kind, reason);
            function_exit(
                env,
                scratch,
                atoms::exception(),
                id,
                value,
                ev.aux,
                corr,
                ts,
                wall,
            )
        }
        EventKind::ProcessSpawn => {
            let child = next(scratch);
            let parent = next(scratch);
            process_event(
                env,
                scratch,
                atoms::spawn(),
                id,
                parent,
                child,
                nil,
                ts,
                wall,
            )
        }
        EventKind::ProcessExit => {
            let pid = next(scratch);
            let reason = next(scratch);
            process_event(env, scratch, atoms::exit(), id, nil, pid, reason, ts, wall)
        }
        EventKind::ProcessLink => {
            let pid = next(scratch);
            let other = next(scratch);
            let kind = if ev.aux == 0 {
                atoms::unlink()
            } else {
                atoms::link()
            };
            process_event_with(env, scratch, kind, id, nil, pid, nil, other, ts, wall)
        }
        EventKind::MessageSend => {
            let from = next(scratch);
            let to = next(scratch);
            let msg = next(scratch);
            message_event(env, scratch, atoms::send(), id, from, to, msg, ts, wall)
        }
        EventKind::MessageReceive => {
            let to = next(scratch);
            let msg = next(scratch);
            message_event(env, scratch, atoms::receive(), id, nil, to, msg, ts, wall)
        }
        EventKind::StateChange => {
            crate::runtime_structs::state_change(env, ev.payload, [id, ts, wall], ev.aux, scratch)
        }
        EventKind::PerformanceMetric => {
            let name = next(scratch);
            let value = next(scratch);
            let meta = next(scratch);
            // __struct__ id metadata metric_name metric_type source_context
            // timestamp unit value wall_time
            make_struct_in(
                env,
                scratch,
                &PERFORMANCE_METRIC,
                &[
                    e(atoms::performance_metric().encode(env)),
                    id,
                    meta,
                    name,
                    nil,
                    nil,
                    ts,
                    nil,
                    value,
                    wall,
                ],
            )
        }
        EventKind::Error => {
            let etype = next(scratch);
            let msg = next(scratch);
            let stack = next(scratch);
            // __struct__ context error_class error_message error_type id
            // recovery_action stacktrace timestamp wall_time
            make_struct_in(
                env,
                scratch,
                &ERROR_EVENT,
                &[
                    e(atoms::error_event().encode(env)),
                    nil,
                    e(atoms::unknown().encode(env)),
                    msg,
                    etype,
                    id,
                    nil,
                    stack,
                    ts,
                    wall,
                ],
            )
        }
        EventKind::StateSnapshot => {
            crate::runtime_structs::snapshot(env, ev.payload, ts, wall, scratch)
        }
        EventKind::Empty => atoms::undefined().encode(env),
    }
}

/// `%FunctionExecution{}` of a return or an exception (`event_type`).
#[allow(clippy::too_many_arguments)]
fn function_exit<'a>(
    env: Env<'a>,
    scratch: &mut Scratch,
    event_type: Atom,
    id: ERL_NIF_TERM,
    value: ERL_NIF_TERM,
    duration_ns: i64,
    corr: ERL_NIF_TERM,
    ts: ERL_NIF_TERM,
    wall: ERL_NIF_TERM,
) -> Term<'a> {
    let nil = atoms::nil().encode(env).as_c_arg();
    make_struct_in(
        env,
        scratch,
        &FUNCTION_EXECUTION,
        &[
            atoms::function_execution().encode(env).as_c_arg(),
            nil,
            nil,
            nil,
            corr,
            duration_ns.encode(env).as_c_arg(),
            event_type.encode(env).as_c_arg(),
            nil,
            id,
            nil,
            value,
            ts,
            wall,
        ],
    )
}

/// `%ProcessEvent{}`.
#[allow(clippy::too_many_arguments)]
fn process_event<'a>(
    env: Env<'a>,
    scratch: &mut Scratch,
    kind: Atom,
    id: ERL_NIF_TERM,
    parent: ERL_NIF_TERM,
    pid: ERL_NIF_TERM,
    reason: ERL_NIF_TERM,
    ts: ERL_NIF_TERM,
    wall: ERL_NIF_TERM,
) -> Term<'a> {
    let nil = atoms::nil().encode(env).as_c_arg();
    process_event_with(env, scratch, kind, id, parent, pid, reason, nil, ts, wall)
}

/// `%ProcessEvent{}` with a `linked_pid` (link and unlink events).
#[allow(clippy::too_many_arguments)]
fn process_event_with<'a>(
    env: Env<'a>,
    scratch: &mut Scratch,
    kind: Atom,
    id: ERL_NIF_TERM,
    parent: ERL_NIF_TERM,
    pid: ERL_NIF_TERM,
    reason: ERL_NIF_TERM,
    linked: ERL_NIF_TERM,
    ts: ERL_NIF_TERM,
    wall: ERL_NIF_TERM,
) -> Term<'a> {
    make_struct_in(
        env,
        scratch,
        &PROCESS_EVENT,
        &[
            atoms::process_event().encode(env).as_c_arg(),
            kind.encode(env).as_c_arg(),
            id,
            linked,
            parent,
            pid,
            reason,
            ts,
            wall,
        ],
    )
}

/// `%MessageEvent{}`.
#[allow(clippy::too_many_arguments)]
fn message_event<'a>(
    env: Env<'a>,
    scratch: &mut Scratch,
    kind: Atom,
    id: ERL_NIF_TERM,
    from: ERL_NIF_TERM,
    to: ERL_NIF_TERM,
    msg: ERL_NIF_TERM,
    ts: ERL_NIF_TERM,
    wall: ERL_NIF_TERM,
) -> Term<'a> {
    // __struct__ event_type from_pid id message timestamp to_pid wall_time
    make_struct_in(
        env,
        scratch,
        &MESSAGE_EVENT,
        &[
            atoms::message_event().encode(env).as_c_arg(),
            kind.encode(env).as_c_arg(),
            from,
            id,
            msg,
            ts,
            to,
            wall,
        ],
    )
}

fn d_next_term<'a>(env: Env<'a>, ev: &EvView, scratch: &mut Scratch) -> Term<'a> {
    TapeDecoder::new(ev.payload).next(env, scratch)
}

/// `%ElixirScope.Analysis.Entry{}` of a stored event: the plain record the
/// analysis functions return (see that module for the fields).
pub fn entry_term<'a>(env: Env<'a>, ev: &StoredEvent, scratch: &mut Scratch) -> Term<'a> {
    let e = |t: Term<'a>| t.as_c_arg();
    let nil = atoms::nil().encode(env).as_c_arg();
    let mut d = TapeDecoder::new(ev.payload);
    let mut next = |scratch: &mut Scratch| d.next(env, scratch).as_c_arg();
    let mut pid = word_or_nil(env, ev.pid);
    let mut peer = nil;
    let mut data = nil;
    let mut arity = nil;
    let mut duration = nil;
    let mut link_id = nil;
    let (module, function) = (word_or_nil(env, ev.module), word_or_nil(env, ev.function));
    // The call an event belongs to: a call's own id, the call a return
    // completes, else the enclosing call.
    let mut call_id = if ev.parent_id == 0 {
        nil
    } else {
        e(ev.parent_id.encode(env))
    };
    let typ = match EventKind::from_u8(ev.kind) {
        EventKind::FunctionCall => {
            data = next(scratch);
            arity = e(ev.aux.encode(env));
            call_id = e(ev.id.encode(env));
            atoms::call()
        }
        EventKind::FunctionReturn | EventKind::FunctionException => {
            let exception = ev.kind == EventKind::FunctionException as u8;
            data = if exception {
                let class = next(scratch);
                let reason = next(scratch);
                pair(env, class, reason)
            } else {
                next(scratch)
            };
            duration = e(ev.aux.encode(env));
            call_id = if ev.correlation_id != ev.id {
                e(ev.correlation_id.encode(env))
            } else {
                nil
            };
            if exception {
                atoms::exception()
            } else {
                atoms::return_()
            }
        }
        EventKind::MessageSend => {
            let _from = next(scratch);
            peer = next(scratch);
            data = next(scratch);
            atoms::send()
        }
        EventKind::MessageReceive => {
            let _to = next(scratch);
            data = next(scratch);
            if ev.correlation_id != ev.id {
                link_id = e(ev.correlation_id.encode(env));
            }
            atoms::receive()
        }
        EventKind::ProcessSpawn => {
            pid = next(scratch);
            peer = next(scratch);
            atoms::spawn()
        }
        EventKind::ProcessExit => {
            let _pid = next(scratch);
            data = next(scratch);
            atoms::exit()
        }
        EventKind::ProcessLink => {
            let _pid = next(scratch);
            peer = next(scratch);
            if ev.aux == 0 {
                atoms::unlink()
            } else {
                atoms::link()
            }
        }
        EventKind::StateChange => {
            pid = next(scratch);
            let old = next(scratch);
            let new = next(scratch);
            data = pair(env, old, new);
            atoms::state_change_type()
        }
        EventKind::StateSnapshot => {
            pid = next(scratch);
            data = next(scratch);
            atoms::state_snapshot_type()
        }
        _ => {
            data = view_to_term(env, &EvView::from(ev), scratch).as_c_arg();
            atoms::event()
        }
    };
    let parent = if ev.parent_id == 0 {
        nil
    } else {
        e(ev.parent_id.encode(env))
    };
    // An OTP callback's call and return: the event that triggered it.
    if ev.flags & CALLBACK_MASK != 0
        && ev.peer != 0
        && matches!(
            EventKind::from_u8(ev.kind),
            EventKind::FunctionCall | EventKind::FunctionReturn
        )
    {
        link_id = e(ev.peer.encode(env));
    }
    let truncated = e((ev.flags & FLAG_TRUNCATED != 0).encode(env));
    // Keys in term (alphabetical) order.
    make_struct_in(
        env,
        scratch,
        &ANALYSIS_ENTRY,
        &[
            e(atoms::analysis_entry().encode(env)),
            arity,
            call_id,
            data,
            duration,
            function,
            e(ev.id.encode(env)),
            link_id,
            module,
            parent,
            peer,
            pid,
            e(ev.timestamp.encode(env)),
            truncated,
            e(typ.encode(env)),
        ],
    )
}
