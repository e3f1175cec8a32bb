//! The portable tape: a payload's terms as a trace file stores them.
//!
//! Same structure as the VM-local tape ([`crate::tape`]), with lengths and
//! counts as varints and every raw word replaced by a portable value:
//!
//! | tag | term | followed by |
//! |---|---|---|
//! | [`P_SYM`] | an atom, pid or port | varint symbol number |
//! | `T_BIN` (1) | binary | varint length, bytes |
//! | `T_TUPLE` (2) | tuple | varint arity, elements |
//! | `T_LIST` (3) | list | varint cells, heads, tail |
//! | `T_MAP` (4) | map | varint size, key, value... |
//! | `T_FLOAT` (5) | float (finite) | `f64` LE |
//! | `T_ETF` (6) | external term format | varint length, bytes (checked on load) |
//! | `T_TRUNC` (7) | truncation marker | hint byte, varint at-least bytes |
//! | `T_I64` (8) | 64-bit integer | zigzag varint |
//! | `T_U64` (9) | unsigned 64-bit integer | varint |
//! | [`P_INT`] | small integer | zigzag varint |
//! | [`P_NIL`] | `[]` | – |
//!
//! Loading checks everything a hostile file could get wrong: tags,
//! lengths and counts against the bytes left, nesting depth (at most
//! [`MAX_DEPTH`]), symbol numbers and types, finite floats, small-integer
//! ranges and external-term-format blobs (see [`super::etf`]); the local
//! tape it writes is one the binding's decoder can trust.

use super::bytes::{put_varint, zigzag, Cursor, Short};
use super::symbols::{SymbolWriter, Symbolizer, TapeWord};
use crate::tape::{
    MAX_DEPTH, T_BIN, T_ETF, T_FLOAT, T_I64, T_IMM, T_LIST, T_MAP, T_TRUNC, T_TUPLE, T_U64,
};

/// A symbol (atom, pid or port).
pub const P_SYM: u8 = 0;
/// A small integer.
pub const P_INT: u8 = 10;
/// `[]`.
pub const P_NIL: u8 = 11;

/// Largest VM-local payload a file may expand to, per event.
pub const MAX_LOCAL_PAYLOAD: usize = 16 << 20;

/// A symbol as the loading VM sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    /// An immediate word of this VM (atom, local pid or port).
    Imm(u64),
    /// A pid or port of another node or VM: the index key its header
    /// fields use and its external term format.
    Foreign {
        /// Header/index key.
        key: u64,
        /// External term format of the pid or port.
        etf: Box<[u8]>,
    },
    /// A (module, function) pair of header words.
    Pair(u64, u64),
}

impl Local {
    /// The header word of this symbol (a pair has none).
    pub fn header_word(&self) -> Option<u64> {
        match self {
            Local::Imm(w) => Some(*w),
            Local::Foreign { key, .. } => Some(*key),
            Local::Pair(..) => None,
        }
    }
}

/// Why a word, symbol or term of a file cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapError {
    /// What kind of problem.
    pub kind: super::ErrorKind,
    /// Details.
    pub detail: String,
}

impl MapError {
    /// A malformed or hostile term.
    pub fn term(detail: impl Into<String>) -> MapError {
        MapError {
            kind: super::ErrorKind::BadTerm,
            detail: detail.into(),
        }
    }
}

impl From<String> for MapError {
    fn from(detail: String) -> MapError {
        MapError::term(detail)
    }
}

/// What loading needs from the binding beyond the symbol table.
pub trait TapeResolver {
    /// The local word of small integer `v`, or `None` if out of range.
    fn small_word(&self, v: i64) -> Option<u64>;
    /// The local word of `[]`.
    fn nil_word(&self) -> u64;
    /// Check an external-term-format blob (its atoms must be loadable);
    /// may rewrite it in place (pid creations of another VM).
    fn check_etf(&mut self, etf: &mut Vec<u8>) -> Result<(), MapError>;
}

fn short(_: Short) -> String {
    "term cut short".to_string()
}

/// Translate a VM-local tape into its portable form, interning symbols.
/// `Err(word)` names a word that cannot be made portable; a malformed
/// local tape (never written by the binding) is `Err(0)`.
pub fn to_portable<S: Symbolizer>(
    tape: &[u8],
    out: &mut Vec<u8>,
    syms: &mut SymbolWriter,
    sym: &mut S,
) -> Result<(), u64> {
    let mut c = Cursor::new(tape);
    while !c.is_empty() {
        portable_term(&mut c, out, syms, sym, 0)?;
    }
    Ok(())
}

fn portable_term<S: Symbolizer>(
    c: &mut Cursor,
    out: &mut Vec<u8>,
    syms: &mut SymbolWriter,
    sym: &mut S,
    depth: u32,
) -> Result<(), u64> {
    if depth > MAX_DEPTH + 1 {
        return Err(0);
    }
    let tag = c.u8().map_err(|_| 0u64)?;
    let u32_ = |c: &mut Cursor| c.u32_le().map_err(|_| 0u64).map(|v| v as usize);
    match tag {
        T_IMM => {
            let w = c.u64_le().map_err(|_| 0u64)?;
            match syms.tape_word(w, sym)? {
                TapeWord::Sym(n) => {
                    out.push(P_SYM);
                    put_varint(out, n as u64);
                }
                TapeWord::Small(v) => {
                    out.push(P_INT);
                    put_varint(out, zigzag(v));
                }
                TapeWord::Nil => out.push(P_NIL),
            }
        }
        T_BIN | T_ETF => {
            let n = u32_(c)?;
            let b = c.take(n).map_err(|_| 0u64)?;
            out.push(tag);
            put_varint(out, n as u64);
            out.extend_from_slice(b);
        }
        T_TUPLE | T_MAP | T_LIST => {
            let n = u32_(c)?;
            out.push(tag);
            put_varint(out, n as u64);
            for _ in 0..items_of(tag, n) {
                portable_term(c, out, syms, sym, depth + 1)?;
            }
        }
        T_FLOAT => {
            let b = c.take(8).map_err(|_| 0u64)?;
            out.push(T_FLOAT);
            out.extend_from_slice(b);
        }
        T_TRUNC => {
            let h = c.u8().map_err(|_| 0u64)?;
            let n = c.u64_le().map_err(|_| 0u64)?;
            out.push(T_TRUNC);
            out.push(h);
            put_varint(out, n);
        }
        T_I64 => {
            let v = c.u64_le().map_err(|_| 0u64)? as i64;
            out.push(T_I64);
            put_varint(out, zigzag(v));
        }
        T_U64 => {
            let v = c.u64_le().map_err(|_| 0u64)?;
            out.push(T_U64);
            put_varint(out, v);
        }
        _ => return Err(0),
    }
    Ok(())
}

/// Translate a portable tape into a VM-local one, checking everything
/// (see the module documentation). `table` maps symbol numbers.
pub fn to_local<R: TapeResolver>(
    ptape: &[u8],
    out: &mut Vec<u8>,
    table: &[Local],
    r: &mut R,
) -> Result<(), MapError> {
    out.clear();
    let mut c = Cursor::new(ptape);
    let mut etf = Vec::new();
    while !c.is_empty() {
        local_term(&mut c, out, table, r, 0, &mut etf)?;
        if out.len() > MAX_LOCAL_PAYLOAD {
            return Err(MapError::term(format!(
                "payload expands beyond {MAX_LOCAL_PAYLOAD} bytes"
            )));
        }
    }
    Ok(())
}

#[inline]
fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn local_term<R: TapeResolver>(
    c: &mut Cursor,
    out: &mut Vec<u8>,
    table: &[Local],
    r: &mut R,
    depth: u32,
    etf: &mut Vec<u8>,
) -> Result<(), MapError> {
    if depth >= MAX_DEPTH {
        return Err(MapError::term(format!(
            "term nested deeper than {MAX_DEPTH}"
        )));
    }
    if out.len() > MAX_LOCAL_PAYLOAD {
        return Err(MapError::term(format!(
            "payload expands beyond {MAX_LOCAL_PAYLOAD} bytes"
        )));
    }
    let tag = c.u8().map_err(short)?;
    match tag {
        P_SYM => {
            let n = c.varint().map_err(short)?;
            match table.get(n as usize) {
                Some(Local::Imm(w)) => {
                    out.push(T_IMM);
                    out.extend_from_slice(&w.to_le_bytes());
                }
                Some(Local::Foreign { etf, .. }) => {
                    out.push(T_ETF);
                    put_u32(out, etf.len());
                    out.extend_from_slice(etf);
                }
                Some(Local::Pair(..)) => {
                    return Err(MapError::term(format!("symbol {n} is not a term")))
                }
                None => return Err(MapError::term(format!("undefined symbol {n}"))),
            }
        }
        P_INT => {
            let v = c.zigzag().map_err(short)?;
            let w = r
                .small_word(v)
                .ok_or_else(|| MapError::term(format!("small integer {v} out of range")))?;
            out.push(T_IMM);
            out.extend_from_slice(&w.to_le_bytes());
        }
        P_NIL => {
            out.push(T_IMM);
            out.extend_from_slice(&r.nil_word().to_le_bytes());
        }
        T_BIN => {
            let b = c.bytes().map_err(short)?;
            if b.len() > u32::MAX as usize {
                return Err(MapError::term("binary too large"));
            }
            out.push(T_BIN);
            put_u32(out, b.len());
            out.extend_from_slice(b);
        }
        T_ETF => {
            let b = c.bytes().map_err(short)?;
            etf.clear();
            etf.extend_from_slice(b);
            r.check_etf(etf)?;
            out.push(T_ETF);
            put_u32(out, etf.len());
            out.extend_from_slice(etf);
        }
        T_TUPLE | T_MAP | T_LIST => {
            let (n, items) = container(c, tag)?;
            out.push(tag);
            put_u32(out, n);
            for _ in 0..items {
                local_term(c, out, table, r, depth + 1, etf)?;
            }
        }
        T_FLOAT => {
            let b = c.take(8).map_err(short)?;
            let f = f64::from_le_bytes(b.try_into().expect("8 bytes"));
            if !f.is_finite() {
                return Err(MapError::term("float is not finite"));
            }
            out.push(T_FLOAT);
            out.extend_from_slice(b);
        }
        T_TRUNC => {
            let h = c.u8().map_err(short)?;
            let n = c.varint().map_err(short)?;
            out.push(T_TRUNC);
            out.push(h);
            out.extend_from_slice(&n.to_le_bytes());
        }
        T_I64 => {
            let v = c.zigzag().map_err(short)?;
            out.push(T_I64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        T_U64 => {
            let v = c.varint().map_err(short)?;
            out.push(T_U64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        t => return Err(MapError::term(format!("unknown term tag {t}"))),
    }
    Ok(())
}

/// Terms inside a container of `n` (its count is read from `c`): a
/// map's keys and values, a list's heads and tail. Every term takes at
/// least one byte: a count beyond the bytes left is a lie, refused before
/// it is looped over.
fn container(c: &mut Cursor, tag: u8) -> Result<(usize, usize), String> {
    let n = c.len_at_most(c.remaining()).map_err(short)?;
    let items = items_of(tag, n);
    if items > c.remaining() {
        return Err(format!("container claims {n} elements"));
    }
    Ok((n, items))
}

#[inline]
fn items_of(tag: u8, n: usize) -> usize {
    match tag {
        T_MAP => 2 * n,
        T_LIST => n + 1,
        _ => n,
    }
}

/// Check a portable tape's structure like [`to_local`] does, without
/// resolving symbols (exports read files without a VM).
pub fn check_structure(ptape: &[u8]) -> Result<(), String> {
    let mut c = Cursor::new(ptape);
    while !c.is_empty() {
        skip_term(&mut c, 0)?;
    }
    Ok(())
}

/// Skip one portable term.
pub fn skip_term(c: &mut Cursor, depth: u32) -> Result<(), String> {
    if depth >= MAX_DEPTH {
        return Err(format!("term nested deeper than {MAX_DEPTH}"));
    }
    match c.u8().map_err(short)? {
        P_SYM | P_INT | T_I64 | T_U64 => {
            c.varint().map_err(short)?;
        }
        P_NIL => {}
        T_BIN | T_ETF => {
            c.bytes().map_err(short)?;
        }
        tag @ (T_TUPLE | T_MAP | T_LIST) => {
            let (_, items) = container(c, tag)?;
            for _ in 0..items {
                skip_term(c, depth + 1)?;
            }
        }
        T_FLOAT => {
            c.take(8).map_err(short)?;
        }
        T_TRUNC => {
            c.u8().map_err(short)?;
            c.varint().map_err(short)?;
        }
        t => return Err(format!("unknown term tag {t}")),
    }
    Ok(())
}
