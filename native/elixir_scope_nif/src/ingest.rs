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
use rustler::sys::{enif_compare, ErlNifEnv, ErlNifTerm as ERL_NIF_TERM};
use rustler::{Encoder, Env, NifResult, Term};

use crate::codec::{imm_word, is_immediate, list_cells, word};
use crate::handle::Ref;
use crate::ring_nif::RingRes;

/// Registers `$name/$arity` as a NIF running `$body(env, args)`: what
/// `#[rustler::nif]` generates, minus the vector it builds of the
/// arguments on every call (a `malloc` and a `free`, ~6% of an
/// `ingest_function_call` in a perf profile). For the per-event write
/// paths. Errors and panics are returned and raised as rustler does.
macro_rules! lean_nif {
    ($name:literal, $arity:literal, $body:path) => {
        rustler::codegen_runtime::inventory::submit!(rustler::Nif {
            name: concat!($name, "\0").as_ptr() as *const rustler::codegen_runtime::c_char,
            arity: $arity,
            flags: rustler::SchedulerFlags::Normal as rustler::codegen_runtime::c_uint,
            raw_func: {
                unsafe extern "C" fn nif_func(
                    env: *mut rustler::sys::ErlNifEnv,
                    argc: rustler::codegen_runtime::c_int,
                    argv: *const rustler::sys::ErlNifTerm,
                ) -> rustler::sys::ErlNifTerm {
                    // SAFETY: called by the VM with `argc` terms at `argv`.
                    unsafe { $crate::ingest::run_lean::<$arity>(env, argc, argv, $body) }
                }
                nif_func
            },
        });
    };
}
pub(crate) use lean_nif;

/// The body of a [`lean_nif!`] NIF.
pub(crate) type LeanBody<const N: usize> =
    for<'a> fn(Env<'a>, [Term<'a>; N]) -> NifResult<Term<'a>>;

/// Run a [`lean_nif!`] body on the VM's arguments.
///
/// # Safety
/// `env` and `argv` (`argc` terms) as the VM passes them to a NIF.
#[inline(always)]
pub(crate) unsafe fn run_lean<const N: usize>(
    env: *mut ErlNifEnv,
    argc: rustler::codegen_runtime::c_int,
    argv: *const ERL_NIF_TERM,
    body: LeanBody<N>,
) -> ERL_NIF_TERM {
    let lifetime = ();
    // SAFETY: a NIF call's env, valid for this call.
    let env = unsafe { Env::new(&lifetime, env) };
    if argc as usize != N {
        // SAFETY: the call's env.
        return unsafe { rustler::sys::enif_make_badarg(env.as_c_arg()) };
    }
    // SAFETY: the VM passes `argc == N` terms of `env`.
    let args = unsafe { *(argv as *const [ERL_NIF_TERM; N]) }.map(|t| unsafe { Term::new(env, t) });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || body(env, args)));
    // SAFETY: as rustler's generated NIFs do with their result.
    unsafe { rustler::codegen_runtime::handle_nif_result(result, env).apply(env) }
}

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

fn ing_function_call<'a>(
    env: Env<'a>,
    [rb, module, function, call_args, caller_pid, correlation_id]: [Term<'a>; 6],
) -> NifResult<Term<'a>> {
    let rb: Ref<RingRes> = rb.decode()?;
    Ok(rb.push(env, EventKind::FunctionCall, |ev, enc| {
        ev.module = imm_word(module.as_c_arg());
        ev.function = imm_word(function.as_c_arg());
        ev.pid = imm_word(caller_pid.as_c_arg());
        ev.peer = corr_key(correlation_id);
        ev.aux = list_cells(call_args, MAX_COUNTED_ARITY);
        enc.field(call_args);
        enc.field(caller_pid);
        enc.field(correlation_id);
    }))
}
lean_nif!("ing_function_call", 6, ing_function_call);

/// `ing_function_call` behind rustler's generated wrapper (how every
/// `ing_*` NIF was called before #15), for the ring bench's same-run
/// comparison only.
#[rustler::nif]
fn debug_ing_function_call_wrapped<'a>(
    env: Env<'a>,
    rb: Term<'a>,
    module: Term<'a>,
    function: Term<'a>,
    call_args: Term<'a>,
    caller_pid: Term<'a>,
    correlation_id: Term<'a>,
) -> NifResult<Term<'a>> {
    ing_function_call(
        env,
        [rb, module, function, call_args, caller_pid, correlation_id],
    )
}

fn ing_function_return<'a>(
    env: Env<'a>,
    [rb, return_value, duration_ns, correlation_id]: [Term<'a>; 4],
) -> NifResult<Term<'a>> {
    let rb: Ref<RingRes> = rb.decode()?;
    let duration_ns: i64 = duration_ns.decode()?;
    let me = self_word(env);
    Ok(rb.push(env, EventKind::FunctionReturn, |ev, enc| {
        ev.pid = me;
        ev.peer = corr_key(correlation_id);
        ev.aux = duration_ns;
        enc.field_whole(return_value);
        enc.field(correlation_id);
    }))
}
lean_nif!("ing_function_return", 4, ing_function_return);

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

fn ing_message_send<'a>(
    env: Env<'a>,
    [rb, from_pid, to_pid, message]: [Term<'a>; 4],
) -> NifResult<Term<'a>> {
    let rb: Ref<RingRes> = rb.decode()?;
    Ok(rb.push(env, EventKind::MessageSend, |ev, enc| {
        ev.pid = imm_word(from_pid.as_c_arg());
        ev.peer = imm_word(to_pid.as_c_arg());
        enc.field(from_pid);
        enc.field(to_pid);
        ev.aux = enc.field_hashed(message) as i64;
    }))
}
lean_nif!("ing_message_send", 4, ing_message_send);

/// A message taken from `receiver_pid`'s mailbox; matched to its send by
/// the message's content hash.
fn ing_message_receive<'a>(
    env: Env<'a>,
    [rb, receiver_pid, message]: [Term<'a>; 3],
) -> NifResult<Term<'a>> {
    let rb: Ref<RingRes> = rb.decode()?;
    Ok(rb.push(env, EventKind::MessageReceive, |ev, enc| {
        ev.pid = imm_word(receiver_pid.as_c_arg());
        enc.field(receiver_pid);
        ev.aux = enc.field_hashed(message) as i64;
    }))
}
lean_nif!("ing_message_receive", 3, ing_message_receive);

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
