//! `store_*` NIFs: the `ElixirScope.Storage.DataAccess` resource, an
//! [`EventStore`] behind a mutex.
//!
//! Each stored event keeps the whole Elixir term as its payload (term tape,
//! see `codec`); only the events a query returns are decoded. Index keys
//! come from Elixir as integers (id, timestamp, correlation id) or as terms
//! turned into keys here ([`term_key`]: pid, module, function).
//!
//! Every NIF that may wait for the store's lock runs on a dirty CPU
//! scheduler: queries hold the lock for as long as they walk, and a write
//! that waited for one on a normal scheduler would hold that scheduler too.
//! One exception, [`store_try_put_batch`]: a small write that never waits
//! (it only *tries* the lock) and whose work is bounded runs on the normal
//! scheduler of its caller, because waking a dirty scheduler thread costs
//! milliseconds when the machine is loaded (measured: p90 16 ms, max 44 ms
//! for ten events at a load of 16 on 2 cores, against 31 µs / 59 µs on the
//! caller's scheduler).

use elixir_scope_core::{
    call_contents, corr_type_of, link_of, CorrType, CorrelationFields, Event, EventKind,
    EventStore, LinkKind, Order, StoreConfig, StoredEvent, TermKeys, TERM_FLAG_FUNCTION,
};
use rustler::sys::{ErlNifResourceType, ErlNifTerm as ERL_NIF_TERM};
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, NifResult, Term};
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::atoms;
use crate::codec::{self, encode_into, Scratch, TapeDecoder};
use crate::error::badarg;
use crate::event_term::{view_to_term, EvView};
use crate::handle::{self, Handle, Ref};

/// Most events one `store_put_batch` call takes (Elixir chunks).
pub const CHUNK: usize = 1000;
/// Largest stored term, in tape bytes: a bigger event is refused with
/// `{:error, :event_too_large}` (never stored truncated).
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// `last_cleanup` before any cleanup.
const NEVER: i64 = i64::MIN;
/// Most events [`store_try_put_batch`] takes on a normal scheduler.
pub const FAST_CHUNK: usize = 32;
/// Most tape bytes it encodes there (all events together).
const FAST_BYTES: usize = 256 << 10;

/// The store resource behind `%DataAccess{}`: its own store, or a
/// pipeline's (shared with the pipeline's workers, read-only from Elixir).
pub struct StoreRes {
    store: Arc<Mutex<EventStore>>,
    /// A pipeline's store: Elixir may query and expire, not write or wipe.
    read_only: bool,
    destroyed: AtomicBool,
    /// Wall time (ms) of the last `store_evict`, or [`NEVER`].
    last_cleanup: AtomicI64,
    /// A store loaded from trace files: the foreign pids and ports its
    /// words refer to, and the process names the files held.
    loaded: Option<Loaded>,
}

/// What a store loaded from trace files keeps besides its events.
pub struct Loaded {
    /// Registry entries of its foreign pids and ports, held (and released
    /// when the store is dropped) for the words that refer to them.
    #[allow(dead_code)]
    pub foreign: crate::portable::ForeignGuard,
    /// Process names (header word, name).
    pub names: Vec<(u64, String)>,
}

static STORE_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for StoreRes {
    const NAME: &'static CStr = c"elixir_scope_store";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &STORE_TYPE
    }
    fn drop_off_scheduler(&self) -> bool {
        true
    }
}

impl StoreRes {
    /// A read-only handle on a pipeline's store.
    pub fn shared(store: Arc<Mutex<EventStore>>) -> StoreRes {
        StoreRes {
            store,
            read_only: true,
            destroyed: AtomicBool::new(false),
            last_cleanup: AtomicI64::new(NEVER),
            loaded: None,
        }
    }

    /// A read-only store loaded from trace files.
    pub fn loaded(store: EventStore, loaded: Loaded) -> StoreRes {
        StoreRes {
            loaded: Some(loaded),
            ..StoreRes::shared(Arc::new(Mutex::new(store)))
        }
    }

    /// The store behind the handle (for scans that take its lock in
    /// chunks), or an `ArgumentError` if destroyed.
    pub(crate) fn shared_store(&self, env: Env) -> NifResult<&Arc<Mutex<EventStore>>> {
        if self.destroyed.load(Ordering::Acquire) {
            return badarg(env, "the data access store has been destroyed");
        }
        Ok(&self.store)
    }

    /// Process names of a store loaded from files.
    pub(crate) fn names(&self) -> &[(u64, String)] {
        self.loaded.as_ref().map_or(&[], |l| l.names.as_slice())
    }

    /// `Some({:error, reason})` when writes are refused.
    fn refuse_write<'a>(&self, env: Env<'a>) -> Option<Term<'a>> {
        if self.destroyed.load(Ordering::Acquire) {
            Some((atoms::error(), atoms::destroyed()).encode(env))
        } else if self.read_only {
            Some((atoms::error(), atoms::read_only()).encode(env))
        } else {
            None
        }
    }

    /// The locked store, or an `ArgumentError` if destroyed. A poisoned
    /// lock (a panic while holding it) is recovered: the store's methods
    /// leave it consistent between calls.
    pub(crate) fn lock<'s>(&'s self, env: Env) -> NifResult<MutexGuard<'s, EventStore>> {
        if self.destroyed.load(Ordering::Acquire) {
            return badarg(env, "the data access store has been destroyed");
        }
        Ok(self.store.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// [`StoreRes::lock`] without waiting: `None` while another thread
    /// holds the lock (for NIFs that run on a normal scheduler).
    pub(crate) fn try_lock<'s>(
        &'s self,
        env: Env,
    ) -> NifResult<Option<MutexGuard<'s, EventStore>>> {
        if self.destroyed.load(Ordering::Acquire) {
            return badarg(env, "the data access store has been destroyed");
        }
        Ok(match self.store.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        })
    }
}

/// The index key of a pid/module/function term: the raw word of an
/// immediate (local pid, atom, small integer); for a remote or foreign pid
/// or port, a 62-bit hash of its external form (the key a loaded trace
/// file gives it, see `portable`); else `phash2 << 2`. Non-immediate keys
/// have low tag bits `00`, so they never equal an immediate's word.
pub(crate) fn term_key(t: Term) -> u64 {
    let raw = t.as_c_arg();
    if codec::is_immediate(raw) {
        return codec::word(raw);
    }
    if matches!(
        t.get_type(),
        rustler::TermType::Pid | rustler::TermType::Port
    ) {
        if let Some(k) = crate::portable::foreign_key(t.get_env(), raw) {
            return k;
        }
    }
    (t.hash_phash2() as u64) << 2
}

pub(crate) fn order_of(desc: bool) -> Order {
    if desc {
        Order::Desc
    } else {
        Order::Asc
    }
}

fn is_nil(t: Term) -> bool {
    t.is_atom() && t == atoms::nil().encode(t.get_env())
}

/// Build the stored event for `term` with the given header fields and its
/// `{event_type, ast_node}` index keys (`0`: none); `None` if the term does
/// not fit `limit` tape bytes. A `nil` pid is stored as no process
/// (word 0); a term naming a module and a function (neither `nil`) is
/// flagged [`TERM_FLAG_FUNCTION`].
#[allow(clippy::too_many_arguments)]
fn build(
    env: Env,
    id: u64,
    ts: i64,
    pid: Term,
    module: Term,
    function: Term,
    corr: u64,
    keys: (u64, u64),
    term: Term,
    limit: usize,
) -> Option<(Event, CorrelationFields, TermKeys)> {
    let mut payload = Vec::new();
    if encode_into(env, &mut payload, limit, |enc| enc.field(term)) {
        return None;
    }
    let ev = Event {
        id,
        timestamp: ts,
        wall_time: 0,
        pid: if is_nil(pid) { 0 } else { term_key(pid) },
        peer: 0,
        module: term_key(module),
        function: term_key(function),
        aux: 0,
        kind: EventKind::Term as u8,
        flags: if is_nil(module) || is_nil(function) {
            0
        } else {
            TERM_FLAG_FUNCTION
        },
        payload,
    };
    let cf = CorrelationFields {
        correlation_id: corr,
        parent_id: 0,
        root_id: 0,
    };
    let tk = TermKeys {
        event_type: keys.0,
        ast_node: keys.1,
    };
    Some((ev, cf, tk))
}

/// The Elixir term of a stored event: the stored term itself for
/// `DataAccess` events, the `Events` struct for pipeline events.
pub fn stored_term<'a>(env: Env<'a>, e: &StoredEvent, scratch: &mut Scratch) -> Term<'a> {
    if e.kind == EventKind::Term as u8 {
        TapeDecoder::new(e.payload).next(env, scratch)
    } else {
        view_to_term(env, &EvView::from(e), scratch)
    }
}

/// Decode stored events into a list term.
pub(crate) fn to_list<'a>(env: Env<'a>, evs: &[StoredEvent]) -> Term<'a> {
    let mut scratch = Scratch::for_call(env);
    let out: Vec<ERL_NIF_TERM> = evs
        .iter()
        .map(|e| stored_term(env, e, &mut scratch).as_c_arg())
        .collect();
    codec::make_list(env, &out)
}

/// `{:called_from, id}`-style link terms (a list of at most one: an
/// event has one link at most, see `link_of`).
fn link_terms<'a>(env: Env<'a>, e: &StoredEvent) -> Term<'a> {
    let empty = Vec::<Term>::new().encode(env);
    let Some(l) = link_of(e) else {
        return empty;
    };
    let tag = match l.kind {
        LinkKind::CalledFrom => atoms::called_from(),
        LinkKind::Completes => atoms::completes(),
        LinkKind::Receives => atoms::receives(),
        LinkKind::SpawnedBy => atoms::spawned_by(),
        LinkKind::StateIn => atoms::state_in(),
    };
    let target = if l.kind == LinkKind::SpawnedBy {
        // SAFETY: a term valid in `env` (see `word_term`).
        unsafe { Term::new(env, crate::portable::word_term(env, l.target)) }
    } else {
        l.target.encode(env)
    };
    // SAFETY: terms of `env`.
    unsafe {
        let items = [tag.encode(env).as_c_arg(), target.as_c_arg()];
        let pair = rustler::sys::enif_make_tuple_from_array(env.as_c_arg(), items.as_ptr(), 2);
        Term::new(
            env,
            rustler::sys::enif_make_list_cell(env.as_c_arg(), pair, empty.as_c_arg()),
        )
    }
}

fn corr_type_atom(kind: u8) -> Atom {
    match corr_type_of(EventKind::from_u8(kind)) {
        CorrType::FunctionCall => atoms::function_call(),
        CorrType::FunctionReturn => atoms::function_return(),
        CorrType::MessageSend => atoms::message_send(),
        CorrType::MessageReceive => atoms::message_receive(),
        CorrType::ProcessSpawn => atoms::process_spawn(),
        CorrType::ProcessExit => atoms::process_exit(),
        CorrType::StateChange => atoms::state_change_type(),
        CorrType::Unknown => atoms::unknown(),
    }
}

/// `%{event, correlation_id, parent_id, root_id, links, correlation_type}`
/// (`parent_id`/`root_id` `nil` when none).
pub(crate) fn correlated_term<'a>(
    env: Env<'a>,
    e: &StoredEvent,
    scratch: &mut Scratch,
) -> NifResult<Term<'a>> {
    let nil = atoms::nil().encode(env);
    let opt = |v: u64| if v == 0 { nil } else { v.encode(env) };
    // One map built from arrays (live notifications build one per event),
    // values in key order (see `event_term::CORRELATED`).
    let event = stored_term(env, e, scratch);
    let values = [
        e.correlation_id.encode(env),
        corr_type_atom(e.kind).encode(env),
        event,
        e.id.encode(env),
        link_terms(env, e),
        opt(e.parent_id),
        opt(e.root_id),
        e.timestamp.encode(env),
    ]
    .map(|t| t.as_c_arg());
    Ok(crate::event_term::make_struct_in(
        env,
        scratch,
        &crate::event_term::CORRELATED,
        &values,
    ))
}

pub(crate) fn correlated_list<'a>(env: Env<'a>, evs: &[StoredEvent]) -> NifResult<Term<'a>> {
    let mut scratch = Scratch::for_call(env);
    let mut out = Vec::with_capacity(evs.len());
    for e in evs {
        out.push(correlated_term(env, e, &mut scratch)?.as_c_arg());
    }
    Ok(codec::make_list(env, &out))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn store_new(env: Env, max_events: i64) -> NifResult<Term> {
    if max_events <= 0 || max_events as u64 > elixir_scope_core::store::MAX_EVENTS_LIMIT as u64 {
        return badarg(
            env,
            format!(
                "max_events must be an integer in 1..{}",
                elixir_scope_core::store::MAX_EVENTS_LIMIT
            ),
        );
    }
    let store = EventStore::new(StoreConfig {
        max_events: max_events as usize,
        max_age_ns: None,
    });
    let res = handle::make(
        env,
        StoreRes {
            store: Arc::new(Mutex::new(store)),
            read_only: false,
            destroyed: AtomicBool::new(false),
            last_cleanup: AtomicI64::new(NEVER),
            loaded: None,
        },
    );
    Ok((atoms::ok(), res).encode(env))
}

/// Store one event: `:ok` (also for an id already stored: kept once),
/// `{:error, :event_too_large}` or `{:error, :destroyed}`.
#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn store_put<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    id: u64,
    ts: i64,
    pid: Term<'a>,
    module: Term<'a>,
    function: Term<'a>,
    corr: u64,
    keys: (u64, u64),
    event: Term<'a>,
) -> Term<'a> {
    if let Some(refused) = s.refuse_write(env) {
        return refused;
    }
    let Some((ev, cf, tk)) = build(
        env,
        id,
        ts,
        pid,
        module,
        function,
        corr,
        keys,
        event,
        MAX_EVENT_BYTES,
    ) else {
        return (atoms::error(), atoms::event_too_large()).encode(env);
    };
    let mut store = s.store.lock().unwrap_or_else(|p| p.into_inner());
    store.insert_term(&ev, cf, tk);
    atoms::ok().encode(env)
}

/// Store a list of at most [`CHUNK`] `{id, ts, pid, module, function,
/// {corr, event_type_key, ast_key}, event}` tuples: `:ok`, `{:error, :event_too_large}` (nothing of
/// this chunk stored) or `{:error, :destroyed}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_put_batch<'a>(env: Env<'a>, s: Ref<StoreRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    if let Some(refused) = s.refuse_write(env) {
        return Ok(refused);
    }
    let built = match build_list(env, list, CHUNK, usize::MAX)? {
        Built::All(b) => b,
        Built::TooLarge => return Ok((atoms::error(), atoms::event_too_large()).encode(env)),
        // No byte budget here.
        Built::OverBudget => unreachable!("no budget"),
    };
    let mut store = s.store.lock().unwrap_or_else(|p| p.into_inner());
    for (ev, cf, tk) in &built {
        store.insert_term(ev, *cf, *tk);
    }
    Ok(atoms::ok().encode(env))
}

enum Built {
    All(Vec<(Event, CorrelationFields, TermKeys)>),
    /// An event does not fit [`MAX_EVENT_BYTES`].
    TooLarge,
    /// The events need more than the byte budget.
    OverBudget,
}

/// The stored events of a list of at most `max` entries, encoding at most
/// `budget` tape bytes in all.
fn build_list(env: Env, list: Term, max: usize, budget: usize) -> NifResult<Built> {
    let mut built = Vec::with_capacity(max.min(64));
    let mut rest = list;
    let mut left = budget;
    while let Ok((head, tail)) = rest.list_get_cell() {
        if built.len() == max {
            return badarg(env, format!("at most {max} events per call"));
        }
        type Entry<'t> = (
            u64,
            i64,
            Term<'t>,
            Term<'t>,
            Term<'t>,
            (u64, u64, u64),
            Term<'t>,
        );
        let (id, ts, pid, module, function, (corr, tk, ak), event): Entry = match head.decode() {
            Ok(t) => t,
            Err(_) => return badarg(env, "malformed store_put_batch entry"),
        };
        let limit = MAX_EVENT_BYTES.min(left);
        match build(
            env,
            id,
            ts,
            pid,
            module,
            function,
            corr,
            (tk, ak),
            event,
            limit,
        ) {
            Some(b) => {
                left -= b.0.payload.len().min(left);
                built.push(b);
            }
            None if limit < MAX_EVENT_BYTES => return Ok(Built::OverBudget),
            None => return Ok(Built::TooLarge),
        }
        rest = tail;
    }
    if !rest.is_list() {
        return badarg(env, "events must be a proper list");
    }
    Ok(Built::All(built))
}

/// [`store_put_batch`] on the caller's (normal) scheduler for at most
/// [`FAST_CHUNK`] events of at most [`FAST_BYTES`] tape bytes in all, into
/// a store with room for them (no eviction), when its lock is free:
/// `:ok`, `{:error, :destroyed | :read_only}`, or `:busy` (nothing stored:
/// the caller goes through the dirty `store_put_batch`). Never waits.
#[rustler::nif]
fn store_try_put_batch<'a>(env: Env<'a>, s: Ref<StoreRes>, list: Term<'a>) -> NifResult<Term<'a>> {
    if let Some(refused) = s.refuse_write(env) {
        return Ok(refused);
    }
    let busy = || Ok(atoms::busy().encode(env));
    let n = match list.list_length() {
        Ok(n) if n <= FAST_CHUNK => n,
        _ => return busy(),
    };
    let built = match build_list(env, list, FAST_CHUNK, FAST_BYTES)? {
        Built::All(b) => b,
        Built::TooLarge | Built::OverBudget => return busy(),
    };
    let mut store = match s.store.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return busy(),
    };
    // An insert into a full store evicts, and freeing a segment may sweep
    // the index maps: unbounded for one call, so that goes dirty.
    if store.len() + n > store.config().max_events {
        return busy();
    }
    for (ev, cf, tk) in &built {
        store.insert_term(ev, *cf, *tk);
    }
    Ok(atoms::ok().encode(env))
}

/// `{:ok, event}` or `{:error, :not_found}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_get<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    Ok(match store.get(id) {
        Some(e) => {
            let mut scratch = Scratch::new();
            (atoms::ok(), stored_term(env, &e, &mut scratch)).encode(env)
        }
        None => (atoms::error(), atoms::not_found()).encode(env),
    })
}

#[rustler::nif(schedule = "DirtyCpu")]
fn store_by_pid<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    pid: Term<'a>,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.by_pid(term_key(pid), limit as usize, order_of(desc));
    Ok(to_list(env, &evs))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn store_by_function<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    module: Term<'a>,
    function: Term<'a>,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.by_function(
        term_key(module),
        term_key(function),
        limit as usize,
        order_of(desc),
    );
    Ok(to_list(env, &evs))
}

/// Events stored with this event-type key (see `DataAccess`), in store
/// order.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_by_event_type<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    key: u64,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.by_event_type(key, limit as usize, order_of(desc));
    Ok(to_list(env, &evs))
}

/// Events stored with this AST-node key, in store order.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_by_ast_node<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    key: u64,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.by_ast_node(key, limit as usize, order_of(desc));
    Ok(to_list(env, &evs))
}

/// `%{total, with_pid, with_function, event_type, ast_node}`: live events
/// in each index.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_index_sizes<'a>(env: Env<'a>, s: Ref<StoreRes>) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let z = store.index_sizes();
    drop(store);
    let m = map_new(env)
        .map_put(atoms::total(), z.total as u64)?
        .map_put(atoms::with_pid(), z.with_pid as u64)?
        .map_put(atoms::with_function(), z.with_function as u64)?
        .map_put(atoms::event_type(), z.event_type as u64)?
        .map_put(atoms::ast_node(), z.ast_node as u64)?;
    Ok(m)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn store_by_correlation<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    corr: u64,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.by_correlation(corr, limit as usize, order_of(desc));
    Ok(to_list(env, &evs))
}

#[rustler::nif(schedule = "DirtyCpu")]
fn store_by_time_range<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    t0: i64,
    t1: i64,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.by_time_range(t0, t1, limit as usize, order_of(desc));
    Ok(to_list(env, &evs))
}

/// Expire every event with `timestamp < cutoff`; records `now_ms` as the
/// last cleanup time. Returns the number removed.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_evict(env: Env, s: Ref<StoreRes>, cutoff: i64, now_ms: i64) -> NifResult<u64> {
    let mut store = s.lock(env)?;
    let n = store.evict_older_than(cutoff);
    s.last_cleanup.store(now_ms, Ordering::Relaxed);
    Ok(n as u64)
}

#[rustler::nif(schedule = "DirtyCpu")]
fn store_stats<'a>(env: Env<'a>, s: Ref<StoreRes>) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let st = store.stats();
    drop(store);
    let nil = atoms::nil().encode(env);
    let opt = |v: Option<i64>| v.map_or(nil, |x| x.encode(env));
    let last = match s.last_cleanup.load(Ordering::Relaxed) {
        NEVER => nil,
        ms => ms.encode(env),
    };
    let m = map_new(env)
        .map_put(atoms::total_events(), st.total as u64)?
        .map_put(atoms::max_events(), st.max_events as u64)?
        .map_put(atoms::oldest_timestamp(), opt(st.oldest_timestamp))?
        .map_put(atoms::newest_timestamp(), opt(st.newest_timestamp))?
        .map_put(atoms::last_cleanup(), last)?
        .map_put(atoms::memory_usage(), st.memory_bytes as u64)?
        .map_put(atoms::payload_bytes(), st.payload_bytes as u64)?
        .map_put(atoms::inserted(), st.inserted)?
        .map_put(atoms::evicted(), st.evicted)?
        .map_put(atoms::expired(), st.expired)?
        .map_put(atoms::duplicates(), st.duplicates)?
        .map_put(atoms::rejected(), st.rejected)?
        .map_put(atoms::reclaimed_bytes(), st.reclaimed_bytes)?
        .map_put(atoms::compactions(), st.compactions)?;
    Ok(m)
}

/// `{:ok, %{event, correlation_id, parent_id, root_id, links,
/// correlation_type, ...}}` or `{:error, :not_found}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_get_correlated<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    Ok(match store.get(id) {
        Some(e) => {
            let mut scratch = Scratch::new();
            (atoms::ok(), correlated_term(env, &e, &mut scratch)?).encode(env)
        }
        None => (atoms::error(), atoms::not_found()).encode(env),
    })
}

/// The causal chain of `id`, root first, as correlated maps.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_causal_chain<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.causal_chain(id);
    correlated_list(env, &evs)
}

/// Everything inside call `id` (see `call_contents`), as correlated maps.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_call_contents<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    id: u64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = call_contents(&store, id, limit as usize);
    correlated_list(env, &evs)
}

/// Events whose parent (enclosing call or cause) is `id`, oldest first.
#[rustler::nif(schedule = "DirtyCpu")]
fn store_children<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64, limit: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = store.children(id, limit as usize);
    correlated_list(env, &evs)
}

/// Most events a [`store_quick`] call returns, and most payload bytes it
/// decodes: well under a millisecond of a normal scheduler.
const QUICK_MAX_EVENTS: usize = 2_000;
const QUICK_MAX_BYTES: usize = 512 << 10;

/// The store queries on the caller's scheduler: what the dirty NIF of the
/// same query returns (`op` `:time` with `a..b`, `:pid` `a`, `:function`
/// `a.b`, `:correlation` key `a`, `:get` id `a`, `:chain` id `a`), or
/// `:busy` when the store lock is held (a pipeline worker storing a batch)
/// or the answer is too big for a normal scheduler; the caller then runs
/// the dirty NIF. Saves the two thread switches of a dirty call, which
/// cost a small query more than its work.
#[rustler::nif]
fn store_quick<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    op: Atom,
    a: Term<'a>,
    b: Term<'a>,
    limit: u64,
    desc: bool,
) -> NifResult<Term<'a>> {
    let busy = || Ok(atoms::busy().encode(env));
    if limit as usize > QUICK_MAX_EVENTS {
        return busy();
    }
    let Some(store) = s.try_lock(env)? else {
        return busy();
    };
    let (limit, order) = (limit as usize, order_of(desc));
    // Arguments the dirty NIF would refuse are left to it (its errors).
    let (i, u) = (
        |t: Term| t.decode::<i64>().ok(),
        |t: Term| t.decode::<u64>().ok(),
    );
    let evs = match op {
        _ if op == atoms::time() => match (i(a), i(b)) {
            (Some(t0), Some(t1)) => store.by_time_range(t0, t1, limit, order),
            _ => return busy(),
        },
        _ if op == atoms::pid() => store.by_pid(term_key(a), limit, order),
        _ if op == atoms::function() => store.by_function(term_key(a), term_key(b), limit, order),
        _ => match u(a) {
            Some(k) if op == atoms::correlation() => store.by_correlation(k, limit, order),
            Some(id) if op == atoms::get() => store.get(id).into_iter().collect(),
            Some(id) if op == atoms::chain() => store.causal_chain(id),
            _ => return busy(),
        },
    };
    let bytes: usize = evs.iter().map(|e| e.payload.len()).sum();
    if evs.len() > QUICK_MAX_EVENTS || bytes > QUICK_MAX_BYTES {
        return busy();
    }
    // About 0.25 µs per event of a 1 ms slice.
    rustler::schedule::consume_timeslice(env, (evs.len() / 40).clamp(1, 100) as i32);
    if op == atoms::get() {
        return Ok(match evs.first() {
            Some(e) => (atoms::ok(), stored_term(env, e, &mut Scratch::new())).encode(env),
            None => (atoms::error(), atoms::not_found()).encode(env),
        });
    }
    if op == atoms::chain() {
        return correlated_list(env, &evs);
    }
    Ok(to_list(env, &evs))
}

/// Mark destroyed and free the store's memory now (also for a store
/// loaded from trace files). Idempotent. A no-op on a pipeline's store:
/// the pipeline owns it (it is freed with the pipeline and the last
/// handle).
#[rustler::nif(schedule = "DirtyCpu")]
fn store_destroy(s: Ref<StoreRes>) -> Atom {
    if (!s.read_only || s.loaded.is_some()) && !s.destroyed.swap(true, Ordering::AcqRel) {
        let empty = EventStore::new(StoreConfig {
            max_events: 1,
            max_age_ns: None,
        });
        let old = {
            let mut store = s.store.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::replace(&mut *store, empty)
        };
        drop(old);
        crate::handle::return_freed_memory();
    }
    atoms::ok()
}
