//! Trace files: save and load rates and bytes per event for each block
//! codec, on a 2M-event trace shaped like the tracer's `payload: :arity`
//! traces (recursive calls and returns of 4 processes, no payloads) and a
//! `payload: :full`-like one (arguments and return values). Plain timing,
//! medians of `ES_TF_ROUNDS` (default 5) rounds, printed as a table: the
//! measurement behind the choice of the default codec (see the README).
//!
//! `cargo bench -p elixir_scope_core --bench tracefile`

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use elixir_scope_core::tracefile::{load, save, save_to_path, Codec, LoadOptions, SaveOptions};
use elixir_scope_core::{CorrelationFields, Event, EventKind, EventStore, StoreConfig};
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` events of recursive calls (depth up to 40) in 4 processes.
pub fn trace(vm: &mut Vm, n: usize, full: bool) -> EventStore {
    let mut store = EventStore::new(StoreConfig {
        max_events: n,
        max_age_ns: None,
    });
    let m = vm.atom("Elixir.Bench.Work");
    let f = vm.atom("recurse");
    let ok = vm.atom("ok");
    let mut ts = 1_000_000_000i64;
    let mut id = 1u64;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut stacks: Vec<Vec<(u64, i64)>> = vec![Vec::new(); 4];
    let mut count = 0;
    while count < n {
        let p = (count / 640) % 4;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ts += 150 + (state % 100) as i64;
        let st = &mut stacks[p];
        let call = st.len() < 40 && (st.is_empty() || state % 3 != 0);
        let mut ev = Event {
            id,
            timestamp: ts,
            wall_time: ts + 1_700_000_000_000_000_000,
            pid: pid_word(100 + p as u64),
            ..Event::default()
        };
        let corr = if call {
            ev.kind = EventKind::FunctionCall as u8;
            ev.module = m;
            ev.function = f;
            ev.aux = 2;
            if full {
                t_list(&mut ev.payload, 2);
                t_imm(&mut ev.payload, small_word(st.len() as i64));
                t_tuple(&mut ev.payload, 2);
                t_imm(&mut ev.payload, ok);
                t_imm(&mut ev.payload, small_word((state % 1000) as i64));
                t_imm(&mut ev.payload, NIL);
            }
            let c = CorrelationFields {
                correlation_id: id,
                parent_id: st.last().map_or(0, |x| x.0),
                root_id: st.first().map_or(id, |x| x.0),
            };
            st.push((id, ts));
            c
        } else {
            let (call_id, t0) = st.pop().expect("non-empty");
            ev.kind = EventKind::FunctionReturn as u8;
            ev.aux = ts - t0;
            if full {
                t_tuple(&mut ev.payload, 2);
                t_imm(&mut ev.payload, ok);
                t_imm(&mut ev.payload, small_word(st.len() as i64));
            }
            CorrelationFields {
                correlation_id: call_id,
                parent_id: st.last().map_or(0, |x| x.0),
                root_id: 0,
            }
        };
        store.insert(&ev, corr);
        id += 1;
        count += 1;
    }
    store
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let n = env_usize("ES_TF_EVENTS", 2_000_000);
    let rounds = env_usize("ES_TF_ROUNDS", 5);
    let dir = std::env::temp_dir();
    println!("trace files, {n} events, medians of {rounds} rounds");
    println!(
        "{:<7} {:<11} {:>13} {:>13} {:>13} {:>11} {:>13}",
        "payload", "codec", "encode M/s", "save M/s", "file B/event", "raw B/event", "load M/s"
    );
    for full in [false, true] {
        let mut vm = Vm::new("a@host", 1, &[]);
        let store = Mutex::new(trace(&mut vm, n, full));
        let header = vm.header();
        for (codec, level, name) in [
            (Codec::None, 0, "none"),
            (Codec::Lz4, 0, "lz4"),
            (Codec::Zstd, -1, "zstd -1"),
            (Codec::Zstd, 1, "zstd 1"),
            (Codec::Zstd, 3, "zstd 3"),
        ] {
            let opts = SaveOptions {
                codec,
                level,
                sync: false,
                ..SaveOptions::default()
            };
            let path = dir.join(format!("es_tf_bench_{}.trace", std::process::id()));
            let (mut enc, mut sv, mut ld) = (Vec::new(), Vec::new(), Vec::new());
            let mut bytes = 0;
            let mut raw = 0;
            for _ in 0..rounds {
                // Encoding and compression alone, into a discarding sink.
                let t = Instant::now();
                let s = save(&store, std::io::sink(), &header, &[], &mut vm, &opts).unwrap();
                enc.push(n as f64 / t.elapsed().as_secs_f64() / 1e6);
                let t = Instant::now();
                let s2 = save_to_path(&store, &path, &header, &[], &mut vm, &opts).unwrap();
                sv.push(n as f64 / t.elapsed().as_secs_f64() / 1e6);
                assert_eq!(s.bytes, s2.bytes);
                bytes = s2.bytes;
                raw = s2.raw_event_bytes;
                let t = Instant::now();
                let (loaded, _) = load(&[&path], &mut vm, &LoadOptions::default()).unwrap();
                ld.push(n as f64 / t.elapsed().as_secs_f64() / 1e6);
                assert_eq!(loaded.len(), n);
            }
            let _ = std::fs::remove_file(&path);
            println!(
                "{:<7} {:<11} {:>13.2} {:>13.2} {:>13.2} {:>11.2} {:>13.2}",
                if full { "full" } else { "arity" },
                name,
                median(&mut enc),
                median(&mut sv),
                bytes as f64 / n as f64,
                raw as f64 / n as f64,
                median(&mut ld)
            );
            std::io::stdout().flush().unwrap();
        }
    }
}
