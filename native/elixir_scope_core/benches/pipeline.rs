//! Criterion bench of the native pipeline end to end, without a BEAM:
//! producer threads write call/return/send/receive events into the shards,
//! the pool's workers correlate and store them; one iteration ends when
//! `flush` confirms every event is stored (queryable).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use elixir_scope_core::{
    next_event_id, shard_of, Event, EventKind, Overflow, Pipeline, PipelineConfig, PoolConfig,
    StoreConfig,
};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const PER_PRODUCER: u64 = 200_000;

fn clock() -> i64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as i64 + 1
}

/// One producer's workload: nested call pairs with a message in between,
/// as a traced process would produce (payload: 48 bytes).
fn produce(p: &Pipeline, pid: u64, n: u64) {
    let ring = &p.shards()[shard_of(pid, p.shards().len())];
    let mut i = 0;
    while i < n {
        let kind = match i % 6 {
            0 | 1 => EventKind::FunctionCall,
            2 => EventKind::MessageSend,
            3 => EventKind::MessageReceive,
            _ => EventKind::FunctionReturn,
        };
        let ok = ring.push_with(|ev| {
            ev.id = next_event_id();
            ev.timestamp = clock();
            ev.pid = pid;
            ev.kind = kind as u8;
            ev.module = 11;
            ev.function = 13 + (i % 2);
            // Keys: call 1, call 2, ..., return 2, return 1 (properly nested).
            ev.peer = match i % 6 {
                0 | 5 => 1,
                1 | 4 => 2,
                2 => pid,
                _ => 0,
            };
            ev.aux = (i / 6) as i64;
            ev.payload.clear();
            ev.payload.extend_from_slice(&[7u8; 48]);
        });
        if ok.is_ok() {
            i += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

fn end_to_end(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline_end_to_end");
    g.sample_size(10);
    for (producers, workers) in [(1u64, 1usize), (1, 2), (2, 2)] {
        g.throughput(Throughput::Elements(producers * PER_PRODUCER));
        let config = PipelineConfig {
            shards: 16,
            shard_capacity: 1 << 15,
            overflow: Overflow::DropNewest,
            pool: PoolConfig {
                workers,
                batch_size: 1000,
                flush_interval: Duration::from_micros(200),
                max_dead_letters: 16,
                ..PoolConfig::default()
            },
            store: StoreConfig {
                max_events: 1_000_000,
                max_age_ns: None,
            },
            ..PipelineConfig::default()
        };
        let p = Arc::new(Pipeline::new(config, clock).unwrap());
        let id = BenchmarkId::new(format!("{producers}p_{workers}w"), PER_PRODUCER);
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Arc::new(Barrier::new(producers as usize + 1));
                    let hs: Vec<_> = (0..producers)
                        .map(|t| {
                            let (p, start) = (Arc::clone(&p), Arc::clone(&start));
                            std::thread::spawn(move || {
                                start.wait();
                                produce(&p, 0x1000 + t * 16, PER_PRODUCER)
                            })
                        })
                        .collect();
                    start.wait();
                    let t0 = Instant::now();
                    hs.into_iter().for_each(|h| h.join().unwrap());
                    assert!(p.flush(Duration::from_secs(60)));
                    total += t0.elapsed();
                }
                total
            })
        });
        let a = p.accounting();
        assert_eq!(a.unaccounted(), 0, "{a:?}");
        let m = p.engine().metrics();
        eprintln!(
            "{producers}p_{workers}w: accepted {} stored {} evicted {} p50 {} ns p99 {} ns",
            a.accepted, a.stored, a.evicted, m.latency_p50_ns, m.latency_p99_ns
        );
    }
    g.finish();
}

/// The correlate-and-store stage alone, on prebuilt batches of 1,000
/// events (what a worker does per batch), with correlation on and off and
/// with a small and a large store.
fn engine_stage(c: &mut Criterion) {
    use elixir_scope_core::{Engine, EventStore};
    use std::sync::Mutex;
    let mut g = c.benchmark_group("engine_stage");
    g.throughput(Throughput::Elements(1000));
    for (max_events, correlate) in [(100_000usize, true), (1_000_000, true), (1_000_000, false)] {
        let store = Arc::new(Mutex::new(EventStore::new(StoreConfig {
            max_events,
            max_age_ns: None,
        })));
        let engine = Engine::new(Default::default(), store, clock, Duration::from_secs(60));
        engine.set_correlation_enabled(correlate);
        let batch: Vec<Event> = (0..1000u64)
            .map(|i| {
                let kind = match i % 6 {
                    0 | 1 => EventKind::FunctionCall,
                    2 => EventKind::MessageSend,
                    3 => EventKind::MessageReceive,
                    _ => EventKind::FunctionReturn,
                };
                let pid = 0x1000 + (i / 6 % 64) * 16;
                Event {
                    id: 0,
                    timestamp: 0,
                    pid,
                    kind: kind as u8,
                    module: 11,
                    function: 13 + (i % 2),
                    // Properly nested keys; sends go to the sender itself.
                    peer: match i % 6 {
                        0 | 5 => 1,
                        1 | 4 => 2,
                        2 => pid,
                        _ => 0,
                    },
                    aux: (i / 6) as i64,
                    payload: vec![7u8; 48],
                    ..Event::default()
                }
            })
            .collect();
        let mut batch = batch;
        // Fill the store to its bound first.
        for _ in 0..(max_events / 1000 + 1) {
            for e in batch.iter_mut() {
                e.id = next_event_id();
                e.timestamp = clock();
            }
            engine.process(&batch).unwrap();
        }
        let name = format!(
            "{}k_{}",
            max_events / 1000,
            if correlate { "corr" } else { "store_only" }
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                for e in batch.iter_mut() {
                    e.id = next_event_id();
                    e.timestamp = clock();
                }
                engine.process(&batch).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, end_to_end, engine_stage);
criterion_main!(benches);
