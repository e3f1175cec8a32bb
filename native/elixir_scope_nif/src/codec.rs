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
pub use elixir_scope_core::hash_bytes;

pub use elixir_scope_core::tape::MAX_DEPTH;
use elixir_scope_core::tape::{
    hint, T_BIN, T_ETF, T_FLOAT, T_I64, T_IMM, T_LIST, T_MAP, T_TRUNC, T_TUPLE, T_U64,
};

/// Maps with at most this many entries (structs) are truncated per value
/// rather than as a whole, at the top level and one level down.
const FIELD_MAP_MAX: usize = 32;
/// Bytes of a truncation marker.
const MARKER_BYTES: usize = 10;

/// Kinds named in truncation markers.
#[derive(Copy, Clone)]
#[repr(u8)]
enum Hint {
    Binary = hint::BINARY,
    List = hint::LIST,
    Map = hint::MAP,
    Tuple = hint::TUPLE,
    Term = hint::TERM,
    Depth = hint::DEPTH,
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

/// Payload buffers up to this size are never shrunk.
const SHRINK_FLOOR: usize = 512;

/// Most top-level fields an event encodes (each may end in a marker
/// written past the limit).
const MAX_FIELDS: usize = 4;
/// Bytes past the limit the scratch buffer keeps for those markers.
const SLACK: usize = MAX_FIELDS * MARKER_BYTES + 16;

std::thread_local! {
    /// Per-thread encoding scratch, at least `limit + SLACK` bytes.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Per-thread scratch of [`content_hash`] (used while `SCRATCH` may be
    /// borrowed).
    static HASH_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The content hash [`TapeEncoder::field_hashed`] gives `msg` when it is
/// encoded with `budget` bytes left: what a send or receive of `msg`
/// written under that budget carries. The tracer uses it for the message
/// that triggered an OTP callback, rebuilt from the callback's arguments.
pub fn content_hash(env: Env, msg: Term, budget: usize) -> u64 {
    HASH_SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let need = budget + SLACK;
        if scratch.capacity() < need {
            scratch.reserve_exact(need);
        }
        let mut enc = TapeEncoder {
            env: env.as_c_arg(),
            ptr: scratch.as_mut_ptr(),
            len: 0,
            limit: budget,
            truncated: false,
        };
        enc.field_hashed(msg)
    })
}

/// Encode into `payload` (replacing its contents) with `f`, under `limit`
/// bytes; returns whether anything was truncated. Encoding runs in a
/// per-thread scratch buffer sized for the limit, so the hot loop writes
/// without capacity checks; the result is then copied into `payload`.
pub fn encode_into(
    env: Env,
    payload: &mut Vec<u8>,
    limit: usize,
    f: impl FnOnce(&mut TapeEncoder),
) -> bool {
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let need = limit + SLACK;
        if scratch.capacity() < need {
            scratch.reserve_exact(need);
        }
        let mut enc = TapeEncoder {
            env: env.as_c_arg(),
            ptr: scratch.as_mut_ptr(),
            len: 0,
            limit,
            truncated: false,
        };
        f(&mut enc);
        payload.clear();
        // SAFETY: the encoder wrote `len` initialised bytes at `ptr`, within
        // the scratch capacity (`len <= limit + SLACK`).
        payload.extend_from_slice(unsafe { std::slice::from_raw_parts(enc.ptr, enc.len) });
        // A slot's buffer is reused across laps; one big event must not pin
        // a big buffer forever.
        if payload.capacity() > 4 * enc.len.max(SHRINK_FLOOR) {
            payload.shrink_to(2 * enc.len.max(SHRINK_FLOOR));
        }
        enc.truncated
    })
}

/// The raw word of an immediate term (local pid, atom, small integer),
/// else 0 (the "none" header value).
#[inline]
pub fn imm_word(t: ERL_NIF_TERM) -> u64 {
    if is_immediate(t) {
        word(t)
    } else {
        0
    }
}

/// The content hash of a term that is not encoded (whole, or because it
/// was too big): its `phash2`, marked so it never equals the hash of an
/// encoding. A send and its receive hash the same message alike.
#[inline]
pub fn phash_content(t: Term) -> u64 {
    hash_bytes(&(t.hash_phash2() as u64 | 1 << 40).to_le_bytes())
}

/// Encodes terms into a tape under a byte budget (see [`encode_into`]).
pub struct TapeEncoder {
    env: *mut ErlNifEnv,
    /// Start of a buffer of at least `limit + SLACK` bytes.
    ptr: *mut u8,
    len: usize,
    limit: usize,
    /// Set when any field was replaced by a truncation marker.
    pub truncated: bool,
}

impl TapeEncoder {
    /// Append raw bytes. Callers have checked `room` (or are writing the
    /// one marker allowed past the limit).
    #[inline(always)]
    fn put_bytes(&mut self, b: &[u8]) {
        debug_assert!(self.len + b.len() <= self.limit + SLACK);
        // SAFETY: the buffer holds `limit + SLACK` bytes and every caller
        // stays within it (see above).
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(self.len), b.len()) };
        self.len += b.len();
    }

    #[inline(always)]
    fn put_byte(&mut self, b: u8) {
        debug_assert!(self.len < self.limit + SLACK);
        // SAFETY: as in `put_bytes`.
        unsafe { self.ptr.add(self.len).write(b) };
        self.len += 1;
    }

    /// Encode one top-level field. Never fails: a field that does not fit is
    /// replaced by a truncation marker (always written, so the tape may end
    /// up at most one marker over the limit).
    pub fn field(&mut self, t: Term) {
        let t = t.as_c_arg();
        let mark = self.len;
        if let Err(o) = self.enc(t, 0, true) {
            self.len = mark;
            let hint = if o.deep { Hint::Depth } else { self.hint(t) };
            self.marker(hint, o.reached.saturating_sub(mark) as u64);
            self.truncated = true;
        }
    }

    /// Encode one top-level field, cut as a whole: a field that does not
    /// fit becomes one truncation marker even when it is a small map (which
    /// [`TapeEncoder::field`] cuts value by value). The Ingestor's value
    /// fields (a return value, a message, a state, an error message) are
    /// cut this way, as the original's `Utils.truncate_data/2` did.
    pub fn field_whole(&mut self, t: Term) {
        let t = t.as_c_arg();
        let mark = self.len;
        if let Err(o) = self.enc(t, 0, false) {
            self.len = mark;
            let hint = if o.deep { Hint::Depth } else { self.hint(t) };
            self.marker(hint, o.reached.saturating_sub(mark) as u64);
            self.truncated = true;
        }
    }

    /// Encode one top-level field like [`TapeEncoder::field`], except that
    /// a tuple or a proper list is cut element by element: an element that
    /// does not fit becomes a truncation marker in its place, so the shape
    /// survives (an OTP callback's `{:reply, reply, state}` whose state is
    /// too big, a call's arguments with one big argument). Struct-like
    /// maps among the elements are cut value by value.
    pub fn field_elems(&mut self, t: Term) {
        let t = t.as_c_arg();
        let mark = self.len;
        if let Err(o) = self.elems(t) {
            self.len = mark;
            let hint = if o.deep { Hint::Depth } else { self.hint(t) };
            self.marker(hint, o.reached.saturating_sub(mark) as u64);
            self.truncated = true;
        }
    }

    fn elems(&mut self, t: ERL_NIF_TERM) -> Result<(), Overflow> {
        if is_immediate(t) {
            return self.put_imm(t);
        }
        let env = self.env;
        // SAFETY (whole match): `env` and terms of it; out-pointers are
        // live locals.
        match unsafe { enif_term_type(env, t) } {
            ErlNifTermType::ERL_NIF_TERM_TYPE_TUPLE => {
                for &e in self.tuple_header(t)? {
                    self.elem(e)?;
                }
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_LIST => {
                // Short proper lists only (others are encoded whole).
                let mut items = [ERL_NIF_TERM::default(); 16];
                let mut n = 0;
                let mut head = ERL_NIF_TERM::default();
                let mut tail = ERL_NIF_TERM::default();
                let mut cur = t;
                while unsafe { enif_get_list_cell(env, cur, &mut head, &mut tail) } != 0 {
                    if n == items.len() {
                        return self.enc(t, 0, true);
                    }
                    items[n] = head;
                    n += 1;
                    cur = tail;
                }
                if cur != crate::nil_word() {
                    return self.enc(t, 0, true);
                }
                self.room(5)?;
                self.put_byte(T_LIST);
                self.put_u32(n as u32);
                for &e in &items[..n] {
                    self.elem(e)?;
                }
                self.put_imm(cur)
            }
            _ => self.enc(t, 0, true),
        }
    }

    /// Writes a tuple's header; returns its elements.
    #[inline(always)]
    fn tuple_header<'t>(&mut self, t: ERL_NIF_TERM) -> Result<&'t [ERL_NIF_TERM], Overflow> {
        let mut arity: i32 = 0;
        let mut elems: *const ERL_NIF_TERM = std::ptr::null();
        // SAFETY: `t` is a tuple term of `self.env`; on success `elems`
        // points at `arity` terms that live as long as the term.
        let items = unsafe {
            enif_get_tuple(self.env, t, &mut arity, &mut elems);
            std::slice::from_raw_parts(elems, arity as usize)
        };
        self.room(5)?;
        self.put_byte(T_TUPLE);
        self.put_u32(arity as u32);
        Ok(items)
    }

    /// One element of [`TapeEncoder::field_elems`]'s container.
    fn elem(&mut self, e: ERL_NIF_TERM) -> Result<(), Overflow> {
        let mark = self.len;
        let r = if is_immediate(e) {
            self.put_imm(e)
        } else {
            self.enc(e, 1, true)
        };
        self.cut_in_place(mark, e, r)
    }

    /// After encoding `t` from `mark` failed with `r`: a marker in its
    /// place, if one fits under the limit (else the failure goes up).
    #[inline]
    fn cut_in_place(
        &mut self,
        mark: usize,
        t: ERL_NIF_TERM,
        r: Result<(), Overflow>,
    ) -> Result<(), Overflow> {
        if let Err(o) = r {
            self.len = mark;
            if mark + MARKER_BYTES > self.limit {
                return Err(o);
            }
            let hint = if o.deep { Hint::Depth } else { self.hint(t) };
            self.marker(hint, o.reached.saturating_sub(mark) as u64);
            self.truncated = true;
        }
        Ok(())
    }

    /// Encode one top-level field like [`TapeEncoder::field_whole`] (a
    /// message too big is one marker) and return a 64-bit hash of its
    /// content: of its encoding (equal terms encode, and so hash, equally)
    /// or, when the field was truncated, of the whole term (`phash2`, so
    /// different large messages of the same size do not collide; it walks
    /// the term once, as sending it did). How a field is cut never changes
    /// its hash: an uncut encoding is the same either way.
    pub fn field_hashed(&mut self, t: Term) -> u64 {
        let mark = self.len;
        let was = self.truncated;
        self.truncated = false;
        self.field_whole(t);
        let cut = self.truncated;
        self.truncated |= was;
        if cut {
            return phash_content(t);
        }
        // SAFETY: bytes `mark..len` were just written by `field`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.add(mark), self.len - mark) };
        hash_bytes(bytes)
    }

    #[inline]
    fn room(&self, n: usize) -> Result<(), Overflow> {
        let reached = self.len + n;
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
        self.room(9)?;
        // SAFETY: `room` checked `len + 9 <= limit` within the buffer.
        unsafe {
            let p = self.ptr.add(self.len);
            p.write(T_IMM);
            (p.add(1) as *mut [u8; 8]).write_unaligned(word(t).to_le_bytes());
        }
        self.len += 9;
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
        self.put_bytes(&v.to_le_bytes());
    }

    fn marker(&mut self, hint: Hint, at_least: u64) {
        if self.len + MARKER_BYTES > self.limit + SLACK {
            // Only reachable with more than MAX_FIELDS fields: never write
            // past the buffer.
            debug_assert!(false, "more than MAX_FIELDS top-level fields");
            return;
        }
        self.put_byte(T_TRUNC);
        self.put_byte(hint as u8);
        self.put_bytes(&at_least.to_le_bytes());
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

    /// One key/value pair of a map at `depth`. Values of struct-like maps
    /// (`per_field`) are truncated one by one, one level down as well
    /// (`%Events{data: %FunctionEntry{...}}`).
    #[inline(always)]
    fn map_entry(
        &mut self,
        k: ERL_NIF_TERM,
        v: ERL_NIF_TERM,
        depth: u32,
        per_field: bool,
    ) -> Result<(), Overflow> {
        self.child(k, depth + 1)?;
        if !per_field {
            return self.child(v, depth + 1);
        }
        let mark = self.len;
        let r = if is_immediate(v) {
            self.put_imm(v)
        } else {
            self.enc(v, depth + 1, depth == 0)
        };
        self.cut_in_place(mark, v, r)
    }

    fn enc(&mut self, t: ERL_NIF_TERM, depth: u32, fields: bool) -> Result<(), Overflow> {
        if is_immediate(t) {
            return self.put_imm(t);
        }
        if depth >= MAX_DEPTH {
            return Err(Overflow {
                reached: self.len,
                deep: true,
            });
        }
        let env = self.env;
        // SAFETY (whole match): every call below receives `env` and a term
        // that belongs to it; out-pointers point to live locals.
        match unsafe { enif_term_type(env, t) } {
            ErlNifTermType::ERL_NIF_TERM_TYPE_TUPLE => {
                for &e in self.tuple_header(t)? {
                    self.child(e, depth + 1)?;
                }
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_LIST => {
                self.room(5)?;
                self.put_byte(T_LIST);
                let count_at = self.len;
                self.put_u32(0);
                let mut n: u32 = 0;
                let mut cur = t;
                if layout().cons {
                    // SAFETY: `cur` is list-tagged, so it points at a cons
                    // cell [head, tail] on the caller's heap (layout probed
                    // at load); terms are stable for the whole NIF call.
                    while word(cur) & 0x3 == 0x1 {
                        let cell = (word(cur) & !0x3) as *const u64;
                        let (head, tail) = unsafe { (*cell, *cell.add(1)) };
                        self.child(from_word(head), depth + 1)?;
                        n += 1;
                        cur = from_word(tail);
                    }
                } else {
                    let mut head: ERL_NIF_TERM = ERL_NIF_TERM::default();
                    let mut tail: ERL_NIF_TERM = ERL_NIF_TERM::default();
                    while unsafe { enif_get_list_cell(env, cur, &mut head, &mut tail) } != 0 {
                        self.child(head, depth + 1)?;
                        n += 1;
                        cur = tail;
                    }
                }
                // `cur` is `[]` for a proper list, else the improper tail.
                self.child(cur, depth + 1)?;
                // SAFETY: the 4 count bytes were written at `count_at`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        n.to_le_bytes().as_ptr(),
                        self.ptr.add(count_at),
                        4,
                    )
                };
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_MAP => {
                let per_field_ok = fields;
                if let Some((size, keys, values)) = flatmap_parts(t) {
                    self.room(5)?;
                    self.put_byte(T_MAP);
                    self.put_u32(size as u32);
                    let per_field = per_field_ok && size <= FIELD_MAP_MAX;
                    for i in 0..size {
                        // SAFETY: `flatmap_parts` checked the layout; both
                        // arrays hold `size` terms.
                        let (k, v) = unsafe { (*keys.add(i), *values.add(i)) };
                        self.map_entry(from_word(k), from_word(v), depth, per_field)?;
                    }
                    return Ok(());
                }
                let mut size: usize = 0;
                unsafe { enif_get_map_size(env, t, &mut size) };
                self.room(5)?;
                self.put_byte(T_MAP);
                self.put_u32(size as u32);
                let per_field = per_field_ok && size <= FIELD_MAP_MAX;
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
                    self.map_entry(k, v, depth, per_field)?;
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
                self.put_byte(T_BIN);
                self.put_u32(bin.size as u32);
                // SAFETY: `inspect_binary` gives `size` readable bytes.
                let bytes = unsafe { std::slice::from_raw_parts(bin.data, bin.size) };
                self.put_bytes(bytes);
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_FLOAT => {
                let mut d: f64 = 0.0;
                unsafe { enif_get_double(env, t, &mut d) };
                self.room(9)?;
                self.put_byte(T_FLOAT);
                self.put_bytes(&d.to_le_bytes());
                Ok(())
            }
            ErlNifTermType::ERL_NIF_TERM_TYPE_INTEGER => {
                // Not immediate, so a bignum: most are 64-bit values such as
                // nanosecond timestamps, stored as 8 bytes rather than ETF.
                let mut i: i64 = 0;
                let mut u: u64 = 0;
                if unsafe { rustler::sys::enif_get_int64(env, t, &mut i) } != 0 {
                    self.room(9)?;
                    self.put_byte(T_I64);
                    self.put_bytes(&i.to_le_bytes());
                    Ok(())
                } else if unsafe { rustler::sys::enif_get_uint64(env, t, &mut u) } != 0 {
                    self.room(9)?;
                    self.put_byte(T_U64);
                    self.put_bytes(&u.to_le_bytes());
                    Ok(())
                } else {
                    self.etf(t)
                }
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
            self.put_byte(T_ETF);
            self.put_u32(bin.size as u32);
            // SAFETY: `term_to_binary` gave `size` initialised bytes.
            let bytes = unsafe { std::slice::from_raw_parts(bin.data, bin.size) };
            self.put_bytes(bytes);
        });
        // SAFETY: we own `bin` and release it exactly once.
        unsafe { enif_release_binary(&mut bin) };
        res
    }
}

/// Heap layout facts the encoder may rely on, probed once at load by
/// comparing raw reads against the NIF API (see [`probe_layout`]).
#[derive(Copy, Clone, Default)]
pub struct Layout {
    /// Header word of a flatmap (`thing, size, keys-tuple, values...`), or 0.
    pub flatmap_header: u64,
    /// A list-tagged word points at a `[head, tail]` cons cell.
    pub cons: bool,
    /// A small integer is the immediate word `value << 4 | 0xF`.
    pub small: bool,
    /// The low 6 bits of a positive bignum's header word (never 0 when
    /// probed: 0 means "unknown, ask the NIF API").
    pub pos_big_tag: u64,
}

static LAYOUT: std::sync::OnceLock<Layout> = std::sync::OnceLock::new();

#[inline(always)]
fn layout() -> Layout {
    LAYOUT.get().copied().unwrap_or_default()
}

/// The probed flatmap header word (0: the probe failed; build maps through
/// the NIF API).
#[inline(always)]
pub fn flatmap_header() -> u64 {
    layout().flatmap_header
}

/// Did the probe find `[head, tail]` cons cells (raw list walks allowed)?
#[inline(always)]
pub fn raw_cons() -> bool {
    layout().cons
}

/// `(size, keys, values)` of a flatmap term, read straight from the heap,
/// when the probed layout allows it.
#[inline(always)]
pub(crate) fn flatmap_parts(t: ERL_NIF_TERM) -> Option<(usize, *const u64, *const u64)> {
    let hdr = layout().flatmap_header;
    let w = word(t);
    if hdr == 0 || w & 0x3 != 0x2 {
        return None;
    }
    let p = (w & !0x3) as *const u64;
    // SAFETY: a boxed term points at its header word on a live heap; the
    // header equals the probed flatmap header, so the next words are the
    // size, the keys tuple (boxed: header, then the keys) and the values.
    unsafe {
        if *p != hdr {
            return None;
        }
        let size = *p.add(1) as usize;
        let keys = (*p.add(2) & !0x3) as *const u64;
        Some((size, keys.add(1), p.add(3)))
    }
}

/// The word of `t`'s `__struct__` value when `t` is a struct (a flatmap
/// whose first key is `__struct__`), else `None`: one word compare.
#[inline]
pub fn struct_name(t: ERL_NIF_TERM, struct_key: ERL_NIF_TERM) -> Option<u64> {
    match flatmap_parts(t) {
        // SAFETY: `flatmap_parts` returned `size` keys and values.
        Some((size, keys, values)) if size > 0 => unsafe {
            (*keys == word(struct_key)).then(|| *values)
        },
        _ => None,
    }
}

/// `map[key]` for an atom (or other immediate) `key`: a scan of the
/// flatmap's keys read straight from the heap when the probed layout allows
/// it (struct-sized maps), else `enif_get_map_value`. `None` if `m` is not
/// a map or has no such key.
#[inline]
pub fn map_get_immediate(env: Env, m: ERL_NIF_TERM, key: ERL_NIF_TERM) -> Option<ERL_NIF_TERM> {
    if let Some((size, keys, values)) = flatmap_parts(m) {
        let k = word(key);
        for i in 0..size {
            // SAFETY: `flatmap_parts` returned `size` keys and values of a
            // live flatmap.
            unsafe {
                if *keys.add(i) == k {
                    return Some(from_word(*values.add(i)));
                }
            }
        }
        return None;
    }
    let mut out = ERL_NIF_TERM::default();
    // SAFETY: valid env and terms; `out` is a live out-pointer; a non-map
    // `m` makes the call return 0.
    let found = unsafe { rustler::sys::enif_get_map_value(env.as_c_arg(), m, key, &mut out) };
    (found != 0).then_some(out)
}

/// Elements of a tuple term (empty if not a tuple).
#[inline]
pub fn tuple_items<'a>(t: Term<'a>) -> &'a [ERL_NIF_TERM] {
    let mut arity: i32 = 0;
    let mut arr: *const ERL_NIF_TERM = std::ptr::null();
    // SAFETY: valid env and term; on success `arr` points at `arity` terms
    // that live as long as the term.
    unsafe {
        if enif_get_tuple(t.get_env().as_c_arg(), t.as_c_arg(), &mut arity, &mut arr) == 0 {
            return &[];
        }
        std::slice::from_raw_parts(arr, arity as usize)
    }
}

/// The elements of a proper list (`None` for anything else: rustler's own
/// list decoding panics on an improper list).
pub fn proper_list(t: Term) -> Option<Vec<Term>> {
    let mut out = Vec::new();
    let mut cur = t;
    while let Ok((h, tail)) = cur.list_get_cell() {
        out.push(h);
        cur = tail;
    }
    cur.is_empty_list().then_some(out)
}

/// The value of a small-integer term, read from its word (`None`: not a
/// small integer, or the layout probe did not confirm the tagging): a
/// call's arity under the `arity` trace flag without two NIF API calls
/// (`enif_get_long`, `enif_is_list`) per traced call.
#[inline(always)]
pub fn small_int(t: ERL_NIF_TERM) -> Option<i64> {
    let w = word(t);
    (w & 0xF == 0xF && layout().small).then_some((w as i64) >> 4)
}

/// Number of cells of a (possibly improper) list, counting at most `cap`.
pub fn list_cells(t: Term, cap: i64) -> i64 {
    let mut n = 0;
    let mut cur = t;
    if layout().cons {
        let mut w = word(cur.as_c_arg());
        while n < cap && w & 0x3 == 0x1 {
            // SAFETY: a list-tagged word of a live term points at a cons
            // cell (layout probed at load); we read its tail word.
            w = unsafe { *((w & !0x3) as *const u64).add(1) };
            n += 1;
        }
        return n;
    }
    while n < cap {
        let Ok((_, tail)) = cur.list_get_cell() else {
            break;
        };
        n += 1;
        cur = tail;
    }
    n
}

/// Check the raw-heap fast paths against the NIF API on sample terms and
/// enable the ones that agree. Called from `load`.
pub fn probe_layout(env: Env) {
    let mut l = Layout::default();
    // Lists.
    let list = vec![1i64.encode(env), atoms::ok().encode(env), 3i64.encode(env)].encode(env);
    let mut cur = list;
    let mut cons_ok = word(cur.as_c_arg()) & 0x3 == 0x1;
    while cons_ok {
        let Ok((h, tl)) = cur.list_get_cell() else {
            break;
        };
        let cell = (word(cur.as_c_arg()) & !0x3) as *const u64;
        // SAFETY: a list-tagged word of a live term in `env`.
        let (rh, rt) = unsafe { (*cell, *cell.add(1)) };
        cons_ok = rh == word(h.as_c_arg()) && rt == word(tl.as_c_arg());
        cur = tl;
        if word(cur.as_c_arg()) & 0x3 != 0x1 {
            break;
        }
    }
    l.cons = cons_ok;
    // Small integers, and no other immediate with their tag bits.
    let others = [
        atoms::ok().encode(env),
        env.pid().encode(env),
        Vec::<Term>::new().encode(env),
    ];
    // `ELIXIR_SCOPE_SMALL_INT=0`: through the NIF API (A/B benchmarks).
    let small_off = std::env::var("ELIXIR_SCOPE_SMALL_INT").is_ok_and(|v| v == "0");
    l.small = !small_off
        && [0i64, 1, 42, -7, 65_535, -(1 << 40), (1 << 59) - 1]
            .iter()
            .all(|&v| word(v.encode(env).as_c_arg()) == ((v << 4) | 0xF) as u64)
        && others.iter().all(|t| word(t.as_c_arg()) & 0xF != 0xF);
    // Flatmaps of a few sizes, compared against the iterator.
    let mut hdr = 0u64;
    let mut ok = true;
    for size in [1usize, 3, 13, 32] {
        let keys: Vec<Term> = (0..size)
            .map(|i| rustler::Atom::from_str(env, &format!("elixir_scope_probe_{i:02}")))
            .map(|a| {
                a.map(|a| a.encode(env))
                    .unwrap_or_else(|_| atoms::ok().encode(env))
            })
            .collect();
        let vals: Vec<Term> = (0..size).map(|i| (i as i64 * 7).encode(env)).collect();
        let Ok(map) = Term::map_from_term_arrays(env, &keys, &vals) else {
            ok = false;
            break;
        };
        let w = word(map.as_c_arg());
        if w & 0x3 != 0x2 {
            ok = false;
            break;
        }
        let p = (w & !0x3) as *const u64;
        // SAFETY: boxed term of `env`; only the words the NIF API reports
        // below are compared, after checking the size word.
        let this_hdr = unsafe { *p };
        if hdr != 0 && this_hdr != hdr {
            ok = false;
            break;
        }
        hdr = this_hdr;
        if unsafe { *p.add(1) } as usize != size {
            ok = false;
            break;
        }
        let kp = unsafe { (*p.add(2) & !0x3) as *const u64 };
        let Some(iter) = rustler::types::map::MapIterator::new(map) else {
            ok = false;
            break;
        };
        for (i, (k, v)) in iter.enumerate() {
            let (rk, rv) = unsafe { (*kp.add(1 + i), *p.add(3 + i)) };
            if rk != word(k.as_c_arg()) || rv != word(v.as_c_arg()) {
                ok = false;
            }
        }
        if !ok {
            break;
        }
    }
    if ok {
        l.flatmap_header = hdr;
    }
    l.pos_big_tag = probe_pos_big_tag(env);
    let _ = LAYOUT.set(l);
}

/// The low 6 bits shared by the headers of positive bignums (`u64`-sized
/// and larger), if they differ from those of the other boxed terms ids are
/// made of (binaries, sub-binaries, tuples, floats, references, negative
/// bignums); 0 otherwise.
fn probe_pos_big_tag(env: Env) -> u64 {
    let header = |t: Term| -> Option<u64> {
        let w = word(t.as_c_arg());
        // SAFETY: a boxed term of `env` points at its header word.
        (w & 0x3 == 0x2).then(|| unsafe { *((w & !0x3) as *const u64) } & 0x3F)
    };
    let bigs = [1u64 << 60, 1 << 63, u64::MAX];
    let Some(tag) = header(bigs[0].encode(env)) else {
        return 0;
    };
    if tag == 0 || !bigs.iter().all(|&b| header(b.encode(env)) == Some(tag)) {
        return 0;
    }
    let mut others: Vec<Term> = vec![
        (-(1i64 << 62)).encode(env),
        i64::MIN.encode(env),
        1.5f64.encode(env),
        "id-42-c".encode(env),
        "a binary longer than sixty-four bytes, so that it is a refc binary ......".encode(env),
        (atoms::ok(), 42i64).encode(env),
        rustler::types::tuple::make_tuple(env, &[]),
        env.make_ref().encode(env),
    ];
    // A sub-binary.
    if let Ok(b) = rustler::Binary::from_term("0123456789abcdefghij".encode(env)) {
        if let Ok(sub) = b.make_subbinary(3, 5) {
            others.push(sub.encode(env));
        }
    }
    if others.iter().all(|&t| header(t) != Some(tag)) {
        tag
    } else {
        0
    }
}

/// What an integer-id reader needs to know about `t` without a NIF call:
/// `Some(Some(v))` a non-negative small integer, `Some(None)` a term that
/// is certainly not an integer in `0..2^64` (another immediate, or a boxed
/// term whose header is not a positive bignum's), `None` "ask
/// `enif_get_uint64`" (a positive bignum, or the layout was not probed).
#[inline(always)]
pub fn u64_hint(t: ERL_NIF_TERM) -> Option<Option<u64>> {
    let l = layout();
    if !l.small {
        return None;
    }
    let w = word(t);
    if w & 0xF == 0xF {
        let v = (w as i64) >> 4;
        return Some((v >= 0).then_some(v as u64));
    }
    if w & 0x3 == 0x3 {
        return Some(None); // another immediate: atom, pid, port, nil
    }
    if w & 0x3 == 0x2 && l.pos_big_tag != 0 {
        // SAFETY: a boxed term points at its header word on a live heap.
        let hdr = unsafe { *((w & !0x3) as *const u64) };
        if hdr & 0x3F != l.pos_big_tag {
            return Some(None);
        }
    }
    None
}

/// A list term of `terms`, which must all be terms of `env`.
pub fn make_list<'a>(env: Env<'a>, terms: &[ERL_NIF_TERM]) -> Term<'a> {
    // SAFETY: `terms` holds `len` valid terms of `env` (caller's contract).
    unsafe {
        Term::new(
            env,
            enif_make_list_from_array(env.as_c_arg(), terms.as_ptr(), terms.len() as u32),
        )
    }
}

/// Decodes terms from a tape written by [`TapeEncoder`].
pub struct TapeDecoder<'t> {
    tape: &'t [u8],
    pos: usize,
}

/// Scratch stack of terms reused across containers while decoding (and
/// the per-call struct keys, see `event_term::Scratch`).
pub use crate::event_term::Scratch;

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

    /// Decode the next term; nil if the tape is exhausted (a field that
    /// was not captured, such as the tracer's arity-only calls).
    pub fn next<'a>(&mut self, env: Env<'a>, scratch: &mut Scratch) -> Term<'a> {
        match self.child(env, scratch) {
            // SAFETY: built in `env` (or an immediate valid in any env).
            Some(t) => unsafe { Term::new(env, t) },
            None => atoms::nil().encode(env),
        }
    }

    /// Decode the next term; `None` if the tape is exhausted or malformed.
    pub fn try_next<'a>(&mut self, env: Env<'a>, scratch: &mut Scratch) -> Option<Term<'a>> {
        // SAFETY: built in `env` (or an immediate valid in any env).
        self.child(env, scratch)
            .map(|t| unsafe { Term::new(env, t) })
    }

    /// Skip the next term; the bytes it spans, `None` at the end.
    pub fn skip(&mut self) -> Option<&'t [u8]> {
        let start = self.pos;
        self.skip_one()?;
        Some(&self.tape[start..self.pos])
    }

    fn skip_one(&mut self) -> Option<()> {
        match self.u8()? {
            T_IMM | T_FLOAT | T_I64 | T_U64 => {
                self.bytes(8)?;
            }
            T_BIN | T_ETF => {
                let n = self.u32()? as usize;
                self.bytes(n)?;
            }
            T_TUPLE => {
                for _ in 0..self.u32()? {
                    self.skip_one()?;
                }
            }
            T_LIST => {
                for _ in 0..=self.u32()? {
                    self.skip_one()?;
                }
            }
            T_MAP => {
                for _ in 0..2 * self.u32()? as u64 {
                    self.skip_one()?;
                }
            }
            T_TRUNC => {
                self.bytes(9)?;
            }
            _ => return None,
        }
        Some(())
    }

    /// Decode a nested term; immediates without a recursive call.
    #[inline(always)]
    fn child(&mut self, e: Env, scratch: &mut Scratch) -> Option<ERL_NIF_TERM> {
        if self.tape.get(self.pos) == Some(&T_IMM) {
            let b = self.tape.get(self.pos + 1..self.pos + 9)?;
            self.pos += 9;
            return Some(from_word(u64::from_le_bytes(b.try_into().ok()?)));
        }
        self.dec(e, scratch)
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
                    let x = self.child(e, scratch)?;
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
                    let x = self.child(e, scratch)?;
                    scratch.push(x);
                }
                let tail = self.child(e, scratch)?;
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
                    let k = self.child(e, scratch)?;
                    scratch[base + i] = k;
                    let v = self.child(e, scratch)?;
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
            T_I64 => {
                let i = self.u64()? as i64;
                Some(unsafe { rustler::sys::enif_make_int64(env, i) })
            }
            T_U64 => {
                let u = self.u64()?;
                Some(unsafe { rustler::sys::enif_make_uint64(env, u) })
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
                let h = self.u8()?;
                let at_least = self.u64()?;
                let kind = match h {
                    hint::BINARY => atoms::binary(),
                    hint::LIST => atoms::list(),
                    hint::MAP => atoms::map(),
                    hint::TUPLE => atoms::tuple(),
                    hint::DEPTH => atoms::depth(),
                    _ => atoms::term(),
                };
                Some((atoms::truncated(), at_least, kind).encode(e).as_c_arg())
            }
            _ => None,
        }
    }
}
