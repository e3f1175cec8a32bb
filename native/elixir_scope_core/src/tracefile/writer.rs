//! Saving a store: a scan in chunks, each under the store's lock for a
//! moment, encoded into blocks that are compressed and written with the
//! lock released — the store is never copied and ingestion never stops.
//!
//! The file holds the events stored when the save started (sequence
//! numbers below the store's `next_seq` then) that are still stored when
//! the scan reaches them; events evicted in between are counted in the
//! trailer (`skipped`), events stored after the start are left out.

use super::block::{tag, write_block, Codec, Compressor, MAX_RAW};
use super::events::{BlockEncoder, Unportable};
use super::symbols::{SymbolWriter, Symbolizer};
use super::{FileHeader, StoreSnapshot, Trailer, MAGIC, PREAMBLE, VERSION_MAJOR, VERSION_MINOR};
use crate::store::EventStore;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How to save.
#[derive(Clone, Copy, Debug)]
pub struct SaveOptions {
    /// Block compression.
    pub codec: Codec,
    /// Zstandard level.
    pub level: i32,
    /// Events per block.
    pub block_events: usize,
    /// Records visited per hold of the store lock.
    pub lock_chunk: usize,
    /// `fsync` the file before renaming it into place.
    pub sync: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            codec: Codec::default(),
            level: 1,
            block_events: 16_384,
            lock_chunk: 4096,
            sync: true,
        }
    }
}

/// What a save wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaveSummary {
    /// Events written.
    pub events: u64,
    /// Events evicted before the scan reached them.
    pub skipped: u64,
    /// Blocks, header and trailer included.
    pub blocks: u64,
    /// File size.
    pub bytes: u64,
    /// Symbols defined.
    pub symbols: u64,
    /// Event-block bytes before compression.
    pub raw_event_bytes: u64,
}

/// Why a save failed.
#[derive(Debug)]
pub enum SaveError {
    /// Writing failed.
    Io(io::Error),
    /// The binding could not make a word portable.
    Unportable(Unportable),
}

impl From<io::Error> for SaveError {
    fn from(e: io::Error) -> Self {
        SaveError::Io(e)
    }
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaveError::Io(e) => write!(f, "{e}"),
            SaveError::Unportable(u) => {
                write!(f, "event {}: word {:#x} cannot be saved", u.id, u.word)
            }
        }
    }
}

/// An event block is written once it holds this many bytes (or
/// `block_events` events), so blocks stay far below [`MAX_RAW`].
pub const BLOCK_BYTES: usize = 4 << 20;

fn lock(store: &Mutex<EventStore>) -> std::sync::MutexGuard<'_, EventStore> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

struct Out<W: Write> {
    w: W,
    comp: Compressor,
    bytes: u64,
    blocks: u64,
}

impl<W: Write> Out<W> {
    fn block(&mut self, tag: u8, raw: &[u8], count: u32, a: u64, b: u64) -> io::Result<()> {
        self.bytes += write_block(&mut self.w, &mut self.comp, tag, raw, count, a, b)?;
        self.blocks += 1;
        Ok(())
    }

    /// Header and trailer blocks are never compressed (readable alone).
    fn plain_block(&mut self, tag: u8, raw: &[u8]) -> io::Result<()> {
        let mut none = Compressor::new(Codec::None, 0)?;
        self.bytes += write_block(&mut self.w, &mut none, tag, raw, 0, 0, 0)?;
        self.blocks += 1;
        Ok(())
    }

    fn symbols(&mut self, syms: &mut SymbolWriter) -> io::Result<()> {
        if let Some(p) = syms.pending() {
            let (first, count) = (p.first, p.count);
            let bytes = p.bytes.to_vec();
            self.block(tag::SYMBOLS, &bytes, count, first as u64, 0)?;
            syms.clear_pending();
        }
        Ok(())
    }
}

/// Save the store to `w`: `header` gives everything but the store fields
/// (filled in here), `names` the processes' names (pid word, UTF-8 name).
pub fn save<W: Write, S: Symbolizer>(
    store: &Mutex<EventStore>,
    w: W,
    header: &FileHeader,
    names: &[(u64, Vec<u8>)],
    sym: &mut S,
    opts: &SaveOptions,
) -> Result<SaveSummary, SaveError> {
    let (snapshot, end) = {
        let s = lock(store);
        let st = s.stats();
        let cfg = s.config();
        (
            StoreSnapshot {
                max_events: cfg.max_events as u64,
                max_age_ns: cfg.max_age_ns,
                live: st.total as u64,
                inserted: st.inserted,
                evicted: st.evicted,
                expired: st.expired,
                duplicates: st.duplicates,
                rejected: st.rejected,
            },
            s.next_seq(),
        )
    };
    let mut out = Out {
        w,
        comp: Compressor::new(opts.codec, opts.level)?,
        bytes: 0,
        blocks: 0,
    };
    let mut pre = Vec::with_capacity(PREAMBLE);
    pre.extend_from_slice(&MAGIC);
    pre.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    pre.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    pre.extend_from_slice(&0u32.to_le_bytes());
    out.w.write_all(&pre)?;
    out.bytes += pre.len() as u64;
    let h = FileHeader {
        store: snapshot,
        codec: opts.codec,
        block_events: opts.block_events as u32,
        ..header.clone()
    };
    out.plain_block(tag::HEADER, &h.encode())?;

    let mut syms = SymbolWriter::new();
    let mut named = Vec::new();
    for (pid, name) in names {
        if let Some(n) = syms.pid(*pid, sym) {
            super::bytes::put_varint(&mut named, n as u64);
            super::bytes::put_bytes(&mut named, name);
        }
    }
    if !named.is_empty() {
        out.symbols(&mut syms)?;
        out.block(tag::NAMES, &named, names.len() as u32, 0, 0)?;
    }

    let mut enc = BlockEncoder::new();
    let mut raw = Vec::new();
    let mut trailer = Trailer {
        min_ts: i64::MAX,
        max_ts: i64::MIN,
        min_id: u64::MAX,
        ..Trailer::default()
    };
    let mut raw_event_bytes = 0u64;
    let mut flush = |enc: &mut BlockEncoder,
                     syms: &mut SymbolWriter,
                     out: &mut Out<W>,
                     trailer: &mut Trailer|
     -> io::Result<()> {
        if enc.is_empty() {
            return Ok(());
        }
        out.symbols(syms)?;
        let count = enc.len();
        let (min_id, max_small) = (enc.min_id, enc.max_small_id);
        trailer.events += count as u64;
        trailer.min_ts = trailer.min_ts.min(enc.min_ts);
        trailer.max_ts = trailer.max_ts.max(enc.max_ts);
        trailer.min_id = trailer.min_id.min(enc.min_id);
        trailer.max_id = trailer.max_id.max(enc.max_id);
        enc.finish(&mut raw);
        if raw.len() > MAX_RAW {
            return Err(io::Error::other(format!(
                "an event block of {} bytes exceeds the format's {MAX_RAW}",
                raw.len()
            )));
        }
        raw_event_bytes += raw.len() as u64;
        out.block(tag::EVENTS, &raw, count, min_id, max_small)
    };

    let mut cursor = 0u64;
    let chunk = opts.lock_chunk.max(1);
    let block_events = opts.block_events.max(1);
    loop {
        let mut failed: Option<Unportable> = None;
        // The first record left for the next block (this one is full).
        let mut resume: Option<u64> = None;
        let next = {
            let s = lock(store);
            let room = (block_events - enc.len() as usize).min(chunk);
            s.scan(cursor, room, |e| {
                if e.seq >= end || failed.is_some() || resume.is_some() {
                    return;
                }
                if enc.len() as usize >= block_events || enc.bytes() >= BLOCK_BYTES {
                    resume = Some(e.seq);
                    return;
                }
                if let Err(u) = enc.push(e, &mut syms, sym) {
                    failed = Some(u);
                }
            })
        };
        if let Some(u) = failed {
            return Err(SaveError::Unportable(u));
        }
        let next = resume.or(next);
        let done = next.map_or(true, |n| n >= end);
        if enc.len() as usize >= block_events || enc.bytes() >= BLOCK_BYTES || done {
            flush(&mut enc, &mut syms, &mut out, &mut trailer)?;
        }
        if done {
            break;
        }
        cursor = next.expect("not done");
    }
    let (st, gaps) = {
        let s = lock(store);
        (s.stats(), s.state_gaps())
    };
    if !gaps.is_empty() {
        let mut g = Vec::new();
        let mut n = 0u32;
        for (pid, from, until) in gaps {
            let Ok(code) = syms.header_word(pid, sym) else {
                continue;
            };
            code.put(&mut g);
            super::bytes::put_varint(&mut g, super::bytes::zigzag(from));
            super::bytes::put_varint(&mut g, super::bytes::zigzag(until));
            n += 1;
        }
        out.symbols(&mut syms)?;
        out.block(tag::STATE_GAPS, &g, n, 0, 0)?;
    }
    trailer.skipped = snapshot.live.saturating_sub(trailer.events);
    trailer.symbols = syms.len() as u64;
    trailer.inserted = st.inserted;
    trailer.evicted = st.evicted;
    trailer.expired = st.expired;
    trailer.duplicates = st.duplicates;
    out.symbols(&mut syms)?;
    trailer.blocks = out.blocks;
    out.plain_block(tag::TRAILER, &trailer.encode())?;
    out.w.flush()?;
    Ok(SaveSummary {
        events: trailer.events,
        skipped: trailer.skipped,
        blocks: out.blocks,
        bytes: out.bytes,
        symbols: trailer.symbols,
        raw_event_bytes,
    })
}

static TEMP: AtomicU64 = AtomicU64::new(0);

/// The temporary file a save to `path` writes before renaming it into
/// place: `PATH.partial-<os pid>-<n>` (what a killed save leaves behind).
pub fn temp_path(path: &Path) -> PathBuf {
    let n = TEMP.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".partial-{}-{n}", std::process::id()));
    PathBuf::from(name)
}

/// Write the file `path` through `write`: into a temporary file next to
/// it ([`temp_path`]), synced (`sync`), then renamed over `path`, so
/// `path` is either its old self or the complete new file. On error the
/// temporary file is removed. A directory at `path` is `EISDIR`.
pub fn write_atomically<T, E: From<io::Error>>(
    path: &Path,
    sync: bool,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<T, E>,
) -> Result<T, E> {
    if fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
        return Err(io::Error::from_raw_os_error(21).into()); // EISDIR
    }
    let tmp = temp_path(path);
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let out = write(&mut w)?;
        let file: File = w.into_inner().map_err(|e| e.into_error())?;
        if sync {
            file.sync_all()?;
        }
        drop(file);
        fs::rename(&tmp, path)?;
        Ok(out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Save to the file `path` ([`write_atomically`]): `path` is either its
/// old self or the complete new file.
pub fn save_to_path<S: Symbolizer>(
    store: &Mutex<EventStore>,
    path: &Path,
    header: &FileHeader,
    names: &[(u64, Vec<u8>)],
    sym: &mut S,
    opts: &SaveOptions,
) -> Result<SaveSummary, SaveError> {
    write_atomically(path, opts.sync, |w| {
        save(store, w, header, names, sym, opts)
    })
}
