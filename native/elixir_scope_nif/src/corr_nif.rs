//! `corr_*` NIFs: the `ElixirScope.Capture.EventCorrelator` resource, a
//! [`Tracker`] (correlator plus per-correlation records) behind a mutex,
//! fed straight from `ElixirScope.Events` structs.
//!
//! Event fields are read here with `codec::map_get_immediate` (a scan of a
//! struct's keys on the heap, or `enif_get_map_value`) and results are
//! built as `%CorrelatedEvent{}` maps with `enif_make_map_from_arrays`; no
//! intermediate Elixir terms are made.
//!
//! # Keys
//!
//! The correlator works on `u64` keys; terms map to them as follows.
//!
//! * **Event ids.** An integer in `0..2^63` is its own key. `nil` (or an
//!   event struct without an id field) gets the fresh key
//!   `2^62 + next_event_id()`, returned as that integer. Any other term
//!   (strings, negative or huge integers, tuples...) gets `2^63 | hash`
//!   (`:erlang.phash2/1` and the VM's internal hash, 59 bits) and the term
//!   is kept (external term format, at most `max_correlations` of them, each
//!   at most [`MAX_KEPT_TERM_BYTES`]) so results show the original term; a
//!   forgotten or oversized one shows as the key.
//! * **Correlation keys** (a call's `correlation_id` / `call_id`): `nil` is
//!   no key, an integer `i` in `0..2^63` is `i + 1`, anything else is
//!   hashed as above.
//! * **Pids.** `nil` is [`UNKNOWN_PID`]; an immediate term (a local pid,
//!   an atom such as a registered name, a small integer) is its raw word;
//!   anything else (a remote pid) is `2^63 | hash << 2` and kept like ids.
//! * **Messages** are matched by `:erlang.phash2/1` of the message.
//!
//! # Scheduling
//!
//! `corr_batch` runs on a normal scheduler for lists of at most [`CHUNK`]
//! events: it takes the lock with `try_lock` (answering `:busy` if it is
//! held) and stops after [`BUDGET_NORMAL`]. Longer lists, and retries, go
//! to `corr_batch_dirty`, which builds the whole result list in one call
//! and takes the lock per [`CHUNK_DIRTY`] events. On 100k-event batches
//! one dirty call measured as fast as or faster than 1,000-event chunks
//! joined in Elixir (the join allocates while the whole result is live and
//! adds GC), and needs no join. Both check that the list is proper before
//! correlating anything. Everything else that locks runs on a dirty CPU
//! scheduler.

use elixir_scope_core::correlator::{
    CorrInput, CorrKind, CorrRecord, CorrType, Correlation, CorrelatorConfig, Link, LinkKind,
    Tracker, UNKNOWN_PID,
};
use elixir_scope_core::next_event_id;
use rustler::sys::{
    enif_get_uint64, enif_make_double, enif_make_map_from_arrays, enif_make_tuple_from_array,
    enif_make_uint64, enif_monotonic_time, ErlNifResourceType, ErlNifTerm as ERL_NIF_TERM,
    ErlNifTimeUnit,
};
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::collections::{HashMap, VecDeque};
use std::ffi::CStr;
use std::sync::atomic::AtomicPtr;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crate::codec::{from_word, is_immediate, word};
use crate::error::badarg;
use crate::handle::{self, Handle, Ref};

/// Longest list `corr_batch` (normal scheduler) handles.
pub const CHUNK: usize = 1000;
/// `corr_batch` stops after this long even if its list is not done.
pub const BUDGET_NORMAL: Duration = Duration::from_micros(600);
/// Events `corr_batch_dirty` correlates per lock acquisition.
const CHUNK_DIRTY: usize = 10_000;
/// Id terms larger than this (external format) are not kept: results show
/// their integer key.
const MAX_KEPT_TERM_BYTES: usize = 4096;
/// Largest `max_correlations` accepted.
pub const MAX_CORRELATIONS_LIMIT: i64 = 1 << 28;

const HASHED: u64 = 1 << 63;
const FRESH: u64 = 1 << 62;

mod names {
    rustler::atoms! {
        nil,
        busy,
        large,
        struct_ = "__struct__",
        // Event structs
        events = "Elixir.ElixirScope.Events",
        function_execution_mod = "Elixir.ElixirScope.Events.FunctionExecution",
        function_entry_mod = "Elixir.ElixirScope.Events.FunctionEntry",
        function_exit_mod = "Elixir.ElixirScope.Events.FunctionExit",
        message_event_mod = "Elixir.ElixirScope.Events.MessageEvent",
        message_send_mod = "Elixir.ElixirScope.Events.MessageSend",
        message_receive_mod = "Elixir.ElixirScope.Events.MessageReceive",
        message_sent_mod = "Elixir.ElixirScope.Events.MessageSent",
        message_received_mod = "Elixir.ElixirScope.Events.MessageReceived",
        callback_reply_mod = "Elixir.ElixirScope.Events.CallbackReply",
        process_event_mod = "Elixir.ElixirScope.Events.ProcessEvent",
        process_spawn_mod = "Elixir.ElixirScope.Events.ProcessSpawn",
        process_exit_mod = "Elixir.ElixirScope.Events.ProcessExit",
        state_change_mod = "Elixir.ElixirScope.Events.StateChange",
        correlated_event = "Elixir.ElixirScope.Capture.EventCorrelator.CorrelatedEvent",
        // Event fields
        event_id,
        id,
        data,
        pid,
        event_type,
        caller_pid,
        correlation_id,
        call_id,
        exit_reason,
        normal,
        from_pid,
        to_pid,
        message,
        sender_pid,
        receiver_pid,
        parent_pid,
        spawned_pid,
        child_pid,
        exited_pid,
        server_pid,
        message_sent,
        message_received,
        callback_reply,
        // Event types
        call,
        return_ = "return",
        exception,
        send,
        receive,
        spawn,
        exit,
        function_entry,
        function_exit,
        function_call,
        function_return,
        message_send,
        message_receive,
        process_spawn,
        process_exit,
        state_change,
        unknown,
        // %CorrelatedEvent{} keys
        correlated_at,
        correlation_confidence,
        correlation_type,
        event,
        links,
        parent_id,
        root_id,
        // Links
        called_from,
        completes,
        receives,
        spawned_by,
        state_in,
        // Metadata keys
        type_ = "type",
        created_at,
        peer,
        confidence,
        completed_by,
        received_by,
    }
}

/// Terms behind hashed keys, kept in external term format so results can
/// show them; at most `max` (oldest forgotten first).
struct TermTable {
    map: HashMap<u64, Box<[u8]>>,
    order: VecDeque<u64>,
    max: usize,
    bytes: usize,
}

impl TermTable {
    fn remember(&mut self, key: u64, t: Term) {
        if self.map.contains_key(&key) {
            return;
        }
        let bin = t.to_binary();
        if bin.len() > MAX_KEPT_TERM_BYTES {
            return; // shown as its integer key
        }
        let bytes: Box<[u8]> = bin.as_slice().into();
        self.bytes += bytes.len();
        self.map.insert(key, bytes);
        self.order.push_back(key);
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                if let Some(b) = self.map.remove(&old) {
                    self.bytes -= b.len();
                }
            }
        }
    }

    fn get<'a>(&self, env: Env<'a>, key: u64) -> Option<Term<'a>> {
        let bytes = self.map.get(&key)?;
        env.binary_to_term(bytes).map(|(t, _)| t)
    }
}

struct State {
    tracker: Tracker,
    terms: TermTable,
    /// Time spent correlating (decode + correlate + build), ns, and the
    /// events it covers.
    busy_ns: u64,
    timed: u64,
    sweeps: u64,
}

/// The correlator resource behind `ElixirScope.Capture.EventCorrelator`.
pub struct CorrRes {
    state: Mutex<State>,
    max: usize,
    ttl_ns: i64,
}

static CORR_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for CorrRes {
    const NAME: &'static CStr = c"elixir_scope_correlator";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &CORR_TYPE
    }
    fn drop_off_scheduler(&self) -> bool {
        // Nobody else can hold the lock while the resource is destroyed.
        self.state.try_lock().is_ok_and(|s| {
            s.tracker.metrics().records > 10_000 || s.tracker.correlator().active() > 10_000
        })
    }
}

impl CorrRes {
    /// The locked state; a poisoned lock is recovered (the tracker is
    /// consistent between events).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

fn monotonic_ns() -> i64 {
    // SAFETY: a plain read of the VM clock, callable from any thread.
    unsafe { enif_monotonic_time(ErlNifTimeUnit::ERL_NIF_NSEC) }
}

// ---- term helpers ------------------------------------------------------------

#[inline]
fn atom_word(a: Atom) -> u64 {
    word(a.as_c_arg())
}

#[inline]
fn is_nil(t: Term) -> bool {
    word(t.as_c_arg()) == atom_word(names::nil())
}

/// `map[key]` if `m` is a map holding `key` with a non-nil value.
#[inline]
fn field<'a>(m: Term<'a>, key: Atom) -> Option<Term<'a>> {
    let env = m.get_env();
    let out = crate::codec::map_get_immediate(env, m.as_c_arg(), key.as_c_arg())?;
    // SAFETY: a term of `env` (a value of the map `m`).
    let t = unsafe { Term::new(env, out) };
    (!is_nil(t)).then_some(t)
}

/// The first non-nil of `keys` in `m`.
#[inline]
fn first_field<'a>(m: Term<'a>, keys: &[Atom]) -> Option<Term<'a>> {
    keys.iter().find_map(|&k| field(m, k))
}

#[inline]
fn get_u64(t: Term) -> Option<u64> {
    let mut v: u64 = 0;
    // SAFETY: valid env and term, live out-pointer.
    (unsafe { enif_get_uint64(t.get_env().as_c_arg(), t.as_c_arg(), &mut v) } != 0).then_some(v)
}

/// A 59-bit hash of any term: `:erlang.phash2/1` (27 bits) and the VM's
/// internal hash (32 bits).
#[inline]
fn hash59(t: Term) -> u64 {
    ((t.hash_phash2() as u64) << 32) | (t.hash_internal(0x5EED) & 0xFFFF_FFFF)
}

impl State {
    /// The key of an id term (see the module docs); `None` for `nil`.
    fn id_key(&mut self, t: Option<Term>) -> Option<u64> {
        let t = t?;
        match get_u64(t) {
            Some(v) if v < HASHED => Some(v),
            _ => {
                let k = HASHED | hash59(t);
                self.terms.remember(k, t);
                Some(k)
            }
        }
    }

    /// The correlation key of a call/return's correlation term (0: none).
    fn corr_key(&mut self, t: Option<Term>) -> u64 {
        match t {
            None => 0,
            Some(t) => match get_u64(t) {
                Some(v) if v < HASHED => v + 1,
                _ => self.id_key(Some(t)).unwrap_or(0),
            },
        }
    }

    fn pid_key(&mut self, t: Option<Term>) -> u64 {
        let Some(t) = t else {
            return UNKNOWN_PID;
        };
        let w = word(t.as_c_arg());
        if is_immediate(t.as_c_arg()) {
            return w;
        }
        let k = HASHED | (hash59(t) << 2);
        self.terms.remember(k, t);
        k
    }

    /// The term of an id key.
    fn id_term<'a>(&self, env: Env<'a>, key: u64) -> ERL_NIF_TERM {
        if key >= HASHED {
            if let Some(t) = self.terms.get(env, key) {
                return t.as_c_arg();
            }
        }
        // SAFETY: valid env.
        unsafe { enif_make_uint64(env.as_c_arg(), key) }
    }

    fn opt_id_term(&self, env: Env, key: Option<u64>) -> ERL_NIF_TERM {
        match key {
            Some(k) => self.id_term(env, k),
            None => names::nil().as_c_arg(),
        }
    }

    /// The term of a pid key (`nil` if unknown or forgotten).
    fn pid_term(&self, env: Env, key: u64) -> ERL_NIF_TERM {
        let raw = from_word(key);
        if key != UNKNOWN_PID && is_immediate(raw) {
            return raw;
        }
        if key >= HASHED {
            if let Some(t) = self.terms.get(env, key) {
                return t.as_c_arg();
            }
        }
        names::nil().as_c_arg()
    }

    fn link_term(&self, env: Env, l: Link) -> ERL_NIF_TERM {
        let (kind, target) = match l.kind {
            LinkKind::CalledFrom => (names::called_from(), self.id_term(env, l.target)),
            LinkKind::Completes => (names::completes(), self.id_term(env, l.target)),
            LinkKind::Receives => (names::receives(), self.id_term(env, l.target)),
            LinkKind::SpawnedBy => (names::spawned_by(), self.pid_term(env, l.target)),
            LinkKind::StateIn => (names::state_in(), self.id_term(env, l.target)),
        };
        tuple2(env, kind.as_c_arg(), target)
    }
}

fn tuple2(env: Env, a: ERL_NIF_TERM, b: ERL_NIF_TERM) -> ERL_NIF_TERM {
    let elems = [a, b];
    // SAFETY: two valid terms of `env`.
    unsafe { enif_make_tuple_from_array(env.as_c_arg(), elems.as_ptr(), 2) }
}

fn make_list(env: Env, terms: &[ERL_NIF_TERM]) -> ERL_NIF_TERM {
    crate::codec::make_list(env, terms).as_c_arg()
}

/// A map of distinct `keys` to `values` (both valid terms of `env`).
fn make_map(env: Env, keys: &[ERL_NIF_TERM], values: &[ERL_NIF_TERM]) -> ERL_NIF_TERM {
    debug_assert_eq!(keys.len(), values.len());
    let mut out = ERL_NIF_TERM::default();
    // SAFETY: both arrays hold `len` valid terms of `env`; keys are distinct.
    let ok = unsafe {
        enif_make_map_from_arrays(
            env.as_c_arg(),
            keys.as_ptr(),
            values.as_ptr(),
            keys.len(),
            &mut out,
        )
    };
    if ok == 0 {
        names::nil().as_c_arg()
    } else {
        out
    }
}

fn type_atom(t: CorrType) -> Atom {
    match t {
        CorrType::FunctionCall => names::function_call(),
        CorrType::FunctionReturn => names::function_return(),
        CorrType::MessageSend => names::message_send(),
        CorrType::MessageReceive => names::message_receive(),
        CorrType::ProcessSpawn => names::process_spawn(),
        CorrType::ProcessExit => names::process_exit(),
        CorrType::StateChange => names::state_change(),
        CorrType::Unknown => names::unknown(),
    }
}

// ---- decoding events -----------------------------------------------------------

/// The fields of one event that correlation uses (`None`: absent or nil).
#[derive(Default)]
struct Fields<'a> {
    kind: Option<CorrKind>,
    id: Option<Term<'a>>,
    pid: Option<Term<'a>>,
    peer: Option<Term<'a>>,
    corr: Option<Term<'a>>,
    msg: Option<Term<'a>>,
}

/// Fields of one of the `ElixirScope.Events` data structs (`module` is its
/// `__struct__`), or `None` if `module` is not one of them.
fn data_fields<'a>(module: u64, m: Term<'a>) -> Option<Fields<'a>> {
    use names as n;
    let is = |a: Atom| module == atom_word(a);
    let et = || field(m, n::event_type()).map(|t| word(t.as_c_arg()));
    let mut f = Fields::default();
    if is(n::function_execution_mod()) {
        f.id = field(m, n::id());
        f.pid = field(m, n::caller_pid());
        f.corr = field(m, n::correlation_id());
        f.kind = match et() {
            Some(w) if w == atom_word(n::call()) => Some(CorrKind::Call),
            Some(w) if w == atom_word(n::return_()) => Some(CorrKind::Return),
            Some(w) if w == atom_word(n::exception()) => Some(CorrKind::Exception),
            _ => None,
        };
    } else if is(n::function_entry_mod()) {
        f.kind = Some(CorrKind::Call);
        f.corr = field(m, n::call_id());
    } else if is(n::function_exit_mod()) {
        f.corr = field(m, n::call_id());
        f.kind = match field(m, n::exit_reason()) {
            Some(r) if word(r.as_c_arg()) != atom_word(n::normal()) => Some(CorrKind::Exception),
            _ => Some(CorrKind::Return),
        };
    } else if is(n::message_event_mod()) {
        f.id = field(m, n::id());
        f.msg = field(m, n::message());
        match et() {
            Some(w) if w == atom_word(n::send()) => {
                f.kind = Some(CorrKind::Send);
                f.pid = field(m, n::from_pid());
                f.peer = field(m, n::to_pid());
            }
            Some(w) if w == atom_word(n::receive()) => {
                f.kind = Some(CorrKind::Receive);
                f.pid = field(m, n::to_pid());
            }
            _ => {}
        }
    } else if is(n::message_send_mod()) {
        f.kind = Some(CorrKind::Send);
        f.pid = field(m, n::sender_pid());
        f.peer = field(m, n::receiver_pid());
        f.msg = field(m, n::message());
    } else if is(n::message_receive_mod()) {
        f.kind = Some(CorrKind::Receive);
        f.pid = field(m, n::receiver_pid());
        f.msg = field(m, n::message());
    } else if is(n::message_sent_mod()) {
        f.kind = Some(CorrKind::Send);
        f.pid = field(m, n::from_pid());
        f.peer = field(m, n::to_pid());
        f.msg = field(m, n::message());
    } else if is(n::message_received_mod()) {
        f.kind = Some(CorrKind::Receive);
        f.pid = field(m, n::pid());
        f.msg = field(m, n::message());
    } else if is(n::callback_reply_mod()) {
        // Completes the call it answers, like a return.
        f.kind = Some(CorrKind::Return);
        f.pid = first_field(m, &[n::server_pid(), n::pid()]);
        f.corr = field(m, n::call_id());
    } else if is(n::process_event_mod()) {
        f.id = field(m, n::id());
        match et() {
            Some(w) if w == atom_word(n::spawn()) => {
                f.kind = Some(CorrKind::Spawn);
                f.pid = field(m, n::parent_pid());
                f.peer = field(m, n::pid());
            }
            Some(w) if w == atom_word(n::exit()) => {
                f.kind = Some(CorrKind::Exit);
                f.pid = field(m, n::pid());
            }
            _ => {}
        }
    } else if is(n::process_spawn_mod()) {
        f.kind = Some(CorrKind::Spawn);
        f.pid = field(m, n::parent_pid());
        f.peer = field(m, n::spawned_pid());
    } else if is(n::process_exit_mod()) {
        f.kind = Some(CorrKind::Exit);
        f.pid = field(m, n::exited_pid());
    } else if is(n::state_change_mod()) {
        f.kind = Some(CorrKind::StateChange);
        f.id = field(m, n::id());
        f.pid = field(m, n::server_pid());
    } else {
        return None;
    }
    Some(f)
}

/// Fields of an `%Events{}` envelope whose `data` is not one of the data
/// structs: the kind comes from `event_type`, peer and message from `data`
/// when it is a map (else the message is `data` itself).
fn envelope_fields<'a>(event_type: Option<Term<'a>>, data: Option<Term<'a>>) -> Fields<'a> {
    use names as n;
    let mut f = Fields::default();
    let Some(et) = event_type.map(|t| word(t.as_c_arg())) else {
        return f;
    };
    let any = |atoms: &[Atom]| atoms.iter().any(|&a| et == atom_word(a));
    let data_field = |keys: &[Atom]| data.and_then(|d| first_field(d, keys));
    let message = || data_field(&[n::message()]).or(data);
    if any(&[n::function_entry(), n::function_call(), n::call()]) {
        f.kind = Some(CorrKind::Call);
    } else if any(&[
        n::function_exit(),
        n::function_return(),
        n::return_(),
        n::callback_reply(),
    ]) {
        f.kind = Some(CorrKind::Return);
    } else if any(&[n::message_send(), n::send(), n::message_sent()]) {
        f.kind = Some(CorrKind::Send);
        f.peer = data_field(&[n::to_pid(), n::receiver_pid()]);
        f.msg = message();
    } else if any(&[n::message_receive(), n::receive(), n::message_received()]) {
        f.kind = Some(CorrKind::Receive);
        f.msg = message();
    } else if any(&[n::process_spawn(), n::spawn()]) {
        f.kind = Some(CorrKind::Spawn);
        f.peer = data_field(&[n::spawned_pid(), n::child_pid(), n::pid()]);
    } else if any(&[n::process_exit(), n::exit()]) {
        f.kind = Some(CorrKind::Exit);
    } else if any(&[n::state_change()]) {
        f.kind = Some(CorrKind::StateChange);
    }
    f
}

/// The fields of any event term.
fn event_fields(ev: Term) -> Fields {
    let Some(module) = field(ev, names::struct_()) else {
        // Not a struct: unknown, but keep an id if it has one.
        return Fields {
            id: first_field(ev, &[names::event_id(), names::id()]),
            ..Fields::default()
        };
    };
    let module = word(module.as_c_arg());
    if module == atom_word(names::events()) {
        let data = field(ev, names::data());
        let inner = data.and_then(|d| {
            let dm = field(d, names::struct_())?;
            data_fields(word(dm.as_c_arg()), d)
        });
        let mut f = inner.unwrap_or_else(|| envelope_fields(field(ev, names::event_type()), data));
        f.id = field(ev, names::event_id()).or(f.id);
        f.pid = f.pid.or_else(|| field(ev, names::pid()));
        f.corr = f.corr.or_else(|| field(ev, names::correlation_id()));
        return f;
    }
    data_fields(module, ev).unwrap_or_else(|| Fields {
        id: first_field(ev, &[names::event_id(), names::id()]),
        ..Fields::default()
    })
}

/// One decoded event.
struct Decoded {
    input: CorrInput,
    /// The term to show as the event's own id (`nil` if it has none).
    own_id: ERL_NIF_TERM,
}

fn decode<'a>(st: &mut State, ev: Term<'a>, now: i64) -> Decoded {
    let f = event_fields(ev);
    let nil = names::nil().as_c_arg();
    let Some(kind) = f.kind else {
        return Decoded {
            input: CorrInput::new(0, CorrKind::Other, UNKNOWN_PID, now),
            own_id: f.id.map_or(nil, |t| t.as_c_arg()),
        };
    };
    let env = ev.get_env();
    let (id, own_id) = match st.id_key(f.id) {
        Some(k) => (k, f.id.map_or(nil, |t| t.as_c_arg())),
        None => {
            let k = FRESH + next_event_id();
            // SAFETY: valid env.
            (k, unsafe { enif_make_uint64(env.as_c_arg(), k) })
        }
    };
    let mut input = CorrInput::new(id, kind, st.pid_key(f.pid), now);
    match kind {
        CorrKind::Call => input.key = st.corr_key(f.corr),
        CorrKind::Return | CorrKind::Exception => {
            input.key = st.corr_key(f.corr);
            // A hint: used by the tracker only if it names an open call.
            input.call_id = st.id_key(f.corr);
        }
        CorrKind::Send => {
            input.peer = st.pid_key(f.peer);
            input.msg_hash = f.msg.map_or(0, |m| m.hash_phash2() as u64);
        }
        CorrKind::Receive => input.msg_hash = f.msg.map_or(0, |m| m.hash_phash2() as u64),
        CorrKind::Spawn => input.peer = st.pid_key(f.peer),
        _ => {}
    }
    Decoded { input, own_id }
}

/// `correlation_confidence` shown for `c`: the correlator's, except 0.0
/// for events it could not link (unknown events, returns that completed
/// no call, receives whose send has not been seen).
fn confidence(kind: CorrKind, c: &Correlation) -> f64 {
    let has = |k: LinkKind| c.links.iter().any(|l| l.kind == k);
    let linked = match kind {
        CorrKind::Other => false,
        CorrKind::Return | CorrKind::Exception => has(LinkKind::Completes),
        CorrKind::Receive => has(LinkKind::Receives),
        _ => true,
    };
    if linked {
        (c.confidence as f64 * 1e6).round() / 1e6
    } else {
        0.0
    }
}

/// `%CorrelatedEvent{}` keys, in term order.
fn result_keys() -> [ERL_NIF_TERM; 9] {
    use names as n;
    [
        n::struct_().as_c_arg(),
        n::correlated_at().as_c_arg(),
        n::correlation_confidence().as_c_arg(),
        n::correlation_id().as_c_arg(),
        n::correlation_type().as_c_arg(),
        n::event().as_c_arg(),
        n::links().as_c_arg(),
        n::parent_id().as_c_arg(),
        n::root_id().as_c_arg(),
    ]
}

/// Correlate `ev` and build its `%CorrelatedEvent{}`.
fn correlate_one<'a>(
    env: Env<'a>,
    st: &mut State,
    keys: &[ERL_NIF_TERM; 9],
    now_term: ERL_NIF_TERM,
    now: i64,
    ev: Term<'a>,
) -> ERL_NIF_TERM {
    let d = decode(st, ev, now);
    let c = st.tracker.correlate(&d.input);
    let nil = names::nil().as_c_arg();
    let corr_id = if d.input.kind == CorrKind::Other || c.correlation_id == d.input.id {
        d.own_id
    } else {
        st.id_term(env, c.correlation_id)
    };
    let links = match c.links.as_slice() {
        [] => crate::nil_word(),
        ls => {
            let ts: Vec<ERL_NIF_TERM> = ls.iter().map(|&l| st.link_term(env, l)).collect();
            make_list(env, &ts)
        }
    };
    let conf = confidence(d.input.kind, &c);
    let values = [
        names::correlated_event().as_c_arg(),
        now_term,
        // SAFETY: valid env.
        unsafe { enif_make_double(env.as_c_arg(), conf) },
        corr_id,
        type_atom(c.ctype).as_c_arg(),
        ev.as_c_arg(),
        links,
        c.parent_id.map_or(nil, |p| st.id_term(env, p)),
        c.root_id.map_or(nil, |r| st.id_term(env, r)),
    ];
    make_map(env, keys, &values)
}

/// The heads of `list`, at most `max + 1` of them; `Err` if the list is
/// improper within them.
fn heads<'a>(env: Env<'a>, list: Term<'a>, max: usize) -> NifResult<Vec<ERL_NIF_TERM>> {
    let mut out: Vec<ERL_NIF_TERM> = Vec::with_capacity(max.min(1024));
    let mut rest = list;
    while out.len() <= max {
        match rest.list_get_cell() {
            Ok((head, tail)) => {
                out.push(head.as_c_arg());
                rest = tail;
            }
            Err(_) => {
                if !rest.is_list() {
                    return badarg(env, "events must be a proper list");
                }
                break;
            }
        }
    }
    Ok(out)
}

/// Correlate `events` (terms of `env`) in order, appending their results
/// to `out`; stops after `budget` (checked every 64 events). Returns how
/// many were done.
fn correlate_run<'a>(
    env: Env<'a>,
    st: &mut State,
    events: &[ERL_NIF_TERM],
    out: &mut Vec<ERL_NIF_TERM>,
    budget: Duration,
) -> usize {
    let start = Instant::now();
    let now = monotonic_ns();
    // SAFETY: valid env.
    let now_term = unsafe { rustler::sys::enif_make_int64(env.as_c_arg(), now) };
    let keys = result_keys();
    let mut done = 0usize;
    for &ev in events {
        // SAFETY: a term of `env` (taken from the argument list).
        let ev = unsafe { Term::new(env, ev) };
        out.push(correlate_one(env, st, &keys, now_term, now, ev));
        done += 1;
        if done % 64 == 0 && start.elapsed() > budget {
            break;
        }
    }
    st.busy_ns += start.elapsed().as_nanos() as u64;
    st.timed += done as u64;
    done
}

// ---- metadata ----------------------------------------------------------------

/// The metadata map of record `r`, shown with correlation id `id`.
fn record_map(env: Env, st: &State, id: ERL_NIF_TERM, r: &CorrRecord) -> ERL_NIF_TERM {
    use names as n;
    let links = match r.link {
        Some(l) => make_list(env, &[st.link_term(env, l)]),
        None => crate::nil_word(),
    };
    let keys = [
        n::completed_by().as_c_arg(),
        n::confidence().as_c_arg(),
        n::correlation_id().as_c_arg(),
        n::created_at().as_c_arg(),
        n::links().as_c_arg(),
        n::parent_id().as_c_arg(),
        n::peer().as_c_arg(),
        n::pid().as_c_arg(),
        n::received_by().as_c_arg(),
        n::root_id().as_c_arg(),
        n::type_().as_c_arg(),
    ];
    let values = [
        st.opt_id_term(env, r.completed_by),
        // SAFETY: valid env.
        unsafe { enif_make_double(env.as_c_arg(), (r.confidence as f64 * 1e6).round() / 1e6) },
        id,
        r.created_at.encode(env).as_c_arg(),
        links,
        st.opt_id_term(env, r.parent_id),
        if r.peer == 0 {
            names::nil().as_c_arg()
        } else {
            st.pid_term(env, r.peer)
        },
        st.pid_term(env, r.pid),
        st.opt_id_term(env, r.received_by),
        st.opt_id_term(env, r.root_id),
        type_atom(r.ctype).as_c_arg(),
    ];
    make_map(env, &keys, &values)
}

/// The key of an id term given by a caller, without remembering it.
fn lookup_key(t: Term) -> Option<u64> {
    if is_nil(t) {
        return None;
    }
    match get_u64(t) {
        Some(v) if v < HASHED => Some(v),
        _ => Some(HASHED | hash59(t)),
    }
}

// ---- NIFs --------------------------------------------------------------------

/// A new correlator resource.
#[rustler::nif]
fn corr_new(env: Env, ttl_ns: i64, max_correlations: i64) -> NifResult<Term> {
    if ttl_ns <= 0 {
        return badarg(env, "correlation TTL must be a positive integer (ns)");
    }
    if !(1..=MAX_CORRELATIONS_LIMIT).contains(&max_correlations) {
        return badarg(
            env,
            format!("max_correlations must be an integer in 1..{MAX_CORRELATIONS_LIMIT}"),
        );
    }
    let max = max_correlations as usize;
    let tracker = Tracker::new(CorrelatorConfig {
        ttl_ns,
        max_correlations: max,
    });
    let res = CorrRes {
        state: Mutex::new(State {
            tracker,
            terms: TermTable {
                map: HashMap::new(),
                order: VecDeque::new(),
                max,
                bytes: 0,
            },
            busy_ns: 0,
            timed: 0,
            sweeps: 0,
        }),
        max,
        ttl_ns,
    };
    Ok(handle::make(env, res))
}

/// Correlate a list of at most [`CHUNK`] events on a normal scheduler:
/// their results in order, or `{results, rest}` if [`BUDGET_NORMAL`] ran
/// out first (`rest` is proper: correlate it with `corr_batch_dirty`).
/// `:large` for a longer list and `:busy` if another call holds the lock:
/// nothing is done, use `corr_batch_dirty`. An improper list raises before
/// anything is correlated.
#[rustler::nif]
fn corr_batch<'a>(env: Env<'a>, r: Ref<CorrRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    let events = heads(env, list, CHUNK)?;
    if events.len() > CHUNK {
        return Ok(names::large().encode(env));
    }
    let Some(mut st) = r.try_lock() else {
        return Ok(names::busy().encode(env));
    };
    let mut out = Vec::with_capacity(events.len());
    let done = correlate_run(env, &mut st, &events, &mut out, BUDGET_NORMAL);
    drop(st);
    let results = crate::codec::make_list(env, &out);
    if done == events.len() {
        return Ok(results);
    }
    // The rest of the list after `done` cells.
    let mut rest = list;
    for _ in 0..done {
        rest = rest.list_get_cell().map(|(_, t)| t)?;
    }
    Ok((results, rest).encode(env))
}

/// Correlate a whole list on a dirty CPU scheduler: its results in order.
/// The list is checked first (an improper list raises before anything is
/// done); events are then correlated in sub-chunks of [`CHUNK_DIRTY`], the
/// lock taken per sub-chunk so other callers can interleave.
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_batch_dirty<'a>(env: Env<'a>, r: Ref<CorrRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    let events = heads(env, list, usize::MAX - 1)?;
    let mut out = Vec::with_capacity(events.len());
    for sub in events.chunks(CHUNK_DIRTY) {
        let mut st = r.lock();
        correlate_run(env, &mut st, sub, &mut out, Duration::MAX);
    }
    Ok(crate::codec::make_list(env, &out))
}

/// The metadata map of correlation `id`, or `nil`.
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_metadata<'a>(env: Env<'a>, r: Ref<CorrRes>, id: Term<'a>) -> Term<'a> {
    let mut st = r.lock();
    let rec = lookup_key(id).and_then(|k| st.tracker.record(k));
    match rec {
        Some(rec) => {
            // SAFETY: a term of `env`.
            unsafe { Term::new(env, record_map(env, &st, id.as_c_arg(), &rec)) }
        }
        None => names::nil().encode(env),
    }
}

/// The metadata maps from the root down to `id` (empty if unknown).
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_chain<'a>(env: Env<'a>, r: Ref<CorrRes>, id: Term<'a>) -> Term<'a> {
    let mut st = r.lock();
    let Some(key) = lookup_key(id) else {
        return crate::codec::make_list(env, &[]);
    };
    let chain = st.tracker.chain(key);
    let recs: Vec<(u64, CorrRecord)> = chain
        .iter()
        .filter_map(|&k| st.tracker.record(k).map(|r| (k, r)))
        .collect();
    let maps: Vec<ERL_NIF_TERM> = recs
        .iter()
        .map(|(k, rec)| {
            let id_t = if *k == key {
                id.as_c_arg()
            } else {
                st.id_term(env, *k)
            };
            record_map(env, &st, id_t, rec)
        })
        .collect();
    crate::codec::make_list(env, &maps)
}

/// Expire records and unmatched messages older than the TTL:
/// `{records_removed, entries_removed}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_sweep<'a>(env: Env<'a>, r: Ref<CorrRes>) -> Term<'a> {
    let mut st = r.lock();
    let now = monotonic_ns();
    let (records, entries) = st.tracker.sweep(now);
    st.sweeps += 1;
    (records as u64, entries as u64).encode(env)
}

/// Counters (see `EventCorrelator.get_metrics/1`).
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_metrics<'a>(env: Env<'a>, r: Ref<CorrRes>) -> NifResult<Term<'a>> {
    let st = r.lock();
    let t = st.tracker.metrics();
    let c = st.tracker.correlator().metrics();
    let memory = st.tracker.memory_bytes()
        + st.terms.bytes
        + st.terms.map.capacity() * 40
        + st.terms.order.capacity() * 8;
    let avg = if st.timed == 0 {
        0.0
    } else {
        st.busy_ns as f64 / st.timed as f64
    };
    let counters: [(&str, u64); 27] = [
        ("total_correlations_created", t.created),
        ("active_correlations", c.active),
        ("function_correlations", t.function),
        ("message_correlations", t.message),
        ("events_correlated", t.events),
        ("unknown_events", t.unknown),
        ("metadata_entries", t.records),
        ("metadata_expired", t.records_expired),
        ("metadata_evicted", t.records_evicted),
        ("late_links", t.late_links),
        ("pid_resolved_returns", t.pid_resolved),
        ("calls", c.calls),
        ("returns", c.returns),
        ("sends", c.sends),
        ("receives", c.receives),
        ("matched_receives", c.matched_receives),
        ("unmatched_returns", c.unmatched_returns),
        ("unwound_frames", c.unwound_frames),
        ("orphaned_calls", c.orphaned_calls),
        ("expired", c.expired),
        ("evicted", c.evicted),
        ("refused", c.refused),
        (
            "pending_messages",
            st.tracker.correlator().pending_messages() as u64,
        ),
        ("sweeps", st.sweeps),
        ("max_correlations", r.max as u64),
        ("correlation_ttl_ns", r.ttl_ns as u64),
        ("memory_bytes", memory as u64),
    ];
    let mut m = map_new(env);
    for (k, v) in counters {
        m = m.map_put(Atom::from_str(env, k)?, v)?;
    }
    m = m.map_put(Atom::from_str(env, "average_correlation_time_ns")?, avg)?;
    Ok(m)
}
