//! The original ElixirScope's runtime-tracing structs written to a ring:
//! `%MessageSent{}`, `%MessageReceived{}` and `%CallbackReply{}` are stored
//! as a send, a receive and a return (so the pipeline correlates them like
//! the Ingestor's), flagged [`FLAG_RUNTIME_STRUCT`] so they read back as the
//! struct that was written.
//!
//! A struct is recognised only with its exact key set and a local acting
//! process (`from_pid`; `pid`; `server_pid`, else `pid`); anything else is
//! stored whole as a generic term, which also reads back equal.
//!
//! Payloads (the kind's own fields first, at the positions the other
//! readers of that kind expect; then the struct's other fields as one list,
//! cut element by element when too big):
//!
//! | struct | kind | payload |
//! |---|---|---|
//! | `MessageSent` | send | `from_pid, to_pid, message, [correlation_id, timestamp, wall_time]` |
//! | `MessageReceived` | receive | `pid, message, [correlation_id, timestamp, wall_time]` |
//! | `CallbackReply` | return | `reply, call_id, new_state, [server_pid, pid, callback, timeout, hibernate, continue_data, correlation_id, timestamp, wall_time]` |
//! | `FunctionEntry` (local `pid`) | call | `args, pid, call_id, [module, function, arity, caller_module, caller_function, caller_line, correlation_id, timestamp, wall_time]` |
//! | `FunctionExit` (local `pid`), `exit_reason` nil or `:normal` | return | `result, call_id, [module, function, arity, duration_ns, exit_reason, pid, correlation_id, timestamp, wall_time]` |
//! | `FunctionExit`, any other `exit_reason` | exception | `exit_reason, result, call_id, [module, function, arity, duration_ns, pid, correlation_id, timestamp, wall_time]` |
//! | `ProcessExit` (local `exited_pid`, else `pid`) | exit | `process, reason, [exited_pid, pid, lifetime_ns, message_count, final_state, correlation_id, timestamp, wall_time, other reason]` |
//! | `StateChange` (local `server_pid`, else `pid`) | state change | `process, old_state, new_state, [server_pid, pid, id, callback, state_diff, trigger_message, trigger_call_id, correlation_id, timestamp, wall_time]` |
//! | `StateSnapshot` (local `server_pid`, else `pid`) | snapshot | `process, state, snapshot_reason, sequence_number, [server_pid, pid, snapshot_id, checkpoint_type, memory_usage, message_queue_len, session_id, correlation_id, timestamp, wall_time]` |
//!
//! A call's header is that of the Ingestor's (module, function, arity in
//! `aux`, `peer` the correlation key of `call_id`, else of
//! `correlation_id`, 0 when both are nil), and so is a return's or an
//! exception's (`aux` the `duration_ns` when it is an integer). An exit's
//! reason is `exit_reason`, else `reason` (`aux` 1: the `reason` one; the
//! other is the last element of the list). A state change and a snapshot
//! are state records like the Ingestor's (`aux` of a change: 0 when the
//! states are equal); they are not flagged (state records use that bit):
//! the list tells them from the Ingestor's, which have none (a change
//! then reads back with `callback: :unknown`, `state_diff` from `aux`,
//! the record's id and times, `pid` and `correlation_id` nil; a snapshot
//! with `pid` = the process and the record's times, the rest nil).

use elixir_scope_core::{Event, EventKind, FLAG_RUNTIME_STRUCT};
use rustler::sys::{enif_get_map_size, ErlNifTerm as ERL_NIF_TERM};
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::atoms::issue_17a as ex;
use crate::codec::{self, imm_word, is_immediate, word, Scratch, TapeDecoder, TapeEncoder};
use crate::event_term::{make_struct_in, Shape};

/// A recognised struct's fields, in payload order.
pub enum Special<'a> {
    /// `%StateSnapshot{}`: `[actor, state, reason, seq]`, rest.
    Snapshot([Term<'a>; 4], Term<'a>),
    /// `%FunctionEntry{}`: args, pid, call_id; module, function, arity;
    /// the correlation term (call_id, else correlation_id); rest.
    Entry([Term<'a>; 3], [Term<'a>; 3], Term<'a>, Term<'a>),
    /// `%FunctionExit{}`: the kind's fields (`[result, call_id]` or
    /// `[exit_reason, result, call_id]`), pid, module, function,
    /// duration_ns, correlation term; rest.
    Exit(ExitParts<'a>),
    /// `%ProcessExit{}`: actor, reason, whether it is `reason`; rest.
    ProcExit([Term<'a>; 2], bool, Term<'a>),
    /// `%StateChange{}`: `[actor, old_state, new_state]`, rest.
    Change([Term<'a>; 3], Term<'a>),
    /// `%MessageSent{}`: from, to, message; the rest list.
    Sent([Term<'a>; 3], Term<'a>),
    /// `%MessageReceived{}`: pid, message, rest.
    Received([Term<'a>; 2], Term<'a>),
    /// `%CallbackReply{}`: reply, call_id, new_state, rest; the acting pid.
    Reply([Term<'a>; 3], Term<'a>, Term<'a>),
}

/// The parts of a recognised `%FunctionExit{}`.
pub struct ExitParts<'a> {
    exception: bool,
    /// `[result, call_id]`, or `[exit_reason, result, call_id]`.
    fields: Vec<Term<'a>>,
    /// pid, module, function, duration_ns, correlation term.
    header: [Term<'a>; 5],
    rest: Term<'a>,
}

/// The word of an atom (0 for anything else): module and function
/// header words are atoms.
#[inline]
fn atom_word(t: Term) -> u64 {
    if t.is_atom() {
        word(t.as_c_arg())
    } else {
        0
    }
}

/// The correlation key of the first non-nil of `terms` (0: all nil).
fn corr_of(terms: &[Term]) -> u64 {
    terms
        .iter()
        .find(|t| !is_nil(**t))
        .map_or(0, |t| crate::ingest::corr_key(*t))
}

#[inline]
fn is_nil(t: Term) -> bool {
    word(t.as_c_arg()) == word(atoms::nil().encode(t.get_env()).as_c_arg())
}

/// An `i64` field value (0: not a small enough integer).
fn int_or_zero(t: Term) -> i64 {
    t.decode::<i64>().unwrap_or(0)
}

impl Special<'_> {
    /// The kind it is stored as.
    pub fn kind(&self) -> EventKind {
        match self {
            Special::Snapshot(..) => EventKind::StateSnapshot,
            Special::Entry(..) => EventKind::FunctionCall,
            Special::Exit(x) if x.exception => EventKind::FunctionException,
            Special::Exit(_) => EventKind::FunctionReturn,
            Special::ProcExit(..) => EventKind::ProcessExit,
            Special::Change(..) => EventKind::StateChange,
            Special::Sent(..) => EventKind::MessageSend,
            Special::Received(..) => EventKind::MessageReceive,
            Special::Reply(..) => EventKind::FunctionReturn,
        }
    }

    /// Set `ev`'s header and encode its payload.
    pub fn fill(&self, ev: &mut Event, enc: &mut TapeEncoder) {
        match self {
            Special::Snapshot(parts, rest) => {
                crate::ring_nif::fill_snapshot(ev, enc, *parts);
                enc.field_elems(*rest);
            }
            Special::Entry([args, pid, call_id], [module, function, arity], corr, rest) => {
                ev.flags |= FLAG_RUNTIME_STRUCT;
                ev.pid = word(pid.as_c_arg());
                ev.module = atom_word(*module);
                ev.function = atom_word(*function);
                ev.aux = int_or_zero(*arity);
                ev.peer = corr_of(&[*corr]);
                enc.field(*args);
                enc.field(*pid);
                enc.field(*call_id);
                enc.field_elems(*rest);
            }
            Special::Exit(x) => {
                let [pid, module, function, duration, corr] = x.header;
                ev.flags |= FLAG_RUNTIME_STRUCT;
                ev.pid = word(pid.as_c_arg());
                ev.module = atom_word(module);
                ev.function = atom_word(function);
                ev.aux = int_or_zero(duration);
                ev.peer = corr_of(&[corr]);
                for f in &x.fields {
                    enc.field_whole(*f);
                }
                enc.field_elems(x.rest);
            }
            Special::ProcExit([actor, reason], is_reason, rest) => {
                ev.flags |= FLAG_RUNTIME_STRUCT;
                ev.pid = word(actor.as_c_arg());
                ev.aux = *is_reason as i64;
                enc.field(*actor);
                enc.field_whole(*reason);
                enc.field_elems(*rest);
            }
            Special::Change([actor, old, new], rest) => {
                ev.pid = word(actor.as_c_arg());
                // SAFETY: both terms belong to the calling env.
                let same =
                    unsafe { rustler::sys::enif_compare(old.as_c_arg(), new.as_c_arg()) } == 0;
                ev.aux = if same { 0 } else { 1 };
                enc.field(*actor);
                enc.field(*old);
                enc.field(*new);
                enc.field_elems(*rest);
            }
            Special::Sent([from, to, msg], rest) => {
                ev.flags |= FLAG_RUNTIME_STRUCT;
                ev.pid = word(from.as_c_arg());
                ev.peer = imm_word(to.as_c_arg());
                enc.field(*from);
                enc.field(*to);
                ev.aux = enc.field_hashed(*msg) as i64;
                enc.field_elems(*rest);
            }
            Special::Received([pid, msg], rest) => {
                ev.flags |= FLAG_RUNTIME_STRUCT;
                ev.pid = word(pid.as_c_arg());
                enc.field(*pid);
                ev.aux = enc.field_hashed(*msg) as i64;
                enc.field_elems(*rest);
            }
            Special::Reply([reply, call_id, new_state], rest, actor) => {
                ev.flags |= FLAG_RUNTIME_STRUCT;
                ev.pid = word(actor.as_c_arg());
                // No call id: the innermost open call of the server.
                let nil = atoms::nil().encode(call_id.get_env()).as_c_arg();
                ev.peer = if word(call_id.as_c_arg()) == word(nil) {
                    0
                } else {
                    crate::ingest::corr_key(*call_id)
                };
                enc.field_whole(*reply);
                enc.field(*call_id);
                enc.field_whole(*new_state);
                enc.field_elems(*rest);
            }
        }
    }
}

/// Is `t` a local pid (an immediate pid word)?
#[inline]
fn local_pid(t: Term) -> bool {
    t.is_pid() && is_immediate(t.as_c_arg())
}

/// The recognised struct `t` is, if any.
pub fn classify<'a>(env: Env<'a>, t: Term<'a>) -> Option<Special<'a>> {
    let raw = t.as_c_arg();
    let struct_key = atoms::struct_().encode(env).as_c_arg();
    // The struct's name, read once: a plain term leaves here, and each
    // check below is a word compare (its size asked only on a match).
    let name = codec::struct_name(raw, struct_key)?;
    let is =
        |a: Atom, keys: usize| word(a.encode(env).as_c_arg()) == name && map_size(env, raw) == keys;
    let get = |k: Atom| {
        codec::map_get_immediate(env, raw, k.encode(env).as_c_arg())
            // SAFETY: a value of a map of `env`.
            .map(|v| unsafe { Term::new(env, v) })
    };
    let list = |items: &[Term<'a>]| items.encode(env);
    let actor = |keys: &[Atom]| keys.iter().filter_map(|k| get(*k)).find(|p| local_pid(*p));
    if is(atoms::state_snapshot(), 14) {
        let actor = actor(&[atoms::server_pid(), atoms::pid()])?;
        let rest = list(&[
            get(atoms::server_pid())?,
            get(atoms::pid())?,
            get(ex::snapshot_id())?,
            get(ex::checkpoint_type())?,
            get(atoms::memory_usage())?,
            get(ex::message_queue_len())?,
            get(ex::session_id())?,
            get(atoms::correlation_id())?,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
        ]);
        return Some(Special::Snapshot(
            [
                actor,
                get(atoms::state())?,
                get(atoms::snapshot_reason())?,
                get(atoms::sequence_number())?,
            ],
            rest,
        ));
    }
    if is(ex::function_entry_struct(), 13) {
        let pid = get(atoms::pid())?;
        if !local_pid(pid) {
            return None;
        }
        let call_id = get(atoms::call_id())?;
        let corr = get(atoms::correlation_id())?;
        let (module, function, arity) = (
            get(atoms::module())?,
            get(atoms::function())?,
            get(atoms::arity())?,
        );
        let rest = list(&[
            module,
            function,
            arity,
            get(ex::caller_module())?,
            get(ex::caller_function())?,
            get(ex::caller_line())?,
            corr,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
        ]);
        let key = if is_nil(call_id) { corr } else { call_id };
        return Some(Special::Entry(
            [get(atoms::args())?, pid, call_id],
            [module, function, arity],
            key,
            rest,
        ));
    }
    if is(ex::function_exit_struct(), 12) {
        let pid = get(atoms::pid())?;
        if !local_pid(pid) {
            return None;
        }
        let (call_id, corr) = (get(atoms::call_id())?, get(atoms::correlation_id())?);
        let (module, function, arity) = (
            get(atoms::module())?,
            get(atoms::function())?,
            get(atoms::arity())?,
        );
        let (result, reason, duration) = (
            get(ex::result())?,
            get(ex::exit_reason())?,
            get(atoms::duration_ns())?,
        );
        let exception = !is_nil(reason)
            && word(reason.as_c_arg()) != word(atoms::normal().encode(env).as_c_arg());
        let (ts, wall) = (get(atoms::timestamp())?, get(atoms::wall_time())?);
        let (fields, rest) = if exception {
            (
                vec![reason, result, call_id],
                list(&[module, function, arity, duration, pid, corr, ts, wall]),
            )
        } else {
            (
                vec![result, call_id],
                list(&[
                    module, function, arity, duration, reason, pid, corr, ts, wall,
                ]),
            )
        };
        let key = if is_nil(call_id) { corr } else { call_id };
        return Some(Special::Exit(ExitParts {
            exception,
            fields,
            header: [pid, module, function, duration, key],
            rest,
        }));
    }
    if is(ex::process_exit_struct(), 11) {
        let actor = actor(&[ex::exited_pid(), atoms::pid()])?;
        let (exit_reason, reason) = (get(ex::exit_reason())?, get(atoms::reason())?);
        // The reason readers see: exit_reason, else reason; the other last.
        let is_reason = is_nil(exit_reason);
        let (shown, other) = if is_reason {
            (reason, exit_reason)
        } else {
            (exit_reason, reason)
        };
        let rest = list(&[
            get(ex::exited_pid())?,
            get(atoms::pid())?,
            get(ex::lifetime_ns())?,
            get(ex::message_count())?,
            get(ex::final_state())?,
            get(atoms::correlation_id())?,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
            other,
        ]);
        return Some(Special::ProcExit([actor, shown], is_reason, rest));
    }
    if is(atoms::state_change(), 13) {
        let actor = actor(&[atoms::server_pid(), atoms::pid()])?;
        let rest = list(&[
            get(atoms::server_pid())?,
            get(atoms::pid())?,
            get(atoms::id())?,
            get(atoms::callback())?,
            get(atoms::state_diff())?,
            get(atoms::trigger_message())?,
            get(atoms::trigger_call_id())?,
            get(atoms::correlation_id())?,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
        ]);
        return Some(Special::Change(
            [actor, get(atoms::old_state())?, get(atoms::new_state())?],
            rest,
        ));
    }
    if is(atoms::message_sent(), 7) {
        let from = get(atoms::from_pid())?;
        if !local_pid(from) {
            return None;
        }
        let rest = list(&[
            get(atoms::correlation_id())?,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
        ]);
        return Some(Special::Sent(
            [from, get(atoms::to_pid())?, get(atoms::message())?],
            rest,
        ));
    }
    if is(atoms::message_received(), 6) {
        let pid = get(atoms::pid())?;
        if !local_pid(pid) {
            return None;
        }
        let rest = list(&[
            get(atoms::correlation_id())?,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
        ]);
        return Some(Special::Received([pid, get(atoms::message())?], rest));
    }
    if is(atoms::callback_reply(), 13) {
        let server = get(atoms::server_pid())?;
        let pid = get(atoms::pid())?;
        let actor = [server, pid].into_iter().find(|p| local_pid(*p))?;
        let rest = list(&[
            server,
            pid,
            get(atoms::callback())?,
            get(atoms::timeout())?,
            get(atoms::hibernate())?,
            get(atoms::continue_data())?,
            get(atoms::correlation_id())?,
            get(atoms::timestamp())?,
            get(atoms::wall_time())?,
        ]);
        return Some(Special::Reply(
            [
                get(atoms::reply())?,
                get(atoms::call_id())?,
                get(atoms::new_state())?,
            ],
            rest,
            actor,
        ));
    }
    None
}

fn map_size(env: Env, m: ERL_NIF_TERM) -> usize {
    let mut size: usize = 0;
    // SAFETY: valid env and term; a non-map makes the call return 0.
    if unsafe { enif_get_map_size(env.as_c_arg(), m, &mut size) } == 0 {
        return usize::MAX;
    }
    size
}

/// The `N` elements of the rest list that ends a payload (a list, so a
/// marker of the whole, a tuple, is never mistaken for it); each is that
/// marker when the list was cut whole.
fn rest<const N: usize>(env: Env, d: &mut TapeDecoder, scratch: &mut Scratch) -> [ERL_NIF_TERM; N] {
    let t = d.next(env, scratch);
    match codec::proper_list(t) {
        Some(items) if items.len() == N => {
            let mut out = [ERL_NIF_TERM::default(); N];
            for (o, i) in out.iter_mut().zip(items) {
                *o = i.as_c_arg();
            }
            out
        }
        _ => [t.as_c_arg(); N],
    }
}

/// Top-level fields of a payload.
fn payload_fields(payload: &[u8]) -> usize {
    let mut d = TapeDecoder::new(payload);
    let mut n = 0;
    while d.skip().is_some() {
        n += 1;
    }
    n
}

/// The struct of a flagged record (`None`: not one).
pub fn decode<'a>(
    env: Env<'a>,
    kind: EventKind,
    aux: i64,
    payload: &[u8],
    scratch: &mut Scratch,
) -> Option<Term<'a>> {
    let mut d = TapeDecoder::new(payload);
    let next = |d: &mut TapeDecoder, s: &mut Scratch| d.next(env, s).as_c_arg();
    let name = |a: Atom| a.encode(env).as_c_arg();
    match kind {
        EventKind::MessageSend => {
            let from = next(&mut d, scratch);
            let to = next(&mut d, scratch);
            let msg = next(&mut d, scratch);
            let [corr, ts, wall] = rest::<3>(env, &mut d, scratch);
            Some(make_struct_in(
                env,
                scratch,
                &MESSAGE_SENT,
                &[name(atoms::message_sent()), corr, from, msg, ts, to, wall],
            ))
        }
        EventKind::MessageReceive => {
            let pid = next(&mut d, scratch);
            let msg = next(&mut d, scratch);
            let [corr, ts, wall] = rest::<3>(env, &mut d, scratch);
            Some(make_struct_in(
                env,
                scratch,
                &MESSAGE_RECEIVED,
                &[name(atoms::message_received()), corr, msg, pid, ts, wall],
            ))
        }
        EventKind::FunctionReturn if payload_fields(payload) == 3 => {
            let result = next(&mut d, scratch);
            let call_id = next(&mut d, scratch);
            let [module, function, arity, duration, reason, pid, corr, ts, wall] =
                rest::<9>(env, &mut d, scratch);
            Some(function_exit_struct(
                env,
                scratch,
                [
                    arity, call_id, corr, duration, reason, function, module, pid, result, ts, wall,
                ],
            ))
        }
        EventKind::FunctionReturn => {
            let reply = next(&mut d, scratch);
            let call_id = next(&mut d, scratch);
            let new_state = next(&mut d, scratch);
            let [server, pid, callback, timeout, hibernate, cont, corr, ts, wall] =
                rest::<9>(env, &mut d, scratch);
            Some(make_struct_in(
                env,
                scratch,
                &CALLBACK_REPLY,
                &[
                    name(atoms::callback_reply()),
                    call_id,
                    callback,
                    cont,
                    corr,
                    hibernate,
                    new_state,
                    pid,
                    reply,
                    server,
                    timeout,
                    ts,
                    wall,
                ],
            ))
        }
        EventKind::FunctionCall => {
            let args = next(&mut d, scratch);
            let pid = next(&mut d, scratch);
            let call_id = next(&mut d, scratch);
            let [module, function, arity, cmod, cfun, cline, corr, ts, wall] =
                rest::<9>(env, &mut d, scratch);
            Some(make_struct_in(
                env,
                scratch,
                &FUNCTION_ENTRY,
                &[
                    name(ex::function_entry_struct()),
                    args,
                    arity,
                    call_id,
                    cfun,
                    cline,
                    cmod,
                    corr,
                    function,
                    module,
                    pid,
                    ts,
                    wall,
                ],
            ))
        }
        EventKind::FunctionException => {
            let reason = next(&mut d, scratch);
            let result = next(&mut d, scratch);
            let call_id = next(&mut d, scratch);
            let [module, function, arity, duration, pid, corr, ts, wall] =
                rest::<8>(env, &mut d, scratch);
            Some(function_exit_struct(
                env,
                scratch,
                [
                    arity, call_id, corr, duration, reason, function, module, pid, result, ts, wall,
                ],
            ))
        }
        EventKind::ProcessExit => {
            let _actor = next(&mut d, scratch);
            let shown = next(&mut d, scratch);
            let [exited, pid, lifetime, count, final_state, corr, ts, wall, other] =
                rest::<9>(env, &mut d, scratch);
            let (exit_reason, reason) = if aux == 1 {
                (other, shown)
            } else {
                (shown, other)
            };
            Some(make_struct_in(
                env,
                scratch,
                &PROCESS_EXIT,
                &[
                    name(ex::process_exit_struct()),
                    corr,
                    exit_reason,
                    exited,
                    final_state,
                    lifetime,
                    count,
                    pid,
                    reason,
                    ts,
                    wall,
                ],
            ))
        }
        _ => None,
    }
}

/// `%FunctionExit{}` from its values in key order (after `__struct__`).
fn function_exit_struct<'a>(
    env: Env<'a>,
    scratch: &mut Scratch,
    v: [ERL_NIF_TERM; 11],
) -> Term<'a> {
    let mut values = [ERL_NIF_TERM::default(); 12];
    values[0] = ex::function_exit_struct().encode(env).as_c_arg();
    values[1..].copy_from_slice(&v);
    make_struct_in(env, scratch, &FUNCTION_EXIT, &values)
}

/// The `N` fields of the list after a state record's own fields; `None`
/// when there is none (the Ingestor's and the tracer's records).
fn state_rest<const N: usize>(
    env: Env,
    d: &mut TapeDecoder,
    scratch: &mut Scratch,
) -> Option<[ERL_NIF_TERM; N]> {
    let t = d.try_next(env, scratch)?;
    Some(match codec::proper_list(t) {
        Some(items) if items.len() == N => {
            let mut out = [ERL_NIF_TERM::default(); N];
            for (o, i) in out.iter_mut().zip(items) {
                *o = i.as_c_arg();
            }
            out
        }
        _ => [t.as_c_arg(); N],
    })
}

/// The `%StateChange{}` of a state change record (`id`, `ts`, `wall`,
/// `aux`: the record's). A record written as the struct carries its other
/// fields in a list after the three; the Ingestor's reads `callback:
/// :unknown`, `state_diff` `:no_change` / `:changed` from `aux`, the
/// record's id and times, the other fields nil.
pub fn state_change<'a>(
    env: Env<'a>,
    payload: &[u8],
    [id, ts, wall]: [ERL_NIF_TERM; 3],
    aux: i64,
    scratch: &mut Scratch,
) -> Term<'a> {
    let mut d = TapeDecoder::new(payload);
    let actor = d.next(env, scratch).as_c_arg();
    let old = d.next(env, scratch).as_c_arg();
    let new = d.next(env, scratch).as_c_arg();
    let nil = atoms::nil().encode(env).as_c_arg();
    let fields = state_rest::<10>(env, &mut d, scratch).unwrap_or_else(|| {
        let diff = if aux == 0 {
            atoms::no_change()
        } else {
            atoms::changed()
        };
        let unknown = atoms::unknown().encode(env).as_c_arg();
        let diff = diff.encode(env).as_c_arg();
        [actor, nil, id, unknown, diff, nil, nil, nil, ts, wall]
    });
    let [server, pid, id, callback, diff, tmsg, tcall, corr, ts, wall] = fields;
    make_struct_in(
        env,
        scratch,
        &STATE_CHANGE,
        &[
            atoms::state_change().encode(env).as_c_arg(),
            callback,
            corr,
            id,
            new,
            old,
            pid,
            server,
            diff,
            ts,
            tcall,
            tmsg,
            wall,
        ],
    )
}

/// The `%StateSnapshot{}` of a snapshot record (`pid`, `ts`, `wall`: the
/// record's process and times). A record written as the struct carries
/// its other fields in a list after the four; one without (the
/// Ingestor's, the tracer's) reads `pid` = the process, `timestamp` and
/// `wall_time` = the record's, the other fields nil.
pub fn snapshot<'a>(
    env: Env<'a>,
    payload: &[u8],
    ts: ERL_NIF_TERM,
    wall: ERL_NIF_TERM,
    scratch: &mut Scratch,
) -> Term<'a> {
    let mut d = TapeDecoder::new(payload);
    let mut next = |s: &mut Scratch| d.next(env, s).as_c_arg();
    let actor = next(scratch);
    let state = next(scratch);
    let reason = next(scratch);
    let seq = next(scratch);
    let nil = atoms::nil().encode(env).as_c_arg();
    let fields = state_rest::<10>(env, &mut d, scratch)
        .unwrap_or([actor, actor, nil, nil, nil, nil, nil, nil, ts, wall]);
    let [server, pid, snap_id, checkpoint, memory, queue, session, corr, ts, wall] = fields;
    make_struct_in(
        env,
        scratch,
        &STATE_SNAPSHOT,
        &[
            atoms::state_snapshot().encode(env).as_c_arg(),
            checkpoint,
            corr,
            memory,
            queue,
            pid,
            seq,
            server,
            session,
            snap_id,
            reason,
            state,
            ts,
            wall,
        ],
    )
}

/// Keys, in term order, of MESSAGE_SENT (ids 9-16: see `event_term::Shape`).
static MESSAGE_SENT: Shape = Shape::new(9, || {
    vec![
        atoms::struct_(),
        atoms::correlation_id(),
        atoms::from_pid(),
        atoms::message(),
        atoms::timestamp(),
        atoms::to_pid(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of MESSAGE_RECEIVED (ids 9-16: see `event_term::Shape`).
static MESSAGE_RECEIVED: Shape = Shape::new(10, || {
    vec![
        atoms::struct_(),
        atoms::correlation_id(),
        atoms::message(),
        atoms::pid(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of CALLBACK_REPLY (ids 9-16: see `event_term::Shape`).
static CALLBACK_REPLY: Shape = Shape::new(11, || {
    vec![
        atoms::struct_(),
        atoms::call_id(),
        atoms::callback(),
        atoms::continue_data(),
        atoms::correlation_id(),
        atoms::hibernate(),
        atoms::new_state(),
        atoms::pid(),
        atoms::reply(),
        atoms::server_pid(),
        atoms::timeout(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of FUNCTION_ENTRY (ids 9-16: see `event_term::Shape`).
static FUNCTION_ENTRY: Shape = Shape::new(12, || {
    vec![
        atoms::struct_(),
        atoms::args(),
        atoms::arity(),
        atoms::call_id(),
        ex::caller_function(),
        ex::caller_line(),
        ex::caller_module(),
        atoms::correlation_id(),
        atoms::function(),
        atoms::module(),
        atoms::pid(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of PROCESS_EXIT (ids 9-16: see `event_term::Shape`).
static PROCESS_EXIT: Shape = Shape::new(13, || {
    vec![
        atoms::struct_(),
        atoms::correlation_id(),
        ex::exit_reason(),
        ex::exited_pid(),
        ex::final_state(),
        ex::lifetime_ns(),
        ex::message_count(),
        atoms::pid(),
        atoms::reason(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of FUNCTION_EXIT (ids 9-16: see `event_term::Shape`).
static FUNCTION_EXIT: Shape = Shape::new(14, || {
    vec![
        atoms::struct_(),
        atoms::arity(),
        atoms::call_id(),
        atoms::correlation_id(),
        atoms::duration_ns(),
        ex::exit_reason(),
        atoms::function(),
        atoms::module(),
        atoms::pid(),
        ex::result(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of STATE_CHANGE (ids 9-16: see `event_term::Shape`).
static STATE_CHANGE: Shape = Shape::new(15, || {
    vec![
        atoms::struct_(),
        atoms::callback(),
        atoms::correlation_id(),
        atoms::id(),
        atoms::new_state(),
        atoms::old_state(),
        atoms::pid(),
        atoms::server_pid(),
        atoms::state_diff(),
        atoms::timestamp(),
        atoms::trigger_call_id(),
        atoms::trigger_message(),
        atoms::wall_time(),
    ]
});

/// Keys, in term order, of STATE_SNAPSHOT (ids 9-16: see `event_term::Shape`).
static STATE_SNAPSHOT: Shape = Shape::new(16, || {
    vec![
        atoms::struct_(),
        ex::checkpoint_type(),
        atoms::correlation_id(),
        atoms::memory_usage(),
        ex::message_queue_len(),
        atoms::pid(),
        atoms::sequence_number(),
        atoms::server_pid(),
        ex::session_id(),
        ex::snapshot_id(),
        atoms::snapshot_reason(),
        atoms::state(),
        atoms::timestamp(),
        atoms::wall_time(),
    ]
});
