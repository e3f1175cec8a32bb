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
//! | state snapshot | the process | 0 | 0 |
//!
//! OTP callbacks (see [`Callback`]): a call or return whose `flags` carry a
//! callback class is an invocation of an OTP callback (`handle_call/3`, a
//! gen_statem state function, ...). Such a *call* is written with `peer` =
//! the content hash of the message that triggered it (0: none, e.g.
//! `init/1` or `handle_continue/2`), the same hash a receive of that message
//! carries in `aux`; the pipeline stores it with `peer` = the id of the
//! event that triggered it (the receive of that message, else the previous
//! state record of the process, or its spawn for `init/1`; 0 when unknown).
//! Such a *return* is a **state record**: its payload holds the callback's
//! return value, from which the new state is read, and the pipeline stores
//! it with the same `peer` as its call. The flags tell which parts of the
//! state it sets ([`FLAG_SETS_DATA`], [`FLAG_SETS_NAME`]): a record that
//! sets neither keeps the state in force (`:keep_state_and_data`,
//! `terminate/2`). State changes and state snapshots are state records too
//! (see [`is_state_record`]).
//!
//! The original's runtime-tracing structs written to a ring
//! (`MessageSent`, `MessageReceived`, `CallbackReply`) are stored as a send,
//! a receive and a return with the header conventions above (a reply's
//! `peer` is its `call_id`'s correlation key, 0 for none), flagged
//! [`FLAG_RUNTIME_STRUCT`] (see [`is_runtime_struct`]). So are the
//! `FunctionEntry`, `FunctionExit` and `ProcessExit` structs of a local
//! process (as a call, a return or an exception, an exit).

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
    /// A process's state taken at one moment (`StateSnapshot`): a state
    /// record that sets the whole state (name and data for a gen_statem,
    /// [`FLAG_STATEM`]).
    StateSnapshot = 20,
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
            20 => EventKind::StateSnapshot,
            _ => EventKind::Empty,
        }
    }
}

/// Flag: some part of the payload was replaced by a truncation marker.
pub const FLAG_TRUNCATED: u8 = 1;

/// Flag bits 1..=3: the [`Callback`] class of an OTP callback's call or
/// return (0: not a callback).
pub const CALLBACK_MASK: u8 = 0b1110;
const CALLBACK_SHIFT: u8 = 1;
/// Flag: the process is a gen_statem (its state is a name and data).
pub const FLAG_STATEM: u8 = 1 << 4;
/// Flag (state records): the record sets the state's data (a gen_server's
/// whole state).
pub const FLAG_SETS_DATA: u8 = 1 << 5;
/// Flag (state records): the record sets a gen_statem's state name.
pub const FLAG_SETS_NAME: u8 = 1 << 6;
/// Flag (state records): the callback asked the process to stop.
pub const FLAG_STOP: u8 = 1 << 7;
/// Flag (a send, a receive, a call, a return or an exception that is not
/// an OTP callback's, or an exit, so never a state record): the event was
/// written as one of the original's runtime-tracing structs
/// (`MessageSent`, `MessageReceived`, `CallbackReply`, `FunctionEntry`,
/// `FunctionExit`, `ProcessExit`). Its header follows its kind's conventions, so it
/// correlates as that kind; its payload starts with that kind's fields
/// and carries the struct's other fields after them, so it reads back as
/// the struct. The same bit as [`FLAG_STOP`], which only state records use.
pub const FLAG_RUNTIME_STRUCT: u8 = 1 << 7;

/// The OTP callback classes a call or return can be flagged with; the
/// class and [`FLAG_STATEM`] tell where a return value holds the state.
#[repr(u8)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Callback {
    /// `init/1` (gen_server and gen_statem).
    Init = 1,
    /// gen_server `handle_call/3`.
    HandleCall = 2,
    /// gen_server `handle_cast/2`, `handle_info/2`, `handle_continue/2`.
    HandleNoreply = 3,
    /// `code_change/3` (gen_server) or `code_change/4` (gen_statem).
    CodeChange = 4,
    /// `terminate/2` (gen_server) or `terminate/3` (gen_statem).
    Terminate = 5,
    /// A gen_statem state function (`state_name/3`) or `handle_event/4`.
    StatemEvent = 6,
}

impl Callback {
    /// The callback class in `flags`, if any.
    #[inline]
    pub fn of_flags(flags: u8) -> Option<Callback> {
        match (flags & CALLBACK_MASK) >> CALLBACK_SHIFT {
            1 => Some(Callback::Init),
            2 => Some(Callback::HandleCall),
            3 => Some(Callback::HandleNoreply),
            4 => Some(Callback::CodeChange),
            5 => Some(Callback::Terminate),
            6 => Some(Callback::StatemEvent),
            _ => None,
        }
    }

    /// The flag bits of this class.
    #[inline]
    pub fn flags(self) -> u8 {
        (self as u8) << CALLBACK_SHIFT
    }
}

/// Is a stored record of `kind` with `flags` a state record (a state
/// change, a snapshot, or the return of an OTP callback)?
#[inline]
pub fn is_state_record(kind: u8, flags: u8) -> bool {
    kind == EventKind::StateChange as u8
        || kind == EventKind::StateSnapshot as u8
        || (kind == EventKind::FunctionReturn as u8 && flags & CALLBACK_MASK != 0)
}

/// Was a stored record of `kind` with `flags` written as one of the
/// original's runtime-tracing structs ([`FLAG_RUNTIME_STRUCT`] on a send,
/// a receive, a call, return or exception that is not an OTP callback's,
/// or an exit)?
#[inline]
pub fn is_runtime_struct(kind: u8, flags: u8) -> bool {
    flags & FLAG_RUNTIME_STRUCT != 0
        && flags & CALLBACK_MASK == 0
        && (kind == EventKind::MessageSend as u8
            || kind == EventKind::MessageReceive as u8
            || kind == EventKind::FunctionReturn as u8
            || kind == EventKind::FunctionCall as u8
            || kind == EventKind::FunctionException as u8
            || kind == EventKind::ProcessExit as u8)
}

/// Does a stored record of `kind` with `flags` hold an *event id* in
/// `peer` (an OTP callback's call or return: the event that triggered it)
/// rather than a process word? Trace files keep such a `peer` as a number
/// and shift it with the ids when files are merged.
#[inline]
pub fn peer_is_event(kind: u8, flags: u8) -> bool {
    flags & CALLBACK_MASK != 0
        && (kind == EventKind::FunctionCall as u8 || kind == EventKind::FunctionReturn as u8)
}

/// Which parts of the state a state record sets: `(data, name)`. A state
/// change sets the data, a snapshot the data (and the name of a
/// gen_statem), a callback's return what its flags say.
#[inline]
pub fn state_sets(kind: u8, flags: u8) -> (bool, bool) {
    if kind == EventKind::StateChange as u8 {
        (true, false)
    } else if kind == EventKind::StateSnapshot as u8 {
        (true, flags & FLAG_STATEM != 0)
    } else {
        (flags & FLAG_SETS_DATA != 0, flags & FLAG_SETS_NAME != 0)
    }
}

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
    /// Address and length of the payload buffer (a ring's prefetch hint,
    /// see [`Ring::with_buffer_hint`](crate::ring::Ring::with_buffer_hint)).
    pub fn payload_buffer(&self) -> (usize, usize) {
        (self.payload.as_ptr() as usize, self.payload.len())
    }

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
