//! Live subscriptions: each newly stored event that matches a subscriber's
//! filter is handed to that subscriber, in store order, from one delivery
//! thread per [`Hub`] (per pipeline).
//!
//! # Path of a notification
//!
//! The pipeline's stage ([`crate::pipeline::Engine::process`]) calls
//! [`Hub::dispatch`] right after a batch is inserted, still under the store
//! lock, so admissions happen in store order (per-process order included)
//! whichever worker stored the batch. With no subscriber `dispatch` is one
//! relaxed load. Otherwise each stored event is checked against the union of
//! the subscribers' type masks, then against each subscriber's
//! [`EventFilter`] and optional payload [`Matcher`]; a match is copied into
//! the subscriber's queue and the delivery thread is woken. The delivery
//! thread hands queued items to the subscriber's [`Deliver`] (the binding
//! sends a message) outside every pipeline lock.
//!
//! # Bounded backlog
//!
//! A subscriber's backlog is what it was handed and has not consumed yet
//! (for the binding: messages in its mailbox) plus what waits in its queue.
//! The hub cannot see consumption, so it keeps an upper bound
//! `estimate = admitted + offset`, where `admitted` counts every item ever
//! queued and `offset` comes from the last [`Subscription::report_backlog`]
//! (`backlog - sent_at_request`: the backlog read after the request, minus
//! the items handed over when it was asked). Items handed over before the
//! request are either consumed or in that backlog; later ones are counted in
//! `admitted`; so the estimate never undercounts. An event is admitted while
//! `estimate < max_queue`, else dropped and counted; a run of drops leaves
//! one [`Item::Dropped`] notice in the queue at the place of the gap (it
//! counts as an item and may take one slot past the bound; drops that find
//! no room for a notice wait and join the next one), so the subscriber
//! learns of them in order. The
//! delivery thread asks for a backlog report ([`Deliver::ask_backlog`]) when
//! the estimate reaches half of `max_queue`, at most once per
//! [`ASK_RETRY`] while unanswered. Memory per subscriber is therefore at
//! most `max_queue + 1` queued or handed-over items, and the pipeline never
//! waits for a subscriber.
//!
//! A subscriber whose [`Deliver`] reports it gone is removed.

use crate::event::Event;
use crate::filter::{type_bit, EventFilter};
use crate::pipeline::{Clock, Histogram};
use crate::store::{CorrelationFields, StoredEvent};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest accepted `max_queue`.
pub const MAX_QUEUE_LIMIT: u64 = 1 << 24;
/// How long an unanswered backlog request waits before it is repeated.
pub const ASK_RETRY: Duration = Duration::from_millis(100);
/// Longest the delivery thread sleeps without being woken (it then checks
/// unanswered backlog requests).
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// Most items the delivery thread takes from one queue before moving on to
/// the next subscriber.
const TAKE_MAX: usize = 4096;

/// A predicate over a stored event's payload (the binding's match
/// specifications), checked after the header filter.
pub trait Matcher: Send + Sync {
    /// Does the event match?
    fn matches(&self, e: &StoredEvent<'_>) -> bool;
}

/// The subscriber was gone when the item was handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Hands items to one subscriber; called on the delivery thread only.
pub trait Deliver: Send {
    /// One stored event, with its correlation fields.
    fn event(&mut self, e: &StoredEvent<'_>) -> Result<(), Gone>;
    /// `n` events were dropped here.
    fn dropped(&mut self, n: u64) -> Result<(), Gone>;
    /// Please measure the subscriber's backlog and answer with
    /// [`Subscription::report_backlog`]`(sent, backlog)`.
    fn ask_backlog(&mut self, sent: u64);
}

/// A queued item.
#[derive(Debug)]
pub enum Item {
    /// A stored event: the event (with the `aux` stored), its correlation
    /// fields and its store sequence number.
    Event(Event, CorrelationFields, u64),
    /// This many events were dropped at this point.
    Dropped(u64),
}

/// A subscription's queue: items in order, and drops not yet placed in a
/// notice (no room for one).
#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    pending: u64,
}

/// Counters of one subscription.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// Stored events that matched the filter.
    pub matched: u64,
    /// Of those, events handed to the subscriber.
    pub delivered: u64,
    /// Of those, events dropped because the backlog was full.
    pub dropped: u64,
    /// Events waiting in the queue (`matched = delivered + dropped +
    /// queued`).
    pub queued: u64,
    /// Drop notices handed over.
    pub drop_notices: u64,
    /// The backlog upper bound (queued + handed over, not known consumed).
    pub backlog_estimate: u64,
    /// Backlog reports received.
    pub backlog_reports: u64,
    /// The bound.
    pub max_queue: u64,
    /// Write → handed-over latency percentiles (ns).
    pub latency_p50_ns: u64,
    /// 99th percentile.
    pub latency_p99_ns: u64,
    /// Largest bucket reached (ns, upper bound).
    pub latency_max_ns: u64,
    /// Is it still registered?
    pub active: bool,
}

/// One subscriber: its filter, bounded queue, counters and deliverer.
pub struct Subscription {
    id: u64,
    owner: u64,
    filter: EventFilter,
    mask: u64,
    matcher: Option<Arc<dyn Matcher>>,
    max_queue: u64,
    queue: Mutex<Queue>,
    deliver: Mutex<Option<Box<dyn Deliver>>>,
    admitted: AtomicU64,
    offset: AtomicI64,
    matched: AtomicU64,
    dropped: AtomicU64,
    delivered: AtomicU64,
    notices: AtomicU64,
    sent: AtomicU64,
    reports: AtomicU64,
    ask_pending: AtomicBool,
    asked_at: AtomicI64,
    active: AtomicBool,
    latency: Histogram,
}

static NEXT_SUB_ID: AtomicU64 = AtomicU64::new(1);

impl Subscription {
    /// A subscription (not yet registered; see [`Hub::add`]) of `owner`
    /// (an opaque word the binding uses for the subscriber). `max_queue` is
    /// clamped to `1..=MAX_QUEUE_LIMIT`.
    pub fn new(
        filter: EventFilter,
        matcher: Option<Arc<dyn Matcher>>,
        max_queue: u64,
        owner: u64,
        deliver: Box<dyn Deliver>,
    ) -> Subscription {
        Subscription {
            id: NEXT_SUB_ID.fetch_add(1, Ordering::Relaxed),
            owner,
            mask: filter.type_mask(),
            filter,
            matcher,
            max_queue: max_queue.clamp(1, MAX_QUEUE_LIMIT),
            queue: Mutex::new(Queue::default()),
            deliver: Mutex::new(Some(deliver)),
            admitted: AtomicU64::new(0),
            offset: AtomicI64::new(0),
            matched: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            notices: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            reports: AtomicU64::new(0),
            ask_pending: AtomicBool::new(false),
            asked_at: AtomicI64::new(0),
            active: AtomicBool::new(true),
            latency: Histogram::default(),
        }
    }

    /// Unique id (process-wide).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The subscriber word given to [`Subscription::new`].
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// Replaces the deliverer (before registering; a closed subscription
    /// keeps none).
    pub fn set_deliver(&self, d: Box<dyn Deliver>) {
        let mut g = self.deliver.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_active() {
            *g = Some(d);
        }
    }

    /// The filter.
    pub fn filter(&self) -> &EventFilter {
        &self.filter
    }

    /// Still registered?
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn estimate(&self) -> u64 {
        let e = self.admitted.load(Ordering::Relaxed) as i64 + self.offset.load(Ordering::Relaxed);
        e.max(0) as u64
    }

    /// The answer to [`Deliver::ask_backlog`]`(sent)`: `backlog` items were
    /// handed over and not consumed when it was measured (after the
    /// request). A report older than the latest request still gives a valid
    /// bound and is applied.
    pub fn report_backlog(&self, sent: u64, backlog: u64) {
        let offset = backlog as i64 - sent as i64;
        self.offset.store(offset, Ordering::Relaxed);
        self.reports.fetch_add(1, Ordering::Relaxed);
        self.ask_pending.store(false, Ordering::Release);
    }

    #[inline]
    fn wants(&self, e: &StoredEvent<'_>) -> bool {
        self.mask & type_bit(e.kind, e.aux) != 0
            && self.filter.matches(e)
            && self.matcher.as_ref().map_or(true, |m| m.matches(e))
    }

    /// Queues `e` or counts it dropped. Called under the store lock (one
    /// caller at a time).
    fn admit(&self, e: &StoredEvent<'_>) {
        self.matched.fetch_add(1, Ordering::Relaxed);
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if self.estimate() < self.max_queue {
            // Drops not yet noticed go first, in their place (the notice
            // may take the one slot past the bound).
            self.place_drops(&mut q);
            self.admitted.fetch_add(1, Ordering::Relaxed);
            q.items
                .push_back(Item::Event(e.to_event(), e.correlation(), e.seq));
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            q.pending += 1;
            self.place_drops(&mut q);
        }
    }

    /// Puts pending drops into the queue: into the last notice if it is
    /// still queued, else as a new notice when the backlog has room for it
    /// (one item past `max_queue` at most); otherwise they stay pending.
    fn place_drops(&self, q: &mut Queue) {
        if q.pending == 0 {
            return;
        }
        if let Some(Item::Dropped(n)) = q.items.back_mut() {
            *n += q.pending;
            q.pending = 0;
        } else if self.estimate() <= self.max_queue {
            self.admitted.fetch_add(1, Ordering::Relaxed);
            q.items.push_back(Item::Dropped(q.pending));
            q.pending = 0;
        }
    }

    /// The subscription's counters.
    pub fn stats(&self) -> SubscriptionStats {
        let queued = (self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items
            .iter())
        .filter(|i| matches!(i, Item::Event(..)))
        .count() as u64;
        SubscriptionStats {
            matched: self.matched.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            queued,
            drop_notices: self.notices.load(Ordering::Relaxed),
            backlog_estimate: self.estimate(),
            backlog_reports: self.reports.load(Ordering::Relaxed),
            max_queue: self.max_queue,
            latency_p50_ns: self.latency.quantile(0.5),
            latency_p99_ns: self.latency.quantile(0.99),
            latency_max_ns: self.latency.quantile(1.0),
            active: self.is_active(),
        }
    }

    /// Hands queued items over (delivery thread). Returns false when the
    /// subscriber is gone.
    fn pump(&self, clock: Clock, local: &mut [u32]) -> bool {
        let mut guard = self.deliver.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = guard.as_mut() else {
            return false;
        };
        loop {
            let items: Vec<Item> = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                // Room again (a report came): notice the drops left pending.
                self.place_drops(&mut q);
                let n = q.items.len().min(TAKE_MAX);
                q.items.drain(..n).collect()
            };
            if items.is_empty() {
                break;
            }
            for item in items {
                let r = match &item {
                    Item::Event(ev, corr, seq) => {
                        let view = view_of(ev, corr, *seq);
                        let r = d.event(&view);
                        if r.is_ok() {
                            self.delivered.fetch_add(1, Ordering::Relaxed);
                            let now = clock();
                            Histogram::count(local, now.saturating_sub(ev.timestamp).max(0) as u64);
                        }
                        r
                    }
                    Item::Dropped(n) => {
                        let r = d.dropped(*n);
                        if r.is_ok() {
                            self.notices.fetch_add(1, Ordering::Relaxed);
                        }
                        r
                    }
                };
                if r.is_err() {
                    return false;
                }
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            self.latency.merge(local);
            local.iter_mut().for_each(|c| *c = 0);
        }
        // Ask for the backlog when it may be half full.
        if self.estimate() >= self.max_queue.div_ceil(2) {
            let now = clock();
            let retry = ASK_RETRY.as_nanos() as i64;
            if !self.ask_pending.load(Ordering::Acquire)
                || now.saturating_sub(self.asked_at.load(Ordering::Relaxed)) >= retry
            {
                self.ask_pending.store(true, Ordering::Release);
                self.asked_at.store(now, Ordering::Relaxed);
                d.ask_backlog(self.sent.load(Ordering::Relaxed));
            }
        }
        true
    }

    /// Stops deliveries and drops the deliverer (and what it holds).
    fn close(&self) {
        self.active.store(false, Ordering::Release);
        let d = self
            .deliver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(d);
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = Queue::default();
    }

    /// Has it items queued?
    fn busy(&self) -> bool {
        !self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items
            .is_empty()
    }
}

/// The stored view of an event stored under `seq` with `corr` (and its own
/// `aux`).
pub fn view_of<'a>(ev: &'a Event, corr: &CorrelationFields, seq: u64) -> StoredEvent<'a> {
    view_with_aux(ev, corr, ev.aux, seq)
}

/// [`view_of`] with the `aux` the store recorded.
pub fn view_with_aux<'a>(
    ev: &'a Event,
    corr: &CorrelationFields,
    aux: i64,
    seq: u64,
) -> StoredEvent<'a> {
    StoredEvent {
        seq,
        id: ev.id,
        timestamp: ev.timestamp,
        wall_time: ev.wall_time,
        pid: ev.pid,
        peer: ev.peer,
        module: ev.module,
        function: ev.function,
        aux,
        kind: ev.kind,
        flags: ev.flags,
        correlation_id: corr.correlation_id,
        parent_id: corr.parent_id,
        root_id: corr.root_id,
        ast_node: 0,
        payload: &ev.payload,
    }
}

type Snapshot = Arc<Vec<Arc<Subscription>>>;

struct Wake {
    pending: Mutex<bool>,
    cond: Condvar,
}

/// A pipeline's subscribers and their delivery thread (see the module
/// documentation).
pub struct Hub {
    subs: RwLock<Snapshot>,
    count: AtomicUsize,
    mask: AtomicU64,
    wake: Wake,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    clock: Clock,
    delivering: AtomicBool,
}

/// Most subscribers one hub takes.
pub const MAX_SUBSCRIBERS: usize = 4096;

impl Hub {
    /// An empty hub timing latencies with `clock`. The delivery thread
    /// starts with the first subscriber.
    pub fn new(clock: Clock) -> Arc<Hub> {
        Arc::new(Hub {
            subs: RwLock::new(Arc::new(Vec::new())),
            count: AtomicUsize::new(0),
            mask: AtomicU64::new(0),
            wake: Wake {
                pending: Mutex::new(false),
                cond: Condvar::new(),
            },
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            clock,
            delivering: AtomicBool::new(false),
        })
    }

    fn snapshot(&self) -> Snapshot {
        Arc::clone(&self.subs.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn publish(&self, subs: Vec<Arc<Subscription>>) {
        let mask = subs.iter().fold(0, |m, s| m | s.mask);
        let n = subs.len();
        *self.subs.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(subs);
        self.mask.store(mask, Ordering::Release);
        self.count.store(n, Ordering::Release);
    }

    /// Registers `sub`; `Err` when the hub is full or stopped, or the
    /// delivery thread cannot start.
    pub fn add(self: &Arc<Self>, sub: Arc<Subscription>) -> Result<(), String> {
        if self.stop.load(Ordering::Acquire) {
            return Err("the pipeline has been shut down".into());
        }
        {
            let mut t = self.thread.lock().unwrap_or_else(|p| p.into_inner());
            if t.is_none() {
                let hub = Arc::clone(self);
                let h = std::thread::Builder::new()
                    .name("elixir_scope_subs".into())
                    .spawn(move || hub.run())
                    .map_err(|e| format!("cannot start the delivery thread: {e}"))?;
                *t = Some(h);
            }
        }
        let mut subs: Vec<Arc<Subscription>> = self.snapshot().to_vec();
        if subs.len() >= MAX_SUBSCRIBERS {
            return Err(format!(
                "at most {MAX_SUBSCRIBERS} subscribers per pipeline"
            ));
        }
        subs.push(sub);
        self.publish(subs);
        Ok(())
    }

    /// Unregisters subscription `id` and drops its deliverer; false if it
    /// was not registered.
    pub fn remove(&self, id: u64) -> bool {
        let subs = self.snapshot();
        let Some(s) = subs.iter().find(|s| s.id == id).cloned() else {
            return false;
        };
        self.publish(subs.iter().filter(|s| s.id != id).cloned().collect());
        s.close();
        true
    }

    /// The registered subscriptions.
    pub fn list(&self) -> Vec<Arc<Subscription>> {
        self.snapshot().to_vec()
    }

    /// Subscription `id`, if registered.
    pub fn get(&self, id: u64) -> Option<Arc<Subscription>> {
        self.snapshot().iter().find(|s| s.id == id).cloned()
    }

    /// Number of subscribers.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// No subscriber?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offers a stored batch to the subscribers (call in store order, under
    /// the store lock). `events` are the stored views of the events that
    /// were stored. Cost without subscribers: one load.
    #[inline]
    pub fn dispatch<'a>(&self, events: impl Iterator<Item = StoredEvent<'a>>) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.dispatch_slow(events);
    }

    #[inline(never)]
    fn dispatch_slow<'a>(&self, events: impl Iterator<Item = StoredEvent<'a>>) {
        let mask = self.mask.load(Ordering::Acquire);
        let subs = self.snapshot();
        let mut any = false;
        for e in events {
            if mask & type_bit(e.kind, e.aux) == 0 {
                continue;
            }
            for s in subs.iter() {
                if s.wants(&e) {
                    s.admit(&e);
                    any = true;
                }
            }
        }
        if any {
            self.notify();
        }
    }

    fn notify(&self) {
        let mut p = self.wake.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !*p {
            *p = true;
            self.wake.cond.notify_one();
        }
    }

    /// Waits until every queued item has been handed over (up to
    /// `timeout`); false on timeout.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // Queues first, then the pass flag: an item taken out before the
            // queues were seen empty belongs to a pass that is still running
            // (flag set) or has handed it over.
            if self.snapshot().iter().all(|s| !s.busy()) && !self.delivering.load(Ordering::Acquire)
            {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            self.notify();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops the delivery thread and closes every subscription.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.notify();
        let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        let subs = self.snapshot();
        self.publish(Vec::new());
        for s in subs.iter() {
            s.close();
        }
    }

    fn run(self: Arc<Self>) {
        let mut local = Histogram::local();
        while !self.stop.load(Ordering::Acquire) {
            {
                let mut p = self.wake.pending.lock().unwrap_or_else(|p| p.into_inner());
                if !*p {
                    p = self
                        .wake
                        .cond
                        .wait_timeout(p, IDLE_WAIT)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                *p = false;
            }
            self.delivering.store(true, Ordering::Release);
            let subs = self.snapshot();
            let mut gone = Vec::new();
            for s in subs.iter() {
                if !s.is_active() {
                    continue;
                }
                let alive = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    s.pump(self.clock, &mut local)
                }))
                .unwrap_or(false);
                if !alive {
                    gone.push(s.id);
                }
            }
            self.delivering.store(false, Ordering::Release);
            for id in gone {
                self.remove(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn clock() -> i64 {
        0
    }

    struct Rec(Arc<Mutex<Vec<String>>>, Arc<AtomicBool>);

    impl Deliver for Rec {
        fn event(&mut self, e: &StoredEvent<'_>) -> Result<(), Gone> {
            if self.1.load(Ordering::Relaxed) {
                return Err(Gone);
            }
            self.0.lock().unwrap().push(format!("e{}", e.id));
            Ok(())
        }
        fn dropped(&mut self, n: u64) -> Result<(), Gone> {
            self.0.lock().unwrap().push(format!("d{n}"));
            Ok(())
        }
        fn ask_backlog(&mut self, sent: u64) {
            self.0.lock().unwrap().push(format!("ask{sent}"));
        }
    }

    fn ev(id: u64, pid: u64) -> Event {
        Event {
            id,
            pid,
            kind: EventKind::FunctionCall as u8,
            ..Event::default()
        }
    }

    fn offer(hub: &Hub, evs: &[Event]) {
        let corr = CorrelationFields::default();
        hub.dispatch(evs.iter().map(|e| view_of(e, &corr, e.id)));
    }

    #[test]
    fn drops_past_the_bound_leave_one_marker_and_reports_reopen_it() {
        let hub = Hub::new(clock);
        let log = Arc::new(Mutex::new(Vec::new()));
        let gone = Arc::new(AtomicBool::new(false));
        let f = EventFilter {
            pid: Some(7),
            ..EventFilter::default()
        };
        let sub = Arc::new(Subscription::new(
            f,
            None,
            4,
            0,
            Box::new(Rec(Arc::clone(&log), Arc::clone(&gone))),
        ));
        hub.add(Arc::clone(&sub)).unwrap();
        let evs: Vec<Event> = (1..=10)
            .map(|i| ev(i, if i == 5 { 8 } else { 7 }))
            .collect();
        offer(&hub, &evs);
        assert!(hub.flush(Duration::from_secs(5)));
        let s = sub.stats();
        assert_eq!((s.matched, s.delivered, s.dropped), (9, 4, 5));
        // Nothing consumed: the subscriber's backlog is the 4 events + marker.
        sub.report_backlog(s.delivered + 1, 5);
        offer(&hub, &[ev(11, 7)]);
        assert!(hub.flush(Duration::from_secs(5)));
        assert_eq!(sub.stats().dropped, 6);
        // All consumed.
        sub.report_backlog(5, 0);
        offer(&hub, &[ev(12, 7)]);
        assert!(hub.flush(Duration::from_secs(5)));
        let got = log.lock().unwrap().clone();
        let items: Vec<&str> = got
            .iter()
            .filter(|s| !s.starts_with("ask"))
            .map(|s| s.as_str())
            .collect();
        assert_eq!(items, ["e1", "e2", "e3", "e4", "d5", "d1", "e12"]);
        assert!(got.iter().any(|s| s.starts_with("ask")));
        // A subscriber that is gone is removed.
        gone.store(true, Ordering::Relaxed);
        offer(&hub, &[ev(13, 7)]);
        let t0 = std::time::Instant::now();
        while !hub.is_empty() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(hub.is_empty());
        assert!(!sub.is_active());
        hub.shutdown();
    }
}
