//! Trace files: save → load round trips (same VM: identical records and
//! query answers; another VM: every word mapped back by name), merges,
//! partial files and the symbol rules.

mod common;

use common::*;
use elixir_scope_core::analysis::{call_stats, message_flow, StatKey};
use elixir_scope_core::tracefile::{
    self, info, load, save_to_path, Codec, LoadOptions, Local, SaveOptions, Status,
};
use elixir_scope_core::{
    CorrelationFields, Event, EventKind, EventStore, Order, StoreConfig, StoredEvent,
};
use std::path::Path;
use std::sync::Mutex;

fn all(store: &EventStore) -> Vec<StoredEvent<'_>> {
    let mut out = Vec::new();
    store.scan(0, usize::MAX, |e| out.push(*e));
    out
}

/// Record fields without the store-local sequence number.
type Fields = (
    (u64, i64, i64, u64, u64, u64),
    (u64, i64, u8, u8, u64, u64, u64),
    Vec<u8>,
);
fn fields(e: &StoredEvent) -> Fields {
    (
        (e.id, e.timestamp, e.wall_time, e.pid, e.peer, e.module),
        (
            e.function,
            e.aux,
            e.kind,
            e.flags,
            e.correlation_id,
            e.parent_id,
            e.root_id,
        ),
        e.payload.to_vec(),
    )
}
fn many(v: Vec<StoredEvent>) -> Vec<Fields> {
    v.iter().map(fields).collect()
}

/// Every store query gives the same answers on both stores.
fn same_answers(a: &EventStore, b: &EventStore) {
    let ea = all(a);
    assert_eq!(many(ea.clone()), many(all(b)));
    assert_eq!(a.len(), b.len());
    let (t0, t1) = (ea[0].timestamp, ea[ea.len() - 1].timestamp);
    for o in [Order::Asc, Order::Desc] {
        assert_eq!(
            many(a.by_time_range(t0, (t0 + t1) / 2, 500, o)),
            many(b.by_time_range(t0, (t0 + t1) / 2, 500, o))
        );
    }
    for e in ea.iter().step_by(97) {
        for o in [Order::Asc, Order::Desc] {
            assert_eq!(many(a.by_pid(e.pid, 200, o)), many(b.by_pid(e.pid, 200, o)));
            assert_eq!(
                many(a.by_function(e.module, e.function, 200, o)),
                many(b.by_function(e.module, e.function, 200, o))
            );
            assert_eq!(
                many(a.by_correlation(e.correlation_id, 50, o)),
                many(b.by_correlation(e.correlation_id, 50, o))
            );
            assert_eq!(
                a.time_neighbour(e.id, o).map(|x| fields(&x)),
                b.time_neighbour(e.id, o).map(|x| fields(&x))
            );
        }
        assert_eq!(many(a.children(e.id, 100)), many(b.children(e.id, 100)));
        assert_eq!(many(a.causal_chain(e.id)), many(b.causal_chain(e.id)));
        assert_eq!(
            many(elixir_scope_core::call_contents(a, e.id, 1000)),
            many(elixir_scope_core::call_contents(b, e.id, 1000))
        );
        assert_eq!(
            a.pid_next(e.id).map(|x| fields(&x)),
            b.pid_next(e.id).map(|x| fields(&x))
        );
        assert_eq!(
            a.pid_prev(e.id).map(|x| fields(&x)),
            b.pid_prev(e.id).map(|x| fields(&x))
        );
    }
    for key in [
        StatKey::Function,
        StatKey::Process,
        StatKey::ProcessFunction,
    ] {
        let (sa, sb) = (call_stats(a, key, &[]), call_stats(b, key, &[]));
        assert_eq!(format!("{:?}", sa.stats), format!("{:?}", sb.stats));
    }
    let (fa, _) = message_flow(a, 0, 0, usize::MAX);
    let (fb, _) = message_flow(b, 0, 0, usize::MAX);
    assert_eq!(fa.len(), fb.len());
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(fields(&x.send), fields(&y.send));
        assert_eq!(x.receive.map(|r| fields(&r)), y.receive.map(|r| fields(&r)));
    }
}

fn opts(codec: Codec) -> SaveOptions {
    SaveOptions {
        codec,
        block_events: 700,
        lock_chunk: 256,
        sync: false,
        ..SaveOptions::default()
    }
}

fn save(vm: &mut Vm, store: EventStore, path: &Path, codec: Codec) -> Mutex<EventStore> {
    let store = Mutex::new(store);
    save_to_path(&store, path, &vm.header(), &[], vm, &opts(codec)).unwrap();
    store
}

#[test]
fn round_trip_in_the_same_vm_gives_identical_records_and_answers() {
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        let mut vm = Vm::new("a@host", 7, &[]);
        let original = workload(&mut vm, 42, 5000, 0, 100_000);
        let path = temp("same");
        let original = save(&mut vm, original, &path, codec);
        let (loaded, report) = load(&[&path], &mut vm, &LoadOptions::default()).unwrap();
        let original = original.lock().unwrap();
        assert!(matches!(report.files[0].status, Status::Complete(t) if t.events == 5000));
        assert_eq!(report.stored, 5000);
        assert_eq!(vm.created, 0, "the VM that saved has every atom");
        same_answers(&original, &loaded);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn an_evicting_store_saves_what_it_holds_and_its_counters() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let original = workload(&mut vm, 3, 20_000, 0, 3000);
    let path = temp("evicting");
    let original = save(&mut vm, original, &path, Codec::Zstd);
    let (loaded, _) = load(&[&path], &mut vm, &LoadOptions::default()).unwrap();
    let original = original.lock().unwrap();
    same_answers(&original, &loaded);
    let i = info(&path).unwrap();
    assert_eq!(i.header.store.max_events, 3000);
    assert_eq!(i.header.store.inserted, 20_000);
    assert_eq!(i.header.store.evicted, 17_000);
    assert_eq!(i.trailer.unwrap().events, 3000);
}

/// A word of `vm` by name: atoms by name, pids (local ones rendered as
/// pids of `vm`'s node with creation 0) and foreign pids by node and
/// number, anything else raw.
fn normalize(vm: &Vm, w: u64) -> String {
    if w == 0 {
        return "0".into();
    }
    if let Some(a) = vm.atom_name(w) {
        return format!("atom:{a}");
    }
    if w & 0xF == 0x3 {
        return format!("pid:{}:{}:{}", vm.node, w >> 4, vm.creation);
    }
    if let Some((node, id, c)) = vm.foreign.get(&w) {
        return format!("pid:{node}:{id}:{c}");
    }
    format!("raw:{w:#x}")
}

/// A local tape of `vm` as tokens (words by [`normalize`], foreign pids
/// decoded from their external term format).
fn normalize_tape(vm: &Vm, tape: &[u8]) -> Vec<String> {
    use elixir_scope_core::tape::*;
    let mut out = Vec::new();
    let mut i = 0;
    let u32_at = |i: usize| u32::from_le_bytes(tape[i..i + 4].try_into().unwrap());
    while i < tape.len() {
        let t = tape[i];
        i += 1;
        out.push(match t {
            T_IMM => {
                let w = u64::from_le_bytes(tape[i..i + 8].try_into().unwrap());
                i += 8;
                normalize(vm, w)
            }
            T_BIN | T_ETF => {
                let n = u32_at(i) as usize;
                i += 4;
                let b = &tape[i..i + n];
                i += n;
                if t == T_ETF && b.len() > 2 && b[1] == 88 {
                    let node = std::str::from_utf8(&b[4..4 + b[3] as usize]).unwrap();
                    let id = u32::from_be_bytes(b[b.len() - 12..b.len() - 8].try_into().unwrap());
                    let c = u32::from_be_bytes(b[b.len() - 4..].try_into().unwrap());
                    format!("pid:{node}:{id}:{c}")
                } else {
                    format!("{t}:{b:?}")
                }
            }
            T_TUPLE | T_LIST | T_MAP => {
                let n = u32_at(i);
                i += 4;
                format!("<{t}:{n}>")
            }
            T_FLOAT | T_I64 | T_U64 => {
                i += 8;
                format!("{t}:{:?}", &tape[i - 8..i])
            }
            _ => panic!("tag {t}"),
        });
    }
    out
}

#[test]
fn another_vm_maps_atoms_by_name_and_keeps_pids_foreign() {
    let mut a = Vm::new("a@host", 1, &[]);
    let original = workload(&mut a, 9, 3000, 0, 10_000);
    let path = temp("cross");
    let original = save(&mut a, original, &path, Codec::Lz4);
    // Another VM of the same node name and incarnation: its atoms are
    // numbered differently, and the file's pids are not its own (another
    // VM instance): they come back foreign.
    let mut b = Vm::new("a@host", 2, &["zzz", "yyy", "Elixir.Mod3"]);
    let (loaded, report) = load(&[&path], &mut b, &LoadOptions::default()).unwrap();
    assert!(b.created > 5, "the other VM creates the missing atoms");
    let view = |vm: &Vm, s: &EventStore| {
        all(s)
            .iter()
            .map(|e| {
                (
                    (e.id, e.timestamp, e.correlation_id, e.parent_id, e.root_id),
                    normalize(vm, e.pid),
                    normalize(vm, e.peer),
                    normalize(vm, e.module),
                    normalize(vm, e.function),
                    normalize_tape(vm, e.payload),
                )
            })
            .collect::<Vec<_>>()
    };
    let ea = view(&a, &original.lock().unwrap());
    let eb = view(&b, &loaded);
    assert_eq!(ea.len(), eb.len());
    for (x, y) in ea.iter().zip(&eb) {
        assert_eq!(x, y);
    }
    assert_eq!(report.files[0].ts_shift, 0);
    // A query by a foreign pid finds that process's events.
    let some = all(&loaded)[0];
    assert_eq!(some.pid & 3, 0, "a foreign pid is keyed, not a local word");
    let hits = loaded.by_pid(some.pid, 10_000, Order::Asc);
    assert!(hits.len() > 1 && hits.iter().all(|e| e.pid == some.pid));
}

#[test]
fn merging_two_traces_of_one_vm_equals_a_trace_of_both() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let first = workload(&mut vm, 5, 3000, 0, 100_000);
    let second = workload(&mut vm, 6, 2000, 10_000, 100_000);
    let (p1, p2) = (temp("m1"), temp("m2"));
    let first = save(&mut vm, first, &p1, Codec::Zstd);
    let second = save(&mut vm, second, &p2, Codec::Zstd);
    // One store holding both traces, in order.
    let mut both = EventStore::new(StoreConfig {
        max_events: 100_000,
        max_age_ns: None,
    });
    for s in [&first, &second] {
        for e in all(&s.lock().unwrap()) {
            let ev = e.to_event();
            both.insert(&ev, e.correlation());
        }
    }
    let (loaded, report) = load(&[&p1, &p2], &mut vm, &LoadOptions::default()).unwrap();
    assert_eq!(report.files[1].id_shift, 0, "disjoint ids are kept");
    same_answers(&both, &loaded);
}

#[test]
fn merging_overlapping_ids_keeps_them_unique_and_links_intact() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let s = workload(&mut vm, 11, 2000, 0, 100_000);
    let path = temp("twice");
    let s = save(&mut vm, s, &path, Codec::Lz4);
    let (loaded, report) = load(&[&path, &path], &mut vm, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.len(), 4000);
    let shift = report.files[1].id_shift;
    assert!(shift >= 2000);
    let orig = s.lock().unwrap();
    for e in all(&orig) {
        let copy = loaded.get(e.id + shift).expect("shifted copy");
        let moved = |v: u64| if v == 0 { 0 } else { v + shift };
        assert_eq!(copy.parent_id, moved(e.parent_id));
        assert_eq!(copy.correlation_id, moved(e.correlation_id));
        assert_eq!(copy.payload, e.payload);
        assert_eq!(fields(&loaded.get(e.id).unwrap()), fields(&e));
    }
}

#[test]
fn files_of_another_vm_move_onto_the_first_files_clock() {
    let mut a = Vm::new("a@host", 1, &[]);
    let mut b = Vm::new("b@host", 2, &[]);
    let sa = workload(&mut a, 1, 100, 0, 1000);
    let sb = workload(&mut b, 2, 100, 50_000, 1000);
    let (pa, pb) = (temp("ca"), temp("cb"));
    let sa = Mutex::new(sa);
    let sb = Mutex::new(sb);
    let mut ha = a.header();
    ha.time_offset_ns = 5_000;
    let mut hb = b.header();
    hb.time_offset_ns = 12_000;
    save_to_path(&sa, &pa, &ha, &[], &mut a, &opts(Codec::Zstd)).unwrap();
    save_to_path(&sb, &pb, &hb, &[], &mut b, &opts(Codec::Zstd)).unwrap();
    let (loaded, report) = load(&[&pa, &pb], &mut a, &LoadOptions::default()).unwrap();
    assert_eq!(report.files[1].ts_shift, 7_000);
    let sb = sb.lock().unwrap();
    let first_b = all(&sb)[0];
    assert_eq!(
        loaded.get(first_b.id).unwrap().timestamp,
        first_b.timestamp + 7_000
    );
}

#[test]
fn a_cut_short_file_loads_its_complete_blocks_and_says_so() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let s = workload(&mut vm, 8, 3000, 0, 100_000);
    let path = temp("cut");
    let s = save(&mut vm, s, &path, Codec::Zstd);
    let bytes = std::fs::read(&path).unwrap();
    let cut = temp("cut_part");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (loaded, report) = load(&[&cut], &mut vm, &LoadOptions::default()).unwrap();
    let Status::Partial { at, lost_bytes } = report.files[0].status else {
        panic!("partial expected")
    };
    assert!(at > 0 && lost_bytes > 0);
    assert!(!loaded.is_empty() && loaded.len() < 3000);
    // What loaded is the saved store's first events, unchanged.
    let guard = s.lock().unwrap();
    let orig = all(&guard);
    assert_eq!(many(all(&loaded)), many(orig[..loaded.len()].to_vec()));
    let strict = load(
        &[&cut],
        &mut vm,
        &LoadOptions {
            strict: true,
            ..LoadOptions::default()
        },
    );
    assert_eq!(strict.err().unwrap().kind, tracefile::ErrorKind::Incomplete);
    assert!(info(&cut).unwrap().trailer.is_none());
}

#[test]
fn saving_while_the_store_grows_writes_what_it_held_at_the_start() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let s = Mutex::new(workload(&mut vm, 2, 4000, 0, 5000));
    let path = temp("growing");
    let header = vm.header();
    let names: Vec<(u64, Vec<u8>)> = Vec::new();
    // A writer thread keeps inserting (and evicting) while the save runs,
    // from the moment the save has taken its starting point (its first
    // write to the file comes after), so what the store held then is known.
    let started = std::sync::atomic::AtomicBool::new(false);
    struct Signal<'a, W> {
        w: W,
        started: &'a std::sync::atomic::AtomicBool,
    }
    impl<W: std::io::Write> std::io::Write for Signal<'_, W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.started
                .store(true, std::sync::atomic::Ordering::Release);
            self.w.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.w.flush()
        }
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            while !started.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::yield_now();
            }
            for i in 0..20_000u64 {
                let ev = Event {
                    id: 100_000 + i,
                    timestamp: 10_000_000 + i as i64,
                    kind: EventKind::Term as u8,
                    pid: pid_word(3),
                    ..Event::default()
                };
                s.lock().unwrap().insert(&ev, CorrelationFields::default());
            }
        });
        let file = std::fs::File::create(&path).unwrap();
        let summary = tracefile::save(
            &s,
            Signal {
                w: std::io::BufWriter::new(file),
                started: &started,
            },
            &header,
            &names,
            &mut vm,
            &SaveOptions {
                lock_chunk: 64,
                block_events: 128,
                sync: false,
                ..SaveOptions::default()
            },
        );
        writer.join().unwrap();
        let summary = summary.unwrap();
        // What was stored when the save started (the writer may have added
        // some first), minus what the writer evicted before the scan.
        let live = info(&path).unwrap().header.store.live;
        assert!(live >= 4000);
        assert_eq!(summary.events + summary.skipped, live);
    });
    let (loaded, _) = load(
        &[&path],
        &mut Vm::new("a@host", 7, &[]),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(all(&loaded).iter().all(|e| e.id <= 4000 || e.id >= 100_000));
}

#[test]
fn names_and_the_metadata_symbol_table_round_trip() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let s = workload(&mut vm, 4, 500, 0, 1000);
    let path = temp("names");
    let mut header = vm.header();
    let ok = vm.atom("ok");
    let mut syms = tracefile::symbols::SymbolWriter::new();
    let mut tape = Vec::new();
    t_tuple(&mut tape, 2);
    t_imm(&mut tape, ok);
    t_imm(&mut tape, pid_word(100));
    tracefile::ptape::to_portable(&tape, &mut header.metadata, &mut syms, &mut vm).unwrap();
    let mut defs = Vec::new();
    let p = syms.pending().unwrap();
    let mut c = tracefile::bytes::Cursor::new(p.bytes);
    for _ in 0..p.count {
        defs.push(tracefile::Symbol::get(&mut c).unwrap());
    }
    header.meta_symbols = defs;
    let s = Mutex::new(s);
    let names = vec![(pid_word(100), b"Elixir.Bank".to_vec())];
    save_to_path(&s, &path, &header, &names, &mut vm, &opts(Codec::Zstd)).unwrap();
    let i = info(&path).unwrap();
    assert_eq!(i.header.meta_symbols.len(), 3); // ok, the node atom, the pid
    let (_, report) = load(&[&path], &mut vm, &LoadOptions::default()).unwrap();
    assert_eq!(
        report.files[0].names,
        vec![(pid_word(100), "Elixir.Bank".to_string())]
    );
    let _ = Local::Imm(0);
}

/// A store of term records with event-type and AST-node keys (and a few
/// calls between them), as `DataAccess.store_event/2` makes it.
fn keyed_terms(vm: &mut Vm, n: u64) -> EventStore {
    use elixir_scope_core::TermKeys;
    let mut store = EventStore::new(StoreConfig {
        max_events: 10_000,
        max_age_ns: None,
    });
    let (m, f) = (vm.atom("Elixir.Mod"), vm.atom("run"));
    for id in 1..=n {
        let corr = CorrelationFields {
            correlation_id: id,
            parent_id: 0,
            root_id: 0,
        };
        let mut ev = Event {
            id,
            timestamp: 1_000 + id as i64 * 10,
            wall_time: 5_000 + id as i64 * 10,
            pid: pid_word(100 + id % 3),
            ..Event::default()
        };
        if id % 5 == 0 {
            ev.kind = EventKind::FunctionCall as u8;
            ev.module = m;
            ev.function = f;
            store.insert(&ev, corr);
        } else {
            ev.kind = EventKind::Term as u8;
            let keys = TermKeys {
                event_type: if id % 4 == 0 { 0 } else { 1 << 63 | (id % 3) },
                ast_node: if id % 3 == 0 {
                    0
                } else {
                    1 << 63 | (1 << 40) | (id % 7)
                },
            };
            store.insert_term(&ev, corr, keys);
        }
    }
    store
}

fn key_answers(a: &EventStore, b: &EventStore) {
    assert_eq!(a.index_sizes(), b.index_sizes());
    for o in [Order::Asc, Order::Desc] {
        for t in 0..3u64 {
            let k = 1 << 63 | t;
            assert_eq!(
                many(a.by_event_type(k, 1000, o)),
                many(b.by_event_type(k, 1000, o))
            );
        }
        for n in 0..7u64 {
            let k = 1 << 63 | (1 << 40) | n;
            let (x, y) = (a.by_ast_node(k, 1000, o), b.by_ast_node(k, 1000, o));
            assert_eq!(many(x.clone()), many(y.clone()));
            let keys = |v: &[StoredEvent]| v.iter().map(|e| e.ast_node).collect::<Vec<_>>();
            assert_eq!(keys(&x), keys(&y));
        }
    }
}

#[test]
fn term_records_keep_their_event_type_and_ast_node_indexes() {
    let mut vm = Vm::new("a@host", 7, &[]);
    let original = keyed_terms(&mut vm, 300);
    let sizes = original.index_sizes();
    assert!(sizes.event_type > 100 && sizes.ast_node > 100, "{sizes:?}");
    let path = temp("term_keys");
    let original = save(&mut vm, original, &path, Codec::Zstd);
    let (loaded, _) = load(&[&path], &mut vm, &LoadOptions::default()).unwrap();
    let original = original.lock().unwrap();
    same_answers(&original, &loaded);
    key_answers(&original, &loaded);

    // Merged with itself (ids move up): the keys are hashes, never moved.
    let (merged, _) = load(&[&path, &path], &mut vm, &LoadOptions::default()).unwrap();
    let s = merged.index_sizes();
    assert_eq!(
        (s.event_type, s.ast_node),
        (2 * sizes.event_type, 2 * sizes.ast_node)
    );
    for n in 1..7u64 {
        let k = 1 << 63 | (1 << 40) | n;
        let want = original.by_ast_node(k, 1000, Order::Asc).len();
        assert_eq!(merged.by_ast_node(k, 1000, Order::Asc).len(), 2 * want);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_format_1_1_file_loads_with_its_event_type_index() {
    // Format 1.1 writers wrote a term record's event-type key (its aux)
    // but no AST-node key: byte for byte a 1.2 file of a store without
    // AST keys, with minor version 1 in the preamble.
    use elixir_scope_core::TermKeys;
    let mut vm = Vm::new("a@host", 7, &[]);
    let mut store = EventStore::new(StoreConfig {
        max_events: 100,
        max_age_ns: None,
    });
    for id in 1..=40u64 {
        let ev = Event {
            id,
            timestamp: id as i64,
            pid: pid_word(100),
            kind: EventKind::Term as u8,
            ..Event::default()
        };
        let corr = CorrelationFields {
            correlation_id: id,
            parent_id: 0,
            root_id: 0,
        };
        let keys = TermKeys {
            event_type: 1 << 63 | (id % 2),
            ast_node: 0,
        };
        store.insert_term(&ev, corr, keys);
    }
    let path = temp("v1_1");
    let _ = save(&mut vm, store, &path, Codec::Lz4);
    let mut bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[8..12], &[1, 0, 2, 0], "major 1, minor 2 written");
    bytes[10] = 1;
    std::fs::write(&path, &bytes).unwrap();
    let (loaded, _) = load(&[&path], &mut vm, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.by_event_type(1 << 63, 100, Order::Asc).len(), 20);
    assert_eq!(loaded.by_event_type(1 << 63 | 1, 100, Order::Asc).len(), 20);
    let s = loaded.index_sizes();
    assert_eq!((s.total, s.event_type, s.ast_node), (40, 40, 0));
    std::fs::remove_file(&path).unwrap();
}
