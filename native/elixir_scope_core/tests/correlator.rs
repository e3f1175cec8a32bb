//! Behaviour of the event correlator.

use elixir_scope_core::correlator::*;
use proptest::prelude::*;

const P: u64 = 100;
const Q: u64 = 200;
const R: u64 = 300;

fn cfg(ttl_ns: i64, max: usize) -> CorrelatorConfig {
    CorrelatorConfig {
        ttl_ns,
        max_correlations: max,
    }
}

fn big() -> Correlator {
    Correlator::new(cfg(1_000_000, 10_000))
}

fn call(id: u64, pid: u64, ts: i64) -> CorrInput {
    CorrInput::new(id, CorrKind::Call, pid, ts)
}

fn ret(id: u64, pid: u64, ts: i64) -> CorrInput {
    CorrInput::new(id, CorrKind::Return, pid, ts)
}

fn ret_of(id: u64, pid: u64, ts: i64, call_id: u64) -> CorrInput {
    CorrInput {
        call_id: Some(call_id),
        ..ret(id, pid, ts)
    }
}

fn exc(id: u64, pid: u64, ts: i64) -> CorrInput {
    CorrInput::new(id, CorrKind::Exception, pid, ts)
}

fn send(id: u64, from: u64, to: u64, hash: u64, ts: i64) -> CorrInput {
    CorrInput {
        peer: to,
        msg_hash: hash,
        ..CorrInput::new(id, CorrKind::Send, from, ts)
    }
}

fn recv(id: u64, pid: u64, hash: u64, ts: i64) -> CorrInput {
    CorrInput {
        msg_hash: hash,
        ..CorrInput::new(id, CorrKind::Receive, pid, ts)
    }
}

fn spawn(id: u64, parent: u64, child: u64) -> CorrInput {
    CorrInput {
        peer: child,
        ..CorrInput::new(id, CorrKind::Spawn, parent, 0)
    }
}

fn consistent(c: &Correlator) {
    assert_eq!(c.active(), c.live_entries());
    assert_eq!(c.metrics().active as usize, c.active());
}

#[test]
fn nesting_and_recursion() {
    let mut c = big();
    // f(1) -> g(2) -> g(3) -> g(4)
    let f = c.correlate(&call(1, P, 11));
    assert_eq!(f.ctype, CorrType::FunctionCall);
    assert_eq!(
        (f.correlation_id, f.parent_id, f.root_id),
        (1, None, Some(1))
    );
    assert!(f.links.is_empty());
    for (id, parent) in [(2, 1), (3, 2), (4, 3)] {
        let g = c.correlate(&call(id, P, 10 + id as i64));
        assert_eq!(g.parent_id, Some(parent));
        assert_eq!(g.root_id, Some(1));
        assert_eq!(g.links, vec![Link::new(LinkKind::CalledFrom, parent)]);
    }
    assert_eq!(c.stack(P), vec![1, 2, 3, 4]);
    assert_eq!(c.chain(4), vec![1, 2, 3, 4]);
    consistent(&c);
    for (rid, cid, parent) in [
        (5, 4, Some(3)),
        (6, 3, Some(2)),
        (7, 2, Some(1)),
        (8, 1, None),
    ] {
        let r = c.correlate(&ret(rid, P, 100));
        assert_eq!(r.ctype, CorrType::FunctionReturn);
        assert_eq!(r.correlation_id, cid);
        assert_eq!(r.parent_id, parent);
        assert_eq!(r.root_id, Some(1));
        assert_eq!(r.links, vec![Link::new(LinkKind::Completes, cid)]);
        assert_eq!(r.duration(), Some(100 - (10 + cid as i64)));
    }
    let m = c.metrics();
    assert_eq!((m.calls, m.returns, m.unmatched_returns), (4, 4, 0));
    assert_eq!(c.active(), 0);
    // Completed calls stay known for chain().
    assert_eq!(c.chain(3), vec![1, 2, 3]);
    assert!(c.chain(999).is_empty());
    consistent(&c);
}

#[test]
fn exception_unwinds_to_explicit_call() {
    let mut c = big();
    for id in 1..=4 {
        c.correlate(&call(id, P, id as i64));
    }
    // An exception raised in 4, caught in 2: completes 2, skips 3 and 4.
    let e = c.correlate(&CorrInput {
        call_id: Some(2),
        ..exc(10, P, 50)
    });
    assert_eq!(e.correlation_id, 2);
    assert_eq!(e.links, vec![Link::new(LinkKind::Completes, 2)]);
    assert_eq!(e.parent_id, Some(1));
    assert_eq!(e.duration_ns, Some(48));
    assert_eq!(c.metrics().unwound_frames, 2);
    assert_eq!(c.stack(P), vec![1]);
    // Stack is intact: the next return completes 1.
    let r = c.correlate(&ret(11, P, 60));
    assert_eq!(r.correlation_id, 1);
    assert_eq!(c.metrics().unmatched_returns, 0);
    consistent(&c);
}

#[test]
fn exception_without_call_id_pops_top() {
    let mut c = big();
    c.correlate(&call(1, P, 0));
    c.correlate(&call(2, P, 0));
    let e = c.correlate(&exc(3, P, 5));
    assert_eq!(e.correlation_id, 2);
    assert_eq!(e.ctype, CorrType::FunctionReturn);
    assert_eq!(c.stack(P), vec![1]);
}

#[test]
fn tail_call_like_return_not_on_top() {
    let mut c = big();
    // a(1) tail-calls b(2) which calls c(3); only a's return is seen by id.
    c.correlate(&call(1, P, 0));
    c.correlate(&call(2, P, 1));
    c.correlate(&call(3, P, 2));
    let r = c.correlate(&ret_of(4, P, 9, 1));
    assert_eq!(r.correlation_id, 1);
    assert_eq!(r.parent_id, None);
    assert_eq!(r.root_id, Some(1));
    assert_eq!(r.duration_ns, Some(9));
    assert_eq!(c.metrics().unwound_frames, 2);
    assert!(c.stack(P).is_empty());
    assert_eq!(c.active(), 0);
    // No call left: unmatched, own id.
    let u = c.correlate(&ret(5, P, 10));
    assert_eq!(u.correlation_id, 5);
    assert_eq!(u.ctype, CorrType::FunctionReturn);
    assert!(u.links.is_empty());
    assert_eq!(u.duration_ns, None);
    assert_eq!(c.metrics().unmatched_returns, 1);
    consistent(&c);
}

#[test]
fn returns_by_explicit_call_id() {
    let mut c = big();
    c.correlate(&call(1, P, 0));
    c.correlate(&call(2, P, 0));
    c.correlate(&call(3, Q, 0)); // other process, own stack
    let r = c.correlate(&ret_of(4, P, 1, 2));
    assert_eq!(r.correlation_id, 2);
    assert_eq!(r.parent_id, Some(1));
    assert_eq!(c.metrics().unwound_frames, 0);
    // An explicit id that is not on the stack pops nothing.
    let u = c.correlate(&ret_of(5, P, 1, 3));
    assert_eq!(u.correlation_id, 5);
    assert_eq!(c.metrics().unmatched_returns, 1);
    assert_eq!(c.stack(P), vec![1]);
    assert_eq!(c.stack(Q), vec![3]);
    let q = c.correlate(&ret_of(6, Q, 1, 3));
    assert_eq!(
        (q.correlation_id, q.parent_id, q.root_id),
        (3, None, Some(3))
    );
    consistent(&c);
}

#[test]
fn returns_by_caller_key() {
    let keyed = |c: CorrInput, key| CorrInput { key, ..c };
    let mut c = big();
    c.correlate(&keyed(call(1, P, 0), 11));
    c.correlate(&keyed(call(2, P, 5), 22));
    c.correlate(&keyed(call(3, P, 7), 33));
    // The return for key 22 skips the call with key 33 (a tail call).
    let r = c.correlate(&keyed(ret(4, P, 9), 22));
    assert_eq!((r.correlation_id, r.parent_id), (2, Some(1)));
    assert_eq!(r.duration_ns, Some(4));
    assert_eq!(c.metrics().unwound_frames, 1);
    // A key that no open call carries pops nothing.
    let u = c.correlate(&keyed(ret(5, P, 9), 99));
    assert_eq!(u.correlation_id, 5);
    assert_eq!(c.metrics().unmatched_returns, 1);
    assert_eq!(c.stack(P), vec![1]);
    consistent(&c);
}

#[test]
fn identical_messages_from_one_sender_are_fifo() {
    let mut c = big();
    for id in 1..=3 {
        let s = c.correlate(&send(id, P, Q, 42, id as i64));
        assert_eq!(s.ctype, CorrType::MessageSend);
        assert_eq!(s.correlation_id, id);
    }
    assert_eq!(c.pending_messages(), 3);
    for (rid, sid) in [(11, 1), (12, 2), (13, 3)] {
        let r = c.correlate(&recv(rid, Q, 42, 20));
        assert_eq!(r.ctype, CorrType::MessageReceive);
        assert_eq!(r.correlation_id, sid);
        assert_eq!(r.links, vec![Link::new(LinkKind::Receives, sid)]);
        assert_eq!(r.confidence, 1.0);
    }
    let m = c.metrics();
    assert_eq!((m.sends, m.receives, m.matched_receives), (3, 3, 3));
    assert_eq!(c.active(), 0);
    // Different hash or different receiver do not match.
    c.correlate(&send(20, P, Q, 1, 0));
    let r = c.correlate(&recv(21, R, 1, 0));
    assert!(r.links.is_empty());
    let r = c.correlate(&recv(22, Q, 2, 0));
    assert!(r.links.is_empty());
    consistent(&c);
}

#[test]
fn identical_messages_from_two_senders_halve_confidence() {
    let mut c = big();
    c.correlate(&send(1, P, Q, 7, 0));
    c.correlate(&send(2, R, Q, 7, 1));
    let r1 = c.correlate(&recv(3, Q, 7, 2));
    assert_eq!(r1.links, vec![Link::new(LinkKind::Receives, 1)]);
    assert_eq!(r1.confidence, 0.5);
    // Only R's send remains queued: certain again.
    let r2 = c.correlate(&recv(4, Q, 7, 3));
    assert_eq!(r2.links, vec![Link::new(LinkKind::Receives, 2)]);
    assert_eq!(r2.confidence, 1.0);
    consistent(&c);
}

#[test]
fn receive_before_send_is_linked_late() {
    let mut c = big();
    let r1 = c.correlate(&recv(1, Q, 9, 0));
    let r2 = c.correlate(&recv(2, Q, 9, 1));
    assert!(r1.links.is_empty());
    assert_eq!(r1.correlation_id, 1);
    assert_eq!(c.metrics().matched_receives, 0);
    assert_eq!(c.active(), 2);
    assert!(c.take_late_links().is_empty());
    c.correlate(&send(3, P, Q, 9, 2));
    c.correlate(&send(4, P, Q, 9, 3));
    let late = c.take_late_links();
    assert_eq!(
        late,
        vec![
            LateLink {
                event: 1,
                link: Link::new(LinkKind::Receives, 3),
                confidence: 1.0
            },
            LateLink {
                event: 2,
                link: Link::new(LinkKind::Receives, 4),
                confidence: 1.0
            },
        ]
    );
    assert!(c.take_late_links().is_empty());
    assert_eq!(c.metrics().matched_receives, 2);
    assert_eq!(r2.ctype, CorrType::MessageReceive);
    assert_eq!(c.active(), 0);
    consistent(&c);
}

#[test]
fn spawn_tree_and_exit_orphaning() {
    let mut c = big();
    c.correlate(&call(1, P, 0));
    let s = c.correlate(&spawn(2, P, Q));
    assert_eq!(s.ctype, CorrType::ProcessSpawn);
    assert_eq!(s.links, vec![Link::new(LinkKind::SpawnedBy, P)]);
    assert_eq!(s.parent_id, Some(1)); // spawned from call 1
    c.correlate(&spawn(3, Q, R));
    assert_eq!(c.parent_of(Q), Some(P));
    assert_eq!(c.parent_of(R), Some(Q));
    assert_eq!(c.parent_of(P), None);
    c.correlate(&call(4, R, 0));
    c.correlate(&call(5, R, 0));
    c.correlate(&call(6, R, 0));
    assert_eq!(c.active(), 1 + 2 + 3);
    let e = c.correlate(&CorrInput::new(7, CorrKind::Exit, R, 1));
    assert_eq!(e.ctype, CorrType::ProcessExit);
    assert_eq!(c.metrics().orphaned_calls, 3);
    assert_eq!(c.parent_of(R), None);
    assert!(c.stack(R).is_empty());
    assert_eq!(c.active(), 2);
    // A return after the exit is unmatched.
    c.correlate(&ret(8, R, 2));
    assert_eq!(c.metrics().unmatched_returns, 1);
    consistent(&c);
}

#[test]
fn state_change_links_call_in_progress() {
    let mut c = big();
    let none = c.correlate(&CorrInput::new(1, CorrKind::StateChange, P, 0));
    assert_eq!(none.ctype, CorrType::StateChange);
    assert!(none.links.is_empty());
    c.correlate(&call(2, P, 0));
    c.correlate(&call(3, P, 0));
    let s = c.correlate(&CorrInput::new(4, CorrKind::StateChange, P, 0));
    assert_eq!(s.links, vec![Link::new(LinkKind::StateIn, 3)]);
    assert_eq!((s.parent_id, s.root_id), (Some(3), Some(2)));
    let o = c.correlate(&CorrInput::new(5, CorrKind::Other, P, 0));
    assert_eq!(o.ctype, CorrType::Unknown);
    assert_eq!(c.correlate_batch(&[]), vec![]);
}

#[test]
fn ttl_sweep_counts() {
    let mut c = Correlator::new(cfg(100, 1000));
    c.correlate(&send(1, P, Q, 1, 0));
    c.correlate(&send(2, P, Q, 1, 60));
    c.correlate(&recv(3, R, 5, 10));
    c.correlate(&recv(4, R, 5, 150));
    c.correlate(&call(5, P, 0)); // frames are never swept
    assert_eq!(c.active(), 5);
    assert_eq!(c.sweep(100), 0); // nothing older than the TTL yet
    assert_eq!(c.sweep(155), 2); // ts 0 and 10
    assert_eq!(c.metrics().expired, 2);
    assert_eq!(c.active(), 3);
    consistent(&c);
    // The surviving send is still matched FIFO.
    let r = c.correlate(&recv(6, Q, 1, 160));
    assert_eq!(r.links, vec![Link::new(LinkKind::Receives, 2)]);
    assert_eq!(c.sweep(1_000), 1);
    assert_eq!(c.metrics().expired, 3);
    assert_eq!(c.active(), 1);
    assert_eq!(c.pending_messages(), 0);
    consistent(&c);
}

#[test]
fn max_correlations_bound_under_flood() {
    const MAX: usize = 64;
    let mut c = Correlator::new(cfg(i64::MAX, MAX));
    let mut id = 0;
    let mut next = || {
        id += 1;
        id
    };
    for i in 0..10_000u64 {
        let e = match i % 5 {
            0 => send(next(), P, Q, i, i as i64),
            1 => recv(next(), R, i, i as i64),
            2 => spawn(next(), P, 10_000 + i),
            3 => call(next(), 1 + i % 7, i as i64),
            _ => send(next(), Q, P, i % 3, i as i64),
        };
        c.correlate(&e);
        assert!(c.active() <= MAX, "active {} > {MAX}", c.active());
        if i % 97 == 0 {
            consistent(&c);
        }
    }
    consistent(&c);
    let m = c.metrics();
    assert!(m.evicted > 0);
    assert!(m.refused > 0); // eventually all 64 entries are call frames
    assert_eq!(c.active(), MAX);
    // Once frames fill the table, messages and spawns are refused: only
    // frames remain.
    let non_frames = c.active() as u64 - (0..7).map(|p| c.stack(1 + p).len() as u64).sum::<u64>();
    assert_eq!(non_frames, 0);
    // Every stack frame is accounted for; returns on refused calls still
    // leave the stack consistent.
    for p in 1..=7u64 {
        let depth = c.stack(p).len();
        for _ in 0..2_000 {
            c.correlate(&ret(next(), p, 0));
        }
        assert!(c.stack(p).is_empty(), "pid {p} depth was {depth}");
    }
    assert_eq!(c.active(), 0);
    consistent(&c);
}

#[test]
fn tree_entries_evicted_before_refusing() {
    let mut c = Correlator::new(cfg(i64::MAX, 3));
    c.correlate(&spawn(1, P, 1000));
    c.correlate(&send(2, P, Q, 0, 0));
    c.correlate(&call(3, P, 0));
    c.correlate(&call(4, P, 0)); // evicts the send (oldest message first)
    assert_eq!(c.metrics().evicted, 1);
    assert_eq!(c.pending_messages(), 0);
    assert_eq!(c.parent_of(1000), Some(P));
    c.correlate(&call(5, P, 0)); // evicts the tree entry
    assert_eq!(c.metrics().evicted, 2);
    assert_eq!(c.parent_of(1000), None);
    let refused = c.correlate(&call(6, P, 0)); // refused
    assert_eq!(c.metrics().refused, 1);
    assert_eq!(refused.parent_id, Some(5));
    let inner = c.correlate(&call(7, P, 0)); // parent unknown (refused)
    assert_eq!(inner.parent_id, None);
    assert_eq!(inner.confidence, 0.0);
    assert_eq!(c.stack(P), vec![3, 4, 5]);
    // Returns complete the refused calls first, then the tracked ones.
    c.correlate(&ret(8, P, 0));
    let r = c.correlate(&ret_of(9, P, 0, 6));
    assert_eq!(r.correlation_id, 6);
    assert_eq!(r.parent_id, Some(5));
    assert_eq!(c.correlate(&ret(10, P, 0)).correlation_id, 5);
    assert_eq!(c.metrics().unmatched_returns, 0);
    consistent(&c);
}

#[test]
fn chain_is_bounded() {
    let mut c = Correlator::new(cfg(1, 4));
    for id in 1..=3 {
        c.correlate(&call(id, P, 0));
    }
    assert_eq!(c.chain(3), vec![1, 2, 3]);
    for id in 4..=6 {
        c.correlate(&ret(id, P, 0));
    }
    for id in 10..=12 {
        c.correlate(&call(id, Q, 0));
    }
    // Only the last 4 distinct calls are known: 3, 10, 11, 12.
    assert_eq!(c.chain(3), vec![3]);
    assert!(c.chain(1).is_empty());
    assert_eq!(c.chain(12), vec![10, 11, 12]);
    assert_eq!(c.call_pid(12), Some(Q));
}

#[derive(Copy, Clone, Debug)]
enum Op {
    Call(u8),
    Ret(u8),
    RetOf(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(Op::Call),
        2 => (0u8..4).prop_map(Op::Ret),
        1 => (0u8..4, 0u8..8).prop_map(|(p, d)| Op::RetOf(p, d)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn calls_and_returns_match_reference_model(ops in prop::collection::vec(op(), 0..200)) {
        let mut c = big();
        let mut model: Vec<Vec<(u64, i64)>> = vec![Vec::new(); 4];
        let mut unwound = 0u64;
        let mut unmatched = 0u64;
        for (i, op) in ops.iter().enumerate() {
            let id = i as u64 + 1;
            let ts = i as i64 * 10;
            match *op {
                Op::Call(p) => {
                    let st = &mut model[p as usize];
                    let out = c.correlate(&call(id, p as u64, ts));
                    prop_assert_eq!(out.correlation_id, id);
                    prop_assert_eq!(out.parent_id, st.last().map(|f| f.0));
                    prop_assert_eq!(out.root_id, Some(st.first().map_or(id, |f| f.0)));
                    st.push((id, ts));
                }
                Op::Ret(p) | Op::RetOf(p, _) => {
                    let st = &mut model[p as usize];
                    // Which frame the model completes.
                    let target = match *op {
                        Op::RetOf(_, d) if !st.is_empty() => {
                            Some(st.len() - 1 - (d as usize % st.len()))
                        }
                        _ => st.len().checked_sub(1),
                    };
                    let input = match (*op, target) {
                        (Op::RetOf(..), Some(t)) => ret_of(id, p as u64, ts, st[t].0),
                        (Op::RetOf(..), None) => ret_of(id, p as u64, ts, 0),
                        _ => ret(id, p as u64, ts),
                    };
                    let out = c.correlate(&input);
                    match target {
                        Some(t) => {
                            let (cid, cts) = st[t];
                            prop_assert_eq!(out.correlation_id, cid);
                            prop_assert_eq!(out.links, vec![Link::new(LinkKind::Completes, cid)]);
                            prop_assert_eq!(out.parent_id, t.checked_sub(1).map(|j| st[j].0));
                            prop_assert_eq!(out.root_id, Some(st[0].0));
                            prop_assert_eq!(out.duration_ns, Some(ts - cts));
                            unwound += (st.len() - 1 - t) as u64;
                            st.truncate(t);
                        }
                        None => {
                            prop_assert_eq!(out.correlation_id, id);
                            prop_assert!(out.links.is_empty());
                            unmatched += 1;
                        }
                    }
                }
            }
        }
        for p in 0..4u64 {
            let want: Vec<u64> = model[p as usize].iter().map(|f| f.0).collect();
            prop_assert_eq!(c.stack(p), want.clone());
            if let Some(&top) = want.last() {
                prop_assert_eq!(c.chain(top), want);
            }
        }
        let m = c.metrics();
        prop_assert_eq!(m.unwound_frames, unwound);
        prop_assert_eq!(m.unmatched_returns, unmatched);
        prop_assert_eq!(c.active(), c.live_entries());
    }
}

// ---- Tracker ----------------------------------------------------------------

fn tracker(ttl_ns: i64, max: usize) -> Tracker {
    Tracker::new(cfg(ttl_ns, max))
}

fn keyed(c: CorrInput, key: u64) -> CorrInput {
    CorrInput { key, ..c }
}

#[test]
fn tracker_records_calls_and_completions() {
    let mut t = tracker(1_000, 100);
    t.correlate(&call(1, P, 0));
    t.correlate(&call(2, P, 1));
    let r1 = t.record(1).expect("record of 1");
    assert_eq!(r1.ctype, CorrType::FunctionCall);
    assert_eq!((r1.pid, r1.parent_id, r1.root_id), (P, None, Some(1)));
    let r2 = t.record(2).expect("record of 2");
    assert_eq!(r2.link, Some(Link::new(LinkKind::CalledFrom, 1)));
    assert_eq!(t.chain(2), vec![1, 2]);
    let r = t.correlate(&ret(3, P, 2));
    assert_eq!(r.correlation_id, 2);
    assert_eq!(t.record(2).and_then(|r| r.completed_by), Some(3));
    // Returns create no record.
    assert!(t.record(3).is_none());
    assert!(t.chain(3).is_empty());
    let m = t.metrics();
    assert_eq!((m.events, m.created, m.function, m.records), (3, 2, 2, 2));
}

#[test]
fn tracker_return_call_id_is_a_hint() {
    let mut t = tracker(1_000, 100);
    t.correlate(&keyed(call(1, P, 0), 77));
    t.correlate(&keyed(call(2, P, 0), 88));
    // call_id 1 is open on P: used (unwinds 2).
    let r = t.correlate(&keyed(ret_of(3, P, 0, 1), 99));
    assert_eq!(r.correlation_id, 1);
    assert_eq!(t.correlator().metrics().unwound_frames, 1);
    // call_id 5 names no open call: the key decides.
    t.correlate(&keyed(call(4, P, 0), 77));
    let r = t.correlate(&keyed(ret_of(6, P, 0, 5), 77));
    assert_eq!(r.correlation_id, 4);
    assert_eq!(t.correlator().metrics().unmatched_returns, 0);
}

#[test]
fn tracker_resolves_returns_of_unknown_process() {
    let mut t = tracker(1_000, 100);
    t.correlate(&keyed(call(1, P, 0), 7));
    t.correlate(&keyed(call(2, Q, 0), 8));
    t.correlate(&call(3, Q, 0));
    // By key: the most recent call made with key 8 was on Q.
    let r = t.correlate(&keyed(ret(4, UNKNOWN_PID, 0), 8));
    assert_eq!((r.correlation_id, r.parent_id), (2, None));
    assert_eq!(t.correlator().stack(Q), Vec::<u64>::new());
    // By call id.
    let r = t.correlate(&ret_of(5, UNKNOWN_PID, 0, 1));
    assert_eq!(r.correlation_id, 1);
    assert_eq!(t.metrics().pid_resolved, 2);
    // Unknown key: unmatched, nothing popped.
    t.correlate(&call(6, R, 0));
    let r = t.correlate(&keyed(ret(7, UNKNOWN_PID, 0), 999));
    assert_eq!(r.correlation_id, 7);
    assert_eq!(t.correlator().stack(R), vec![6]);
}

#[test]
fn tracker_applies_late_links_to_records() {
    let mut t = tracker(1_000, 100);
    t.correlate(&call(1, Q, 0));
    let early = t.correlate(&recv(2, Q, 42, 0));
    assert!(early.links.is_empty());
    let r = t.record(2).expect("early receive has a record");
    assert_eq!(
        (r.ctype, r.link, r.confidence),
        (CorrType::MessageReceive, None, 0.0)
    );
    assert_eq!(r.parent_id, Some(1));
    t.correlate(&send(3, P, Q, 42, 0));
    let r = t.record(2).expect("record of 2");
    assert_eq!(r.link, Some(Link::new(LinkKind::Receives, 3)));
    assert_eq!(r.confidence, 1.0);
    let s = t.record(3).expect("record of 3");
    assert_eq!((s.peer, s.received_by), (Q, Some(2)));
    // A receive matched at once updates the send's record only.
    t.correlate(&send(4, P, Q, 43, 0));
    t.correlate(&recv(5, Q, 43, 0));
    assert_eq!(t.record(4).and_then(|r| r.received_by), Some(5));
    assert!(t.record(5).is_none());
    assert_eq!(t.chain(2), vec![1, 2]);
    let m = t.metrics();
    assert_eq!((m.message, m.late_links), (3, 1));
}

#[test]
fn tracker_sweep_expires_records_by_age() {
    let mut t = tracker(100, 1_000);
    t.correlate(&call(1, P, 0));
    t.correlate(&send(2, P, Q, 1, 10));
    t.correlate(&call(3, P, 150));
    assert_eq!(t.sweep(200), (2, 1));
    assert!(t.record(1).is_none() && t.record(2).is_none());
    assert!(t.record(3).is_some());
    // The open call's frame stays: only records and unmatched messages expire.
    assert_eq!(t.correlator().stack(P), vec![1, 3]);
    assert_eq!(t.metrics().records_expired, 2);
    assert_eq!(t.sweep(200), (0, 0));
}

#[test]
fn tracker_records_are_bounded() {
    let mut t = tracker(1_000_000, 10);
    for id in 1..=100u64 {
        t.correlate(&send(id, P, Q, id, 0));
    }
    let m = t.metrics();
    assert_eq!(m.records, 10);
    assert_eq!(m.records_evicted, 90);
    assert!(t.record(90).is_none() && t.record(91).is_some());
    assert!(t.correlator().active() <= 10);
    // Same id twice: one record, the newer.
    t.correlate(&call(100, R, 5));
    assert_eq!(t.record(100).map(|r| r.ctype), Some(CorrType::FunctionCall));
    assert!(t.metrics().records <= 10);
}

#[test]
fn tracker_counts_unknown_and_spawns() {
    let mut t = tracker(1_000, 100);
    t.correlate(&CorrInput::new(1, CorrKind::Other, P, 0));
    t.correlate(&spawn(2, P, Q));
    let s = t.record(2).expect("spawn record");
    assert_eq!(
        (s.peer, s.link),
        (Q, Some(Link::new(LinkKind::SpawnedBy, P)))
    );
    let e = t.correlate(&CorrInput::new(3, CorrKind::Exit, Q, 0));
    assert_eq!(e.links, vec![Link::new(LinkKind::SpawnedBy, P)]);
    assert_eq!(t.record(3).map(|r| r.ctype), Some(CorrType::ProcessExit));
    assert!(t.record(1).is_none());
    assert_eq!(t.metrics().unknown, 1);
    assert!(t.memory_bytes() > 0);
}

#[test]
fn tracker_key_index_follows_open_calls() {
    let mut t = tracker(1_000, 100);
    // Recursion with one key: the outer call stays findable after the
    // inner one returns.
    t.correlate(&keyed(call(1, P, 0), 9));
    t.correlate(&keyed(call(2, P, 0), 9));
    assert_eq!(t.correlate(&keyed(ret(3, P, 0), 9)).correlation_id, 2);
    assert_eq!(
        t.correlate(&keyed(ret(4, UNKNOWN_PID, 0), 9))
            .correlation_id,
        1
    );
    // A key reused by another process after its call completed.
    t.correlate(&keyed(call(5, Q, 0), 8));
    t.correlate(&keyed(ret(6, Q, 0), 8));
    t.correlate(&keyed(call(7, R, 0), 8));
    let r = t.correlate(&keyed(ret(8, UNKNOWN_PID, 0), 8));
    assert_eq!(r.correlation_id, 7);
    assert_eq!(t.metrics().pid_resolved, 2);
    assert_eq!(t.correlator().active(), 0);
}

#[test]
fn matched_messages_leave_no_state_and_eviction_skips_them() {
    let mut c = Correlator::new(cfg(i64::MAX, 9));
    // 100k matched pairs: nothing stays tracked, memory stays small.
    for i in 0..100_000u64 {
        c.correlate(&send(2 * i + 1, P, Q, i, 0));
        let r = c.correlate(&recv(2 * i + 2, Q, i, 0));
        assert_eq!(r.correlation_id, 2 * i + 1);
    }
    assert_eq!(c.pending_messages(), 0);
    assert_eq!(c.metrics().active, 0);
    assert!(c.memory_bytes() < 256 * 1024, "{}", c.memory_bytes());
    // Fill to the bound with unmatched sends interleaved with matched
    // pairs, then overflow: the oldest *unmatched* send is evicted.
    let base = 1_000_000;
    for k in 0..8u64 {
        c.correlate(&send(base + 10 * k, P, Q, 1000 + k, 0));
        c.correlate(&send(base + 10 * k + 1, P, Q, 5000 + k, 0));
        c.correlate(&recv(base + 10 * k + 2, Q, 5000 + k, 0));
    }
    assert_eq!(c.pending_messages(), 8);
    assert_eq!(c.metrics().evicted, 0);
    c.correlate(&send(base + 998, P, Q, 77, 0));
    c.correlate(&send(base + 999, P, Q, 78, 0));
    assert_eq!(c.metrics().evicted, 1);
    // The second unmatched send still matches; the first (hash 1000) is
    // gone, so its receive waits unmatched.
    let kept = c.correlate(&recv(base + 1002, Q, 1001, 0));
    assert_eq!(kept.correlation_id, base + 10);
    let gone = c.correlate(&recv(base + 1001, Q, 1000, 0));
    assert_eq!(gone.correlation_id, base + 1001);
    assert!(gone.links.is_empty());
    consistent(&c);
}

#[test]
fn config_changes_apply_live() {
    let mut c = Correlator::new(cfg(1_000, 100));
    for i in 0..50u64 {
        c.correlate(&send(i + 1, P, Q, i, 10));
    }
    c.correlate(&call(100, P, 10));
    assert_eq!(c.metrics().active, 51);
    // Lower the bound: oldest messages go, the open frame stays.
    assert_eq!(c.set_config(cfg(1_000, 10)), 41);
    assert_eq!(c.metrics().active, 10);
    assert_eq!(c.pending_messages(), 9);
    assert_eq!(c.stack(P), vec![100]);
    // The newest sends survived.
    assert_eq!(c.correlate(&recv(200, Q, 49, 20)).correlation_id, 50);
    // A shorter TTL sweeps with the new value.
    c.set_config(cfg(5, 10));
    assert_eq!(c.sweep(20), 8);
    assert_eq!(c.pending_messages(), 0);
    consistent(&c);
}

#[test]
fn dump_lists_the_deepest_open_stacks() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    // pid 1: 3 open calls; pid 2: 1 open call; pid 3: closed.
    for (id, pid) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 3)] {
        c.correlate(&call(id, pid, id as i64));
    }
    c.correlate(&ret(6, 3, 6));
    let d = c.dump(2);
    assert_eq!(d.processes_with_open_calls, 2);
    assert_eq!(d.open_calls, 4);
    assert_eq!(d.stacks.len(), 2);
    assert_eq!(d.stacks[0].pid, 1);
    assert_eq!(d.stacks[0].depth, 3);
    assert_eq!(d.stacks[0].innermost, vec![3, 2]);
    assert_eq!(d.stacks[1].innermost, vec![4]);
    assert_eq!(d.metrics.calls, 5);
    assert_eq!(c.dump(1).stacks.len(), 1);
}
