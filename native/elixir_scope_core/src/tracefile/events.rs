//! Event blocks: a batch of stored records in columns.
//!
//! A block holds `count` records (the count is in the block header) as 15
//! columns, each written as a varint byte length and its bytes, in this
//! order:
//!
//! | column | per record |
//! |---|---|
//! | kind | `u8` |
//! | flags | `u8` |
//! | shape | `u8`: which optional columns this record uses ([`S_PARENT`] ...) |
//! | id | zigzag varint: id − previous record's id (0 before the first) |
//! | timestamp | zigzag varint: timestamp − previous timestamp |
//! | pid | word code ([`WordCode`]); only when [`S_PID`]: else the previous record's pid |
//! | peer | word code, when [`S_PEER`] (else 0) |
//! | function | varint: 0 for no module/function, else pair symbol + 1 |
//! | aux | zigzag varint, when [`S_AUX`] (else 0); of a term record: its event-type key |
//! | correlation | zigzag varint: correlation id − id, when [`S_CORR`] (else = id) |
//! | parent | zigzag varint: id − parent id, when [`S_PARENT`] (else 0) |
//! | root | zigzag varint: id − root id, when [`S_ROOT`] (else 0); of a term record (kind 0): id − its AST-node key (since 1.2) |
//! | wall | zigzag varint: change of (wall time − timestamp), when [`S_WALL`] |
//! | payload length | varint, when [`S_PAYLOAD`] (else 0) |
//! | payload | the portable tapes ([`super::ptape`]), back to back |
//!
//! Each block starts from zero (ids, timestamps, offsets, pid), so blocks
//! decode independently given the symbols defined before them. Late links
//! are saved as the event's current correlation id (what every query
//! reads).

use super::bytes::{put_varint, zigzag, Cursor, Short};
use super::ptape::to_portable;
use super::symbols::{SymbolWriter, Symbolizer, WordCode};
use crate::store::StoredEvent;

/// Shape bit: the record has a parent id.
pub const S_PARENT: u8 = 1;
/// Shape bit: the record has a root id.
pub const S_ROOT: u8 = 2;
/// Shape bit: the correlation id differs from the id.
pub const S_CORR: u8 = 4;
/// Shape bit: the record has a peer.
pub const S_PEER: u8 = 8;
/// Shape bit: the record has a payload.
pub const S_PAYLOAD: u8 = 16;
/// Shape bit: wall time − timestamp changed.
pub const S_WALL: u8 = 32;
/// Shape bit: the record has a non-zero aux.
pub const S_AUX: u8 = 64;
/// Shape bit: the pid differs from the previous record's.
pub const S_PID: u8 = 128;

const COLUMNS: usize = 15;
const C_KIND: usize = 0;
const C_FLAGS: usize = 1;
const C_SHAPE: usize = 2;
const C_ID: usize = 3;
const C_TS: usize = 4;
const C_PID: usize = 5;
const C_PEER: usize = 6;
const C_MF: usize = 7;
const C_AUX: usize = 8;
const C_CORR: usize = 9;
const C_PARENT: usize = 10;
const C_ROOT: usize = 11;
const C_WALL: usize = 12;
const C_PLEN: usize = 13;
const C_PAYLOAD: usize = 14;

/// Smallest encoding of one record (kind, flags, shape, id, timestamp,
/// function): a block's count can never exceed its bytes / this.
pub const MIN_RECORD_BYTES: usize = 6;

/// Why a record could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unportable {
    /// The event.
    pub id: u64,
    /// The word the binding could not make portable.
    pub word: u64,
}

/// Builds one event block.
pub struct BlockEncoder {
    cols: [Vec<u8>; COLUMNS],
    count: u32,
    prev_id: u64,
    prev_ts: i64,
    prev_off: i64,
    prev_pid: u64,
    /// Smallest and largest id in the block.
    pub min_id: u64,
    /// Largest id.
    pub max_id: u64,
    /// Largest id below 2^62 (event ids; larger ones are keys of hashed
    /// ids), 0 if none.
    pub max_small_id: u64,
    /// Smallest timestamp.
    pub min_ts: i64,
    /// Largest timestamp.
    pub max_ts: i64,
}

impl Default for BlockEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockEncoder {
    /// An empty block.
    pub fn new() -> BlockEncoder {
        BlockEncoder {
            cols: Default::default(),
            count: 0,
            prev_id: 0,
            prev_ts: 0,
            prev_off: 0,
            prev_pid: 0,
            min_id: u64::MAX,
            max_id: 0,
            max_small_id: 0,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
        }
    }

    /// Records in the block.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// No records?
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the block takes so far.
    pub fn bytes(&self) -> usize {
        self.cols.iter().map(Vec::len).sum()
    }

    /// Append one record; its words are interned in `syms`.
    #[inline]
    pub fn push<S: Symbolizer>(
        &mut self,
        e: &StoredEvent,
        syms: &mut SymbolWriter,
        sym: &mut S,
    ) -> Result<(), Unportable> {
        let bad = |word| Unportable { id: e.id, word };
        let mut shape = 0u8;
        let cols = &mut self.cols;
        if e.pid != self.prev_pid || self.count == 0 {
            shape |= S_PID;
            syms.header_word(e.pid, sym)
                .map_err(bad)?
                .put(&mut cols[C_PID]);
            self.prev_pid = e.pid;
        }
        if e.peer != 0 {
            shape |= S_PEER;
            // An OTP callback's trigger is an event id, kept as a number.
            if crate::event::peer_is_event(e.kind, e.flags) {
                WordCode::Raw(e.peer)
            } else {
                syms.header_word(e.peer, sym).map_err(bad)?
            }
            .put(&mut cols[C_PEER]);
        }
        let mf = syms.pair(e.module, e.function, sym).map_err(bad)?;
        put_varint(&mut cols[C_MF], mf as u64);
        if e.aux != 0 {
            shape |= S_AUX;
            put_varint(&mut cols[C_AUX], zigzag(e.aux));
        }
        if e.correlation_id != e.id {
            shape |= S_CORR;
            put_varint(
                &mut cols[C_CORR],
                zigzag(e.correlation_id.wrapping_sub(e.id) as i64),
            );
        }
        if e.parent_id != 0 {
            shape |= S_PARENT;
            put_varint(
                &mut cols[C_PARENT],
                zigzag(e.id.wrapping_sub(e.parent_id) as i64),
            );
        }
        // A term record has no root: its column holds the AST-node key
        // (format 1.2; its event-type key is its aux).
        let root = if e.kind == crate::event::EventKind::Term as u8 {
            e.ast_node
        } else {
            e.root_id
        };
        if root != 0 {
            shape |= S_ROOT;
            put_varint(&mut cols[C_ROOT], zigzag(e.id.wrapping_sub(root) as i64));
        }
        let off = e.wall_time.wrapping_sub(e.timestamp);
        if off != self.prev_off {
            shape |= S_WALL;
            put_varint(&mut cols[C_WALL], zigzag(off.wrapping_sub(self.prev_off)));
            self.prev_off = off;
        }
        if !e.payload.is_empty() {
            shape |= S_PAYLOAD;
            let before = cols[C_PAYLOAD].len();
            if let Err(word) = to_portable(e.payload, &mut cols[C_PAYLOAD], syms, sym) {
                cols[C_PAYLOAD].truncate(before);
                return Err(bad(word));
            }
            let n = cols[C_PAYLOAD].len() - before;
            put_varint(&mut cols[C_PLEN], n as u64);
        }
        cols[C_KIND].push(e.kind);
        cols[C_FLAGS].push(e.flags);
        cols[C_SHAPE].push(shape);
        put_varint(
            &mut cols[C_ID],
            zigzag(e.id.wrapping_sub(self.prev_id) as i64),
        );
        put_varint(
            &mut cols[C_TS],
            zigzag(e.timestamp.wrapping_sub(self.prev_ts)),
        );
        self.prev_id = e.id;
        self.prev_ts = e.timestamp;
        self.min_id = self.min_id.min(e.id);
        self.max_id = self.max_id.max(e.id);
        if e.id < 1 << 62 {
            self.max_small_id = self.max_small_id.max(e.id);
        }
        self.min_ts = self.min_ts.min(e.timestamp);
        self.max_ts = self.max_ts.max(e.timestamp);
        self.count += 1;
        Ok(())
    }

    /// Write the block's columns into `out` (cleared first) and reset.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(self.bytes() + COLUMNS * 5);
        for col in self.cols.iter_mut() {
            put_varint(out, col.len() as u64);
            out.extend_from_slice(col);
            col.clear();
        }
        *self = BlockEncoder {
            cols: std::mem::take(&mut self.cols),
            ..BlockEncoder::new()
        };
    }
}

/// A decoded record: header fields with portable words, and where its
/// payload lies in the block's payload column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PEvent {
    /// Event id.
    pub id: u64,
    /// Monotonic timestamp (ns).
    pub timestamp: i64,
    /// Wall-clock time (ns).
    pub wall_time: i64,
    /// Acting process.
    pub pid: WordCode,
    /// Other process.
    pub peer: WordCode,
    /// 0, or the (module, function) pair symbol + 1.
    pub mf: u32,
    /// Kind attribute.
    pub aux: i64,
    /// Kind byte.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Correlation id.
    pub correlation_id: u64,
    /// Parent id (0: none).
    pub parent_id: u64,
    /// Root id (0: none).
    pub root_id: u64,
    /// Payload start in the payload column.
    pub payload_at: u32,
    /// Payload length.
    pub payload_len: u32,
}

/// A decoded event block.
#[derive(Default)]
pub struct DecodedBlock {
    /// The records, in store order.
    pub events: Vec<PEvent>,
    /// The payload column.
    pub payload: Vec<u8>,
}

impl DecodedBlock {
    /// The portable payload of `e`.
    pub fn payload_of(&self, e: &PEvent) -> &[u8] {
        &self.payload[e.payload_at as usize..(e.payload_at + e.payload_len) as usize]
    }
}

fn cut(what: &'static str) -> impl Fn(Short) -> String {
    move |_| format!("{what} column cut short")
}

/// Decode a block's raw bytes holding `count` records into `out`.
/// Everything is checked: column lengths, every read, and that each
/// column is used exactly.
pub fn decode(raw: &[u8], count: usize, out: &mut DecodedBlock) -> Result<(), String> {
    out.events.clear();
    out.payload.clear();
    if count > raw.len() / MIN_RECORD_BYTES {
        return Err(format!("{count} records cannot fit {} bytes", raw.len()));
    }
    let mut c = Cursor::new(raw);
    let mut cols: [Cursor; COLUMNS] = [Cursor::new(&[]); COLUMNS];
    for col in cols.iter_mut() {
        let n = c
            .len_at_most(c.remaining())
            .map_err(|_| "column length out of range".to_string())?;
        *col = Cursor::new(c.take(n).map_err(|_| "column cut short".to_string())?);
    }
    if !c.is_empty() {
        return Err("bytes after the last column".into());
    }
    let fixed = |col: &Cursor, name: &str| {
        if col.remaining() != count {
            Err(format!(
                "{name} column holds {} bytes for {count} records",
                col.remaining()
            ))
        } else {
            Ok(())
        }
    };
    fixed(&cols[C_KIND], "kind")?;
    fixed(&cols[C_FLAGS], "flags")?;
    fixed(&cols[C_SHAPE], "shape")?;
    // Grown as records decode (a claimed count is not trusted with an
    // allocation).
    out.events.reserve(count.min(1 << 14));
    let (mut id, mut ts, mut off) = (0u64, 0i64, 0i64);
    let mut pid = WordCode::None;
    let mut payload_at = 0u64;
    let payload_len = cols[C_PAYLOAD].remaining() as u64;
    for i in 0..count {
        let kind = cols[C_KIND].u8().map_err(cut("kind"))?;
        let flags = cols[C_FLAGS].u8().map_err(cut("flags"))?;
        let shape = cols[C_SHAPE].u8().map_err(cut("shape"))?;
        id = id.wrapping_add(cols[C_ID].zigzag().map_err(cut("id"))? as u64);
        ts = ts.wrapping_add(cols[C_TS].zigzag().map_err(cut("timestamp"))?);
        if shape & S_PID != 0 {
            pid = WordCode::get(&mut cols[C_PID]).map_err(cut("pid"))?;
        } else if i == 0 {
            return Err("first record without a pid".into());
        }
        let peer = if shape & S_PEER != 0 {
            WordCode::get(&mut cols[C_PEER]).map_err(cut("peer"))?
        } else {
            WordCode::None
        };
        let mf = cols[C_MF].varint().map_err(cut("function"))?;
        let mf = u32::try_from(mf).map_err(|_| "function symbol out of range".to_string())?;
        let aux = if shape & S_AUX != 0 {
            cols[C_AUX].zigzag().map_err(cut("aux"))?
        } else {
            0
        };
        let correlation_id = if shape & S_CORR != 0 {
            id.wrapping_add(cols[C_CORR].zigzag().map_err(cut("correlation"))? as u64)
        } else {
            id
        };
        let parent_id = if shape & S_PARENT != 0 {
            id.wrapping_sub(cols[C_PARENT].zigzag().map_err(cut("parent"))? as u64)
        } else {
            0
        };
        let root_id = if shape & S_ROOT != 0 {
            id.wrapping_sub(cols[C_ROOT].zigzag().map_err(cut("root"))? as u64)
        } else {
            0
        };
        if shape & S_WALL != 0 {
            off = off.wrapping_add(cols[C_WALL].zigzag().map_err(cut("wall"))?);
        }
        let len = if shape & S_PAYLOAD != 0 {
            cols[C_PLEN].varint().map_err(cut("payload length"))?
        } else {
            0
        };
        if len > payload_len - payload_at {
            return Err("payload column cut short".into());
        }
        out.events.push(PEvent {
            id,
            timestamp: ts,
            wall_time: ts.wrapping_add(off),
            pid,
            peer,
            mf,
            aux,
            kind,
            flags,
            correlation_id,
            parent_id,
            root_id,
            payload_at: payload_at as u32,
            payload_len: len as u32,
        });
        payload_at += len;
    }
    for (k, col) in cols.iter().enumerate().take(C_PAYLOAD) {
        if !col.is_empty() {
            return Err(format!("column {k} holds bytes beyond its {count} records"));
        }
    }
    if payload_at != payload_len {
        return Err("payload column holds bytes beyond its records".into());
    }
    out.payload
        .extend_from_slice(cols[C_PAYLOAD].take(payload_len as usize).expect("checked"));
    Ok(())
}
