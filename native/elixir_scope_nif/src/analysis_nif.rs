//! `ana_*` NIFs: `ElixirScope.Analysis` over a store (usually a trace's
//! pipeline store). Results are `%ElixirScope.Analysis.Entry{}` records.
//! Every NIF runs on a dirty CPU scheduler. The whole-store passes
//! (`ana_call_stats`, `ana_top_trees`) take the store lock only to cut a
//! [`elixir_scope_core::Snapshot`] and run over it without the lock;
//! `ana_select` scans a snapshot handle (`ana_snapshot`) or the store in
//! resumable chunks; the others hold the lock for index walks only.

use elixir_scope_core::analysis::{self, StatKey};
use elixir_scope_core::{
    call_contents, Callback, EventKind, EventStore, Order, Scan, StateAt, StateView, StoredEvent,
    FLAG_STATEM, FLAG_TRUNCATED,
};
use rustler::sys::ErlNifTerm as ERL_NIF_TERM;
use rustler::{Atom, Encoder, Env, NifResult, Term};

use crate::atoms;
use crate::codec::{self, Scratch};
use crate::error::badarg;
use crate::event_term::entry_term;
use crate::handle::Ref;
use crate::otp;
use crate::snap_nif::SnapRes;
use crate::store_nif::{term_key, StoreRes};

/// Records one `ana_select` call visits at most (Elixir loops on the cursor).
const SELECT_CHUNK: usize = 50_000;

fn entries<'a>(env: Env<'a>, evs: &[StoredEvent]) -> Term<'a> {
    let mut scratch = Scratch::for_call(env);
    let out: Vec<_> = evs
        .iter()
        .map(|e| entry_term(env, e, &mut scratch).as_c_arg())
        .collect();
    codec::make_list(env, &out)
}

fn entry_or_nil<'a>(env: Env<'a>, e: Option<StoredEvent>) -> Term<'a> {
    match e {
        Some(e) => entry_term(env, &e, &mut Scratch::new()),
        None => atoms::nil().encode(env),
    }
}

#[rustler::nif(schedule = "DirtyCpu")]
fn ana_get<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    Ok(entry_or_nil(env, store.get(id)))
}

/// The calls on the stack at event `id`, innermost first: for a call, the
/// call and its callers; for a return or exception, the call it completes
/// and its callers; for any other event, its enclosing call and callers.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_traceback<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    Ok(match traceback_of(&store, id) {
        Some(chain) => entries(env, &chain),
        None => atoms::nil().encode(env),
    })
}

/// Most entries an [`ana_quick`] answer holds, and most payload bytes it
/// decodes: well under a millisecond of a normal scheduler.
const QUICK_MAX_ANSWER: usize = 2_000;

/// `ana_range` (`op` `:range`, call `id`, `limit`; `:range_of`, the call
/// of event `id` if it is a return or exception, else `id`) or `ana_traceback`
/// (`:traceback`, event `id`) on the caller's scheduler: the same answer,
/// or `:busy` when the store lock is held or the answer is over
/// [`QUICK_MAX_ANSWER`] entries or [`QUICK_MAX_BYTES`] payload bytes (the
/// caller then runs the dirty NIF).
#[rustler::nif]
fn ana_quick<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    op: Atom,
    id: u64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let busy = || Ok(atoms::busy().encode(env));
    let Some(store) = s.try_lock(env)? else {
        return busy();
    };
    let evs = if op == atoms::range() || op == atoms::range_of() {
        // `:range_of`: `id` may be a return or exception, standing for the
        // call it completes (what `Analysis.range/2` resolves with
        // `ana_get` before `:range`), resolved here under the same lock.
        let id = match store.get(id) {
            Some(e)
                if op == atoms::range_of()
                    && matches!(
                        EventKind::from_u8(e.kind),
                        EventKind::FunctionReturn | EventKind::FunctionException
                    )
                    && e.correlation_id != e.id =>
            {
                e.correlation_id
            }
            _ => id,
        };
        // One over the bound: an answer that big goes to the dirty NIF.
        let limit = (limit as usize).min(QUICK_MAX_ANSWER + 1);
        call_contents(&store, id, limit)
    } else if op == atoms::traceback() {
        match traceback_of(&store, id) {
            Some(chain) => chain,
            None => return Ok(atoms::nil().encode(env)),
        }
    } else {
        return busy();
    };
    let bytes: usize = evs.iter().map(|e| e.payload.len()).sum();
    if evs.len() > QUICK_MAX_ANSWER || bytes > QUICK_MAX_BYTES {
        return busy();
    }
    rustler::schedule::consume_timeslice(env, (evs.len() / 40).clamp(1, 100) as i32);
    Ok(entries(env, &evs))
}

/// The calls on the stack at event `id` (see `ana_traceback`); `None` for
/// an unknown id.
fn traceback_of(store: &EventStore, id: u64) -> Option<Vec<StoredEvent<'_>>> {
    let e = store.get(id)?;
    let start = match EventKind::from_u8(e.kind) {
        EventKind::FunctionCall => e.id,
        EventKind::FunctionReturn | EventKind::FunctionException if e.correlation_id != e.id => {
            e.correlation_id
        }
        _ => e.parent_id,
    };
    let mut chain = if start == 0 {
        Vec::new()
    } else {
        store.causal_chain(start)
    };
    chain.retain(|c| c.kind == EventKind::FunctionCall as u8);
    chain.reverse();
    Some(chain)
}

/// Everything inside call `id` (itself, nested calls and their returns,
/// messages, spawns), in store order, at most `limit`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_range<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64, limit: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let evs = call_contents(&store, id, limit as usize);
    Ok(entries(env, &evs))
}

/// The event after (`:next`) or before (`:prev`) event `id`, in the same
/// process (`:process`, store order) or across processes (`:global`,
/// timestamp order); nil at either end.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_step<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    id: u64,
    scope: Atom,
    forward: bool,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let e = if scope == atoms::process() {
        if forward {
            store.pid_next(id)
        } else {
            store.pid_prev(id)
        }
    } else {
        store.time_neighbour(id, if forward { Order::Asc } else { Order::Desc })
    };
    Ok(entry_or_nil(env, e))
}

fn word_term<'a>(env: Env<'a>, w: u64) -> Term<'a> {
    // SAFETY: `portable::word_term` returns a term valid in `env`.
    unsafe { Term::new(env, crate::portable::word_term(env, w)) }
}

/// `{stats, scanned, untracked}`; each stat `{key, count, acc_ns, own_ns}`
/// with key `{m, f, a}` (`:function`), `m` (`:module`), `pid`
/// (`:process`) or `{pid, {m, f, a}}` (`:process_function`).
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_call_stats<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    by: Atom,
    modules: Term<'a>,
) -> NifResult<Term<'a>> {
    let key = if by == atoms::function() {
        StatKey::Function
    } else if by == atoms::module() {
        StatKey::Module
    } else if by == atoms::process() {
        StatKey::Process
    } else if by == atoms::process_function() {
        StatKey::ProcessFunction
    } else {
        return badarg(
            env,
            "by must be :function, :module, :process or :process_function",
        );
    };
    let mut mods: Vec<u64> = Vec::new();
    let mut rest = modules;
    while let Ok((m, tail)) = rest.list_get_cell() {
        mods.push(term_key(m));
        rest = tail;
    }
    if !rest.is_empty_list() {
        return badarg(env, "modules must be a proper list");
    }
    // A consistent cut, then the pass without the store lock.
    let snap = s.lock(env)?.snapshot();
    let r = analysis::call_stats(&snap, key, &mods);
    drop(snap);
    let mfa = |st: &analysis::CallStat| {
        (
            word_term(env, st.module),
            word_term(env, st.function),
            st.arity,
        )
            .encode(env)
    };
    let out: Vec<Term> = r
        .stats
        .iter()
        .map(|st| {
            let k = match key {
                StatKey::Function => mfa(st),
                StatKey::Module => word_term(env, st.module),
                StatKey::Process => word_term(env, st.pid),
                StatKey::ProcessFunction => (word_term(env, st.pid), mfa(st)).encode(env),
            };
            (k, st.count, st.acc_ns, st.own_ns).encode(env)
        })
        .collect();
    Ok((out, r.scanned, r.untracked).encode(env))
}

/// `{trees, distinct, untracked}`; each tree `{first_call_id, count, size,
/// total_ns}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_top_trees<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    max: u64,
    min_count: u64,
    min_size: u64,
) -> NifResult<Term<'a>> {
    let snap = s.lock(env)?.snapshot();
    let r = analysis::top_call_trees(&snap, max as usize, min_count, min_size);
    drop(snap);
    let out: Vec<Term> = r
        .trees
        .iter()
        .map(|t| (t.first_call_id, t.count, t.size, t.total_ns).encode(env))
        .collect();
    Ok((out, r.distinct, r.untracked).encode(env))
}

/// `{flows, next_cursor | nil}`; each flow `{send, receive | nil, call |
/// nil}` for messages sent by or to `pid` (nil: all), from `cursor`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_messages<'a>(
    env: Env<'a>,
    s: Term<'a>,
    pid: Term<'a>,
    cursor: u64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let p = opt_key(env, pid).unwrap_or(0);
    let limit = (limit as usize).max(1);
    // A snapshot (`ana_snapshot`): scanned without the store lock, which is
    // taken only for the lookups' entry points.
    if let Ok(snap) = s.decode::<Ref<SnapRes>>() {
        let cut = snap.get(env)?;
        let (flows, next) = analysis::message_flow_cut(&cut, p, cursor, limit, |ids, corrs| {
            let store = snap.store().lock().unwrap_or_else(|e| e.into_inner());
            store.cut_heads(&cut, ids, corrs)
        });
        return Ok(flows_term(env, &flows, next));
    }
    let s: Ref<StoreRes> = s.decode()?;
    let store: std::sync::MutexGuard<'_, EventStore> = s.lock(env)?;
    let (flows, next) = analysis::message_flow(&store, p, cursor, limit);
    Ok(flows_term(env, &flows, next))
}

fn flows_term<'a>(env: Env<'a>, flows: &[analysis::Flow], next: Option<u64>) -> Term<'a> {
    let mut scratch = Scratch::for_call(env);
    let mut one = |e: Option<StoredEvent>| match e {
        Some(e) => entry_term(env, &e, &mut scratch),
        None => atoms::nil().encode(env),
    };
    let out: Vec<Term> = flows
        .iter()
        .map(|f| {
            let a = one(Some(f.send));
            let b = one(f.receive);
            let c = one(f.in_call);
            (a, b, c).encode(env)
        })
        .collect();
    (out, next).encode(env)
}

/// The index key of a filter term, `None` for nil (any).
fn opt_key(env: Env, t: Term) -> Option<u64> {
    (t.as_c_arg() != atoms::nil().encode(env).as_c_arg()).then(|| term_key(t))
}

/// The filters of `ana_select` / `ana_select_time`: pid, module and
/// function keys (nil: any) and a bit mask of event kind numbers (0: any).
struct Filter {
    pid: Option<u64>,
    module: Option<u64>,
    function: Option<u64>,
    kinds: u64,
}

impl Filter {
    fn new<'a>(
        env: Env<'a>,
        pid: Term<'a>,
        module: Term<'a>,
        function: Term<'a>,
        kinds: u64,
    ) -> Filter {
        Filter {
            pid: opt_key(env, pid),
            module: opt_key(env, module),
            function: opt_key(env, function),
            kinds,
        }
    }

    /// No filter at all: every record of a window is a hit.
    fn is_any(&self) -> bool {
        self.pid.is_none() && self.module.is_none() && self.function.is_none() && self.kinds == 0
    }

    fn matches(&self, e: &StoredEvent) -> bool {
        self.pid.map_or(true, |p| e.pid == p)
            && self.module.map_or(true, |m| e.module == m)
            && self.function.map_or(true, |f| e.function == f)
            && (self.kinds == 0 || self.kinds & (1 << (e.kind & 63)) != 0)
    }
}

/// One chunk of a filtered scan: `{entries, next_cursor | nil}`. Filters
/// (nil: any): `pid`, `module`, `function`; `kinds` a bit mask of event
/// kind numbers (0: any); `t0..=t1` timestamps.
/// At most `limit` hits (entries are built for those only); past the
/// limit the cursor continues after the last hit.
#[allow(clippy::too_many_arguments)]
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_select<'a>(
    env: Env<'a>,
    s: Term<'a>,
    cursor: u64,
    pid: Term<'a>,
    module: Term<'a>,
    function: Term<'a>,
    kinds: u64,
    t0: i64,
    t1: i64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let filter = Filter::new(env, pid, module, function, kinds);
    let limit = limit.clamp(1, usize::MAX as u64) as usize;
    select_in(env, s, cursor, &filter, t0, t1, limit)
}

/// A chunk of `s`: a snapshot (`ana_snapshot`, read without the store
/// lock) or a store.
fn select_in<'a>(
    env: Env<'a>,
    s: Term<'a>,
    cursor: u64,
    filter: &Filter,
    t0: i64,
    t1: i64,
    limit: usize,
) -> NifResult<Term<'a>> {
    if let Ok(snap) = s.decode::<Ref<SnapRes>>() {
        let snap = snap.get(env)?;
        return Ok(select_chunk(env, &*snap, cursor, filter, t0, t1, limit));
    }
    let s: Ref<StoreRes> = s.decode()?;
    let store = s.lock(env)?;
    Ok(select_chunk(env, &*store, cursor, filter, t0, t1, limit))
}

/// The hits of one chunk, at most `limit` of them (entries are built
/// only for those): past the limit, the cursor continues after the last
/// hit kept.
fn select_chunk<'a, S: Scan>(
    env: Env<'a>,
    src: &S,
    cursor: u64,
    filter: &Filter,
    t0: i64,
    t1: i64,
    limit: usize,
) -> Term<'a> {
    let mut hits: Vec<StoredEvent> = Vec::new();
    let mut next = src.scan_events(cursor, SELECT_CHUNK, |e| {
        if filter.matches(e) && (t0..=t1).contains(&e.timestamp) {
            hits.push(*e);
        }
    });
    if hits.len() > limit {
        hits.truncate(limit);
        next = hits.last().map(|e| e.seq + 1);
    }
    (entries(env, &hits), next).encode(env)
}

/// One chunk of a filtered walk of the time window `after_ts..=t1`
/// through the time index, in `(timestamp, seq)` order, after the event at
/// `(after_ts, after_seq)` (`after_seq` -1: from `after_ts` on), at most
/// `limit` hits: `{entries, {last_ts, last_seq} | nil}` (the cursor: the
/// last record the chunk looked at). Filters as `ana_select`.
#[allow(clippy::too_many_arguments)]
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_select_time<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    after_ts: i64,
    after_seq: i64,
    pid: Term<'a>,
    module: Term<'a>,
    function: Term<'a>,
    kinds: u64,
    t1: i64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let filter = Filter::new(env, pid, module, function, kinds);
    let limit = (limit.min(SELECT_CHUNK as u64) as usize).max(1);
    select_time_in(env, s, (after_ts, after_seq), t1, &filter, limit)
}

fn select_time_in<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    (after_ts, after_seq): (i64, i64),
    t1: i64,
    filter: &Filter,
    limit: usize,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    // Unfiltered, the chunk is the hits: visit no more than asked for
    // (and the records tied with the cursor, which are skipped).
    let mut want = if filter.is_any() {
        limit.min(SELECT_CHUNK) + TIE_SLACK
    } else {
        SELECT_CHUNK
    };
    let (hits, next) = loop {
        match time_chunk(&store, (after_ts, after_seq), t1, want, filter, limit) {
            Some(r) => break r,
            // A page of events all tied at or before the cursor: widen it.
            None => want *= 4,
        }
    };
    Ok((entries(env, &hits), next).encode(env))
}

/// Most records an [`ana_select_time_quick`] chunk visits, entries it
/// returns and payload bytes it decodes: well under a millisecond.
const QUICK_MAX_VISITS: usize = 4_000;
const QUICK_MAX_EVENTS: usize = 2_000;
const QUICK_MAX_BYTES: usize = 512 << 10;
/// Records an unfiltered time chunk reads past its limit, for those at or
/// before the cursor (the last record of the previous chunk, and any tied
/// with it).
const TIE_SLACK: usize = 16;

/// [`ana_select_time`] on the caller's scheduler: the same chunk (of at
/// most [`QUICK_MAX_VISITS`] records), or `:busy` when the store lock is
/// held, `limit` is over [`QUICK_MAX_EVENTS`], the hits' payloads exceed
/// [`QUICK_MAX_BYTES`] or the records at the cursor are all tied (the
/// caller then runs [`ana_select_time`]). Saves the dirty-scheduler round
/// trip of small windows.
#[allow(clippy::too_many_arguments)]
#[rustler::nif]
fn ana_select_time_quick<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    after_ts: i64,
    after_seq: i64,
    pid: Term<'a>,
    module: Term<'a>,
    function: Term<'a>,
    kinds: u64,
    t1: i64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let busy = || Ok(atoms::busy().encode(env));
    let limit = (limit as usize).max(1);
    if limit > QUICK_MAX_EVENTS {
        return busy();
    }
    let filter = Filter::new(env, pid, module, function, kinds);
    let Some(store) = s.try_lock(env)? else {
        return busy();
    };
    let want = if filter.is_any() {
        limit + TIE_SLACK
    } else {
        QUICK_MAX_VISITS
    };
    let Some((hits, next)) = time_chunk(&store, (after_ts, after_seq), t1, want, &filter, limit)
    else {
        return busy();
    };
    let bytes: usize = hits.iter().map(|e| e.payload.len()).sum();
    if bytes > QUICK_MAX_BYTES {
        return busy();
    }
    // About 0.25 µs per entry of a 1 ms slice.
    rustler::schedule::consume_timeslice(env, (hits.len() / 40).clamp(1, 100) as i32);
    Ok((entries(env, &hits), next).encode(env))
}

/// The hits (at most `limit`) among the next `want` records of the window
/// `after..=t1` in `(timestamp, seq)` order, and the cursor after the last
/// record looked at (nil at the window's end); `None` when every record of
/// a full page is tied at or before `after` (ask for a wider page).
#[allow(clippy::type_complexity)]
fn time_chunk<'s>(
    store: &'s EventStore,
    after: (i64, i64),
    t1: i64,
    want: usize,
    filter: &Filter,
    limit: usize,
) -> Option<(Vec<StoredEvent<'s>>, Option<(i64, i64)>)> {
    let page = store.by_time_range(after.0, t1, want, Order::Asc);
    let full = page.len() == want;
    let mut hits = Vec::with_capacity(limit.min(page.len()));
    let mut last = None;
    let mut fresh = false;
    for e in page.iter() {
        let at = (e.timestamp, e.seq as i64);
        if at <= after {
            continue;
        }
        fresh = true;
        last = Some(at);
        if filter.matches(e) {
            hits.push(*e);
            if hits.len() == limit {
                // More may follow: continue after this one.
                return Some((hits, last));
            }
        }
    }
    if !fresh && full {
        return None;
    }
    Some((hits, if full { last } else { None }))
}

// ---- states ---------------------------------------------------------------------

/// The arity of a callback of class `flags` named `function`.
fn callback_arity(env: Env, flags: u8, function: u64) -> i64 {
    let statem = flags & FLAG_STATEM != 0;
    match Callback::of_flags(flags) {
        Some(Callback::Init) => 1,
        Some(Callback::HandleCall) => 3,
        Some(Callback::HandleNoreply) => 2,
        Some(Callback::CodeChange) => 3 + statem as i64,
        Some(Callback::Terminate) => 2 + statem as i64,
        Some(Callback::StatemEvent) => {
            if function == codec::word(atoms::handle_event().encode(env).as_c_arg()) {
                4
            } else {
                3
            }
        }
        None => 0,
    }
}

/// The state (data, name) a state record sets, decoded from its payload:
/// a state change's new state, a snapshot's state (`{name, data}` of a
/// gen_statem), a callback return's [`otp::shape`].
fn record_state<'a>(
    env: Env<'a>,
    e: &StoredEvent,
    scratch: &mut Scratch,
) -> (Option<ERL_NIF_TERM>, Option<ERL_NIF_TERM>) {
    let mut d = codec::TapeDecoder::new(e.payload);
    match EventKind::from_u8(e.kind) {
        EventKind::StateChange => {
            d.skip();
            d.skip();
            (Some(d.next(env, scratch).as_c_arg()), None)
        }
        EventKind::StateSnapshot => {
            d.skip();
            let st = d.next(env, scratch);
            if e.flags & FLAG_STATEM != 0 {
                match codec::tuple_items(st) {
                    &[name, data] => (Some(data), Some(name)),
                    _ => (Some(st.as_c_arg()), None),
                }
            } else {
                (Some(st.as_c_arg()), None)
            }
        }
        _ => {
            let v = d.next(env, scratch);
            let s = otp::shape(env, e.flags, v);
            (s.data, s.name)
        }
    }
}

/// Decoded states by source record seq, for a history whose records keep
/// the same state.
type StateCache = Vec<(u64, (Option<ERL_NIF_TERM>, Option<ERL_NIF_TERM>))>;

fn cached_state<'a>(
    env: Env<'a>,
    e: &StoredEvent,
    scratch: &mut Scratch,
    cache: &mut StateCache,
) -> (Option<ERL_NIF_TERM>, Option<ERL_NIF_TERM>) {
    if let Some(&(_, v)) = cache.iter().find(|(seq, _)| *seq == e.seq) {
        return v;
    }
    let v = record_state(env, e, scratch);
    remember(cache, e.seq, v);
    v
}

/// Keeps the decoded state of record `seq` (the last 4).
fn remember(cache: &mut StateCache, seq: u64, v: (Option<ERL_NIF_TERM>, Option<ERL_NIF_TERM>)) {
    if cache.len() >= 4 {
        cache.remove(0);
    }
    cache.push((seq, v));
}

/// The message that triggered a callback record: the message of its
/// trigger receive when that was recorded with its content, else rebuilt
/// from the callback call's arguments.
fn trigger_message<'a>(
    env: Env<'a>,
    store: &EventStore,
    e: &StoredEvent,
    scratch: &mut Scratch,
) -> ERL_NIF_TERM {
    let nil = atoms::nil().encode(env).as_c_arg();
    if e.peer != 0 {
        if let Some(r) = store.get(e.peer) {
            if r.kind == EventKind::MessageReceive as u8 {
                let mut d = codec::TapeDecoder::new(r.payload);
                d.skip();
                let m = d.next(env, scratch);
                if m.as_c_arg() != nil {
                    return m.as_c_arg();
                }
            } else {
                // Not a message (a previous state, a spawn).
                return nil;
            }
        }
    }
    let call = if e.kind == EventKind::FunctionCall as u8 {
        Some(*e)
    } else if e.correlation_id != e.id {
        store.get(e.correlation_id)
    } else {
        None
    };
    match call {
        Some(c) if c.kind == EventKind::FunctionCall as u8 => {
            let args = codec::TapeDecoder::new(c.payload).next(env, scratch);
            otp::trigger(env, e.flags, e.function, args).map_or(nil, |t| t.as_c_arg())
        }
        _ => nil,
    }
}

/// `%ElixirScope.Analysis.State{}` of one state record (see that module).
fn state_term<'a>(
    env: Env<'a>,
    store: &EventStore,
    v: &StateView,
    scratch: &mut Scratch,
    cache: &mut StateCache,
) -> Term<'a> {
    let r = &v.record;
    let nil = atoms::nil().encode(env).as_c_arg();
    let e = |t: Term<'a>| t.as_c_arg();
    let kind = EventKind::from_u8(r.kind);
    let callback = r.flags & elixir_scope_core::CALLBACK_MASK != 0;
    // A callback record's return value, decoded once: the state it sets
    // (the state below, when the record sets it, shares these terms) and
    // the rest of the record come from its shape.
    let shape = callback.then(|| {
        let value = codec::TapeDecoder::new(r.payload).next(env, scratch);
        let s = otp::shape(env, r.flags, value);
        if cache.iter().all(|(seq, _)| *seq != r.seq) {
            remember(cache, r.seq, (s.data, s.name));
        }
        s
    });
    let (data, _) = v
        .data
        .map_or((None, None), |s| cached_state(env, &s, scratch, cache));
    let name = v.name.and_then(|s| cached_state(env, &s, scratch, cache).1);
    let (sets_data, sets_name) = elixir_scope_core::state_sets(r.kind, r.flags);
    let statem = r.flags & FLAG_STATEM != 0;
    let kept = !(sets_data || (statem && sets_name));
    let (mut returned, mut reply, mut actions, mut stop) = (nil, nil, nil, nil);
    let (kind_atom, cb, call_id, trigger_id, trigger) = if let Some(s) = shape {
        returned = s.tag.unwrap_or(nil);
        reply = s.reply.unwrap_or(nil);
        actions = s.actions.unwrap_or(nil);
        stop = s.stop.unwrap_or(nil);
        let arity = callback_arity(env, r.flags, r.function);
        let mfa = (word_term(env, r.module), word_term(env, r.function), arity).encode(env);
        let call = if r.correlation_id != r.id {
            e(r.correlation_id.encode(env))
        } else {
            nil
        };
        let tid = if r.peer != 0 {
            e(r.peer.encode(env))
        } else {
            nil
        };
        (
            atoms::callback(),
            e(mfa),
            call,
            tid,
            trigger_message(env, store, r, scratch),
        )
    } else {
        let call = if r.parent_id != 0 {
            e(r.parent_id.encode(env))
        } else {
            nil
        };
        let k = if kind == EventKind::StateSnapshot {
            atoms::snapshot()
        } else {
            atoms::state_change_type()
        };
        (k, nil, call, nil, nil)
    };
    let truncated = [Some(*r), v.data, v.name]
        .iter()
        .flatten()
        .any(|x| x.flags & FLAG_TRUNCATED != 0);
    let opt_id = |x: Option<StoredEvent>| x.map_or(nil, |x| e(x.id.encode(env)));
    crate::event_term::make_struct_in(
        env,
        scratch,
        &STATE,
        &[
            e(atoms::analysis_state().encode(env)),
            actions,
            call_id,
            cb,
            e(r.id.encode(env)),
            e(kept.encode(env)),
            e(kind_atom.encode(env)),
            if r.module == 0 {
                nil
            } else {
                e(word_term(env, r.module))
            },
            name.unwrap_or(nil),
            e(word_term(env, r.pid)),
            reply,
            returned,
            opt_id(v.data),
            data.unwrap_or(nil),
            stop,
            e(r.timestamp.encode(env)),
            trigger,
            trigger_id,
            e(truncated.encode(env)),
            e(r.wall_time.encode(env)),
        ],
    )
}

/// Why a process has no state to report: `:not_traced` (no event of it
/// in the store) or `:no_state` (events, but no state record).
fn no_state_reason(store: &EventStore, pid: u64) -> Atom {
    if store.by_pid(pid, 1, Order::Desc).is_empty() {
        atoms::not_traced()
    } else {
        atoms::no_state()
    }
}

/// `ana_state_at(store, pid, ts)`: `{:ok, %State{}}` for the state of
/// `pid` in force at `ts`, or `{:error, reason}`: `:not_traced`,
/// `:no_state`, `:outside_trace` (before the first or after the last
/// stored event), `:before_first_state`, `:exited` (after the process's
/// exit), `:evicted`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_state_at<'a>(env: Env<'a>, s: Ref<StoreRes>, pid: Term<'a>, ts: i64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    // No size bound: always an answer.
    Ok(state_at_answer(env, &store, pid, ts, usize::MAX)
        .unwrap_or_else(|| (atoms::error(), atoms::busy()).encode(env)))
}

/// Payload bytes [`ana_state_at_fast`] decodes on a normal scheduler at
/// most (the record, the records its state comes from, its trigger).
const FAST_STATE_BYTES: usize = 16 * 1024;

/// `ana_state_at_fast(store, pid, ts)`: [`ana_state_at`] on a normal
/// scheduler, skipping the dirty-scheduler round trip, when the store's
/// lock is free at once and the answer decodes at most
/// [`FAST_STATE_BYTES`] (bounded work: a binary search, a walk back of at
/// most `MAX_STATE_WALK` records, one decode); `:busy` otherwise, and the
/// caller asks `ana_state_at`.
#[rustler::nif]
fn ana_state_at_fast<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    pid: Term<'a>,
    ts: i64,
) -> NifResult<Term<'a>> {
    let Some(store) = s.try_lock(env)? else {
        return Ok(atoms::busy().encode(env));
    };
    Ok(state_at_answer(env, &store, pid, ts, FAST_STATE_BYTES)
        .unwrap_or_else(|| atoms::busy().encode(env)))
}

/// The answer of `ana_state_at`; `None` when decoding it would take more
/// than `max_bytes` of payloads.
fn state_at_answer<'a>(
    env: Env<'a>,
    store: &EventStore,
    pid: Term<'a>,
    ts: i64,
    max_bytes: usize,
) -> Option<Term<'a>> {
    let p = term_key(pid);
    let err = |a: Atom| Some((atoms::error(), a).encode(env));
    match store.time_span() {
        Some((lo, hi)) if ts >= lo && ts <= hi => {}
        Some(_) => return err(atoms::outside_trace()),
        None => return err(atoms::not_traced()),
    }
    match store.state_at(p, ts) {
        StateAt::NoRecords => err(no_state_reason(store, p)),
        StateAt::Before => err(atoms::before_first_state()),
        StateAt::Evicted => err(atoms::evicted()),
        StateAt::Found(v) => {
            if let Some(last) = store.by_pid(p, 1, Order::Desc).first() {
                if last.kind == EventKind::ProcessExit as u8 && last.timestamp < ts {
                    return err(atoms::exited());
                }
            }
            let r = &v.record;
            let trigger = if r.peer != 0 {
                store.get(r.peer).map_or(0, |e| e.payload.len())
            } else {
                0
            };
            let bytes = [Some(*r), v.data, v.name]
                .iter()
                .flatten()
                .map(|e| e.payload.len())
                .sum::<usize>()
                + trigger;
            if bytes > max_bytes {
                return None;
            }
            let mut scratch = Scratch::new();
            let t = state_term(env, store, &v, &mut scratch, &mut Vec::new());
            Some((atoms::ok(), t).encode(env))
        }
    }
}

/// `ana_state_history(store, pid, t0, t1, limit)`: `{:ok, [%State{}]}`
/// oldest first, or `{:error, :not_traced | :no_state}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_state_history<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    pid: Term<'a>,
    t0: i64,
    t1: i64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let p = term_key(pid);
    let store = s.lock(env)?;
    let views = store.state_history(p, t0, t1, limit as usize);
    if views.is_empty() && store.state_processes().iter().all(|&(q, _)| q != p) {
        return Ok((atoms::error(), no_state_reason(&store, p)).encode(env));
    }
    let mut scratch = Scratch::for_call(env);
    let mut cache = StateCache::new();
    let out: Vec<ERL_NIF_TERM> = views
        .iter()
        .map(|v| state_term(env, &store, v, &mut scratch, &mut cache).as_c_arg())
        .collect();
    Ok((atoms::ok(), codec::make_list(env, &out)).encode(env))
}

/// `ana_add_state_gaps(store, gaps)`: `gaps` is `[{pid | :all, first_ts,
/// last_ts}]` (from `tracer_state_drops`): state records of that process
/// (`:all`: of every process with state records) stamped between the two
/// were lost, so state queries answer `{:error, :evicted}` for the times
/// they may have been in force. `:ok`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_add_state_gaps<'a>(env: Env<'a>, s: Ref<StoreRes>, gaps: Term<'a>) -> NifResult<Atom> {
    let mut parsed = Vec::new();
    for g in codec::proper_list(gaps).ok_or(rustler::Error::BadArg)? {
        let (who, lo, hi): (Term, i64, i64) = g.decode()?;
        let pid = if who.as_c_arg() == atoms::all().encode(env).as_c_arg() {
            None
        } else if who.is_pid() && codec::is_immediate(who.as_c_arg()) {
            Some(term_key(who))
        } else {
            return Err(rustler::Error::BadArg);
        };
        parsed.push((pid, lo, hi));
    }
    let mut store = s.lock(env)?;
    for (pid, lo, hi) in parsed {
        match pid {
            Some(p) => store.add_state_gap(p, lo, hi),
            None => {
                for (p, _) in store.state_processes() {
                    store.add_state_gap(p, lo, hi);
                }
            }
        }
    }
    Ok(atoms::ok())
}

/// `ana_state_processes(store)`: `[{pid, state_records}]`.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_state_processes<'a>(env: Env<'a>, s: Ref<StoreRes>) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let out: Vec<Term> = store
        .state_processes()
        .iter()
        .map(|&(p, n)| (word_term(env, p), n).encode(env))
        .collect();
    Ok(out.encode(env))
}

/// `ana_why(store, id)`: `[{role, %Entry{}}]` from the event back to the
/// root (see `elixir_scope_core::analysis::why`); `[]` for an unknown id.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_why<'a>(env: Env<'a>, s: Ref<StoreRes>, id: u64) -> NifResult<Term<'a>> {
    use elixir_scope_core::analysis::WhyRole;
    let store = s.lock(env)?;
    let chain = analysis::why(&store, id);
    let mut scratch = Scratch::for_call(env);
    let out: Vec<ERL_NIF_TERM> = chain
        .iter()
        .map(|(role, e)| {
            let r = match role {
                WhyRole::State => atoms::state(),
                WhyRole::Callback => atoms::callback(),
                WhyRole::Received => atoms::received(),
                WhyRole::Sent => atoms::sent(),
                WhyRole::Call => atoms::call(),
                WhyRole::Spawned => atoms::spawned(),
                WhyRole::PreviousState => atoms::previous_state(),
                WhyRole::Event => atoms::event(),
            };
            (r, entry_term(env, e, &mut scratch)).encode(env).as_c_arg()
        })
        .collect();
    Ok(codec::make_list(env, &out))
}

/// `ana_result(store, call_id)`: the return or exception that completed
/// call `call_id` (an `%Entry{}`), or nil.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_result<'a>(env: Env<'a>, s: Ref<StoreRes>, call_id: u64) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let done = store
        .by_correlation(call_id, 16, Order::Asc)
        .into_iter()
        .find(|e| {
            e.id != call_id
                && matches!(
                    EventKind::from_u8(e.kind),
                    EventKind::FunctionReturn | EventKind::FunctionException
                )
        });
    Ok(entry_or_nil(env, done))
}

/// `%ElixirScope.Analysis.State{}` keys in term order.
static STATE: crate::event_term::Shape = crate::event_term::Shape::new(17, || {
    vec![
        atoms::struct_(),
        atoms::actions(),
        atoms::call_id(),
        atoms::callback(),
        atoms::id(),
        atoms::kept(),
        atoms::kind(),
        atoms::module(),
        atoms::name(),
        atoms::pid(),
        atoms::reply(),
        atoms::returned(),
        atoms::source_id(),
        atoms::state(),
        atoms::stop(),
        atoms::timestamp(),
        atoms::trigger(),
        atoms::trigger_id(),
        atoms::truncated(),
        atoms::wall_time(),
    ]
});
