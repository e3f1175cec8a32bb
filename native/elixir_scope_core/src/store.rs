//! The event store behind `ElixirScope.Storage.DataAccess`: an indexed,
//! bounded, in-memory store of correlated events.
//!
//! # Layout
//!
//! Every stored record gets a global, strictly increasing sequence number
//! (`seq`). Records live in append-only *segments* of up to
//! [`MAX_SEGMENT_RECORDS`] compact fixed-size headers (88 bytes each) plus
//! one byte arena per segment holding the payloads back to back; a segment
//! also keeps a dead-record bitset and its min/max timestamps. A segment is
//! *sealed* when full: its records are then given a timestamp-sorted
//! permutation (stored inside the headers' padding; an insertion sort with a
//! budget of two moves per record, so O(n) when arrival is roughly in time
//! order, then a general sort if the budget runs out).
//!
//! # Indexes
//!
//! Every key index is an *intrusive chain*: a head (the newest `seq` with
//! that key, or hashing to that bucket) plus, in each record, a 32-bit delta
//! back to the previous record of the same chain. Walking a chain goes from
//! the newest record to the oldest and stops at the first record that is no
//! longer in memory, so index entries of evicted records cannot leak: they
//! disappear with their segment.
//!
//! * `module`/`function`: pairs are interned to a `u32` (the table is never
//!   shrunk: it is bounded by the number of distinct functions); one exact
//!   chain per pair.
//! * `pid`: exact chain per pid, heads in a hash map whose stale keys (head
//!   already evicted) are swept once as many records were popped as the
//!   previous sweep left keys (at least a segment's worth): amortized O(1)
//!   per insert, and stale keys never outnumber that count (each popped
//!   record leaves at most one).
//! * `id`, `correlation_id`, `parent_id` (link target, `0` = none is not
//!   indexed): bucketed chains (a fixed power-of-two table of ≥ `max_events /
//!   2` heads, 4 bytes each); a walk skips the records of other keys sharing
//!   the bucket, on average fewer than two per lookup. The bucket of key `k`
//!   is taken from `hash(k >> 10)`, its low 10 bits XORed with those of `k`
//!   (10: fewer for tables under 1,024 heads): keys differing only in their
//!   low 10 bits never share a bucket, other keys collide as under a random
//!   hash, and nearby keys (ids, which are mostly increasing, and the ids
//!   used as correlation and parent ids) land in the same 4 KiB of the
//!   table, so inserting stays cache-friendly however large the table.
//! * time: the sealed segments' running bounds along the store (the largest
//!   `max_ts` up to each, the smallest `min_ts` from each on; both
//!   non-decreasing) find by two binary searches the segments that may
//!   overlap a window, so a time query does not visit every segment (the
//!   second bound is lowered backwards at seal time only when a segment
//!   arrives with older timestamps than earlier ones); per-segment min/max
//!   timestamps prune the rest; in each sealed
//!   segment a binary search over its time marks (every 64th timestamp in
//!   sorted order, 0.125 bytes per record) and then within one 64-record
//!   block of its sorted permutation (a linear scan of the single open
//!   segment) finds the window, and a k-way merge yields it in order. This
//!   is correct for any arrival order; it is cheapest when arrival is roughly
//!   in time order (few segments overlap a window).
//!
//! * event type and AST node (records stored whole as terms, see
//!   [`EventStore::insert_term`]): bucketed chains like `id`'s, keyed by
//!   the record's event-type key and AST-node key (`0`: none, not
//!   indexed). Such records have no wall time, peer, parent or root, so
//!   their header keeps the keys and links in those slots (`aux`: the
//!   event-type key, `peer`: the AST-node key, `root`: the event-type
//!   link, `link_parent`: the AST-node link; marked by an internal flag
//!   bit): the header stays 88 bytes. The head tables are allocated on
//!   the first record that has such a key, so stores that never see one
//!   (pipeline stores) do not pay for them. Each segment counts its live
//!   records in each index ([`EventStore::index_sizes`]).
//!
//! * state: per process, the `(timestamp, seq)` of its state records (see
//!   [`crate::event::is_state_record`]) in time order, kept at insert (an
//!   append, or a short insertion from the back for a record that arrives
//!   out of time order, such as a snapshot written by another process). It
//!   answers "the state record in force at time t" with a binary search
//!   ([`EventStore::state_at`]) and a process's history with a range
//!   ([`EventStore::state_history`]). Entries of freed records are dropped
//!   from the front on insert and by the pid sweep, so the index holds the
//!   state records in memory plus those popped since the last sweep (16
//!   bytes each, counted in [`EventStore::memory_bytes`]); it is rebuilt by
//!   inserting the records again, nothing else feeds it.
//!
//! Chain queries cost the number of matching records (for `Desc` with a
//! limit: the number returned); `Asc` collects all live matches of the key
//! first. Results of key queries are in store (`seq`) order; results of
//! [`EventStore::by_time_range`] are in `(timestamp, seq)` order.
//!
//! # Insert cost
//!
//! The duplicate check walks the id's chain (random reads in the headers:
//! the main cost of a large store) only when a small exact filter of recent
//! ids cannot rule the id out: one bit per id for the newest blocks of 64
//! ids, up to 1,024 blocks (16 KiB, ~65k ids). An id in a block above
//! every id ever stored, or a recent id never stored, skips the walk; ids
//! below the window, or stored before (duplicates, re-inserts after
//! eviction), take it. Then: three table heads, the pid map, the interned
//! function, an append to the open segment and, when the store is full, the
//! eviction of the oldest record.
//!
//! # Late links
//!
//! [`EventStore::relink`] replaces the correlation id of a stored event (a
//! link learnt after it was stored). The chains are fixed at insert, so the
//! link lives in side maps: `seq → correlation id`, read by every result,
//! and `correlation id → seqs`, merged into [`EventStore::by_correlation`]
//! (while a relinked event no longer matches its stored correlation id).
//! Both are skipped when no link exists; entries of freed records are
//! pruned by the pid sweep, so they hold at most the relinked records in
//! memory plus those popped since the last sweep (counted in
//! [`EventStore::memory_bytes`]).
//!
//! # Bounds and counters
//!
//! * Count: inserting into a store holding `max_events` live events evicts
//!   the oldest stored record (per record, exact, counted in `evicted`).
//!   Memory is reclaimed a whole segment at a time, once every record of the
//!   oldest segment is dead. To bound memory when expiry punches holes, the
//!   oldest live record is also evicted while the retained span (newest seq −
//!   oldest live seq) reaches `2 × max_events`.
//! * Age: [`EventStore::evict_older_than`] kills every live record with
//!   `timestamp < cutoff` (counted in `expired`). With `max_age_ns`, the
//!   store applies `cutoff = newest timestamp seen − max_age_ns` on its own
//!   every `segment_capacity / 8` inserts, and on [`EventStore::expire`].
//! * Reclaiming after expiry: a segment still holding live records keeps
//!   its headers (sequence numbers index them), but its payload arena is
//!   *compacted*: the live payloads are copied into an exactly sized arena
//!   and dead records keep empty payloads (queries never read a dead
//!   record's payload). [`EventStore::evict_older_than`] compacts every
//!   segment it killed records in, so `memory_bytes` drops after any
//!   cleanup that removed an event with a payload; the automatic expiry
//!   compacts a segment once its dead payload bytes reach a quarter of its
//!   arena (each copy then frees at least a third of what it copies). A
//!   store whose last, unsealed segment has no live record left frees it
//!   whole. Bytes freed are counted in `reclaimed_bytes`.
//! * Duplicates: inserting an id that is currently stored is ignored (the
//!   first copy is kept) and counted in `duplicates`.
//! * Always: `inserted = live + evicted + expired + duplicates + rejected`
//!   (`rejected`: a payload that does not fit a `u32` arena offset).

use crate::event::{is_state_record, state_sets, Event, EventKind, FLAG_STATEM};
use crate::hash::{mix, FastMap};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::mem::size_of;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// Records per segment for large stores (smaller stores use smaller
/// segments, down to 64 records).
pub const MAX_SEGMENT_RECORDS: usize = 4096;

/// Largest accepted `max_events` (larger values are clamped): keeps every
/// retained sequence span below 2³¹ so 32-bit chain deltas stay valid.
pub const MAX_EVENTS_LIMIT: usize = 1 << 29;

/// Sampling step of a sealed segment's time marks.
const TS_MARK_EVERY: usize = 64;

/// Largest payload arena reserved up front for a new segment.
const MAX_ARENA_HINT: usize = 64 << 20;

/// Maximum number of events returned by [`EventStore::causal_chain`].
pub const MAX_CHAIN_DEPTH: usize = 4096;
/// Results a query allocates room for up front (#15c).
const RESULT_PREALLOC: usize = 4096;

/// Bounds of an [`EventStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Maximum number of live events (at least 1, at most
    /// [`MAX_EVENTS_LIMIT`]).
    pub max_events: usize,
    /// Events whose timestamp is older than the newest seen timestamp minus
    /// this are expired (lazily, see the module documentation).
    pub max_age_ns: Option<i64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_events: 1_000_000,
            max_age_ns: None,
        }
    }
}

/// Correlation fields stored alongside an [`Event`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CorrelationFields {
    /// Correlation id (shared by a call and its return, for instance).
    pub correlation_id: u64,
    /// Id of the causing event, `0` if none.
    pub parent_id: u64,
    /// Id of the root of the causal tree.
    pub root_id: u64,
}

/// Result order of a query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    #[default]
    Asc,
    /// Newest first.
    Desc,
}

/// Outcome of [`EventStore::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored under this sequence number.
    Stored {
        /// The record's sequence number.
        seq: u64,
    },
    /// An event with the same id is already stored; nothing changed.
    Duplicate,
    /// The payload is larger than `u32::MAX` bytes; nothing stored.
    Rejected,
}

/// Counters and bounds of an [`EventStore`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Live events.
    pub total: usize,
    /// Configured bound.
    pub max_events: usize,
    /// Smallest timestamp among live events.
    pub oldest_timestamp: Option<i64>,
    /// Largest timestamp among live events.
    pub newest_timestamp: Option<i64>,
    /// Calls to [`EventStore::insert`].
    pub inserted: u64,
    /// Events evicted by the count bound.
    pub evicted: u64,
    /// Events expired by age.
    pub expired: u64,
    /// Inserts ignored because the id was already stored.
    pub duplicates: u64,
    /// Inserts rejected (payload too large).
    pub rejected: u64,
    /// Segments in memory.
    pub segments: usize,
    /// Heap and inline bytes used, payload arenas included
    /// (see [`EventStore::memory_bytes`]).
    pub memory_bytes: usize,
    /// Bytes of payload arena capacity (part of `memory_bytes`).
    pub payload_bytes: usize,
    /// Bytes freed by compacting payload arenas and freeing emptied
    /// unsealed segments after expiry (cumulative).
    pub reclaimed_bytes: u64,
    /// Arena compactions run (cumulative).
    pub compactions: u64,
}

/// Index keys of a record stored whole as a term
/// ([`EventStore::insert_term`]); `0` is "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TermKeys {
    /// Key of the term's event type (kept in the record's `aux`).
    pub event_type: u64,
    /// Key of the AST node the event belongs to.
    pub ast_node: u64,
}

/// Live records in each index (see [`EventStore::index_sizes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexSizes {
    /// Live records (every one is in the id and time indexes).
    pub total: usize,
    /// Live records with a process (`pid != 0`).
    pub with_pid: usize,
    /// Live records of a function: calls, returns and exceptions, and
    /// terms flagged [`TERM_FLAG_FUNCTION`].
    pub with_function: usize,
    /// Live records in the event-type index.
    pub event_type: usize,
    /// Live records in the AST-node index.
    pub ast_node: usize,
}

/// Flag of a [`EventKind::Term`](crate::event::EventKind::Term) record:
/// the term names a module and a function (counted in
/// [`IndexSizes::with_function`]).
pub const TERM_FLAG_FUNCTION: u8 = 1 << 5;

/// A stored event, as returned by queries: the header fields, the
/// correlation fields and a borrowed payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredEvent<'a> {
    /// Store sequence number (increasing in insertion order).
    pub seq: u64,
    /// Event id.
    pub id: u64,
    /// Monotonic timestamp, nanoseconds.
    pub timestamp: i64,
    /// Wall-clock time, nanoseconds.
    pub wall_time: i64,
    /// Acting process.
    pub pid: u64,
    /// Other process involved.
    pub peer: u64,
    /// Module.
    pub module: u64,
    /// Function.
    pub function: u64,
    /// Integer attribute of the kind.
    pub aux: i64,
    /// Event kind byte.
    pub kind: u8,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// Correlation id.
    pub correlation_id: u64,
    /// Parent event id, `0` if none.
    pub parent_id: u64,
    /// Root event id.
    pub root_id: u64,
    /// AST-node key (terms only, `0`: none).
    pub ast_node: u64,
    /// Payload bytes.
    pub payload: &'a [u8],
}

impl StoredEvent<'_> {
    /// An owned [`Event`] copy (payload copied).
    pub fn to_event(&self) -> Event {
        Event {
            id: self.id,
            timestamp: self.timestamp,
            wall_time: self.wall_time,
            pid: self.pid,
            peer: self.peer,
            module: self.module,
            function: self.function,
            aux: self.aux,
            kind: self.kind,
            flags: self.flags,
            payload: self.payload.to_vec(),
        }
    }

    /// The correlation fields.
    pub fn correlation(&self) -> CorrelationFields {
        CorrelationFields {
            correlation_id: self.correlation_id,
            parent_id: self.parent_id,
            root_id: self.root_id,
        }
    }
}

/// The compact stored header (88 bytes: the wall time as a 32-bit offset
/// from the segment's base, the correlation, parent and root ids as 32-bit
/// deltas from the record's id, and whatever does not fit kept aside in
/// [`SegData::over`]). Records stored by
/// [`EventStore::insert_term`] carry [`KEYED`] and keep their index keys
/// and links in slots such records do not use (see [`Rec::ast`]).
#[derive(Clone, Copy)]
struct Rec {
    id: u64,
    timestamp: i64,
    pid: u64,
    /// Keyed records: the AST-node key.
    peer: u64,
    aux: i64,
    /// `wall_time − timestamp − SegData::wall_base` ([`WALL_ESC`]: the wall
    /// time is in [`SegData::over`]).
    wall: i32,
    /// `correlation_id`, `root_id`, `parent_id` as [`id_code`]s relative to
    /// `id` (keyed records: `root` is the event-type link, `parent` 0).
    corr: u32,
    root: u32,
    parent: u32,
    /// Interned (module, function).
    mf: u32,
    /// End of the payload in the segment arena (start: previous record's end).
    payload_end: u32,
    link_id: u32,
    link_pid: u32,
    link_mf: u32,
    link_corr: u32,
    link_parent: u32,
    /// Sealed segments: index of the record of time rank `position`.
    perm: u16,
    kind: u8,
    flags: u8,
}

const _: () = assert!(size_of::<Rec>() == 88);

/// [`Rec::wall`] of a wall time kept in [`SegData::over`].
const WALL_ESC: i32 = i32::MIN;
/// [`id_code`] of an id kept in [`SegData::over`].
const ID_ESC: u32 = u32::MAX;
/// Fields of [`SegData::over`] (low two bits of its keys).
const OVER_WALL: u32 = 0;
const OVER_CORR: u32 = 1;
const OVER_ROOT: u32 = 2;
const OVER_PARENT: u32 = 3;

/// An id-valued field (`v`) of the record of id `id` as 32 bits: `0` for
/// 0, else 1 + the zigzag of `id − v` (wrapping) when it is below
/// `u32::MAX − 1` (ids of causes and correlations are near the record's
/// own: a call's, its parent's, its root's), else `None` (kept aside).
#[inline]
fn id_code(id: u64, v: u64) -> Option<u32> {
    if v == 0 {
        return Some(0);
    }
    let d = id.wrapping_sub(v) as i64;
    let z = ((d << 1) ^ (d >> 63)) as u64;
    (z < ID_ESC as u64 - 1).then_some(z as u32 + 1)
}

/// The value of a non-escaped [`id_code`] `c` of the record of id `id`.
#[inline]
fn id_decode(id: u64, c: u32) -> u64 {
    if c == 0 {
        return 0;
    }
    let z = (c - 1) as u64;
    let d = ((z >> 1) as i64) ^ -((z & 1) as i64);
    id.wrapping_sub(d as u64)
}

/// Internal flag of a record stored by [`EventStore::insert_term`] (never
/// shown: [`StoredEvent::flags`] leaves it out).
const KEYED: u8 = 1 << 7;

impl Rec {
    #[inline]
    fn keyed(&self) -> bool {
        self.kind == EventKind::Term as u8 && self.flags & KEYED != 0
    }

    /// In the event-type index?
    #[inline]
    fn typed(&self) -> bool {
        self.keyed() && self.aux != 0
    }

    /// The AST-node key (0: none).
    #[inline]
    fn ast(&self) -> u64 {
        if self.keyed() {
            self.peer
        } else {
            0
        }
    }

    #[inline]
    fn link_ast(&self) -> u32 {
        if self.keyed() {
            self.link_parent
        } else {
            0
        }
    }

    #[inline]
    fn link_type(&self) -> u32 {
        if self.keyed() {
            self.root
        } else {
            0
        }
    }

    /// `[with_pid, with_function, event_type, ast_node]` membership.
    #[inline]
    fn index_bits(&self) -> [bool; 4] {
        let k = self.kind;
        let function = if k == EventKind::Term as u8 {
            self.flags & TERM_FLAG_FUNCTION != 0
        } else {
            k == EventKind::FunctionCall as u8
                || k == EventKind::FunctionReturn as u8
                || k == EventKind::FunctionException as u8
        };
        [self.pid != 0, function, self.typed(), self.ast() != 0]
    }
}

/// A segment's records and payloads: owned while the segment is open,
/// shared (by [`Snapshot`]s) once it is sealed.
#[derive(Clone, Default)]
struct SegData {
    recs: Vec<Rec>,
    arena: Vec<u8>,
    /// `wall_time − timestamp` of the segment's first record: the base of
    /// the records' 32-bit wall times.
    wall_base: i64,
    /// Field values that do not fit the compact header, keyed by
    /// `record index << 2 | OVER_*` (appended in key order: sorted).
    over: Vec<(u32, u64)>,
}

impl SegData {
    /// A kept-aside field value of record `i`.
    #[cold]
    #[inline(never)]
    fn escaped(&self, i: usize, field: u32) -> u64 {
        let k = (i as u32) << 2 | field;
        self.over
            .binary_search_by_key(&k, |e| e.0)
            .map_or(0, |j| self.over[j].1)
    }

    #[inline]
    fn id_field(&self, i: usize, c: u32, field: u32) -> u64 {
        if c == ID_ESC {
            self.escaped(i, field)
        } else {
            id_decode(self.recs[i].id, c)
        }
    }

    /// Record `i`'s wall time.
    #[inline]
    fn wall_time(&self, i: usize) -> i64 {
        let r = &self.recs[i];
        if r.wall == WALL_ESC {
            self.escaped(i, OVER_WALL) as i64
        } else {
            (r.timestamp)
                .wrapping_add(self.wall_base)
                .wrapping_add(r.wall as i64)
        }
    }

    /// Record `i`'s stored correlation id.
    #[inline]
    fn corr(&self, i: usize) -> u64 {
        self.id_field(i, self.recs[i].corr, OVER_CORR)
    }

    /// Record `i`'s parent id (keyed records: 0).
    #[inline]
    fn parent(&self, i: usize) -> u64 {
        self.id_field(i, self.recs[i].parent, OVER_PARENT)
    }

    /// Record `i`'s root id (keyed records: 0).
    #[inline]
    fn root(&self, i: usize) -> u64 {
        if self.recs[i].keyed() {
            0
        } else {
            self.id_field(i, self.recs[i].root, OVER_ROOT)
        }
    }

    #[inline]
    fn payload(&self, i: usize) -> &[u8] {
        let start = if i == 0 {
            0
        } else {
            self.recs[i - 1].payload_end as usize
        };
        &self.arena[start..self.recs[i].payload_end as usize]
    }
}

/// The open segment owns its data (appends cost no atomic operation); a
/// sealed one keeps it behind an `Arc`, so a [`Snapshot`] shares it, and a
/// later change (arena compaction) copies it first if a snapshot holds it.
enum Body {
    Open(SegData),
    Sealed(Arc<SegData>),
}

struct Segment {
    base: u64,
    body: Body,
    dead: Vec<u64>,
    live: u32,
    /// Live records per index (see [`Rec::index_bits`]).
    counts: [u32; 4],
    sealed: bool,
    min_ts: i64,
    max_ts: i64,
    /// Sealed segments: the largest `max_ts` of this segment and every
    /// sealed segment before it (popped ones included: an upper bound,
    /// non-decreasing along the store).
    prefix_max: i64,
    /// Sealed segments: the smallest `min_ts` of this segment and every
    /// sealed segment after it (exact, non-decreasing along the store).
    /// With `prefix_max`, a time search finds the segments that may
    /// overlap its window by two binary searches.
    suffix_min: i64,
    /// Lower bound of live timestamps (exact after an expiry scan).
    live_min_ts: i64,
    /// Sealed segments: every [`TS_MARK_EVERY`]-th timestamp in sorted
    /// order, so a time search touches a few marks and one block of the
    /// permutation instead of ~2 log n scattered records.
    ts_marks: Vec<i64>,
}

impl Segment {
    /// A segment for `cap` records whose payload arena starts with
    /// `arena_hint` bytes of capacity (the previous segment's payload size:
    /// filling it then rarely reallocates and copies).
    /// `spare`: the emptied memory of a freed segment, reused (its pages
    /// are already mapped, so filling it takes no page fault).
    fn new(base: u64, cap: usize, arena_hint: usize, spare: Option<Spare>) -> Segment {
        let (recs, arena, dead) = match spare {
            Some(mut s) => {
                s.arena.reserve(arena_hint);
                (s.recs, s.arena, s.dead)
            }
            None => (
                Vec::with_capacity(cap),
                Vec::with_capacity(arena_hint),
                Vec::with_capacity(cap.div_ceil(64)),
            ),
        };
        Segment {
            base,
            body: Body::Open(SegData {
                recs,
                arena,
                wall_base: 0,
                over: Vec::new(),
            }),
            dead,
            live: 0,
            counts: [0; 4],
            sealed: false,
            min_ts: i64::MAX,
            max_ts: i64::MIN,
            prefix_max: i64::MAX,
            suffix_min: i64::MIN,
            live_min_ts: i64::MAX,
            ts_marks: Vec::new(),
        }
    }

    #[inline]
    fn is_dead(&self, i: usize) -> bool {
        self.dead[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks live record `i` dead. Returns false if it already was.
    #[inline]
    fn kill(&mut self, i: usize) -> bool {
        let w = &mut self.dead[i / 64];
        let bit = 1u64 << (i % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.live -= 1;
        let bits = self.recs[i].index_bits();
        for (c, b) in self.counts.iter_mut().zip(bits) {
            *c -= b as u32;
        }
        true
    }

    #[inline]
    fn payload(&self, i: usize) -> &[u8] {
        self.data().payload(i)
    }

    /// The records and payloads.
    #[inline]
    fn data(&self) -> &SegData {
        match &self.body {
            Body::Open(d) => d,
            Body::Sealed(d) => d,
        }
    }

    /// The records and payloads, for a change: a sealed segment's are
    /// copied first if a snapshot shares them.
    #[inline]
    fn data_mut(&mut self) -> &mut SegData {
        match &mut self.body {
            Body::Open(d) => d,
            Body::Sealed(d) => Arc::make_mut(d),
        }
    }

    fn seal(&mut self) {
        let mut order: Vec<(i64, u16)> = (self.recs.iter().enumerate())
            .map(|(i, r)| (r.timestamp, i as u16))
            .collect();
        // Arrival is usually roughly in time order: an insertion sort then
        // costs O(n) (bounded; a general sort finishes the job otherwise).
        if !insertion_sort_bounded(&mut order, 2 * self.recs.len()) {
            order.sort_unstable();
        }
        self.ts_marks = order
            .iter()
            .step_by(TS_MARK_EVERY)
            .map(|&(ts, _)| ts)
            .collect();
        for (pos, (_, i)) in order.into_iter().enumerate() {
            self.recs[pos].perm = i;
        }
        self.sealed = true;
        self.recs.shrink_to_fit();
        // Keep a little slack rather than copying for a small gain.
        if self.arena.capacity() > self.arena.len() + self.arena.len() / 8 + 4096 {
            self.arena.shrink_to_fit();
        }
        if let Body::Open(d) = &mut self.body {
            self.body = Body::Sealed(Arc::new(std::mem::take(d)));
        }
    }

    /// Sealed segments: the first position `p` of the time permutation
    /// whose timestamp fails `pred` (`pred` true, then false, in time
    /// order).
    fn time_partition(&self, pred: impl Fn(i64) -> bool) -> usize {
        let n = self.recs.len();
        let marks = &self.ts_marks;
        // The first mark failing `pred` bounds the answer from above; the
        // one before it (which holds) from below.
        let j = partition(marks.len(), |k| pred(marks[k]));
        let lo = if j == 0 {
            0
        } else {
            (j - 1) * TS_MARK_EVERY + 1
        };
        let hi = (j * TS_MARK_EVERY).min(n);
        lo + partition(hi.saturating_sub(lo), |p| {
            pred(self.recs[self.recs[lo + p].perm as usize].timestamp)
        })
    }

    /// Copies the live payloads into an exactly sized arena (dead records
    /// get empty payloads); returns the arena bytes freed.
    fn compact_payloads(&mut self) -> usize {
        let before = self.arena.capacity();
        let live_bytes: usize = (0..self.recs.len())
            .filter(|&i| !self.is_dead(i))
            .map(|i| self.payload(i).len())
            .sum();
        let mut arena = Vec::with_capacity(live_bytes);
        let mut start = 0usize;
        for i in 0..self.recs.len() {
            let end = self.recs[i].payload_end as usize;
            if !self.is_dead(i) {
                arena.extend_from_slice(&self.arena[start..end]);
            }
            start = end;
            // Fits: the arena only shrinks.
            self.recs[i].payload_end = arena.len() as u32;
        }
        self.arena = arena;
        before.saturating_sub(self.arena.capacity())
    }

    /// Payload bytes of dead records (still in the arena).
    fn dead_payload_bytes(&self) -> usize {
        (0..self.recs.len())
            .filter(|&i| self.is_dead(i))
            .map(|i| self.payload(i).len())
            .sum()
    }

    fn bytes(&self) -> usize {
        self.recs.capacity() * size_of::<Rec>()
            + self.arena.capacity()
            + self.dead.capacity() * 8
            + self.ts_marks.capacity() * 8
            + self.over.capacity() * size_of::<(u32, u64)>()
    }
}

/// The memory of a freed segment kept for the next one (see
/// [`EventStore::pop_dead_segments`]): empty vectors with their capacity.
struct Spare {
    recs: Vec<Rec>,
    arena: Vec<u8>,
    dead: Vec<u64>,
}

impl Spare {
    /// `seg`'s memory, emptied, if it holds a full segment's headers and no
    /// snapshot shares it.
    fn take(seg: Segment, cap: usize) -> Option<Spare> {
        let data = match seg.body {
            Body::Open(d) => d,
            Body::Sealed(d) => Arc::try_unwrap(d).ok()?,
        };
        let (mut recs, mut arena, mut dead) = (data.recs, data.arena, seg.dead);
        if recs.capacity() != cap {
            return None;
        }
        recs.clear();
        arena.clear();
        dead.clear();
        Some(Spare { recs, arena, dead })
    }

    fn bytes(&self) -> usize {
        self.recs.capacity() * size_of::<Rec>() + self.arena.capacity() + self.dead.capacity() * 8
    }
}

impl Deref for Segment {
    type Target = SegData;
    #[inline]
    fn deref(&self) -> &SegData {
        self.data()
    }
}

impl DerefMut for Segment {
    #[inline]
    fn deref_mut(&mut self) -> &mut SegData {
        self.data_mut()
    }
}

/// Insertion sort giving up (returning false, `v` a permutation of its
/// input) after `budget` element moves.
fn insertion_sort_bounded<T: Ord + Copy>(v: &mut [T], mut budget: usize) -> bool {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > x {
            if budget == 0 {
                v[j] = x;
                return false;
            }
            budget -= 1;
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
    true
}

const GROUP_BITS: u32 = 10;

/// A zeroed vector of `n` slots whose 2 MiB-aligned interior is advised
/// for transparent huge pages (`MADV_HUGEPAGE`; THP set to `madvise` or
/// `always`): the head tables of a large store are read and written at
/// random, one TLB miss per access with 4 KiB pages. The zeroed
/// allocation of a large table is a fresh mapping whose pages are not
/// touched yet, so they fault in as huge pages; freeing it unmaps them.
/// A failed or unsupported advice changes nothing.
fn huge_zeroed(n: usize) -> Vec<u32> {
    let v = vec![0u32; n];
    const HUGE: usize = 2 << 20;
    let (start, len) = (v.as_ptr() as usize, n * size_of::<u32>());
    let lo = start.next_multiple_of(HUGE);
    let hi = (start + len) / HUGE * HUGE;
    if hi > lo {
        // SAFETY: the range lies inside `v`'s live allocation; the advice
        // does not change its contents or validity.
        unsafe {
            libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
        }
    }
    v
}

/// Bucket heads, stored as 32-bit offsets from `base` (`0` = empty).
struct HeadTable {
    base: u64,
    shift: u32,
    /// Keys `k` with the same `k >> group_bits` share a group of
    /// `1 << group_bits` consecutive slots.
    group_bits: u32,
    slots: Vec<u32>,
}

impl HeadTable {
    fn new(bits: u32) -> HeadTable {
        HeadTable {
            base: 0,
            shift: 64 - bits,
            group_bits: bits.min(GROUP_BITS),
            slots: huge_zeroed(1 << bits),
        }
    }

    #[inline]
    fn bucket(&self, key: u64) -> usize {
        ((mix(key >> self.group_bits) >> self.shift) ^ (key & ((1 << self.group_bits) - 1)))
            as usize
    }

    #[inline]
    fn get(&self, b: usize) -> Option<u64> {
        match self.slots[b] {
            0 => None,
            v => Some(self.base + v as u64 - 1),
        }
    }

    /// Sets bucket `b` to `seq`, first rebasing (dropping heads older than
    /// `min_valid`) when the offset would not fit comfortably.
    #[inline]
    fn set(&mut self, b: usize, seq: u64, min_valid: u64) {
        if seq - self.base >= 1 << 31 {
            let old = self.base;
            for v in self.slots.iter_mut() {
                if *v != 0 {
                    let abs = old + *v as u64 - 1;
                    *v = if abs < min_valid {
                        0
                    } else {
                        (abs - min_valid + 1) as u32
                    };
                }
            }
            self.base = min_valid;
        }
        self.slots[b] = (seq - self.base + 1) as u32;
    }
}

/// Exact filter of ids that were never stored, for the recent ids: one bit
/// per id of the newest `words.len()` blocks of 64 ids (block `b` in slot
/// `b % len`, tagged with `b`). An id is certainly fresh if its block is
/// above every stored id's block, or is in the window and its bit is clear
/// (a slot tagged with another block means an empty block: a block enters
/// the window empty, and its slot can only be retagged by a block that is
/// out of the window while it is in). Bits are never cleared, so a set bit
/// (stored, maybe evicted since) or an id below the window means "unknown".
struct FreshIds {
    /// Highest block of a stored id (`None`: nothing stored yet).
    top: Option<u64>,
    words: Vec<(u64, u64)>,
}

impl FreshIds {
    fn new(blocks: usize) -> FreshIds {
        FreshIds {
            top: None,
            words: vec![(u64::MAX, 0); blocks],
        }
    }

    /// True if `id` was never stored.
    #[inline]
    fn is_fresh(&self, id: u64) -> bool {
        let b = id >> 6;
        match self.top {
            Some(top) if b <= top => {
                if top - b >= self.words.len() as u64 {
                    return false;
                }
                let (tag, bits) = self.words[b as usize & (self.words.len() - 1)];
                tag != b || bits & (1 << (id & 63)) == 0
            }
            _ => true,
        }
    }

    /// Records that `id` is stored.
    #[inline]
    fn add(&mut self, id: u64) {
        let b = id >> 6;
        let top = match self.top {
            Some(t) if t >= b => t,
            _ => {
                self.top = Some(b);
                b
            }
        };
        if top - b < self.words.len() as u64 {
            let mask = self.words.len() - 1;
            let w = &mut self.words[b as usize & mask];
            if w.0 != b {
                *w = (b, 0);
            }
            w.1 |= 1 << (id & 63);
        }
    }
}

/// Late links: correlation ids replacing the stored ones, by seq, and the
/// reverse index (correlation id → seqs, ascending). A key is either in
/// `one` (a single seq, the usual case) or in `many` (two or more).
#[derive(Clone, Default)]
struct Relinks {
    by_seq: FastMap<u64, u64>,
    one: FastMap<u64, u64>,
    many: FastMap<u64, Vec<u64>>,
}

impl Relinks {
    #[inline]
    fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    fn len(&self) -> usize {
        self.by_seq.len()
    }

    #[inline]
    fn get(&self, seq: u64) -> Option<u64> {
        self.by_seq.get(&seq).copied()
    }

    /// Seqs relinked to `correlation_id`, ascending.
    fn seqs(&self, correlation_id: u64) -> &[u64] {
        match self.many.get(&correlation_id) {
            Some(v) => v,
            None => self
                .one
                .get(&correlation_id)
                .map_or(&[], std::slice::from_ref),
        }
    }

    /// Links `seq` to `target` (`None`: back to its stored correlation id).
    fn set(&mut self, seq: u64, target: Option<u64>) {
        let previous = match target {
            Some(t) => self.by_seq.insert(seq, t),
            None => self.by_seq.remove(&seq),
        };
        if let Some(p) = previous {
            self.remove_target(p, seq);
        }
        if let Some(t) = target {
            self.add_target(t, seq);
        }
        if self.by_seq.is_empty() {
            // Nothing linked any more: give the memory back.
            *self = Relinks::default();
        }
    }

    fn add_target(&mut self, t: u64, seq: u64) {
        if let Some(v) = self.many.get_mut(&t) {
            if let Err(k) = v.binary_search(&seq) {
                v.insert(k, seq);
            }
            return;
        }
        match self.one.insert(t, seq) {
            Some(other) if other != seq => {
                self.one.remove(&t);
                self.many.insert(t, vec![other.min(seq), other.max(seq)]);
            }
            _ => {}
        }
    }

    fn remove_target(&mut self, t: u64, seq: u64) {
        if let Some(v) = self.many.get_mut(&t) {
            if let Ok(k) = v.binary_search(&seq) {
                v.remove(k);
            }
            if v.len() == 1 {
                self.one.insert(t, v[0]);
                self.many.remove(&t);
            }
        } else if self.one.get(&t) == Some(&seq) {
            self.one.remove(&t);
        }
    }

    /// Drops the links of records below `base` (freed).
    fn prune(&mut self, base: u64) {
        if self.by_seq.is_empty() {
            return;
        }
        self.by_seq.retain(|&seq, _| seq >= base);
        self.one.retain(|_, seq| *seq >= base);
        let one = &mut self.one;
        self.many.retain(|&t, v| {
            let stale = v.partition_point(|&seq| seq < base);
            v.drain(..stale);
            match v.len() {
                0 => false,
                1 => {
                    one.insert(t, v[0]);
                    false
                }
                _ => {
                    if v.capacity() > 2 * v.len() {
                        v.shrink_to_fit();
                    }
                    true
                }
            }
        });
        if self.by_seq.is_empty() {
            *self = Relinks::default();
            return;
        }
        for m in [&mut self.by_seq, &mut self.one] {
            if m.capacity() > 4 * (m.len() + 16) {
                m.shrink_to_fit();
            }
        }
        if self.many.capacity() > 4 * (self.many.len() + 16) {
            self.many.shrink_to_fit();
        }
    }

    fn bytes(&self) -> usize {
        map_bytes(&self.by_seq)
            + map_bytes(&self.one)
            + map_bytes(&self.many)
            + self.many.values().map(|v| v.capacity() * 8).sum::<usize>()
    }
}

#[inline]
fn delta(seq: u64, prev: Option<u64>) -> u32 {
    match prev {
        Some(p) if seq - p <= u32::MAX as u64 => (seq - p) as u32,
        _ => 0,
    }
}

/// One process's entry in the state index.
#[derive(Default)]
struct StateIndex {
    /// `(timestamp, seq)` of its state records, in that order.
    recs: VecDeque<(i64, u64)>,
    /// Smallest and largest timestamps of the entries dropped with their
    /// freed records (`i64::MAX`, `i64::MIN`: none), so a time whose record
    /// is gone is answered "evicted" rather than with an older record or
    /// "before the first state".
    dropped_from: i64,
    dropped_until: i64,
    /// Some entry was inserted before the back (out of time order): the
    /// entries may not be in `seq` order any more.
    unordered: bool,
}

impl StateIndex {
    fn drop_freed(&mut self, base: u64) -> usize {
        let before = self.recs.len();
        let (mut from, mut until) = (self.dropped_from, self.dropped_until);
        if !self.unordered {
            // Every entry was appended: `seq` order, so the freed ones are
            // a prefix (the same entries as the scan below, without
            // visiting every entry of a large index on each segment freed).
            while let Some(&(ts, seq)) = self.recs.front() {
                if seq >= base {
                    break;
                }
                from = from.min(ts);
                until = until.max(ts);
                self.recs.pop_front();
            }
            (self.dropped_from, self.dropped_until) = (from, until);
            return before - self.recs.len();
        }
        self.recs.retain(|&(ts, seq)| {
            let keep = seq >= base;
            if !keep {
                from = from.min(ts);
                until = until.max(ts);
            }
            keep
        });
        (self.dropped_from, self.dropped_until) = (from, until);
        before - self.recs.len()
    }
}

/// Entries at the front of a state index `recs` (sorted by timestamp) whose
/// timestamp is `<= ts` (`strict`: `< ts`); the same as `partition_point`.
/// A binary search over a big index is ~log2(n) dependent reads, most of
/// them cache misses once the index outgrows the cache; timestamps are
/// close to evenly spread, so this starts at the position interpolated
/// from the first and last timestamps and gallops from there (1, 2, 4, ...
/// entries) to a bracket, then bisects it: a few reads next to each other
/// for evenly spread times, at most ~2·log2(n) for any spread.
fn state_partition(recs: &VecDeque<(i64, u64)>, ts: i64, strict: bool) -> usize {
    let p = |t: i64| if strict { t < ts } else { t <= ts };
    let n = recs.len();
    if n < 32 {
        return recs.partition_point(|&(t, _)| p(t));
    }
    let (t0, t1) = (recs[0].0, recs[n - 1].0);
    if !p(t0) {
        return 0;
    }
    if p(t1) {
        return n;
    }
    // Here t0 <= ts <= t1 and t0 < t1: the differences fit in i128.
    let g = ((ts as i128 - t0 as i128) * (n - 1) as i128 / (t1 as i128 - t0 as i128)) as usize;
    let g = g.clamp(1, n - 2);
    // Invariant: p holds at `lo` and fails at `hi`.
    let (mut lo, mut hi) = (0, n - 1);
    let mut step = 1;
    if p(recs[g].0) {
        lo = g;
        while g + step < hi {
            if p(recs[g + step].0) {
                lo = g + step;
                step *= 2;
            } else {
                hi = g + step;
                break;
            }
        }
    } else {
        hi = g;
        while g > lo + step {
            if p(recs[g - step].0) {
                lo = g - step;
                break;
            }
            hi = g - step;
            step *= 2;
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if p(recs[mid].0) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// Records a state query walks back at most to find the record that set
/// the state a later record keeps.
pub const MAX_STATE_WALK: usize = 4096;

/// One state record with the records its state comes from (see
/// [`EventStore::state_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateView<'a> {
    /// The state record.
    pub record: StoredEvent<'a>,
    /// The record that set the data in force (the record itself when it
    /// sets it); `None` when unknown (evicted, or more than
    /// [`MAX_STATE_WALK`] records back).
    pub data: Option<StoredEvent<'a>>,
    /// gen_statem records: the record that set the state name in force.
    pub name: Option<StoredEvent<'a>>,
}

/// [`EventStore::state_at`]'s answer.
// Returned by value and matched at once: boxing the view would only add
// an allocation per query.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateAt<'a> {
    /// The state record in force at that time.
    Found(StateView<'a>),
    /// The process has no state record in the store.
    NoRecords,
    /// The time is before the process's first stored state record.
    Before,
    /// The record in force at that time has been evicted.
    Evicted,
}

/// Rebuilds a swept map whose room left before growing is under a third
/// of its keys. Removed keys leave tombstones that use up that room, and
/// hashbrown doubles a table more than half full when it runs out, so a
/// map of churning keys (pids, the state index) swept to a steady size
/// would otherwise double every few sweeps' worth of removals though its
/// live keys do not grow. Cost O(keys), like the sweep that calls it.
fn rehash_if_worn<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher + Default>(
    m: &mut HashMap<K, V, S>,
) {
    if m.capacity() - m.len() < m.len() / 3 {
        *m = std::mem::take(m).into_iter().collect();
    }
}

fn map_bytes<K, V, S>(m: &HashMap<K, V, S>) -> usize {
    if m.capacity() == 0 {
        return 0;
    }
    let buckets = (m.capacity() * 8).div_ceil(7).next_power_of_two().max(4);
    buckets * (size_of::<(K, V)>() + 1) + 16
}

/// An indexed, bounded, in-memory store of correlated events (see the
/// module documentation). Single writer: mutation takes `&mut self`.
pub struct EventStore {
    /// Process-unique identity (ties a [`Snapshot`] to its store).
    uid: u64,
    max_events: usize,
    max_age_ns: Option<i64>,
    seg_cap: usize,
    segments: VecDeque<Segment>,
    /// The memory of the last segment freed by an insert, for the next
    /// segment (at most one; counted in [`EventStore::memory_bytes`]).
    spare: Option<Spare>,
    next_seq: u64,
    /// Every record with a smaller seq is dead.
    oldest: u64,
    live: usize,
    ids: HeadTable,
    corrs: HeadTable,
    parents: HeadTable,
    /// Event-type and AST-node chains, allocated on first use.
    types: Option<HeadTable>,
    asts: Option<HeadTable>,
    /// Size (bits) of the bucket tables.
    table_bits: u32,
    pids: FastMap<u64, u64>,
    mf_ids: FastMap<(u64, u64), u32>,
    /// Interned (module, function) names, shared with [`Snapshot`]s
    /// (appended to rarely: a copy is made only while a snapshot holds
    /// them).
    mf_names: Arc<Vec<(u64, u64)>>,
    /// Head seq of each interned function's chain (`u64::MAX`: none).
    mf_heads: Vec<u64>,
    newest_seen: Option<i64>,
    fresh: FreshIds,
    /// Late links (see [`EventStore::relink`]).
    relinks: Arc<Relinks>,
    /// pid → its state records' `(timestamp, seq)`, in that order.
    states: FastMap<u64, StateIndex>,
    /// Entries in `states`.
    state_entries: usize,
    popped_since_sweep: usize,
    reclaimed_bytes: u64,
    compactions: u64,
    /// Records to pop before the next sweep of stale pid heads and late
    /// links: the number of keys left by the previous sweep (at least a
    /// segment's worth), so sweeps cost amortized O(1) per insert and stale
    /// keys stay below it.
    sweep_every: usize,
    since_age_check: usize,
    inserted: u64,
    evicted: u64,
    expired: u64,
    duplicates: u64,
    rejected: u64,
}

impl EventStore {
    /// An empty store. `max_events` is clamped to `1..=MAX_EVENTS_LIMIT`.
    pub fn new(config: StoreConfig) -> EventStore {
        let max_events = config.max_events.clamp(1, MAX_EVENTS_LIMIT);
        let seg_cap = max_events
            .div_ceil(4)
            .next_power_of_two()
            .clamp(64, MAX_SEGMENT_RECORDS);
        let bits = (max_events / 2)
            .max(64)
            .next_power_of_two()
            .trailing_zeros()
            .min(26);
        static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        EventStore {
            uid: NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            max_events,
            max_age_ns: config.max_age_ns,
            seg_cap,
            segments: VecDeque::new(),
            spare: None,
            next_seq: 0,
            oldest: 0,
            live: 0,
            ids: HeadTable::new(bits),
            corrs: HeadTable::new(bits),
            parents: HeadTable::new(bits),
            types: None,
            asts: None,
            table_bits: bits,
            pids: FastMap::default(),
            mf_ids: FastMap::default(),
            mf_names: Arc::new(Vec::new()),
            mf_heads: Vec::new(),
            newest_seen: None,
            fresh: FreshIds::new((max_events / 64).next_power_of_two().clamp(16, 1024)),
            relinks: Arc::new(Relinks::default()),
            states: FastMap::default(),
            state_entries: 0,
            popped_since_sweep: 0,
            reclaimed_bytes: 0,
            compactions: 0,
            sweep_every: seg_cap,
            since_age_check: 0,
            inserted: 0,
            evicted: 0,
            expired: 0,
            duplicates: 0,
            rejected: 0,
        }
    }

    /// The effective configuration (after clamping).
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            max_events: self.max_events,
            max_age_ns: self.max_age_ns,
        }
    }

    /// Changes the bounds of a live store; returns how many events it
    /// evicted (counted in `evicted`) or expired (`expired`) to meet them
    /// at once. `max_events` is clamped as in [`EventStore::new`]; raising
    /// it above the value the store was created with keeps the index
    /// tables' size (bucket chains get longer, lookups stay exact) and the
    /// segment size.
    pub fn set_limits(&mut self, config: StoreConfig) -> usize {
        self.max_events = config.max_events.clamp(1, MAX_EVENTS_LIMIT);
        self.max_age_ns = config.max_age_ns;
        let mut n = 0;
        loop {
            self.advance_oldest();
            if self.live <= self.max_events || !self.kill_oldest() {
                break;
            }
            n += 1;
        }
        self.pop_dead_segments(false);
        n + self.expire()
    }

    /// The sequence number the next insert will get: every record stored
    /// so far has a smaller one (a scan from 0 to here sees them all).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The processes of the pid index, each once (it may still hold a
    /// process whose events were all evicted since its last sweep).
    pub fn pids(&self) -> impl Iterator<Item = u64> + '_ {
        self.pids.keys().copied()
    }

    /// Records per segment of this store.
    pub fn segment_capacity(&self) -> usize {
        self.seg_cap
    }

    /// Number of live events.
    pub fn len(&self) -> usize {
        self.live
    }

    /// No live events?
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// First sequence number still in memory.
    #[inline]
    fn base_seq(&self) -> u64 {
        self.segments.front().map_or(self.next_seq, |s| s.base)
    }

    #[inline]
    fn locate(&self, seq: u64) -> Option<(usize, usize)> {
        let front = self.segments.front()?;
        if seq < front.base || seq >= self.next_seq {
            return None;
        }
        // `seg_cap` is a power of two.
        let guess = ((seq - front.base) >> self.seg_cap.trailing_zeros()) as usize;
        if let Some(s) = self.segments.get(guess) {
            if s.base <= seq && seq < s.base + s.recs.len() as u64 {
                return Some((guess, (seq - s.base) as usize));
            }
        }
        self.locate_search(seq)
    }

    /// [`Self::locate`] when segments before `seq` are not all full (a
    /// segment sealed early because its arena was full).
    #[cold]
    #[inline(never)]
    fn locate_search(&self, seq: u64) -> Option<(usize, usize)> {
        let si = self.segments.partition_point(|s| s.base <= seq) - 1;
        let s = &self.segments[si];
        let i = (seq - s.base) as usize;
        (i < s.recs.len()).then_some((si, i))
    }

    /// Walks a chain from `head` (newest first) while `f` returns true.
    #[inline]
    fn walk<'a>(
        &'a self,
        head: Option<u64>,
        link: impl Fn(&Rec) -> u32,
        mut f: impl FnMut(u64, &'a Segment, usize) -> bool,
    ) {
        let base = self.base_seq();
        let mut cur = head;
        while let Some(seq) = cur {
            if seq < base {
                break;
            }
            let Some((si, i)) = self.locate(seq) else {
                break;
            };
            let seg = &self.segments[si];
            if !f(seq, seg, i) {
                break;
            }
            let d = link(&seg.recs[i]) as u64;
            cur = (d != 0 && d <= seq).then(|| seq - d);
        }
    }

    #[inline]
    fn view<'a>(&'a self, seg: &'a Segment, i: usize) -> StoredEvent<'a> {
        view_rec(&self.mf_names, &self.relinks, seg.base, seg.data(), i)
    }

    /// A consistent cut of the store as it is now, for a whole-trace pass
    /// that runs without the store's lock (see [`Snapshot`]). Cost under
    /// the lock: one reference count per sealed segment, a copy of the
    /// dead-record bits of the segments that have dead records (one bit per
    /// record), and a copy of the open segment (at most
    /// [`EventStore::segment_capacity`] records and their payloads).
    pub fn snapshot(&self) -> Snapshot {
        // Every segment in memory, dead ones included: index chains run
        // through dead records.
        let segs = self
            .segments
            .iter()
            .map(|s| SnapSeg {
                base: s.base,
                data: match &s.body {
                    Body::Sealed(d) => Arc::clone(d),
                    Body::Open(d) => Arc::new(d.clone()),
                },
                dead: match s.live as usize {
                    n if n == s.recs.len() => Dead::None,
                    0 => Dead::All,
                    _ => Dead::Bits(s.dead.clone().into_boxed_slice()),
                },
            })
            .collect();
        Snapshot {
            segs,
            names: Arc::clone(&self.mf_names),
            relinks: Arc::clone(&self.relinks),
            end: self.next_seq,
            live: self.live,
            uid: self.uid,
        }
    }

    /// Where the id chains of `ids` and the correlation chains of `corrs`
    /// enter the cut of `snap` (a snapshot of this store), for
    /// [`Snapshot::get_at_cut`] and [`Snapshot::by_correlation_at_cut`]:
    /// the newest record of each key's bucket chain stored before the cut.
    /// Unknown (the lookup answers `None`, and the caller scans the
    /// snapshot instead) when records stored after the cut and freed since
    /// break the chain, or `snap` is not of this store. Cost: the records
    /// of each bucket stored since the cut.
    pub fn cut_heads(&self, snap: &Snapshot, ids: &[u64], corrs: &[u64]) -> CutHeads {
        let mine = snap.uid == self.uid;
        let entry = |head: Option<u64>, link: fn(&Rec) -> u32| -> Option<Option<u64>> {
            if !mine {
                return None;
            }
            let mut cur = head;
            loop {
                match cur {
                    None => return Some(None),
                    Some(seq) if seq < snap.end => return Some(Some(seq)),
                    Some(seq) => {
                        let (si, i) = self.locate(seq)?;
                        let d = link(&self.segments[si].recs[i]) as u64;
                        cur = (d != 0 && d <= seq).then(|| seq - d);
                    }
                }
            }
        };
        CutHeads {
            ids: (ids.iter())
                .map(|&k| (k, entry(self.ids.get(self.ids.bucket(k)), |r| r.link_id)))
                .collect(),
            corrs: (corrs.iter())
                .map(|&k| {
                    (
                        k,
                        entry(self.corrs.get(self.corrs.bucket(k)), |r| r.link_corr),
                    )
                })
                .collect(),
        }
    }

    fn chain_query(
        &self,
        head: Option<u64>,
        link: impl Fn(&Rec) -> u32,
        pred: impl Fn(u64, &SegData, usize) -> bool,
        limit: usize,
        order: Order,
    ) -> Vec<StoredEvent<'_>> {
        if limit == 0 {
            return Vec::new();
        }
        match order {
            Order::Desc => {
                // Sized once (#15c): growing by doubling re-copied the
                // results and made the allocator map and unmap fresh pages
                // on every query.
                let mut out = Vec::with_capacity(limit.min(RESULT_PREALLOC));
                self.walk(head, link, |seq, seg, i| {
                    if !seg.is_dead(i) && pred(seq, seg, i) {
                        out.push(self.view(seg, i));
                    }
                    out.len() < limit
                });
                out
            }
            Order::Asc => {
                let mut hits: Vec<(&Segment, usize)> = Vec::new();
                self.walk(head, link, |seq, seg, i| {
                    if !seg.is_dead(i) && pred(seq, seg, i) {
                        hits.push((seg, i));
                    }
                    true
                });
                // Sized exactly: a `RESULT_PREALLOC` buffer (~0.5 MB, over
                // malloc's mmap threshold) for a chain of a few hits cost
                // an mmap/munmap pair per call; `Analysis.range` makes two
                // such calls per nested call.
                let mut out = Vec::with_capacity(hits.len().min(limit));
                out.extend(hits.iter().rev().take(limit).map(|&(s, i)| self.view(s, i)));
                out
            }
        }
    }

    fn find(&self, id: u64) -> Option<(usize, usize)> {
        let mut found = None;
        self.walk(
            self.ids.get(self.ids.bucket(id)),
            |r| r.link_id,
            |seq, seg, i| {
                if seg.recs[i].id == id && !seg.is_dead(i) {
                    found = Some(seq);
                    false
                } else {
                    true
                }
            },
        );
        found.and_then(|s| self.locate(s))
    }

    /// Stores `event` with its correlation fields.
    pub fn insert(&mut self, event: &Event, corr: CorrelationFields) -> InsertOutcome {
        self.insert_with_aux(event, corr, event.aux)
    }

    /// Stores `event` with its correlation fields, recording `aux` in place
    /// of `event.aux` (the pipeline stores the duration it measured for a
    /// return written without one).
    pub fn insert_with_aux(
        &mut self,
        event: &Event,
        corr: CorrelationFields,
        aux: i64,
    ) -> InsertOutcome {
        self.insert_with_header(event, corr, aux, event.peer)
    }

    /// Stores `event` with its correlation fields, recording `aux` and
    /// `peer` in place of the event's (the pipeline stores what it learnt:
    /// a measured duration, the event that triggered an OTP callback).
    pub fn insert_with_header(
        &mut self,
        event: &Event,
        corr: CorrelationFields,
        aux: i64,
        peer: u64,
    ) -> InsertOutcome {
        self.insert_full(event, corr, aux, peer, None)
    }

    /// Stores a record holding a whole term (`event.kind` must be
    /// [`EventKind::Term`]; another kind is stored by [`EventStore::insert`])
    /// with its event-type and AST-node keys (`0`: none): each non-zero key
    /// puts the record in that index ([`EventStore::by_event_type`],
    /// [`EventStore::by_ast_node`]). The record's `aux`, `peer`, `parent_id`
    /// and `root_id` are not kept (they read 0; see the module
    /// documentation).
    pub fn insert_term(
        &mut self,
        event: &Event,
        corr: CorrelationFields,
        keys: TermKeys,
    ) -> InsertOutcome {
        if event.kind != EventKind::Term as u8 {
            return self.insert(event, corr);
        }
        self.insert_full(event, corr, keys.event_type as i64, 0, Some(keys.ast_node))
    }

    /// `ast`: `Some(key)` for a keyed term record (`aux` its event-type key).
    fn insert_full(
        &mut self,
        event: &Event,
        corr: CorrelationFields,
        aux: i64,
        peer: u64,
        ast: Option<u64>,
    ) -> InsertOutcome {
        self.inserted += 1;
        if self.live > 0 && !self.fresh.is_fresh(event.id) && self.find(event.id).is_some() {
            self.duplicates += 1;
            return InsertOutcome::Duplicate;
        }
        let plen = event.payload.len();
        if plen > u32::MAX as usize {
            self.rejected += 1;
            return InsertOutcome::Rejected;
        }
        // Room for one more.
        loop {
            self.advance_oldest();
            let span_full =
                self.live > 0 && self.next_seq - self.oldest >= 2 * self.max_events as u64;
            if !(self.live >= self.max_events || span_full) {
                break;
            }
            if !self.kill_oldest() {
                break;
            }
        }
        self.pop_dead_segments(true);

        let need_new = match self.segments.back() {
            None => true,
            Some(s) if s.sealed => true,
            Some(s) if s.arena.len() + plen > u32::MAX as usize => {
                self.seal_back();
                true
            }
            _ => false,
        };
        if need_new {
            // Size the arena like the last segment's payloads (+1/16), so
            // filling it rarely grows (reallocates and copies) it.
            let arena_hint = self.segments.back().map_or(0, |s| {
                let n = s.arena.len();
                (n + n / 16).min(MAX_ARENA_HINT)
            });
            let spare = self.spare.take();
            self.segments
                .push_back(Segment::new(self.next_seq, self.seg_cap, arena_hint, spare));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let min_valid = self.base_seq();

        let mf = match self.mf_ids.get(&(event.module, event.function)) {
            Some(&m) => m,
            None => {
                let m = self.mf_heads.len() as u32;
                Arc::make_mut(&mut self.mf_names).push((event.module, event.function));
                self.mf_heads.push(u64::MAX);
                self.mf_ids.insert((event.module, event.function), m);
                m
            }
        };
        let mf_head = &mut self.mf_heads[mf as usize];
        let link_mf = delta(seq, (*mf_head != u64::MAX).then_some(*mf_head));
        *mf_head = seq;
        let link_pid = delta(seq, self.pids.insert(event.pid, seq));
        let b = self.ids.bucket(event.id);
        let link_id = delta(seq, self.ids.get(b));
        self.ids.set(b, seq, min_valid);
        let b = self.corrs.bucket(corr.correlation_id);
        let link_corr = delta(seq, self.corrs.get(b));
        self.corrs.set(b, seq, min_valid);
        let keyed = ast.is_some();
        let corr = if keyed {
            CorrelationFields {
                parent_id: 0,
                root_id: 0,
                ..corr
            }
        } else {
            corr
        };
        let link_parent = if corr.parent_id != 0 {
            let b = self.parents.bucket(corr.parent_id);
            let d = delta(seq, self.parents.get(b));
            self.parents.set(b, seq, min_valid);
            d
        } else {
            0
        };
        let bits = self.table_bits;
        let chain = |table: &mut Option<HeadTable>, key: u64| -> u32 {
            if key == 0 {
                return 0;
            }
            let t = table.get_or_insert_with(|| HeadTable::new(bits));
            let b = t.bucket(key);
            let d = delta(seq, t.get(b));
            t.set(b, seq, min_valid);
            d
        };
        // Keyed records: the AST-node key in `peer`, the event-type link
        // in `root` (kept as is: `Some`).
        let (flags, peer, root, link_parent) = match ast {
            Some(ast) => {
                let link_type = chain(&mut self.types, aux as u64);
                let link_ast = chain(&mut self.asts, ast);
                (event.flags | KEYED, ast, Some(link_type), link_ast)
            }
            None if event.kind == EventKind::Term as u8 => (
                event.flags & !KEYED,
                peer,
                id_code(event.id, corr.root_id),
                link_parent,
            ),
            None => (
                event.flags,
                peer,
                id_code(event.id, corr.root_id),
                link_parent,
            ),
        };

        let seg = self.segments.back_mut().expect("active segment");
        let Body::Open(d) = &mut seg.body else {
            unreachable!("the last segment is open")
        };
        let i = d.recs.len();
        d.arena.extend_from_slice(&event.payload);
        let payload_end = d.arena.len() as u32;
        let wall_off = event.wall_time.wrapping_sub(event.timestamp);
        if i == 0 {
            d.wall_base = wall_off;
            d.over.clear();
        }
        let wall = match i32::try_from(wall_off.wrapping_sub(d.wall_base)) {
            Ok(w) if w != WALL_ESC => w,
            _ => {
                d.over
                    .push(((i as u32) << 2 | OVER_WALL, event.wall_time as u64));
                WALL_ESC
            }
        };
        let mut code = |v: u64, c: Option<u32>, field: u32| -> u32 {
            c.unwrap_or_else(|| {
                d.over.push(((i as u32) << 2 | field, v));
                ID_ESC
            })
        };
        let corr_c = code(
            corr.correlation_id,
            id_code(event.id, corr.correlation_id),
            OVER_CORR,
        );
        let root = code(corr.root_id, root, OVER_ROOT);
        let parent = code(
            corr.parent_id,
            id_code(event.id, corr.parent_id),
            OVER_PARENT,
        );
        d.recs.push(Rec {
            id: event.id,
            timestamp: event.timestamp,
            wall,
            pid: event.pid,
            peer,
            aux,
            corr: corr_c,
            root,
            parent,
            mf,
            payload_end,
            link_id,
            link_pid,
            link_mf,
            link_corr,
            link_parent,
            perm: 0,
            kind: event.kind,
            flags,
        });
        if i % 64 == 0 {
            seg.dead.push(0);
        }
        let bits = d.recs[i].index_bits();
        seg.live += 1;
        for (c, b) in seg.counts.iter_mut().zip(bits) {
            *c += b as u32;
        }
        seg.min_ts = seg.min_ts.min(event.timestamp);
        seg.max_ts = seg.max_ts.max(event.timestamp);
        seg.live_min_ts = seg.live_min_ts.min(event.timestamp);
        if seg.recs.len() == self.seg_cap {
            self.seal_back();
        }
        self.live += 1;
        self.fresh.add(event.id);
        if is_state_record(event.kind, event.flags) {
            self.index_state(event.pid, event.timestamp, seq, min_valid);
        }
        self.newest_seen = Some(
            self.newest_seen
                .map_or(event.timestamp, |t| t.max(event.timestamp)),
        );

        if self.max_age_ns.is_some() {
            self.since_age_check += 1;
            if self.since_age_check >= (self.seg_cap / 8).max(1) {
                self.expire();
            }
        }
        InsertOutcome::Stored { seq }
    }

    /// Seals the last segment and sets its time bounds along the store
    /// (`prefix_max`, `suffix_min`; the latter lowered backwards while an
    /// earlier segment's is larger: nothing moves when arrival is in time
    /// order).
    fn seal_back(&mut self) {
        let n = self.segments.len();
        let prev_max = (n >= 2).then(|| self.segments[n - 2].prefix_max);
        let seg = self.segments.back_mut().expect("a segment");
        seg.seal();
        seg.prefix_max = prev_max.map_or(seg.max_ts, |p| p.max(seg.max_ts));
        seg.suffix_min = seg.min_ts;
        let m = seg.min_ts;
        for j in (0..n - 1).rev() {
            let s = &mut self.segments[j];
            if s.suffix_min <= m {
                break;
            }
            s.suffix_min = m;
        }
    }

    /// Indexes of the segments that may hold timestamps in `t0..=t1`: a
    /// range of sealed ones (two binary searches on `prefix_max` and
    /// `suffix_min`) and the open one, if any.
    fn time_candidates(&self, t0: i64, t1: i64) -> impl Iterator<Item = usize> + '_ {
        let first = self
            .segments
            .partition_point(|s| s.sealed && s.prefix_max < t0);
        let last = self
            .segments
            .partition_point(|s| s.sealed && s.suffix_min <= t1)
            .max(first);
        let open = self
            .segments
            .back()
            .filter(|s| !s.sealed)
            .map(|_| self.segments.len() - 1);
        (first..last).chain(open.filter(|&o| o >= last))
    }

    /// Adds state record `seq` of `pid` at `ts` to the state index (in
    /// `(timestamp, seq)` order), dropping entries of freed records from the
    /// front first.
    fn index_state(&mut self, pid: u64, ts: i64, seq: u64, min_valid: u64) {
        let idx = self.states.entry(pid).or_insert_with(|| StateIndex {
            dropped_from: i64::MAX,
            dropped_until: i64::MIN,
            ..StateIndex::default()
        });
        if idx.recs.front().is_some_and(|&(_, s)| s < min_valid) {
            self.state_entries -= idx.drop_freed(min_valid);
        }
        let v = &mut idx.recs;
        let key = (ts, seq);
        let at = v.len() - v.iter().rev().take_while(|&&e| e > key).count();
        if v.is_empty() {
            idx.unordered = false;
        } else if at < v.len() {
            idx.unordered = true;
        }
        v.insert(at, key);
        self.state_entries += 1;
    }

    /// The live record at `seq`, if it is still in memory and not dead.
    fn live_at(&self, seq: u64) -> Option<StoredEvent<'_>> {
        let (si, i) = self.locate(seq)?;
        let seg = &self.segments[si];
        (!seg.is_dead(i)).then(|| self.view(seg, i))
    }

    /// The state records of `pid`, oldest first (entries of freed records
    /// may remain at the front until the next sweep).
    fn state_index(&self, pid: u64) -> Option<&StateIndex> {
        self.states.get(&pid).filter(|v| !v.recs.is_empty())
    }

    /// The state record at index position `k` of `idx` with the records
    /// its data (and gen_statem name) come from, walking back at most
    /// [`MAX_STATE_WALK`] records. `None` if the record itself is gone.
    fn resolve_state(&self, si: &StateIndex, k: usize) -> Option<StateView<'_>> {
        let idx = &si.recs;
        let record = self.live_at(idx[k].1)?;
        let statem = record.flags & FLAG_STATEM != 0;
        let (mut data, mut name) = (None, None);
        for j in (k.saturating_sub(MAX_STATE_WALK - 1)..=k).rev() {
            if j < k && idx[j].0 < si.dropped_until {
                // A dropped record may lie in between: unknown.
                break;
            }
            let Some(r) = (if j == k {
                Some(record)
            } else {
                self.live_at(idx[j].1)
            }) else {
                break;
            };
            let (d, n) = state_sets(r.kind, r.flags);
            if d && data.is_none() {
                data = Some(r);
            }
            if n && name.is_none() {
                name = Some(r);
            }
            if data.is_some() && (!statem || name.is_some()) {
                break;
            }
        }
        Some(StateView {
            record,
            data,
            name: if statem { name } else { None },
        })
    }

    /// The state record of `pid` in force at `ts` (the last one with
    /// `timestamp <= ts`), with the records that set the data and name it
    /// keeps. Cost: an interpolated search (see `state_partition`) in the
    /// process's state index and, for a record that keeps the state, a walk
    /// back to the one that set it.
    pub fn state_at(&self, pid: u64, ts: i64) -> StateAt<'_> {
        let Some(si) = self.state_index(pid) else {
            return StateAt::NoRecords;
        };
        let idx = &si.recs;
        let k = state_partition(idx, ts, false);
        if k == 0 {
            return if ts >= si.dropped_from {
                StateAt::Evicted
            } else {
                StateAt::Before
            };
        }
        match self.resolve_state(si, k - 1) {
            // A dropped record may have been in force after this one (it
            // arrived earlier but is stamped later): unknown.
            Some(v) if ts >= si.dropped_from && v.record.timestamp < si.dropped_until => {
                StateAt::Evicted
            }
            Some(v) => StateAt::Found(v),
            None => StateAt::Evicted,
        }
    }

    /// The state records of `pid` with `t0 <= timestamp <= t1`, oldest
    /// first, at most `limit`, each with the records its state comes from.
    /// Cost: an interpolated search, the records returned, and one walk back
    /// for
    /// the first one.
    pub fn state_history(&self, pid: u64, t0: i64, t1: i64, limit: usize) -> Vec<StateView<'_>> {
        let mut out = Vec::new();
        let Some(si) = self.state_index(pid) else {
            return out;
        };
        let idx = &si.recs;
        let start = state_partition(idx, t0, true);
        let mut prev: Option<StateView<'_>> = None;
        for (k, &(ts, seq)) in idx.iter().enumerate().skip(start) {
            if out.len() >= limit || ts > t1 {
                break;
            }
            let view = match prev {
                Some(p) if p.record.timestamp >= si.dropped_until => {
                    self.live_at(seq).map(|record| {
                        let (d, n) = state_sets(record.kind, record.flags);
                        let statem = record.flags & FLAG_STATEM != 0;
                        StateView {
                            record,
                            data: if d { Some(record) } else { p.data },
                            name: match (statem, n) {
                                (false, _) => None,
                                (true, true) => Some(record),
                                (true, false) => p.name,
                            },
                        }
                    })
                }
                _ => self.resolve_state(si, k),
            };
            // A freed record in between: what it set is unknown, so the next
            // record resolves (and stops) on its own.
            prev = view;
            out.extend(view);
        }
        out
    }

    /// The time span of the live events, from their segments' bounds (it
    /// may reach out to dead records of a segment that still holds live
    /// ones). Cost: one check per segment.
    pub fn time_span(&self) -> Option<(i64, i64)> {
        self.segments
            .iter()
            .filter(|s| s.live > 0)
            .fold(None, |acc, s| {
                let lo = s.live_min_ts.max(s.min_ts);
                Some(match acc {
                    None => (lo, s.max_ts),
                    Some((a, b)) => (a.min(lo), b.max(s.max_ts)),
                })
            })
    }

    /// For each process whose state records are not all in memory (freed
    /// with their segments, or evicted and not yet freed): the earliest and
    /// latest timestamps of the missing ones. A trace file keeps these so
    /// the store it loads into answers "evicted" where this one does.
    /// Cost: one check per state-index entry.
    pub fn state_gaps(&self) -> Vec<(u64, i64, i64)> {
        let mut v: Vec<(u64, i64, i64)> = self
            .states
            .iter()
            .filter_map(|(&pid, si)| {
                let (mut lo, mut hi) = (si.dropped_from, si.dropped_until);
                for &(ts, seq) in &si.recs {
                    if self.live_at(seq).is_none() {
                        lo = lo.min(ts);
                        hi = hi.max(ts);
                    }
                }
                (lo <= hi).then_some((pid, lo, hi))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Records that state records of `pid` stamped `from..=until` are
    /// missing (a loaded file's [`EventStore::state_gaps`]): state queries
    /// answer "evicted" for the times they may have been in force.
    pub fn add_state_gap(&mut self, pid: u64, from: i64, until: i64) {
        if from > until {
            return;
        }
        let idx = self.states.entry(pid).or_insert_with(|| StateIndex {
            dropped_from: i64::MAX,
            dropped_until: i64::MIN,
            ..StateIndex::default()
        });
        idx.dropped_from = idx.dropped_from.min(from);
        idx.dropped_until = idx.dropped_until.max(until);
    }

    /// Processes with state records in the store and how many each has
    /// (entries of records freed since the last sweep included).
    pub fn state_processes(&self) -> Vec<(u64, usize)> {
        let mut v: Vec<(u64, usize)> = self
            .states
            .iter()
            .filter(|(_, v)| !v.recs.is_empty())
            .map(|(&p, v)| (p, v.recs.len()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Moves `oldest` past dead records.
    fn advance_oldest(&mut self) {
        self.oldest = self.oldest.max(self.base_seq());
        while self.oldest < self.next_seq {
            let Some((si, i)) = self.locate(self.oldest) else {
                self.oldest = self.next_seq;
                break;
            };
            let seg = &self.segments[si];
            if seg.live == 0 {
                self.oldest = seg.base + seg.recs.len() as u64;
                continue;
            }
            if !seg.is_dead(i) {
                break;
            }
            self.oldest += 1;
        }
    }

    /// Evicts the oldest live record (call after `advance_oldest`).
    fn kill_oldest(&mut self) -> bool {
        let Some((si, i)) = self.locate(self.oldest) else {
            return false;
        };
        let killed = self.segments[si].kill(i);
        if killed {
            self.live -= 1;
            self.evicted += 1;
        }
        self.oldest += 1;
        killed
    }

    /// Frees whole dead segments at the front and sweeps stale pid heads.
    /// With `keep_spare` (inserts and automatic expiry), the memory of one
    /// freed segment is kept for the next segment instead of being given
    /// back to the allocator (which returns it to the OS, so the next
    /// segment would fault in fresh zeroed pages: one fault per 39 records
    /// in a 10M store); otherwise any spare is freed too.
    fn pop_dead_segments(&mut self, keep_spare: bool) {
        while let Some(front) = self.segments.front() {
            if !(front.sealed && front.live == 0) {
                break;
            }
            self.popped_since_sweep += front.recs.len();
            let seg = self.segments.pop_front().expect("a front segment");
            if keep_spare && self.spare.is_none() {
                self.spare = Spare::take(seg, self.seg_cap);
            }
        }
        if !keep_spare {
            self.spare = None;
        }
        if self.popped_since_sweep >= self.sweep_every {
            self.popped_since_sweep = 0;
            let base = self.base_seq();
            self.pids.retain(|_, head| *head >= base);
            if self.pids.capacity() > 4 * (self.pids.len() + 16) {
                self.pids.shrink_to_fit();
            }
            rehash_if_worn(&mut self.pids);
            if !self.relinks.is_empty() {
                Arc::make_mut(&mut self.relinks).prune(base);
            }
            let mut left = 0;
            self.states.retain(|_, v| {
                v.drop_freed(base);
                left += v.recs.len();
                !v.recs.is_empty()
            });
            self.state_entries = left;
            if self.states.capacity() > 4 * (self.states.len() + 16) {
                self.states.shrink_to_fit();
            }
            rehash_if_worn(&mut self.states);
            self.sweep_every =
                (self.pids.len() + self.relinks.len() + self.state_entries).max(self.seg_cap);
        }
        if self.segments.capacity() > 4 * (self.segments.len() + 8) {
            self.segments.shrink_to_fit();
        }
    }

    /// Expires every live event with `timestamp < cutoff_ns`; returns how
    /// many. Every segment it removed events from is compacted (see the
    /// module documentation), so their payload memory is freed at once.
    /// Cost: one check per segment plus a scan (and a copy of the live
    /// payloads) of the segments that held a live event older than the
    /// cutoff.
    pub fn evict_older_than(&mut self, cutoff_ns: i64) -> usize {
        self.expire_before(cutoff_ns, true)
    }

    fn expire_before(&mut self, cutoff_ns: i64, compact_all: bool) -> usize {
        let mut n = 0;
        let mut reclaimed = 0usize;
        let mut compactions = 0u64;
        for seg in self.segments.iter_mut() {
            if seg.live == 0 || seg.live_min_ts >= cutoff_ns {
                continue;
            }
            let mut min = i64::MAX;
            let mut killed = 0;
            for i in 0..seg.recs.len() {
                if seg.is_dead(i) {
                    continue;
                }
                let ts = seg.recs[i].timestamp;
                if ts < cutoff_ns {
                    seg.kill(i);
                    killed += 1;
                } else {
                    min = min.min(ts);
                }
            }
            seg.live_min_ts = min;
            n += killed;
            // A segment left without live records is freed whole below
            // (sealed) or at the end (the open one, when it is the last).
            if killed > 0
                && seg.live > 0
                && (compact_all || 4 * seg.dead_payload_bytes() >= seg.arena.len())
            {
                reclaimed += seg.compact_payloads();
                compactions += 1;
            }
        }
        self.live -= n;
        self.expired += n as u64;
        self.compactions += compactions;
        self.advance_oldest();
        let before = self.memory_bytes();
        // An explicit cleanup, or an emptied store, gives the spare back.
        self.pop_dead_segments(!compact_all && self.live > 0);
        // The open segment, emptied and alone: free it too (a new one is
        // made by the next insert). Only when alone: a chain walk through
        // a missing segment would stop there.
        if self.segments.len() == 1 && self.segments[0].live == 0 {
            let seg = self.segments.pop_front().expect("one segment");
            self.popped_since_sweep += seg.recs.len();
            self.segments.shrink_to_fit();
        }
        // No record left that the lazily made event-type and AST-node
        // tables could point to: free them (the next keyed insert makes
        // them again), so an emptied store is back to an empty one's size.
        if self.live == 0 && self.segments.is_empty() {
            self.types = None;
            self.asts = None;
        }
        reclaimed += before.saturating_sub(self.memory_bytes());
        self.reclaimed_bytes += reclaimed as u64;
        n
    }

    /// Applies `max_age_ns` now (relative to the newest timestamp ever
    /// inserted); returns the number of expired events.
    pub fn expire(&mut self) -> usize {
        self.since_age_check = 0;
        match (self.max_age_ns, self.newest_seen) {
            (Some(age), Some(newest)) => self.expire_before(newest.saturating_sub(age), false),
            _ => 0,
        }
    }

    /// The live event with this id.
    pub fn get(&self, id: u64) -> Option<StoredEvent<'_>> {
        self.find(id)
            .map(|(si, i)| self.view(&self.segments[si], i))
    }

    /// Live events of process `pid`, in store order.
    pub fn by_pid(&self, pid: u64, limit: usize, order: Order) -> Vec<StoredEvent<'_>> {
        let head = self.pids.get(&pid).copied();
        self.chain_query(head, |r| r.link_pid, |_, _, _| true, limit, order)
    }

    /// Live events of `module.function`, in store order.
    pub fn by_function(
        &self,
        module: u64,
        function: u64,
        limit: usize,
        order: Order,
    ) -> Vec<StoredEvent<'_>> {
        let head = self
            .mf_ids
            .get(&(module, function))
            .map(|&m| self.mf_heads[m as usize])
            .filter(|&h| h != u64::MAX);
        self.chain_query(head, |r| r.link_mf, |_, _, _| true, limit, order)
    }

    /// Live events with this correlation id, in store order.
    pub fn by_correlation(
        &self,
        correlation_id: u64,
        limit: usize,
        order: Order,
    ) -> Vec<StoredEvent<'_>> {
        let head = self.corrs.get(self.corrs.bucket(correlation_id));
        if self.relinks.is_empty() {
            return self.chain_query(
                head,
                |r| r.link_corr,
                |_, d, i| d.corr(i) == correlation_id,
                limit,
                order,
            );
        }
        // Records relinked elsewhere leave their chain; records relinked
        // here come from the target's seq list. Each source yields its first
        // `limit` in `order`, and the merge keeps the first `limit`.
        let chained = self.chain_query(
            head,
            |r| r.link_corr,
            |seq, d, i| d.corr(i) == correlation_id && self.relinks.get(seq).is_none(),
            limit,
            order,
        );
        let seqs = self.relinks.seqs(correlation_id);
        if seqs.is_empty() {
            return chained;
        }
        let live = |&seq: &u64| {
            self.locate(seq)
                .filter(|&(si, i)| !self.segments[si].is_dead(i))
                .map(|(si, i)| self.view(&self.segments[si], i))
        };
        let relinked: Vec<StoredEvent<'_>> = match order {
            Order::Asc => seqs.iter().filter_map(live).take(limit).collect(),
            Order::Desc => seqs.iter().rev().filter_map(live).take(limit).collect(),
        };
        let mut out = Vec::with_capacity((chained.len() + relinked.len()).min(limit));
        let (mut a, mut b) = (
            chained.into_iter().peekable(),
            relinked.into_iter().peekable(),
        );
        while out.len() < limit {
            let take_a = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => (x.seq < y.seq) == (order == Order::Asc),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            out.extend(if take_a { a.next() } else { b.next() });
        }
        out
    }

    /// Sets the correlation id of the live event `id` to `correlation_id`
    /// (a link learnt after the event was stored, such as a receive's send);
    /// returns false if `id` is not stored. Afterwards every query shows the
    /// new correlation id, [`EventStore::by_correlation`] finds the event
    /// under it and no longer under its previous one. Relinking again
    /// replaces the link; linking back to the stored correlation id removes
    /// it. Counters are unchanged. Cost: one id lookup, two hash-map updates
    /// and O(k) when k > 1 events are relinked to the same correlation id;
    /// the link is kept in side maps (counted in
    /// [`EventStore::memory_bytes`]) until the record's segment is freed.
    pub fn relink(&mut self, id: u64, correlation_id: u64) -> bool {
        let Some((si, i)) = self.find(id) else {
            return false;
        };
        let seg = &self.segments[si];
        let seq = seg.base + i as u64;
        let own = seg.corr(i);
        Arc::make_mut(&mut self.relinks)
            .set(seq, (correlation_id != own).then_some(correlation_id));
        true
    }

    /// Live events whose `parent_id` is `parent_id` (non-zero), oldest first.
    pub fn children(&self, parent_id: u64, limit: usize) -> Vec<StoredEvent<'_>> {
        if parent_id == 0 {
            return Vec::new();
        }
        let head = self.parents.get(self.parents.bucket(parent_id));
        self.chain_query(
            head,
            |r| r.link_parent,
            |_, d, i| d.parent(i) == parent_id,
            limit,
            Order::Asc,
        )
    }

    /// Calls `f` on every live event with this correlation id, without
    /// collecting them: the events [`EventStore::by_correlation`] returns,
    /// unordered and unlimited (chained ones newest first, then relinked
    /// ones).
    pub(crate) fn visit_correlation<'a>(
        &'a self,
        correlation_id: u64,
        mut f: impl FnMut(StoredEvent<'a>),
    ) {
        let head = self.corrs.get(self.corrs.bucket(correlation_id));
        let plain = self.relinks.is_empty();
        self.walk(
            head,
            |r| r.link_corr,
            |seq, seg, i| {
                if !seg.is_dead(i)
                    && seg.data().corr(i) == correlation_id
                    && (plain || self.relinks.get(seq).is_none())
                {
                    f(self.view(seg, i));
                }
                true
            },
        );
        if plain {
            return;
        }
        for &seq in self.relinks.seqs(correlation_id) {
            if let Some((si, i)) = self.locate(seq) {
                let seg = &self.segments[si];
                if !seg.is_dead(i) {
                    f(self.view(seg, i));
                }
            }
        }
    }

    /// Calls `f` on every live event whose `parent_id` is `parent_id`
    /// (non-zero), newest first, without collecting them (what
    /// [`EventStore::children`] returns, unordered and unlimited).
    pub(crate) fn visit_children<'a>(&'a self, parent_id: u64, mut f: impl FnMut(StoredEvent<'a>)) {
        if parent_id == 0 {
            return;
        }
        let head = self.parents.get(self.parents.bucket(parent_id));
        self.walk(
            head,
            |r| r.link_parent,
            |_, seg, i| {
                if !seg.is_dead(i) && seg.data().parent(i) == parent_id {
                    f(self.view(seg, i));
                }
                true
            },
        );
    }

    /// Live records stored with this event-type key (non-zero, see
    /// [`EventStore::insert_term`]), in store order.
    pub fn by_event_type(&self, key: u64, limit: usize, order: Order) -> Vec<StoredEvent<'_>> {
        let head = match (&self.types, key) {
            (Some(t), k) if k != 0 => t.get(t.bucket(k)),
            _ => return Vec::new(),
        };
        self.chain_query(
            head,
            |r| r.link_type(),
            |_, d, i| d.recs[i].typed() && d.recs[i].aux as u64 == key,
            limit,
            order,
        )
    }

    /// Live records stored with this AST-node key (non-zero), in store
    /// order.
    pub fn by_ast_node(&self, key: u64, limit: usize, order: Order) -> Vec<StoredEvent<'_>> {
        let head = match (&self.asts, key) {
            (Some(t), k) if k != 0 => t.get(t.bucket(k)),
            _ => return Vec::new(),
        };
        self.chain_query(
            head,
            |r| r.link_ast(),
            |_, d, i| d.recs[i].ast() == key,
            limit,
            order,
        )
    }

    /// Calls `f` on the live records with this event-type key, newest
    /// first, while it returns true.
    pub fn walk_event_type<'a>(&'a self, key: u64, mut f: impl FnMut(StoredEvent<'a>) -> bool) {
        let Some(t) = self.types.as_ref().filter(|_| key != 0) else {
            return;
        };
        self.walk(
            t.get(t.bucket(key)),
            |r| r.link_type(),
            |_, seg, i| {
                let r = &seg.recs[i];
                seg.is_dead(i) || !(r.typed() && r.aux as u64 == key) || f(self.view(seg, i))
            },
        );
    }

    /// Calls `f` on the live records with this AST-node key, newest first,
    /// while it returns true.
    pub fn walk_ast_node<'a>(&'a self, key: u64, mut f: impl FnMut(StoredEvent<'a>) -> bool) {
        let Some(t) = self.asts.as_ref().filter(|_| key != 0) else {
            return;
        };
        self.walk(
            t.get(t.bucket(key)),
            |r| r.link_ast(),
            |_, seg, i| seg.is_dead(i) || seg.recs[i].ast() != key || f(self.view(seg, i)),
        );
    }

    /// Live records in each index. Cost: one step per segment.
    pub fn index_sizes(&self) -> IndexSizes {
        let mut c = [0usize; 4];
        for seg in &self.segments {
            for (a, &b) in c.iter_mut().zip(seg.counts.iter()) {
                *a += b as usize;
            }
        }
        IndexSizes {
            total: self.live,
            with_pid: c[0],
            with_function: c[1],
            event_type: c[2],
            ast_node: c[3],
        }
    }

    /// The event `id` and its ancestors (following `parent_id` while the
    /// parent is stored), root first, at most [`MAX_CHAIN_DEPTH`] events.
    /// Empty if `id` is not stored.
    pub fn causal_chain(&self, id: u64) -> Vec<StoredEvent<'_>> {
        let mut out = Vec::new();
        let mut cur = self.get(id);
        while let Some(e) = cur {
            out.push(e);
            if e.parent_id == 0 || out.len() >= MAX_CHAIN_DEPTH {
                break;
            }
            cur = self.get(e.parent_id);
        }
        out.reverse();
        out
    }

    /// Calls `f` on up to `max` live events in store (`seq`) order, from
    /// sequence number `from` on; returns the sequence number to continue
    /// from, or `None` when the scan reached the newest event. Cost: the
    /// records visited (dead ones are skipped, not counted in `max`).
    pub fn scan<'a>(
        &'a self,
        from: u64,
        max: usize,
        mut f: impl FnMut(&StoredEvent<'a>),
    ) -> Option<u64> {
        let mut seq = from.max(self.base_seq());
        let mut seen = 0usize;
        let start = self.locate(seq).map_or(self.segments.len(), |(si, _)| si);
        for seg in self.segments.iter().skip(start) {
            let mut i = seq.saturating_sub(seg.base) as usize;
            while i < seg.recs.len() {
                if seen >= max {
                    return Some(seg.base + i as u64);
                }
                if !seg.is_dead(i) {
                    f(&self.view(seg, i));
                    seen += 1;
                }
                i += 1;
            }
            seq = seg.base + seg.recs.len() as u64;
        }
        None
    }

    /// The live event of the same process stored just before event `id`
    /// (one step back along the pid chain).
    pub fn pid_prev(&self, id: u64) -> Option<StoredEvent<'_>> {
        let (si, i) = self.find(id)?;
        let seg = &self.segments[si];
        let pid = seg.recs[i].pid;
        let seq = seg.base + i as u64;
        let mut out = None;
        let d = seg.recs[i].link_pid as u64;
        let start = (d != 0 && d <= seq).then(|| seq - d);
        self.walk(
            start,
            |r| r.link_pid,
            |_, s, j| {
                if !s.is_dead(j) && s.recs[j].pid == pid {
                    out = Some(self.view(s, j));
                    false
                } else {
                    true
                }
            },
        );
        out
    }

    /// The live event of the same process stored just after event `id`.
    /// Walks forward in store order and back from the process's newest
    /// event in step, so the cost is the smaller of the two distances.
    pub fn pid_next(&self, id: u64) -> Option<StoredEvent<'_>> {
        let (si, i) = self.find(id)?;
        let pid = self.segments[si].recs[i].pid;
        let target = self.segments[si].base + i as u64;
        let head = self.pids.get(&pid).copied();
        if head.map_or(true, |h| h <= target) {
            return None;
        }
        // Forward cursor (store order) and backward cursor (pid chain).
        let mut fwd = target + 1;
        let mut back = head;
        let mut best: Option<u64> = None;
        loop {
            if fwd < self.next_seq {
                if let Some((fs, fi)) = self.locate(fwd) {
                    let seg = &self.segments[fs];
                    if !seg.is_dead(fi) && seg.recs[fi].pid == pid {
                        return Some(self.view(seg, fi));
                    }
                }
                fwd += 1;
            }
            match back {
                Some(b) if b > target => {
                    let Some((bs, bi)) = self.locate(b) else {
                        break;
                    };
                    let seg = &self.segments[bs];
                    if !seg.is_dead(bi) && seg.recs[bi].pid == pid {
                        best = Some(b);
                    }
                    let d = seg.recs[bi].link_pid as u64;
                    back = (d != 0 && d <= b).then(|| b - d);
                }
                _ => break,
            }
        }
        best.and_then(|b| self.locate(b))
            .map(|(s, i)| self.view(&self.segments[s], i))
    }

    /// The live event right after (`Order::Asc`) or before (`Order::Desc`)
    /// event `id` in `(timestamp, seq)` order, across all processes.
    /// Searches windows growing 16× from the event's timestamp (0 ns, 1 µs,
    /// 16 µs, ...), so only the segments near it are visited.
    pub fn time_neighbour(&self, id: u64, order: Order) -> Option<StoredEvent<'_>> {
        let (si, i) = self.find(id)?;
        let r = &self.segments[si].recs[i];
        let key = (r.timestamp, self.segments[si].base + i as u64);
        // Bounds of every timestamp in memory, in O(1): the first sealed
        // segment's suffix minimum, the last sealed one's prefix maximum,
        // and the open segment's own.
        let n = self.segments.len();
        let last_sealed = match self.segments.back() {
            Some(s) if s.sealed => Some(s),
            _ => n.checked_sub(2).map(|k| &self.segments[k]),
        };
        let (lo, hi) = match (self.segments.front(), last_sealed) {
            (Some(f), Some(l)) if f.sealed => (f.suffix_min, l.prefix_max),
            _ => (i64::MAX, i64::MIN),
        };
        let (lo, hi) = match self.segments.back().filter(|s| !s.sealed) {
            Some(s) => (lo.min(s.min_ts), hi.max(s.max_ts)),
            None => (lo, hi),
        };
        let mut width: i64 = 0;
        loop {
            let (t0, t1) = match order {
                Order::Asc => (key.0, key.0.saturating_add(width)),
                Order::Desc => (key.0.saturating_sub(width), key.0),
            };
            // Events tied with this one come first; then the window.
            let mut want = 8usize;
            loop {
                let page = self.by_time_range(t0, t1, want, order);
                let hit = page.iter().find(|e| match order {
                    Order::Asc => (e.timestamp, e.seq) > key,
                    Order::Desc => (e.timestamp, e.seq) < key,
                });
                if let Some(e) = hit {
                    return Some(*e);
                }
                if page.len() < want {
                    break;
                }
                // Many events share the timestamp: look further.
                want *= 8;
            }
            let covered = match order {
                Order::Asc => t1 >= hi,
                Order::Desc => t0 <= lo,
            };
            if covered {
                return None;
            }
            width = if width == 0 {
                1_000
            } else {
                width.saturating_mul(16)
            };
        }
    }

    /// Live events with `t0 <= timestamp <= t1`, in `(timestamp, seq)`
    /// order.
    pub fn by_time_range(
        &self,
        t0: i64,
        t1: i64,
        limit: usize,
        order: Order,
    ) -> Vec<StoredEvent<'_>> {
        let mut out = Vec::with_capacity(limit.min(RESULT_PREALLOC));
        if limit == 0 || t0 > t1 {
            return out;
        }
        // One sorted source per overlapping segment: positions [lo, hi) of
        // its time permutation, or of `list` for the open segment.
        struct Src {
            si: usize,
            lo: usize,
            hi: usize,
            list: Option<Vec<u16>>,
        }
        let mut srcs = Vec::new();
        for si in self.time_candidates(t0, t1) {
            let seg = &self.segments[si];
            if seg.live == 0 || seg.max_ts < t0 || seg.min_ts > t1 {
                continue;
            }
            if seg.sealed {
                let lo = seg.time_partition(|ts| ts < t0);
                let hi = seg.time_partition(|ts| ts <= t1);
                if lo < hi {
                    srcs.push(Src {
                        si,
                        lo,
                        hi,
                        list: None,
                    });
                }
            } else {
                let mut list: Vec<u16> = (0..seg.recs.len() as u16)
                    .filter(|&i| {
                        let ts = seg.recs[i as usize].timestamp;
                        t0 <= ts && ts <= t1
                    })
                    .collect();
                list.sort_unstable_by_key(|&i| (seg.recs[i as usize].timestamp, i));
                if !list.is_empty() {
                    srcs.push(Src {
                        si,
                        lo: 0,
                        hi: list.len(),
                        list: Some(list),
                    });
                }
            }
        }
        let idx = |s: &Src, p: usize| -> usize {
            match &s.list {
                Some(l) => l[p] as usize,
                None => self.segments[s.si].recs[p].perm as usize,
            }
        };
        let key = |s: &Src, p: usize| -> (i64, u64) {
            let seg = &self.segments[s.si];
            let i = idx(s, p);
            let k = (seg.recs[i].timestamp, seg.base + i as u64);
            match order {
                Order::Desc => k,
                Order::Asc => (!k.0, !k.1),
            }
        };
        // Max-heap of (key, source); `Asc` keys are bitwise-negated.
        let mut heap = BinaryHeap::with_capacity(srcs.len());
        for (k, s) in srcs.iter_mut().enumerate() {
            let p = match order {
                Order::Asc => s.lo,
                Order::Desc => {
                    s.hi -= 1;
                    s.hi
                }
            };
            heap.push((key(s, p), k));
        }
        while let Some((_, k)) = heap.pop() {
            let s = &mut srcs[k];
            let p = match order {
                Order::Asc => {
                    s.lo += 1;
                    s.lo - 1
                }
                Order::Desc => s.hi,
            };
            let seg = &self.segments[s.si];
            let i = idx(s, p);
            if !seg.is_dead(i) {
                out.push(self.view(seg, i));
                if out.len() >= limit {
                    break;
                }
            }
            let next = match order {
                Order::Asc => (s.lo < s.hi).then_some(s.lo),
                Order::Desc => (s.hi > s.lo).then(|| {
                    s.hi -= 1;
                    s.hi
                }),
            };
            if let Some(np) = next {
                let s = &srcs[k];
                heap.push((key(s, np), k));
            }
        }
        out
    }

    /// First sequence number in memory and the next one to be assigned.
    pub fn seq_range(&self) -> (u64, u64) {
        (self.base_seq(), self.next_seq)
    }

    /// Calls `f` on the live events of process `pid`, newest first, while
    /// it returns true.
    pub fn walk_pid<'a>(&'a self, pid: u64, mut f: impl FnMut(StoredEvent<'a>) -> bool) {
        let head = self.pids.get(&pid).copied();
        self.walk(
            head,
            |r| r.link_pid,
            |_, seg, i| seg.is_dead(i) || seg.recs[i].pid != pid || f(self.view(seg, i)),
        );
    }

    /// Calls `f` on the live events of `module.function`, newest first,
    /// while it returns true.
    pub fn walk_function<'a>(
        &'a self,
        module: u64,
        function: u64,
        mut f: impl FnMut(StoredEvent<'a>) -> bool,
    ) {
        let head = self
            .mf_ids
            .get(&(module, function))
            .map(|&m| self.mf_heads[m as usize])
            .filter(|&h| h != u64::MAX);
        self.walk(
            head,
            |r| r.link_mf,
            |_, seg, i| seg.is_dead(i) || f(self.view(seg, i)),
        );
    }

    /// Records (live or dead) with `t0 <= timestamp <= t1`: an upper bound
    /// of the live ones, from the segments' time marks (binary searches;
    /// the open segment is counted).
    pub fn count_time_range(&self, t0: i64, t1: i64) -> usize {
        if t0 > t1 {
            return 0;
        }
        let mut n = 0;
        for si in self.time_candidates(t0, t1) {
            let seg = &self.segments[si];
            if seg.live == 0 || seg.max_ts < t0 || seg.min_ts > t1 {
                continue;
            }
            if seg.sealed {
                let lo = seg.time_partition(|ts| ts < t0);
                let hi = seg.time_partition(|ts| ts <= t1);
                n += hi.saturating_sub(lo);
            } else {
                n += seg
                    .recs
                    .iter()
                    .filter(|r| t0 <= r.timestamp && r.timestamp <= t1)
                    .count();
            }
        }
        n
    }

    /// Calls `f` on live events in store order from sequence number `from`
    /// on, visiting at most `max`, until `f` returns false. Returns the
    /// last visited seq when `max` stopped it, `None` when it reached the
    /// newest event or `f` stopped it.
    pub fn scan_from<'a>(
        &'a self,
        from: u64,
        max: usize,
        mut f: impl FnMut(&StoredEvent<'a>) -> bool,
    ) -> Option<u64> {
        let mut seen = 0usize;
        let mut last = None;
        let from = from.max(self.base_seq());
        let start = self.locate(from).map_or(self.segments.len(), |(si, _)| si);
        for seg in self.segments.iter().skip(start) {
            for i in from.saturating_sub(seg.base) as usize..seg.recs.len() {
                if seg.is_dead(i) {
                    continue;
                }
                if seen >= max {
                    return last;
                }
                seen += 1;
                last = Some(seg.base + i as u64);
                if !f(&self.view(seg, i)) {
                    return None;
                }
            }
        }
        None
    }

    /// [`EventStore::scan_from`] backwards: live events with `seq <
    /// before`, newest first.
    pub fn scan_back<'a>(
        &'a self,
        before: u64,
        max: usize,
        mut f: impl FnMut(&StoredEvent<'a>) -> bool,
    ) -> Option<u64> {
        let mut seen = 0usize;
        let mut last = None;
        for seg in self.segments.iter().rev() {
            if seg.base >= before {
                continue;
            }
            let end = (before - seg.base).min(seg.recs.len() as u64) as usize;
            for i in (0..end).rev() {
                if seg.is_dead(i) {
                    continue;
                }
                if seen >= max {
                    return last;
                }
                seen += 1;
                last = Some(seg.base + i as u64);
                if !f(&self.view(seg, i)) {
                    return None;
                }
            }
        }
        None
    }

    /// Bytes used by the store: the struct itself, every segment (header
    /// vector, payload arena and dead bitset capacities), the index tables,
    /// the recent-id filter, the late links and the hash maps (estimated
    /// from their capacity as hashbrown lays them out: one control byte per
    /// bucket, 7/8 load).
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + self.segments.capacity() * size_of::<Segment>()
            + self.segments.iter().map(Segment::bytes).sum::<usize>()
            + self.spare.as_ref().map_or(0, Spare::bytes)
            + (self.ids.slots.capacity()
                + self.corrs.slots.capacity()
                + self.parents.slots.capacity()
                + self.types.as_ref().map_or(0, |t| t.slots.capacity())
                + self.asts.as_ref().map_or(0, |t| t.slots.capacity()))
                * 4
            + map_bytes(&self.pids)
            + map_bytes(&self.mf_ids)
            + self.mf_names.capacity() * size_of::<(u64, u64)>()
            + self.mf_heads.capacity() * size_of::<u64>()
            + self.fresh.words.capacity() * 16
            + self.relinks.bytes()
            + map_bytes(&self.states)
            + self
                .states
                .values()
                .map(|v| v.recs.capacity() * size_of::<(i64, u64)>())
                .sum::<usize>()
    }

    /// Counters, bounds, live timestamp range and memory. Cost: one check
    /// per segment plus a scan of the segments that hold dead records.
    pub fn stats(&self) -> StoreStats {
        let mut oldest: Option<i64> = None;
        let mut newest: Option<i64> = None;
        let mut acc = |ts_min: i64, ts_max: i64| {
            oldest = Some(oldest.map_or(ts_min, |o| o.min(ts_min)));
            newest = Some(newest.map_or(ts_max, |n| n.max(ts_max)));
        };
        for seg in &self.segments {
            if seg.live == 0 {
                continue;
            }
            if seg.live as usize == seg.recs.len() {
                acc(seg.min_ts, seg.max_ts);
            } else {
                for (i, r) in seg.recs.iter().enumerate() {
                    if !seg.is_dead(i) {
                        acc(r.timestamp, r.timestamp);
                    }
                }
            }
        }
        StoreStats {
            total: self.live,
            max_events: self.max_events,
            oldest_timestamp: oldest,
            newest_timestamp: newest,
            inserted: self.inserted,
            evicted: self.evicted,
            expired: self.expired,
            duplicates: self.duplicates,
            rejected: self.rejected,
            segments: self.segments.len(),
            memory_bytes: self.memory_bytes(),
            payload_bytes: self.segments.iter().map(|s| s.arena.capacity()).sum(),
            reclaimed_bytes: self.reclaimed_bytes,
            compactions: self.compactions,
        }
    }
}

/// The [`StoredEvent`] of record `i` of a segment at `base`.
#[inline]
fn view_rec<'a>(
    names: &'a [(u64, u64)],
    relinks: &Relinks,
    base: u64,
    d: &'a SegData,
    i: usize,
) -> StoredEvent<'a> {
    let r = &d.recs[i];
    let (module, function) = names[r.mf as usize];
    let seq = base + i as u64;
    let correlation_id = match relinks.is_empty() {
        true => d.corr(i),
        false => relinks.get(seq).unwrap_or_else(|| d.corr(i)),
    };
    StoredEvent {
        seq,
        id: r.id,
        timestamp: r.timestamp,
        wall_time: d.wall_time(i),
        pid: r.pid,
        peer: if r.keyed() { 0 } else { r.peer },
        module,
        function,
        aux: r.aux,
        kind: r.kind,
        flags: if r.keyed() { r.flags & !KEYED } else { r.flags },
        correlation_id,
        parent_id: d.parent(i),
        root_id: d.root(i),
        ast_node: r.ast(),
        payload: d.payload(i),
    }
}

/// Dead records of a [`Snapshot`] segment at the cut.
enum Dead {
    None,
    All,
    Bits(Box<[u64]>),
}

/// One segment of a [`Snapshot`].
struct SnapSeg {
    base: u64,
    data: Arc<SegData>,
    dead: Dead,
}

impl SnapSeg {
    #[inline]
    fn is_dead(&self, i: usize) -> bool {
        match &self.dead {
            Dead::None => false,
            Dead::All => true,
            Dead::Bits(d) => d[i / 64] & (1 << (i % 64)) != 0,
        }
    }
}

/// A consistent cut of an [`EventStore`] ([`EventStore::snapshot`]): the
/// live events at the moment it was taken, with their correlation ids as
/// they were then, readable without the store (and its lock) while the
/// store goes on taking inserts, evictions, expiry and late links.
///
/// Sealed segments are immutable and shared (reference counted); a store
/// change that would alter one while a snapshot holds it (arena compaction
/// after expiry) copies it first. The open segment, the dead-record bits
/// and the late links are copied at the cut (the links lazily: the store
/// copies its table on its next late link). Memory: a snapshot keeps the
/// segments it holds alive after the store frees them, until it is
/// dropped; it is not counted in [`EventStore::memory_bytes`].
pub struct Snapshot {
    segs: Vec<SnapSeg>,
    names: Arc<Vec<(u64, u64)>>,
    relinks: Arc<Relinks>,
    end: u64,
    live: usize,
    uid: u64,
}

impl Snapshot {
    /// Live events at the cut.
    pub fn len(&self) -> usize {
        self.live
    }

    /// No live events at the cut?
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The cut: every event of the snapshot has a smaller sequence number,
    /// every event stored later a larger or equal one.
    pub fn end_seq(&self) -> u64 {
        self.end
    }

    /// [`EventStore::scan`] over the snapshot: calls `f` on up to `max`
    /// live events (as of the cut) in store order from sequence number
    /// `from` on; returns where to continue, or `None` at the end.
    pub fn scan<'a>(
        &'a self,
        from: u64,
        max: usize,
        mut f: impl FnMut(&StoredEvent<'a>),
    ) -> Option<u64> {
        let start = self
            .segs
            .partition_point(|s| s.base + s.data.recs.len() as u64 <= from);
        let mut seen = 0usize;
        for seg in &self.segs[start..] {
            let d: &SegData = &seg.data;
            for i in from.saturating_sub(seg.base) as usize..d.recs.len() {
                if seg.is_dead(i) {
                    continue;
                }
                if seen >= max {
                    return Some(seg.base + i as u64);
                }
                f(&view_rec(&self.names, &self.relinks, seg.base, d, i));
                seen += 1;
            }
        }
        None
    }
}

/// Entry points of index chains into a [`Snapshot`]'s cut
/// ([`EventStore::cut_heads`]): per key, `Some(newest seq below the cut
/// in its bucket chain, or None)`, or `None` when unknown.
#[derive(Clone, Debug, Default)]
pub struct CutHeads {
    ids: FastMap<u64, Option<Option<u64>>>,
    corrs: FastMap<u64, Option<Option<u64>>>,
}

impl Snapshot {
    fn locate(&self, seq: u64) -> Option<(usize, usize)> {
        let k = self.segs.partition_point(|s| s.base <= seq);
        let s = self.segs.get(k.checked_sub(1)?)?;
        let i = (seq - s.base) as usize;
        (i < s.data.recs.len()).then_some((k - 1, i))
    }

    #[inline]
    fn view(&self, si: usize, i: usize) -> StoredEvent<'_> {
        let s = &self.segs[si];
        view_rec(&self.names, &self.relinks, s.base, &s.data, i)
    }

    /// Walks a chain from `head`, newest first, while `f` returns true.
    fn walk(
        &self,
        head: Option<u64>,
        link: fn(&Rec) -> u32,
        mut f: impl FnMut(usize, usize) -> bool,
    ) {
        let mut cur = head;
        while let Some(seq) = cur {
            let Some((si, i)) = self.locate(seq) else {
                break;
            };
            if !f(si, i) {
                break;
            }
            let d = link(&self.segs[si].data.recs[i]) as u64;
            cur = (d != 0 && d <= seq).then(|| seq - d);
        }
    }

    /// The live event `id` at the cut ([`EventStore::get`] over the
    /// snapshot), through the entry point `heads` holds for it; `None`
    /// when the entry is unknown or was not asked for (the caller then
    /// scans: see [`EventStore::cut_heads`]).
    pub fn get_at_cut(&self, heads: &CutHeads, id: u64) -> Option<Option<StoredEvent<'_>>> {
        let head = (*heads.ids.get(&id)?)?;
        let mut found = None;
        self.walk(
            head,
            |r| r.link_id,
            |si, i| {
                let s = &self.segs[si];
                if s.data.recs[i].id == id && !s.is_dead(i) {
                    found = Some((si, i));
                    false
                } else {
                    true
                }
            },
        );
        Some(found.map(|(si, i)| self.view(si, i)))
    }

    /// The first `limit` live events (store order) whose correlation id at
    /// the cut is `c` ([`EventStore::by_correlation`] ascending, over the
    /// snapshot), through `heads`; `None` when unknown (as
    /// [`Snapshot::get_at_cut`]).
    pub fn by_correlation_at_cut(
        &self,
        heads: &CutHeads,
        c: u64,
        limit: usize,
    ) -> Option<Vec<StoredEvent<'_>>> {
        let head = (*heads.corrs.get(&c)?)?;
        let mut seqs: Vec<(usize, usize)> = Vec::new();
        self.walk(
            head,
            |r| r.link_corr,
            |si, i| {
                let s = &self.segs[si];
                let seq = s.base + i as u64;
                if !s.is_dead(i)
                    && s.data.corr(i) == c
                    && (self.relinks.is_empty() || self.relinks.get(seq).is_none())
                {
                    seqs.push((si, i));
                }
                true
            },
        );
        seqs.reverse();
        seqs.extend(
            self.relinks
                .seqs(c)
                .iter()
                .filter_map(|&seq| self.locate(seq))
                .filter(|&(si, i)| !self.segs[si].is_dead(i)),
        );
        seqs.sort_unstable();
        seqs.truncate(limit);
        Some(seqs.into_iter().map(|(si, i)| self.view(si, i)).collect())
    }
}

/// A source of events in store order: an [`EventStore`] (under its lock)
/// or a [`Snapshot`] (without it). Whole-trace passes
/// ([`crate::analysis`]) take either.
pub trait Scan {
    /// Calls `f` on up to `max` live events in store order from sequence
    /// number `from` on; returns the sequence number to continue from, or
    /// `None` when the scan reached the newest event.
    fn scan_events<'a>(
        &'a self,
        from: u64,
        max: usize,
        f: impl FnMut(&StoredEvent<'a>),
    ) -> Option<u64>;
}

impl Scan for EventStore {
    fn scan_events<'a>(
        &'a self,
        from: u64,
        max: usize,
        f: impl FnMut(&StoredEvent<'a>),
    ) -> Option<u64> {
        self.scan(from, max, f)
    }
}

impl Scan for Snapshot {
    fn scan_events<'a>(
        &'a self,
        from: u64,
        max: usize,
        f: impl FnMut(&StoredEvent<'a>),
    ) -> Option<u64> {
        self.scan(from, max, f)
    }
}

/// First `p` in `0..n` for which `pred(p)` is false (`pred` monotone).
fn partition(n: usize, pred: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if pred(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod state_partition_tests {
    use super::state_partition;
    use std::collections::VecDeque;

    /// The interpolated search gives `partition_point`'s answer for evenly
    /// spread, clustered, duplicated and extreme timestamps, at every probe.
    #[test]
    fn same_as_partition_point() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..400 {
            let n = [0, 1, 5, 31, 32, 33, 100, 1000, 5000][case % 9];
            let mut ts: Vec<i64> = (0..n)
                .map(|k| match case % 5 {
                    0 => k as i64 * 100,
                    1 => (rnd() % 50) as i64,
                    2 => (rnd() as i64) >> (rnd() % 60),
                    3 if k % 2 == 0 => i64::MIN + k as i64,
                    3 => i64::MAX - k as i64,
                    _ => (k as i64).pow(3) + (rnd() % 3) as i64,
                })
                .collect();
            ts.sort();
            let mut recs: VecDeque<(i64, u64)> = VecDeque::new();
            for (k, &t) in ts.iter().enumerate().rev() {
                // Pushed at the front: the deque's storage wraps.
                recs.push_front((t, k as u64));
            }
            let mut probes: Vec<i64> = vec![i64::MIN, i64::MAX, 0, -1, 1];
            for _ in 0..50 {
                probes.push(if n > 0 && rnd() % 2 == 0 {
                    ts[(rnd() % n as u64) as usize].saturating_add((rnd() % 3) as i64 - 1)
                } else {
                    rnd() as i64
                });
            }
            for &t in &probes {
                for strict in [false, true] {
                    let want = recs.partition_point(|&(r, _)| if strict { r < t } else { r <= t });
                    assert_eq!(state_partition(&recs, t, strict), want, "case {case} t {t}");
                }
            }
        }
    }
}
