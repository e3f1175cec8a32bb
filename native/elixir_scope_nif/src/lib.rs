//! rustler binding of `elixir_scope_core` for the ElixirScope Elixir library.
//!
//! Thin by design: resource types, term <-> event conversion and error
//! mapping. Engine logic lives in `elixir_scope_core`. Every NIF here has a
//! stub in `lib/elixir_scope/native.ex`.

mod analysis_nif;
mod atoms;
mod codec;
mod corr_nif;
mod error;
mod event_term;
mod export_nif;
mod handle;
mod ingest;
mod match_spec;
mod otp;
mod pipe_nif;
mod portable;
mod query_nif;
mod ring_nif;
mod runtime_structs;
mod snap_nif;
mod store_nif;
mod sub_nif;
mod tracefile_nif;
mod tracer_nif;
mod utils_nif;
mod writer_nif;

use rustler::sys::ErlNifTerm as ERL_NIF_TERM;
use rustler::{Encoder, Env, Term};
use std::sync::atomic::{AtomicUsize, Ordering};

static NIL_WORD: AtomicUsize = AtomicUsize::new(0);

/// The raw word of `[]` (an immediate), captured at load.
#[inline(always)]
pub(crate) fn nil_word() -> ERL_NIF_TERM {
    codec::from_word(NIL_WORD.load(Ordering::Relaxed) as u64)
}

fn load(env: Env, _info: Term) -> bool {
    // Keep panics (which rustler turns into `:nif_panicked` errors) from
    // flooding stderr with backtraces; print one line instead.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("[elixir_scope_nif] caught panic: {info}");
    }));
    // The term tape stores immediates as raw words. Check the tagging
    // scheme this build relies on before accepting any data.
    let nil = Vec::<Term>::new().encode(env).as_c_arg();
    let atom = atoms::ok().encode(env).as_c_arg();
    let small = 42i64.encode(env).as_c_arg();
    let tuple = (1, 2).encode(env).as_c_arg();
    let pid = env.pid().encode(env).as_c_arg();
    let ok = [nil, atom, small, pid]
        .iter()
        .all(|&t| codec::is_immediate(t))
        && !codec::is_immediate(tuple);
    if !ok {
        eprintln!("[elixir_scope_nif] unsupported term representation; refusing to load");
        return false;
    }
    if !handle::open::<ring_nif::RingRes>(env)
        || !handle::open::<store_nif::StoreRes>(env)
        || !handle::open::<pipe_nif::PipeRes>(env)
        || !handle::open::<corr_nif::CorrRes>(env)
        || !handle::open::<tracer_nif::TracerRes>(env)
        || !handle::open::<sub_nif::SubRes>(env)
        || !handle::open::<snap_nif::SnapRes>(env)
    {
        return false;
    }
    codec::probe_layout(env);
    event_term::probe_shared_keys(env);
    utils_nif::init();
    NIL_WORD.store(codec::word(nil) as usize, Ordering::Relaxed);
    true
}

rustler::init!("Elixir.ElixirScope.Native", load = load);
