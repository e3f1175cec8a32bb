//! Loading bad trace files: every cut of a file (at and between block
//! boundaries), thousands of seeded byte flips (caught by the checksums),
//! flips behind re-computed checksums (caught by the structural checks),
//! hostile lengths, nesting, symbols and atoms, and proptest fuzzing of
//! every block kind's payload. Each case must end in `Ok` (a cut-short
//! file: its complete blocks) or a `FileError` naming the problem and the
//! block's offset — never a panic, never an unbounded allocation.

mod common;

use common::*;
use elixir_scope_core::analysis::{call_stats, message_flow, top_call_trees, StatKey};
use elixir_scope_core::tracefile::block::{tag, BlockHeader, Codec, BLOCK_HEADER};
use elixir_scope_core::tracefile::bytes::{put_bytes, put_varint};
use elixir_scope_core::tracefile::etf::{scan, EtfVisitor};
use elixir_scope_core::tracefile::ptape::{to_local, Local, P_INT, P_SYM};
use elixir_scope_core::tracefile::{
    load, save_to_path, ErrorKind, FileError, LoadOptions, SaveOptions, Status, MAGIC, PREAMBLE,
};
use elixir_scope_core::{EventStore, Order};
use proptest::prelude::*;
use std::sync::Mutex;

fn file(codec: Codec, n: usize, block_events: usize) -> Vec<u8> {
    let mut vm = Vm::new("a@host", 7, &[]);
    let store = Mutex::new(workload(&mut vm, 77, n, 0, 100_000));
    let path = temp("fuzz_src");
    let opts = SaveOptions {
        codec,
        block_events,
        sync: false,
        ..SaveOptions::default()
    };
    save_to_path(&store, &path, &vm.header(), &[], &mut vm, &opts).unwrap();
    let b = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    b
}

/// (offset, total length, tag, count) of each block.
fn blocks(b: &[u8]) -> Vec<(usize, usize, u8, u32)> {
    let mut out = Vec::new();
    let mut at = PREAMBLE;
    while at + BLOCK_HEADER <= b.len() {
        let h = BlockHeader::decode(b[at..at + BLOCK_HEADER].try_into().unwrap()).unwrap();
        let len = BLOCK_HEADER + h.stored_len as usize;
        out.push((at, len, h.tag, h.count));
        at += len;
    }
    out
}

fn try_load(bytes: &[u8]) -> Result<(EventStore, Status), FileError> {
    let path = temp("fuzz_case");
    std::fs::write(&path, bytes).unwrap();
    let mut vm = Vm::new("a@host", 7, &[]);
    let r = load(&[&path], &mut vm, &LoadOptions::default());
    std::fs::remove_file(&path).unwrap();
    r.map(|(s, rep)| (s, rep.files[0].status))
}

/// Every query runs without panicking on a store loaded from a file.
fn exercise(store: &EventStore) {
    let mut ids = Vec::new();
    store.scan(0, usize::MAX, |e| ids.push((e.id, e.pid, e.timestamp)));
    for key in [StatKey::Function, StatKey::Process] {
        call_stats(store, key, &[]);
    }
    top_call_trees(store, 10, 2, 2);
    message_flow(store, 0, 0, 1000);
    for &(id, pid, ts) in ids.iter().step_by(7) {
        store.causal_chain(id);
        elixir_scope_core::call_contents(store, id, 100);
        store.pid_next(id);
        store.time_neighbour(id, Order::Desc);
        store.by_pid(pid, 10, Order::Asc);
        store.by_time_range(ts, ts.saturating_add(1000), 10, Order::Asc);
    }
}

#[test]
fn every_cut_of_a_file_loads_its_complete_blocks_or_is_refused() {
    let b = file(Codec::Zstd, 600, 50);
    let bl = blocks(&b);
    assert!(bl.len() > 10);
    let header_end = bl[0].0 + bl[0].1;
    for cut in 0..=b.len() {
        match try_load(&b[..cut]) {
            Ok((store, status)) => {
                assert!(cut >= header_end, "a cut at {cut} inside the header loaded");
                // The events of every event block complete before the cut.
                let expect: u32 = bl
                    .iter()
                    .filter(|&&(at, len, t, _)| t == tag::EVENTS && at + len <= cut)
                    .map(|&(_, _, _, n)| n)
                    .sum();
                assert_eq!(store.len() as u32, expect, "cut at {cut}");
                match status {
                    Status::Complete(_) => assert_eq!(cut, b.len()),
                    Status::Partial { at, lost_bytes } => {
                        assert!(cut < b.len());
                        assert_eq!(at as usize + lost_bytes as usize, cut);
                        assert!(bl.iter().any(|&(o, _, _, _)| o == at as usize));
                    }
                }
            }
            Err(e) => {
                assert!(cut < header_end, "a cut at {cut} after the header: {e}");
                assert!(
                    matches!(e.kind, ErrorKind::Truncated | ErrorKind::NotATraceFile),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn thousands_of_seeded_byte_flips_are_caught_by_the_checksums() {
    for codec in [Codec::Zstd, Codec::None] {
        let b = file(codec, 400, 64);
        let mut rng = Rng(0xfeed_f00d);
        let mut by_kind = std::collections::BTreeMap::new();
        for _ in 0..2500 {
            let mut c = b.clone();
            let flips = 1 + rng.below(3) as usize;
            let mut only_minor = true;
            for _ in 0..flips {
                let at = rng.below(c.len() as u64) as usize;
                c[at] ^= 1 + rng.below(255) as u8;
                only_minor &= (10..12).contains(&at);
            }
            match try_load(&c) {
                Ok((store, Status::Complete(_))) => {
                    assert!(
                        only_minor,
                        "a flip outside the minor version went unnoticed"
                    );
                    assert_eq!(store.len(), 400);
                    *by_kind.entry("ok").or_insert(0) += 1;
                }
                Ok((_, Status::Partial { .. })) => panic!("a flip read as a cut"),
                Err(e) => {
                    assert!(e.offset as usize <= c.len());
                    *by_kind.entry(e.kind.name()).or_insert(0) += 1;
                }
            }
        }
        eprintln!("{codec:?} flips: {by_kind:?}");
        assert!(by_kind.get("checksum_mismatch").copied().unwrap_or(0) > 1000);
    }
}

/// Re-seal a block after its payload was edited (fix both checksums).
fn reseal(b: &mut [u8], at: usize) {
    let mut h =
        BlockHeader::decode(b[at..at + BLOCK_HEADER].try_into().unwrap()).unwrap_or_else(|_| {
            // Header edited too: rebuild it from its raw fields.
            let raw = &b[at..at + BLOCK_HEADER];
            BlockHeader {
                tag: raw[0],
                codec: Codec::None,
                stored_len: u32::from_le_bytes(raw[4..8].try_into().unwrap()),
                raw_len: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
                count: u32::from_le_bytes(raw[12..16].try_into().unwrap()),
                a: u64::from_le_bytes(raw[16..24].try_into().unwrap()),
                b: u64::from_le_bytes(raw[24..32].try_into().unwrap()),
                payload_crc: 0,
            }
        });
    let end = (at + BLOCK_HEADER + h.stored_len as usize).min(b.len());
    h.payload_crc = crc32fast::hash(&b[at + BLOCK_HEADER..end]);
    b[at..at + BLOCK_HEADER].copy_from_slice(&h.encode());
}

#[test]
fn flips_behind_valid_checksums_are_caught_by_the_structural_checks() {
    let b = file(Codec::None, 400, 64);
    let bl = blocks(&b);
    let mut rng = Rng(0xabcdef);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let mut c = b.clone();
        let &(at, len, _, _) = &bl[rng.below(bl.len() as u64) as usize];
        if len == BLOCK_HEADER {
            continue;
        }
        for _ in 0..1 + rng.below(4) {
            let i = at + BLOCK_HEADER + rng.below((len - BLOCK_HEADER) as u64) as usize;
            c[i] ^= 1 + rng.below(255) as u8;
        }
        reseal(&mut c, at);
        match try_load(&c) {
            Ok((store, _)) => {
                exercise(&store);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(e.offset as usize, at, "{e}");
                assert!(e.block.is_some());
                err += 1;
            }
        }
    }
    eprintln!("re-sealed flips: {ok} loaded (values changed), {err} refused");
    assert!(err > 500 && ok > 0);
}

// ---- hand-made hostile files ------------------------------------------------

fn preamble(major: u16) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&major.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

fn block(out: &mut Vec<u8>, t: u8, raw: &[u8], count: u32, a: u64, b: u64) {
    let h = BlockHeader {
        tag: t,
        codec: Codec::None,
        stored_len: raw.len() as u32,
        raw_len: raw.len() as u32,
        count,
        a,
        b,
        payload_crc: crc32fast::hash(raw),
    };
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(raw);
}

/// A file: preamble, header block, then `rest`.
fn hostile(rest: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let vm = Vm::new("a@host", 7, &[]);
    let mut b = preamble(1);
    block(&mut b, tag::HEADER, &vm.header().encode(), 0, 0, 0);
    rest(&mut b);
    b
}

/// Symbols: atom "m", atom "f", the node atom, pid 1 of it, pair (m, f).
fn symbols(b: &mut Vec<u8>) {
    let mut s = Vec::new();
    for name in ["m", "f", "a@host"] {
        s.push(1);
        put_bytes(&mut s, name.as_bytes());
    }
    s.extend_from_slice(&[2, 2, 1, 0, 0]); // pid: node 2, id 1, serial 0, creation 0
    s.push(4); // pair: module sym 0, function sym 1
    put_varint(&mut s, 2);
    put_varint(&mut s, 4);
    block(b, tag::SYMBOLS, &s, 5, 0, 0);
}

/// One event block of call records (id 1..) with the given payloads.
fn events(b: &mut Vec<u8>, payloads: &[Vec<u8>]) {
    let n = payloads.len();
    let mut cols: Vec<Vec<u8>> = vec![Vec::new(); 15];
    for (i, p) in payloads.iter().enumerate() {
        cols[0].push(2); // kind: call
        cols[1].push(0);
        let mut shape = if i == 0 { 128 } else { 0 }; // pid on the first
        if !p.is_empty() {
            shape |= 16;
            put_varint(&mut cols[13], p.len() as u64);
            cols[14].extend_from_slice(p);
        }
        cols[2].push(shape);
        put_varint(&mut cols[3], 2); // id delta +1 (zigzag)
        put_varint(&mut cols[4], 200); // ts delta +100
        put_varint(&mut cols[7], 5); // the pair (symbol 4) + 1
    }
    put_varint(&mut cols[5], (3 + 1) << 1); // pid: symbol 3
    let mut raw = Vec::new();
    for c in &cols {
        put_varint(&mut raw, c.len() as u64);
        raw.extend_from_slice(c);
    }
    block(b, tag::EVENTS, &raw, n as u32, 1, n as u64);
}

fn kind_of(b: &[u8]) -> ErrorKind {
    match try_load(b) {
        Err(e) => e.kind,
        Ok(_) => panic!("a hostile file loaded"),
    }
}

#[test]
fn the_hand_made_baseline_file_loads() {
    let b = hostile(|b| {
        symbols(b);
        events(b, &[vec![], vec![P_INT, 4]]);
    });
    let (store, status) = try_load(&b).unwrap();
    assert_eq!(store.len(), 2);
    assert!(matches!(status, Status::Partial { lost_bytes: 0, .. }));
}

#[test]
fn lengths_that_claim_gigabytes_are_refused_before_any_allocation() {
    for (stored, raw, count) in [
        (0xFFFF_FFF0u32, 100u32, 0u32),
        (100, 0x8000_0000, 0),
        (100, 100 * 65, 0),
        (100, 100, 1 << 24),
    ] {
        let b = hostile(|b| {
            let h = BlockHeader {
                tag: tag::EVENTS,
                codec: Codec::Zstd,
                stored_len: stored,
                raw_len: raw,
                count,
                a: 0,
                b: 0,
                payload_crc: 0,
            };
            b.extend_from_slice(&h.encode());
            b.extend_from_slice(&[0u8; 100]);
        });
        let e = try_load(&b).err().unwrap();
        assert_eq!(e.kind, ErrorKind::BadBlock, "{e}");
        assert_eq!(e.block, Some(1));
    }
    // Varint lengths inside payloads claiming 2^40 bytes.
    let mut huge = Vec::new();
    put_varint(&mut huge, 1 << 40);
    let b = hostile(|b| {
        let mut s = vec![1];
        s.extend_from_slice(&huge);
        block(b, tag::SYMBOLS, &s, 1, 0, 0);
    });
    assert_eq!(kind_of(&b), ErrorKind::BadSymbol);
    let mut t = vec![2]; // a tuple of 2^40 elements
    t.extend_from_slice(&huge);
    let b = hostile(|b| {
        symbols(b);
        events(b, &[t.clone()]);
    });
    assert_eq!(kind_of(&b), ErrorKind::BadTerm);
}

#[test]
fn deep_nesting_bad_floats_and_bad_etf_are_refused() {
    let mut deep = Vec::new();
    for _ in 0..10_000 {
        deep.extend_from_slice(&[2, 1]);
    }
    deep.push(11);
    let mut nan = vec![5];
    nan.extend_from_slice(&f64::NAN.to_le_bytes());
    let mut deep_etf = vec![6];
    let mut etf = vec![131];
    for _ in 0..1000 {
        etf.extend_from_slice(&[104, 1]);
    }
    etf.push(106);
    put_bytes(&mut deep_etf, &etf);
    let mut bad_sym = vec![P_SYM];
    put_varint(&mut bad_sym, 99);
    for p in [deep, nan, deep_etf, bad_sym, vec![77], vec![P_INT, 0xff]] {
        let b = hostile(|b| {
            symbols(b);
            events(b, std::slice::from_ref(&p));
        });
        let e = try_load(&b).err().unwrap();
        assert!(
            matches!(e.kind, ErrorKind::BadTerm | ErrorKind::Malformed),
            "{e}"
        );
    }
}

#[test]
fn symbols_must_be_well_typed_and_atoms_within_budget() {
    // A pid whose node is the pair symbol; a pair of an undefined symbol.
    for s in [vec![4, 0, 0, 2, 0, 1, 0, 0], vec![4, 40, 0]] {
        let b = hostile(|b| block(b, tag::SYMBOLS, &s, if s.len() > 3 { 2 } else { 1 }, 0, 0));
        assert_eq!(kind_of(&b), ErrorKind::BadSymbol);
    }
    // Symbols numbered out of order.
    let b = hostile(|b| block(b, tag::SYMBOLS, &[1, 1, b'x'], 1, 5, 0));
    assert_eq!(kind_of(&b), ErrorKind::Malformed);
    // Atoms the loading VM lacks, with no budget left.
    let b = hostile(|b| {
        symbols(b);
        events(b, &[vec![]]);
    });
    let path = temp("no_budget");
    std::fs::write(&path, &b).unwrap();
    let mut vm = Vm::new("b@host", 7, &[]);
    vm.budget = 1;
    let e = load(&[&path], &mut vm, &LoadOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::TooManyAtoms);
    assert_eq!(vm.created, 1, "created up to the budget, no more");
}

#[test]
fn versions_trailing_data_and_a_second_header_are_refused() {
    let mut b = hostile(|_| {});
    b[8] = 2;
    assert_eq!(kind_of(&b), ErrorKind::UnsupportedVersion);
    let full = file(Codec::Zstd, 50, 10);
    let mut extra = full.clone();
    extra.extend_from_slice(&[0; 3]);
    assert_eq!(kind_of(&extra), ErrorKind::Malformed);
    let vm = Vm::new("a@host", 7, &[]);
    let b = hostile(|b| block(b, tag::HEADER, &vm.header().encode(), 0, 0, 0));
    assert_eq!(kind_of(&b), ErrorKind::Malformed);
    assert_eq!(
        kind_of(b"hello world, not a trace"),
        ErrorKind::NotATraceFile
    );
    assert_eq!(kind_of(b""), ErrorKind::NotATraceFile);
}

struct Nop;
impl EtfVisitor for Nop {
    fn atom(&mut self, _: &[u8], _: bool) -> Result<(), String> {
        Ok(())
    }
    fn node(&mut self, _: &[u8], _: bool, _: u32) -> Option<u32> {
        None
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn any_event_block_payload_is_safe(raw in proptest::collection::vec(any::<u8>(), 0..600), count in 0u32..80) {
        let b = hostile(|b| {
            symbols(b);
            block(b, tag::EVENTS, &raw, count, 1, count as u64);
        });
        if let Ok((store, _)) = try_load(&b) {
            exercise(&store);
        }
    }

    #[test]
    fn any_symbol_block_payload_is_safe(raw in proptest::collection::vec(any::<u8>(), 0..300), count in 0u32..40) {
        let b = hostile(|b| {
            block(b, tag::SYMBOLS, &raw, count, 0, 0);
            events(b, &[vec![]]);
        });
        let _ = try_load(&b);
    }

    #[test]
    fn any_header_or_names_payload_is_safe(raw in proptest::collection::vec(any::<u8>(), 0..300), count in 0u32..10) {
        let mut b = preamble(1);
        block(&mut b, tag::HEADER, &raw, 0, 0, 0);
        let _ = try_load(&b);
        let b = hostile(|b| {
            symbols(b);
            block(b, tag::NAMES, &raw, count, 0, 0);
        });
        let _ = try_load(&b);
    }

    #[test]
    fn any_portable_tape_or_etf_is_safe(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
        let table = vec![Local::Imm(atom_word(1)), Local::Pair(1, 2)];
        let mut vm = Vm::new("a@host", 7, &[]);
        let mut out = Vec::new();
        let _ = to_local(&raw, &mut out, &table, &mut vm);
        let mut etf = raw.clone();
        etf.insert(0, 131);
        let _ = scan(&mut etf, &mut Nop);
    }
}
