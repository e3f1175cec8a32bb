//! Time searches prune segments by their bounds along the store (prefix
//! maximum, suffix minimum): any arrival order, against a brute-force
//! filter of a scan.
use elixir_scope_core::{CorrelationFields, Event, EventStore, Order, StoreConfig};
use proptest::prelude::*;

fn insert(s: &mut EventStore, id: u64, ts: i64) {
    let e = Event {
        id,
        timestamp: ts,
        pid: 0x103,
        kind: 2,
        ..Event::default()
    };
    s.insert(&e, CorrelationFields::default());
}

fn brute(s: &EventStore, t0: i64, t1: i64) -> Vec<(i64, u64)> {
    let mut v = Vec::new();
    s.scan(0, usize::MAX, |e| {
        if (t0..=t1).contains(&e.timestamp) {
            v.push((e.timestamp, e.seq));
        }
    });
    v.sort_unstable();
    v
}

fn check(s: &EventStore, t0: i64, t1: i64) {
    let want = brute(s, t0, t1);
    let got: Vec<(i64, u64)> = (s.by_time_range(t0, t1, usize::MAX, Order::Asc).iter())
        .map(|e| (e.timestamp, e.seq))
        .collect();
    assert_eq!(got, want, "window {t0}..={t1}");
    let mut desc: Vec<(i64, u64)> = (s.by_time_range(t0, t1, usize::MAX, Order::Desc).iter())
        .map(|e| (e.timestamp, e.seq))
        .collect();
    desc.reverse();
    assert_eq!(desc, want);
    assert!(s.count_time_range(t0, t1) >= want.len());
}

#[test]
fn a_late_segment_of_old_timestamps_is_found() {
    // Segments of 4,096: six in time order, one of old timestamps, three
    // more in order; nothing evicted.
    let mut s = EventStore::new(StoreConfig {
        max_events: 100_000,
        max_age_ns: None,
    });
    let seg = 4096i64;
    let tss = (100_000..100_000 + 6 * seg)
        .chain(0..seg)
        .chain(200_000..200_000 + 3 * seg);
    for (id, ts) in (1..).zip(tss) {
        insert(&mut s, id, ts);
    }
    check(&s, 0, 300);
    check(&s, 100, 100_100);
    check(&s, 150_000, 250_000);
    assert_eq!(
        s.by_time_range(0, seg - 1, usize::MAX, Order::Asc).len(),
        4096
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn windows_match_a_scan(
        max in 64usize..700,
        tss in prop::collection::vec(0i64..5000, 1..3000),
        windows in prop::collection::vec((0i64..5200, 0i64..800), 1..12),
    ) {
        let mut s = EventStore::new(StoreConfig { max_events: max, max_age_ns: None });
        for (k, &ts) in tss.iter().enumerate() {
            insert(&mut s, k as u64 + 1, ts);
        }
        for &(t0, w) in &windows {
            check(&s, t0, t0 + w);
        }
    }
}
