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
//! * **OTP callbacks** (inputs with a [`CorrInput::callback`] class): the
//!   correlator keeps, per server process (one that has had a callback call
//!   or a state record), the receives it has not yet matched to a callback
//!   (at most [`MAILBOX_MAX`], oldest dropped). A callback call carrying the
//!   hash of its triggering message takes the oldest receive of that hash as
//!   its trigger; a callback call without one (`handle_continue/2`,
//!   timeouts, internal events) or whose message was not seen takes the
//!   server's previous state record, and `init/1` the spawn of its process
//!   when that was correlated first. The call's frame keeps the trigger, so
//!   its return (the state record) reports it too ([`Correlation::trigger`]).
//!   At most `max(1024, max_correlations / 8)` servers are tracked (oldest
//!   first out, counted in [`CorrelatorMetrics::servers_evicted`]).
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
//! [`Tracker`] wraps a correlator for the interactive Elixir API: a record
//! per correlation (type, creation time, process, links found later),
//! bounded by the same TTL and `max_correlations`, and returns whose
//! process is unknown.
//!
//! Separately, [`Correlator::chain`] uses a map of call id → (parent, root,
//! pid) holding the most recent `max_correlations` calls (FIFO eviction by
//! first sighting); it is not part of [`CorrelatorMetrics::active`].

use crate::hash::{FastMap, Seeded, SeededMap};
use std::collections::{BTreeMap, VecDeque};

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
    /// Caller-supplied correlation key of a call or return (`0`: none). A
    /// return without `call_id` but with a key completes the innermost
    /// open call of its process that carries the same key.
    pub key: u64,
    /// Calls and returns of OTP callbacks: the event's callback flags (see
    /// [`crate::event::Callback`]; 0: not a callback). A callback call's
    /// `msg_hash` is the content hash of its triggering message (0: none).
    pub callback: u8,
    /// Calls: the called module and function, as opaque words kept in the
    /// call's [`CorrRecord`] (0: unknown); ignored by the correlation.
    pub module: u64,
    /// See `module`.
    pub function: u64,
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
            key: 0,
            callback: 0,
            module: 0,
            function: 0,
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

/// The links of one correlation: at most two, kept inline so correlating an
/// event never allocates. Derefs to `[Link]`.
#[derive(Clone, Copy)]
pub struct Links {
    len: u8,
    items: [Link; 2],
}

impl Default for Links {
    fn default() -> Self {
        Links {
            len: 0,
            items: [Link::new(LinkKind::CalledFrom, 0); 2],
        }
    }
}

impl Links {
    /// No links.
    pub fn new() -> Links {
        Links::default()
    }

    /// Adds a link (a correlation has at most two; more are ignored).
    pub fn push(&mut self, l: Link) {
        debug_assert!(self.len < 2, "at most two links per correlation");
        if (self.len as usize) < self.items.len() {
            self.items[self.len as usize] = l;
            self.len += 1;
        }
    }

    /// The links as a slice.
    pub fn as_slice(&self) -> &[Link] {
        &self.items[..self.len as usize]
    }
}

impl std::ops::Deref for Links {
    type Target = [Link];
    fn deref(&self) -> &[Link] {
        self.as_slice()
    }
}

impl PartialEq for Links {
    fn eq(&self, other: &Links) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl PartialEq<Vec<Link>> for Links {
    fn eq(&self, other: &Vec<Link>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
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
    pub links: Links,
    /// Correlation type.
    pub ctype: CorrType,
    /// Confidence in the links, 0.0..=1.0.
    pub confidence: f32,
    /// For a matched return/exception: return timestamp − call timestamp.
    pub duration_ns: Option<i64>,
    /// OTP callback calls and their returns: the event that triggered the
    /// callback (see the module docs), if known.
    pub trigger: Option<u64>,
}

impl Correlation {
    fn plain(id: u64, ctype: CorrType) -> Correlation {
        Correlation {
            correlation_id: id,
            parent_id: None,
            root_id: None,
            links: Links::new(),
            ctype,
            confidence: 1.0,
            duration_ns: None,
            trigger: None,
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

/// One process's open calls in a [`CorrelatorDump`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackDump {
    /// The process.
    pub pid: u64,
    /// Tracked open calls.
    pub depth: usize,
    /// Open calls above them that were not tracked (bound reached).
    pub untracked: usize,
    /// Ids of the innermost open calls, innermost first.
    pub innermost: Vec<u64>,
}

/// [`Correlator::dump`]'s answer.
#[derive(Clone, Debug)]
pub struct CorrelatorDump {
    /// Processes with open calls.
    pub processes_with_open_calls: usize,
    /// Open calls in all.
    pub open_calls: usize,
    /// The deepest stacks.
    pub stacks: Vec<StackDump>,
    /// Sends waiting for their receive.
    pub queued_sends: usize,
    /// Receives waiting for their send.
    pub pending_receives: usize,
    /// Calls remembered for late returns.
    pub calls_indexed: usize,
    /// Spawn-tree entries.
    pub tree_entries: usize,
    /// Counters.
    pub metrics: CorrelatorMetrics,
    /// Bounds.
    pub config: CorrelatorConfig,
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
    /// OTP callback calls whose trigger was found.
    pub triggers_found: u64,
    /// OTP callback calls whose trigger was not found.
    pub triggers_unknown: u64,
    /// Server processes tracked now (see the module docs).
    pub servers: u64,
    /// Servers forgotten to stay within the bound.
    pub servers_evicted: u64,
    /// Receives dropped from a server's mailbox model to stay within
    /// [`MAILBOX_MAX`] (messages the server consumed without a callback,
    /// such as system messages or replies taken by a selective receive).
    pub mailbox_dropped: u64,
}

#[derive(Copy, Clone, Debug)]
struct Frame {
    id: u64,
    key: u64,
    ts: i64,
    parent: Option<u64>,
    root: u64,
    /// OTP callback calls: what triggered it (0: unknown).
    trigger: u64,
}

/// Receives a server keeps for matching to callbacks, at most.
pub const MAILBOX_MAX: usize = 32;

/// A process known to run OTP callbacks.
#[derive(Default, Debug)]
struct Server {
    /// `(message hash, receive id)` of receives not yet matched to a
    /// callback, oldest first.
    mailbox: VecDeque<(u64, u64)>,
    /// Its newest state record (0: none).
    last_state: u64,
    /// Arrival number (for eviction order).
    seq: u64,
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
    /// (sender, number of its sends in `items`); almost always one entry.
    senders: Vec<(u64, u32)>,
}

impl SendQueue {
    fn push(&mut self, s: QueuedSend) {
        match self.senders.iter_mut().find(|(p, _)| *p == s.sender) {
            Some((_, n)) => *n += 1,
            None => self.senders.push((s.sender, 1)),
        }
        self.items.push_back(s);
    }

    fn forget_sender(&mut self, sender: u64) {
        if let Some(i) = self.senders.iter().position(|(p, _)| *p == sender) {
            self.senders[i].1 -= 1;
            if self.senders[i].1 == 0 {
                self.senders.swap_remove(i);
            }
        }
    }

    /// Is the send with arrival number `seq` still queued?
    fn holds(&self, seq: u64) -> bool {
        self.items.binary_search_by_key(&seq, |s| s.seq).is_ok()
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
///
/// Tables keyed by pids and event ids use a cheap integer hasher; the
/// message tables, keyed by content hashes that senders can influence, use
/// the same hasher with a per-correlator random seed.
#[derive(Debug)]
pub struct Correlator {
    config: CorrelatorConfig,
    stacks: FastMap<u64, ProcStack>,
    calls: FastMap<u64, CallInfo>,
    call_order: VecDeque<u64>,
    /// Remember call id → (parent, root, pid) for [`Correlator::chain`]?
    call_index: bool,
    sends: SeededMap<MsgKey, SendQueue>,
    pending: SeededMap<MsgKey, VecDeque<PendingRecv>>,
    /// Arrival order of queued sends and pending receives, oldest first,
    /// with lazy deletion: entries of matched or swept messages stay until
    /// they reach the front or a compaction drops them.
    msg_order: VecDeque<(u64, MsgSide, MsgKey)>,
    /// Queued sends + pending receives.
    msg_live: usize,
    /// child → (parent, seq, spawn event id).
    tree: FastMap<u64, (u64, u64, u64)>,
    /// seq → child, arrival order of tree entries.
    tree_order: BTreeMap<u64, u64>,
    late: Vec<LateLink>,
    seq: u64,
    metrics: CorrelatorMetrics,
    /// key → (pid, its open frames with that key), when enabled.
    key_index: Option<FastMap<u64, (u64, u32)>>,
    /// Server processes (see the module docs).
    servers: FastMap<u64, Server>,
    /// `(seq, pid)` of servers in arrival order (lazy deletion).
    server_order: VecDeque<(u64, u64)>,
}

impl Correlator {
    /// A new, empty correlator.
    pub fn new(config: CorrelatorConfig) -> Correlator {
        Correlator {
            config,
            stacks: FastMap::default(),
            calls: FastMap::default(),
            call_order: VecDeque::new(),
            call_index: true,
            sends: SeededMap::with_hasher(Seeded::random()),
            pending: SeededMap::with_hasher(Seeded::random()),
            msg_order: VecDeque::new(),
            msg_live: 0,
            tree: FastMap::default(),
            tree_order: BTreeMap::new(),
            late: Vec::new(),
            seq: 0,
            metrics: CorrelatorMetrics::default(),
            key_index: None,
            servers: FastMap::default(),
            server_order: VecDeque::new(),
        }
    }

    /// Changes the TTL and the bound of a live correlator; entries beyond a
    /// lowered bound are evicted at once (oldest messages, then tree
    /// entries; counted in `evicted`). Open call frames are never evicted:
    /// if they alone exceed the bound, the excess stays until they close
    /// and new calls are refused meanwhile. Returns the entries evicted.
    pub fn set_config(&mut self, config: CorrelatorConfig) -> usize {
        self.config = config;
        let before = self.metrics.evicted;
        while self.metrics.active as usize > self.config.max_correlations {
            let evicted = if self.evict_oldest_message() {
                true
            } else if let Some((_, child)) = self.tree_order.pop_first() {
                self.tree.remove(&child);
                true
            } else {
                false
            };
            if !evicted {
                break;
            }
            self.metrics.evicted += 1;
            self.metrics.active -= 1;
        }
        (self.metrics.evicted - before) as usize
    }

    /// Stop remembering calls for [`Correlator::chain`] and
    /// [`Correlator::call_pid`] (they then return nothing). The pipeline
    /// does this: its store keeps the parent chain, and the index costs a
    /// cache-missing map insert and remove per call.
    pub fn disable_call_index(&mut self) {
        self.call_index = false;
        self.calls = FastMap::default();
        self.call_order = VecDeque::new();
    }

    /// Start keeping an index of the keys of open (tracked) frames, for
    /// [`Correlator::pid_for_key`]. Costs a small-map update per keyed call
    /// and per completed keyed frame. Idempotent.
    pub fn enable_key_index(&mut self) {
        if self.key_index.is_some() {
            return;
        }
        let mut idx = FastMap::default();
        for (&pid, st) in &self.stacks {
            for f in &st.frames {
                key_opened(&mut idx, f.key, pid);
            }
        }
        self.key_index = Some(idx);
    }

    /// The process with an open frame made with `key` (the one that made
    /// such a call most recently), if the key index is enabled (see
    /// [`Correlator::enable_key_index`]).
    pub fn pid_for_key(&self, key: u64) -> Option<u64> {
        if key == 0 {
            return None;
        }
        self.key_index.as_ref()?.get(&key).map(|&(pid, _)| pid)
    }

    /// The configuration.
    pub fn config(&self) -> CorrelatorConfig {
        self.config
    }

    /// A summary of the correlation state for debugging: the open call
    /// stacks (deepest first, at most `limit`, each with its innermost
    /// `limit` frame ids, innermost first) and the sizes of the message and
    /// process-tree tables.
    pub fn dump(&self, limit: usize) -> CorrelatorDump {
        let mut stacks: Vec<StackDump> = self
            .stacks
            .iter()
            .map(|(&pid, st)| StackDump {
                pid,
                depth: st.frames.len(),
                untracked: st.untracked as usize,
                innermost: st.frames.iter().rev().take(limit).map(|f| f.id).collect(),
            })
            .collect();
        stacks.sort_by(|a, b| b.depth.cmp(&a.depth).then(a.pid.cmp(&b.pid)));
        let processes = stacks.len();
        stacks.truncate(limit);
        CorrelatorDump {
            processes_with_open_calls: processes,
            open_calls: self.stacks.values().map(|s| s.frames.len()).sum(),
            stacks,
            queued_sends: self.sends.values().map(|q| q.items.len()).sum(),
            pending_receives: self.pending.values().map(|q| q.len()).sum(),
            calls_indexed: self.calls.len(),
            tree_entries: self.tree.len(),
            metrics: self.metrics,
            config: self.config,
        }
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
        self.tree.get(&pid).map(|&(p, _, _)| p)
    }

    /// Queued (unreceived) sends plus pending (unsent) receives.
    pub fn pending_messages(&self) -> usize {
        self.msg_live
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

    /// Is call `id` an open (tracked) frame on `pid`'s stack? O(depth).
    pub fn is_open_call(&self, pid: u64, id: u64) -> bool {
        self.stacks
            .get(&pid)
            .is_some_and(|s| s.frames.iter().rev().any(|f| f.id == id))
    }

    /// Approximate heap bytes held (table capacities times entry sizes;
    /// O(processes + message keys), for health reports).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        let slot = |k: usize, v: usize| k + v + 1;
        let frames: usize = self
            .stacks
            .values()
            .map(|s| s.frames.capacity() * size_of::<Frame>())
            .sum();
        let sends: usize = self
            .sends
            .values()
            .map(|q| {
                q.items.capacity() * size_of::<QueuedSend>() + q.senders.capacity() * slot(8, 4)
            })
            .sum();
        let recvs: usize = self
            .pending
            .values()
            .map(|q| q.capacity() * size_of::<PendingRecv>())
            .sum();
        self.stacks.capacity() * slot(8, size_of::<ProcStack>())
            + frames
            + self.calls.capacity() * slot(8, size_of::<CallInfo>())
            + self.call_order.capacity() * 8
            + self.sends.capacity() * slot(size_of::<MsgKey>(), size_of::<SendQueue>())
            + sends
            + self.pending.capacity()
                * slot(size_of::<MsgKey>(), size_of::<VecDeque<PendingRecv>>())
            + recvs
            // BTreeMap nodes: roughly 1.5x the payload.
            + self.msg_order.capacity() * size_of::<(u64, MsgSide, MsgKey)>()
            + self.tree.capacity() * slot(8, 24)
            + self.servers.capacity() * slot(8, size_of::<Server>())
            + self
                .servers
                .values()
                .map(|s| s.mailbox.capacity() * 16)
                .sum::<usize>()
            + self.server_order.capacity() * 16
            + self.tree_order.len() * 16 * 3 / 2
            + self.late.capacity() * size_of::<LateLink>()
            + self.key_index.as_ref().map_or(0, |k| k.capacity() * slot(8, 12))
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
        self.sends.retain(|_, q| {
            let mut i = 0;
            while i < q.items.len() {
                if q.items[i].ts < cutoff {
                    let s = q.items.remove(i).expect("index in range");
                    q.forget_sender(s.sender);
                    removed += 1;
                } else {
                    i += 1;
                }
            }
            !q.items.is_empty()
        });
        self.pending.retain(|_, q| {
            let before = q.len();
            q.retain(|r| r.ts >= cutoff);
            removed += before - q.len();
            !q.is_empty()
        });
        self.msg_live -= removed;
        self.compact_msg_order();
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
        if self.evict_oldest_message() {
            // done
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

    /// Drops the oldest queued send or pending receive; false if none.
    fn evict_oldest_message(&mut self) -> bool {
        while let Some((seq, side, key)) = self.msg_order.pop_front() {
            // Entries are popped in arrival order, so a live one is at the
            // front of its queue; anything else is a stale entry.
            let evicted = match side {
                MsgSide::Send => match self.sends.get_mut(&key) {
                    Some(q) if q.items.front().is_some_and(|f| f.seq == seq) => {
                        q.pop_front();
                        if q.items.is_empty() {
                            self.sends.remove(&key);
                        }
                        true
                    }
                    _ => false,
                },
                MsgSide::Recv => match self.pending.get_mut(&key) {
                    Some(q) if q.front().is_some_and(|f| f.seq == seq) => {
                        q.pop_front();
                        if q.is_empty() {
                            self.pending.remove(&key);
                        }
                        true
                    }
                    _ => false,
                },
            };
            if evicted {
                self.msg_live -= 1;
                return true;
            }
        }
        false
    }

    /// Records a newly queued send or pending receive.
    fn push_msg_order(&mut self, seq: u64, side: MsgSide, key: MsgKey) {
        self.msg_order.push_back((seq, side, key));
        self.msg_live += 1;
    }

    /// A queued send or pending receive was matched (left its queue).
    fn msg_matched(&mut self) {
        self.msg_live -= 1;
        self.compact_msg_order();
    }

    /// Drops stale order entries once they outnumber the live ones (amortized
    /// O(1) per message; each check is a binary search in one queue).
    fn compact_msg_order(&mut self) {
        if self.msg_order.len() <= 2 * self.msg_live + 1024 {
            return;
        }
        let (sends, pending) = (&self.sends, &self.pending);
        self.msg_order.retain(|&(seq, side, key)| match side {
            MsgSide::Send => sends.get(&key).is_some_and(|q| q.holds(seq)),
            MsgSide::Recv => pending
                .get(&key)
                .is_some_and(|q| q.binary_search_by_key(&seq, |r| r.seq).is_ok()),
        });
        if self.msg_order.capacity() > 4 * (self.msg_order.len() + 1024) {
            self.msg_order.shrink_to_fit();
        }
    }

    fn remember_call(&mut self, id: u64, info: CallInfo) {
        if !self.call_index {
            return;
        }
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
            if ev.callback != 0 {
                c.trigger = self.callback_trigger(ev);
            }
            c.root_id = bottom;
            c.confidence = 0.0;
            self.stacks.entry(ev.pid).or_default().untracked += 1;
            self.metrics.refused += 1;
            return c;
        }
        let root = bottom.unwrap_or(ev.id);
        let trigger = if ev.callback != 0 {
            let t = self.callback_trigger(ev);
            c.trigger = t;
            t.unwrap_or(0)
        } else {
            0
        };
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
                key: ev.key,
                ts: ev.timestamp,
                parent: top,
                root,
                trigger,
            });
            self.metrics.active += 1;
            if let Some(idx) = self.key_index.as_mut() {
                key_opened(idx, ev.key, ev.pid);
            }
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
            None if ev.key != 0 => st.frames.iter().rposition(|f| f.key == ev.key),
            None if st.untracked == 0 => st.frames.len().checked_sub(1),
            None => None,
        };
        if let Some(i) = pos {
            let skipped = (st.frames.len() - 1 - i) as u64 + st.untracked;
            let removed = (st.frames.len() - i) as u64;
            let f = st.frames[i];
            if let Some(idx) = self.key_index.as_mut() {
                for g in &st.frames[i..] {
                    key_closed(idx, g.key, ev.pid);
                }
            }
            st.frames.truncate(i);
            st.untracked = 0;
            self.metrics.unwound_frames += skipped;
            self.metrics.active -= removed;
            c.correlation_id = f.id;
            c.parent_id = f.parent;
            c.root_id = Some(f.root);
            c.links.push(Link::new(LinkKind::Completes, f.id));
            c.duration_ns = Some(ev.timestamp - f.ts);
            c.trigger = (f.trigger != 0).then_some(f.trigger);
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
        if ev.callback != 0 && ev.kind == CorrKind::Return {
            // A callback's return is a state record of its server.
            self.server(ev.pid).last_state = ev.id;
        }
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
            self.msg_matched();
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
            self.push_msg_order(seq, MsgSide::Send, key);
            self.metrics.active += 1;
        }
        c
    }

    fn on_receive(&mut self, ev: &CorrInput) -> Correlation {
        self.metrics.receives += 1;
        if let Some(srv) = self.servers.get_mut(&ev.pid) {
            srv.mailbox.push_back((ev.msg_hash, ev.id));
            if srv.mailbox.len() > MAILBOX_MAX {
                srv.mailbox.pop_front();
                self.metrics.mailbox_dropped += 1;
            }
        }
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
            self.msg_matched();
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
            self.push_msg_order(seq, MsgSide::Recv, key);
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
        if let Some(&(_, old_seq, _)) = self.tree.get(&ev.peer) {
            // Pid reuse: replace the entry in place.
            self.tree_order.remove(&old_seq);
            self.tree.remove(&ev.peer);
            self.metrics.active -= 1;
        }
        if self.make_room() {
            let seq = self.next_seq();
            self.tree.insert(ev.peer, (ev.pid, seq, ev.id));
            self.tree_order.insert(seq, ev.peer);
            self.metrics.active += 1;
        }
        c
    }

    fn on_exit(&mut self, ev: &CorrInput) -> Correlation {
        let mut c = Correlation::plain(ev.id, CorrType::ProcessExit);
        if let Some(st) = self.stacks.remove(&ev.pid) {
            if let Some(idx) = self.key_index.as_mut() {
                for g in &st.frames {
                    key_closed(idx, g.key, ev.pid);
                }
            }
            self.metrics.orphaned_calls += st.frames.len() as u64 + st.untracked;
            self.metrics.active -= st.frames.len() as u64;
        }
        if self.servers.remove(&ev.pid).is_some() {
            self.metrics.servers -= 1;
        }
        if let Some((parent, seq, _)) = self.tree.remove(&ev.pid) {
            self.tree_order.remove(&seq);
            self.metrics.active -= 1;
            c.links.push(Link::new(LinkKind::SpawnedBy, parent));
        }
        c
    }

    fn on_state_change(&mut self, ev: &CorrInput) -> Correlation {
        self.server(ev.pid).last_state = ev.id;
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

impl Correlator {
    /// The server entry of `pid`, created (and the oldest evicted beyond
    /// the bound) if new.
    fn server(&mut self, pid: u64) -> &mut Server {
        if !self.servers.contains_key(&pid) {
            let max = (self.config.max_correlations / 8).max(1024);
            while self.servers.len() >= max {
                let Some((seq, old)) = self.server_order.pop_front() else {
                    break;
                };
                if self.servers.get(&old).is_some_and(|s| s.seq == seq) {
                    self.servers.remove(&old);
                    self.metrics.servers -= 1;
                    self.metrics.servers_evicted += 1;
                }
            }
            if self.server_order.len() > 2 * self.servers.len() + 64 {
                let servers = &self.servers;
                self.server_order
                    .retain(|&(seq, p)| servers.get(&p).is_some_and(|s| s.seq == seq));
            }
            let seq = self.next_seq();
            self.server_order.push_back((seq, pid));
            self.metrics.servers += 1;
            self.servers.insert(
                pid,
                Server {
                    seq,
                    ..Server::default()
                },
            );
        }
        self.servers.get_mut(&pid).expect("inserted above")
    }

    /// The trigger of an OTP callback call (see the module docs).
    fn callback_trigger(&mut self, ev: &CorrInput) -> Option<u64> {
        let init =
            crate::event::Callback::of_flags(ev.callback) == Some(crate::event::Callback::Init);
        let spawn = init
            .then(|| self.tree.get(&ev.pid).map(|&(_, _, id)| id))
            .flatten();
        let hash = ev.msg_hash;
        let srv = self.server(ev.pid);
        let found = if hash != 0 {
            srv.mailbox
                .iter()
                .position(|&(h, _)| h == hash)
                .and_then(|i| srv.mailbox.remove(i))
                .map(|(_, id)| id)
        } else {
            None
        };
        let last = (srv.last_state != 0).then_some(srv.last_state);
        let t = found.or(if init { spawn } else { last });
        if t.is_some() {
            self.metrics.triggers_found += 1;
        } else {
            self.metrics.triggers_unknown += 1;
        }
        t
    }
}

/// Count an open frame of `pid` made with `key` (0: none) in a key index.
fn key_opened(idx: &mut FastMap<u64, (u64, u32)>, key: u64, pid: u64) {
    if key == 0 {
        return;
    }
    let e = idx.entry(key).or_insert((pid, 0));
    if e.0 != pid {
        // The most recent caller wins; the other process's frames with this
        // key are no longer found through the index.
        *e = (pid, 0);
    }
    e.1 += 1;
}

/// Forget an open frame of `pid` made with `key` (see [`key_opened`]).
fn key_closed(idx: &mut FastMap<u64, (u64, u32)>, key: u64, pid: u64) {
    if key == 0 {
        return;
    }
    if let Some(e) = idx.get_mut(&key) {
        if e.0 == pid {
            e.1 -= 1;
            if e.1 == 0 {
                idx.remove(&key);
            }
        }
    }
}

// ---- Tracker ----------------------------------------------------------------

/// The `pid` of a [`Tracker`] input whose process is unknown (see
/// [`Tracker::correlate`]).
pub const UNKNOWN_PID: u64 = 0;

/// What a [`Tracker`] remembers about one correlation: every correlated
/// event except returns/exceptions, receives matched at once, and
/// [`CorrKind::Other`] events creates one, keyed by the event id.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct CorrRecord {
    /// Correlation type of the event that created it.
    pub ctype: CorrType,
    /// The creating input's `timestamp` (the TTL counts from it).
    pub created_at: i64,
    /// Acting process.
    pub pid: u64,
    /// The other process: receiver of a send, child of a spawn; else 0.
    pub peer: u64,
    /// Enclosing call when the event was correlated.
    pub parent_id: Option<u64>,
    /// Bottom of that call stack.
    pub root_id: Option<u64>,
    /// The event's link: `CalledFrom` (calls), `SpawnedBy` (spawns, exits),
    /// `StateIn` (state changes) or `Receives` (a receive whose send came
    /// later, set by the late link).
    pub link: Option<Link>,
    /// Confidence of `link` (0.0 for a receive still waiting for its send).
    pub confidence: f32,
    /// Calls: the return or exception that completed it.
    pub completed_by: Option<u64>,
    /// Sends: the receive that took the message.
    pub received_by: Option<u64>,
    /// Calls: the input's `module` and `function` (0: unknown; 0 for
    /// other records).
    pub module: u64,
    /// See `module`.
    pub function: u64,
}

/// [`Tracker`] counters (cumulative except `records`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerMetrics {
    /// Events correlated.
    pub events: u64,
    /// Records created.
    pub created: u64,
    /// Records created by calls.
    pub function: u64,
    /// Records created by sends and by receives that arrived before their
    /// send.
    pub message: u64,
    /// [`CorrKind::Other`] events.
    pub unknown: u64,
    /// Late links applied (receives linked when their send arrived).
    pub late_links: u64,
    /// Records now.
    pub records: u64,
    /// Records removed by [`Tracker::sweep`].
    pub records_expired: u64,
    /// Records evicted to stay within `max_correlations`.
    pub records_evicted: u64,
    /// Returns whose process was found through their key or call id.
    pub pid_resolved: u64,
}

const R_PARENT: u8 = 1;
const R_ROOT: u8 = 2;
const R_BY: u8 = 4;
const R_LINK: u8 = 8;
/// Superseded by a newer record with the same id.
const R_DEAD: u8 = 16;
/// Not a record: an update of record `id` (`by`, or `link` + confidence).
const R_UPDATE: u8 = 32;

/// An entry of the tracker's log: a record, or an update of an earlier one.
#[derive(Copy, Clone, Debug)]
struct Rec {
    id: u64,
    created_at: i64,
    pid: u64,
    peer: u64,
    parent: u64,
    root: u64,
    link_target: u64,
    /// `completed_by` (calls) or `received_by` (sends).
    by: u64,
    confidence: f32,
    module: u64,
    function: u64,
    ctype: CorrType,
    link_kind: LinkKind,
    flags: u8,
}

impl Rec {
    fn public(&self) -> CorrRecord {
        let opt = |bit: u8, v: u64| (self.flags & bit != 0).then_some(v);
        let by = opt(R_BY, self.by);
        let is_call = self.ctype == CorrType::FunctionCall;
        CorrRecord {
            ctype: self.ctype,
            created_at: self.created_at,
            pid: self.pid,
            peer: self.peer,
            parent_id: opt(R_PARENT, self.parent),
            root_id: opt(R_ROOT, self.root),
            link: opt(R_LINK, self.link_target).map(|t| Link::new(self.link_kind, t)),
            confidence: self.confidence,
            completed_by: if is_call { by } else { None },
            received_by: if is_call { None } else { by },
            module: self.module,
            function: self.function,
        }
    }

    fn update(id: u64, at: i64) -> Rec {
        Rec {
            id,
            created_at: at,
            pid: 0,
            peer: 0,
            parent: 0,
            root: 0,
            link_target: 0,
            by: 0,
            confidence: 0.0,
            module: 0,
            function: 0,
            ctype: CorrType::Unknown,
            link_kind: LinkKind::Receives,
            flags: R_UPDATE,
        }
    }
}

/// A [`Correlator`] plus what an interactive API needs: a record per
/// correlation ([`Tracker::record`], [`Tracker::chain`]), late links
/// applied to those records, and returns whose process is unknown.
///
/// * **Records** are kept for at most `ttl_ns` after creation (see
///   [`Tracker::sweep`]) and at most `max_correlations` of them (the oldest
///   is evicted first). Correlating only appends to a log (a record, or an
///   update of an earlier record: a completion, a receipt, a late link);
///   the id index that lookups use is brought up to date when a lookup
///   needs it, so correlation never touches it.
/// * **Returns.** A return/exception input may carry both a `call_id` and a
///   `key` derived from the same caller-supplied term; `call_id` is used
///   only if it names an open call of the return's process; else it is
///   dropped and `key` decides. A return with `pid == UNKNOWN_PID` takes
///   the process of the most recent open call made with its key (see
///   [`Correlator::pid_for_key`]), else of the call its `call_id` names.
/// * **Late links**: when a send arrives for a receive seen earlier, the
///   receive's record gets the `Receives` link and the send's record its
///   `received_by`.
#[derive(Debug)]
pub struct Tracker {
    corr: Correlator,
    /// The log, in creation order; `log[i]` has sequence number `base + i`.
    log: VecDeque<Rec>,
    base: u64,
    /// Records (not updates) in the log, superseded ones included.
    records: usize,
    /// id → sequence number of its newest record, for entries before
    /// `indexed_to`; entries below `base` are stale.
    index: FastMap<u64, u64>,
    indexed_to: u64,
    metrics: TrackerMetrics,
}

impl Tracker {
    /// A new, empty tracker.
    pub fn new(config: CorrelatorConfig) -> Tracker {
        let mut corr = Correlator::new(config);
        corr.enable_key_index();
        Tracker {
            corr,
            log: VecDeque::new(),
            base: 0,
            records: 0,
            index: FastMap::default(),
            indexed_to: 0,
            metrics: TrackerMetrics::default(),
        }
    }

    /// The underlying correlator.
    pub fn correlator(&self) -> &Correlator {
        &self.corr
    }

    /// Tracker counters.
    pub fn metrics(&self) -> TrackerMetrics {
        TrackerMetrics {
            records: self.records as u64,
            ..self.metrics
        }
    }

    /// The record of correlation `id`, if kept. Brings the lookup index up
    /// to date first (O(entries logged since the last lookup)).
    pub fn record(&mut self, id: u64) -> Option<CorrRecord> {
        self.catch_up();
        self.rec(id).map(Rec::public)
    }

    /// The records from the root down to `id`, following `parent_id`:
    /// `[root, ..., parent, id]`; empty if `id` has no record. Stops at the
    /// first ancestor without a record (expired or evicted).
    pub fn chain(&mut self, id: u64) -> Vec<u64> {
        self.catch_up();
        let mut out = Vec::new();
        let mut cur = Some(id);
        while let Some(c) = cur {
            let Some(r) = self.rec(c) else {
                break;
            };
            out.push(c);
            if out.len() > self.records {
                break; // defensive against id reuse forming a cycle
            }
            cur = (r.flags & R_PARENT != 0).then_some(r.parent);
        }
        out.reverse();
        out
    }

    /// Approximate heap bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.corr.memory_bytes()
            + self.log.capacity() * std::mem::size_of::<Rec>()
            + self.index.capacity() * 17
    }

    /// Correlate one event (see the type docs for what differs from
    /// [`Correlator::correlate`]).
    pub fn correlate(&mut self, ev: &CorrInput) -> Correlation {
        let mut ev = *ev;
        if matches!(ev.kind, CorrKind::Return | CorrKind::Exception) {
            self.resolve_return(&mut ev);
        }
        let c = self.corr.correlate(&ev);
        self.metrics.events += 1;
        let first = c.links.first().copied();
        let now = ev.timestamp;
        match ev.kind {
            CorrKind::Call => {
                self.metrics.function += 1;
                self.add_record(&ev, &c, 0);
            }
            CorrKind::Return | CorrKind::Exception => {
                if let Some(Link {
                    kind: LinkKind::Completes,
                    target,
                }) = first
                {
                    self.add_update(Rec {
                        by: ev.id,
                        flags: R_UPDATE | R_BY,
                        ..Rec::update(target, now)
                    });
                }
            }
            CorrKind::Send => {
                self.metrics.message += 1;
                self.add_record(&ev, &c, ev.peer);
                for late in self.corr.take_late_links() {
                    self.metrics.late_links += 1;
                    self.add_update(Rec {
                        link_target: late.link.target,
                        link_kind: late.link.kind,
                        confidence: late.confidence,
                        flags: R_UPDATE | R_LINK,
                        ..Rec::update(late.event, now)
                    });
                    self.add_update(Rec {
                        by: late.event,
                        flags: R_UPDATE | R_BY,
                        ..Rec::update(late.link.target, now)
                    });
                }
            }
            CorrKind::Receive => match first {
                Some(Link {
                    kind: LinkKind::Receives,
                    target,
                }) => self.add_update(Rec {
                    by: ev.id,
                    flags: R_UPDATE | R_BY,
                    ..Rec::update(target, now)
                }),
                _ => {
                    self.metrics.message += 1;
                    self.add_record(&ev, &c, 0);
                }
            },
            CorrKind::Spawn => self.add_record(&ev, &c, ev.peer),
            CorrKind::Exit | CorrKind::StateChange => self.add_record(&ev, &c, 0),
            CorrKind::Other => self.metrics.unknown += 1,
        }
        c
    }

    /// Remove records created before `now_ns - ttl_ns`, then run
    /// [`Correlator::sweep`]; returns `(records removed, correlator entries
    /// removed)`.
    pub fn sweep(&mut self, now_ns: i64) -> (usize, usize) {
        let cutoff = now_ns.saturating_sub(self.corr.config().ttl_ns);
        let mut removed = 0usize;
        while self.log.front().is_some_and(|r| r.created_at < cutoff) {
            if self.pop_front() {
                removed += 1;
            }
        }
        self.metrics.records_expired += removed as u64;
        (removed, self.corr.sweep(now_ns))
    }

    fn resolve_return(&mut self, ev: &mut CorrInput) {
        if ev.pid == UNKNOWN_PID {
            let by_key = self.corr.pid_for_key(ev.key);
            let by_call = || ev.call_id.and_then(|cid| self.corr.call_pid(cid));
            if let Some(p) = by_key.or_else(by_call) {
                if p != UNKNOWN_PID {
                    ev.pid = p;
                    self.metrics.pid_resolved += 1;
                }
            }
        }
        if let Some(cid) = ev.call_id {
            if !self.corr.is_open_call(ev.pid, cid) {
                ev.call_id = None;
            }
        }
    }

    fn max(&self) -> usize {
        self.corr.config().max_correlations.max(1)
    }

    fn rec(&self, id: u64) -> Option<&Rec> {
        let seq = *self.index.get(&id)?;
        let r = self.log.get(seq.checked_sub(self.base)? as usize)?;
        (r.id == id && r.flags & (R_UPDATE | R_DEAD) == 0).then_some(r)
    }

    /// Index the entries logged since the last lookup, applying updates.
    fn catch_up(&mut self) {
        let end = self.base + self.log.len() as u64;
        // Rebuild when stale entries (evicted records) dominate the index.
        if self.index.len() > 2 * self.records + 1024 {
            self.index.clear();
            self.indexed_to = self.base;
        }
        let mut seq = self.indexed_to.max(self.base);
        while seq < end {
            let i = (seq - self.base) as usize;
            let e = self.log[i];
            if e.flags & R_UPDATE == 0 {
                if let Some(old) = self.index.insert(e.id, seq) {
                    if let Some(j) = old.checked_sub(self.base) {
                        if let Some(r) = self.log.get_mut(j as usize) {
                            if r.id == e.id && r.flags & R_UPDATE == 0 {
                                r.flags |= R_DEAD;
                            }
                        }
                    }
                }
            } else if let Some(&rs) = self.index.get(&e.id) {
                if let Some(j) = rs.checked_sub(self.base) {
                    if let Some(r) = self.log.get_mut(j as usize) {
                        if r.id == e.id && r.flags & (R_UPDATE | R_DEAD) == 0 {
                            if e.flags & R_BY != 0 {
                                r.by = e.by;
                                r.flags |= R_BY;
                            }
                            if e.flags & R_LINK != 0 {
                                r.link_target = e.link_target;
                                r.link_kind = e.link_kind;
                                r.confidence = e.confidence;
                                r.flags |= R_LINK;
                            }
                        }
                    }
                }
            }
            seq += 1;
        }
        self.indexed_to = end;
    }

    /// Drop the oldest log entry; true if it was a record.
    fn pop_front(&mut self) -> bool {
        let Some(r) = self.log.pop_front() else {
            return false;
        };
        self.base += 1;
        if r.flags & R_UPDATE == 0 {
            self.records -= 1;
            true
        } else {
            false
        }
    }

    fn add_record(&mut self, ev: &CorrInput, c: &Correlation, peer: u64) {
        let mut flags = 0;
        if c.parent_id.is_some() {
            flags |= R_PARENT;
        }
        if c.root_id.is_some() {
            flags |= R_ROOT;
        }
        let (link_kind, link_target) = match c.links.first() {
            Some(l) => {
                flags |= R_LINK;
                (l.kind, l.target)
            }
            None => (LinkKind::Receives, 0),
        };
        let confidence = if ev.kind == CorrKind::Receive {
            0.0 // waiting for its send
        } else {
            c.confidence
        };
        self.log.push_back(Rec {
            id: ev.id,
            created_at: ev.timestamp,
            pid: ev.pid,
            peer,
            parent: c.parent_id.unwrap_or(0),
            root: c.root_id.unwrap_or(0),
            link_target,
            by: 0,
            confidence,
            module: if ev.kind == CorrKind::Call {
                ev.module
            } else {
                0
            },
            function: if ev.kind == CorrKind::Call {
                ev.function
            } else {
                0
            },
            ctype: c.ctype,
            link_kind,
            flags,
        });
        self.records += 1;
        self.metrics.created += 1;
        self.trim();
    }

    fn add_update(&mut self, u: Rec) {
        self.log.push_back(u);
        self.trim();
    }

    /// Keep at most `max` records and `2 * max` entries.
    fn trim(&mut self) {
        let max = self.max();
        while self.records > max || self.log.len() > 2 * max {
            if self.pop_front() {
                self.metrics.records_evicted += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn correlator_is_send() {
        assert_send::<Correlator>();
        assert_send::<Tracker>();
    }
}
