//! The store at 100k, 1M and 10M stored events (issue #15, item 6): for
//! each size, a store with `max_events` = that size is filled with a trace
//! of the same shape (64 busy processes each going down a chain of calls
//! of depth 8 and back up, a send and a receive every 16 events, one of
//! them a GenServer whose every 4th event is a state record; plus one
//! sparse process whose 1,000 events, calls of one function, are spread
//! evenly over the whole store), then it prints:
//!
//! * store rate: steady-state inserts into the full store (each evicts),
//!   events/s; bytes per event (`memory_bytes / len`, the 24-byte payloads
//!   included) and the process RSS (VmRSS of /proc/self/status) before the
//!   fill, after it, after dropping the store, and after `malloc_trim`;
//! * the latency (median over rounds of the mean over many random targets)
//!   of: get by id; by pid (the sparse process: 1,000 hits, oldest first);
//!   a 1,000-event time window; by function (the sparse function: 1,000
//!   hits); traceback (the causal chain of a depth-8 call); range (the
//!   contents of a depth-5 call: 15 calls, 30 events); state_at at a random
//!   time; pid_prev / pid_next; the global time neighbour.
//!
//! Times are this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), so time
//! spent descheduled on a shared machine is not counted (cache and memory
//! bandwidth taken by other jobs still are). Every figure is printed beside
//! the first size's figure of the same run (ratio).
//! Every store is built first (a 10M store is ~1.4 GB), then each figure's
//! rounds are interleaved across the sizes; then the stores are dropped,
//! largest first, and the RSS printed before, after, and after
//! `malloc_trim`.
//!
//!   cargo bench -p elixir_scope_core --bench scale
//!
//! Environment: `ES_SCALE_SIZES` (default `100000,1000000,10000000`),
//! `ES_SCALE_ROUNDS` (default 7), `ES_SCALE_OPS` (random targets per
//! round and query, default 2000).
use elixir_scope_core::{
    call_contents, CorrelationFields, Event, EventKind, EventStore, Order, StateAt, StoreConfig,
    FLAG_SETS_DATA,
};
use std::hint::black_box;
use std::time::Instant;

const BUSY: u64 = 64;
const DEPTH: usize = 8;
const SPARSE_PID: u64 = 1 << 40;
const SPARSE_FN: u64 = 999_999;
const HANDLE_CALL: u8 = 1 << 1;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

extern "C" {
    fn malloc_trim(pad: usize) -> i32;
    fn clock_gettime(clock: i32, ts: *mut [i64; 2]) -> i32;
}

/// This thread's CPU time, ns (`CLOCK_THREAD_CPUTIME_ID`): on a machine
/// shared with other jobs, time spent descheduled is not counted.
fn cpu_ns() -> f64 {
    let mut ts = [0i64; 2];
    // SAFETY: a valid out-pointer to a struct timespec (two 64-bit fields
    // on 64-bit Linux); clock 3 is CLOCK_THREAD_CPUTIME_ID.
    unsafe { clock_gettime(3, &mut ts) };
    ts[0] as f64 * 1e9 + ts[1] as f64
}

/// The trace generator: per busy process a stack of open calls.
struct Gen {
    next_id: u64,
    ts: i64,
    stacks: Vec<Vec<(u64, i64)>>,
    /// Going down (calling) or up (returning)?
    down: Vec<bool>,
    k: u64,
    sparse_every: u64,
}

impl Gen {
    fn new(n: usize) -> Gen {
        Gen {
            next_id: 1,
            ts: 1_000_000,
            stacks: vec![Vec::new(); BUSY as usize],
            down: vec![true; BUSY as usize],
            k: 0,
            sparse_every: (n as u64 / 1000).max(1),
        }
    }

    fn next(&mut self) -> (Event, CorrelationFields) {
        let k = self.k;
        self.k += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.ts += 100 + (k % 7) as i64 * 10;
        let ts = self.ts;
        let x = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let mut e = Event {
            id,
            timestamp: ts,
            wall_time: ts,
            pid: 0,
            peer: 0,
            module: 0x4B + (x % 8) * 64,
            function: (x % 50) * 64 + 0x0B,
            aux: 1,
            kind: EventKind::FunctionCall as u8,
            flags: 0,
            payload: vec![0u8; 24],
        };
        let mut c = CorrelationFields {
            correlation_id: id,
            parent_id: 0,
            root_id: 0,
        };
        if k % self.sparse_every == self.sparse_every / 2 {
            e.pid = SPARSE_PID;
            e.module = 0x4B;
            e.function = SPARSE_FN;
            return (e, c);
        }
        let p = (k % BUSY) as usize;
        e.pid = 0x103 + (p as u64) * 16;
        let stack = &mut self.stacks[p];
        let parent = stack.last().map_or(0, |f| f.0);
        if k % 16 == 5 {
            e.kind = EventKind::MessageSend as u8;
            e.peer = 0x103 + ((p as u64 + 1) % BUSY) * 16;
            c.parent_id = parent;
        } else if k % 16 == 13 {
            e.kind = EventKind::MessageReceive as u8;
            c.correlation_id = id - 8;
        } else if p == 1 && (k / BUSY) % 4 == 0 {
            // A GenServer's state record: a callback return setting data.
            e.kind = EventKind::FunctionReturn as u8;
            e.flags = HANDLE_CALL | FLAG_SETS_DATA;
            c.parent_id = parent;
        } else if self.down[p] && stack.len() < DEPTH || stack.is_empty() {
            // Down a chain of depth 8, then back up: aux is the depth.
            self.down[p] = stack.len() + 1 < DEPTH;
            c.parent_id = parent;
            c.root_id = stack.first().map_or(id, |f| f.0);
            stack.push((id, ts));
            e.aux = stack.len() as i64;
        } else {
            let (call, t0) = stack.pop().expect("open call");
            self.down[p] = stack.is_empty();
            e.kind = EventKind::FunctionReturn as u8;
            e.aux = ts - t0;
            c.correlation_id = call;
            c.parent_id = call;
        }
        (e, c)
    }
}

struct Built {
    n: usize,
    store: EventStore,
    gen: Gen,
}

fn build(n: usize) -> Built {
    let mut store = EventStore::new(StoreConfig {
        max_events: n,
        max_age_ns: None,
    });
    let mut gen = Gen::new(n);
    for _ in 0..n {
        let (e, c) = gen.next();
        store.insert(&e, c);
    }
    Built { n, store, gen }
}

/// Query targets among the live events: depth-8 calls, depth-5 calls,
/// the sparse process's events (up to 100k of each, spread evenly).
struct Targets {
    deep: Vec<u64>,
    mid: Vec<u64>,
    sparse: Vec<u64>,
}

fn targets(s: &EventStore) -> Targets {
    let every = (s.len() / 100_000).max(1);
    let mut t = Targets {
        deep: Vec::new(),
        mid: Vec::new(),
        sparse: Vec::new(),
    };
    let mut k = 0usize;
    s.scan(0, usize::MAX, |e| {
        k += 1;
        if e.pid == SPARSE_PID {
            t.sparse.push(e.id);
        } else if e.kind == EventKind::FunctionCall as u8 && k % every < 8 {
            match e.aux {
                8 => t.deep.push(e.id),
                5 => t.mid.push(e.id),
                _ => {}
            }
        }
    });
    t
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A small xorshift for random targets.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

type Query<'a> = (
    &'static str,
    Box<dyn FnMut(&EventStore, &mut Rng) -> usize + 'a>,
);

fn queries(b: &Built) -> Vec<Query<'static>> {
    let n = b.store.len() as u64;
    let first_id = b.gen.next_id - n;
    let (t_lo, t_hi) = b.store.time_span().expect("filled");
    let Targets { deep, mid, sparse } = targets(&b.store);
    assert!(sparse.len() >= 999 && !deep.is_empty() && !mid.is_empty());
    // Process 1 is a GenServer: every 4th of its events is a state record.
    let gs_pid = 0x103u64 + 16;
    assert!(matches!(b.store.state_at(gs_pid, t_hi), StateAt::Found(_)));
    vec![
        (
            "get by id",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                s.get(first_id + r.below(n))
                    .map_or(0, |e| e.id as usize & 1)
            }),
        ),
        (
            "by pid (1,000 hits, asc)",
            Box::new(|s: &EventStore, _r: &mut Rng| s.by_pid(SPARSE_PID, 1000, Order::Asc).len()),
        ),
        (
            "1,000-event time window",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                // ~112 ns per event on average: 1,000 events ≈ 112 µs.
                let t0 = t_lo + r.below((t_hi - t_lo - 200_000) as u64) as i64;
                s.by_time_range(t0, t0 + 111_999, 1000, Order::Asc).len()
            }),
        ),
        (
            "by function (1,000 hits, desc)",
            Box::new(|s: &EventStore, _r: &mut Rng| {
                s.by_function(0x4B, SPARSE_FN, 1000, Order::Desc).len()
            }),
        ),
        (
            "traceback (depth 8)",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                let id = deep[r.below(deep.len() as u64) as usize];
                s.causal_chain(id).len()
            }),
        ),
        (
            "range (depth-5 call)",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                let id = mid[r.below(mid.len() as u64) as usize];
                call_contents(s, id, 10_000).len()
            }),
        ),
        (
            "state_at",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                let t = t_lo + r.below((t_hi - t_lo) as u64) as i64;
                match s.state_at(gs_pid, t) {
                    StateAt::Found(v) => v.record.seq as usize & 1,
                    _ => 2,
                }
            }),
        ),
        (
            "pid_prev + pid_next",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                let id = first_id + r.below(n);
                s.pid_prev(id).is_some() as usize + s.pid_next(id).is_some() as usize
            }),
        ),
        (
            "time next + prev",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                let id = first_id + r.below(n);
                s.time_neighbour(id, Order::Asc).is_some() as usize
                    + s.time_neighbour(id, Order::Desc).is_some() as usize
            }),
        ),
        (
            "sparse pid_next (1,000 hits apart)",
            Box::new(move |s: &EventStore, r: &mut Rng| {
                let id = sparse[r.below(sparse.len() as u64 - 1) as usize];
                s.pid_next(id).is_some() as usize
            }),
        ),
    ]
}

/// One sample of every query: ns per query (mean over `ops` targets).
fn sample(b: &Built, qs: &mut [Query<'_>], rng: &mut Rng, ops: usize) -> Vec<f64> {
    qs.iter_mut()
        .map(|(_, q)| {
            let t = cpu_ns();
            let mut acc = 0usize;
            for _ in 0..ops {
                acc += q(&b.store, rng);
            }
            black_box(acc);
            (cpu_ns() - t) / ops as f64
        })
        .collect()
}

/// One round of steady-state inserts into the full store: events/s.
fn store_rate(b: &mut Built) -> f64 {
    let batch = 100_000;
    let evs: Vec<_> = (0..batch).map(|_| b.gen.next()).collect();
    let t = cpu_ns();
    for (e, c) in &evs {
        black_box(b.store.insert(e, *c));
    }
    batch as f64 / ((cpu_ns() - t) / 1e9)
}

fn main() {
    let sizes: Vec<usize> = env("ES_SCALE_SIZES", "100000,1000000,10000000")
        .split(',')
        .map(|s| s.trim().replace('_', "").parse().expect("a size"))
        .collect();
    let rounds: usize = env("ES_SCALE_ROUNDS", "7").parse().expect("rounds");
    let ops: usize = env("ES_SCALE_OPS", "2000").parse().expect("ops");
    // Every store is built first, so each figure's rounds interleave
    // across the sizes.
    let rss0 = rss_kb();
    let mut built: Vec<Built> = Vec::new();
    for &n in &sizes {
        let t = Instant::now();
        built.push(build(n));
        println!(
            "size {n}: filled in {:.1} s, RSS {:.0} MiB",
            t.elapsed().as_secs_f64(),
            rss_kb() as f64 / 1024.0
        );
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for _ in 0..rounds {
        for (k, b) in built.iter_mut().enumerate() {
            rates[k].push(store_rate(b));
        }
    }
    let mut qs: Vec<Vec<Query>> = built.iter().map(queries).collect();
    let names: Vec<&'static str> = qs[0].iter().map(|q| q.0).collect();
    let mut times: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); names.len()]; sizes.len()];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..rounds {
        for (k, b) in built.iter().enumerate() {
            for (qi, t) in sample(b, &mut qs[k], &mut rng, ops).into_iter().enumerate() {
                times[k][qi].push(t);
            }
        }
    }
    drop(qs);
    let mut rows: Vec<(usize, Vec<(&'static str, f64)>)> = Vec::new();
    for (k, b) in built.iter().enumerate() {
        let st = b.store.stats();
        let mut figs = vec![
            ("store rate (M events/s)", median(rates[k].clone()) / 1e6),
            ("bytes per event", st.memory_bytes as f64 / st.total as f64),
            (
                "bytes per event without payloads",
                (st.memory_bytes - st.payload_bytes) as f64 / st.total as f64,
            ),
        ];
        figs.extend(
            names
                .iter()
                .zip(&times[k])
                .map(|(n, t)| (*n, median(t.clone()))),
        );
        rows.push((b.n, figs));
    }
    println!(
        "RSS with every store: {:.0} MiB (before: {:.0})",
        rss_kb() as f64 / 1024.0,
        rss0 as f64 / 1024.0
    );
    while let Some(b) = built.pop() {
        let before = rss_kb();
        let n = b.n;
        drop(b);
        let dropped = rss_kb();
        // SAFETY: glibc's malloc_trim, callable at any time.
        unsafe { malloc_trim(0) };
        println!(
            "drop the {n} store: RSS {:.0} -> {:.0} MiB, after malloc_trim {:.0} MiB",
            before as f64 / 1024.0,
            dropped as f64 / 1024.0,
            rss_kb() as f64 / 1024.0
        );
    }
    let base = &rows[0].1;
    print!("\n| figure |");
    for (n, _) in &rows {
        print!(" {n} |");
    }
    println!(" ratio last/first |");
    print!("|---|");
    for _ in &rows {
        print!("---:|");
    }
    println!("---:|");
    for (i, (name, b0)) in base.iter().enumerate() {
        print!("| {name} |");
        for (_, figs) in &rows {
            print!(" {:.3} |", figs[i].1);
        }
        println!(" {:.2} |", rows.last().expect("rows").1[i].1 / b0);
    }
    println!("\n(latencies in ns per query; medians of {rounds} rounds of {ops} random targets)");
}
