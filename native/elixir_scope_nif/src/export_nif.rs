//! `export_file`: `ElixirScope.Export` over the engine's exporters
//! (`elixir_scope_core::export`); this module only maps arguments, words
//! (through the trace-file symbolizer) and errors. Runs on a dirty I/O
//! scheduler; the export takes the store's lock in chunks, so ingestion
//! goes on.

use elixir_scope_core::export::{self, ExportOptions, Format, Weight};
use elixir_scope_core::tracefile::FileError;
use rustler::types::map::map_new;
use rustler::{Atom, Binary, Encoder, Env, NifResult, Term};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{badarg, badarg_err};
use crate::handle::Ref;
use crate::portable::BeamSymbolizer;
use crate::store_nif::{term_key, StoreRes};
use crate::tracefile_nif::file_error;

mod atoms {
    rustler::atoms! {
        ok,
        chrome_trace,
        speedscope,
        folded,
        flamegraph,
        own_time,
        calls,
        events,
        unfinished,
        unwound,
        orphans,
        instants,
        flows,
        processes,
        nodes,
        frames,
        stacks,
        untracked,
        bytes,
    }
}

/// Export `store` to `path`: `opts` is `{weight, preview_bytes,
/// max_depth, process_roots, title, home_node}`, `names` a list of `{pid,
/// name}`.
#[rustler::nif(schedule = "DirtyIo")]
fn export_file<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    path: Binary<'a>,
    format: Atom,
    opts: Term<'a>,
    names: Term<'a>,
) -> NifResult<Term<'a>> {
    let format = if format == atoms::chrome_trace() {
        Format::ChromeTrace
    } else if format == atoms::speedscope() {
        Format::Speedscope
    } else if format == atoms::folded() {
        Format::Folded
    } else if format == atoms::flamegraph() {
        Format::Flamegraph
    } else {
        return badarg(
            env,
            "format must be :chrome_trace, :speedscope, :folded or :flamegraph",
        );
    };
    let (weight, preview_bytes, max_depth, process_roots, title, home): (
        Atom,
        u64,
        u64,
        bool,
        String,
        String,
    ) = opts
        .decode()
        .map_err(|_| badarg_err(env, "malformed export options"))?;
    let weight = if weight == atoms::own_time() {
        Weight::OwnTime
    } else if weight == atoms::calls() {
        Weight::Calls
    } else {
        return badarg(env, "weight must be :own_time or :calls");
    };
    if !(8..=1 << 20).contains(&preview_bytes) || !(1..=1 << 16).contains(&max_depth) {
        return badarg(env, "preview_bytes or max_depth out of range");
    }
    let mut list: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut rest = names;
    while let Ok((h, t)) = rest.list_get_cell() {
        let (pid, name): (Term, String) = h
            .decode()
            .map_err(|_| badarg_err(env, "names must be {pid, name} tuples"))?;
        list.push((term_key(pid), name.into_bytes()));
        rest = t;
    }
    let opts = ExportOptions {
        format,
        weight,
        preview_bytes: preview_bytes as usize,
        max_depth: max_depth as usize,
        process_roots,
        title,
        home_node: home.into_bytes(),
        ..ExportOptions::default()
    };
    let store = s.shared_store(env)?;
    let p = Path::new(OsStr::from_bytes(path.as_slice()));
    let mut sym = BeamSymbolizer::new(env);
    match export::export_to_path(store, p, &list, &mut sym, &opts) {
        Ok(sum) => {
            let m = map_new(env)
                .map_put(atoms::events(), sum.events)?
                .map_put(atoms::calls(), sum.calls)?
                .map_put(atoms::unfinished(), sum.unfinished)?
                .map_put(atoms::unwound(), sum.unwound)?
                .map_put(atoms::orphans(), sum.orphans)?
                .map_put(atoms::instants(), sum.instants)?
                .map_put(atoms::flows(), sum.flows)?
                .map_put(atoms::processes(), sum.processes)?
                .map_put(atoms::nodes(), sum.nodes)?
                .map_put(atoms::frames(), sum.frames)?
                .map_put(atoms::stacks(), sum.stacks)?
                .map_put(atoms::untracked(), sum.untracked)?
                .map_put(atoms::bytes(), sum.bytes)?;
            Ok((atoms::ok(), m).encode(env))
        }
        Err(e) => file_error(env, &FileError::io(&e, 0)),
    }
}
