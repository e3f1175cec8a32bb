//! `ana_*` NIFs: `ElixirScope.Analysis` over a store (usually a trace's
//! pipeline store). Results are `%ElixirScope.Analysis.Entry{}` records.
//! Every NIF takes the store lock and runs on a dirty CPU scheduler; the
//! whole-store passes (`ana_call_stats`, `ana_top_trees`) hold the lock for
//! the pass, the others for index walks only, and `ana_select` /
//! `ana_messages` work in resumable chunks.

use elixir_scope_core::analysis::{self, StatKey};
use elixir_scope_core::{call_contents, EventKind, EventStore, Order, StoredEvent};
use rustler::{Atom, Encoder, Env, NifResult, Term};

use crate::atoms;
use crate::codec::{self, Scratch};
use crate::error::badarg;
use crate::event_term::entry_term;
use crate::handle::Ref;
use crate::store_nif::{term_key, StoreRes};

/// Records one `ana_select` call visits at most (Elixir loops on the cursor).
const SELECT_CHUNK: usize = 50_000;

fn entries<'a>(env: Env<'a>, evs: &[StoredEvent]) -> Term<'a> {
    let mut scratch: Scratch = Vec::with_capacity(32);
    let out: Vec<_> = evs
        .iter()
        .map(|e| entry_term(env, e, &mut scratch).as_c_arg())
        .collect();
    codec::make_list(env, &out)
}

fn entry_or_nil<'a>(env: Env<'a>, e: Option<StoredEvent>) -> Term<'a> {
    match e {
        Some(e) => entry_term(env, &e, &mut Vec::new()),
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
    let Some(e) = store.get(id) else {
        return Ok(atoms::nil().encode(env));
    };
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
    Ok(entries(env, &chain))
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
    let store = s.lock(env)?;
    let r = analysis::call_stats(&store, key, &mods);
    drop(store);
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
    let store = s.lock(env)?;
    let r = analysis::top_call_trees(&store, max as usize, min_count, min_size);
    drop(store);
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
    s: Ref<StoreRes>,
    pid: Term<'a>,
    cursor: u64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let p = opt_key(env, pid).unwrap_or(0);
    let store: std::sync::MutexGuard<'_, EventStore> = s.lock(env)?;
    let (flows, next) = analysis::message_flow(&store, p, cursor, (limit as usize).max(1));
    let mut scratch: Scratch = Vec::with_capacity(32);
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
    Ok((out, next).encode(env))
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
#[allow(clippy::too_many_arguments)]
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_select<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    cursor: u64,
    pid: Term<'a>,
    module: Term<'a>,
    function: Term<'a>,
    kinds: u64,
    t0: i64,
    t1: i64,
) -> NifResult<Term<'a>> {
    let filter = Filter::new(env, pid, module, function, kinds);
    let store = s.lock(env)?;
    let mut hits: Vec<StoredEvent> = Vec::new();
    let next = store.scan(cursor, SELECT_CHUNK, |e| {
        if filter.matches(e) && (t0..=t1).contains(&e.timestamp) {
            hits.push(*e);
        }
    });
    Ok((entries(env, &hits), next).encode(env))
}

/// One chunk of a filtered walk of the time window `after_ts..=t1`
/// through the time index, in `(timestamp, seq)` order, after the event at
/// `(after_ts, after_seq)` (`after_seq` -1: from `after_ts` on):
/// `{entries, {last_ts, last_seq} | nil}`. Filters as `ana_select`.
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
) -> NifResult<Term<'a>> {
    let filter = Filter::new(env, pid, module, function, kinds);
    let store = s.lock(env)?;
    let after = (after_ts, after_seq);
    let mut want = SELECT_CHUNK;
    let (page, full) = loop {
        let page = store.by_time_range(after_ts, t1, want, Order::Asc);
        let full = page.len() == want;
        let fresh: Vec<StoredEvent> = page
            .into_iter()
            .filter(|e| (e.timestamp, e.seq as i64) > after)
            .collect();
        // A page of events all tied at or before the cursor: widen it.
        if fresh.is_empty() && full {
            want *= 4;
            continue;
        }
        break (fresh, full);
    };
    let next = if full {
        page.last().map(|e| (e.timestamp, e.seq as i64))
    } else {
        None
    };
    let hits: Vec<StoredEvent> = page.into_iter().filter(|e| filter.matches(e)).collect();
    Ok((entries(env, &hits), next).encode(env))
}
