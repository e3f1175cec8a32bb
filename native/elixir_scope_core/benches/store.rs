//! Criterion benches of the EventStore at 100k and 1M stored events: query
//! by pid (1,000 hits), 1,000-event time window, steady-state store rate
//! (with eviction), and bytes per event (printed). Figures only.
//!
//! `insert_rate_ratio` (runs first, plain timing, printed): the steady-state
//! insert rate of a full store of 1M events against one of 100k, same event
//! mix, measured in interleaved rounds; prints both medians, the ratio and
//! the bytes per event without payloads. Twice: with increasing ids (the
//! mix above), and with each block of 4,096 events shuffled (ids, hence
//! correlation/parent ids and timestamps, arriving out of order as when
//! several producers are merged). `ES_RATIO_ROUNDS` sets the number of
//! rounds (default 15).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use elixir_scope_core::{CorrelationFields, Event, EventStore, Order, StoreConfig};
use std::hint::black_box;
use std::time::Instant;

/// Timestamp step between consecutive events (with jitter: roughly, not
/// strictly, in order).
const STEP: i64 = 100;

fn event(i: u64, pids: u64) -> (Event, CorrelationFields) {
    let e = Event {
        id: i,
        timestamp: i as i64 * STEP + (i % 7) as i64 * 50,
        wall_time: i as i64 * STEP,
        pid: i % pids,
        peer: 0,
        module: i % 20,
        function: i % 200,
        aux: 2,
        kind: 2,
        flags: 0,
        payload: vec![0u8; 32],
    };
    let c = CorrelationFields {
        correlation_id: i / 2,
        parent_id: i - 1,
        root_id: i & !1023,
    };
    (e, c)
}

/// A full store of `n` events whose pids have 1,000 events each.
fn filled(n: usize) -> EventStore {
    filled_with(n, sequential)
}

fn sequential(i: u64) -> u64 {
    i
}

/// A bijection of each aligned block of 4,096 numbers (shifted by one
/// block, so never 0): arrival order of events merged from several
/// producers (ids roughly, not strictly, increasing).
fn shuffled(i: u64) -> u64 {
    4096 + ((i & !4095) | (i.wrapping_mul(0x9e37_79b9) & 4095))
}

/// A full store of events `order(1..=n)`.
fn filled_with(n: usize, order: fn(u64) -> u64) -> EventStore {
    let mut s = EventStore::new(StoreConfig {
        max_events: n,
        max_age_ns: None,
    });
    let pids = (n / 1000) as u64;
    for i in 1..=n as u64 {
        let (e, c) = event(order(i), pids);
        s.insert(&e, c);
    }
    s
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Inserts events `order(*next..*next + batch)` into a full store; returns
/// events per second.
fn insert_batch(
    s: &mut EventStore,
    next: &mut u64,
    pids: u64,
    batch: u64,
    order: fn(u64) -> u64,
) -> f64 {
    let t = Instant::now();
    for _ in 0..batch {
        let (e, c) = event(order(*next), pids);
        black_box(s.insert(&e, c));
        *next += 1;
    }
    batch as f64 / t.elapsed().as_secs_f64()
}

/// Steady-state insert rate at 1M stored vs 100k stored, for increasing ids
/// and for ids shuffled within blocks of 4,096.
fn insert_rate_ratio(_c: &mut Criterion) {
    insert_rate_ratio_with("increasing ids", sequential);
    insert_rate_ratio_with("ids shuffled by blocks of 4096", shuffled);
}

/// Both stores are filled, warmed up by one full lap of evicting inserts,
/// then measured in interleaved rounds (order alternating) of 200k inserts
/// each.
fn insert_rate_ratio_with(label: &str, order: fn(u64) -> u64) {
    let rounds: usize = std::env::var("ES_RATIO_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15)
        .max(1);
    const BATCH: u64 = 200_000;
    let sizes = [100_000usize, 1_000_000];
    let mut stores: Vec<(EventStore, u64, u64)> = sizes
        .iter()
        .map(|&n| {
            let mut s = filled_with(n, order);
            let pids = (n / 1000) as u64;
            // Multiples of 4,096 keep `shuffled` within fresh blocks.
            let mut next = (n as u64 + 1).next_multiple_of(4096);
            // One lap: every stored event has been inserted with eviction.
            insert_batch(&mut s, &mut next, pids, n as u64, order);
            (s, next, pids)
        })
        .collect();
    let mut rates = [Vec::new(), Vec::new()];
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let turns = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut got = [0.0; 2];
        for k in turns {
            let (s, next, pids) = &mut stores[k];
            got[k] = insert_batch(s, next, *pids, BATCH, order);
        }
        rates[0].push(got[0]);
        rates[1].push(got[1]);
        ratios.push(got[1] / got[0]);
    }
    let small = median(&mut rates[0]);
    let large = median(&mut rates[1]);
    let ratio = median(&mut ratios);
    println!(
        "insert_rate_ratio, {label}: {rounds} interleaved rounds of {BATCH} inserts \
         (steady state, evicting): 100k stored {:.2} M/s, 1M stored {:.2} M/s (medians); \
         ratio of medians {:.2}, median per-round ratio {ratio:.2} (min {:.2}, max {:.2})",
        small / 1e6,
        large / 1e6,
        large / small,
        ratios[0],
        ratios[ratios.len() - 1]
    );
    for (k, &n) in sizes.iter().enumerate() {
        let st = stores[k].0.stats();
        assert_eq!((st.total, st.duplicates), (n, 0));
        println!(
            "insert_rate_ratio, {label}: n={n}: {:.1} bytes/event without payload arenas",
            (st.memory_bytes - st.payload_bytes) as f64 / st.total as f64
        );
    }
}

fn store_benches(c: &mut Criterion) {
    for n in [100_000usize, 1_000_000] {
        let s = filled(n);
        let st = s.stats();
        println!(
            "EventStore n={n}: {} bytes, {:.1} bytes/event including 32 B payloads, \
             {:.1} bytes/event without payload arenas",
            st.memory_bytes,
            st.memory_bytes as f64 / n as f64,
            (st.memory_bytes - st.payload_bytes) as f64 / n as f64
        );
        assert_eq!(s.by_pid(7, usize::MAX, Order::Asc).len(), 1000);
        let mut g = c.benchmark_group("store_query");
        g.throughput(Throughput::Elements(1000));
        for order in [Order::Asc, Order::Desc] {
            g.bench_with_input(
                BenchmarkId::new(format!("by_pid_1000_hits_{order:?}"), n),
                &n,
                |b, _| b.iter(|| black_box(s.by_pid(black_box(7), 1000, order).len())),
            );
        }
        let t0 = (n as i64 / 2) * STEP;
        let t1 = t0 + 1000 * STEP - 1;
        let hits = s.by_time_range(t0, t1, usize::MAX, Order::Asc).len();
        assert!((990..=1010).contains(&hits), "{hits}");
        for order in [Order::Asc, Order::Desc] {
            g.bench_with_input(
                BenchmarkId::new(format!("time_window_1000_{order:?}"), n),
                &n,
                |b, _| b.iter(|| black_box(s.by_time_range(t0, t1, usize::MAX, order).len())),
            );
        }
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("get", n), &n, |b, _| {
            let mut id = 1u64;
            b.iter(|| {
                id = id % n as u64 + 1;
                black_box(s.get(id).is_some())
            })
        });
        g.finish();

        let mut g = c.benchmark_group("store_insert_steady_state");
        g.sample_size(10);
        const BATCH: u64 = 100_000;
        g.throughput(Throughput::Elements(BATCH));
        let mut s = s;
        let mut next = n as u64 + 1;
        let pids = (n / 1000) as u64;
        g.bench_with_input(
            BenchmarkId::new("insert_100k_with_eviction", n),
            &n,
            |b, _| {
                b.iter(|| {
                    for _ in 0..BATCH {
                        let (e, c) = event(next, pids);
                        black_box(s.insert(&e, c));
                        next += 1;
                    }
                })
            },
        );
        g.finish();
        let st = s.stats();
        println!(
            "EventStore n={n} after steady-state inserts: total {} evicted {} memory {:.1} bytes/event",
            st.total,
            st.evicted,
            st.memory_bytes as f64 / n as f64
        );
    }
}

criterion_group!(benches, insert_rate_ratio, store_benches);
criterion_main!(benches);
