//! Trace files: a store's events on disk, in a documented, versioned,
//! portable binary format of our own.
//!
//! # Layout (version 1)
//!
//! ```text
//! file     = preamble block*
//! preamble = magic "\x89EST\r\n\x1a\n" (8 bytes), major u16, minor u16, flags u32 (0)
//! block    = header (40 bytes) payload (stored_len bytes)
//! header   = tag u8, codec u8, reserved u16 (0), stored_len u32, raw_len u32,
//!            count u32, a u64, b u64, payload_crc u32, header_crc u32
//! ```
//!
//! All integers are little-endian. `header_crc` is the CRC-32 of the
//! header's first 36 bytes, `payload_crc` that of the stored payload, so a
//! corrupted length is caught before it is trusted. `codec` is 0 (none),
//! 1 (LZ4 block format) or 2 (Zstandard); `raw_len` is the payload after
//! decompression (at most [`block::MAX_RAW`], at most [`block::MAX_RATIO`]
//! times `stored_len`). Blocks, in file order:
//!
//! | tag | block | count | a / b | payload |
//! |---|---|---|---|---|
//! | `H` | header (first block) | 0 | 0 | [`FileHeader`] |
//! | `S` | symbols | symbols | first symbol number / 0 | [`Symbol`]s |
//! | `N` | process names | names | 0 | (pid symbol varint, name bytes)* |
//! | `E` | events | events | smallest id / largest id below 2^62 | columns, see [`events`] |
//! | `G` | state gaps (after the events) | processes | 0 | (pid word code, zigzag first, zigzag last timestamp)*: state records the store no longer held |
//! | `X` | trailer (last block) | 0 | 0 | [`Trailer`] (fixed size, uncompressed) |
//!
//! Symbols (atoms by name, pids and ports by node and numbers, (module,
//! function) pairs) are numbered in order of definition and defined
//! before the blocks that use them, so a file is read in one pass, block
//! by block (streamable), and a reader in another VM maps every word back
//! through its own atom table. A file without a trailer was cut short (a
//! killed writer): it loads up to its last complete block.
//!
//! Major version changes are incompatible (readers refuse them); a minor
//! version adds only what older readers may ignore.

pub mod block;
pub mod bytes;
pub mod etf;
pub mod events;
pub mod load;
pub mod ptape;
pub mod reader;
pub mod symbols;
pub mod writer;

pub use block::{Codec, MAX_BLOCK_EVENTS, MAX_RATIO, MAX_RAW};
pub use events::{DecodedBlock, PEvent};
pub use load::{load, LoadOptions, LoadReport, Resolver};
pub use ptape::{Local, TapeResolver};
pub use reader::{info, FileInfo, Item, Reader, Status};
pub use symbols::{Symbol, Symbolizer, WordClass, WordCode};
pub use writer::{save, save_to_path, SaveError, SaveOptions, SaveSummary};

use bytes::{put_bytes, put_varint, zigzag, Cursor};
use std::fmt;

/// The file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"\x89EST\r\n\x1a\n";
/// Format major version written and read.
pub const VERSION_MAJOR: u16 = 1;
/// Format minor version written (1: `G` blocks; 2: the AST-node keys of
/// term records in the root column).
pub const VERSION_MINOR: u16 = 2;
/// Bytes before the first block.
pub const PREAMBLE: usize = 16;
/// Bytes of a trailer payload.
pub const TRAILER_BYTES: usize = 96;

/// The store a file was saved from: its bounds and counters when the
/// save started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreSnapshot {
    /// `max_events` bound.
    pub max_events: u64,
    /// Age bound (ns), if any.
    pub max_age_ns: Option<i64>,
    /// Live events.
    pub live: u64,
    /// Inserts.
    pub inserted: u64,
    /// Evicted by the count bound.
    pub evicted: u64,
    /// Expired by age.
    pub expired: u64,
    /// Duplicate ids ignored.
    pub duplicates: u64,
    /// Rejected (too large).
    pub rejected: u64,
}

/// The `H` block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileHeader {
    /// Node name of the VM that saved the file.
    pub node: String,
    /// Random identity of that VM instance (tells "the VM that wrote this
    /// file" from another run of the same node).
    pub vm_id: u64,
    /// Wall-clock time the save started (ns since the Unix epoch).
    pub saved_at_ns: i64,
    /// Wall clock − the monotonic clock of event timestamps (ns).
    pub time_offset_ns: i64,
    /// Writing software and version.
    pub writer: String,
    /// OTP release of the writing VM.
    pub otp: String,
    /// Bounds and counters of the saved store.
    pub store: StoreSnapshot,
    /// Compression of the blocks.
    pub codec: Codec,
    /// Events per block (as configured).
    pub block_events: u32,
    /// Symbols of `metadata` (a table of its own).
    pub meta_symbols: Vec<Symbol>,
    /// A term (portable tape): trace options, counters, user metadata.
    pub metadata: Vec<u8>,
}

impl FileHeader {
    /// The `H` payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::new();
        put_bytes(&mut o, self.node.as_bytes());
        o.extend_from_slice(&self.vm_id.to_le_bytes());
        put_varint(&mut o, zigzag(self.saved_at_ns));
        put_varint(&mut o, zigzag(self.time_offset_ns));
        put_bytes(&mut o, self.writer.as_bytes());
        put_bytes(&mut o, self.otp.as_bytes());
        let s = &self.store;
        put_varint(&mut o, s.max_events);
        put_varint(&mut o, s.max_age_ns.map_or(0, |a| zigzag(a) + 1));
        for v in [
            s.live,
            s.inserted,
            s.evicted,
            s.expired,
            s.duplicates,
            s.rejected,
        ] {
            put_varint(&mut o, v);
        }
        o.push(self.codec.byte());
        put_varint(&mut o, self.block_events as u64);
        put_varint(&mut o, self.meta_symbols.len() as u64);
        for sym in &self.meta_symbols {
            sym.put(&mut o);
        }
        put_bytes(&mut o, &self.metadata);
        o
    }

    /// Parse an `H` payload (every field checked).
    pub fn decode(b: &[u8]) -> Result<FileHeader, String> {
        let mut c = Cursor::new(b);
        let e = |_| "header cut short".to_string();
        let text = |c: &mut Cursor, what: &str| -> Result<String, String> {
            let s = c.bytes().map_err(|_| format!("{what} cut short"))?;
            if s.len() > 4096 {
                return Err(format!("{what} of {} bytes", s.len()));
            }
            String::from_utf8(s.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
        };
        let node = text(&mut c, "node name")?;
        let vm_id = c.u64_le().map_err(e)?;
        let saved_at_ns = c.zigzag().map_err(e)?;
        let time_offset_ns = c.zigzag().map_err(e)?;
        let writer = text(&mut c, "writer")?;
        let otp = text(&mut c, "OTP release")?;
        let max_events = c.varint().map_err(e)?;
        let max_age_ns = match c.varint().map_err(e)? {
            0 => None,
            v => Some(bytes::unzigzag(v - 1)),
        };
        let mut n = [0u64; 6];
        for v in n.iter_mut() {
            *v = c.varint().map_err(e)?;
        }
        let codec = c.u8().map_err(e)?;
        let codec = Codec::from_byte(codec).ok_or_else(|| format!("unknown codec {codec}"))?;
        let block_events = u32::try_from(c.varint().map_err(e)?)
            .map_err(|_| "block size out of range".to_string())?;
        let nsyms = c.len_at_most(c.remaining()).map_err(e)?;
        let mut meta_symbols = Vec::with_capacity(nsyms.min(1024));
        for _ in 0..nsyms {
            let s = Symbol::get(&mut c)?;
            s.check_refs(&meta_symbols)?;
            meta_symbols.push(s);
        }
        let metadata = c.bytes().map_err(e)?.to_vec();
        ptape::check_structure(&metadata)?;
        if !c.is_empty() {
            return Err("bytes after the header fields".into());
        }
        Ok(FileHeader {
            node,
            vm_id,
            saved_at_ns,
            time_offset_ns,
            writer,
            otp,
            store: StoreSnapshot {
                max_events,
                max_age_ns,
                live: n[0],
                inserted: n[1],
                evicted: n[2],
                expired: n[3],
                duplicates: n[4],
                rejected: n[5],
            },
            codec,
            block_events,
            meta_symbols,
            metadata,
        })
    }
}

/// The `X` block: totals of a complete file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trailer {
    /// Events written.
    pub events: u64,
    /// Events live when the save started but evicted from the store before
    /// the save reached them (ingestion went on).
    pub skipped: u64,
    /// Blocks before the trailer.
    pub blocks: u64,
    /// Symbols defined.
    pub symbols: u64,
    /// Smallest event timestamp (`i64::MAX` if none).
    pub min_ts: i64,
    /// Largest event timestamp (`i64::MIN` if none).
    pub max_ts: i64,
    /// Smallest event id (`u64::MAX` if none).
    pub min_id: u64,
    /// Largest event id (0 if none).
    pub max_id: u64,
    /// Store inserts when the save ended.
    pub inserted: u64,
    /// Store evictions when the save ended.
    pub evicted: u64,
    /// Store expiries when the save ended.
    pub expired: u64,
    /// Store duplicates when the save ended.
    pub duplicates: u64,
}

impl Trailer {
    /// The fixed-size `X` payload.
    pub fn encode(&self) -> [u8; TRAILER_BYTES] {
        let mut o = [0u8; TRAILER_BYTES];
        let vals = [
            self.events,
            self.skipped,
            self.blocks,
            self.symbols,
            self.min_ts as u64,
            self.max_ts as u64,
            self.min_id,
            self.max_id,
            self.inserted,
            self.evicted,
            self.expired,
            self.duplicates,
        ];
        for (i, v) in vals.iter().enumerate() {
            o[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        o
    }

    /// Parse an `X` payload.
    pub fn decode(b: &[u8]) -> Result<Trailer, String> {
        if b.len() != TRAILER_BYTES {
            return Err(format!("trailer of {} bytes", b.len()));
        }
        let v = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
        Ok(Trailer {
            events: v(0),
            skipped: v(1),
            blocks: v(2),
            symbols: v(3),
            min_ts: v(4) as i64,
            max_ts: v(5) as i64,
            min_id: v(6),
            max_id: v(7),
            inserted: v(8),
            evicted: v(9),
            expired: v(10),
            duplicates: v(11),
        })
    }
}

/// What went wrong with a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// An operating-system error (see [`FileError::os_error`]).
    Io,
    /// The file does not start with the magic bytes.
    NotATraceFile,
    /// A major version this reader does not know.
    UnsupportedVersion,
    /// The file ends before its header is complete.
    Truncated,
    /// A block header is corrupt or out of bounds.
    BadBlock,
    /// A block payload does not match its checksum.
    ChecksumMismatch,
    /// A block payload does not decompress to its size.
    Decompress,
    /// A block's contents are malformed.
    Malformed,
    /// A symbol is malformed or cannot be mapped in this VM.
    BadSymbol,
    /// A payload term is malformed or hostile.
    BadTerm,
    /// Loading would create more atoms than allowed.
    TooManyAtoms,
    /// A word of the store could not be made portable (saving).
    Unportable,
    /// A cut-short file, refused because partial files were not allowed.
    Incomplete,
}

impl ErrorKind {
    /// A short snake_case name (the Elixir reason atom).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::NotATraceFile => "not_a_trace_file",
            ErrorKind::UnsupportedVersion => "unsupported_version",
            ErrorKind::Truncated => "truncated",
            ErrorKind::BadBlock => "bad_block",
            ErrorKind::ChecksumMismatch => "checksum_mismatch",
            ErrorKind::Decompress => "decompress_failed",
            ErrorKind::Malformed => "malformed_block",
            ErrorKind::BadSymbol => "bad_symbol",
            ErrorKind::BadTerm => "bad_term",
            ErrorKind::TooManyAtoms => "too_many_atoms",
            ErrorKind::Unportable => "unportable_word",
            ErrorKind::Incomplete => "incomplete",
        }
    }
}

/// An error reading or writing a trace file: what, where (byte offset of
/// the block, or of the problem), and details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Byte offset of the block (or place) concerned.
    pub offset: u64,
    /// Index of the block concerned (0 = the header block), if any.
    pub block: Option<u64>,
    /// Index of the file among those loaded.
    pub file: usize,
    /// Human-readable details.
    pub detail: String,
    /// The OS error number of an [`ErrorKind::Io`] error.
    pub os_error: Option<i32>,
}

impl FileError {
    /// An error of `kind` at `offset`.
    pub fn new(kind: ErrorKind, offset: u64, detail: impl Into<String>) -> FileError {
        FileError {
            kind,
            offset,
            block: None,
            file: 0,
            detail: detail.into(),
            os_error: None,
        }
    }

    /// The same error, naming block `b`.
    pub fn in_block(mut self, b: u64) -> FileError {
        self.block = Some(b);
        self
    }

    /// An I/O error at `offset`.
    pub fn io(e: &std::io::Error, offset: u64) -> FileError {
        FileError {
            os_error: e.raw_os_error(),
            ..FileError::new(ErrorKind::Io, offset, e.to_string())
        }
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.kind.name(), self.offset)?;
        if let Some(b) = self.block {
            write!(f, " (block {b})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl std::error::Error for FileError {}
