//! ElixirScope Native engine: the capture-side data structures of the
//! ElixirScope time-travel debugger, in pure Rust (no BEAM dependency).
//!
//! * [`ring`] — a bounded, lock-free, multi-producer ring with a
//!   consumption cursor and exact drop accounting;
//! * [`event`] — the native event record stored in it;
//! * [`correlator`] — call stacks, message matching, process tree (used by
//!   the pipeline's workers);
//! * [`store`] — the bounded, indexed in-memory store of correlated events;
//! * [`pool`] — native worker threads draining ring shards in batches;
//! * [`pipeline`] — sharded rings, pool, correlator and store put together,
//!   with the accounting identity;
//! * [`analysis`] — whole-trace questions over a store: call statistics,
//!   repeated call trees, message flow;
//! * [`filter`] — the event filter shared by subscriptions and queries;
//! * [`subscribe`] — live subscriptions to a pipeline's stored events;
//! * [`query`] — multi-dimensional queries planned on the most selective
//!   index, and correlation search;
//! * [`tape`] — the grammar of the term tapes stored in payloads;
//! * [`tracefile`] — the versioned, portable trace file format: saving a
//!   store, reading, validating and merging files.
#![deny(missing_docs)]

pub mod analysis;
pub mod clock;
pub mod correlator;
pub mod event;
pub mod export;
pub mod filter;
mod hash;
pub mod pipeline;
pub mod pool;
pub mod query;
pub mod ring;
pub mod store;
pub mod subscribe;
mod sync;
pub mod tape;
pub mod tracefile;

pub use correlator::{
    CorrInput, CorrKind, CorrType, Correlation, Correlator, CorrelatorConfig, CorrelatorDump,
    CorrelatorMetrics, LateLink, Link, LinkKind, Links, StackDump,
};
pub use event::{
    is_runtime_struct, is_state_record, next_event_id, next_time_id, peer_is_event,
    reserve_event_ids, state_sets, Callback, Event, EventKind, CALLBACK_MASK, FLAG_RUNTIME_STRUCT,
    FLAG_SETS_DATA, FLAG_SETS_NAME, FLAG_STATEM, FLAG_STOP, FLAG_TRUNCATED, TIME_ID_BASE,
    TIME_ID_LIMIT,
};
pub use hash::hash_bytes;
pub use pipeline::{
    call_contents, corr_type_of, link_of, links_of, shard_of, Accounting, Clock, Engine,
    EngineMetrics, Histogram, Pipeline, PipelineConfig,
};
pub use pool::{
    BreakerMetrics, BreakerState, DeadLetter, LeaseState, Leases, PoolConfig, PoolMetrics, Stage,
    StageCtx, WorkerPool, MAX_LEASES, SHUTDOWN_DRAIN_TIMEOUT,
};
pub use ring::{Full, Overflow, ReadOutcome, Ring, RingError, RingStats, MAX_CAPACITY};
pub use store::{
    CorrelationFields, CutHeads, EventStore, IndexSizes, InsertOutcome, Order, Scan, Snapshot,
    StateAt, StateView, StoreConfig, StoreStats, StoredEvent, TermKeys, TERM_FLAG_FUNCTION,
};
