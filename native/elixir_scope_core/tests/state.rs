//! State records: the store's per-process state index (`state_at`,
//! `state_history`) against a brute-force model, its bounds and its rebuild
//! by plain re-insertion; the correlator's OTP-callback triggers; the
//! pipeline storing them; and the `why` chain across processes.

use elixir_scope_core::analysis::{why, WhyRole};
use elixir_scope_core::store::{StateAt, StateView};
use elixir_scope_core::{
    Callback, CorrInput, CorrKind, CorrelationFields, Correlator, CorrelatorConfig, Engine, Event,
    EventKind, EventStore, StoreConfig, FLAG_SETS_DATA, FLAG_SETS_NAME, FLAG_STATEM,
};
use proptest::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const GS: u64 = 0x1001;
const SM: u64 = 0x2001;

fn rec(id: u64, ts: i64, pid: u64, kind: EventKind, flags: u8) -> Event {
    Event {
        id,
        timestamp: ts,
        wall_time: ts,
        pid,
        kind: kind as u8,
        flags,
        payload: vec![id as u8],
        ..Event::default()
    }
}

/// A gen_server callback return that sets the state.
fn gs_ret(id: u64, ts: i64, pid: u64) -> Event {
    rec(
        id,
        ts,
        pid,
        EventKind::FunctionReturn,
        Callback::HandleCall.flags() | FLAG_SETS_DATA,
    )
}

fn corr0() -> CorrelationFields {
    CorrelationFields::default()
}

fn store(max: usize) -> EventStore {
    EventStore::new(StoreConfig {
        max_events: max,
        max_age_ns: None,
    })
}

fn found(a: StateAt<'_>) -> StateView<'_> {
    match a {
        StateAt::Found(v) => v,
        other => panic!("expected a state, got {other:?}"),
    }
}

#[test]
fn state_at_is_exact_between_records_and_keeps_state_across_keep_records() {
    let mut s = store(1000);
    s.insert(&gs_ret(1, 10, GS), corr0());
    // Unrelated events of the same and other processes are not state records.
    s.insert(&rec(2, 12, GS, EventKind::FunctionCall, 0), corr0());
    s.insert(&rec(3, 15, GS, EventKind::FunctionReturn, 0), corr0());
    s.insert(&gs_ret(4, 20, GS), corr0());
    s.insert(&rec(5, 25, GS, EventKind::StateChange, 0), corr0());
    // terminate/2: keeps the state in force.
    s.insert(
        &rec(
            6,
            40,
            GS,
            EventKind::FunctionReturn,
            Callback::Terminate.flags(),
        ),
        corr0(),
    );
    assert_eq!(s.state_at(GS, 9), StateAt::Before);
    assert_eq!(s.state_at(0x9999, 10), StateAt::NoRecords);
    for (t, rec_id, data_id) in [
        (10, 1, 1),
        (11, 1, 1),
        (19, 1, 1),
        (20, 4, 4),
        (24, 4, 4),
        (25, 5, 5),
        (39, 5, 5),
        (40, 6, 5),
        (1_000, 6, 5),
    ] {
        let v = found(s.state_at(GS, t));
        assert_eq!(v.record.id, rec_id, "record in force at {t}");
        assert_eq!(v.data.map(|d| d.id), Some(data_id), "data at {t}");
        assert_eq!(v.name, None);
    }
    let h = s.state_history(GS, i64::MIN, i64::MAX, 100);
    let ids: Vec<(u64, u64)> = h
        .iter()
        .map(|v| (v.record.id, v.data.unwrap().id))
        .collect();
    assert_eq!(ids, vec![(1, 1), (4, 4), (5, 5), (6, 5)]);
    let h = s.state_history(GS, 20, 39, 100);
    assert_eq!(
        h.iter().map(|v| v.record.id).collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert_eq!(s.state_history(GS, 0, 100, 2).len(), 2);
    assert_eq!(s.state_processes(), vec![(GS, 4)]);
}

#[test]
fn gen_statem_name_and_data_come_from_the_records_that_set_them() {
    let mut s = store(1000);
    let ev = Callback::StatemEvent.flags() | FLAG_STATEM;
    // init: {:ok, :locked, 0}
    s.insert(
        &rec(
            1,
            10,
            SM,
            EventKind::FunctionReturn,
            Callback::Init.flags() | FLAG_STATEM | FLAG_SETS_DATA | FLAG_SETS_NAME,
        ),
        corr0(),
    );
    // {:keep_state, 1}
    s.insert(
        &rec(2, 20, SM, EventKind::FunctionReturn, ev | FLAG_SETS_DATA),
        corr0(),
    );
    // {:next_state, :open, 2}
    s.insert(
        &rec(
            3,
            30,
            SM,
            EventKind::FunctionReturn,
            ev | FLAG_SETS_DATA | FLAG_SETS_NAME,
        ),
        corr0(),
    );
    // :keep_state_and_data
    s.insert(&rec(4, 40, SM, EventKind::FunctionReturn, ev), corr0());
    let at = |t| {
        let v = found(s.state_at(SM, t));
        (v.record.id, v.data.map(|d| d.id), v.name.map(|n| n.id))
    };
    assert_eq!(at(15), (1, Some(1), Some(1)));
    assert_eq!(at(25), (2, Some(2), Some(1)));
    assert_eq!(at(35), (3, Some(3), Some(3)));
    assert_eq!(at(45), (4, Some(3), Some(3)));
    let h: Vec<_> = s
        .state_history(SM, 0, 100, 10)
        .iter()
        .map(|v| (v.record.id, v.data.map(|d| d.id), v.name.map(|n| n.id)))
        .collect();
    assert_eq!(
        h,
        vec![
            (1, Some(1), Some(1)),
            (2, Some(2), Some(1)),
            (3, Some(3), Some(3)),
            (4, Some(3), Some(3))
        ]
    );
}

#[test]
fn a_snapshot_written_late_by_another_process_takes_its_place_in_time() {
    let mut s = store(1000);
    s.insert(&gs_ret(2, 20, GS), corr0());
    s.insert(&gs_ret(3, 30, GS), corr0());
    // Written after the records above, stamped before them.
    s.insert(&rec(1, 5, GS, EventKind::StateSnapshot, 0), corr0());
    assert_eq!(s.state_at(GS, 4), StateAt::Before);
    assert_eq!(found(s.state_at(GS, 5)).record.id, 1);
    assert_eq!(found(s.state_at(GS, 19)).record.id, 1);
    assert_eq!(found(s.state_at(GS, 25)).record.id, 2);
    let ids: Vec<u64> = s
        .state_history(GS, 0, 100, 10)
        .iter()
        .map(|v| v.record.id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[test]
fn the_index_dies_with_eviction_and_stays_bounded() {
    let max = 1024;
    let mut s = store(max);
    let mut id = 0;
    for round in 0..200i64 {
        for p in 0..50u64 {
            id += 1;
            s.insert(&gs_ret(id, round * 100 + p as i64, 0x100 + p), corr0());
            id += 1;
            s.insert(
                &rec(
                    id,
                    round * 100 + p as i64,
                    0x100 + p,
                    EventKind::FunctionCall,
                    0,
                ),
                corr0(),
            );
        }
    }
    assert_eq!(s.len(), max);
    // Early times are gone: their record was evicted.
    assert_eq!(s.state_at(0x100, 0), StateAt::Evicted);
    // The newest are there.
    assert_eq!(found(s.state_at(0x100, 199 * 100)).record.id, id - 99);
    let entries: usize = s.state_processes().iter().map(|&(_, n)| n).sum();
    // Live state records plus at most those freed since the last sweep.
    assert!(
        entries <= max / 2 + 2 * s.segment_capacity() + max,
        "{entries} index entries"
    );
}

#[test]
fn the_index_is_rebuilt_by_inserting_the_records_again() {
    let mut a = store(10_000);
    let mut id = 0;
    for i in 0..3000i64 {
        id += 1;
        let pid = 0x10 + (i % 7) as u64;
        let e = match i % 5 {
            0 => rec(id, i * 3, pid, EventKind::StateSnapshot, 0),
            1 => rec(id, i * 3, pid, EventKind::MessageReceive, 0),
            2 => rec(
                id,
                i * 3,
                pid,
                EventKind::FunctionReturn,
                Callback::Terminate.flags(),
            ),
            _ => gs_ret(id, i * 3, pid),
        };
        a.insert_with_header(&e, corr(id, 0, 0), 5, id * 2);
    }
    // Dump every stored record and insert it into a fresh store.
    let mut b = store(10_000);
    let mut dump = Vec::new();
    a.scan(0, usize::MAX, |e| {
        dump.push((e.to_event(), e.correlation()))
    });
    for (e, c) in &dump {
        b.insert_with_header(e, *c, e.aux, e.peer);
    }
    assert_eq!(a.state_processes(), b.state_processes());
    for pid in 0x10..0x17u64 {
        for t in (0..9000).step_by(7) {
            let key = |x: StateAt| match x {
                StateAt::Found(v) => Some((v.record.id, v.data.map(|d| d.id), v.record.peer)),
                _ => None,
            };
            assert_eq!(key(a.state_at(pid, t)), key(b.state_at(pid, t)));
        }
    }
}

fn corr(c: u64, p: u64, r: u64) -> CorrelationFields {
    CorrelationFields {
        correlation_id: c,
        parent_id: p,
        root_id: r,
    }
}

/// A random state record: (pid, timestamp, what it sets).
#[derive(Clone, Debug)]
struct R {
    pid: u64,
    ts: i64,
    sets_data: bool,
    statem: bool,
    sets_name: bool,
    snapshot: bool,
}

fn arb_rec() -> impl Strategy<Value = R> {
    // 0x52 is a gen_statem, the others gen_servers.
    (0u64..3, 0i64..400, any::<bool>(), any::<bool>(), 0u8..8).prop_map(|(p, ts, d, n, k)| R {
        pid: 0x50 + p,
        ts,
        sets_data: d,
        statem: p == 2,
        sets_name: n,
        snapshot: k == 0,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `state_at` and `state_history` agree with a brute-force model on
    /// random records (out of time order, gen_server and gen_statem, keep
    /// records), with eviction.
    #[test]
    fn state_queries_match_a_model(recs in prop::collection::vec(arb_rec(), 1..300), max in 64usize..400) {
        let mut s = store(max);
        let mut model: Vec<(u64, R)> = Vec::new(); // (id, rec), insertion order
        for (i, r) in recs.iter().enumerate() {
            let id = i as u64 + 1;
            let e = if r.snapshot {
                rec(id, r.ts, r.pid, EventKind::StateSnapshot, if r.statem { FLAG_STATEM } else { 0 })
            } else {
                let mut f = Callback::StatemEvent.flags();
                if r.sets_data { f |= FLAG_SETS_DATA; }
                if r.statem { f |= FLAG_STATEM; if r.sets_name { f |= FLAG_SETS_NAME; } }
                rec(id, r.ts, r.pid, EventKind::FunctionReturn, f)
            };
            s.insert(&e, corr0());
            model.push((id, r.clone()));
            if model.len() > max { model.remove(0); }
        }
        let live_from = recs.len().saturating_sub(max) as u64; // ids <= this are evicted
        for pid in 0x50..0x53u64 {
            // All of this pid's records ever inserted, in (ts, id) order.
            let mut all: Vec<(i64, u64, &R)> = recs.iter().enumerate()
                .filter(|(_, r)| r.pid == pid)
                .map(|(i, r)| (r.ts, i as u64 + 1, r)).collect();
            all.sort_by_key(|&(ts, id, _)| (ts, id));
            for t in (-1..402).step_by(3) {
                let got = s.state_at(pid, t);
                let k = all.partition_point(|&(ts, _, _)| ts <= t);
                let any_live = all.iter().any(|&(_, id, _)| id > live_from);
                match got {
                    StateAt::NoRecords => prop_assert!(!any_live || all.is_empty()),
                    StateAt::Before => prop_assert!(all.iter().filter(|&&(_, id, _)| id > live_from).all(|&(ts, _, _)| ts > t)),
                    // The record in force is gone (or, conservatively, a
                    // gone record is stamped in between).
                    StateAt::Evicted => prop_assert!(k > 0 && all[..k].iter().any(|&(_, id, _)| id <= live_from)),
                    StateAt::Found(v) => {
                        prop_assert!(k > 0);
                        prop_assert!(all[k - 1].1 > live_from, "a gone record was in force");
                        let (_, id, r) = all[k - 1];
                        prop_assert_eq!(v.record.id, id);
                        // Walk the model back for the data and name sources.
                        let sets = |x: &R| if x.snapshot { (true, x.statem) } else { (x.sets_data, x.statem && x.sets_name) };
                        let mut data = None;
                        let mut name = None;
                        for &(_, jid, x) in all[..k].iter().rev() {
                            if jid <= live_from { break; }
                            let (d, n) = sets(x);
                            if d && data.is_none() { data = Some(jid); }
                            if n && name.is_none() { name = Some(jid); }
                            if data.is_some() && (!r.statem || name.is_some()) { break; }
                        }
                        // Exact, or unknown when a gone record may lie in
                        // between: never a wrong source.
                        let gone = all.iter().any(|&(_, id, _)| id <= live_from);
                        let name = if r.statem { name } else { None };
                        let ok = |got: Option<u64>, want: Option<u64>| got == want || (got.is_none() && gone);
                        prop_assert!(ok(v.data.map(|d| d.id), data), "data {:?} vs {:?}", v.data.map(|d| d.id), data);
                        prop_assert!(ok(v.name.map(|n| n.id), name), "name {:?} vs {:?}", v.name.map(|n| n.id), name);
                    }
                }
            }
            // The history of the whole span, resolved incrementally, equals
            // state_at at each record's time for the record in force.
            let h = s.state_history(pid, i64::MIN, i64::MAX, usize::MAX);
            for w in h.windows(2) {
                prop_assert!((w[0].record.timestamp, w[0].record.seq) <= (w[1].record.timestamp, w[1].record.seq));
            }
            for v in &h {
                if let StateAt::Found(a) = s.state_at(pid, v.record.timestamp) {
                    if a.record.id == v.record.id {
                        prop_assert_eq!(a.data.map(|d| d.id), v.data.map(|d| d.id));
                        prop_assert_eq!(a.name.map(|d| d.id), v.name.map(|d| d.id));
                    }
                }
            }
        }
    }
}

// ---- correlator ---------------------------------------------------------------

fn cb_call(id: u64, pid: u64, class: Callback, hash: u64) -> CorrInput {
    CorrInput {
        callback: class.flags(),
        msg_hash: hash,
        ..CorrInput::new(id, CorrKind::Call, pid, id as i64)
    }
}

fn cb_ret(id: u64, pid: u64, class: Callback) -> CorrInput {
    CorrInput {
        callback: class.flags() | FLAG_SETS_DATA,
        ..CorrInput::new(id, CorrKind::Return, pid, id as i64)
    }
}

fn recv(id: u64, pid: u64, hash: u64) -> CorrInput {
    CorrInput {
        msg_hash: hash,
        ..CorrInput::new(id, CorrKind::Receive, pid, id as i64)
    }
}

#[test]
fn callbacks_take_their_triggering_receive_in_mailbox_order() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let s = 0x77;
    // A spawn correlated before init: init's trigger.
    let sp = c.correlate(&CorrInput {
        peer: s,
        ..CorrInput::new(1, CorrKind::Spawn, 0x5, 1)
    });
    assert_eq!(sp.trigger, None);
    assert_eq!(
        c.correlate(&cb_call(2, s, Callback::Init, 0)).trigger,
        Some(1)
    );
    assert_eq!(c.correlate(&cb_ret(3, s, Callback::Init)).trigger, Some(1));
    c.correlate(&recv(4, s, 0xA));
    c.correlate(&recv(5, s, 0xB));
    c.correlate(&recv(6, s, 0xA));
    // Messages are taken by content, oldest first.
    assert_eq!(
        c.correlate(&cb_call(7, s, Callback::HandleCall, 0xB))
            .trigger,
        Some(5)
    );
    assert_eq!(
        c.correlate(&cb_ret(8, s, Callback::HandleCall)).trigger,
        Some(5)
    );
    assert_eq!(
        c.correlate(&cb_call(9, s, Callback::HandleNoreply, 0xA))
            .trigger,
        Some(4)
    );
    c.correlate(&cb_ret(10, s, Callback::HandleNoreply));
    assert_eq!(
        c.correlate(&cb_call(11, s, Callback::HandleNoreply, 0xA))
            .trigger,
        Some(6)
    );
    c.correlate(&cb_ret(12, s, Callback::HandleNoreply));
    // No message (handle_continue, a timeout): the previous state record.
    assert_eq!(
        c.correlate(&cb_call(13, s, Callback::HandleNoreply, 0))
            .trigger,
        Some(12)
    );
    c.correlate(&cb_ret(14, s, Callback::HandleNoreply));
    // A message never seen: the previous state record as well.
    assert_eq!(
        c.correlate(&cb_call(15, s, Callback::HandleNoreply, 0xF))
            .trigger,
        Some(14)
    );
    c.correlate(&cb_ret(16, s, Callback::HandleNoreply));
    let m = c.metrics();
    assert_eq!((m.triggers_found, m.servers), (6, 1));
    // An exit forgets the server.
    c.correlate(&CorrInput::new(17, CorrKind::Exit, s, 17));
    assert_eq!(c.metrics().servers, 0);
}

#[test]
fn a_server_mailbox_model_is_bounded() {
    let mut c = Correlator::new(CorrelatorConfig::default());
    let s = 0x78;
    c.correlate(&CorrInput::new(1, CorrKind::StateChange, s, 1));
    for i in 0..1000 {
        c.correlate(&recv(10 + i, s, 0x100 + i));
    }
    let m = c.metrics();
    assert_eq!(
        m.mailbox_dropped,
        1000 - elixir_scope_core::correlator::MAILBOX_MAX as u64
    );
    // The newest receives are still matched.
    assert_eq!(
        c.correlate(&cb_call(5000, s, Callback::HandleNoreply, 0x100 + 999))
            .trigger,
        Some(1009)
    );
    // Servers are bounded too.
    let mut c = Correlator::new(CorrelatorConfig {
        max_correlations: 8,
        ..CorrelatorConfig::default()
    });
    for p in 0..5000u64 {
        c.correlate(&CorrInput::new(p + 1, CorrKind::StateChange, 0x1000 + p, 1));
    }
    let m = c.metrics();
    assert_eq!(m.servers, 1024);
    assert_eq!(m.servers_evicted, 5000 - 1024);
}

// ---- pipeline stage and why -----------------------------------------------------

fn clock() -> i64 {
    1
}

fn event(id: u64, kind: EventKind, pid: u64, peer: u64, aux: i64, flags: u8) -> Event {
    Event {
        id,
        timestamp: id as i64 * 10,
        wall_time: 0,
        pid,
        peer,
        module: 0x30,
        function: 0x40 + kind as u64,
        aux,
        kind: kind as u8,
        flags,
        payload: Vec::new(),
    }
}

#[test]
fn the_engine_stores_triggers_and_why_walks_back_across_processes() {
    let st = Arc::new(Mutex::new(store(1000)));
    let engine = Engine::new(
        CorrelatorConfig::default(),
        st.clone(),
        clock,
        Duration::from_secs(60),
    );
    let (client, server) = (0x11u64, 0x22u64);
    let h = 0xABCD;
    let call_flags = Callback::HandleCall.flags();
    let ret_flags = call_flags | FLAG_SETS_DATA;
    // The server starts: init.
    let init = [
        event(
            1,
            EventKind::FunctionCall,
            server,
            0,
            1,
            Callback::Init.flags(),
        ),
        event(
            2,
            EventKind::FunctionReturn,
            server,
            0,
            0,
            Callback::Init.flags() | FLAG_SETS_DATA,
        ),
    ];
    engine.process(&init).unwrap();
    // The client calls Bank.deposit, which sends the request.
    let client_evs = [
        event(3, EventKind::FunctionCall, client, 0, 2, 0),
        event(4, EventKind::MessageSend, client, server, h as i64, 0),
    ];
    engine.process(&client_evs).unwrap();
    // The server receives it and runs handle_call.
    let server_evs = [
        event(5, EventKind::MessageReceive, server, 0, h as i64, 0),
        event(6, EventKind::FunctionCall, server, h, 3, call_flags),
        event(7, EventKind::FunctionReturn, server, 0, 0, ret_flags),
        // handle_continue: no message, triggered by the state record 7.
        event(
            8,
            EventKind::FunctionCall,
            server,
            0,
            2,
            Callback::HandleNoreply.flags(),
        ),
        event(
            9,
            EventKind::FunctionReturn,
            server,
            0,
            0,
            Callback::HandleNoreply.flags() | FLAG_SETS_DATA,
        ),
    ];
    engine.process(&server_evs).unwrap();
    let s = st.lock().unwrap();
    assert_eq!(s.get(6).unwrap().peer, 5, "the callback call's trigger");
    assert_eq!(s.get(7).unwrap().peer, 5, "the state record's trigger");
    assert_eq!(s.get(7).unwrap().correlation_id, 6);
    assert_eq!(s.get(8).unwrap().peer, 7);
    let chain: Vec<(WhyRole, u64)> = why(&s, 7).iter().map(|(r, e)| (*r, e.id)).collect();
    assert_eq!(
        chain,
        vec![
            (WhyRole::State, 7),
            (WhyRole::Callback, 6),
            (WhyRole::Received, 5),
            (WhyRole::Sent, 4),
            (WhyRole::Call, 3),
        ]
    );
    let chain: Vec<(WhyRole, u64)> = why(&s, 9).iter().map(|(r, e)| (*r, e.id)).collect();
    assert_eq!(
        chain[..4],
        [
            (WhyRole::State, 9),
            (WhyRole::Callback, 8),
            (WhyRole::PreviousState, 7),
            (WhyRole::Callback, 6)
        ]
    );
    assert_eq!(chain.len(), 7);
    // The state in force after the continue is the record 9.
    assert_eq!(found(s.state_at(server, 1000)).record.id, 9);
    assert!(why(&s, 12345).is_empty());
}
