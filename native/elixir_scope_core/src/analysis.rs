//! Whole-trace questions over an [`EventStore`]: call statistics, repeated
//! call trees and message flow (what Erlang Doctor's `call_stat`,
//! `top_call_trees` and message queries answer).
//!
//! Each is one pass over the store in `seq` order, which is each process's
//! event order (over an [`EventStore`] under its lock, or over a
//! [`crate::store::Snapshot`] without it, so ingest goes on during the
//! pass): per process, a stack of open calls is pushed by call events
//! and popped by the return or exception that completes the call (its
//! correlation id is the call's id; frames above it, left by a crash, are
//! unwound). Calls whose return is not stored count as calls, without time.
//! Memory is bounded by the number of distinct keys (capped, see
//! [`MAX_KEYS`]) plus the open frames.

use crate::event::EventKind;
use crate::hash::{hash_bytes, mix, FastMap};
use crate::store::{CutHeads, EventStore, Scan, Snapshot, StoredEvent};

/// Most distinct keys (functions, call trees) one pass tracks; further new
/// keys are counted in the result's `untracked`.
pub const MAX_KEYS: usize = 1 << 20;

/// What [`call_stats`] groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKey {
    /// `{module, function, arity}`.
    Function,
    /// Module.
    Module,
    /// Process.
    Process,
    /// `{pid, module, function, arity}`.
    ProcessFunction,
}

/// Statistics of one key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStat {
    /// Pid word (0 unless grouped by process).
    pub pid: u64,
    /// Module word (0 when grouped by process only).
    pub module: u64,
    /// Function word (0 unless grouped by function).
    pub function: u64,
    /// Arity (-1 unless grouped by function).
    pub arity: i64,
    /// Calls.
    pub count: u64,
    /// Time inside the calls, ns, counting a recursive call of the same key
    /// in the same process once (its outermost call).
    pub acc_ns: i64,
    /// Time inside the calls minus the time in their traced callees, ns.
    pub own_ns: i64,
}

/// [`call_stats`]' answer.
#[derive(Clone, Debug, Default)]
pub struct CallStats {
    /// One entry per key, by `acc_ns` descending.
    pub stats: Vec<CallStat>,
    /// Events scanned.
    pub scanned: u64,
    /// Calls whose key was not tracked ([`MAX_KEYS`] reached).
    pub untracked: u64,
}

#[derive(Clone, Copy)]
struct Frame {
    call_id: u64,
    key: u32,
    ts: i64,
    child_ns: i64,
    /// Tree hash so far (call, then each completed child).
    hash: u64,
    size: u64,
}

/// Open calls per process, with a one-entry cache (consecutive events are
/// often of the same process).
#[derive(Default)]
struct Stacks {
    map: FastMap<u64, Vec<Frame>>,
}

impl Stacks {
    #[inline]
    fn of(&mut self, pid: u64) -> &mut Vec<Frame> {
        self.map.entry(pid).or_default()
    }
}

/// The frame index completed by a return of `call_id`, if open.
#[inline]
fn completed(stack: &[Frame], call_id: u64) -> Option<usize> {
    stack.iter().rposition(|f| f.call_id == call_id)
}

#[inline]
fn is_exit(kind: u8) -> bool {
    kind == EventKind::FunctionReturn as u8 || kind == EventKind::FunctionException as u8
}

/// Duration of a completed call: the stored one, else the timestamps'.
#[inline]
fn duration(ret: &StoredEvent<'_>, f: &Frame) -> i64 {
    if ret.aux > 0 {
        ret.aux
    } else {
        (ret.timestamp - f.ts).max(0)
    }
}

/// Call counts and times per key, over every stored event (optionally only
/// calls of the modules in `modules`, empty = all).
pub fn call_stats<S: Scan>(store: &S, by: StatKey, modules: &[u64]) -> CallStats {
    let mut out = CallStats::default();
    let mut keys: FastMap<(u64, u64, u64, i64), u32> = FastMap::default();
    let mut stats: Vec<CallStat> = Vec::new();
    // Open calls of a key per (pid, key): recursion counts its time once.
    let mut active: FastMap<(u64, u32), u32> = FastMap::default();
    let mut stacks = Stacks::default();
    const NONE: u32 = u32::MAX;
    store.scan_events(0, usize::MAX, |e| {
        out.scanned += 1;
        if e.kind == EventKind::FunctionCall as u8 {
            let wanted = modules.is_empty() || modules.contains(&e.module);
            let k = match by {
                StatKey::Function => (0, e.module, e.function, e.aux),
                StatKey::Module => (0, e.module, 0, -1),
                StatKey::Process => (e.pid, 0, 0, -1),
                StatKey::ProcessFunction => (e.pid, e.module, e.function, e.aux),
            };
            let key = if !wanted {
                NONE
            } else if let Some(&i) = keys.get(&k) {
                i
            } else if stats.len() < MAX_KEYS {
                let i = stats.len() as u32;
                keys.insert(k, i);
                stats.push(CallStat {
                    pid: k.0,
                    module: k.1,
                    function: k.2,
                    arity: k.3,
                    ..CallStat::default()
                });
                i
            } else {
                out.untracked += 1;
                NONE
            };
            if key != NONE {
                stats[key as usize].count += 1;
                *active.entry((e.pid, key)).or_default() += 1;
            }
            stacks.of(e.pid).push(Frame {
                call_id: e.id,
                key,
                ts: e.timestamp,
                child_ns: 0,
                hash: 0,
                size: 0,
            });
        } else if is_exit(e.kind) {
            let stack = stacks.of(e.pid);
            let Some(i) = completed(stack, e.correlation_id) else {
                return;
            };
            // Frames above the completed one were left without a return.
            for f in stack.drain(i + 1..) {
                if f.key != NONE {
                    if let Some(n) = active.get_mut(&(e.pid, f.key)) {
                        *n -= 1;
                    }
                }
            }
            let f = stack.pop().expect("frame i exists");
            let d = duration(e, &f);
            if let Some(parent) = stack.last_mut() {
                parent.child_ns += d;
            }
            if f.key != NONE {
                let s = &mut stats[f.key as usize];
                s.own_ns += (d - f.child_ns).max(0);
                if let Some(n) = active.get_mut(&(e.pid, f.key)) {
                    *n -= 1;
                    if *n == 0 {
                        s.acc_ns += d;
                    }
                }
            }
            if stack.is_empty() {
                stacks.map.remove(&e.pid);
            }
        }
    });
    stats.sort_by(|a, b| b.acc_ns.cmp(&a.acc_ns).then(b.count.cmp(&a.count)));
    out.stats = stats;
    out
}

/// A call tree that occurs more than once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepeatedTree {
    /// Tree hash (function, arguments, return value and children, in order).
    pub hash: u64,
    /// Occurrences.
    pub count: u64,
    /// Calls in one occurrence.
    pub size: u64,
    /// Time of all occurrences, ns.
    pub total_ns: i64,
    /// The root call of the first occurrence.
    pub first_call_id: u64,
}

/// [`top_call_trees`]' answer.
#[derive(Clone, Debug, Default)]
pub struct TopTrees {
    /// The repeated trees, by `total_ns` descending, at most `max`.
    pub trees: Vec<RepeatedTree>,
    /// Distinct trees seen.
    pub distinct: u64,
    /// Completed trees not tracked ([`MAX_KEYS`] reached).
    pub untracked: u64,
}

/// Identical call trees that repeat: same function, arguments (the stored
/// payload, so under the capture's size cap) and return value, with the same
/// child trees in the same order. Keeps trees seen at least `min_count`
/// times with at least `min_size` calls; returns the `max` with the most
/// total time.
pub fn top_call_trees<S: Scan>(store: &S, max: usize, min_count: u64, min_size: u64) -> TopTrees {
    let mut out = TopTrees::default();
    let mut trees: FastMap<u64, RepeatedTree> = FastMap::default();
    let mut stacks = Stacks::default();
    store.scan_events(0, usize::MAX, |e| {
        if e.kind == EventKind::FunctionCall as u8 {
            let h = mix(e.module ^ mix(e.function ^ mix(e.aux as u64)))
                ^ hash_bytes(e.payload).rotate_left(17);
            stacks.of(e.pid).push(Frame {
                call_id: e.id,
                key: 0,
                ts: e.timestamp,
                child_ns: 0,
                hash: h,
                size: 1,
            });
        } else if is_exit(e.kind) {
            let stack = stacks.of(e.pid);
            let Some(i) = completed(stack, e.correlation_id) else {
                return;
            };
            // A crash left the frames above: they are part of this tree.
            while stack.len() > i + 1 {
                let f = stack.pop().expect("frame above i");
                let top = stack.last_mut().expect("frame i");
                top.hash = mix(top.hash ^ f.hash.rotate_left(7));
                top.size += f.size;
            }
            let f = stack.pop().expect("frame i exists");
            let d = duration(e, &f);
            let h = mix(f.hash ^ mix(e.kind as u64 ^ hash_bytes(e.payload)));
            if let Some(parent) = stack.last_mut() {
                parent.hash = mix(parent.hash ^ h.rotate_left(7));
                parent.size += f.size;
            }
            if stack.is_empty() {
                stacks.map.remove(&e.pid);
            }
            if f.size < min_size {
                return;
            }
            let room = trees.len() < MAX_KEYS;
            match trees.get_mut(&h) {
                Some(t) => {
                    t.count += 1;
                    t.total_ns += d;
                }
                None if room => {
                    trees.insert(
                        h,
                        RepeatedTree {
                            hash: h,
                            count: 1,
                            size: f.size,
                            total_ns: d,
                            first_call_id: f.call_id,
                        },
                    );
                }
                None => out.untracked += 1,
            }
        }
    });
    out.distinct = trees.len() as u64;
    let mut v: Vec<RepeatedTree> = trees
        .into_values()
        .filter(|t| t.count >= min_count.max(1))
        .collect();
    v.sort_by(|a, b| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.count.cmp(&a.count))
            .then(a.first_call_id.cmp(&b.first_call_id))
    });
    v.truncate(max);
    out.trees = v;
    out
}

/// One message: its send, its receive (if traced and matched) and the
/// call the send was made from (if any).
#[derive(Clone, Copy, Debug)]
pub struct Flow<'s> {
    /// The send event.
    pub send: StoredEvent<'s>,
    /// The matching receive.
    pub receive: Option<StoredEvent<'s>>,
    /// The call the sender was in.
    pub in_call: Option<StoredEvent<'s>>,
}

/// The sends of [`message_flow`], and where to continue.
fn find_sends<S: Scan>(
    store: &S,
    pid: u64,
    from: u64,
    limit: usize,
) -> (Vec<StoredEvent<'_>>, Option<u64>) {
    let mut sends: Vec<StoredEvent<'_>> = Vec::new();
    let mut next = Some(from);
    while let Some(at) = next {
        if sends.len() >= limit {
            break;
        }
        next = store.scan_events(at, 4096, |e| {
            if e.kind == EventKind::MessageSend as u8
                && (pid == 0 || e.pid == pid || e.peer == pid)
                && sends.len() < limit
            {
                sends.push(*e);
            }
        });
        if sends.len() >= limit {
            // Continue after the last send taken.
            next = sends.last().map(|s| s.seq + 1);
        }
    }
    (sends, next)
}

/// Messages sent (by `pid`, or sent to `pid`, or all when `pid` is 0), in
/// store order from sequence number `from`, at most `limit`; returns them
/// and where to continue (`None`: done).
pub fn message_flow(
    store: &EventStore,
    pid: u64,
    from: u64,
    limit: usize,
) -> (Vec<Flow<'_>>, Option<u64>) {
    let (sends, next) = find_sends(store, pid, from, limit);
    let flows = sends
        .into_iter()
        .map(|s| {
            let receive = store
                .by_correlation(s.id, 8, crate::store::Order::Asc)
                .into_iter()
                .find(|r| r.kind == EventKind::MessageReceive as u8 && r.correlation_id == s.id);
            let in_call = (s.parent_id != 0).then(|| store.get(s.parent_id)).flatten();
            Flow {
                send: s,
                receive,
                in_call,
            }
        })
        .collect();
    (flows, next)
}

/// [`message_flow`] over a [`Snapshot`]: the sends are found without the
/// store's lock; `heads` is called once, with the send ids (their
/// receives' correlation ids) and the parent ids (their calls), to fetch
/// the chains' entry points into the cut from the store
/// ([`EventStore::cut_heads`], under its lock, briefly). Lookups whose
/// entry is unknown are answered by one scan of the snapshot. The answer
/// is [`message_flow`]'s over the store frozen at the cut.
pub fn message_flow_cut<'s>(
    snap: &'s Snapshot,
    pid: u64,
    from: u64,
    limit: usize,
    heads: impl FnOnce(&[u64], &[u64]) -> CutHeads,
) -> (Vec<Flow<'s>>, Option<u64>) {
    let (sends, next) = find_sends(snap, pid, from, limit);
    let corrs: Vec<u64> = sends.iter().map(|s| s.id).collect();
    let parents: Vec<u64> = (sends.iter())
        .filter(|s| s.parent_id != 0)
        .map(|s| s.parent_id)
        .collect();
    let heads = heads(&parents, &corrs);
    let mut flows: Vec<Flow<'s>> = Vec::with_capacity(sends.len());
    let (mut lost_ids, mut lost_corrs): (FastMap<u64, ()>, FastMap<u64, ()>) = Default::default();
    for &s in &sends {
        let receive = snap
            .by_correlation_at_cut(&heads, s.id, 8)
            .map(first_receive);
        let in_call = match s.parent_id {
            0 => Some(None),
            p => snap.get_at_cut(&heads, p),
        };
        if receive.is_none() {
            lost_corrs.insert(s.id, ());
        }
        if in_call.is_none() {
            lost_ids.insert(s.parent_id, ());
        }
        flows.push(Flow {
            send: s,
            receive: receive.flatten(),
            in_call: in_call.flatten(),
        });
    }
    if !lost_ids.is_empty() || !lost_corrs.is_empty() {
        // Entry points lost to records freed since the cut: one scan.
        let mut by_id: FastMap<u64, StoredEvent<'s>> = FastMap::default();
        let mut by_corr: FastMap<u64, Vec<StoredEvent<'s>>> = FastMap::default();
        snap.scan(0, usize::MAX, |e| {
            if lost_ids.contains_key(&e.id) {
                by_id.insert(e.id, *e);
            }
            if lost_corrs.contains_key(&e.correlation_id) {
                let v = by_corr.entry(e.correlation_id).or_default();
                if v.len() < 8 {
                    v.push(*e);
                }
            }
        });
        for f in &mut flows {
            if lost_corrs.contains_key(&f.send.id) {
                f.receive = first_receive(by_corr.remove(&f.send.id).unwrap_or_default());
            }
            if f.send.parent_id != 0 && lost_ids.contains_key(&f.send.parent_id) {
                f.in_call = by_id.get(&f.send.parent_id).copied();
            }
        }
    }
    (flows, next)
}

/// The receive of send `id` among the first events correlated with it.
fn first_receive(evs: Vec<StoredEvent<'_>>) -> Option<StoredEvent<'_>> {
    evs.into_iter()
        .find(|r| r.kind == EventKind::MessageReceive as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::store::{CorrelationFields, StoreConfig};

    const M: u64 = 100;
    const FIB: u64 = 7;
    const ADD: u64 = 8;

    struct Trace {
        store: EventStore,
        next_id: u64,
        ts: i64,
    }

    impl Trace {
        fn new() -> Trace {
            Trace {
                store: EventStore::new(StoreConfig::default()),
                next_id: 1,
                ts: 0,
            }
        }

        #[allow(clippy::too_many_arguments)]
        fn put(
            &mut self,
            kind: EventKind,
            pid: u64,
            f: u64,
            aux: i64,
            corr: u64,
            parent: u64,
            payload: &[u8],
        ) -> u64 {
            let id = self.next_id;
            self.next_id += 1;
            self.ts += 10;
            let ev = Event {
                id,
                timestamp: self.ts,
                pid,
                module: M,
                function: f,
                aux,
                kind: kind as u8,
                payload: payload.to_vec(),
                ..Event::default()
            };
            let corr = CorrelationFields {
                correlation_id: if corr == 0 { id } else { corr },
                parent_id: parent,
                root_id: 0,
            };
            self.store.insert(&ev, corr);
            id
        }

        fn call(&mut self, pid: u64, f: u64, parent: u64, args: &[u8]) -> u64 {
            self.put(EventKind::FunctionCall, pid, f, 1, 0, parent, args)
        }

        fn ret(&mut self, pid: u64, f: u64, call: u64, parent: u64, value: &[u8]) -> u64 {
            self.put(EventKind::FunctionReturn, pid, f, 0, call, parent, value)
        }
    }

    #[test]
    fn call_stats_own_and_recursive_acc_time() {
        let mut t = Trace::new();
        // fib(2) -> fib(1), add ; all on pid 1; timestamps step by 10.
        let a = t.call(1, FIB, 0, b"2"); // ts 10
        let b = t.call(1, FIB, a, b"1"); // 20
        t.ret(1, FIB, b, a, b"1"); // 30: fib(1) = 10 ns
        let c = t.call(1, ADD, a, b""); // 40
        t.ret(1, ADD, c, a, b""); // 50: add = 10 ns
        t.ret(1, FIB, a, 0, b"1"); // 60: fib(2) = 50 ns
        let s = call_stats(&t.store, StatKey::Function, &[]);
        assert_eq!(s.scanned, 6);
        let fib = s.stats.iter().find(|x| x.function == FIB).unwrap();
        assert_eq!(fib.count, 2);
        // Outermost fib only: 50 ns; own: (50 - 20) + 10.
        assert_eq!(fib.acc_ns, 50);
        assert_eq!(fib.own_ns, 40);
        let add = s.stats.iter().find(|x| x.function == ADD).unwrap();
        assert_eq!((add.count, add.acc_ns, add.own_ns), (1, 10, 10));
        assert_eq!(s.stats[0].function, FIB, "sorted by acc time");
        // By process: one key, every call.
        let p = call_stats(&t.store, StatKey::Process, &[]);
        assert_eq!(p.stats.len(), 1);
        assert_eq!(p.stats[0].count, 3);
        // Module filter.
        assert!(call_stats(&t.store, StatKey::Function, &[M + 1])
            .stats
            .is_empty());
    }

    #[test]
    fn a_crash_unwinds_frames_and_counts_the_exception() {
        let mut t = Trace::new();
        let a = t.call(1, FIB, 0, b"");
        let _b = t.call(1, ADD, a, b""); // never returns
        t.put(EventKind::FunctionException, 1, FIB, 0, a, 0, b"boom");
        let s = call_stats(&t.store, StatKey::Function, &[]);
        let fib = s.stats.iter().find(|x| x.function == FIB).unwrap();
        assert_eq!((fib.count, fib.acc_ns), (1, 20));
        let add = s.stats.iter().find(|x| x.function == ADD).unwrap();
        assert_eq!((add.count, add.acc_ns), (1, 0));
    }

    #[test]
    fn repeated_trees_are_found_with_their_size() {
        let mut t = Trace::new();
        for pid in [1, 2, 3] {
            let a = t.call(pid, FIB, 0, b"2");
            let b = t.call(pid, ADD, a, b"x");
            t.ret(pid, ADD, b, a, b"y");
            t.ret(pid, FIB, a, 0, b"3");
        }
        // A different tree: other return value.
        let a = t.call(4, FIB, 0, b"2");
        let b = t.call(4, ADD, a, b"x");
        t.ret(4, ADD, b, a, b"z");
        t.ret(4, FIB, a, 0, b"3");
        let top = top_call_trees(&t.store, 10, 2, 2);
        assert_eq!(top.trees.len(), 1);
        let tree = top.trees[0];
        assert_eq!((tree.count, tree.size), (3, 2));
        assert_eq!(tree.first_call_id, 1);
        // The single-call ADD(x) -> y subtree repeats 3 times but is below
        // min_size 2; with min_size 1 it shows.
        let top = top_call_trees(&t.store, 10, 2, 1);
        assert_eq!(top.trees.len(), 2);
    }

    #[test]
    fn message_flow_pairs_sends_and_receives() {
        let mut t = Trace::new();
        let a = t.call(1, FIB, 0, b"");
        let s = t.put(EventKind::MessageSend, 1, 0, 0, 0, a, b"m");
        let r = t.put(EventKind::MessageReceive, 2, 0, 0, s, 0, b"m");
        let s2 = t.put(EventKind::MessageSend, 2, 0, 0, 0, 0, b"n");
        let (flows, next) = message_flow(&t.store, 0, 0, 10);
        assert_eq!(next, None);
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0].send.id, s);
        assert_eq!(flows[0].receive.map(|e| e.id), Some(r));
        assert_eq!(flows[0].in_call.map(|e| e.id), Some(a));
        assert_eq!(flows[1].send.id, s2);
        assert!(flows[1].receive.is_none());
        let (one, next) = message_flow(&t.store, 0, 0, 1);
        assert_eq!(one.len(), 1);
        let (rest, _) = message_flow(&t.store, 0, next.unwrap(), 10);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].send.id, s2);
    }
}

/// The part one event plays in a [`why`] chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhyRole {
    /// The state record asked about.
    State,
    /// An OTP callback's call (what produced a state record).
    Callback,
    /// The receive of the message that triggered a callback.
    Received,
    /// The send of a message.
    Sent,
    /// A call (the caller of a call, the call a message was sent from).
    Call,
    /// The spawn of the process whose `init/1` ran.
    Spawned,
    /// An earlier state record that triggered a callback (a continue, a
    /// timeout or internal event it set up, the stop it returned).
    PreviousState,
    /// Any other event.
    Event,
}

/// How far before an `init/1` call [`why`] looks for its process's spawn
/// when the correlator did not link it (ns).
const SPAWN_WINDOW_NS: i64 = 1_000_000_000;

/// The causal chain that produced event `id`, from the event back to the
/// root, across processes: a state record ← its callback's call ← the
/// receive of the message that triggered it ← that message's send ← the
/// call it was sent from ← that call's callers ← (if the outermost is itself
/// an OTP callback) its trigger ← ... A callback without a message trigger
/// leads to the previous state record (a `{:continue, _}`, a timeout), and
/// `init/1` to its process's spawn and from there to the spawning call. At
/// most [`crate::store::MAX_CHAIN_DEPTH`] events; empty if `id` is not
/// stored. Cost: one or two id lookups per step.
pub fn why(store: &EventStore, id: u64) -> Vec<(WhyRole, StoredEvent<'_>)> {
    use crate::event::{is_state_record, Callback, CALLBACK_MASK};
    let mut out: Vec<(WhyRole, StoredEvent<'_>)> = Vec::new();
    let mut cur = store.get(id);
    while let Some(e) = cur {
        if out.len() >= crate::store::MAX_CHAIN_DEPTH {
            break;
        }
        let kind = EventKind::from_u8(e.kind);
        let callback = e.flags & CALLBACK_MASK != 0;
        let role = if is_state_record(e.kind, e.flags) {
            if out.is_empty() {
                WhyRole::State
            } else {
                WhyRole::PreviousState
            }
        } else {
            match kind {
                EventKind::FunctionCall if callback => WhyRole::Callback,
                EventKind::FunctionCall => WhyRole::Call,
                EventKind::MessageReceive => WhyRole::Received,
                EventKind::MessageSend => WhyRole::Sent,
                EventKind::ProcessSpawn => WhyRole::Spawned,
                _ => WhyRole::Event,
            }
        };
        out.push((role, e));
        let next = match kind {
            EventKind::FunctionReturn | EventKind::FunctionException
                if e.correlation_id != e.id =>
            {
                e.correlation_id
            }
            EventKind::FunctionCall if callback && e.peer != 0 => e.peer,
            EventKind::FunctionCall
                if callback
                    && e.parent_id == 0
                    && Callback::of_flags(e.flags) == Some(Callback::Init) =>
            {
                spawn_of(store, e.pid, e.timestamp).unwrap_or(0)
            }
            EventKind::MessageReceive if e.correlation_id != e.id => e.correlation_id,
            EventKind::MessageReceive => 0,
            _ => e.parent_id,
        };
        if next == 0 || out.iter().any(|(_, x)| x.id == next) {
            break;
        }
        cur = store.get(next);
    }
    out
}

/// The id of the spawn of `pid` stored within [`SPAWN_WINDOW_NS`] before
/// `ts`, newest first.
fn spawn_of(store: &EventStore, pid: u64, ts: i64) -> Option<u64> {
    store
        .by_time_range(
            ts.saturating_sub(SPAWN_WINDOW_NS),
            ts,
            4096,
            crate::store::Order::Desc,
        )
        .into_iter()
        .find(|e| e.kind == EventKind::ProcessSpawn as u8 && e.pid == pid)
        .map(|e| e.id)
}
