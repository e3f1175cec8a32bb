//! `qry_*` NIFs: `QueryCoordinator.query/2` and `correlation_search/3`
//! over any store (`elixir_scope_core::query`). Both take the store lock
//! and run on a dirty CPU scheduler; a query that scans visits at most
//! [`SCAN_BUDGET`] records per call (Elixir continues from the cursor).

use elixir_scope_core::query::{self, Plan, Query};
use elixir_scope_core::subscribe::Matcher;
use elixir_scope_core::StoredEvent;
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, NifResult, Term};

use crate::atoms;
use crate::codec::{self, Scratch};
use crate::error::badarg;
use crate::event_term::entry_term;
use crate::handle::Ref;
use crate::store_nif::{correlated_term, order_of, stored_term, StoreRes};
use crate::sub_nif::decode_filter;

/// Records one scanning call visits at most.
pub const SCAN_BUDGET: usize = 50_000;

/// How results are returned.
#[derive(Clone, Copy)]
enum As {
    Correlated,
    Event,
    Entry,
}

fn as_of(env: Env, a: Atom) -> NifResult<As> {
    if a == atoms::correlated() {
        Ok(As::Correlated)
    } else if a == atoms::event() {
        Ok(As::Event)
    } else if a == atoms::entry() {
        Ok(As::Entry)
    } else {
        badarg(env, "as must be :correlated, :event or :entry")
    }
}

fn term_of<'a>(
    env: Env<'a>,
    e: &StoredEvent,
    how: As,
    scratch: &mut Scratch,
) -> NifResult<Term<'a>> {
    Ok(match how {
        As::Correlated => correlated_term(env, e, scratch)?,
        As::Event => stored_term(env, e, scratch),
        As::Entry => entry_term(env, e, scratch),
    })
}

fn plan_atom(p: Plan) -> Atom {
    match p {
        Plan::Correlation => atoms::correlation(),
        Plan::LinkedTo => atoms::linked_to(),
        Plan::Pid => atoms::pid(),
        Plan::Function => atoms::function(),
        Plan::EventType => atoms::event_type(),
        Plan::AstNode => atoms::ast_node(),
        Plan::Time => atoms::time(),
        Plan::Scan => atoms::scan(),
    }
}

/// One page: `{results, next_cursor | nil, plan, estimate}`. The filter map
/// is the subscription filter's (see `sub_nif`) plus `linked_to`, `from`,
/// `to` (integers or nil) and `event_type`, `ast_node` (index keys of
/// records stored as terms, non-negative integers, or nil).
#[rustler::nif(schedule = "DirtyCpu")]
#[allow(clippy::too_many_arguments)]
fn qry_query<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    filter: Term<'a>,
    desc: bool,
    limit: u64,
    cursor: Term<'a>,
    how: Atom,
) -> NifResult<Term<'a>> {
    let how = as_of(env, how)?;
    let (q, matcher) = decode_query(env, filter, desc, limit, cursor)?;
    let store = s.lock(env)?;
    let m: Option<&dyn Matcher> = matcher.as_deref();
    let page = query::query(&store, &q, m);
    page_term(env, &page, how)
}

/// The query of `qry_query`'s arguments, with its payload matcher.
#[allow(clippy::type_complexity)]
fn decode_query<'a>(
    env: Env<'a>,
    filter: Term<'a>,
    desc: bool,
    limit: u64,
    cursor: Term<'a>,
) -> NifResult<(Query, Option<std::sync::Arc<dyn Matcher>>)> {
    let (mut f, matcher) = decode_filter(env, filter)?;
    let int = |k: &str| -> NifResult<Option<i64>> { crate::sub_nif::int_field(env, filter, k) };
    f.linked_to = int("linked_to")?.map(|v| v as u64);
    f.from_ts = int("from")?;
    f.to_ts = int("to")?;
    f.event_type = crate::sub_nif::key_field(env, filter, "event_type")?;
    f.ast_node = crate::sub_nif::key_field(env, filter, "ast_node")?;
    let cursor = if cursor.is_atom() {
        None
    } else {
        Some(cursor.decode::<u64>().map_err(|_| {
            crate::error::badarg_err(env, "cursor must be nil or a cursor from a previous page")
        })?)
    };
    let q = Query {
        filter: f,
        order: order_of(desc),
        limit: limit.min(1 << 24) as usize,
        cursor,
        budget: SCAN_BUDGET,
    };
    Ok((q, matcher))
}

/// `{results, next_cursor | nil, plan, estimate}` of a page.
fn page_term<'a>(env: Env<'a>, page: &query::Page, how: As) -> NifResult<Term<'a>> {
    let mut scratch = Scratch::for_call(env);
    let mut out = Vec::with_capacity(page.events.len());
    for e in &page.events {
        out.push(term_of(env, e, how, &mut scratch)?.as_c_arg());
    }
    let list = codec::make_list(env, &out);
    let next = match page.next {
        Some(n) => n.encode(env),
        None => atoms::nil().encode(env),
    };
    Ok((list, next, plan_atom(page.plan), page.estimate as u64).encode(env))
}

/// Most records a [`qry_query_quick`] plan may visit, results it may
/// return and payload bytes it may decode: well under a millisecond.
const QUICK_MAX_VISITS: usize = 4_000;
const QUICK_MAX_EVENTS: usize = 2_000;
const QUICK_MAX_BYTES: usize = 512 << 10;

/// [`qry_query`] on the caller's scheduler: the same page, or `:busy`
/// when the store lock is held, the plan is a scan or would visit more
/// than [`QUICK_MAX_VISITS`] records, or the page is too big (the caller
/// then runs [`qry_query`]). Saves the dirty-scheduler round trip of
/// small indexed queries.
#[rustler::nif]
#[allow(clippy::too_many_arguments)]
fn qry_query_quick<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    filter: Term<'a>,
    desc: bool,
    limit: u64,
    cursor: Term<'a>,
    how: Atom,
) -> NifResult<Term<'a>> {
    let busy = || Ok(atoms::busy().encode(env));
    if limit as usize > QUICK_MAX_EVENTS {
        return busy();
    }
    // Malformed arguments: the dirty NIF gives the error.
    let Ok(how) = as_of(env, how) else {
        return busy();
    };
    let Ok(q) = decode_query(env, filter, desc, limit, cursor) else {
        return busy();
    };
    let (q, matcher) = q;
    let Some(store) = s.try_lock(env)? else {
        return busy();
    };
    let (plan, estimate) = query::plan(&store, &q);
    if plan == Plan::Scan || estimate > QUICK_MAX_VISITS {
        return busy();
    }
    let m: Option<&dyn Matcher> = matcher.as_deref();
    let page = query::run(&store, &q, m, plan, estimate);
    let bytes: usize = page.events.iter().map(|e| e.payload.len()).sum();
    if page.events.len() > QUICK_MAX_EVENTS || bytes > QUICK_MAX_BYTES {
        return busy();
    }
    rustler::schedule::consume_timeslice(env, (page.events.len() / 40).clamp(1, 100) as i32);
    page_term(env, &page, how)
}

/// `correlation_search`: a map of correlated maps (see `Related`).
#[rustler::nif(schedule = "DirtyCpu")]
fn qry_related<'a>(
    env: Env<'a>,
    s: Ref<StoreRes>,
    id: u64,
    depth: u64,
    limit: u64,
) -> NifResult<Term<'a>> {
    let store = s.lock(env)?;
    let r = query::correlation_search(
        &store,
        id,
        depth.min(4096) as usize,
        limit.min(1 << 24) as usize,
    );
    let Some(ev) = r.event else {
        return Ok((atoms::error(), atoms::not_found()).encode(env));
    };
    let mut scratch = Scratch::for_call(env);
    let nil = atoms::nil().encode(env);
    let one = |e: Option<StoredEvent>, scratch: &mut Scratch| -> NifResult<Term<'a>> {
        match e {
            Some(e) => correlated_term(env, &e, scratch),
            None => Ok(nil),
        }
    };
    let list = |v: &[StoredEvent], scratch: &mut Scratch| -> NifResult<Term<'a>> {
        let mut out = Vec::with_capacity(v.len());
        for e in v {
            out.push(correlated_term(env, e, scratch)?.as_c_arg());
        }
        Ok(codec::make_list(env, &out))
    };
    let event = one(Some(ev), &mut scratch)?;
    let call = one(r.call, &mut scratch)?;
    let ret = one(r.ret, &mut scratch)?;
    let ancestors = list(&r.ancestors, &mut scratch)?;
    let inside = list(&r.inside, &mut scratch)?;
    let states = list(&r.state_changes, &mut scratch)?;
    let mut msgs = Vec::with_capacity(r.messages.len());
    for (snd, rcv, in_call) in &r.messages {
        let m = map_new(env)
            .map_put(atoms::send(), one(Some(*snd), &mut scratch)?)?
            .map_put(atoms::receive(), one(*rcv, &mut scratch)?)?
            .map_put(atoms::receiver_call(), one(*in_call, &mut scratch)?)?;
        msgs.push(m.as_c_arg());
    }
    let m = map_new(env)
        .map_put(atoms::event(), event)?
        .map_put(atoms::call(), call)?
        .map_put(atoms::return_(), ret)?
        .map_put(atoms::ancestors(), ancestors)?
        .map_put(atoms::inside(), inside)?
        .map_put(atoms::messages(), codec::make_list(env, &msgs))?
        .map_put(atoms::state_changes(), states)?
        .map_put(atoms::truncated(), r.truncated)?;
    Ok((atoms::ok(), m).encode(env))
}
