//! `tf_*` NIFs: `ElixirScope.TraceFile` (save, load, info) over the
//! engine's trace-file format; this module only maps words and terms
//! (`portable`) and errors. Every file NIF runs on a dirty I/O scheduler;
//! a save takes the store's lock in chunks, so ingestion goes on.

use elixir_scope_core::tracefile::ptape::{to_local, to_portable};
use elixir_scope_core::tracefile::reader::Status;
use elixir_scope_core::tracefile::symbols::SymbolWriter;
use elixir_scope_core::tracefile::{
    self, bytes::Cursor, Codec, ErrorKind, FileError, FileHeader, LoadOptions, Resolver, SaveError,
    SaveOptions, Symbol,
};
use rustler::types::map::map_new;
use rustler::{Atom, Binary, Encoder, Env, NifResult, Term};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::atoms;
use crate::codec::{encode_into, Scratch, TapeDecoder};
use crate::error::badarg;
use crate::handle::{self, Ref};
use crate::portable::{self, BeamResolver, BeamSymbolizer};
use crate::store_nif::{term_key, Loaded, StoreRes};

/// Largest metadata term, in tape bytes.
const MAX_METADATA: usize = 1 << 20;

fn path_of<'a>(b: &'a Binary) -> &'a Path {
    Path::new(OsStr::from_bytes(b.as_slice()))
}

/// The posix name of an OS error number (`io` if unknown).
fn posix(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::ENOENT) => "enoent",
        Some(libc::EACCES) => "eacces",
        Some(libc::EPERM) => "eperm",
        Some(libc::EISDIR) => "eisdir",
        Some(libc::ENOTDIR) => "enotdir",
        Some(libc::ENOSPC) => "enospc",
        Some(libc::EDQUOT) => "edquot",
        Some(libc::EFBIG) => "efbig",
        Some(libc::EROFS) => "erofs",
        Some(libc::EEXIST) => "eexist",
        Some(libc::EIO) => "eio",
        Some(libc::ENAMETOOLONG) => "enametoolong",
        Some(libc::EMFILE) => "emfile",
        Some(libc::ELOOP) => "eloop",
        Some(libc::EINVAL) => "einval",
        Some(libc::EXDEV) => "exdev",
        _ => "io",
    }
}

/// An atom of the fixed reason vocabulary (error kinds, posix names),
/// all declared in `atoms` so they exist from load on: never one taken
/// from a file, never a new one.
fn fixed_atom(env: Env, name: &'static str) -> Atom {
    Atom::from_str(env, name).unwrap_or_else(|_| atoms::error())
}

/// `{:error, {reason, %{offset, block, file, detail}}}`.
pub fn file_error<'a>(env: Env<'a>, e: &FileError) -> NifResult<Term<'a>> {
    let reason = match e.kind {
        ErrorKind::Io => posix(e.os_error),
        k => k.name(),
    };
    let nil = atoms::nil().encode(env);
    let details = map_new(env)
        .map_put(atoms::offset(), e.offset)?
        .map_put(atoms::block(), e.block.map_or(nil, |b| b.encode(env)))?
        .map_put(atoms::file(), e.file)?
        .map_put(atoms::detail(), e.detail.as_str())?;
    Ok((atoms::error(), (fixed_atom(env, reason), details)).encode(env))
}

fn codec_of(env: Env, a: Atom) -> NifResult<Codec> {
    Ok(if a == atoms::zstd() {
        Codec::Zstd
    } else if a == atoms::lz4() {
        Codec::Lz4
    } else if a == atoms::none() {
        Codec::None
    } else {
        return badarg(env, "compression must be :zstd, :lz4 or :none");
    })
}

fn codec_atom(c: Codec) -> Atom {
    match c {
        Codec::None => atoms::none(),
        Codec::Lz4 => atoms::lz4(),
        Codec::Zstd => atoms::zstd(),
    }
}

/// Save the store: `header` is `{node, saved_at_ns, time_offset_ns,
/// writer, otp, metadata}`, `names` a list of `{pid, name}`.
#[allow(clippy::too_many_arguments)]
#[rustler::nif(schedule = "DirtyIo")]
fn tf_save<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    path: Binary<'a>,
    header: Term<'a>,
    names: Term<'a>,
    compression: Atom,
    level: i64,
    block_events: u64,
    sync: bool,
) -> NifResult<Term<'a>> {
    let codec = codec_of(env, compression)?;
    if !(1..=1 << 20).contains(&block_events) {
        return badarg(env, "block_events must be an integer in 1..1048576");
    }
    if !(-7..=19).contains(&level) {
        return badarg(env, "level must be an integer in -7..19");
    }
    let (node, saved_at_ns, time_offset_ns, writer, otp, metadata): (
        String,
        i64,
        i64,
        String,
        String,
        Term,
    ) = header
        .decode()
        .map_err(|_| crate::error::badarg_err(env, "malformed trace file header"))?;
    let mut sym = BeamSymbolizer::new(env);
    // The metadata term, with a symbol table of its own.
    let mut tape = Vec::new();
    if encode_into(env, &mut tape, MAX_METADATA, |enc| enc.field(metadata)) {
        return Ok((atoms::error(), atoms::metadata_too_large()).encode(env));
    }
    let mut ms = SymbolWriter::new();
    let mut meta = Vec::new();
    if to_portable(&tape, &mut meta, &mut ms, &mut sym).is_err() {
        return badarg(env, "the metadata holds a term that cannot be saved");
    }
    let mut meta_symbols = Vec::new();
    if let Some(p) = ms.pending() {
        let mut c = Cursor::new(p.bytes);
        for _ in 0..p.count {
            meta_symbols.push(Symbol::get(&mut c).map_err(|d| crate::error::badarg_err(env, d))?);
        }
    }
    let mut name_list: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut rest = names;
    while let Ok((h, t)) = rest.list_get_cell() {
        let (pid, name): (Term, String) = h
            .decode()
            .map_err(|_| crate::error::badarg_err(env, "names must be {pid, name} tuples"))?;
        name_list.push((term_key(pid), name.into_bytes()));
        rest = t;
    }
    let header = FileHeader {
        node,
        vm_id: portable::vm_id(),
        saved_at_ns,
        time_offset_ns,
        writer,
        otp,
        meta_symbols,
        metadata: meta,
        ..FileHeader::default()
    };
    let opts = SaveOptions {
        codec,
        level: level as i32,
        block_events: block_events as usize,
        sync,
        ..SaveOptions::default()
    };
    let store = s.shared_store(env)?;
    let p = path_of(&path);
    match tracefile::save_to_path(store, p, &header, &name_list, &mut sym, &opts) {
        Ok(sum) => {
            let m = map_new(env)
                .map_put(atoms::events(), sum.events)?
                .map_put(atoms::skipped(), sum.skipped)?
                .map_put(atoms::blocks(), sum.blocks)?
                .map_put(atoms::bytes(), sum.bytes)?
                .map_put(atoms::symbols(), sum.symbols)?
                .map_put(atoms::raw_event_bytes(), sum.raw_event_bytes)?;
            Ok((atoms::ok(), m).encode(env))
        }
        Err(SaveError::Io(e)) => file_error(env, &FileError::io(&e, 0)),
        Err(SaveError::Unportable(u)) => file_error(
            env,
            &FileError::new(
                ErrorKind::Unportable,
                0,
                format!("event {}: word {:#x} cannot be saved", u.id, u.word),
            ),
        ),
    }
}

/// The metadata term of a header, its atoms mapped by `r`.
fn metadata_term<'a>(
    env: Env<'a>,
    h: &FileHeader,
    r: &mut BeamResolver,
) -> Result<Term<'a>, FileError> {
    let bad = |m: tracefile::ptape::MapError| {
        FileError::new(m.kind, tracefile::PREAMBLE as u64, m.detail).in_block(0)
    };
    r.begin_file(0, h);
    let mut locals = Vec::with_capacity(h.meta_symbols.len());
    for (i, sym) in h.meta_symbols.iter().enumerate() {
        let l = r.resolve(sym, &h.meta_symbols[..i]).map_err(bad)?;
        locals.push(l);
    }
    let mut tape = Vec::new();
    to_local(&h.metadata, &mut tape, &locals, r).map_err(bad)?;
    let mut scratch = Scratch::new();
    Ok(TapeDecoder::new(&tape).next(env, &mut scratch))
}

fn header_map<'a>(env: Env<'a>, h: &FileHeader, meta: Term<'a>) -> NifResult<Term<'a>> {
    let nil = atoms::nil().encode(env);
    let st = &h.store;
    let store = map_new(env)
        .map_put(atoms::max_events(), st.max_events)?
        .map_put(
            atoms::max_age_ns(),
            st.max_age_ns.map_or(nil, |a| a.encode(env)),
        )?
        .map_put(atoms::live(), st.live)?
        .map_put(atoms::inserted(), st.inserted)?
        .map_put(atoms::evicted(), st.evicted)?
        .map_put(atoms::expired(), st.expired)?
        .map_put(atoms::duplicates(), st.duplicates)?
        .map_put(atoms::rejected(), st.rejected)?;
    map_new(env)
        .map_put(atoms::version(), tracefile::VERSION_MAJOR)?
        .map_put(atoms::node(), h.node.as_str())?
        .map_put(atoms::vm_id(), h.vm_id)?
        .map_put(atoms::saved_at_ns(), h.saved_at_ns)?
        .map_put(atoms::time_offset_ns(), h.time_offset_ns)?
        .map_put(atoms::writer(), h.writer.as_str())?
        .map_put(atoms::otp(), h.otp.as_str())?
        .map_put(atoms::compression(), codec_atom(h.codec))?
        .map_put(atoms::block_events(), h.block_events)?
        .map_put(atoms::store(), store)?
        .map_put(atoms::metadata(), meta)
}

/// `{:ok, info}` from the header block and the trailer of `path`.
#[rustler::nif(schedule = "DirtyIo")]
fn tf_info<'a>(env: Env<'a>, path: Binary<'a>, max_new_atoms: u64) -> NifResult<Term<'a>> {
    let i = match tracefile::info(path_of(&path)) {
        Ok(i) => i,
        Err(e) => return file_error(env, &e),
    };
    let mut r = BeamResolver::new(env, max_new_atoms);
    let meta = match metadata_term(env, &i.header, &mut r) {
        Ok(m) => m,
        Err(e) => return file_error(env, &e),
    };
    let nil = atoms::nil().encode(env);
    let t = i.trailer;
    let m = header_map(env, &i.header, meta)?
        .map_put(atoms::bytes(), i.bytes)?
        .map_put(atoms::complete(), t.is_some())?
        .map_put(atoms::events(), t.map_or(nil, |t| t.events.encode(env)))?
        .map_put(atoms::skipped(), t.map_or(nil, |t| t.skipped.encode(env)))?
        .map_put(atoms::blocks(), t.map_or(nil, |t| t.blocks.encode(env)))?
        .map_put(
            atoms::first_timestamp(),
            t.filter(|t| t.events > 0)
                .map_or(nil, |t| t.min_ts.encode(env)),
        )?
        .map_put(
            atoms::last_timestamp(),
            t.filter(|t| t.events > 0)
                .map_or(nil, |t| t.max_ts.encode(env)),
        )?;
    Ok((atoms::ok(), m).encode(env))
}

/// Load `paths` (a list of binaries) into a new read-only store:
/// `{:ok, store_ref, report}`; `max_events` 0 means every event.
#[rustler::nif(schedule = "DirtyIo")]
fn tf_load<'a>(
    env: Env<'a>,
    paths: Vec<Binary<'a>>,
    max_events: u64,
    strict: bool,
    max_new_atoms: u64,
) -> NifResult<Term<'a>> {
    if paths.is_empty() {
        return badarg(env, "no trace file to load");
    }
    let ps: Vec<&Path> = paths.iter().map(path_of).collect();
    let mut r = BeamResolver::new(env, max_new_atoms);
    let opts = LoadOptions {
        max_events: (max_events > 0).then_some(max_events as usize),
        strict,
    };
    let (store, report) = match tracefile::load(&ps, &mut r, &opts) {
        Ok(x) => x,
        Err(e) => return file_error(env, &e),
    };
    let nil = atoms::nil().encode(env);
    let mut files = Vec::with_capacity(report.files.len());
    for (i, f) in report.files.iter().enumerate() {
        let meta = match metadata_term(env, &f.header, &mut r) {
            Ok(m) => m,
            Err(mut e) => {
                e.file = i;
                return file_error(env, &e);
            }
        };
        let (complete, at, lost) = match f.status {
            Status::Complete(_) => (true, nil, 0),
            Status::Partial { at, lost_bytes } => (false, at.encode(env), lost_bytes),
        };
        let m = header_map(env, &f.header, meta)?
            .map_put(atoms::events(), f.events)?
            .map_put(atoms::complete(), complete)?
            .map_put(atoms::truncated_at(), at)?
            .map_put(atoms::lost_bytes(), lost)?
            .map_put(atoms::id_shift(), f.id_shift)?
            .map_put(atoms::ts_shift(), f.ts_shift)?;
        files.push(m);
    }
    let names: Vec<(u64, String)> = report
        .files
        .iter()
        .flat_map(|f| f.names.iter().cloned())
        .collect();
    let foreign = std::mem::take(&mut r.guard);
    let summary = map_new(env)
        .map_put(atoms::events(), report.inserted)?
        .map_put(atoms::stored(), report.stored)?
        .map_put(atoms::duplicates(), report.duplicates)?
        .map_put(atoms::evicted(), report.evicted)?
        .map_put(atoms::atoms_created(), r.created)?
        .map_put(atoms::foreign_processes(), foreign.len())?
        .map_put(atoms::files(), files)?;
    let res = handle::make(env, StoreRes::loaded(store, Loaded { foreign, names }));
    Ok((atoms::ok(), res, summary).encode(env))
}

/// `[{pid, name}]` of a store loaded from files (names the files held).
#[rustler::nif]
fn tf_names<'a>(env: Env<'a>, s: Ref<StoreRes>) -> NifResult<Term<'a>> {
    let out: Vec<Term> = s
        .names()
        .iter()
        .map(|(w, n)| {
            // SAFETY: `word_term` returns a term valid in `env`.
            let pid = unsafe { Term::new(env, portable::word_term(env, *w)) };
            (pid, n.as_str()).encode(env)
        })
        .collect();
    Ok(out.encode(env))
}

/// The processes of a store's pid index (each once).
#[rustler::nif(schedule = "DirtyCpu")]
fn tf_store_pids<'a>(env: Env<'a>, s: Ref<StoreRes>) -> NifResult<Term<'a>> {
    let words: Vec<u64> = s.lock(env)?.pids().collect();
    let out: Vec<Term> = words
        .into_iter()
        .filter(|&w| w != 0)
        // SAFETY: `word_term` returns a term valid in `env`.
        .map(|w| unsafe { Term::new(env, portable::word_term(env, w)) })
        .filter(|t| t.is_pid())
        .collect();
    Ok(out.encode(env))
}

/// `{atoms created by loads, their bound, this VM's file identity}`.
#[rustler::nif]
fn tf_limits(env: Env) -> Term {
    (
        portable::atoms_created(),
        portable::MAX_FILE_ATOMS,
        portable::vm_id(),
    )
        .encode(env)
}
