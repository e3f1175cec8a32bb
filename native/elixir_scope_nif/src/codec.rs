//! Term tape: a compact byte encoding of Erlang terms that is cheap to write
//! from a NIF and cheap to turn back into terms.
//!
//! Immediates (atoms, small integers, local pids and ports, `[]`) are stored
//! as their raw term word: they are values, not pointers, and stay valid for
//! the life of the VM, so decoding them costs nothing and no atom is ever
//! looked up by name (which is what makes `binary_to_term` slow). Containers
//! are walked; binaries are copied; floats are stored as `f64`; anything else
//! (bignums, references, funs, remote pids) falls back to the external term
//! format.
//!
//! Encoding is bounded by a byte budget. A field that does not fit is
//! replaced by the visible marker `{:truncated, at_least_bytes, kind}` and
//! the event is flagged as truncated.

use rustler::sys::{
    enif_binary_to_term, enif_get_double, enif_get_list_cell, enif_get_map_size, enif_get_tuple,
    enif_inspect_binary, enif_make_double, enif_make_list_cell, enif_make_list_from_array,
    enif_make_map_from_arrays, enif_make_new_binary, enif_make_tuple_from_array,
    enif_map_iterator_create, enif_map_iterator_destroy, enif_map_iterator_get_pair,
    enif_map_iterator_next, enif_release_binary, enif_term_to_binary, enif_term_type, ErlNifBinary,
    ErlNifEnv, ErlNifMapIterator, ErlNifMapIteratorEntry, ErlNifTerm as ERL_NIF_TERM,
    ErlNifTermType,
};
use rustler::{Encoder, Env, Term};
use std::mem::MaybeUninit;

use crate::atoms;

const T_IMM: u8 = 0;
const T_BIN: u8 = 1;
const T_TUPLE: u8 = 2;
const T_LIST: u8 = 3;
const T_MAP: u8 = 4;
const T_FLOAT: u8 = 5;
const T_ETF: u8 = 6;
const T_TRUNC: u8 = 7;

/// Deepest nesting that is encoded; deeper subterms are truncated.
pub const MAX_DEPTH: u32 = 100;
/// Maps with at most this many entries (structs) are truncated per value
/// rather than as a whole, at the top level and one level down.
const FIELD_MAP_MAX: usize = 32;
/// Bytes of a truncation marker.
const MARKER_BYTES: usize = 10;

/// Kinds named in truncation markers.
#[derive(Copy, Clone)]
#[repr(u8)]
enum Hint {
    Binary = 0,
    List = 1,
    Map = 2,
    Tuple = 3,
    Term = 4,
    Depth = 5,
}

/// The raw word of a term.
#[inline(always)]
pub fn word(t: ERL_NIF_TERM) -> u64 {
    // SAFETY: `ErlNifTerm` is `repr(transparent)` over `usize`.
    unsafe { std::mem::transmute::<ERL_NIF_TERM, usize>(t) as u64 }
}

/// The term of a raw word (only meaningful for words taken from terms).
#[inline(always)]
pub fn from_word(w: u64) -> ERL_NIF_TERM {
    // SAFETY: `ErlNifTerm` is `repr(transparent)` over `usize`.
    unsafe { std::mem::transmute::<usize, ERL_NIF_TERM>(w as usize) }
}

/// Is `t` an immediate term (tag bits `11`)? Such words are self-contained.
#[inline(always)]
pub fn is_immediate(t: ERL_NIF_TERM) -> bool {
    word(t) & 0x3 == 0x3
}

#[derive(Debug)]
struct Overflow {
    /// Absolute tape length the failing write would have reached.
    reached: usize,
    /// The term nests deeper than [`MAX_DEPTH`].
    deep: bool,
}

/// Encodes terms into a tape under a byte budget.
pub struct TapeEncoder<'b> {
    env: *mut ErlNifEnv,
    buf: &'b mut Vec<u8>,
    limit: usize,
    /// Set when any field was replaced by a truncation marker.
    pub truncated: bool,
}

impl<'b> TapeEncoder<'b> {
    /// Appends to `buf` (cleared by the caller); stops at `limit` bytes.
    pub fn new(env: Env, buf: &'b mut Vec<u8>, limit: usize) -> Self {
        TapeEncoder {
            env: env.as_c_arg(),
            buf,
            limit,
            truncated: false,
        }
    }

    /// Encode one top-level field. Never fails: a field that does not fit is
    /// replaced by a truncation marker (always written, so the tape may end
    /// up at most one marker over the limit).
    pub fn field(&mut self, t: Term) {
        self.field_raw(t.as_c_arg(), true);
    }

    fn field_raw(&mut self, t: ERL_NIF_TERM, top: bool) -> bool {
        let mark = self.buf.len();
        match self.enc(t, 0, top) {
            Ok(()) => true,
            Err(o) => {
                self.buf.truncate(mark);
                let at_least = o.reached.saturating_sub(mark) as u64;
                if !top && mark + MARKER_BYTES > self.limit {
                    return false;
                }
                let hint = if o.deep { Hint::Depth } else { self.hint(t) };
                self.marker(hint, at_least);
                self.truncated = true;
                true
            }
        }
    }

    #[inline]
    fn room(&self, n: usize) -> Result<(), Overflow> {
        let reached = self.buf.len() + n;
        if reached > self.limit {
            Err(Overflow {
                reached,
                deep: false,
            })
        } else {
            Ok(())
        }
    }

    /// Append an immediate (9 bytes) if it fits.
    #[inline(always)]
    fn put_imm(&mut self, t: ERL_NIF_TERM) -> Result<(), Overflow> {
        let len = self.buf.len();
        self.room(9)?;
        self.buf.reserve(9);
        // SAFETY: `reserve` guarantees 9 writable bytes past `len`.
        unsafe {
            let p = self.buf.as_mut_ptr().add(len);
            p.write(T_IMM);
            (p.add(1) as *mut [u8; 8]).write_unaligned(word(t).to_le_bytes());
            self.buf.set_len(len + 9);
        }
        Ok(())
    }

    /// Encode a nested term, immediates inline.
    #[inline(always)]
    fn child(&mut self, t: ERL_NIF_TERM, depth: u32) -> Result<(), Overflow> {
        if is_immediate(t) {
            self.put_imm(t)
        } else {
            self.enc(t, depth, false)
        }
    }

    #[inline]
    fn put_u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn marker(&mut self, hint: Hint, at_least: u64) {
        self.buf.push(T_TRUNC);
        self.buf.push(hint as u8);
        self.buf.extend_from_slice(&at_least.to_le_bytes());
    }

    fn hint(&self, t: ERL_NIF_TERM) -> Hint {
        if is_immediate(t) {
            return Hint::Term;
        }
        // SAFETY: `t` is a valid term of `self.env` (all terms we walk are).
        match unsafe { enif_term_type(self.env, t) } {
            ErlNifTermType::ERL_NIF_TERM_TYPE_BITSTRING => Hint::Binary,
            ErlNifTermType::ERL_NIF_TERM_TYPE_LIST => Hint::List,
            ErlNifTermType::ERL_NIF_TERM_TYPE_MAP => Hint::Map,
            ErlNifTermType::ERL_NIF_TERM_TYPE_TUPLE => Hint::Tuple,
            _ => Hint::Term,
        }
    }

    fn enc(&mut self, t: ERL_NIF_TERM, depth: u32, fields: bool) -> Result<(), Overflow> {
        if is_immediate(t) {
            return self.put_imm(t);
        }
        if depth >= MAX_DEPTH {
            return Err(Overflow {
                reached: self.buf.len(),
                deep: true,
            });
        }
        let env = self.env;
        // SAFETY (whole match): every call below receives `env` and a term
        // that belongs to it; out-pointers point to live locals.
        match unsafe { enif_term_type(env, t) } {
            ErlNifTermType::ERL_NIF_TERM_TYPE_TUPLE => {
                let mut arity: i32 = 0;
                let mut elems: *const ERL_NIF_TERM = std::ptr::null();
                unsafe { enif_get_tuple(env, t, &mut arity, &mut elems) };
                self.room(5)?;
                self.buf.push(T_TUPLE);
                self.put_u32(arity as u32);
                for i in 0..arity as usize {
                    let e = unsafe { *elems.add(i) };
                    self.child(e, depth + 1)?;
                }
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_LIST => {
                self.room(5)?;
                self.buf.push(T_LIST);
                let count_at = self.buf.len();
                self.put_u32(0);
                let mut n: u32 = 0;
                let mut cur = t;
                let mut head: ERL_NIF_TERM = ERL_NIF_TERM::default();
                let mut tail: ERL_NIF_TERM = ERL_NIF_TERM::default();
                while unsafe { enif_get_list_cell(env, cur, &mut head, &mut tail) } != 0 {
                    self.child(head, depth + 1)?;
                    n += 1;
                    cur = tail;
                }
                // `cur` is `[]` for a proper list, else the improper tail.
                self.child(cur, depth + 1)?;
                self.buf[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_MAP => {
                let mut size: usize = 0;
                unsafe { enif_get_map_size(env, t, &mut size) };
                self.room(5)?;
                self.buf.push(T_MAP);
                self.put_u32(size as u32);
                let per_field = fields && size <= FIELD_MAP_MAX;
                let mut it = MaybeUninit::<ErlNifMapIterator>::uninit();
                if unsafe {
                    enif_map_iterator_create(
                        env,
                        t,
                        it.as_mut_ptr(),
                        ErlNifMapIteratorEntry::ERL_NIF_MAP_ITERATOR_HEAD,
                    )
                } == 0
                {
                    return Err(Overflow {
                        reached: self.limit + 1,
                        deep: false,
                    });
                }
                struct Destroy(*mut ErlNifEnv, *mut ErlNifMapIterator);
                impl Drop for Destroy {
                    fn drop(&mut self) {
                        // SAFETY: created above, destroyed exactly once.
                        unsafe { enif_map_iterator_destroy(self.0, self.1) };
                    }
                }
                let _guard = Destroy(env, it.as_mut_ptr());
                let mut k: ERL_NIF_TERM = ERL_NIF_TERM::default();
                let mut v: ERL_NIF_TERM = ERL_NIF_TERM::default();
                while unsafe { enif_map_iterator_get_pair(env, it.as_mut_ptr(), &mut k, &mut v) }
                    != 0
                {
                    self.child(k, depth + 1)?;
                    if per_field {
                        // Values of struct-like maps are truncated one by
                        // one, one level down as well (`%Events{data: ...}`).
                        let mark = self.buf.len();
                        let r = if is_immediate(v) {
                            self.put_imm(v)
                        } else {
                            self.enc(v, depth + 1, depth == 0)
                        };
                        if let Err(o) = r {
                            self.buf.truncate(mark);
                            if mark + MARKER_BYTES > self.limit {
                                return Err(o);
                            }
                            let hint = if o.deep { Hint::Depth } else { self.hint(v) };
                            self.marker(hint, o.reached.saturating_sub(mark) as u64);
                            self.truncated = true;
                        }
                    } else {
                        self.child(v, depth + 1)?;
                    }
                    unsafe { enif_map_iterator_next(env, it.as_mut_ptr()) };
                }
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_BITSTRING => {
                let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
                if unsafe { enif_inspect_binary(env, t, bin.as_mut_ptr()) } == 0 {
                    // A bitstring whose size is not a whole number of bytes.
                    return self.etf(t);
                }
                let bin = unsafe { bin.assume_init() };
                self.room(5 + bin.size)?;
                self.buf.push(T_BIN);
                self.put_u32(bin.size as u32);
                // SAFETY: `inspect_binary` gives `size` readable bytes.
                let bytes = unsafe { std::slice::from_raw_parts(bin.data, bin.size) };
                self.buf.extend_from_slice(bytes);
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_FLOAT => {
                let mut d: f64 = 0.0;
                unsafe { enif_get_double(env, t, &mut d) };
                self.room(9)?;
                self.buf.push(T_FLOAT);
                self.buf.extend_from_slice(&d.to_le_bytes());
                Ok(())
            }
            _ => self.etf(t),
        }
    }

    /// Fallback: external term format (bignums, refs, funs, remote pids).
    fn etf(&mut self, t: ERL_NIF_TERM) -> Result<(), Overflow> {
        let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
        // SAFETY: valid env and term; the binary is released below.
        if unsafe { enif_term_to_binary(self.env, t, bin.as_mut_ptr()) } == 0 {
            return Err(Overflow {
                reached: self.limit + 1,
                deep: false,
            });
        }
        let mut bin = unsafe { bin.assume_init() };
        let res = self.room(5 + bin.size).map(|()| {
            self.buf.push(T_ETF);
            self.put_u32(bin.size as u32);
            // SAFETY: `term_to_binary` gave `size` initialised bytes.
            let bytes = unsafe { std::slice::from_raw_parts(bin.data, bin.size) };
            self.buf.extend_from_slice(bytes);
        });
        // SAFETY: we own `bin` and release it exactly once.
        unsafe { enif_release_binary(&mut bin) };
        res
    }
}

/// Decodes terms from a tape written by [`TapeEncoder`].
pub struct TapeDecoder<'t> {
    tape: &'t [u8],
    pos: usize,
}

/// Scratch stack of terms reused across containers while decoding.
pub type Scratch = Vec<ERL_NIF_TERM>;

impl<'t> TapeDecoder<'t> {
    /// Decode from the start of `tape`.
    pub fn new(tape: &'t [u8]) -> Self {
        TapeDecoder { tape, pos: 0 }
    }

    #[inline]
    fn u8(&mut self) -> Option<u8> {
        let b = *self.tape.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    #[inline]
    fn u32(&mut self) -> Option<u32> {
        let b = self.tape.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    }

    #[inline]
    fn u64(&mut self) -> Option<u64> {
        let b = self.tape.get(self.pos..self.pos + 8)?;
        self.pos += 8;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn bytes(&mut self, n: usize) -> Option<&'t [u8]> {
        let b = self.tape.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(b)
    }

    /// Decode the next term; `:undefined` if the tape is exhausted.
    pub fn next<'a>(&mut self, env: Env<'a>, scratch: &mut Scratch) -> Term<'a> {
        match self.dec(env, scratch) {
            // SAFETY: built in `env` (or an immediate valid in any env).
            Some(t) => unsafe { Term::new(env, t) },
            None => atoms::undefined().encode(env),
        }
    }

    fn dec(&mut self, e: Env, scratch: &mut Scratch) -> Option<ERL_NIF_TERM> {
        let env = e.as_c_arg();
        // SAFETY (whole function): every enif call receives the caller's env
        // and terms built in it; array pointers cover `n` initialised terms.
        match self.u8()? {
            T_IMM => Some(from_word(self.u64()?)),
            T_BIN => {
                let n = self.u32()? as usize;
                let src = self.bytes(n)?;
                let mut out: ERL_NIF_TERM = ERL_NIF_TERM::default();
                let dst = unsafe { enif_make_new_binary(env, n, &mut out) };
                if n > 0 {
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, n) };
                }
                Some(out)
            }
            T_TUPLE => {
                let n = self.u32()? as usize;
                let base = scratch.len();
                for _ in 0..n {
                    let x = self.dec(e, scratch)?;
                    scratch.push(x);
                }
                let t = unsafe {
                    enif_make_tuple_from_array(env, scratch.as_ptr().add(base), n as u32)
                };
                scratch.truncate(base);
                Some(t)
            }
            T_LIST => {
                let n = self.u32()? as usize;
                let base = scratch.len();
                for _ in 0..n {
                    let x = self.dec(e, scratch)?;
                    scratch.push(x);
                }
                let tail = self.dec(e, scratch)?;
                let t = if tail == crate::nil_word() {
                    unsafe { enif_make_list_from_array(env, scratch.as_ptr().add(base), n as u32) }
                } else {
                    let mut acc = tail;
                    for i in (base..base + n).rev() {
                        acc = unsafe { enif_make_list_cell(env, scratch[i], acc) };
                    }
                    acc
                };
                scratch.truncate(base);
                Some(t)
            }
            T_MAP => {
                let n = self.u32()? as usize;
                let base = scratch.len();
                // Keys first, then values, each contiguous.
                scratch.resize(base + 2 * n, ERL_NIF_TERM::default());
                for i in 0..n {
                    let k = self.dec(e, scratch)?;
                    scratch[base + i] = k;
                    let v = self.dec(e, scratch)?;
                    scratch[base + n + i] = v;
                }
                let mut out: ERL_NIF_TERM = ERL_NIF_TERM::default();
                let ok = unsafe {
                    enif_make_map_from_arrays(
                        env,
                        scratch.as_ptr().add(base),
                        scratch.as_ptr().add(base + n),
                        n,
                        &mut out,
                    )
                };
                scratch.truncate(base);
                if ok == 0 {
                    return None;
                }
                Some(out)
            }
            T_FLOAT => {
                let d = f64::from_le_bytes(self.u64()?.to_le_bytes());
                Some(unsafe { enif_make_double(env, d) })
            }
            T_ETF => {
                let n = self.u32()? as usize;
                let src = self.bytes(n)?;
                let mut out: ERL_NIF_TERM = ERL_NIF_TERM::default();
                let used = unsafe { enif_binary_to_term(env, src.as_ptr(), n, &mut out, 0) };
                if used == 0 {
                    return None;
                }
                Some(out)
            }
            T_TRUNC => {
                let hint = self.u8()?;
                let at_least = self.u64()?;
                let kind = match hint {
                    0 => atoms::binary(),
                    1 => atoms::list(),
                    2 => atoms::map(),
                    3 => atoms::tuple(),
                    5 => atoms::depth(),
                    _ => atoms::term(),
                };
                Some((atoms::truncated(), at_least, kind).encode(e).as_c_arg())
            }
            _ => None,
        }
    }
}
