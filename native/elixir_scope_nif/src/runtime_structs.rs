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

use elixir_scope_core::{Event, EventKind, FLAG_RUNTIME_STRUCT};
use rustler::sys::{enif_get_map_size, ErlNifTerm as ERL_NIF_TERM};
use rustler::{Atom, Encoder, Env, Term};

use crate::atoms;
use crate::codec::{self, imm_word, is_immediate, word, Scratch, TapeDecoder, TapeEncoder};
use crate::event_term::make_struct;

/// A recognised struct's fields, in payload order.
pub enum Special<'a> {
    /// `%StateSnapshot{}`: `[server_pid, state, reason, seq]`.
    Snapshot([Term<'a>; 4]),
    /// `%MessageSent{}`: from, to, message; the rest list.
    Sent([Term<'a>; 3], Term<'a>),
    /// `%MessageReceived{}`: pid, message, rest.
    Received([Term<'a>; 2], Term<'a>),
    /// `%CallbackReply{}`: reply, call_id, new_state, rest; the acting pid.
    Reply([Term<'a>; 3], Term<'a>, Term<'a>),
}

impl Special<'_> {
    /// The kind it is stored as.
    pub fn kind(&self) -> EventKind {
        match self {
            Special::Snapshot(_) => EventKind::StateSnapshot,
            Special::Sent(..) => EventKind::MessageSend,
            Special::Received(..) => EventKind::MessageReceive,
            Special::Reply(..) => EventKind::FunctionReturn,
        }
    }

    /// Set `ev`'s header and encode its payload.
    pub fn fill(&self, ev: &mut Event, enc: &mut TapeEncoder) {
        match self {
            Special::Snapshot(parts) => crate::ring_nif::fill_snapshot(ev, enc, *parts),
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
    let is = |a: Atom, keys: usize| {
        codec::is_struct(raw, a.encode(env).as_c_arg(), struct_key) && map_size(env, raw) == keys
    };
    let get = |k: Atom| {
        codec::map_get_immediate(env, raw, k.encode(env).as_c_arg())
            // SAFETY: a value of a map of `env`.
            .map(|v| unsafe { Term::new(env, v) })
    };
    let list = |items: &[Term<'a>]| items.encode(env);
    if codec::is_struct(
        raw,
        atoms::state_snapshot().encode(env).as_c_arg(),
        struct_key,
    ) {
        return crate::ring_nif::snapshot_parts(env, t).map(Special::Snapshot);
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

/// The struct of a flagged send, receive or return (`None`: not one).
pub fn decode<'a>(
    env: Env<'a>,
    kind: EventKind,
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
            Some(make_struct(
                env,
                &[
                    atoms::struct_(),
                    atoms::correlation_id(),
                    atoms::from_pid(),
                    atoms::message(),
                    atoms::timestamp(),
                    atoms::to_pid(),
                    atoms::wall_time(),
                ],
                &[name(atoms::message_sent()), corr, from, msg, ts, to, wall],
            ))
        }
        EventKind::MessageReceive => {
            let pid = next(&mut d, scratch);
            let msg = next(&mut d, scratch);
            let [corr, ts, wall] = rest::<3>(env, &mut d, scratch);
            Some(make_struct(
                env,
                &[
                    atoms::struct_(),
                    atoms::correlation_id(),
                    atoms::message(),
                    atoms::pid(),
                    atoms::timestamp(),
                    atoms::wall_time(),
                ],
                &[name(atoms::message_received()), corr, msg, pid, ts, wall],
            ))
        }
        EventKind::FunctionReturn => {
            let reply = next(&mut d, scratch);
            let call_id = next(&mut d, scratch);
            let new_state = next(&mut d, scratch);
            let [server, pid, callback, timeout, hibernate, cont, corr, ts, wall] =
                rest::<9>(env, &mut d, scratch);
            Some(make_struct(
                env,
                &[
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
                ],
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
        _ => None,
    }
}
