//! The native event record stored in the ring.
//!
//! The engine never interprets BEAM terms: `pid`, `peer`, `module` and
//! `function` are opaque 64-bit words chosen by the binding (for the NIF they
//! are raw immediate term words of local pids and atoms, which are stable for
//! the life of the VM), and `payload` is an opaque byte tape.
//!
//! Header conventions the pipeline's correlation relies on (see
//! [`crate::pipeline`]):
//!
//! | kind | `pid` | `peer` | `aux` |
//! |---|---|---|---|
//! | call | caller | caller's correlation key (0: none) | arity |
//! | return / exception | returning process | correlation key | duration (ns) |
//! | send | sender | receiver | message content hash |
//! | receive | receiver | sender if known, else 0 | message content hash |
//! | spawn | child | parent | 0 |
//! | exit / state change | the process | 0 | kind specific |
//! | link / unlink | the process | the other process | 1 link, 0 unlink |

use std::sync::atomic::{AtomicU64, Ordering};

/// What an [`Event`] records. The binding decides how each kind maps back to
/// an Elixir term.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum EventKind {
    /// A slot that was never written.
    #[default]
    Empty = 0,
    /// An arbitrary term, stored whole in the payload.
    Term = 1,
    /// A function call (`FunctionExecution`, `event_type: :call`).
    FunctionCall = 2,
    /// A function return (`FunctionExecution`, `event_type: :return`).
    FunctionReturn = 3,
    /// A process spawn (`ProcessEvent`, `event_type: :spawn`).
    ProcessSpawn = 4,
    /// A message send (`MessageEvent`, `event_type: :send`).
    MessageSend = 5,
    /// A GenServer state change (`StateChange`).
    StateChange = 6,
    /// A performance metric (`PerformanceMetric`).
    PerformanceMetric = 7,
    /// An error (`ErrorEvent`).
    Error = 8,
    /// A message receive (`MessageEvent`, `event_type: :receive`).
    MessageReceive = 9,
    /// A process exit (`ProcessEvent`, `event_type: :exit`).
    ProcessExit = 10,
    /// A function left by an exception (completes its call like a return).
    FunctionException = 11,
    /// A link or unlink between two processes (`ProcessEvent`,
    /// `event_type: :link | :unlink`).
    ProcessLink = 12,
}

impl EventKind {
    /// Decode a stored kind byte.
    pub fn from_u8(b: u8) -> EventKind {
        match b {
            1 => EventKind::Term,
            2 => EventKind::FunctionCall,
            3 => EventKind::FunctionReturn,
            4 => EventKind::ProcessSpawn,
            5 => EventKind::MessageSend,
            6 => EventKind::StateChange,
            7 => EventKind::PerformanceMetric,
            8 => EventKind::Error,
            9 => EventKind::MessageReceive,
            10 => EventKind::ProcessExit,
            11 => EventKind::FunctionException,
            12 => EventKind::ProcessLink,
            _ => EventKind::Empty,
        }
    }
}

/// Flag: some part of the payload was replaced by a truncation marker.
pub const FLAG_TRUNCATED: u8 = 1;

/// One captured event: a fixed header plus an opaque payload tape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// Unique event id (see [`next_event_id`]).
    pub id: u64,
    /// Monotonic timestamp, nanoseconds.
    pub timestamp: i64,
    /// Wall-clock time, nanoseconds since the Unix epoch.
    pub wall_time: i64,
    /// Acting process (opaque word, 0 if none).
    pub pid: u64,
    /// Other process involved (parent, receiver...), opaque word or 0.
    pub peer: u64,
    /// Module (opaque word, 0 if none).
    pub module: u64,
    /// Function (opaque word, 0 if none).
    pub function: u64,
    /// Integer attribute of the kind (arity, duration...).
    pub aux: i64,
    /// [`EventKind`] as a byte.
    pub kind: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Encoded payload; its capacity is reused across writes.
    pub payload: Vec<u8>,
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        EventKind::from_u8(self.kind)
    }

    /// Was part of the payload truncated?
    pub fn truncated(&self) -> bool {
        self.flags & FLAG_TRUNCATED != 0
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A process-wide unique, increasing event id (never 0).
#[inline]
pub fn next_event_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Reserve `n` consecutive ids; returns the first.
#[inline]
pub fn reserve_event_ids(n: u64) -> u64 {
    NEXT_ID.fetch_add(n, Ordering::Relaxed)
}

/// Time ids ([`next_time_id`]) are `TIME_ID_BASE + t`, `t` in nanoseconds
/// since an origin chosen by the caller. The base keeps them apart from the
/// event-id counter ([`next_event_id`] would need 2^58 ids to reach it) and,
/// for the first 2^58 ns (9 years) after the origin, below 2^59: small
/// integers on the BEAM.
pub const TIME_ID_BASE: u64 = 1 << 58;
/// `TIME_ID_BASE + t` is capped just below this (146 years after the
/// origin); ids past the cap still come out unique, from the counter step.
pub const TIME_ID_LIMIT: u64 = 1 << 62;

static LAST_TIME_ID: AtomicU64 = AtomicU64::new(0);

/// A process-wide unique id that is also a timestamp: `TIME_ID_BASE +
/// since_origin_ns`, or, when that value was already handed out (two calls
/// in the same nanosecond, or a clock reading behind an earlier one), one
/// more than the largest id handed out so far. So ids are unique under any
/// concurrency, increase along each thread, and read back
/// (`id - TIME_ID_BASE`) as their time of creation, ahead of it only by
/// the number of ids created within the same nanoseconds.
///
/// Wait-free: one `fetch_max`, plus one `fetch_add` on a collision.
#[inline]
pub fn next_time_id(since_origin_ns: u64) -> u64 {
    let now = TIME_ID_BASE + since_origin_ns.min(TIME_ID_LIMIT - TIME_ID_BASE - 1);
    // Every value returned is either `now` for the one caller whose
    // `fetch_max` raised the maximum to it, or `v + 1` for a `fetch_add`
    // that moved the maximum from `v`: an increment never re-creates a
    // value a `fetch_max` raised to (the maximum only grows, and a
    // `fetch_max` winner returns a value above every earlier maximum).
    let prev = LAST_TIME_ID.fetch_max(now, Ordering::Relaxed);
    if prev < now {
        now
    } else {
        LAST_TIME_ID.fetch_add(1, Ordering::Relaxed) + 1
    }
}
