//! `corr_*` NIFs: the `ElixirScope.Capture.EventCorrelator` resource, a
//! [`Tracker`] (correlator plus per-correlation records) behind a mutex,
//! fed straight from `ElixirScope.Events` structs.
//!
//! Event fields are read here with `codec::map_get_immediate` (a scan of a
//! struct's keys on the heap, or `enif_get_map_value`) and results are
//! built as `%CorrelatedEvent{}` maps by `event_term::make_struct_in` (one
//! shared keys tuple per call); no intermediate Elixir terms are made.
//!
//! # Keys
//!
//! The correlator works on `u64` keys; terms map to them as follows.
//!
//! * **Event ids.** An integer in `0..2^63` is its own key. `nil` (or an
//!   event struct without an id field) gets the fresh key
//!   `2^62 + next_event_id()`, returned as that integer. Any other term
//!   (strings, negative or huge integers, tuples...) gets `2^63 | hash`
//!   (59 bits, see [`hash59`]). Results show the term itself: within one
//!   call the caller's own term (met earlier in the call, found in a
//!   per-call [`Seen`] map: nothing is copied or re-encoded), across calls
//!   a copy kept in a [`TermStore`] (the last `max_correlations` terms
//!   kept or used, each at most [`MAX_KEPT_TERM_BYTES`]); a forgotten or
//!   oversized one shows as the key.
//! * **Correlation keys** (a call's `correlation_id` / `call_id`): `nil` is
//!   no key, an integer `i` in `0..2^63` is `i + 1`, anything else is
//!   hashed as above.
//! * **Pids.** `nil` is [`UNKNOWN_PID`]; an immediate term (a local pid,
//!   an atom such as a registered name, a small integer) is its raw word;
//!   anything else (a remote pid) is `2^63 | hash << 2` and kept like ids.
//! * **Messages** are matched by `:erlang.phash2/1` of the message.
//!
//! # Scheduling
//!
//! `corr_batch` runs on a normal scheduler for lists of at most [`CHUNK`]
//! events: it takes the lock with `try_lock` (answering `:busy` if it is
//! held), stops after [`BUDGET_NORMAL`] (the caller then correlates the
//! rest with `corr_batch` again) and charges the time it used with
//! `enif_consume_timeslice`. Longer lists, and lists that found the lock
//! taken, go to `corr_batch_dirty`, which builds the whole result list in one call
//! and takes the lock per [`CHUNK_DIRTY`] events. On 100k-event batches
//! one dirty call measured as fast as or faster than 1,000-event chunks
//! joined in Elixir (the join allocates while the whole result is live and
//! adds GC), and needs no join. Both check that the list is proper before
//! correlating anything. Everything else that locks runs on a dirty CPU
//! scheduler.

use elixir_scope_core::correlator::{
    CorrInput, CorrKind, CorrRecord, CorrType, Correlation, CorrelatorConfig, Link, LinkKind,
    Tracker, UNKNOWN_PID,
};
use elixir_scope_core::next_event_id;
use rustler::sys::{
    enif_alloc_env, enif_binary_to_term, enif_free_env, enif_get_tuple, enif_get_uint64,
    enif_inspect_binary, enif_make_copy, enif_make_double, enif_make_map_from_arrays,
    enif_make_new_binary, enif_make_tuple_from_array, enif_make_uint64, enif_monotonic_time,
    enif_release_binary, enif_term_to_binary, enif_term_type, ErlNifBinary, ErlNifEnv,
    ErlNifResourceType, ErlNifTerm as ERL_NIF_TERM, ErlNifTimeUnit,
};
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::collections::{HashMap, VecDeque};
use std::ffi::CStr;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::AtomicPtr;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use crate::codec::{from_word, is_immediate, word};
use crate::error::badarg;
use crate::event_term::{make_struct_in, Scratch, Shape};
use crate::handle::{self, Handle, Ref};

/// Longest list `corr_batch` (normal scheduler) handles.
pub const CHUNK: usize = 1000;
/// `corr_batch` stops after this long even if its list is not done.
pub const BUDGET_NORMAL: Duration = Duration::from_micros(600);
/// Events `corr_batch_dirty` correlates per lock acquisition.
const CHUNK_DIRTY: usize = 10_000;
/// Id terms larger than this (external format) are not kept: results show
/// their integer key.
const MAX_KEPT_TERM_BYTES: usize = 4096;
/// Largest `max_correlations` accepted.
pub const MAX_CORRELATIONS_LIMIT: i64 = 1 << 28;

const HASHED: u64 = 1 << 63;
const FRESH: u64 = 1 << 62;

mod names {
    rustler::atoms! {
        nil,
        busy,
        large,
        struct_ = "__struct__",
        // Event structs
        events = "Elixir.ElixirScope.Events",
        function_execution_mod = "Elixir.ElixirScope.Events.FunctionExecution",
        function_entry_mod = "Elixir.ElixirScope.Events.FunctionEntry",
        function_exit_mod = "Elixir.ElixirScope.Events.FunctionExit",
        message_event_mod = "Elixir.ElixirScope.Events.MessageEvent",
        message_send_mod = "Elixir.ElixirScope.Events.MessageSend",
        message_receive_mod = "Elixir.ElixirScope.Events.MessageReceive",
        message_sent_mod = "Elixir.ElixirScope.Events.MessageSent",
        message_received_mod = "Elixir.ElixirScope.Events.MessageReceived",
        callback_reply_mod = "Elixir.ElixirScope.Events.CallbackReply",
        process_event_mod = "Elixir.ElixirScope.Events.ProcessEvent",
        process_spawn_mod = "Elixir.ElixirScope.Events.ProcessSpawn",
        process_exit_mod = "Elixir.ElixirScope.Events.ProcessExit",
        state_change_mod = "Elixir.ElixirScope.Events.StateChange",
        correlated_event = "Elixir.ElixirScope.Capture.EventCorrelator.CorrelatedEvent",
        // Event fields
        event_id,
        id,
        data,
        pid,
        event_type,
        caller_pid,
        correlation_id,
        call_id,
        exit_reason,
        normal,
        from_pid,
        to_pid,
        message,
        sender_pid,
        receiver_pid,
        parent_pid,
        spawned_pid,
        child_pid,
        exited_pid,
        server_pid,
        message_sent,
        message_received,
        callback_reply,
        // Event types
        call,
        return_ = "return",
        exception,
        send,
        receive,
        spawn,
        exit,
        function_entry,
        function_exit,
        function_call,
        function_return,
        message_send,
        message_receive,
        process_spawn,
        process_exit,
        state_change,
        unknown,
        // %CorrelatedEvent{} keys
        correlated_at,
        correlation_confidence,
        correlation_type,
        event,
        links,
        parent_id,
        root_id,
        // Links
        called_from,
        completes,
        receives,
        spawned_by,
        state_in,
        // Metadata keys
        module,
        function,
        type_ = "type",
        created_at,
        peer,
        confidence,
        completed_by,
        received_by,
    }
}

/// A map over `u64` keys that are already well mixed or small (ids,
/// hashes): one multiply-xorshift, no SipHash.
type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

#[derive(Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 29)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 ^= i;
    }
}

/// The caller's terms of the hashed keys met in one run of events (valid
/// only during the NIF call whose env they belong to): results show an id
/// as the very term the caller gave, without copying or re-encoding it.
/// A term is kept in the [`TermStore`] when it is first met in the run,
/// while it is still in the cache.
#[derive(Default)]
struct Seen {
    map: KeyMap<ERL_NIF_TERM>,
    /// New hashed keys of this run, kept in the [`TermStore`] after the
    /// run's loop (off the decode's critical path): key, term, and a
    /// byte-aligned binary's bytes (pointer, length) if any.
    pending: Vec<(u64, ERL_NIF_TERM, *const u8, usize)>,
}

/// How one generation keeps a term: a byte-aligned binary as its bytes,
/// a small tuple of immediates as its words (both in the generation's
/// `buf`, rebuilt in the caller's env when shown), anything else as a copy
/// in the generation's environment.
#[derive(Clone, Copy)]
enum Kept {
    Bin { at: usize, len: u32 },
    Tuple { at: usize, arity: u32 },
    Term(ERL_NIF_TERM),
}

/// Tuples of at most this many immediates are kept as their words.
const KEPT_TUPLE_MAX: usize = 8;

/// One generation of kept terms: bytes and words in `buf`, other copies in
/// a process-independent environment of its own, freed all at once.
struct Gen {
    env: *mut ErlNifEnv,
    map: KeyMap<Kept>,
    buf: Vec<u8>,
    bytes: usize,
}

// SAFETY: the environment is only used by whoever holds the correlator's
// lock (the `State` mutex), one thread at a time; process-independent
// environments may be used from any thread.
unsafe impl Send for Gen {}

impl Gen {
    fn new(capacity: usize) -> Gen {
        Gen {
            // SAFETY: allocating a process-independent environment.
            env: unsafe { enif_alloc_env() },
            map: KeyMap::with_capacity_and_hasher(capacity, Default::default()),
            buf: Vec::new(),
            bytes: 0,
        }
    }

    /// Keeps `t` (a term of `src`, a byte-aligned binary's bytes if `bin`
    /// is given) as `key`'s term; `None` if it is too large (the budget of
    /// [`copy_in`]).
    fn keep(
        &mut self,
        src: *mut ErlNifEnv,
        key: u64,
        t: ERL_NIF_TERM,
        bin: Option<&[u8]>,
    ) -> Option<Kept> {
        let kept = self.stash(src, t, bin)?;
        self.map.insert(key, kept);
        Some(kept)
    }

    /// Keeps `t` as [`Gen::keep`] does unless `key` is kept already (one
    /// probe of the map for both); `true` if it was kept now.
    fn keep_new(
        &mut self,
        src: *mut ErlNifEnv,
        key: u64,
        t: ERL_NIF_TERM,
        bin: Option<&[u8]>,
    ) -> bool {
        let Gen {
            env,
            map,
            buf,
            bytes,
        } = self;
        match map.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(e) => {
                match Gen::stash_in(*env, buf, bytes, src, t, bin) {
                    Some(kept) => {
                        e.insert(kept);
                        true
                    }
                    None => false,
                }
            }
        }
    }

    /// `t` stored in this generation (not yet in its map).
    fn stash(&mut self, src: *mut ErlNifEnv, t: ERL_NIF_TERM, bin: Option<&[u8]>) -> Option<Kept> {
        Gen::stash_in(self.env, &mut self.buf, &mut self.bytes, src, t, bin)
    }

    fn stash_in(
        env: *mut ErlNifEnv,
        buf: &mut Vec<u8>,
        bytes: &mut usize,
        src: *mut ErlNifEnv,
        t: ERL_NIF_TERM,
        bin: Option<&[u8]>,
    ) -> Option<Kept> {
        Some(if let Some(b) = bin {
            // As `copy_in` charges a binary.
            if b.len() + 16 > MAX_KEPT_TERM_BYTES {
                return None;
            }
            let at = buf.len();
            buf.extend_from_slice(b);
            *bytes += b.len() + 16;
            Kept::Bin {
                at,
                len: b.len() as u32,
            }
        } else if is_immediate(t) {
            Kept::Term(t)
        } else if let Some(elems) = immediate_tuple(src, t) {
            let at = buf.len();
            for &e in elems {
                buf.extend_from_slice(&word(e).to_ne_bytes());
            }
            *bytes += 8 * (elems.len() + 1);
            Kept::Tuple {
                at,
                arity: elems.len() as u32,
            }
        } else {
            let mut budget = MAX_KEPT_TERM_BYTES as isize;
            // `None`: too large, shown as its integer key.
            let copy = copy_in(env, src, t, &mut budget, 0)?;
            *bytes += (MAX_KEPT_TERM_BYTES as isize - budget) as usize;
            Kept::Term(copy)
        })
    }

    /// Keeps `k`, kept by generation `old`, here too.
    fn keep_from(&mut self, old: &Gen, key: u64, k: Kept) -> Option<Kept> {
        let kept = match k {
            Kept::Term(t) => return self.keep(old.env, key, t, None),
            Kept::Bin { at, len } => {
                let new_at = self.buf.len();
                self.buf.extend_from_slice(&old.buf[at..at + len as usize]);
                self.bytes += len as usize + 16;
                Kept::Bin { at: new_at, len }
            }
            Kept::Tuple { at, arity } => {
                let new_at = self.buf.len();
                self.buf
                    .extend_from_slice(&old.buf[at..at + 8 * arity as usize]);
                self.bytes += 8 * (arity as usize + 1);
                Kept::Tuple { at: new_at, arity }
            }
        };
        self.map.insert(key, kept);
        Some(kept)
    }

    /// `k` (kept by this generation) as a term of `env`.
    fn show(&self, env: *mut ErlNifEnv, k: Kept) -> Option<ERL_NIF_TERM> {
        match k {
            Kept::Term(t) if is_immediate(t) => Some(t),
            // SAFETY: a live term of this generation's env.
            Kept::Term(t) => Some(unsafe { enif_make_copy(env, t) }),
            Kept::Bin { at, len } => {
                let bytes = &self.buf[at..at + len as usize];
                let mut out = ERL_NIF_TERM::default();
                // SAFETY: valid env; `p` has room for `len` bytes.
                let p = unsafe { enif_make_new_binary(env, bytes.len(), &mut out) };
                if p.is_null() {
                    return None;
                }
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
                Some(out)
            }
            Kept::Tuple { at, arity } => {
                let mut elems = [ERL_NIF_TERM::default(); KEPT_TUPLE_MAX];
                for (i, e) in elems[..arity as usize].iter_mut().enumerate() {
                    let w = &self.buf[at + 8 * i..at + 8 * i + 8];
                    *e = from_word(u64::from_ne_bytes(w.try_into().expect("8 bytes")));
                }
                // SAFETY: valid env; `arity` immediates (valid in any env).
                Some(unsafe { enif_make_tuple_from_array(env, elems.as_ptr(), arity) })
            }
        }
    }
}

/// The elements of `t` if it is a tuple of at most [`KEPT_TUPLE_MAX`]
/// immediates (atoms, small integers, local pids: valid in any env).
fn immediate_tuple<'a>(env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> Option<&'a [ERL_NIF_TERM]> {
    let mut arity: i32 = 0;
    let mut arr: *const ERL_NIF_TERM = std::ptr::null();
    // SAFETY: valid env and term; on success `arr` points at `arity` terms
    // that live as long as the term (used only while it is).
    if unsafe { enif_get_tuple(env, t, &mut arity, &mut arr) } == 0 {
        return None;
    }
    let elems = unsafe { std::slice::from_raw_parts(arr, arity as usize) };
    (elems.len() <= KEPT_TUPLE_MAX && elems.iter().all(|&e| is_immediate(e))).then_some(elems)
}

impl Drop for Gen {
    fn drop(&mut self) {
        // SAFETY: allocated by `enif_alloc_env`, freed once; no term of it
        // is used afterwards (the map goes with it).
        unsafe { enif_free_env(self.env) }
    }
}

/// Older generations a [`TermStore`] keeps besides the young one; each
/// generation holds `max / OLD_GENS` terms (rounded up), so the young one
/// (where every new term is inserted) stays small enough to be cached.
const OLD_GENS: usize = 8;

/// Terms behind hashed keys, copied out of the caller's heap so later
/// results (and metadata queries) can show them. Generations of at most
/// `gen_max = ceil(max / OLD_GENS)` terms: new terms go into the young
/// one; when it is full it becomes the newest old one and the oldest of
/// the [`OLD_GENS`] old ones is freed. A term used from an old generation
/// is copied back into the young one, so a term is forgotten only after at
/// least `max` newer ones were kept since it was last used, and at most
/// `max + gen_max` are kept.
struct TermStore {
    /// Oldest first; the last one is the young generation.
    gens: VecDeque<Gen>,
    gen_max: usize,
}

impl TermStore {
    fn new(max: usize) -> TermStore {
        TermStore {
            gens: VecDeque::from([Gen::new(0)]),
            gen_max: max.div_ceil(OLD_GENS).max(1),
        }
    }

    fn bytes(&self) -> usize {
        self.gens
            .iter()
            .map(|g| g.bytes + (g.buf.capacity() - g.buf.len()) + g.map.capacity() * 25)
            .sum()
    }

    /// Keeps `t` (a term of `env`; `bin`: its bytes if it is a byte-aligned
    /// binary) as the term of `key`, unless the young generation keeps it
    /// already or it is too large.
    fn remember(&mut self, env: *mut ErlNifEnv, key: u64, t: ERL_NIF_TERM, bin: Option<&[u8]>) {
        let young = self.gens.back_mut().expect("a young generation");
        if young.keep_new(env, key, t, bin) {
            self.after_keep();
        }
    }

    /// Starts a new young generation if this one is full.
    fn after_keep(&mut self) {
        if self
            .gens
            .back()
            .is_some_and(|y| y.map.len() >= self.gen_max)
        {
            // The next generation will likely fill up as this one did.
            self.gens.push_back(Gen::new(self.gen_max.min(1 << 16)));
            if self.gens.len() > OLD_GENS + 1 {
                self.gens.pop_front(); // freed here
            }
        }
    }

    /// The kept term of `key`, as a term of `env`.
    fn get(&mut self, env: Env, key: u64) -> Option<ERL_NIF_TERM> {
        let n = self.gens.len();
        let (i, k) = (0..n)
            .rev()
            .find_map(|i| self.gens[i].map.get(&key).map(|&k| (i, k)))?;
        let env = env.as_c_arg();
        if i + 1 == n {
            return self.gens[i].show(env, k);
        }
        // Used again: back into the young generation (the copy lives on if
        // that frees the generation it came from). Shown before the move.
        let out = self.gens[i].show(env, k);
        let mut young = self.gens.pop_back().expect("a young generation");
        let kept = young.keep_from(&self.gens[i], key, k);
        self.gens.push_back(young);
        if kept.is_some() {
            self.after_keep();
        }
        out
    }
}

/// Deepest nesting [`copy_in`] rebuilds itself (deeper: external format).
const COPY_DEPTH: u32 = 8;

/// A copy of `t` (a term of `src`) in `dst`, charging its size to
/// `budget`; `None` if that runs out. Binaries are copied byte for byte
/// (a sub-binary never pins the big binary it points into), tuples
/// rebuilt element by element, references, floats and pids copied as
/// they are; anything else goes through the external format.
fn copy_in(
    dst: *mut ErlNifEnv,
    src: *mut ErlNifEnv,
    t: ERL_NIF_TERM,
    budget: &mut isize,
    depth: u32,
) -> Option<ERL_NIF_TERM> {
    use rustler::sys::ErlNifTermType as T;
    if is_immediate(t) {
        return Some(t);
    }
    // SAFETY (whole function): `src` and its live term `t`; `dst` a live
    // process-independent env; out-pointers are live locals.
    let ty = unsafe { enif_term_type(src, t) };
    match ty {
        T::ERL_NIF_TERM_TYPE_BITSTRING => {
            let Some(bytes) = binary_bytes(src, t) else {
                return via_external(dst, src, t, budget); // not whole bytes
            };
            *budget -= bytes.len() as isize + 16;
            if *budget < 0 {
                return None;
            }
            let mut out = ERL_NIF_TERM::default();
            let p = unsafe { enif_make_new_binary(dst, bytes.len(), &mut out) };
            if p.is_null() {
                return None;
            }
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
            Some(out)
        }
        T::ERL_NIF_TERM_TYPE_TUPLE if depth < COPY_DEPTH => {
            let mut arity: i32 = 0;
            let mut arr: *const ERL_NIF_TERM = std::ptr::null();
            if unsafe { enif_get_tuple(src, t, &mut arity, &mut arr) } == 0 {
                return None;
            }
            *budget -= 8 * (arity as isize + 1);
            if *budget < 0 {
                return None;
            }
            let elems = unsafe { std::slice::from_raw_parts(arr, arity as usize) };
            let mut small = [ERL_NIF_TERM::default(); 8];
            let mut big = Vec::new();
            let out: &mut [ERL_NIF_TERM] = if elems.len() <= small.len() {
                &mut small[..elems.len()]
            } else {
                big.resize(elems.len(), ERL_NIF_TERM::default());
                &mut big
            };
            for (o, &e) in out.iter_mut().zip(elems) {
                *o = copy_in(dst, src, e, budget, depth + 1)?;
            }
            Some(unsafe { enif_make_tuple_from_array(dst, out.as_ptr(), out.len() as u32) })
        }
        T::ERL_NIF_TERM_TYPE_REFERENCE | T::ERL_NIF_TERM_TYPE_FLOAT | T::ERL_NIF_TERM_TYPE_PID => {
            // Small and self-contained.
            *budget -= 64;
            if *budget < 0 {
                return None;
            }
            Some(unsafe { enif_make_copy(dst, t) })
        }
        _ => via_external(dst, src, t, budget),
    }
}

/// A copy of `t` in `dst` through the external term format (which bounds
/// its size).
fn via_external(
    dst: *mut ErlNifEnv,
    src: *mut ErlNifEnv,
    t: ERL_NIF_TERM,
    budget: &mut isize,
) -> Option<ERL_NIF_TERM> {
    let mut bin = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
    // SAFETY: valid env and term; `bin` is released below on success.
    if unsafe { enif_term_to_binary(src, t, bin.as_mut_ptr()) } == 0 {
        return None;
    }
    let mut bin = unsafe { bin.assume_init() };
    *budget -= bin.size as isize;
    let mut out = ERL_NIF_TERM::default();
    let ok = *budget >= 0
        // SAFETY: `bin` holds `size` bytes written by the VM.
        && unsafe { enif_binary_to_term(dst, bin.data, bin.size, &mut out, 0) } != 0;
    // SAFETY: allocated by `enif_term_to_binary`, released once.
    unsafe { enif_release_binary(&mut bin) };
    ok.then_some(out)
}

struct State {
    tracker: Tracker,
    terms: TermStore,
    /// Time spent correlating (decode + correlate + build), ns, and the
    /// events it covers.
    busy_ns: u64,
    timed: u64,
    sweeps: u64,
}

/// The correlator resource behind `ElixirScope.Capture.EventCorrelator`.
pub struct CorrRes {
    state: Mutex<State>,
    max: usize,
    ttl_ns: i64,
}

static CORR_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for CorrRes {
    const NAME: &'static CStr = c"elixir_scope_correlator";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &CORR_TYPE
    }
    fn drop_off_scheduler(&self) -> bool {
        // Nobody else can hold the lock while the resource is destroyed.
        self.state.try_lock().is_ok_and(|s| {
            s.tracker.metrics().records > 10_000 || s.tracker.correlator().active() > 10_000
        })
    }
}

impl CorrRes {
    /// The locked state; a poisoned lock is recovered (the tracker is
    /// consistent between events).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        match self.state.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

fn monotonic_ns() -> i64 {
    // SAFETY: a plain read of the VM clock, callable from any thread.
    unsafe { enif_monotonic_time(ErlNifTimeUnit::ERL_NIF_NSEC) }
}

// ---- term helpers ------------------------------------------------------------

#[inline]
fn atom_word(a: Atom) -> u64 {
    word(a.as_c_arg())
}

#[inline]
fn is_nil(t: Term) -> bool {
    word(t.as_c_arg()) == atom_word(names::nil())
}

/// `map[key]` if `m` is a map holding `key` with a non-nil value.
#[inline]
fn field<'a>(m: Term<'a>, key: Atom) -> Option<Term<'a>> {
    let env = m.get_env();
    let out = crate::codec::map_get_immediate(env, m.as_c_arg(), key.as_c_arg())?;
    // SAFETY: a term of `env` (a value of the map `m`).
    let t = unsafe { Term::new(env, out) };
    (!is_nil(t)).then_some(t)
}

/// The first non-nil of `keys` in `m`.
#[inline]
fn first_field<'a>(m: Term<'a>, keys: &[Atom]) -> Option<Term<'a>> {
    keys.iter().find_map(|&k| field(m, k))
}

#[inline]
fn get_u64(t: Term) -> Option<u64> {
    // Small integers, other immediates and boxed non-bignums (binaries,
    // tuples...) without a NIF call (layout probed at load).
    if let Some(hint) = crate::codec::u64_hint(t.as_c_arg()) {
        return hint;
    }
    let mut v: u64 = 0;
    // SAFETY: valid env and term, live out-pointer.
    (unsafe { enif_get_uint64(t.get_env().as_c_arg(), t.as_c_arg(), &mut v) } != 0).then_some(v)
}

/// A 59-bit hash of any term. Immediates (atoms, small integers, local
/// pids), byte-aligned binaries and tuples of these (nested at most
/// [`COPY_DEPTH`] deep) are hashed here from their words and bytes, which
/// costs a fraction of the VM's hashes; anything else (and a term holding
/// anything else) by `:erlang.phash2/1` (27 bits) and the VM's internal
/// hash (32 bits). Equal terms hash equal either way.
#[inline]
fn hash59(t: Term) -> u64 {
    let env = t.get_env().as_c_arg();
    match fast_hash(env, t.as_c_arg(), 0) {
        Some(h) => fmix59(h),
        None => ((t.hash_phash2() as u64) << 32) | (t.hash_internal(0x5EED) & 0xFFFF_FFFF),
    }
}

/// fmix64, then 59 bits.
#[inline]
fn fmix59(h: u64) -> u64 {
    let mut x = h ^ (h >> 33);
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    (x ^ (x >> 33)) >> 5
}

/// [`hash59`] of `t`, and its bytes if it is a byte-aligned binary (read
/// once: for the hash and for keeping it).
#[inline]
fn hash59_bin<'a>(t: Term<'a>) -> (u64, Option<&'a [u8]>) {
    let raw = t.as_c_arg();
    if !is_immediate(raw) {
        if let Some(bytes) = binary_bytes(t.get_env().as_c_arg(), raw) {
            return (fmix59(binary_hash(bytes)), Some(bytes));
        }
    }
    (hash59(t), None)
}

/// The bytes of `t` (a term of `env`) if it is a byte-aligned binary (a
/// bitstring, or anything else, gives `None`); they live as long as `t`.
#[inline]
fn binary_bytes<'a>(env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> Option<&'a [u8]> {
    let mut bin = std::mem::MaybeUninit::<ErlNifBinary>::uninit();
    // SAFETY: valid env and term, live out-pointer; on success the bytes
    // live as long as the term.
    if unsafe { enif_inspect_binary(env, t, bin.as_mut_ptr()) } == 0 {
        return None;
    }
    let bin = unsafe { bin.assume_init() };
    Some(unsafe { std::slice::from_raw_parts(bin.data, bin.size) })
}

/// [`fast_hash`] of a binary's bytes.
#[inline]
fn binary_hash(bytes: &[u8]) -> u64 {
    crate::codec::hash_bytes(bytes) ^ 0x2222_0000_0000_0000
}

/// The pre-finalizer hash of an immediate, a binary or a tuple of these;
/// `None` for anything else.
#[inline]
fn fast_hash(env: *mut ErlNifEnv, t: ERL_NIF_TERM, depth: u32) -> Option<u64> {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    if is_immediate(t) {
        // An immediate's word is its value (atoms: their table index).
        return Some((word(t) ^ 0x1111).wrapping_mul(K));
    }
    // SAFETY (whole function): valid env and term; out-pointers are live
    // locals; the slices returned live as long as the term. (The two
    // checks below answer for any term, without `enif_term_type`.)
    let mut arity: i32 = 0;
    let mut arr: *const ERL_NIF_TERM = std::ptr::null();
    if unsafe { enif_get_tuple(env, t, &mut arity, &mut arr) } != 0 {
        if depth >= COPY_DEPTH {
            return None;
        }
        let elems = unsafe { std::slice::from_raw_parts(arr, arity as usize) };
        let mut h = (0x3333 + arity as u64).wrapping_mul(K);
        for &e in elems {
            h = (h.rotate_left(23) ^ fast_hash(env, e, depth + 1)?).wrapping_mul(K);
        }
        return Some(h);
    }
    // Byte-aligned binaries only (a bitstring, or anything else, fails).
    binary_bytes(env, t).map(binary_hash)
}

impl State {
    /// The key of a hashed (non-integer) term `t`, which is remembered.
    #[inline]
    fn hashed_key(&mut self, seen: &mut Seen, t: Term, key: u64, bin: Option<&[u8]>) -> u64 {
        if let std::collections::hash_map::Entry::Vacant(e) = seen.map.entry(key) {
            e.insert(t.as_c_arg());
            let (p, n) = bin.map_or((std::ptr::null(), 0), |b| (b.as_ptr(), b.len()));
            seen.pending.push((key, t.as_c_arg(), p, n));
        }
        key
    }

    /// The key of an id term (see the module docs); `None` for `nil`.
    #[inline]
    fn id_key(&mut self, seen: &mut Seen, t: Option<Term>) -> Option<u64> {
        let t = t?;
        Some(match get_u64(t) {
            Some(v) if v < HASHED => v,
            _ => {
                let (h, bin) = hash59_bin(t);
                self.hashed_key(seen, t, HASHED | h, bin)
            }
        })
    }

    /// The correlation key of a call/return's correlation term (0: none)
    /// and the id key it names (a return's hint).
    #[inline]
    fn corr_key(&mut self, seen: &mut Seen, t: Option<Term>) -> (u64, Option<u64>) {
        match t {
            None => (0, None),
            Some(t) => match get_u64(t) {
                Some(v) if v < HASHED => (v + 1, Some(v)),
                _ => {
                    let (h, bin) = hash59_bin(t);
                    let k = self.hashed_key(seen, t, HASHED | h, bin);
                    (k, Some(k))
                }
            },
        }
    }

    #[inline]
    fn pid_key(&mut self, seen: &mut Seen, t: Option<Term>) -> u64 {
        let Some(t) = t else {
            return UNKNOWN_PID;
        };
        if is_immediate(t.as_c_arg()) {
            return word(t.as_c_arg());
        }
        self.hashed_key(seen, t, HASHED | (hash59(t) << 2), None)
    }

    /// The term of a hashed key: the caller's own term if this call met
    /// it, else the kept copy.
    #[inline]
    fn hashed_term(&mut self, env: Env, seen: &mut Seen, key: u64) -> Option<ERL_NIF_TERM> {
        if let Some(&t) = seen.map.get(&key) {
            return Some(t);
        }
        let t = self.terms.get(env, key)?;
        seen.map.insert(key, t);
        Some(t)
    }

    /// The term of an id key.
    #[inline]
    fn id_term(&mut self, env: Env, seen: &mut Seen, key: u64) -> ERL_NIF_TERM {
        if key >= HASHED {
            if let Some(t) = self.hashed_term(env, seen, key) {
                return t;
            }
        }
        // SAFETY: valid env.
        unsafe { enif_make_uint64(env.as_c_arg(), key) }
    }

    fn opt_id_term(&mut self, env: Env, seen: &mut Seen, key: Option<u64>) -> ERL_NIF_TERM {
        match key {
            Some(k) => self.id_term(env, seen, k),
            None => names::nil().as_c_arg(),
        }
    }

    /// The term of a pid key (`nil` if unknown or forgotten).
    fn pid_term(&mut self, env: Env, seen: &mut Seen, key: u64) -> ERL_NIF_TERM {
        let raw = from_word(key);
        if key != UNKNOWN_PID && is_immediate(raw) {
            return raw;
        }
        if key >= HASHED {
            if let Some(t) = self.hashed_term(env, seen, key) {
                return t;
            }
        }
        names::nil().as_c_arg()
    }

    fn link_term(&mut self, env: Env, seen: &mut Seen, l: Link) -> ERL_NIF_TERM {
        let target = match l.kind {
            LinkKind::SpawnedBy => self.pid_term(env, seen, l.target),
            _ => self.id_term(env, seen, l.target),
        };
        tuple2(env, link_atom(l.kind).as_c_arg(), target)
    }
}

fn link_atom(k: LinkKind) -> Atom {
    match k {
        LinkKind::CalledFrom => names::called_from(),
        LinkKind::Completes => names::completes(),
        LinkKind::Receives => names::receives(),
        LinkKind::SpawnedBy => names::spawned_by(),
        LinkKind::StateIn => names::state_in(),
    }
}

fn tuple2(env: Env, a: ERL_NIF_TERM, b: ERL_NIF_TERM) -> ERL_NIF_TERM {
    let elems = [a, b];
    // SAFETY: two valid terms of `env`.
    unsafe { enif_make_tuple_from_array(env.as_c_arg(), elems.as_ptr(), 2) }
}

fn make_list(env: Env, terms: &[ERL_NIF_TERM]) -> ERL_NIF_TERM {
    crate::codec::make_list(env, terms).as_c_arg()
}

/// A map of distinct `keys` to `values` (both valid terms of `env`).
fn make_map(env: Env, keys: &[ERL_NIF_TERM], values: &[ERL_NIF_TERM]) -> ERL_NIF_TERM {
    debug_assert_eq!(keys.len(), values.len());
    let mut out = ERL_NIF_TERM::default();
    // SAFETY: both arrays hold `len` valid terms of `env`; keys are distinct.
    let ok = unsafe {
        enif_make_map_from_arrays(
            env.as_c_arg(),
            keys.as_ptr(),
            values.as_ptr(),
            keys.len(),
            &mut out,
        )
    };
    if ok == 0 {
        names::nil().as_c_arg()
    } else {
        out
    }
}

fn type_atom(t: CorrType) -> Atom {
    match t {
        CorrType::FunctionCall => names::function_call(),
        CorrType::FunctionReturn => names::function_return(),
        CorrType::MessageSend => names::message_send(),
        CorrType::MessageReceive => names::message_receive(),
        CorrType::ProcessSpawn => names::process_spawn(),
        CorrType::ProcessExit => names::process_exit(),
        CorrType::StateChange => names::state_change(),
        CorrType::Unknown => names::unknown(),
    }
}

// ---- decoding events -----------------------------------------------------------

/// The fields of one event that correlation uses (`None`: absent or nil).
#[derive(Default)]
struct Fields<'a> {
    kind: Option<CorrKind>,
    id: Option<Term<'a>>,
    pid: Option<Term<'a>>,
    peer: Option<Term<'a>>,
    corr: Option<Term<'a>>,
    msg: Option<Term<'a>>,
    /// Calls: `module` and `function` (kept in the call's metadata).
    module: Option<Term<'a>>,
    function: Option<Term<'a>>,
}

/// Fields of one of the `ElixirScope.Events` data structs (`module` is its
/// `__struct__`), or `None` if `module` is not one of them.
fn data_fields<'a>(module: u64, m: Term<'a>) -> Option<Fields<'a>> {
    use names as n;
    let is = |a: Atom| module == atom_word(a);
    let et = || field(m, n::event_type()).map(|t| word(t.as_c_arg()));
    let mut f = Fields::default();
    if is(n::function_execution_mod()) {
        f.id = field(m, n::id());
        f.pid = field(m, n::caller_pid());
        f.corr = field(m, n::correlation_id());
        (f.module, f.function) = (field(m, n::module()), field(m, n::function()));
        f.kind = match et() {
            Some(w) if w == atom_word(n::call()) => Some(CorrKind::Call),
            Some(w) if w == atom_word(n::return_()) => Some(CorrKind::Return),
            Some(w) if w == atom_word(n::exception()) => Some(CorrKind::Exception),
            _ => None,
        };
    } else if is(n::function_entry_mod()) {
        (f.module, f.function) = (field(m, n::module()), field(m, n::function()));
        f.kind = Some(CorrKind::Call);
        f.pid = field(m, n::pid());
        f.corr = first_field(m, &[n::call_id(), n::correlation_id()]);
    } else if is(n::function_exit_mod()) {
        f.pid = field(m, n::pid());
        f.corr = first_field(m, &[n::call_id(), n::correlation_id()]);
        f.kind = match field(m, n::exit_reason()) {
            Some(r) if word(r.as_c_arg()) != atom_word(n::normal()) => Some(CorrKind::Exception),
            _ => Some(CorrKind::Return),
        };
    } else if is(n::message_event_mod()) {
        f.id = field(m, n::id());
        f.msg = field(m, n::message());
        match et() {
            Some(w) if w == atom_word(n::send()) => {
                f.kind = Some(CorrKind::Send);
                f.pid = field(m, n::from_pid());
                f.peer = field(m, n::to_pid());
            }
            Some(w) if w == atom_word(n::receive()) => {
                f.kind = Some(CorrKind::Receive);
                f.pid = field(m, n::to_pid());
            }
            _ => {}
        }
    } else if is(n::message_send_mod()) {
        f.kind = Some(CorrKind::Send);
        f.pid = field(m, n::sender_pid());
        f.peer = field(m, n::receiver_pid());
        f.msg = field(m, n::message());
    } else if is(n::message_receive_mod()) {
        f.kind = Some(CorrKind::Receive);
        f.pid = field(m, n::receiver_pid());
        f.msg = field(m, n::message());
    } else if is(n::message_sent_mod()) {
        f.kind = Some(CorrKind::Send);
        f.pid = field(m, n::from_pid());
        f.peer = field(m, n::to_pid());
        f.msg = field(m, n::message());
    } else if is(n::message_received_mod()) {
        f.kind = Some(CorrKind::Receive);
        f.pid = field(m, n::pid());
        f.msg = field(m, n::message());
    } else if is(n::callback_reply_mod()) {
        // Completes the call it answers, like a return.
        f.kind = Some(CorrKind::Return);
        f.pid = first_field(m, &[n::server_pid(), n::pid()]);
        f.corr = field(m, n::call_id());
    } else if is(n::process_event_mod()) {
        f.id = field(m, n::id());
        match et() {
            Some(w) if w == atom_word(n::spawn()) => {
                f.kind = Some(CorrKind::Spawn);
                f.pid = field(m, n::parent_pid());
                f.peer = field(m, n::pid());
            }
            Some(w) if w == atom_word(n::exit()) => {
                f.kind = Some(CorrKind::Exit);
                f.pid = field(m, n::pid());
            }
            _ => {}
        }
    } else if is(n::process_spawn_mod()) {
        f.kind = Some(CorrKind::Spawn);
        f.pid = field(m, n::parent_pid());
        f.peer = field(m, n::spawned_pid());
    } else if is(n::process_exit_mod()) {
        f.kind = Some(CorrKind::Exit);
        f.pid = first_field(m, &[n::exited_pid(), n::pid()]);
    } else if is(n::state_change_mod()) {
        f.kind = Some(CorrKind::StateChange);
        f.id = field(m, n::id());
        f.pid = first_field(m, &[n::server_pid(), n::pid()]);
    } else {
        return None;
    }
    Some(f)
}

/// Fields of an `%Events{}` envelope whose `data` is not one of the data
/// structs: the kind comes from `event_type`, peer and message from `data`
/// when it is a map (else the message is `data` itself).
fn envelope_fields<'a>(event_type: Option<Term<'a>>, data: Option<Term<'a>>) -> Fields<'a> {
    use names as n;
    let mut f = Fields::default();
    let Some(et) = event_type.map(|t| word(t.as_c_arg())) else {
        return f;
    };
    let any = |atoms: &[Atom]| atoms.iter().any(|&a| et == atom_word(a));
    let data_field = |keys: &[Atom]| data.and_then(|d| first_field(d, keys));
    let message = || data_field(&[n::message()]).or(data);
    if any(&[n::function_entry(), n::function_call(), n::call()]) {
        f.kind = Some(CorrKind::Call);
    } else if any(&[
        n::function_exit(),
        n::function_return(),
        n::return_(),
        n::callback_reply(),
    ]) {
        f.kind = Some(CorrKind::Return);
    } else if any(&[n::message_send(), n::send(), n::message_sent()]) {
        f.kind = Some(CorrKind::Send);
        f.peer = data_field(&[n::to_pid(), n::receiver_pid()]);
        f.msg = message();
    } else if any(&[n::message_receive(), n::receive(), n::message_received()]) {
        f.kind = Some(CorrKind::Receive);
        f.msg = message();
    } else if any(&[n::process_spawn(), n::spawn()]) {
        f.kind = Some(CorrKind::Spawn);
        f.peer = data_field(&[n::spawned_pid(), n::child_pid(), n::pid()]);
    } else if any(&[n::process_exit(), n::exit()]) {
        f.kind = Some(CorrKind::Exit);
    } else if any(&[n::state_change()]) {
        f.kind = Some(CorrKind::StateChange);
    }
    f
}

/// The fields of any event term.
fn event_fields(ev: Term) -> Fields {
    let Some(module) = field(ev, names::struct_()) else {
        // Not a struct: unknown, but keep an id if it has one.
        return Fields {
            id: first_field(ev, &[names::event_id(), names::id()]),
            ..Fields::default()
        };
    };
    let module = word(module.as_c_arg());
    if module == atom_word(names::events()) {
        let data = field(ev, names::data());
        let inner = data.and_then(|d| {
            let dm = field(d, names::struct_())?;
            data_fields(word(dm.as_c_arg()), d)
        });
        let mut f = inner.unwrap_or_else(|| envelope_fields(field(ev, names::event_type()), data));
        f.id = field(ev, names::event_id()).or(f.id);
        f.pid = f.pid.or_else(|| field(ev, names::pid()));
        f.corr = f.corr.or_else(|| field(ev, names::correlation_id()));
        return f;
    }
    data_fields(module, ev).unwrap_or_else(|| Fields {
        id: first_field(ev, &[names::event_id(), names::id()]),
        ..Fields::default()
    })
}

/// One decoded event.
struct Decoded {
    input: CorrInput,
    /// The term to show as the event's own id (`nil` if it has none).
    own_id: ERL_NIF_TERM,
}

fn decode<'a>(st: &mut State, seen: &mut Seen, ev: Term<'a>, now: i64) -> Decoded {
    let f = event_fields(ev);
    let nil = names::nil().as_c_arg();
    let Some(kind) = f.kind else {
        return Decoded {
            input: CorrInput::new(0, CorrKind::Other, UNKNOWN_PID, now),
            own_id: f.id.map_or(nil, |t| t.as_c_arg()),
        };
    };
    let env = ev.get_env();
    let (id, own_id) = match st.id_key(seen, f.id) {
        Some(k) => (k, f.id.map_or(nil, |t| t.as_c_arg())),
        None => {
            let k = FRESH + next_event_id();
            // SAFETY: valid env.
            (k, unsafe { enif_make_uint64(env.as_c_arg(), k) })
        }
    };
    let pid = st.pid_key(seen, f.pid);
    let mut input = CorrInput::new(id, kind, pid, now);
    match kind {
        CorrKind::Call => {
            input.key = st.corr_key(seen, f.corr).0;
            // Immediates (atoms) as their words, anything else kept like a
            // remote pid; 0 (`nil`) when absent.
            input.module = st.pid_key(seen, f.module);
            input.function = st.pid_key(seen, f.function);
        }
        CorrKind::Return | CorrKind::Exception => {
            // The hint is used by the tracker only if it names an open call.
            (input.key, input.call_id) = st.corr_key(seen, f.corr);
        }
        CorrKind::Send => {
            input.peer = st.pid_key(seen, f.peer);
            input.msg_hash = f.msg.map_or(0, |m| m.hash_phash2() as u64);
        }
        CorrKind::Receive => input.msg_hash = f.msg.map_or(0, |m| m.hash_phash2() as u64),
        CorrKind::Spawn => input.peer = st.pid_key(seen, f.peer),
        _ => {}
    }
    Decoded { input, own_id }
}

/// `correlation_confidence` shown for `c`: the correlator's, except 0.0
/// for events it could not link (unknown events, returns that completed
/// no call, receives whose send has not been seen).
fn confidence(kind: CorrKind, c: &Correlation) -> f64 {
    let has = |k: LinkKind| c.links.iter().any(|l| l.kind == k);
    let linked = match kind {
        CorrKind::Other => false,
        CorrKind::Return | CorrKind::Exception => has(LinkKind::Completes),
        CorrKind::Receive => has(LinkKind::Receives),
        _ => true,
    };
    if linked {
        (c.confidence as f64 * 1e6).round() / 1e6
    } else {
        0.0
    }
}

/// `%CorrelatedEvent{}` keys in term order (cache slot 18, see
/// `event_term::SHAPES`): results are built by `event_term::make_struct_in`,
/// sharing one keys tuple per call when the load probe allowed it.
static CORRELATED_EVENT: Shape = Shape::new(18, || {
    use names as n;
    vec![
        n::struct_(),
        n::correlated_at(),
        n::correlation_confidence(),
        n::correlation_id(),
        n::correlation_type(),
        n::event(),
        n::links(),
        n::parent_id(),
        n::root_id(),
    ]
});

/// Terms shared by all the results of one run: built once, used by
/// every `%CorrelatedEvent{}` (terms are immutable).
struct Shared {
    now: i64,
    now_term: ERL_NIF_TERM,
    zero: ERL_NIF_TERM,
    one: ERL_NIF_TERM,
}

impl Shared {
    fn new(env: Env) -> Shared {
        let now = monotonic_ns();
        // SAFETY (all three): valid env.
        unsafe {
            Shared {
                now,
                now_term: rustler::sys::enif_make_int64(env.as_c_arg(), now),
                zero: enif_make_double(env.as_c_arg(), 0.0),
                one: enif_make_double(env.as_c_arg(), 1.0),
            }
        }
    }

    fn confidence(&self, env: Env, c: f64) -> ERL_NIF_TERM {
        if c == 1.0 {
            self.one
        } else if c == 0.0 {
            self.zero
        } else {
            // SAFETY: valid env.
            unsafe { enif_make_double(env.as_c_arg(), c) }
        }
    }
}

/// Correlate `ev` and build its `%CorrelatedEvent{}`.
fn correlate_one<'a>(
    env: Env<'a>,
    st: &mut State,
    seen: &mut Seen,
    sh: &Shared,
    scratch: &mut Scratch,
    ev: Term<'a>,
) -> ERL_NIF_TERM {
    let d = decode(st, seen, ev, sh.now);
    let c = st.tracker.correlate(&d.input);
    let nil = names::nil().as_c_arg();
    let corr_id = if d.input.kind == CorrKind::Other || c.correlation_id == d.input.id {
        d.own_id
    } else {
        st.id_term(env, seen, c.correlation_id)
    };
    // Parent, root and link targets are mostly the same few ids: each is
    // looked up once.
    let parent = c.parent_id.map_or(nil, |p| st.id_term(env, seen, p));
    let known = |k: u64| -> Option<ERL_NIF_TERM> {
        if d.input.kind != CorrKind::Other && k == c.correlation_id {
            Some(corr_id)
        } else if Some(k) == c.parent_id {
            Some(parent)
        } else {
            None
        }
    };
    let root = match c.root_id {
        None => nil,
        Some(r) => match known(r) {
            Some(t) => t,
            None => st.id_term(env, seen, r),
        },
    };
    let mut link = |st: &mut State, l: Link| match l.kind {
        LinkKind::SpawnedBy => st.link_term(env, seen, l),
        _ => match known(l.target).or((Some(l.target) == c.root_id).then_some(root)) {
            Some(t) => tuple2(env, link_atom(l.kind).as_c_arg(), t),
            None => st.link_term(env, seen, l),
        },
    };
    let links = match c.links.as_slice() {
        [] => crate::nil_word(),
        ls => {
            let mut ts = [ERL_NIF_TERM::default(); 4];
            if ls.len() <= ts.len() {
                for (t, &l) in ts.iter_mut().zip(ls) {
                    *t = link(st, l);
                }
                make_list(env, &ts[..ls.len()])
            } else {
                let ts: Vec<ERL_NIF_TERM> = ls.iter().map(|&l| link(st, l)).collect();
                make_list(env, &ts)
            }
        }
    };
    let conf = confidence(d.input.kind, &c);
    let values = [
        names::correlated_event().as_c_arg(),
        sh.now_term,
        sh.confidence(env, conf),
        corr_id,
        type_atom(c.ctype).as_c_arg(),
        ev.as_c_arg(),
        links,
        parent,
        root,
    ];
    make_struct_in(env, scratch, &CORRELATED_EVENT, &values).as_c_arg()
}

/// The heads of `list`, at most `max + 1` of them; `Err` if the list is
/// improper within them.
fn heads<'a>(env: Env<'a>, list: Term<'a>, max: usize) -> NifResult<Vec<ERL_NIF_TERM>> {
    let mut out: Vec<ERL_NIF_TERM> = Vec::with_capacity(max.min(1024));
    if crate::codec::raw_cons() {
        let mut w = word(list.as_c_arg());
        while out.len() <= max && w & 0x3 == 0x1 {
            let cell = (w & !0x3) as *const u64;
            // SAFETY: a list-tagged word of a live term of `env` points at
            // a `[head, tail]` cons cell (layout probed at load).
            unsafe {
                out.push(from_word(*cell));
                w = *cell.add(1);
            }
        }
        if out.len() <= max && w != word(crate::nil_word()) {
            return badarg(env, "events must be a proper list");
        }
        return Ok(out);
    }
    let mut rest = list;
    while out.len() <= max {
        match rest.list_get_cell() {
            Ok((head, tail)) => {
                out.push(head.as_c_arg());
                rest = tail;
            }
            Err(_) => {
                if !rest.is_list() {
                    return badarg(env, "events must be a proper list");
                }
                break;
            }
        }
    }
    Ok(out)
}

/// A cache hint for the heap words of boxed term `t` (its header and the
/// next ones: a struct's size and keys, its first values).
#[inline(always)]
fn prefetch(t: ERL_NIF_TERM) {
    let w = word(t);
    #[cfg(target_arch = "x86_64")]
    if w & 0x3 == 0x2 {
        // SAFETY: a prefetch never faults, whatever the address.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>((w & !0x3) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(((w & !0x3) + 64) as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = w;
}

/// [`prefetch`] for the boxed values (binaries, tuples, maps) of `t` if it
/// is a struct-sized map; nothing for anything else.
#[inline(always)]
fn prefetch_fields(t: ERL_NIF_TERM) {
    if let Some((size, _, values)) = crate::codec::flatmap_parts(t) {
        for i in 0..size.min(32) {
            // SAFETY: `flatmap_parts` returned `size` values of a live map.
            let v = unsafe { *values.add(i) };
            #[cfg(target_arch = "x86_64")]
            if v & 0x3 == 0x2 {
                // SAFETY: a prefetch never faults, whatever the address.
                unsafe {
                    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                    _mm_prefetch::<_MM_HINT_T0>((v & !0x3) as *const i8);
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = v;
        }
    }
}

/// Correlate `events` (terms of `env`) in order, appending their results
/// to `out`; stops after `budget` (checked every 64 events). Returns how
/// many were done.
fn correlate_run<'a>(
    env: Env<'a>,
    st: &mut State,
    events: &[ERL_NIF_TERM],
    out: &mut Vec<ERL_NIF_TERM>,
    budget: Duration,
) -> usize {
    let start = Instant::now();
    let sh = Shared::new(env);
    let mut scratch = Scratch::for_call(env);
    // Sized for one new id per event (integer ids never enter it).
    let mut seen = Seen {
        map: KeyMap::with_capacity_and_hasher(events.len().min(CHUNK_DIRTY), Default::default()),
        pending: Vec::with_capacity(events.len().min(CHUNK_DIRTY)),
    };
    let mut done = 0usize;
    for (i, &ev) in events.iter().enumerate() {
        // The event maps are read one after the other from a list that is
        // usually far bigger than the cache: ask for one a few ahead.
        if let Some(&next) = events.get(i + 4) {
            prefetch(next);
        }
        // And the terms that event's fields point to (ids, messages), once
        // its map is (likely) in cache.
        if let Some(&next) = events.get(i + 2) {
            prefetch_fields(next);
        }
        // SAFETY: a term of `env` (taken from the argument list).
        let ev = unsafe { Term::new(env, ev) };
        out.push(correlate_one(env, st, &mut seen, &sh, &mut scratch, ev));
        done += 1;
        if done % 64 == 0 && start.elapsed() > budget {
            break;
        }
    }
    let src = env.as_c_arg();
    for &(key, t, p, n) in &seen.pending {
        // SAFETY: the bytes of a binary term of `env`, live for this call.
        let bin = (!p.is_null()).then(|| unsafe { std::slice::from_raw_parts(p, n) });
        st.terms.remember(src, key, t, bin);
    }
    st.busy_ns += start.elapsed().as_nanos() as u64;
    st.timed += done as u64;
    done
}

// ---- metadata ----------------------------------------------------------------

/// The metadata map of record `r`, shown with correlation id `id`.
fn record_map(
    env: Env,
    st: &mut State,
    seen: &mut Seen,
    id: ERL_NIF_TERM,
    r: &CorrRecord,
) -> ERL_NIF_TERM {
    use names as n;
    let links = match r.link {
        Some(l) => make_list(env, &[st.link_term(env, seen, l)]),
        None => crate::nil_word(),
    };
    let keys = [
        n::completed_by().as_c_arg(),
        n::confidence().as_c_arg(),
        n::correlation_id().as_c_arg(),
        n::created_at().as_c_arg(),
        n::function().as_c_arg(),
        n::links().as_c_arg(),
        n::module().as_c_arg(),
        n::parent_id().as_c_arg(),
        n::peer().as_c_arg(),
        n::pid().as_c_arg(),
        n::received_by().as_c_arg(),
        n::root_id().as_c_arg(),
        n::type_().as_c_arg(),
    ];
    let values = [
        st.opt_id_term(env, seen, r.completed_by),
        // SAFETY: valid env.
        unsafe { enif_make_double(env.as_c_arg(), (r.confidence as f64 * 1e6).round() / 1e6) },
        id,
        r.created_at.encode(env).as_c_arg(),
        st.pid_term(env, seen, r.function),
        links,
        st.pid_term(env, seen, r.module),
        st.opt_id_term(env, seen, r.parent_id),
        if r.peer == 0 {
            names::nil().as_c_arg()
        } else {
            st.pid_term(env, seen, r.peer)
        },
        st.pid_term(env, seen, r.pid),
        st.opt_id_term(env, seen, r.received_by),
        st.opt_id_term(env, seen, r.root_id),
        type_atom(r.ctype).as_c_arg(),
    ];
    make_map(env, &keys, &values)
}

/// The key of an id term given by a caller, without remembering it.
fn lookup_key(t: Term) -> Option<u64> {
    if is_nil(t) {
        return None;
    }
    match get_u64(t) {
        Some(v) if v < HASHED => Some(v),
        _ => Some(HASHED | hash59(t)),
    }
}

// ---- NIFs --------------------------------------------------------------------

/// A new correlator resource.
#[rustler::nif]
fn corr_new(env: Env, ttl_ns: i64, max_correlations: i64) -> NifResult<Term> {
    if ttl_ns <= 0 {
        return badarg(env, "correlation TTL must be a positive integer (ns)");
    }
    if !(1..=MAX_CORRELATIONS_LIMIT).contains(&max_correlations) {
        return badarg(
            env,
            format!("max_correlations must be an integer in 1..{MAX_CORRELATIONS_LIMIT}"),
        );
    }
    let max = max_correlations as usize;
    let tracker = Tracker::new(CorrelatorConfig {
        ttl_ns,
        max_correlations: max,
    });
    let res = CorrRes {
        state: Mutex::new(State {
            tracker,
            terms: TermStore::new(max),
            busy_ns: 0,
            timed: 0,
            sweeps: 0,
        }),
        max,
        ttl_ns,
    };
    Ok(handle::make(env, res))
}

/// Correlate a list of at most [`CHUNK`] events on a normal scheduler:
/// their results in order, or `{results, rest}` if [`BUDGET_NORMAL`] ran
/// out first (at least 64 are done; `rest` is proper: correlate it with
/// another call).
/// `:large` for a longer list and `:busy` if another call holds the lock:
/// nothing is done, use `corr_batch_dirty`. An improper list raises before
/// anything is correlated.
#[rustler::nif]
fn corr_batch<'a>(env: Env<'a>, r: Ref<CorrRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    let events = heads(env, list, CHUNK)?;
    if events.len() > CHUNK {
        return Ok(names::large().encode(env));
    }
    let Some(mut st) = r.try_lock() else {
        return Ok(names::busy().encode(env));
    };
    let mut out = Vec::with_capacity(events.len());
    let start = Instant::now();
    let done = correlate_run(env, &mut st, &events, &mut out, BUDGET_NORMAL);
    drop(st);
    let results = crate::codec::make_list(env, &out);
    // Charge the time used (a timeslice is about 1 ms), so the process
    // yields as it should before it correlates the rest.
    let pct = (start.elapsed().as_micros() / 10).clamp(1, 100) as i32;
    rustler::schedule::consume_timeslice(env, pct);
    if done == events.len() {
        return Ok(results);
    }
    // The rest of the list after `done` cells.
    let mut rest = list;
    for _ in 0..done {
        rest = rest.list_get_cell().map(|(_, t)| t)?;
    }
    Ok((results, rest).encode(env))
}

/// Correlate a whole list on a dirty CPU scheduler: its results in order.
/// The list is checked first (an improper list raises before anything is
/// done); events are then correlated in sub-chunks of [`CHUNK_DIRTY`], the
/// lock taken per sub-chunk so other callers can interleave.
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_batch_dirty<'a>(env: Env<'a>, r: Ref<CorrRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    let events = heads(env, list, usize::MAX - 1)?;
    let mut out = Vec::with_capacity(events.len());
    for sub in events.chunks(CHUNK_DIRTY) {
        let mut st = r.lock();
        correlate_run(env, &mut st, sub, &mut out, Duration::MAX);
    }
    Ok(crate::codec::make_list(env, &out))
}

/// The metadata map of correlation `id`, or `nil`.
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_metadata<'a>(env: Env<'a>, r: Ref<CorrRes>, id: Term<'a>) -> Term<'a> {
    let mut st = r.lock();
    let rec = lookup_key(id).and_then(|k| st.tracker.record(k));
    match rec {
        Some(rec) => {
            // SAFETY: a term of `env`.
            let mut seen = Seen::default();
            unsafe {
                Term::new(
                    env,
                    record_map(env, &mut st, &mut seen, id.as_c_arg(), &rec),
                )
            }
        }
        None => names::nil().encode(env),
    }
}

/// The metadata maps from the root down to `id` (empty if unknown).
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_chain<'a>(env: Env<'a>, r: Ref<CorrRes>, id: Term<'a>) -> Term<'a> {
    let mut st = r.lock();
    let Some(key) = lookup_key(id) else {
        return crate::codec::make_list(env, &[]);
    };
    let chain = st.tracker.chain(key);
    let recs: Vec<(u64, CorrRecord)> = chain
        .iter()
        .filter_map(|&k| st.tracker.record(k).map(|r| (k, r)))
        .collect();
    let mut seen = Seen::default();
    let maps: Vec<ERL_NIF_TERM> = recs
        .iter()
        .map(|(k, rec)| {
            let id_t = if *k == key {
                id.as_c_arg()
            } else {
                st.id_term(env, &mut seen, *k)
            };
            record_map(env, &mut st, &mut seen, id_t, rec)
        })
        .collect();
    crate::codec::make_list(env, &maps)
}

/// Expire records and unmatched messages older than the TTL:
/// `{records_removed, entries_removed}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_sweep<'a>(env: Env<'a>, r: Ref<CorrRes>) -> Term<'a> {
    let mut st = r.lock();
    let now = monotonic_ns();
    let (records, entries) = st.tracker.sweep(now);
    st.sweeps += 1;
    (records as u64, entries as u64).encode(env)
}

/// Counters (see `EventCorrelator.get_metrics/1`).
#[rustler::nif(schedule = "DirtyCpu")]
fn corr_metrics<'a>(env: Env<'a>, r: Ref<CorrRes>) -> NifResult<Term<'a>> {
    let st = r.lock();
    let t = st.tracker.metrics();
    let c = st.tracker.correlator().metrics();
    let memory = st.tracker.memory_bytes() + st.terms.bytes();
    let avg = if st.timed == 0 {
        0.0
    } else {
        st.busy_ns as f64 / st.timed as f64
    };
    let counters: [(&str, u64); 27] = [
        ("total_correlations_created", t.created),
        ("active_correlations", c.active),
        ("function_correlations", t.function),
        ("message_correlations", t.message),
        ("events_correlated", t.events),
        ("unknown_events", t.unknown),
        ("metadata_entries", t.records),
        ("metadata_expired", t.records_expired),
        ("metadata_evicted", t.records_evicted),
        ("late_links", t.late_links),
        ("pid_resolved_returns", t.pid_resolved),
        ("calls", c.calls),
        ("returns", c.returns),
        ("sends", c.sends),
        ("receives", c.receives),
        ("matched_receives", c.matched_receives),
        ("unmatched_returns", c.unmatched_returns),
        ("unwound_frames", c.unwound_frames),
        ("orphaned_calls", c.orphaned_calls),
        ("expired", c.expired),
        ("evicted", c.evicted),
        ("refused", c.refused),
        (
            "pending_messages",
            st.tracker.correlator().pending_messages() as u64,
        ),
        ("sweeps", st.sweeps),
        ("max_correlations", r.max as u64),
        ("correlation_ttl_ns", r.ttl_ns as u64),
        ("memory_bytes", memory as u64),
    ];
    let mut m = map_new(env);
    for (k, v) in counters {
        m = m.map_put(Atom::from_str(env, k)?, v)?;
    }
    m = m.map_put(Atom::from_str(env, "average_correlation_time_ns")?, avg)?;
    Ok(m)
}
