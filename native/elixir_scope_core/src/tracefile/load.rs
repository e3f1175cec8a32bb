//! Loading one or several trace files into a fresh [`EventStore`].
//!
//! Each file is surveyed first (block headers only) for its event count
//! and id range; then its blocks are read, checked, and every event is
//! mapped into this VM (symbols through the binding's [`Resolver`],
//! payloads through [`to_local`]) and inserted, so the store rebuilds all
//! its indexes. Several files are merged in timestamp order.
//!
//! * **Ids.** A file whose event ids (below 2^62) overlap those of a file
//!   loaded before it has every id-valued field (id, correlation, parent,
//!   root) in `1..=its largest id` moved up past every id placed so far,
//!   so ids stay unique and links intact. Files that do not overlap (two
//!   traces of one VM) keep their ids.
//! * **Clocks.** Files written by another VM instance than the first file
//!   have their monotonic timestamps moved onto the first file's clock
//!   through the wall-clock offsets recorded in the headers.
//! * **Term indexes.** A term record (kind 0) is stored with its
//!   event-type key (its aux) and AST-node key (its root column, files of
//!   format 1.2 on), so the loaded store answers event-type and AST-node
//!   queries as the saved one did; a file of an older format has no
//!   AST-node keys (and, before event types were indexed, a zero aux).

use super::events::{DecodedBlock, PEvent};
use super::ptape::{to_local, Local, MapError};
use super::reader::{survey, Item, Reader, Status};
use super::symbols::{Symbol, WordCode};
use super::{ErrorKind, FileError, FileHeader, TapeResolver};
use crate::event::{Event, EventKind};
use crate::store::{CorrelationFields, EventStore, StoreConfig, TermKeys, MAX_EVENTS_LIMIT};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// The binding's side of loading: mapping a file's symbols into this VM.
pub trait Resolver: TapeResolver {
    /// The following calls concern file `index` (with this header).
    fn begin_file(&mut self, index: usize, header: &FileHeader);
    /// The local form of an atom, pid or port symbol (`symbols`: the
    /// file's table so far, for a pid's node atom).
    fn resolve(&mut self, sym: &Symbol, symbols: &[Symbol]) -> Result<Local, MapError>;
    /// May this raw header word (a small integer or key in the saving VM)
    /// be stored as is?
    fn header_raw_ok(&self, w: u64) -> bool;
}

/// How to load.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Bound of the new store (default: every event of the files).
    pub max_events: Option<usize>,
    /// Refuse files that were cut short ([`ErrorKind::Incomplete`]).
    pub strict: bool,
}

/// What was loaded from one file.
#[derive(Clone, Debug)]
pub struct FileReport {
    /// Its header.
    pub header: FileHeader,
    /// Events read from it.
    pub events: u64,
    /// How it ended.
    pub status: Status,
    /// What its ids were moved by.
    pub id_shift: u64,
    /// What its timestamps were moved by (ns).
    pub ts_shift: i64,
    /// Process names it holds (local header word, name).
    pub names: Vec<(u64, String)>,
}

/// What a load did.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// One report per file, in the order given.
    pub files: Vec<FileReport>,
    /// Events inserted into the store.
    pub inserted: u64,
    /// Events the store kept (the rest: evicted by `max_events`,
    /// duplicates).
    pub stored: u64,
    /// Events whose id was already stored (ids of 2^62 and above are not
    /// moved, so two files may share one).
    pub duplicates: u64,
    /// Events evicted by a `max_events` below the files' total.
    pub evicted: u64,
}

struct Loaded {
    ev: Event,
    corr: CorrelationFields,
    /// A term record's AST-node key (0: none).
    ast: u64,
    at: u32,
    len: u32,
}

struct FileState {
    reader: Reader<BufReader<File>>,
    locals: Vec<Local>,
    buf: Vec<Loaded>,
    arena: Vec<u8>,
    next: usize,
    id_max: u64,
    id_shift: u64,
    ts_shift: i64,
    events: u64,
    names: Vec<(u64, String)>,
    /// State gaps (pid word, first, last timestamp), applied once every
    /// event is in.
    gaps: Vec<(u64, i64, i64)>,
    done: bool,
}

fn at_file(mut e: FileError, i: usize) -> FileError {
    e.file = i;
    e
}

impl FileState {
    #[inline]
    fn shift(&self, v: u64) -> u64 {
        if v != 0 && v <= self.id_max {
            v + self.id_shift
        } else {
            v
        }
    }

    fn word<R: Resolver>(&self, code: WordCode, r: &R) -> Result<u64, String> {
        match code {
            WordCode::None => Ok(0),
            WordCode::Sym(n) => self.locals[n as usize]
                .header_word()
                .ok_or_else(|| format!("symbol {n} is not a word")),
            WordCode::Raw(w) if r.header_raw_ok(w) => Ok(w),
            WordCode::Raw(w) => Err(format!("raw word {w:#x} is not portable")),
        }
    }

    fn map_event<R: Resolver>(
        &mut self,
        e: &PEvent,
        block: &DecodedBlock,
        r: &mut R,
        scratch: &mut Vec<u8>,
    ) -> Result<(), MapError> {
        let sym = |d: String| MapError {
            kind: ErrorKind::BadSymbol,
            detail: format!("event {}: {d}", e.id),
        };
        let pid = self.word(e.pid, r).map_err(sym)?;
        let peer = if crate::event::peer_is_event(e.kind, e.flags) {
            // The event that triggered an OTP callback: an id, shifted
            // with the others.
            match e.peer {
                WordCode::None => 0,
                WordCode::Raw(id) => self.shift(id),
                WordCode::Sym(_) => return Err(sym("a callback's trigger is not an id".into())),
            }
        } else {
            self.word(e.peer, r).map_err(sym)?
        };
        let (module, function) = if e.mf == 0 {
            (0, 0)
        } else {
            match &self.locals[e.mf as usize - 1] {
                Local::Pair(m, f) => (*m, *f),
                _ => return Err(sym("function symbol is not a pair".into())),
            }
        };
        let p = block.payload_of(e);
        if p.is_empty() {
            scratch.clear();
        } else {
            to_local(p, scratch, &self.locals, r).map_err(|mut m| {
                m.detail = format!("event {}: {}", e.id, m.detail);
                m
            })?;
        }
        let at = self.arena.len() as u32;
        self.arena.extend_from_slice(scratch);
        let term = e.kind == EventKind::Term as u8;
        self.buf.push(Loaded {
            ev: Event {
                id: self.shift(e.id),
                timestamp: e.timestamp.saturating_add(self.ts_shift),
                wall_time: e.wall_time,
                pid,
                peer,
                module,
                function,
                aux: e.aux,
                kind: e.kind,
                flags: e.flags,
                payload: Vec::new(),
            },
            // A term record's root is its AST-node key (a hash, never
            // shifted), its aux its event-type key.
            corr: CorrelationFields {
                correlation_id: self.shift(e.correlation_id),
                parent_id: self.shift(e.parent_id),
                root_id: if term { 0 } else { self.shift(e.root_id) },
            },
            ast: if term { e.root_id } else { 0 },
            at,
            len: scratch.len() as u32,
        });
        Ok(())
    }

    /// Read blocks until events are buffered or the file ended.
    fn fill<R: Resolver>(
        &mut self,
        index: usize,
        r: &mut R,
        scratch: &mut Vec<u8>,
    ) -> Result<(), FileError> {
        self.buf.clear();
        self.arena.clear();
        self.next = 0;
        while !self.done && self.buf.is_empty() {
            let at = self.reader.position();
            let block = self.reader_block_index();
            let fail =
                |m: MapError| at_file(FileError::new(m.kind, at, m.detail).in_block(block), index);
            r.begin_file(index, self.reader.header());
            let item = self.reader.next_item().map_err(|e| at_file(e, index))?;
            match item {
                None => self.done = true,
                Some(Item::Symbols { first, count }) => {
                    let syms = self.reader.symbols();
                    for n in first..first + count {
                        let s = &syms[n as usize];
                        let local = match s {
                            Symbol::Pair { module, function } => {
                                let m = self.word(*module, r).map_err(|d| {
                                    fail(MapError {
                                        kind: ErrorKind::BadSymbol,
                                        detail: d,
                                    })
                                })?;
                                let f = self.word(*function, r).map_err(|d| {
                                    fail(MapError {
                                        kind: ErrorKind::BadSymbol,
                                        detail: d,
                                    })
                                })?;
                                Local::Pair(m, f)
                            }
                            _ => r.resolve(s, &syms[..n as usize]).map_err(fail)?,
                        };
                        self.locals.push(local);
                    }
                }
                Some(Item::Names(names)) => {
                    let names: Vec<(u32, String)> = names.to_vec();
                    for (n, name) in names {
                        if let Some(w) = self.locals[n as usize].header_word() {
                            self.names.push((w, name));
                        }
                    }
                }
                Some(Item::StateGaps(gaps)) => {
                    let gaps = gaps.to_vec();
                    for (pid, from, until) in gaps {
                        let w = self.word(pid, r).map_err(|d| {
                            fail(MapError {
                                kind: ErrorKind::BadSymbol,
                                detail: d,
                            })
                        })?;
                        self.gaps.push((
                            w,
                            from.saturating_add(self.ts_shift),
                            until.saturating_add(self.ts_shift),
                        ));
                    }
                }
                Some(Item::Events(_)) => {
                    // Re-borrow the block after the match on `item` ends.
                    let block = std::mem::take(self.reader_block_mut());
                    let mut res = Ok(());
                    for e in &block.events {
                        if let Err(m) = self.map_event(e, &block, r, scratch) {
                            res = Err(fail(m));
                            break;
                        }
                    }
                    *self.reader_block_mut() = block;
                    res?;
                    self.events += self.buf.len() as u64;
                }
            }
        }
        Ok(())
    }

    fn reader_block_index(&self) -> u64 {
        self.reader.blocks_read()
    }

    fn reader_block_mut(&mut self) -> &mut DecodedBlock {
        self.reader.block_mut()
    }

    /// The head event's merge key.
    fn head_ts(&self) -> Option<i64> {
        self.buf.get(self.next).map(|l| l.ev.timestamp)
    }
}

fn insert(
    store: &mut EventStore,
    st: &mut FileState,
    scratch: &mut Event,
    report: &mut LoadReport,
) {
    let l = &st.buf[st.next];
    st.next += 1;
    scratch.id = l.ev.id;
    scratch.timestamp = l.ev.timestamp;
    scratch.wall_time = l.ev.wall_time;
    scratch.pid = l.ev.pid;
    scratch.peer = l.ev.peer;
    scratch.module = l.ev.module;
    scratch.function = l.ev.function;
    scratch.aux = l.ev.aux;
    scratch.kind = l.ev.kind;
    scratch.flags = l.ev.flags;
    scratch.payload.clear();
    scratch
        .payload
        .extend_from_slice(&st.arena[l.at as usize..(l.at + l.len) as usize]);
    if l.ev.kind == EventKind::Term as u8 {
        // Rebuilds the event-type and AST-node indexes.
        let keys = TermKeys {
            event_type: l.ev.aux as u64,
            ast_node: l.ast,
        };
        store.insert_term(scratch, l.corr, keys);
    } else {
        store.insert(scratch, l.corr);
    }
    report.inserted += 1;
}

/// Load `paths` into a new store (see the module documentation).
pub fn load<R: Resolver>(
    paths: &[&Path],
    r: &mut R,
    opts: &LoadOptions,
) -> Result<(EventStore, LoadReport), FileError> {
    let mut files = Vec::with_capacity(paths.len());
    let mut total = 0u64;
    let mut placed: Vec<(u64, u64)> = Vec::new();
    let mut placed_max = 0u64;
    let mut first: Option<(u64, i64)> = None;
    for (i, path) in paths.iter().enumerate() {
        let s = survey(path).map_err(|e| at_file(e, i))?;
        let reader = Reader::open_path(path).map_err(|e| at_file(e, i))?;
        let h = reader.header();
        let (vm0, off0) = *first.get_or_insert((h.vm_id, h.time_offset_ns));
        let ts_shift = if h.vm_id == vm0 {
            0
        } else {
            h.time_offset_ns.saturating_sub(off0)
        };
        let (lo, hi) = (s.min_id, s.max_small_id);
        let overlaps = s.events > 0 && placed.iter().any(|&(a, b)| lo <= b && a <= hi);
        let id_shift = if overlaps { placed_max } else { 0 };
        if s.events > 0 && hi > 0 {
            placed.push((lo.min(hi) + id_shift, hi + id_shift));
            placed_max = placed_max.max(hi + id_shift);
        }
        total += s.events;
        files.push(FileState {
            reader,
            locals: Vec::new(),
            buf: Vec::new(),
            arena: Vec::new(),
            next: 0,
            id_max: hi,
            id_shift,
            ts_shift,
            events: 0,
            names: Vec::new(),
            gaps: Vec::new(),
            done: false,
        });
    }
    let max_events = opts
        .max_events
        .unwrap_or(total as usize)
        .clamp(1, MAX_EVENTS_LIMIT);
    let mut store = EventStore::new(StoreConfig {
        max_events,
        max_age_ns: None,
    });
    let mut report = LoadReport::default();
    let mut scratch_payload = Vec::new();
    let mut ev = Event::default();
    if files.len() == 1 {
        let st = &mut files[0];
        loop {
            st.fill(0, r, &mut scratch_payload)?;
            if st.buf.is_empty() {
                break;
            }
            while st.next < st.buf.len() {
                insert(&mut store, st, &mut ev, &mut report);
            }
        }
    } else {
        let mut heap = BinaryHeap::new();
        for (i, st) in files.iter_mut().enumerate() {
            st.fill(i, r, &mut scratch_payload)?;
            if let Some(ts) = st.head_ts() {
                heap.push(Reverse((ts, i)));
            }
        }
        while let Some(Reverse((_, i))) = heap.pop() {
            let st = &mut files[i];
            insert(&mut store, st, &mut ev, &mut report);
            if st.next == st.buf.len() {
                st.fill(i, r, &mut scratch_payload)?;
            }
            if let Some(ts) = st.head_ts() {
                heap.push(Reverse((ts, i)));
            }
        }
    }
    for st in &files {
        for &(pid, from, until) in &st.gaps {
            store.add_state_gap(pid, from, until);
        }
    }
    for (i, st) in files.into_iter().enumerate() {
        let status = st.reader.status().unwrap_or(Status::Partial {
            at: st.reader.position(),
            lost_bytes: 0,
        });
        if opts.strict {
            if let Status::Partial { at, lost_bytes } = status {
                return Err(at_file(
                    FileError::new(
                        ErrorKind::Incomplete,
                        at,
                        format!("the file ends without a trailer ({lost_bytes} bytes after the last complete block)"),
                    ),
                    i,
                ));
            }
        }
        report.files.push(FileReport {
            header: st.reader.header().clone(),
            events: st.events,
            status,
            id_shift: st.id_shift,
            ts_shift: st.ts_shift,
            names: st.names,
        });
    }
    let stats = store.stats();
    report.stored = stats.total as u64;
    report.duplicates = stats.duplicates;
    report.evicted = stats.evicted;
    Ok((store, report))
}
