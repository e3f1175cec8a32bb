//! Criterion benches of the engine ring: push+pop on one thread (batched
//! reads at the cursor, as a pipeline worker does), and one producer thread
//! against one consumer thread.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use elixir_scope_core::{Event, Overflow, Ring};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A 40-byte native event, the size the tracer writes.
type Small = [u64; 5];

const N: u64 = 1 << 16;

fn push_pop_one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_push_pop_1_thread");
    g.throughput(Throughput::Elements(N));
    for batch in [1usize, 64, 1024] {
        let ring: Ring<Small> = Ring::new(4096, Overflow::DropNewest).unwrap();
        // Sanity check before timing: what goes in comes out, in order.
        for i in 0..10u64 {
            ring.push_with(|v| v[0] = i).unwrap();
        }
        let mut seen = vec![];
        let mut pos = ring.read_position();
        pos = ring.read_batch(pos, 100, |_, v| seen.push(v[0])).next;
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(pos, 10);
        g.bench_with_input(BenchmarkId::new("small_40B", batch), &batch, |b, &batch| {
            let mut pos = ring.read_position();
            b.iter(|| {
                let mut sum = 0u64;
                let mut i = 0u64;
                while i < N {
                    for k in 0..batch as u64 {
                        ring.push_with(|v| v[0] = i + k).unwrap();
                    }
                    let out = ring.read_batch(pos, batch, |_, v| sum = sum.wrapping_add(v[0]));
                    pos = out.next;
                    i += batch as u64;
                }
                black_box(sum)
            })
        });
    }
    let ring: Ring<Event> = Ring::new(4096, Overflow::DropNewest).unwrap();
    g.bench_function("event_with_32B_payload/1024", |b| {
        let mut pos = ring.read_position();
        b.iter(|| {
            let mut sum = 0u64;
            let mut i = 0u64;
            while i < N {
                for k in 0..1024u64 {
                    ring.push_with(|e| {
                        e.id = i + k;
                        e.payload.clear();
                        e.payload.extend_from_slice(&[7u8; 32]);
                    })
                    .unwrap();
                }
                let out = ring.read_batch(pos, 1024, |_, e| sum = sum.wrapping_add(e.id));
                pos = out.next;
                i += 1024;
            }
            black_box(sum)
        })
    });
    g.finish();
}

fn producer_consumer_two_threads(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_push_pop_2_threads");
    g.throughput(Throughput::Elements(N));
    g.bench_function("small_40B/1p1c", |b| {
        b.iter_custom(|iters| {
            let ring = Arc::new(Ring::<Small>::new(1 << 14, Overflow::DropNewest).unwrap());
            let total = iters * N;
            let done = Arc::new(AtomicBool::new(false));
            let consumer = {
                let ring = ring.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut pos = 0;
                    let mut got = 0u64;
                    while got < total {
                        let out = ring.read_batch(pos, 1024, |_, v| {
                            black_box(v[0]);
                        });
                        pos = out.next;
                        got += out.delivered as u64;
                        if out.delivered == 0 {
                            std::hint::spin_loop();
                        }
                    }
                    done.store(true, Ordering::Release);
                })
            };
            let start = std::time::Instant::now();
            let mut i = 0u64;
            while i < total {
                if ring.push_with(|v| v[0] = i).is_ok() {
                    i += 1;
                } else {
                    std::hint::spin_loop();
                }
            }
            consumer.join().unwrap();
            let elapsed = start.elapsed();
            let stats = ring.stats();
            assert_eq!(stats.reads, total);
            elapsed
        })
    });
    g.finish();
}

criterion_group!(benches, push_pop_one_thread, producer_consumer_two_threads);
criterion_main!(benches);
