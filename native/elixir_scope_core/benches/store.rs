//! Criterion benches of the EventStore at 100k and 1M stored events: query
//! by pid (1,000 hits), 1,000-event time window, steady-state store rate
//! (with eviction), and bytes per event (printed). Figures only.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use elixir_scope_core::{CorrelationFields, Event, EventStore, Order, StoreConfig};
use std::hint::black_box;

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
    let mut s = EventStore::new(StoreConfig {
        max_events: n,
        max_age_ns: None,
    });
    let pids = (n / 1000) as u64;
    for i in 1..=n as u64 {
        let (e, c) = event(i, pids);
        s.insert(&e, c);
    }
    s
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

criterion_group!(benches, store_benches);
criterion_main!(benches);
