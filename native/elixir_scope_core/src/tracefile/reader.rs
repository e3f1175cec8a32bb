//! Reading a trace file block by block, checking everything.
//!
//! Nothing read from the file is trusted before it is checked: a block
//! header by its own CRC and its lengths against [`MAX_RAW`], the ratio
//! bound and the bytes left in the file (so no allocation exceeds what
//! the file can justify), a payload by its CRC and exact decompressed
//! size, and the contents field by field. A file that ends early (no
//! trailer; a block cut short) reads up to its last complete block and
//! reports [`Status::Partial`]; anything else wrong is a [`FileError`]
//! naming the block and its offset.

use super::block::{tag, BlockHeader, Decompressor, BLOCK_HEADER, MAX_RAW};
use super::bytes::Cursor;
use super::events::{decode, DecodedBlock};
use super::ptape::check_structure;
use super::symbols::{Symbol, WordCode};
use super::{
    ErrorKind, FileError, FileHeader, Trailer, MAGIC, PREAMBLE, TRAILER_BYTES, VERSION_MAJOR,
};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// How a file ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A complete file: its trailer.
    Complete(Trailer),
    /// Cut short: the offset of the first incomplete block and the bytes
    /// from there to the end of the file (ignored).
    Partial {
        /// Where the incomplete part starts.
        at: u64,
        /// Bytes ignored.
        lost_bytes: u64,
    },
}

/// One block's contents, as read.
pub enum Item<'a> {
    /// Symbols `first..first + count` were defined (see
    /// [`Reader::symbols`]).
    Symbols {
        /// First new symbol.
        first: u32,
        /// How many.
        count: u32,
    },
    /// Process names: (pid symbol, name).
    Names(&'a [(u32, String)]),
    /// A block of events.
    Events(&'a DecodedBlock),
    /// State records missing from the saved store: (pid, first, last
    /// timestamp).
    StateGaps(&'a [(WordCode, i64, i64)]),
}

/// A trace file being read.
pub struct Reader<R: Read> {
    r: R,
    pos: u64,
    len: u64,
    header: FileHeader,
    next_block: u64,
    symbols: Vec<Symbol>,
    names: Vec<(u32, String)>,
    gaps: Vec<(WordCode, i64, i64)>,
    stored: Vec<u8>,
    raw: Vec<u8>,
    dec: Decompressor,
    block: DecodedBlock,
    events_seen: u64,
    status: Option<Status>,
}

fn io_err(e: std::io::Error, at: u64) -> FileError {
    FileError::io(&e, at)
}

/// Read the preamble (checking magic and version).
fn preamble<R: Read>(r: &mut R, len: u64) -> Result<(), FileError> {
    let mut pre = [0u8; PREAMBLE];
    if len < PREAMBLE as u64 {
        let n = (len as usize).min(PREAMBLE);
        r.read_exact(&mut pre[..n]).map_err(|e| io_err(e, 0))?;
        if pre[..n.min(8)] != MAGIC[..n.min(8)] || n == 0 {
            return Err(FileError::new(
                ErrorKind::NotATraceFile,
                0,
                "the file does not start with the trace file magic bytes",
            ));
        }
        return Err(FileError::new(
            ErrorKind::Truncated,
            len,
            "the file ends inside its preamble",
        ));
    }
    r.read_exact(&mut pre).map_err(|e| io_err(e, 0))?;
    if pre[..8] != MAGIC {
        return Err(FileError::new(
            ErrorKind::NotATraceFile,
            0,
            "the file does not start with the trace file magic bytes",
        ));
    }
    let major = u16::from_le_bytes([pre[8], pre[9]]);
    if major != VERSION_MAJOR {
        return Err(FileError::new(
            ErrorKind::UnsupportedVersion,
            8,
            format!("format version {major} (this reader reads version {VERSION_MAJOR})"),
        ));
    }
    let flags = u32::from_le_bytes(pre[12..16].try_into().expect("4"));
    if flags != 0 {
        return Err(FileError::new(
            ErrorKind::UnsupportedVersion,
            12,
            format!("unknown format flags {flags:#x}"),
        ));
    }
    Ok(())
}

impl Reader<BufReader<File>> {
    /// Open `path` and read its header block.
    pub fn open_path(path: &Path) -> Result<Reader<BufReader<File>>, FileError> {
        let f = File::open(path).map_err(|e| io_err(e, 0))?;
        let meta = f.metadata().map_err(|e| io_err(e, 0))?;
        if meta.is_dir() {
            return Err(FileError::io(&std::io::Error::from_raw_os_error(21), 0));
        }
        Reader::new(BufReader::with_capacity(1 << 18, f), meta.len())
    }
}

impl<R: Read> Reader<R> {
    /// Read the preamble and header block of a file of `len` bytes.
    pub fn new(mut r: R, len: u64) -> Result<Reader<R>, FileError> {
        preamble(&mut r, len)?;
        let mut rd = Reader {
            r,
            pos: PREAMBLE as u64,
            len,
            header: FileHeader::default(),
            next_block: 0,
            symbols: Vec::new(),
            names: Vec::new(),
            gaps: Vec::new(),
            stored: Vec::new(),
            raw: Vec::new(),
            dec: Decompressor::default(),
            block: DecodedBlock::default(),
            events_seen: 0,
            status: None,
        };
        let at = rd.pos;
        let h = match rd.read_block()? {
            Some(h) => h,
            None => {
                return Err(FileError::new(
                    ErrorKind::Truncated,
                    at,
                    "the file ends inside its header block",
                ))
            }
        };
        if h.tag != tag::HEADER {
            return Err(FileError::new(
                ErrorKind::Malformed,
                at,
                "the first block is not a header block",
            )
            .in_block(0));
        }
        rd.header = FileHeader::decode(&rd.raw)
            .map_err(|d| FileError::new(ErrorKind::Malformed, at, d).in_block(0))?;
        rd.status = None;
        Ok(rd)
    }

    /// The file's header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Symbols defined so far.
    pub fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// How the file ended (once [`Reader::next_item`] returned `None`).
    pub fn status(&self) -> Option<Status> {
        self.status
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Blocks read so far (the header block included): the index of the
    /// next block.
    pub fn blocks_read(&self) -> u64 {
        self.next_block
    }

    /// The last event block read (for the loader, which maps it in place).
    pub(crate) fn block_mut(&mut self) -> &mut DecodedBlock {
        &mut self.block
    }

    /// Read the next block's header and payload (decompressed into
    /// `self.raw`); `None` at a cut-short end (status set).
    fn read_block(&mut self) -> Result<Option<BlockHeader>, FileError> {
        let at = self.pos;
        let b = self.next_block;
        let left = self.len - self.pos;
        if left < BLOCK_HEADER as u64 {
            self.status = Some(Status::Partial {
                at,
                lost_bytes: left,
            });
            return Ok(None);
        }
        let mut hb = [0u8; BLOCK_HEADER];
        self.r.read_exact(&mut hb).map_err(|e| io_err(e, at))?;
        let h = BlockHeader::decode(&hb)
            .map_err(|d| FileError::new(ErrorKind::BadBlock, at, d).in_block(b))?;
        if h.stored_len as u64 > left - BLOCK_HEADER as u64 {
            self.status = Some(Status::Partial {
                at,
                lost_bytes: left,
            });
            return Ok(None);
        }
        debug_assert!(h.raw_len as usize <= MAX_RAW);
        self.stored.clear();
        self.stored.resize(h.stored_len as usize, 0);
        self.r
            .read_exact(&mut self.stored)
            .map_err(|e| io_err(e, at))?;
        if crc32fast::hash(&self.stored) != h.payload_crc {
            return Err(FileError::new(
                ErrorKind::ChecksumMismatch,
                at,
                "block payload checksum mismatch",
            )
            .in_block(b));
        }
        self.dec
            .decompress(h.codec, &self.stored, h.raw_len as usize, &mut self.raw)
            .map_err(|d| FileError::new(ErrorKind::Decompress, at, d).in_block(b))?;
        self.pos += (BLOCK_HEADER + h.stored_len as usize) as u64;
        self.next_block += 1;
        Ok(Some(h))
    }

    /// The next block's contents; `None` at the end (see
    /// [`Reader::status`]).
    pub fn next_item(&mut self) -> Result<Option<Item<'_>>, FileError> {
        {
            if self.status.is_some() {
                return Ok(None);
            }
            let at = self.pos;
            let b = self.next_block;
            let Some(h) = self.read_block()? else {
                return Ok(None);
            };
            let bad = |kind: ErrorKind, d: String| FileError::new(kind, at, d).in_block(b);
            match h.tag {
                tag::SYMBOLS => {
                    if h.a != self.symbols.len() as u64 {
                        return Err(bad(
                            ErrorKind::Malformed,
                            format!("symbols numbered from {} after {}", h.a, self.symbols.len()),
                        ));
                    }
                    let mut c = Cursor::new(&self.raw);
                    for _ in 0..h.count {
                        let s = Symbol::get(&mut c).map_err(|d| bad(ErrorKind::BadSymbol, d))?;
                        s.check_refs(&self.symbols)
                            .map_err(|d| bad(ErrorKind::BadSymbol, d))?;
                        self.symbols.push(s);
                    }
                    if !c.is_empty() {
                        return Err(bad(ErrorKind::Malformed, "bytes after the symbols".into()));
                    }
                    Ok(Some(Item::Symbols {
                        first: h.a as u32,
                        count: h.count,
                    }))
                }
                tag::NAMES => {
                    self.names.clear();
                    let mut c = Cursor::new(&self.raw);
                    for _ in 0..h.count {
                        let short = |_| bad(ErrorKind::Malformed, "names cut short".into());
                        let n = c.varint().map_err(short)?;
                        let name = c.bytes().map_err(short)?;
                        if !matches!(
                            self.symbols.get(n as usize),
                            Some(Symbol::Pid { .. } | Symbol::Port { .. })
                        ) {
                            return Err(bad(
                                ErrorKind::BadSymbol,
                                format!("name of symbol {n}, not a process"),
                            ));
                        }
                        let name = std::str::from_utf8(name)
                            .map_err(|_| bad(ErrorKind::Malformed, "name is not UTF-8".into()))?;
                        self.names
                            .push((n as u32, name.chars().take(256).collect()));
                    }
                    if !c.is_empty() {
                        return Err(bad(ErrorKind::Malformed, "bytes after the names".into()));
                    }
                    Ok(Some(Item::Names(&self.names)))
                }
                tag::EVENTS => {
                    decode(&self.raw, h.count as usize, &mut self.block)
                        .map_err(|d| bad(ErrorKind::Malformed, d))?;
                    self.check_events(h.a, h.b).map_err(|(k, d)| bad(k, d))?;
                    self.events_seen += h.count as u64;
                    Ok(Some(Item::Events(&self.block)))
                }
                tag::STATE_GAPS => {
                    self.gaps.clear();
                    let mut c = Cursor::new(&self.raw);
                    for _ in 0..h.count {
                        let short = |_| bad(ErrorKind::Malformed, "state gaps cut short".into());
                        let pid = WordCode::get(&mut c).map_err(short)?;
                        let from = c.zigzag().map_err(short)?;
                        let until = c.zigzag().map_err(short)?;
                        if let WordCode::Sym(n) = pid {
                            if !matches!(
                                self.symbols.get(n as usize),
                                Some(Symbol::Pid { .. } | Symbol::Port { .. })
                            ) {
                                return Err(bad(
                                    ErrorKind::BadSymbol,
                                    format!("state gap of symbol {n}, not a process"),
                                ));
                            }
                        }
                        self.gaps.push((pid, from, until));
                    }
                    if !c.is_empty() {
                        return Err(bad(
                            ErrorKind::Malformed,
                            "bytes after the state gaps".into(),
                        ));
                    }
                    Ok(Some(Item::StateGaps(&self.gaps)))
                }
                tag::TRAILER => {
                    let t = Trailer::decode(&self.raw).map_err(|d| bad(ErrorKind::Malformed, d))?;
                    if t.events != self.events_seen || t.blocks != b {
                        return Err(bad(
                            ErrorKind::Malformed,
                            format!(
                                "trailer counts {} events in {} blocks, the file holds {} in {}",
                                t.events, t.blocks, self.events_seen, b
                            ),
                        ));
                    }
                    if self.pos != self.len {
                        return Err(FileError::new(
                            ErrorKind::Malformed,
                            self.pos,
                            format!("{} bytes after the trailer", self.len - self.pos),
                        ));
                    }
                    self.status = Some(Status::Complete(t));
                    Ok(None)
                }
                _ => Err(bad(ErrorKind::Malformed, "a second header block".into())),
            }
        }
    }

    /// Check an event block's words against the symbol table, its payloads'
    /// structure and its id bounds against the block header.
    fn check_events(&self, min_id: u64, max_small: u64) -> Result<(), (ErrorKind, String)> {
        let syms = &self.symbols;
        let word = |w: WordCode| match w {
            WordCode::Sym(n) => match syms.get(n as usize) {
                Some(Symbol::Pair { .. }) => Err(format!("symbol {n} used as a word")),
                Some(_) => Ok(()),
                None => Err(format!("undefined symbol {n}")),
            },
            _ => Ok(()),
        };
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        for e in &self.block.events {
            word(e.pid).map_err(|d| (ErrorKind::BadSymbol, d))?;
            word(e.peer).map_err(|d| (ErrorKind::BadSymbol, d))?;
            if e.mf != 0 && !matches!(syms.get(e.mf as usize - 1), Some(Symbol::Pair { .. })) {
                return Err((
                    ErrorKind::BadSymbol,
                    format!("function symbol {}", e.mf - 1),
                ));
            }
            check_structure(self.block.payload_of(e))
                .map_err(|d| (ErrorKind::BadTerm, format!("event {}: {d}", e.id)))?;
            lo = lo.min(e.id);
            if e.id < 1 << 62 {
                hi = hi.max(e.id);
            }
        }
        if !self.block.events.is_empty() && (lo != min_id || hi != max_small) {
            return Err((
                ErrorKind::Malformed,
                format!("ids {lo}..{hi} but the block header says {min_id}..{max_small}"),
            ));
        }
        Ok(())
    }
}

/// A file's blocks surveyed from their headers only (payloads skipped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    /// Events in complete event blocks.
    pub events: u64,
    /// Smallest event id.
    pub min_id: u64,
    /// Largest event id below 2^62.
    pub max_small_id: u64,
    /// Blocks.
    pub blocks: u64,
}

/// Walk a file's block headers (checking each) to count its events and
/// id range, without reading payloads.
pub fn survey(path: &Path) -> Result<Survey, FileError> {
    let mut f = File::open(path).map_err(|e| io_err(e, 0))?;
    let len = f.metadata().map_err(|e| io_err(e, 0))?.len();
    preamble(&mut f, len)?;
    let mut pos = PREAMBLE as u64;
    let mut s = Survey {
        min_id: u64::MAX,
        ..Survey::default()
    };
    loop {
        let left = len - pos;
        if left < BLOCK_HEADER as u64 {
            break;
        }
        let mut hb = [0u8; BLOCK_HEADER];
        f.read_exact(&mut hb).map_err(|e| io_err(e, pos))?;
        let h = BlockHeader::decode(&hb)
            .map_err(|d| FileError::new(ErrorKind::BadBlock, pos, d).in_block(s.blocks))?;
        if h.stored_len as u64 > left - BLOCK_HEADER as u64 {
            break;
        }
        if h.tag == tag::EVENTS {
            s.events += h.count as u64;
            s.min_id = s.min_id.min(h.a);
            s.max_small_id = s.max_small_id.max(h.b);
        }
        s.blocks += 1;
        pos += (BLOCK_HEADER + h.stored_len as usize) as u64;
        f.seek(SeekFrom::Start(pos)).map_err(|e| io_err(e, pos))?;
        if h.tag == tag::TRAILER {
            break;
        }
    }
    Ok(s)
}

/// What [`info`] tells about a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// The header block.
    pub header: FileHeader,
    /// File size.
    pub bytes: u64,
    /// The trailer, when the file ends with a valid one (a complete file).
    pub trailer: Option<Trailer>,
}

/// Read a file's header block, and its trailer from the end of the file
/// (nothing in between).
pub fn info(path: &Path) -> Result<FileInfo, FileError> {
    let rd = Reader::open_path(path)?;
    let header = rd.header().clone();
    let len = rd.len;
    let mut f = rd.r.into_inner();
    let tail = (BLOCK_HEADER + TRAILER_BYTES) as u64;
    let mut trailer = None;
    if len >= rd.pos + tail {
        let mut b = [0u8; BLOCK_HEADER + TRAILER_BYTES];
        f.seek(SeekFrom::Start(len - tail))
            .and_then(|_| f.read_exact(&mut b))
            .map_err(|e| io_err(e, len - tail))?;
        let hb: [u8; BLOCK_HEADER] = b[..BLOCK_HEADER].try_into().expect("40");
        if let Ok(h) = BlockHeader::decode(&hb) {
            let payload = &b[BLOCK_HEADER..];
            if h.tag == tag::TRAILER
                && h.stored_len as usize == TRAILER_BYTES
                && crc32fast::hash(payload) == h.payload_crc
            {
                trailer = Trailer::decode(payload).ok();
            }
        }
    }
    Ok(FileInfo {
        header,
        bytes: len,
        trailer,
    })
}
