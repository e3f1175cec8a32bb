//! Event correlation: call stacks, message matching and the process tree.
//!
//! A [`Correlator`] is a deterministic, single-threaded state machine: feed it
//! [`CorrInput`]s in per-process order and it answers each with a
//! [`Correlation`]. The pipeline owns one per shard/worker (it is `Send`).
//!
//! Rules (see `ARCHITECTURE.md`, "Correlation rules"):
//!
//! * **Call** pushes its id on the process's stack; `parent_id` is the previous
//!   top, `root_id` the bottom (itself on an empty stack); link
//!   [`LinkKind::CalledFrom`] the parent.
//! * **Return / Exception** completes a frame: the one named by `call_id` if it
//!   is on the stack, else (no `call_id`) the top. A frame below the top
//!   unwinds the frames above it (counted in [`CorrelatorMetrics::unwound_frames`]).
//!   An explicit `call_id` that is *not* on the stack never pops anything: the
//!   return is unmatched (counted in [`CorrelatorMetrics::unmatched_returns`]), so a
//!   stale or foreign id cannot corrupt the stack.
//! * **Send** queues `(receiver, msg_hash)` → FIFO of sends; **Receive** takes
//!   the oldest. A receive that arrives first waits in a pending table and is
//!   linked when its send arrives, reported through
//!   [`Correlator::take_late_links`].
//! * **Spawn** records child → parent; **Exit** clears the stack (open frames
//!   are orphaned) and forgets the process.
//! * **StateChange** links the call in progress.
//!
//! # Bounds
//!
//! Tracked entries — stack frames, queued sends, pending receives and process
//! tree entries — never exceed [`CorrelatorConfig::max_correlations`]. When a
//! new entry needs room the correlator, in order:
//!
//! 1. evicts the oldest queued send or pending receive (by arrival order);
//! 2. else evicts the oldest process-tree entry;
//! 3. else (every entry is a live stack frame) refuses to track the new entry.
//!
//! Each eviction is counted in [`CorrelatorMetrics::evicted`], each refusal in
//! [`CorrelatorMetrics::refused`]. A refused event still gets its [`Correlation`]. A
//! refused call is remembered only as a depth counter on its process: while
//! that counter is non-zero further calls of that process are refused too
//! (their parent is unknown, confidence 0), and returns without a tracked
//! `call_id` complete those untracked calls first, so the tracked stack stays
//! consistent.
//!
//! Separately, [`Correlator::chain`] uses a map of call id → (parent, root,
//! pid) holding the most recent `max_correlations` calls (FIFO eviction by
//! first sighting); it is not part of [`CorrelatorMetrics::active`].

use std::collections::{BTreeMap, HashMap, VecDeque};

/// What kind of event a [`CorrInput`] is.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum CorrKind {
    /// A function call.
    Call,
    /// A function return.
    Return,
    /// A function exiting by exception (completes its call like a return).
    Exception,
    /// A message send (`pid` sends to `peer`).
    Send,
    /// A message receive (`pid` receives).
    Receive,
    /// A process spawn (`pid` is the parent, `peer` the child).
    Spawn,
    /// A process exit (`pid` exits).
    Exit,
    /// A state change of process `pid`.
    StateChange,
    /// Anything else; not correlated.
    Other,
}

/// One event as seen by the correlator.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CorrInput {
    /// Unique event id.
    pub id: u64,
    /// What happened.
    pub kind: CorrKind,
    /// Acting process (opaque word).
    pub pid: u64,
    /// Other process: receiver of a send, child of a spawn; else ignored.
    pub peer: u64,
    /// Monotonic timestamp, nanoseconds.
    pub timestamp: i64,
    /// For returns/exceptions: the call being completed, if known.
    pub call_id: Option<u64>,
    /// Content hash of the message, for sends and receives.
    pub msg_hash: u64,
}

impl CorrInput {
    /// An input of `kind` with no peer, call id or hash.
    pub fn new(id: u64, kind: CorrKind, pid: u64, timestamp: i64) -> CorrInput {
        CorrInput {
            id,
            kind,
            pid,
            peer: 0,
            timestamp,
            call_id: None,
            msg_hash: 0,
        }
    }
}

/// The kind of a [`Link`] (Elixir: `{:called_from, id}`, `{:completes, id}`,
/// `{:receives, id}`, ...).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum LinkKind {
    /// A call made from the target call.
    CalledFrom,
    /// A return/exception completing the target call.
    Completes,
    /// A receive of the message sent by the target send event.
    Receives,
    /// A spawn whose parent is the target **pid**.
    SpawnedBy,
    /// A state change inside the target call.
    StateIn,
}

/// A directed link from an event to another event (or pid, for
/// [`LinkKind::SpawnedBy`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Link {
    /// Link kind.
    pub kind: LinkKind,
    /// Target event id (parent pid for `SpawnedBy`).
    pub target: u64,
}

impl Link {
    /// A link of `kind` to `target`.
    pub fn new(kind: LinkKind, target: u64) -> Link {
        Link { kind, target }
    }
}

/// Correlation type (Elixir `correlation_type`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum CorrType {
    /// `:function_call`
    FunctionCall,
    /// `:function_return` (also exceptions)
    FunctionReturn,
    /// `:message_send`
    MessageSend,
    /// `:message_receive`
    MessageReceive,
    /// `:process_spawn`
    ProcessSpawn,
    /// `:process_exit`
    ProcessExit,
    /// `:state_change`
    StateChange,
    /// `:unknown`
    Unknown,
}

/// The correlator's answer for one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Correlation {
    /// Correlation id: the call id for calls/returns, the send id for sends
    /// and matched receives, else the event's own id.
    pub correlation_id: u64,
    /// Enclosing call (for calls: the caller; for returns: the completed
    /// call's caller; for sends, receives, spawns and state changes: the call
    /// in progress on the acting process).
    pub parent_id: Option<u64>,
    /// Bottom of the enclosing call stack.
    pub root_id: Option<u64>,
    /// Links to other events.
    pub links: Vec<Link>,
    /// Correlation type.
    pub ctype: CorrType,
    /// Confidence in the links, 0.0..=1.0.
    pub confidence: f32,
    /// For a matched return/exception: return timestamp − call timestamp.
    pub duration_ns: Option<i64>,
}

impl Correlation {
    fn plain(id: u64, ctype: CorrType) -> Correlation {
        Correlation {
            correlation_id: id,
            parent_id: None,
            root_id: None,
            links: Vec::new(),
            ctype,
            confidence: 1.0,
            duration_ns: None,
        }
    }

    /// The duration of the completed call, for matched returns.
    pub fn duration(&self) -> Option<i64> {
        self.duration_ns
    }
}

/// A link discovered after the event it belongs to was answered: a receive
/// that arrived before its send.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct LateLink {
    /// The event (receive id) the link belongs to.
    pub event: u64,
    /// The link (`Receives(send_id)`).
    pub link: Link,
    /// Confidence of the match.
    pub confidence: f32,
}

/// Correlator limits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CorrelatorConfig {
    /// Queued sends and pending receives older than this are swept.
    pub ttl_ns: i64,
    /// Upper bound on tracked entries (see the module docs).
    pub max_correlations: usize,
}

impl Default for CorrelatorConfig {
    /// 300 s TTL, 100 000 entries (the Elixir defaults).
    fn default() -> Self {
        CorrelatorConfig {
            ttl_ns: 300_000_000_000,
            max_correlations: 100_000,
        }
    }
}

/// Counters. All are cumulative except [`CorrelatorMetrics::active`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct CorrelatorMetrics {
    /// Calls seen.
    pub calls: u64,
    /// Returns and exceptions seen.
    pub returns: u64,
    /// Sends seen.
    pub sends: u64,
    /// Receives seen.
    pub receives: u64,
    /// Receives linked to a send (at once or late).
    pub matched_receives: u64,
    /// Returns that completed no call.
    pub unmatched_returns: u64,
    /// Frames skipped by a return whose call was not on top.
    pub unwound_frames: u64,
    /// Open calls discarded by a process exit.
    pub orphaned_calls: u64,
    /// Queued sends / pending receives removed by [`Correlator::sweep`].
    pub expired: u64,
    /// Entries evicted to make room.
    pub evicted: u64,
    /// Entries not tracked because every entry was a live stack frame.
    pub refused: u64,
    /// Tracked entries now (stack frames + queued sends + pending receives +
    /// tree entries).
    pub active: u64,
}

#[derive(Copy, Clone, Debug)]
struct Frame {
    id: u64,
    ts: i64,
    parent: Option<u64>,
    root: u64,
}

#[derive(Default, Debug)]
struct ProcStack {
    frames: Vec<Frame>,
    /// Refused calls sitting above `frames`.
    untracked: u64,
}

#[derive(Copy, Clone, Debug)]
struct CallInfo {
    parent: Option<u64>,
    root: u64,
    pid: u64,
}

#[derive(Copy, Clone, Debug)]
struct QueuedSend {
    id: u64,
    sender: u64,
    ts: i64,
    seq: u64,
}

#[derive(Default, Debug)]
struct SendQueue {
    items: VecDeque<QueuedSend>,
    /// sender → number of its sends in `items`.
    senders: HashMap<u64, u32>,
}

impl SendQueue {
    fn push(&mut self, s: QueuedSend) {
        *self.senders.entry(s.sender).or_insert(0) += 1;
        self.items.push_back(s);
    }

    fn forget_sender(&mut self, sender: u64) {
        if let Some(n) = self.senders.get_mut(&sender) {
            *n -= 1;
            if *n == 0 {
                self.senders.remove(&sender);
            }
        }
    }

    fn pop_front(&mut self) -> Option<QueuedSend> {
        let s = self.items.pop_front()?;
        self.forget_sender(s.sender);
        Some(s)
    }
}

#[derive(Copy, Clone, Debug)]
struct PendingRecv {
    id: u64,
    ts: i64,
    seq: u64,
}

/// (receiver pid, message hash).
type MsgKey = (u64, u64);

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum MsgSide {
    Send,
    Recv,
}

/// The correlator. See the module docs.
#[derive(Debug)]
pub struct Correlator {
    config: CorrelatorConfig,
    stacks: HashMap<u64, ProcStack>,
    calls: HashMap<u64, CallInfo>,
    call_order: VecDeque<u64>,
    sends: HashMap<MsgKey, SendQueue>,
    pending: HashMap<MsgKey, VecDeque<PendingRecv>>,
    /// Arrival order of queued sends and pending receives.
    msg_order: BTreeMap<u64, (MsgSide, MsgKey)>,
    /// child → (parent, seq).
    tree: HashMap<u64, (u64, u64)>,
    /// seq → child, arrival order of tree entries.
    tree_order: BTreeMap<u64, u64>,
    late: Vec<LateLink>,
    seq: u64,
    metrics: CorrelatorMetrics,
}

impl Correlator {
    /// A new, empty correlator.
    pub fn new(config: CorrelatorConfig) -> Correlator {
        Correlator {
            config,
            stacks: HashMap::new(),
            calls: HashMap::new(),
            call_order: VecDeque::new(),
            sends: HashMap::new(),
            pending: HashMap::new(),
            msg_order: BTreeMap::new(),
            tree: HashMap::new(),
            tree_order: BTreeMap::new(),
            late: Vec::new(),
            seq: 0,
            metrics: CorrelatorMetrics::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> CorrelatorConfig {
        self.config
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> CorrelatorMetrics {
        self.metrics
    }

    /// Tracked entries now (equals [`Correlator::live_entries`]).
    pub fn active(&self) -> usize {
        self.metrics.active as usize
    }

    /// Recount tracked entries by walking every table (O(n); for tests and
    /// debugging). Always equals [`Correlator::active`].
    pub fn live_entries(&self) -> usize {
        let frames: usize = self.stacks.values().map(|s| s.frames.len()).sum();
        let sends: usize = self.sends.values().map(|q| q.items.len()).sum();
        let recvs: usize = self.pending.values().map(|q| q.len()).sum();
        frames + sends + recvs + self.tree.len()
    }

    /// Open tracked call ids of `pid`, bottom first.
    pub fn stack(&self, pid: u64) -> Vec<u64> {
        self.stacks
            .get(&pid)
            .map(|s| s.frames.iter().map(|f| f.id).collect())
            .unwrap_or_default()
    }

    /// The parent of a live process, if its spawn was seen.
    pub fn parent_of(&self, pid: u64) -> Option<u64> {
        self.tree.get(&pid).map(|&(p, _)| p)
    }

    /// Queued (unreceived) sends plus pending (unsent) receives.
    pub fn pending_messages(&self) -> usize {
        self.msg_order.len()
    }

    /// Drain the links found since the last call (receives linked when their
    /// send arrived).
    pub fn take_late_links(&mut self) -> Vec<LateLink> {
        std::mem::take(&mut self.late)
    }

    /// The ancestors of a known call, root first, ending with the call
    /// itself; empty if the call is unknown. Known calls are the most recent
    /// `max_correlations` distinct call ids; if an ancestor has been
    /// forgotten the chain starts at its oldest known descendant.
    pub fn chain(&self, id: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            let Some(info) = self.calls.get(&c) else {
                break;
            };
            out.push(c);
            if out.len() > self.calls.len() {
                break; // defensive against id reuse forming a cycle
            }
            cur = info.parent;
        }
        out.reverse();
        out
    }

    /// The pid of a known call (see [`Correlator::chain`] for "known").
    pub fn call_pid(&self, id: u64) -> Option<u64> {
        self.calls.get(&id).map(|c| c.pid)
    }

    /// Correlate one event.
    pub fn correlate(&mut self, ev: &CorrInput) -> Correlation {
        match ev.kind {
            CorrKind::Call => self.on_call(ev),
            CorrKind::Return | CorrKind::Exception => self.on_return(ev),
            CorrKind::Send => self.on_send(ev),
            CorrKind::Receive => self.on_receive(ev),
            CorrKind::Spawn => self.on_spawn(ev),
            CorrKind::Exit => self.on_exit(ev),
            CorrKind::StateChange => self.on_state_change(ev),
            CorrKind::Other => Correlation::plain(ev.id, CorrType::Unknown),
        }
    }

    /// Correlate a batch, answers in input order.
    pub fn correlate_batch(&mut self, evs: &[CorrInput]) -> Vec<Correlation> {
        evs.iter().map(|e| self.correlate(e)).collect()
    }

    /// Remove queued sends and pending receives older than the TTL
    /// (`now_ns - timestamp > ttl_ns`); returns how many were removed.
    pub fn sweep(&mut self, now_ns: i64) -> usize {
        let cutoff = now_ns.saturating_sub(self.config.ttl_ns);
        let mut removed = 0usize;
        let order = &mut self.msg_order;
        self.sends.retain(|_, q| {
            let mut i = 0;
            while i < q.items.len() {
                if q.items[i].ts < cutoff {
                    let s = q.items.remove(i).expect("index in range");
                    q.forget_sender(s.sender);
                    order.remove(&s.seq);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
            !q.items.is_empty()
        });
        self.pending.retain(|_, q| {
            q.retain(|r| {
                if r.ts < cutoff {
                    order.remove(&r.seq);
                    removed += 1;
                    false
                } else {
                    true
                }
            });
            !q.is_empty()
        });
        self.metrics.expired += removed as u64;
        self.metrics.active -= removed as u64;
        removed
    }

    // ---- internals -------------------------------------------------------

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Make room for one more tracked entry; false if it must be refused.
    fn make_room(&mut self) -> bool {
        if (self.metrics.active as usize) < self.config.max_correlations {
            return true;
        }
        if let Some((_, (side, key))) = self.msg_order.pop_first() {
            match side {
                MsgSide::Send => {
                    let q = self.sends.get_mut(&key).expect("indexed send queue");
                    q.pop_front();
                    if q.items.is_empty() {
                        self.sends.remove(&key);
                    }
                }
                MsgSide::Recv => {
                    let q = self.pending.get_mut(&key).expect("indexed receive queue");
                    q.pop_front();
                    if q.is_empty() {
                        self.pending.remove(&key);
                    }
                }
            }
        } else if let Some((_, child)) = self.tree_order.pop_first() {
            self.tree.remove(&child);
        } else {
            self.metrics.refused += 1;
            return false;
        }
        self.metrics.evicted += 1;
        self.metrics.active -= 1;
        (self.metrics.active as usize) < self.config.max_correlations
    }

    fn remember_call(&mut self, id: u64, info: CallInfo) {
        if self.calls.insert(id, info).is_none() {
            self.call_order.push_back(id);
            while self.call_order.len() > self.config.max_correlations {
                if let Some(old) = self.call_order.pop_front() {
                    self.calls.remove(&old);
                }
            }
        }
    }

    /// (top call, root) of `pid`'s tracked stack.
    fn context(&self, pid: u64) -> (Option<u64>, Option<u64>) {
        match self.stacks.get(&pid) {
            Some(s) if !s.frames.is_empty() => (
                s.frames.last().map(|f| f.id),
                s.frames.first().map(|f| f.root),
            ),
            _ => (None, None),
        }
    }

    fn on_call(&mut self, ev: &CorrInput) -> Correlation {
        self.metrics.calls += 1;
        let untracked = self.stacks.get(&ev.pid).map_or(0, |s| s.untracked);
        let (top, bottom) = self.context(ev.pid);
        let mut c = Correlation::plain(ev.id, CorrType::FunctionCall);
        if untracked > 0 {
            // Parent is an untracked (refused) call: unknown.
            c.root_id = bottom;
            c.confidence = 0.0;
            self.stacks.entry(ev.pid).or_default().untracked += 1;
            self.metrics.refused += 1;
            return c;
        }
        let root = bottom.unwrap_or(ev.id);
        c.parent_id = top;
        c.root_id = Some(root);
        if let Some(p) = top {
            c.links.push(Link::new(LinkKind::CalledFrom, p));
        }
        self.remember_call(
            ev.id,
            CallInfo {
                parent: top,
                root,
                pid: ev.pid,
            },
        );
        let tracked = self.make_room();
        let st = self.stacks.entry(ev.pid).or_default();
        if tracked {
            st.frames.push(Frame {
                id: ev.id,
                ts: ev.timestamp,
                parent: top,
                root,
            });
            self.metrics.active += 1;
        } else {
            st.untracked += 1;
        }
        c
    }

    fn on_return(&mut self, ev: &CorrInput) -> Correlation {
        self.metrics.returns += 1;
        let mut c = Correlation::plain(ev.id, CorrType::FunctionReturn);
        let Some(st) = self.stacks.get_mut(&ev.pid) else {
            self.metrics.unmatched_returns += 1;
            return c;
        };
        let pos = match ev.call_id {
            Some(cid) => st.frames.iter().rposition(|f| f.id == cid),
            None if st.untracked == 0 => st.frames.len().checked_sub(1),
            None => None,
        };
        if let Some(i) = pos {
            let skipped = (st.frames.len() - 1 - i) as u64 + st.untracked;
            let removed = (st.frames.len() - i) as u64;
            let f = st.frames[i];
            st.frames.truncate(i);
            st.untracked = 0;
            self.metrics.unwound_frames += skipped;
            self.metrics.active -= removed;
            c.correlation_id = f.id;
            c.parent_id = f.parent;
            c.root_id = Some(f.root);
            c.links.push(Link::new(LinkKind::Completes, f.id));
            c.duration_ns = Some(ev.timestamp - f.ts);
        } else if st.untracked > 0 {
            // Completes the innermost refused call.
            st.untracked -= 1;
            if let Some(cid) = ev.call_id {
                c.correlation_id = cid;
                c.links.push(Link::new(LinkKind::Completes, cid));
                if let Some(info) = self.calls.get(&cid) {
                    c.parent_id = info.parent;
                    c.root_id = Some(info.root);
                }
            }
            c.confidence = if ev.call_id.is_some() { 1.0 } else { 0.0 };
        } else {
            self.metrics.unmatched_returns += 1;
        }
        self.drop_empty_stack(ev.pid);
        c
    }

    fn drop_empty_stack(&mut self, pid: u64) {
        if let Some(st) = self.stacks.get(&pid) {
            if st.frames.is_empty() && st.untracked == 0 {
                self.stacks.remove(&pid);
            }
        }
    }

    fn on_send(&mut self, ev: &CorrInput) -> Correlation {
        self.metrics.sends += 1;
        let (top, root) = self.context(ev.pid);
        let mut c = Correlation::plain(ev.id, CorrType::MessageSend);
        c.parent_id = top;
        c.root_id = root;
        let key = (ev.peer, ev.msg_hash);
        if let Some(q) = self.pending.get_mut(&key) {
            let r = q.pop_front().expect("non-empty pending queue");
            if q.is_empty() {
                self.pending.remove(&key);
            }
            self.msg_order.remove(&r.seq);
            self.metrics.active -= 1;
            self.metrics.matched_receives += 1;
            self.late.push(LateLink {
                event: r.id,
                link: Link::new(LinkKind::Receives, ev.id),
                confidence: 1.0,
            });
            return c;
        }
        if self.make_room() {
            let seq = self.next_seq();
            self.sends.entry(key).or_default().push(QueuedSend {
                id: ev.id,
                sender: ev.pid,
                ts: ev.timestamp,
                seq,
            });
            self.msg_order.insert(seq, (MsgSide::Send, key));
            self.metrics.active += 1;
        }
        c
    }

    fn on_receive(&mut self, ev: &CorrInput) -> Correlation {
        self.metrics.receives += 1;
        let (top, root) = self.context(ev.pid);
        let mut c = Correlation::plain(ev.id, CorrType::MessageReceive);
        c.parent_id = top;
        c.root_id = root;
        let key = (ev.pid, ev.msg_hash);
        if let Some(q) = self.sends.get_mut(&key) {
            let distinct = q.senders.len().max(1);
            let s = q.pop_front().expect("non-empty send queue");
            if q.items.is_empty() {
                self.sends.remove(&key);
            }
            self.msg_order.remove(&s.seq);
            self.metrics.active -= 1;
            self.metrics.matched_receives += 1;
            c.correlation_id = s.id;
            c.links.push(Link::new(LinkKind::Receives, s.id));
            c.confidence = 1.0 / distinct as f32;
            return c;
        }
        if self.make_room() {
            let seq = self.next_seq();
            self.pending.entry(key).or_default().push_back(PendingRecv {
                id: ev.id,
                ts: ev.timestamp,
                seq,
            });
            self.msg_order.insert(seq, (MsgSide::Recv, key));
            self.metrics.active += 1;
        }
        c
    }

    fn on_spawn(&mut self, ev: &CorrInput) -> Correlation {
        let (top, root) = self.context(ev.pid);
        let mut c = Correlation::plain(ev.id, CorrType::ProcessSpawn);
        c.parent_id = top;
        c.root_id = root;
        c.links.push(Link::new(LinkKind::SpawnedBy, ev.pid));
        if let Some(&(_, old_seq)) = self.tree.get(&ev.peer) {
            // Pid reuse: replace the entry in place.
            self.tree_order.remove(&old_seq);
            self.tree.remove(&ev.peer);
            self.metrics.active -= 1;
        }
        if self.make_room() {
            let seq = self.next_seq();
            self.tree.insert(ev.peer, (ev.pid, seq));
            self.tree_order.insert(seq, ev.peer);
            self.metrics.active += 1;
        }
        c
    }

    fn on_exit(&mut self, ev: &CorrInput) -> Correlation {
        let mut c = Correlation::plain(ev.id, CorrType::ProcessExit);
        if let Some(st) = self.stacks.remove(&ev.pid) {
            self.metrics.orphaned_calls += st.frames.len() as u64 + st.untracked;
            self.metrics.active -= st.frames.len() as u64;
        }
        if let Some((parent, seq)) = self.tree.remove(&ev.pid) {
            self.tree_order.remove(&seq);
            self.metrics.active -= 1;
            c.links.push(Link::new(LinkKind::SpawnedBy, parent));
        }
        c
    }

    fn on_state_change(&mut self, ev: &CorrInput) -> Correlation {
        let (top, root) = self.context(ev.pid);
        let mut c = Correlation::plain(ev.id, CorrType::StateChange);
        c.parent_id = top;
        c.root_id = root;
        if let Some(t) = top {
            c.links.push(Link::new(LinkKind::StateIn, t));
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn correlator_is_send() {
        assert_send::<Correlator>();
    }
}
