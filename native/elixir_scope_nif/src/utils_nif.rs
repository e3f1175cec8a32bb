//! `utils_*` NIFs: `ElixirScope.Utils`'s clocks and time ids.
//!
//! The clocks are the ring's (`ring_nif::now_ns`): the OS monotonic clock
//! plus offsets to the VM's monotonic and wall clocks, refreshed every
//! millisecond, so a reading costs one vDSO `clock_gettime` instead of the
//! VM's locked time call. Time ids are `TIME_ID_BASE + (monotonic ns -
//! origin)` made unique by `elixir_scope_core::next_time_id`; the origin is
//! the monotonic time at load, so an id reads back as the monotonic
//! timestamp of its creation.

use elixir_scope_core::{next_time_id, TIME_ID_BASE};
use std::sync::atomic::{AtomicI64, Ordering};

use crate::ring_nif::{monotonic_now_ns, now_ns};

/// Monotonic time (ns, VM clock) at load, minus one: time ids count from it.
static ORIGIN: AtomicI64 = AtomicI64::new(0);

/// Fixes the time-id origin; called from `load`.
pub fn init() {
    ORIGIN.store(monotonic_now_ns() - 1, Ordering::Relaxed);
}

/// `System.monotonic_time(:nanosecond)`, from the native clock.
#[rustler::nif]
fn utils_monotonic_ns() -> i64 {
    monotonic_now_ns()
}

/// `System.system_time(:nanosecond)`, from the native clock.
#[rustler::nif]
fn utils_wall_ns() -> i64 {
    now_ns().1
}

/// A unique time id (see the module docs).
#[rustler::nif]
fn utils_generate_id() -> u64 {
    let since = monotonic_now_ns() - ORIGIN.load(Ordering::Relaxed);
    next_time_id(since.max(0) as u64)
}

/// The monotonic timestamp (ns) a time id was created at. The Elixir side
/// only passes ids in `TIME_ID_BASE..TIME_ID_LIMIT`.
#[rustler::nif]
fn utils_id_timestamp(id: u64) -> i64 {
    (id.saturating_sub(TIME_ID_BASE) as i64).saturating_add(ORIGIN.load(Ordering::Relaxed))
}
