//! `ing_*` NIFs: `ElixirScope.Capture.Ingestor` builds native events
//! straight from the fields it is given (no struct is built or walked).
//! Argument types are checked by the Elixir wrappers; the NIFs only rely on
//! atoms being atoms.
//!
//! A value field too big for the ring (an argument list, a return value, a
//! message, an exit or error reason) becomes one truncation marker in its
//! place, as the original's `Utils.truncate_data/2` did; a state and a
//! metric's metadata map (small maps) are cut value by value.

use elixir_scope_core::EventKind;
use rustler::sys::enif_compare;
use rustler::{Encoder, Env, Term};

use crate::codec::{imm_word, is_immediate, list_cells, word};
use crate::handle::Ref;
use crate::ring_nif::RingRes;

/// A correlation key for a caller-supplied correlation id term: the raw
/// word of an immediate (atom, small integer, local pid), else its phash2
/// shifted so it never equals an immediate's word. Never 0.
#[inline]
pub(crate) fn corr_key(t: Term) -> u64 {
    let w = t.as_c_arg();
    if is_immediate(w) {
        word(w)
    } else {
        ((t.hash_phash2() as u64) << 2) | (1 << 63)
    }
}

/// The raw word of the calling process's pid.
#[inline]
fn self_word(env: Env) -> u64 {
    word(env.pid().encode(env).as_c_arg())
}

/// Longest argument list whose length is counted exactly; longer lists
/// (no real call has more than 255 arguments) record this value.
const MAX_COUNTED_ARITY: i64 = 65_535;

#[rustler::nif]
fn ing_function_call<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    module: Term<'a>,
    function: Term<'a>,
    call_args: Term<'a>,
    caller_pid: Term<'a>,
    correlation_id: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::FunctionCall, |ev, enc| {
        ev.module = imm_word(module.as_c_arg());
        ev.function = imm_word(function.as_c_arg());
        ev.pid = imm_word(caller_pid.as_c_arg());
        ev.peer = corr_key(correlation_id);
        ev.aux = list_cells(call_args, MAX_COUNTED_ARITY);
        enc.field(call_args);
        enc.field(caller_pid);
        enc.field(correlation_id);
    })
}

#[rustler::nif]
fn ing_function_return<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    return_value: Term<'a>,
    duration_ns: i64,
    correlation_id: Term<'a>,
) -> Term<'a> {
    let me = self_word(env);
    rb.push(env, EventKind::FunctionReturn, |ev, enc| {
        ev.pid = me;
        ev.peer = corr_key(correlation_id);
        ev.aux = duration_ns;
        enc.field_whole(return_value);
        enc.field(correlation_id);
    })
}

#[rustler::nif]
fn ing_process_spawn<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    parent_pid: Term<'a>,
    child_pid: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::ProcessSpawn, |ev, enc| {
        ev.pid = imm_word(child_pid.as_c_arg());
        ev.peer = imm_word(parent_pid.as_c_arg());
        enc.field(child_pid);
        enc.field(parent_pid);
    })
}

#[rustler::nif]
fn ing_message_send<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    from_pid: Term<'a>,
    to_pid: Term<'a>,
    message: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::MessageSend, |ev, enc| {
        ev.pid = imm_word(from_pid.as_c_arg());
        ev.peer = imm_word(to_pid.as_c_arg());
        enc.field(from_pid);
        enc.field(to_pid);
        ev.aux = enc.field_hashed(message) as i64;
    })
}

/// A message taken from `receiver_pid`'s mailbox; matched to its send by
/// the message's content hash.
#[rustler::nif]
fn ing_message_receive<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    receiver_pid: Term<'a>,
    message: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::MessageReceive, |ev, enc| {
        ev.pid = imm_word(receiver_pid.as_c_arg());
        enc.field(receiver_pid);
        ev.aux = enc.field_hashed(message) as i64;
    })
}

#[rustler::nif]
fn ing_process_exit<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    pid: Term<'a>,
    reason: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::ProcessExit, |ev, enc| {
        ev.pid = imm_word(pid.as_c_arg());
        enc.field(pid);
        enc.field_whole(reason);
    })
}

/// A function left by an exception (`kind` is `:error | :exit | :throw`).
#[rustler::nif]
fn ing_function_exception<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    kind: Term<'a>,
    reason: Term<'a>,
    duration_ns: i64,
    correlation_id: Term<'a>,
) -> Term<'a> {
    let me = self_word(env);
    rb.push(env, EventKind::FunctionException, |ev, enc| {
        ev.pid = me;
        ev.peer = corr_key(correlation_id);
        ev.aux = duration_ns;
        enc.field(kind);
        enc.field_whole(reason);
        enc.field(correlation_id);
    })
}

#[rustler::nif]
fn ing_state_change<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    server_pid: Term<'a>,
    old_state: Term<'a>,
    new_state: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::StateChange, |ev, enc| {
        ev.pid = imm_word(server_pid.as_c_arg());
        // SAFETY: both terms belong to the calling env.
        let same = unsafe { enif_compare(old_state.as_c_arg(), new_state.as_c_arg()) } == 0;
        ev.aux = if same { 0 } else { 1 };
        enc.field(server_pid);
        // States are cut value by value (a state record keeps the parts
        // that fit, for `Analysis.state_at/3` and its diffs).
        enc.field(old_state);
        enc.field(new_state);
    })
}

#[rustler::nif]
fn ing_performance_metric<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    name: Term<'a>,
    value: Term<'a>,
    metadata: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::PerformanceMetric, |_, enc| {
        enc.field(name);
        enc.field(value);
        enc.field(metadata);
    })
}

#[rustler::nif]
fn ing_error<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    error_type: Term<'a>,
    message: Term<'a>,
    stacktrace: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::Error, |_, enc| {
        enc.field_whole(error_type);
        enc.field_whole(message);
        enc.field_whole(stacktrace);
    })
}

/// A process's state taken now (`%StateSnapshot{}`): a state record.
#[rustler::nif]
fn ing_state_snapshot<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    server_pid: Term<'a>,
    state: Term<'a>,
    reason: Term<'a>,
    sequence_number: Term<'a>,
) -> Term<'a> {
    rb.push(env, EventKind::StateSnapshot, |ev, enc| {
        crate::ring_nif::fill_snapshot(ev, enc, [server_pid, state, reason, sequence_number])
    })
}
