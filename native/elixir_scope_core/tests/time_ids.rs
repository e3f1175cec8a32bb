//! `next_time_id`: unique under concurrency, increasing per thread, and
//! equal to `TIME_ID_BASE + t` when no other id took that value.

use elixir_scope_core::{next_time_id, TIME_ID_BASE};
use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;

// One test: both parts use the process-wide id state.
#[test]
fn time_ids() {
    an_unused_reading_is_the_id();
    ids_are_unique_and_increasing_under_contention();
}

fn ids_are_unique_and_increasing_under_contention() {
    // Every thread asks for the same few "clock readings", so almost every
    // call collides with another thread's and takes the counter step.
    const THREADS: usize = 8;
    const PER: u64 = 100_000;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let b = Arc::clone(&barrier);
            thread::spawn(move || {
                b.wait();
                let mut out = Vec::with_capacity(PER as usize);
                for i in 0..PER {
                    // A coarse clock (changes every 64 calls), sometimes
                    // going back, as readings from several cores do.
                    let clock = (1 << 41) + (i / 64) * 10 - (t as u64 % 3);
                    out.push(next_time_id(clock));
                }
                out
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        let ids = h.join().unwrap();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing per thread");
        for id in ids {
            assert!(id > TIME_ID_BASE);
            assert!(all.insert(id), "duplicate id {id}");
        }
    }
    assert_eq!(all.len(), THREADS * PER as usize);
}

fn an_unused_reading_is_the_id() {
    let t = 1 << 40;
    assert_eq!(next_time_id(t), TIME_ID_BASE + t);
    // The same reading again: the next value up.
    assert_eq!(next_time_id(t), TIME_ID_BASE + t + 1);
    // A reading behind the maximum: still unique, above it.
    assert_eq!(next_time_id(t - 5), TIME_ID_BASE + t + 2);
    assert_eq!(next_time_id(t + 100), TIME_ID_BASE + t + 100);
}
