//! The grammar of the term tape, the byte form of Erlang terms stored in
//! event payloads (written and read by the binding's codec, translated to
//! and from the portable form of trace files by [`crate::tracefile`]).
//!
//! A payload is a sequence of top-level terms ("fields"). Each term starts
//! with one tag byte:
//!
//! | tag | term | followed by |
//! |---|---|---|
//! | [`T_IMM`] | an immediate (atom, small integer, local pid or port, `[]`) | its raw 64-bit term word (LE) |
//! | [`T_BIN`] | a binary | `u32` length, the bytes |
//! | [`T_TUPLE`] | a tuple | `u32` arity, the elements |
//! | [`T_LIST`] | a list | `u32` number of cells, the heads, then the tail (`[]` for a proper list) |
//! | [`T_MAP`] | a map | `u32` size, then key, value, key, value... |
//! | [`T_FLOAT`] | a float | `f64` (LE) |
//! | [`T_ETF`] | anything else (bignum, reference, fun, remote pid) | `u32` length, external term format bytes |
//! | [`T_TRUNC`] | the marker `{:truncated, at_least_bytes, kind}` | kind hint `u8`, `u64` |
//! | [`T_I64`] / [`T_U64`] | an integer that fits 64 bits but is not a small integer | 8 bytes (LE) |
//!
//! Raw words are valid only inside the VM that wrote them; this crate never
//! interprets them (the binding does).

/// An immediate term's raw word.
pub const T_IMM: u8 = 0;
/// A binary.
pub const T_BIN: u8 = 1;
/// A tuple.
pub const T_TUPLE: u8 = 2;
/// A list.
pub const T_LIST: u8 = 3;
/// A map.
pub const T_MAP: u8 = 4;
/// A float.
pub const T_FLOAT: u8 = 5;
/// External term format bytes.
pub const T_ETF: u8 = 6;
/// A truncation marker.
pub const T_TRUNC: u8 = 7;
/// A 64-bit signed integer outside the small-integer range.
pub const T_I64: u8 = 8;
/// A 64-bit unsigned integer above `i64::MAX`.
pub const T_U64: u8 = 9;

/// Deepest nesting the encoder writes (deeper subterms become truncation
/// markers) and that a trace file may contain.
pub const MAX_DEPTH: u32 = 100;

/// Truncation marker kind hints (`T_TRUNC`'s first byte).
pub mod hint {
    /// A binary.
    pub const BINARY: u8 = 0;
    /// A list.
    pub const LIST: u8 = 1;
    /// A map.
    pub const MAP: u8 = 2;
    /// A tuple.
    pub const TUPLE: u8 = 3;
    /// Any other term.
    pub const TERM: u8 = 4;
    /// Nested deeper than [`super::MAX_DEPTH`].
    pub const DEPTH: u8 = 5;
}
