//! `sub_*` NIFs: live subscriptions to a pipeline's stored events
//! (`ElixirScope.Storage.QueryCoordinator`), over
//! `elixir_scope_core::subscribe`.
//!
//! A subscription is a resource (`SubRes`): the term `subscribe` returns as
//! the subscription's `ref`, and the one every message carries. The
//! pipeline's delivery thread (a plain Rust thread) sends
//! `{:elixir_scope_event, ref, correlated_map}` and
//! `{:elixir_scope_dropped, ref, n}` with `OwnedEnv::send_and_clear`, and
//! asks the pipeline's `QueryCoordinator` server (the "watcher") for the
//! subscriber's mailbox length with `{:elixir_scope_backlog, ref, pid,
//! sent}`; the watcher answers with `sub_backlog/3`.

use elixir_scope_core::filter::{type_bit, EventFilter};
use elixir_scope_core::subscribe::{Deliver, Gone, Hub, Matcher, Subscription};
use elixir_scope_core::{EventKind, StoredEvent};
use rustler::env::OwnedEnv;
use rustler::sys::ErlNifResourceType;
use rustler::types::map::map_new;
use rustler::{Atom, Encoder, Env, LocalPid, NifResult, Term};
use std::ffi::CStr;
use std::sync::atomic::AtomicPtr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::atoms;
use crate::codec::{self, Scratch, TapeDecoder};
use crate::error::{badarg, badarg_err};
use crate::handle::{self, Handle, Kept, Ref};
use crate::match_spec::MatchSpec;
use crate::pipe_nif::PipeRes;
use crate::store_nif::{correlated_term, term_key};

/// The pipeline's watcher process (its `QueryCoordinator` server).
pub type WatcherCell = Arc<Mutex<Option<LocalPid>>>;

/// A subscription handle.
pub struct SubRes {
    sub: Arc<Subscription>,
    hub: Weak<Hub>,
    watcher: WatcherCell,
}

static SUB_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for SubRes {
    const NAME: &'static CStr = c"elixir_scope_subscription";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &SUB_TYPE
    }
}

/// Sends a subscription's messages (delivery thread only).
struct Sender {
    pid: LocalPid,
    me: Kept<SubRes>,
    env: OwnedEnv,
    scratch: Scratch,
    watcher: WatcherCell,
}

impl Deliver for Sender {
    fn event(&mut self, e: &StoredEvent<'_>) -> Result<(), Gone> {
        let Sender {
            pid,
            me,
            env,
            scratch,
            ..
        } = self;
        env.send_and_clear(pid, |env| {
            let ev = correlated_term(env, e, scratch).unwrap_or_else(|_| atoms::nil().encode(env));
            scratch.clear();
            (atoms::elixir_scope_event(), me.term(env), ev).encode(env)
        })
        .map_err(|_| Gone)
    }

    fn dropped(&mut self, n: u64) -> Result<(), Gone> {
        let Sender { pid, me, env, .. } = self;
        env.send_and_clear(pid, |env| {
            (atoms::elixir_scope_dropped(), me.term(env), n).encode(env)
        })
        .map_err(|_| Gone)
    }

    fn ask_backlog(&mut self, sent: u64) {
        let w = *self.watcher.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = w {
            let Sender { pid, me, env, .. } = self;
            let _ = env.send_and_clear(&w, |env| {
                (atoms::elixir_scope_backlog(), me.term(env), *pid, sent).encode(env)
            });
        }
    }
}

/// A placeholder until the real sender exists (it needs the resource).
struct Nobody;

impl Deliver for Nobody {
    fn event(&mut self, _: &StoredEvent<'_>) -> Result<(), Gone> {
        Err(Gone)
    }
    fn dropped(&mut self, _: u64) -> Result<(), Gone> {
        Err(Gone)
    }
    fn ask_backlog(&mut self, _: u64) {}
}

/// The payload conditions of a filter: match specifications on a call's
/// arguments or a message, and a remote node.
struct Payload {
    args: Option<MatchSpec>,
    message: Option<MatchSpec>,
    /// Name of a remote node the event's process must be on.
    node: Option<Vec<u8>>,
}

/// The tape field holding the event's process, by kind.
fn process_field(kind: u8) -> Option<usize> {
    match EventKind::from_u8(kind) {
        EventKind::FunctionCall => Some(1),
        EventKind::ProcessSpawn
        | EventKind::ProcessExit
        | EventKind::ProcessLink
        | EventKind::MessageSend
        | EventKind::MessageReceive
        | EventKind::StateChange => Some(0),
        _ => None,
    }
}

/// The node name of a remote pid stored in external term format.
fn etf_pid_node(field: &[u8]) -> Option<&[u8]> {
    // T_ETF (6), u32 length, 131, NEW_PID_EXT (88) | PID_EXT (103), atom.
    if field.len() < 8 || field[0] != 6 || field[5] != 131 || !matches!(field[6], 88 | 103) {
        return None;
    }
    let a = &field[7..];
    let (len, at) = match *a.first()? {
        118 | 100 => (u16::from_be_bytes([*a.get(1)?, *a.get(2)?]) as usize, 3),
        119 | 115 => (*a.get(1)? as usize, 2),
        _ => return None,
    };
    a.get(at..at + len)
}

impl Matcher for Payload {
    fn matches(&self, e: &StoredEvent<'_>) -> bool {
        if let Some(ms) = &self.args {
            if e.kind != EventKind::FunctionCall as u8 || !ms.matches_field(e.payload, 0) {
                return false;
            }
        }
        if let Some(ms) = &self.message {
            let field = match EventKind::from_u8(e.kind) {
                EventKind::MessageSend => 2,
                EventKind::MessageReceive => 1,
                _ => return false,
            };
            if !ms.matches_field(e.payload, field) {
                return false;
            }
        }
        if let Some(node) = &self.node {
            let Some(f) = process_field(e.kind) else {
                return false;
            };
            let mut d = TapeDecoder::new(e.payload);
            let mut span = None;
            for _ in 0..=f {
                span = d.skip();
            }
            if span.and_then(etf_pid_node) != Some(node.as_slice()) {
                return false;
            }
        }
        true
    }
}

fn get<'a>(m: Term<'a>, k: &str) -> Option<Term<'a>> {
    let key = Atom::from_str(m.get_env(), k).ok()?;
    m.map_get(key)
        .ok()
        .filter(|v| !v.is_atom() || *v != atoms::nil().encode(m.get_env()))
}

fn spec(env: Env, m: Term, k: &str) -> NifResult<Option<MatchSpec>> {
    match get(m, k) {
        None => Ok(None),
        Some(t) => MatchSpec::compile(env, t)
            .map(Some)
            .map_err(|why| badarg_err(env, format!("filter :{k}: {why}"))),
    }
}

/// Integer field `k` of filter map `m` (nil or absent: `None`).
/// A non-negative integer field (`u64`) of the filter map, or `None`.
pub(crate) fn key_field(env: Env, m: Term, k: &str) -> NifResult<Option<u64>> {
    get(m, k)
        .map(|t| {
            t.decode::<u64>()
                .map_err(|_| badarg_err(env, format!("filter :{k} must be a non-negative integer")))
        })
        .transpose()
}

pub(crate) fn int_field(env: Env, m: Term, k: &str) -> NifResult<Option<i64>> {
    get(m, k)
        .map(|t| {
            t.decode::<i64>()
                .map_err(|_| badarg_err(env, format!("filter :{k} must be an integer")))
        })
        .transpose()
}

/// The filter map built by `QueryCoordinator` (validated there): `pid`,
/// `module`, `function` (terms or nil), `arity` (integer or nil), `types`
/// (a type-bit mask, 0: any), `correlation_id` (integer or nil),
/// `local_node` (boolean), `remote_node` (binary or nil), `args`,
/// `message` (match specifications or nil).
pub(crate) fn decode_filter(
    env: Env,
    m: Term,
) -> NifResult<(EventFilter, Option<Arc<dyn Matcher>>)> {
    if !m.is_map() {
        return badarg(env, "the filter must be a map");
    }
    let int = |k: &str| int_field(env, m, k);
    let mut f = EventFilter {
        pid: get(m, "pid").map(term_key),
        module: get(m, "module").map(term_key),
        function: get(m, "function").map(term_key),
        arity: int("arity")?,
        types: int("types")?.unwrap_or(0) as u64,
        correlation_id: int("correlation_id")?.map(|c| c as u64),
        local_process: get(m, "local_node").is_some_and(|t| t.decode::<bool>().unwrap_or(false)),
        ..EventFilter::default()
    };
    let args = spec(env, m, "args")?;
    let message = spec(env, m, "message")?;
    let node = match get(m, "remote_node") {
        None => None,
        Some(t) => Some(
            t.decode::<rustler::Binary>()
                .map_err(|_| badarg_err(env, "filter :remote_node must be a binary"))?
                .as_slice()
                .to_vec(),
        ),
    };
    // A payload condition narrows the types it can apply to.
    let narrow = |f: &mut EventFilter, bits: u64| {
        f.types = if f.types == 0 { bits } else { f.types & bits };
    };
    if args.is_some() {
        narrow(&mut f, type_bit(EventKind::FunctionCall as u8, 0));
    }
    if message.is_some() {
        narrow(
            &mut f,
            type_bit(EventKind::MessageSend as u8, 0)
                | type_bit(EventKind::MessageReceive as u8, 0),
        );
    }
    if f.types == 0 && (args.is_some() || message.is_some()) {
        // Contradictory types: match nothing (bit 63 is no event type).
        f.types = 1 << 63;
    }
    let matcher: Option<Arc<dyn Matcher>> = if args.is_some() || message.is_some() || node.is_some()
    {
        Some(Arc::new(Payload {
            args,
            message,
            node,
        }))
    } else {
        None
    };
    Ok((f, matcher))
}

/// Subscribe `pid` to the pipeline's stored events matching `filter`:
/// `{:ok, ref, id}` or `{:error, reason}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn sub_new<'a>(
    env: Env<'a>,
    p: Ref<PipeRes>,
    pid: Term<'a>,
    filter: Term<'a>,
    max_queue: u64,
) -> NifResult<Term<'a>> {
    let local: LocalPid = pid
        .decode()
        .map_err(|_| badarg_err(env, "the subscriber must be a local pid"))?;
    let (f, matcher) = decode_filter(env, filter)?;
    let (hub, watcher) = p.subscription_hub(env)?;
    let sub = Arc::new(Subscription::new(
        f,
        matcher,
        max_queue,
        codec::word(pid.as_c_arg()),
        Box::new(Nobody),
    ));
    let res = handle::make(
        env,
        SubRes {
            sub: Arc::clone(&sub),
            hub: Arc::downgrade(&hub),
            watcher: Arc::clone(&watcher),
        },
    );
    let me = handle::keep::<SubRes>(res).expect("a subscription resource");
    sub.set_deliver(Box::new(Sender {
        pid: local,
        me,
        env: OwnedEnv::new(),
        scratch: Scratch::new(),
        watcher,
    }));
    match hub.add(Arc::clone(&sub)) {
        Ok(()) => Ok((atoms::ok(), res, sub.id()).encode(env)),
        Err(why) => Ok((atoms::error(), why).encode(env)),
    }
}

fn sub_ref<'a>(env: Env<'a>, t: Term<'a>) -> NifResult<Ref<'a, SubRes>> {
    t.decode()
        .map_err(|_| badarg_err(env, "expected a subscription ref (from subscribe/3)"))
}

/// Cancel a subscription: `{removed?, id, watcher | nil}`.
#[rustler::nif(schedule = "DirtyCpu")]
fn sub_cancel<'a>(env: Env<'a>, r: Term<'a>) -> NifResult<Term<'a>> {
    let s = sub_ref(env, r)?;
    let removed = s.hub.upgrade().is_some_and(|h| h.remove(s.sub.id()));
    let w = *s.watcher.lock().unwrap_or_else(|p| p.into_inner());
    let w = match w {
        Some(w) => w.encode(env),
        None => atoms::nil().encode(env),
    };
    Ok((removed, s.sub.id(), w).encode(env))
}

/// Cancel subscription `id` of a pipeline (the watcher, on a subscriber's
/// exit): removed?
#[rustler::nif(schedule = "DirtyCpu")]
fn sub_cancel_id(env: Env, p: Ref<PipeRes>, id: u64) -> NifResult<bool> {
    let (hub, _) = p.subscription_hub(env)?;
    Ok(hub.remove(id))
}

/// The backlog answer: `len` messages were in the subscriber's mailbox,
/// measured after the request made when `sent` items had been sent.
#[rustler::nif]
fn sub_backlog<'a>(env: Env<'a>, r: Term<'a>, sent: u64, len: u64) -> NifResult<Atom> {
    sub_ref(env, r)?.sub.report_backlog(sent, len);
    Ok(atoms::ok())
}

fn stats_term<'a>(env: Env<'a>, sub: &Subscription) -> NifResult<Term<'a>> {
    let s = sub.stats();
    let mut m = map_new(env);
    for (k, v) in [
        ("id", sub.id()),
        ("matched", s.matched),
        ("delivered", s.delivered),
        ("dropped", s.dropped),
        ("queued", s.queued),
        ("drop_notices", s.drop_notices),
        ("backlog_estimate", s.backlog_estimate),
        ("backlog_reports", s.backlog_reports),
        ("max_queue", s.max_queue),
        ("latency_p50_ns", s.latency_p50_ns),
        ("latency_p99_ns", s.latency_p99_ns),
        ("latency_max_ns", s.latency_max_ns),
    ] {
        m = m.map_put(Atom::from_str(env, k)?, v)?;
    }
    // SAFETY: the owner word is the subscriber's local pid (an immediate).
    let pid = unsafe { Term::new(env, codec::from_word(sub.owner())) };
    m.map_put(Atom::from_str(env, "subscriber")?, pid)?
        .map_put(Atom::from_str(env, "active")?, s.active)
}

/// A subscription's counters (see `SubscriptionStats`).
#[rustler::nif(schedule = "DirtyCpu")]
fn sub_stats<'a>(env: Env<'a>, r: Term<'a>) -> NifResult<Term<'a>> {
    let s = sub_ref(env, r)?;
    stats_term(env, &s.sub)
}

/// The pipeline's subscriptions' counters.
#[rustler::nif(schedule = "DirtyCpu")]
fn sub_list<'a>(env: Env<'a>, p: Ref<PipeRes>) -> NifResult<Term<'a>> {
    let (hub, _) = p.subscription_hub(env)?;
    let mut out = Vec::new();
    for s in hub.list() {
        out.push(stats_term(env, &s)?);
    }
    Ok(out.encode(env))
}

/// Register the pipeline's watcher (its `QueryCoordinator` server).
#[rustler::nif(schedule = "DirtyCpu")]
fn sub_set_watcher(env: Env, p: Ref<PipeRes>, pid: LocalPid) -> NifResult<Atom> {
    let (_, cell) = p.subscription_hub(env)?;
    *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
    Ok(atoms::ok())
}

/// Wait until every notification admitted so far has been sent (up to
/// `timeout_ms`): true, or false on timeout.
#[rustler::nif(schedule = "DirtyIo")]
fn sub_flush(env: Env, p: Ref<PipeRes>, timeout_ms: u64) -> NifResult<bool> {
    let (hub, _) = p.subscription_hub(env)?;
    Ok(hub.flush(Duration::from_millis(timeout_ms.min(600_000))))
}
