//! Multi-dimensional queries over an [`EventStore`], planned on the most
//! selective index, and correlation search.
//!
//! # Queries
//!
//! A [`Query`] is an [`EventFilter`] (any combination of process, function,
//! arity, types, correlation id, linked-to and time window) with an order,
//! a limit and a cursor. Results are in store (`seq`) order — each
//! process's event order — ascending or descending, whichever index is
//! used, so pages do not depend on the plan. The cursor is the `seq` of the
//! last event of the previous page (exclusive).
//!
//! The planner ([`plan`]) estimates how many events each usable index
//! would visit and walks the smallest:
//!
//! | plan | used for | estimate |
//! |---|---|---|
//! | [`Plan::Correlation`] | `correlation_id` | the id's chain (a few events) |
//! | [`Plan::LinkedTo`] | `linked_to` | the target's children and correlation chains |
//! | [`Plan::Pid`] | `pid` | the process's chain, counted up to [`SAMPLE`] steps then extrapolated from its density |
//! | [`Plan::Function`] | `module` + `function` | the same, on the function's chain |
//! | [`Plan::EventType`] | `event_type` (terms) | the same, on the event type's chain |
//! | [`Plan::AstNode`] | `ast_node` | the same, on the AST node's chain |
//! | [`Plan::Time`] | a time window | records of the window in each segment (binary searches) |
//! | [`Plan::Scan`] | anything else | every live event, visited in chunks |
//!
//! A chain or window plan whose estimate exceeds a quarter of the store is
//! replaced by the scan (which can be resumed in chunks; the others run in
//! one go). Chains are walked newest first: a descending page stops after
//! `limit` matches, an ascending one walks down to the cursor. A window is
//! collected whole and sorted by `seq`.

use crate::event::{is_state_record, peer_is_event, EventKind};
use crate::filter::EventFilter;
use crate::store::{EventStore, Order, StoredEvent};
use crate::subscribe::Matcher;
use std::collections::VecDeque;

/// Events of the receiving process looked at for the callback a receive
/// triggered.
const TRIGGER_STEPS: usize = 4;

/// Chain steps walked to estimate a chain's length.
pub const SAMPLE: usize = 256;

/// One query (see the module documentation).
#[derive(Clone, Copy, Debug)]
pub struct Query {
    /// What to match.
    pub filter: EventFilter,
    /// Store order, oldest first or newest first.
    pub order: Order,
    /// Most events returned.
    pub limit: usize,
    /// Exclusive `seq` bound: continue after (`Asc`) or before (`Desc`) it.
    pub cursor: Option<u64>,
    /// Most records a scan visits in this call.
    pub budget: usize,
}

/// The index a query walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The correlation id chain.
    Correlation,
    /// The linked-to target's parent and correlation chains.
    LinkedTo,
    /// The process chain.
    Pid,
    /// The function chain.
    Function,
    /// The event-type chain (records stored whole as terms).
    EventType,
    /// The AST-node chain.
    AstNode,
    /// The time index.
    Time,
    /// Every live event in store order.
    Scan,
}

/// One page of results.
#[derive(Debug)]
pub struct Page<'s> {
    /// The matching events, in the requested order.
    pub events: Vec<StoredEvent<'s>>,
    /// Where to continue (exclusive `seq`), `None` when nothing is left.
    pub next: Option<u64>,
    /// The plan used.
    pub plan: Plan,
    /// The planner's estimate of the records the plan visits.
    pub estimate: usize,
}

fn estimate_chain(
    store: &EventStore,
    walk: impl FnOnce(&mut dyn FnMut(&StoredEvent<'_>) -> bool),
) -> usize {
    let mut n = 0usize;
    let mut first = None;
    let mut last = 0;
    walk(&mut |e| {
        first.get_or_insert(e.seq);
        last = e.seq;
        n += 1;
        n < SAMPLE
    });
    match first {
        None => 0,
        Some(head) if n >= SAMPLE => {
            // Extrapolate the sampled density over the retained span.
            let (base, _) = store.seq_range();
            let span = (head - last + 1) as f64;
            let whole = (head.saturating_sub(base) + 1) as f64;
            ((n as f64) * whole / span).ceil() as usize
        }
        Some(_) => n,
    }
}

/// The plan for `q` and its estimate.
pub fn plan(store: &EventStore, q: &Query) -> (Plan, usize) {
    let f = &q.filter;
    if let Some(c) = f.correlation_id {
        return (
            Plan::Correlation,
            store.by_correlation(c, SAMPLE, Order::Desc).len(),
        );
    }
    if f.linked_to.is_some() {
        return (Plan::LinkedTo, 2);
    }
    let total = store.len();
    let mut best = (Plan::Scan, total);
    if let Some(pid) = f.pid {
        let est = estimate_chain(store, |g| store.walk_pid(pid, |e| g(&e)));
        if est < best.1 {
            best = (Plan::Pid, est);
        }
    }
    if let (Some(m), Some(fun)) = (f.module, f.function) {
        let est = estimate_chain(store, |g| store.walk_function(m, fun, |e| g(&e)));
        if est < best.1 {
            best = (Plan::Function, est);
        }
    }
    if let Some(t) = f.event_type {
        let est = estimate_chain(store, |g| store.walk_event_type(t, |e| g(&e)));
        if est < best.1 {
            best = (Plan::EventType, est);
        }
    }
    if let Some(a) = f.ast_node {
        let est = estimate_chain(store, |g| store.walk_ast_node(a, |e| g(&e)));
        if est < best.1 {
            best = (Plan::AstNode, est);
        }
    }
    if f.from_ts.is_some() || f.to_ts.is_some() {
        let est =
            store.count_time_range(f.from_ts.unwrap_or(i64::MIN), f.to_ts.unwrap_or(i64::MAX));
        if est < best.1 {
            best = (Plan::Time, est);
        }
    }
    // Unchunked plans only when they are clearly selective.
    if best.0 != Plan::Scan && best.1 > total / 4 + SAMPLE {
        best = (Plan::Scan, total);
    }
    best
}

/// Is `seq` on the wanted side of the cursor?
#[inline]
fn after_cursor(q: &Query, seq: u64) -> bool {
    match (q.cursor, q.order) {
        (None, _) => true,
        (Some(c), Order::Asc) => seq > c,
        (Some(c), Order::Desc) => seq < c,
    }
}

/// Does `e` match the filter and the payload matcher?
#[inline]
fn wanted(q: &Query, extra: Option<&dyn Matcher>, e: &StoredEvent<'_>) -> bool {
    q.filter.matches(e) && extra.map_or(true, |m| m.matches(e))
}

/// Keeps a sorted candidate list's page: cursor, filter, order, limit.
fn page_of<'s>(
    mut cands: Vec<StoredEvent<'s>>,
    q: &Query,
    extra: Option<&dyn Matcher>,
    plan: Plan,
    estimate: usize,
) -> Page<'s> {
    cands.retain(|e| after_cursor(q, e.seq) && wanted(q, extra, e));
    cands.sort_unstable_by_key(|e| e.seq);
    cands.dedup_by_key(|e| e.seq);
    if q.order == Order::Desc {
        cands.reverse();
    }
    let more = cands.len() > q.limit;
    cands.truncate(q.limit);
    let next = if more {
        cands.last().map(|e| e.seq)
    } else {
        None
    };
    Page {
        events: cands,
        next,
        plan,
        estimate,
    }
}

/// Runs `q` on the plan [`plan`] picks; `extra` (a payload matcher) must
/// match too.
pub fn query<'s>(store: &'s EventStore, q: &Query, extra: Option<&dyn Matcher>) -> Page<'s> {
    let (plan, estimate) = plan(store, q);
    run(store, q, extra, plan, estimate)
}

/// Runs `q` on a given plan (any plan gives the same answer; tests compare
/// them).
pub fn run<'s>(
    store: &'s EventStore,
    q: &Query,
    extra: Option<&dyn Matcher>,
    plan: Plan,
    estimate: usize,
) -> Page<'s> {
    let f = &q.filter;
    if q.limit == 0 {
        return Page {
            events: Vec::new(),
            next: None,
            plan,
            estimate,
        };
    }
    match plan {
        Plan::Correlation => {
            let c = f.correlation_id.unwrap_or(0);
            page_of(
                store.by_correlation(c, usize::MAX, Order::Asc),
                q,
                extra,
                plan,
                estimate,
            )
        }
        Plan::LinkedTo => {
            let t = f.linked_to.unwrap_or(0);
            let mut cands = store.children(t, usize::MAX);
            cands.extend(store.by_correlation(t, usize::MAX, Order::Asc));
            page_of(cands, q, extra, plan, estimate)
        }
        Plan::Time => {
            let evs = store.by_time_range(
                f.from_ts.unwrap_or(i64::MIN),
                f.to_ts.unwrap_or(i64::MAX),
                usize::MAX,
                Order::Asc,
            );
            page_of(evs, q, extra, plan, estimate)
        }
        Plan::Pid | Plan::Function | Plan::EventType | Plan::AstNode => {
            // Sized once (#15c): growing it re-copied the page and faulted
            // in fresh pages on every query.
            let mut out: VecDeque<StoredEvent<'s>> =
                VecDeque::with_capacity(q.limit.saturating_add(1).min(4097));
            let mut more = false;
            let mut visit = |e: StoredEvent<'s>| -> bool {
                match (q.order, q.cursor) {
                    (Order::Desc, Some(c)) if e.seq >= c => return true,
                    (Order::Asc, Some(c)) if e.seq <= c => return false,
                    _ => {}
                }
                if wanted(q, extra, &e) {
                    if out.len() == q.limit {
                        more = true;
                        if q.order == Order::Desc {
                            return false;
                        }
                        // Ascending: keep the oldest `limit`.
                        out.pop_front();
                    }
                    out.push_back(e);
                }
                true
            };
            match plan {
                Plan::Pid => store.walk_pid(f.pid.unwrap_or(0), &mut visit),
                Plan::EventType => store.walk_event_type(f.event_type.unwrap_or(0), &mut visit),
                Plan::AstNode => store.walk_ast_node(f.ast_node.unwrap_or(0), &mut visit),
                _ => {
                    store.walk_function(f.module.unwrap_or(0), f.function.unwrap_or(0), &mut visit)
                }
            }
            let mut events: Vec<StoredEvent<'s>> = out.into_iter().collect();
            if q.order == Order::Asc {
                events.reverse();
            }
            let next = if more {
                events.last().map(|e| e.seq)
            } else {
                None
            };
            Page {
                events,
                next,
                plan,
                estimate,
            }
        }
        Plan::Scan => {
            let mut events = Vec::new();
            let mut last_match = None;
            let mut visit = |e: &StoredEvent<'s>| -> bool {
                if events.len() >= q.limit {
                    return false;
                }
                if wanted(q, extra, e) {
                    last_match = Some(e.seq);
                    events.push(*e);
                }
                true
            };
            let stopped = match q.order {
                Order::Asc => store.scan_from(q.cursor.map_or(0, |c| c + 1), q.budget, &mut visit),
                Order::Desc => store.scan_back(q.cursor.unwrap_or(u64::MAX), q.budget, &mut visit),
            };
            // Full page: continue after its last event; budget spent:
            // continue where the scan stopped.
            let next = if events.len() >= q.limit {
                last_match
            } else {
                stopped
            };
            Page {
                events,
                next,
                plan,
                estimate,
            }
        }
    }
}

// ---- correlation search -------------------------------------------------------

/// Everything related to one event (see [`correlation_search`]).
#[derive(Debug, Default)]
pub struct Related<'s> {
    /// The event.
    pub event: Option<StoredEvent<'s>>,
    /// The call it belongs to: itself for a call, the completed call for a
    /// return or exception, else the enclosing call.
    pub call: Option<StoredEvent<'s>>,
    /// That call's return or exception.
    pub ret: Option<StoredEvent<'s>>,
    /// The call's callers, nearest first, at most `depth`.
    pub ancestors: Vec<StoredEvent<'s>>,
    /// What happened inside the call (or, outside any call, what the event
    /// caused), `depth` levels of nested calls down, in store order: calls
    /// and their returns, sends, receives, spawns, state changes.
    pub inside: Vec<StoredEvent<'s>>,
    /// Messages sent by the event or inside the call: (send, its receive,
    /// the call the receiver was in, or the OTP callback the receive
    /// triggered).
    pub messages: Vec<(
        StoredEvent<'s>,
        Option<StoredEvent<'s>>,
        Option<StoredEvent<'s>>,
    )>,
    /// State records made by the event, the call or inside it: state
    /// changes, snapshots and the returns of OTP callbacks (the state they
    /// left).
    pub state_changes: Vec<StoredEvent<'s>>,
    /// True when `limit` cut the search short.
    pub truncated: bool,
}

fn is_exit(kind: u8) -> bool {
    kind == EventKind::FunctionReturn as u8 || kind == EventKind::FunctionException as u8
}

/// Everything related to event `id` in one call: its call and return, the
/// callers, what happened inside (`depth` levels of nested calls), the
/// messages sent in there with their receives and the receiving calls,
/// and the state changes. At most `limit` events in `inside`; cost: the
/// size of the answer (index walks).
pub fn correlation_search(store: &EventStore, id: u64, depth: usize, limit: usize) -> Related<'_> {
    let mut r = Related::default();
    let Some(e) = store.get(id) else {
        return r;
    };
    r.event = Some(e);
    let kind = EventKind::from_u8(e.kind);
    r.call = match kind {
        EventKind::FunctionCall => Some(e),
        _ if is_exit(e.kind) && e.correlation_id != e.id => store.get(e.correlation_id),
        _ if e.parent_id != 0 => store.get(e.parent_id),
        _ => None,
    };
    if let Some(c) = r.call {
        r.ret = store
            .by_correlation(c.id, 16, Order::Asc)
            .into_iter()
            .find(|x| x.id != c.id && is_exit(x.kind));
        let mut p = c.parent_id;
        while p != 0 && r.ancestors.len() < depth {
            let Some(a) = store.get(p) else { break };
            r.ancestors.push(a);
            p = a.parent_id;
        }
    }
    // What happened inside: breadth first down the parent index.
    let root = r.call.map_or(e.id, |c| c.id);
    let mut level = vec![root];
    'levels: for _ in 0..depth.max(1) {
        let mut next = Vec::new();
        for p in level {
            for x in store.children(p, limit.saturating_sub(r.inside.len()) + 1) {
                if r.inside.len() >= limit {
                    r.truncated = true;
                    break 'levels;
                }
                if x.kind == EventKind::FunctionCall as u8 {
                    next.push(x.id);
                    if let Some(ret) = store
                        .by_correlation(x.id, 16, Order::Asc)
                        .into_iter()
                        .find(|y| y.id != x.id && is_exit(y.kind))
                    {
                        r.inside.push(ret);
                    }
                }
                r.inside.push(x);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    r.inside.sort_unstable_by_key(|x| x.seq);
    r.inside.dedup_by_key(|x| x.seq);
    let sources: Vec<StoredEvent<'_>> = std::iter::once(e)
        .chain(r.inside.iter().copied())
        .chain(r.ret)
        .collect();
    for x in &sources {
        match EventKind::from_u8(x.kind) {
            EventKind::MessageSend => {
                let recv = store
                    .by_correlation(x.id, 16, Order::Asc)
                    .into_iter()
                    .find(|y| y.kind == EventKind::MessageReceive as u8);
                // The call the receiver was in, else the OTP callback the
                // receive triggered (its call records the receive's id).
                let in_call = recv.and_then(|y| {
                    if y.parent_id != 0 {
                        return store.get(y.parent_id);
                    }
                    let mut cur = y;
                    for _ in 0..TRIGGER_STEPS {
                        cur = store.pid_next(cur.id)?;
                        if cur.kind == EventKind::FunctionCall as u8
                            && peer_is_event(cur.kind, cur.flags)
                            && cur.peer == y.id
                        {
                            return Some(cur);
                        }
                    }
                    None
                });
                if !r.messages.iter().any(|m| m.0.seq == x.seq) {
                    r.messages.push((*x, recv, in_call));
                }
            }
            _ if is_state_record(x.kind, x.flags)
                && !r.state_changes.iter().any(|s| s.seq == x.seq) =>
            {
                r.state_changes.push(*x)
            }
            _ => {}
        }
    }
    r.state_changes.sort_unstable_by_key(|x| x.seq);
    r
}
