//! Writer processes: the leases that tie a pool's native worker threads to
//! the Elixir processes standing for them (`AsyncWriterPool.Worker`), and
//! the kept read positions of `AsyncWriter`s.
//!
//! * **Leases.** `pipe_worker_lease/2` makes the calling process the owner
//!   of one worker index of a pipeline's pool and monitors it: when the
//!   process dies, the `down` callback orphans the lease and the worker
//!   thread parks after its batch, its shards left at their cursors, until a
//!   new owner (the restarted process) takes the lease and the thread
//!   resumes where they stand (`elixir_scope_core::pool`, "Leases").
//! * **Writer cursors.** An `AsyncWriter`'s position and counters live in
//!   the ring resource (keyed by the writer's cursor key), not in the
//!   process, and are updated inside the same NIF call that reads the
//!   events, so a writer killed at any point and started again over the
//!   same ring continues exactly where the last call left off: at the
//!   ring's cursor, or in the middle of a replay. A replay
//!   (`AsyncWriter.set_position/2` behind the cursor) re-reads, without
//!   consuming, events the ring still holds.

use elixir_scope_core::{Event, LeaseState, Leases, Ring, MAX_LEASES};
use rustler::types::map::map_new;
use rustler::{
    Atom, Binary, Encoder, Env, LocalPid, Monitor, NifResult, Resource, ResourceArc, Term,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::atoms;
use crate::error::badarg;
use crate::handle::Ref;
use crate::pipe_nif::PipeRes;
use crate::ring_nif::{monotonic_now_ns, RingRes};

rustler::atoms! {
    free,
    held,
    orphaned,
    in_use,
    not_held,
    consume,
    replay,
    skip,
    idle,
}

/// Most events one `pipe_writer_step` call reads (or skips).
const MAX_STEP: usize = 10_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---- worker leases -----------------------------------------------------------

/// One worker index's lease, held by the process that monitors it.
pub struct LeaseRes {
    leases: Arc<Leases>,
    index: usize,
    gen: u64,
}

#[rustler::resource_impl]
impl Resource for LeaseRes {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, _monitor: Monitor) {
        // The owner died: its worker parks after its batch (a no-op if the
        // lease was released or taken over since).
        self.leases.orphan(self.index, self.gen);
    }
}

/// Make the caller the owner of worker `index`'s lease: `{:ok, lease}`.
/// The worker thread runs while the caller lives; its death parks it.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_worker_lease<'a>(env: Env<'a>, p: Ref<PipeRes>, index: u64) -> NifResult<Term<'a>> {
    if index as usize >= MAX_LEASES {
        return badarg(env, format!("worker index must be below {MAX_LEASES}"));
    }
    let pipe = p.pipeline(env)?;
    let index = index as usize;
    let gen = match pipe.pool().hold(index) {
        Some(g) => g,
        None => return badarg(env, "worker index out of range"),
    };
    let lease = ResourceArc::new(LeaseRes {
        leases: pipe.pool().leases(),
        index,
        gen,
    });
    if lease.monitor(Some(env), &env.pid()).is_none() {
        // The caller is exiting: nobody stands for the worker.
        lease.leases.orphan(index, gen);
    }
    Ok((atoms::ok(), lease).encode(env))
}

/// Give a lease back (its worker runs freely): `true` if it was still held
/// by this lease.
#[rustler::nif]
fn pipe_worker_release(lease: ResourceArc<LeaseRes>) -> bool {
    lease.leases.release(lease.index, lease.gen)
}

/// Free worker `index`'s orphaned lease (the index gets no new owner, e.g.
/// the pool shrank): `true` if it was orphaned.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_worker_forget(env: Env, p: Ref<PipeRes>, index: u64) -> NifResult<bool> {
    let pipe = p.pipeline(env)?;
    Ok(pipe.pool().leases().forget_orphan(index as usize))
}

/// `{workers, [{events, batches, errors, lease}], [shard read positions]}`
/// (lease: `:free | :held | :orphaned`), cheap enough to call per query.
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_workers<'a>(env: Env<'a>, p: Ref<PipeRes>) -> NifResult<Term<'a>> {
    let pipe = p.pipeline(env)?;
    let m = pipe.pool().metrics();
    let leases = pipe.pool().leases();
    let per: Vec<Term> = m
        .per_worker
        .iter()
        .zip(m.per_worker_errors.iter())
        .zip(m.per_worker_last_poll.iter())
        .enumerate()
        .map(|(i, ((&(e, b), &err), &last))| {
            let st = match leases.state(i) {
                LeaseState::Free => free(),
                LeaseState::Held(_) => held(),
                LeaseState::Orphaned => orphaned(),
            };
            // When it last polled, on the VM's monotonic clock (ns).
            let last_poll = last.map(|ago| {
                monotonic_now_ns().saturating_sub(ago.as_nanos().min(i64::MAX as u128) as i64)
            });
            (e as u64, b as u64, err as u64, st, last_poll).encode(env)
        })
        .collect();
    let positions: Vec<u64> = pipe.shards().iter().map(|r| r.read_position()).collect();
    Ok((m.workers as u64, per, positions).encode(env))
}

// ---- writer cursors ----------------------------------------------------------

/// The kept state of one `AsyncWriter` (see the module docs).
#[derive(Default)]
struct CursorState {
    owner: Option<LocalPid>,
    /// Replay in progress: next position, end (exclusive).
    replay: Option<(u64, u64)>,
    /// Consume without processing up to this position.
    skip_to: u64,
    /// Read at the cursor and processed (or dead-lettered).
    consumed: u64,
    /// Read again behind the cursor by a replay.
    replayed: u64,
    /// Replay positions the ring no longer held.
    replay_missed: u64,
    /// Consumed without processing (skipped ahead).
    skipped: u64,
    /// Failed writes (tombstones) met at the cursor.
    missed: u64,
    /// Handed to the pipeline and stored there (or ignored as duplicates).
    processed: u64,
    /// Of batches that failed twice (counted dead-lettered by the pipeline).
    dead_lettered: u64,
    batches: u64,
    errors: u64,
    /// Processes that have claimed this cursor.
    claims: u64,
}

/// The writer cursors of one ring, by key.
#[derive(Default)]
pub struct Writers(Mutex<HashMap<Vec<u8>, Arc<Mutex<CursorState>>>>);

/// A claimed writer cursor (kept by the writer process).
pub struct CursorRes {
    state: Arc<Mutex<CursorState>>,
}

#[rustler::resource_impl]
impl Resource for CursorRes {}

fn single<'r>(env: Env, rb: &'r RingRes) -> NifResult<&'r Ring<Event>> {
    rb.check_live(env)?;
    if rb.shards.len() != 1 {
        return badarg(env, "the ring buffer must be a single-shard ring");
    }
    Ok(&rb.shards[0])
}

/// Claim the writer cursor `key` of a ring for the caller:
/// `{:ok, cursor, resumed?}` (`resumed?`: an earlier writer left it), or
/// `{:error, :in_use}` while another live process holds it.
#[rustler::nif(schedule = "DirtyCpu")]
fn rb_writer_claim<'a>(env: Env<'a>, rb: Ref<RingRes>, key: Binary) -> NifResult<Term<'a>> {
    single(env, &rb)?;
    let me = env.pid();
    let state = {
        let mut map = lock(&rb.writers.0);
        Arc::clone(map.entry(key.as_slice().to_vec()).or_default())
    };
    let mut st = lock(&state);
    if let Some(owner) = st.owner {
        if owner != me && env.is_process_alive(owner) {
            return Ok((atoms::error(), in_use()).encode(env));
        }
    }
    let resumed = st.claims > 0;
    st.owner = Some(me);
    st.claims += 1;
    drop(st);
    Ok((atoms::ok(), ResourceArc::new(CursorRes { state }), resumed).encode(env))
}

/// One step of a writer: skip, replay or consume up to `max` events and
/// hand what it read to the pipeline: `{what, read, gone}` with `what` in
/// `:skip | :replay | :consume | :idle`, `read` the events handled and
/// `gone` the positions passed without an event (overwritten or failed).
#[rustler::nif(schedule = "DirtyCpu")]
fn pipe_writer_step<'a>(
    env: Env<'a>,
    p: Ref<PipeRes>,
    rb: Ref<RingRes>,
    c: ResourceArc<CursorRes>,
    max: u64,
) -> NifResult<Term<'a>> {
    let pipe = p.pipeline(env)?;
    let ring = single(env, &rb)?;
    let max = (max as usize).clamp(1, MAX_STEP);
    let mut st = lock(&c.state);
    let cursor = ring.read_position();
    if st.skip_to > cursor {
        let want = ((st.skip_to - cursor) as usize).min(MAX_STEP);
        let out = ring.consume_batch(want, |_, _| {});
        st.skipped += out.delivered as u64;
        st.missed += out.missed;
        if out.delivered == 0 || out.next >= st.skip_to {
            st.skip_to = 0;
        }
        return Ok((skip(), out.delivered as u64, out.missed).encode(env));
    }
    st.skip_to = 0;
    let mut batch: Vec<Event> = Vec::with_capacity(max.min(1024));
    let (what, gone) = match st.replay {
        Some((pos, end)) => {
            let want = ((end - pos) as usize).min(max);
            let out = ring.peek_batch(pos, want, |q, ev| {
                if q < end {
                    batch.push(ev.clone())
                }
            });
            // A peek ends early only at the write position; past `end`
            // positions are not this replay's.
            let next = out.next.min(end).max(pos + batch.len() as u64);
            let gone = next - pos - batch.len() as u64;
            st.replay_missed += gone;
            st.replayed += batch.len() as u64;
            st.replay = if next >= end || (batch.is_empty() && gone == 0) {
                None
            } else {
                Some((next, end))
            };
            (replay(), gone)
        }
        None => {
            let out = ring.consume_batch(max, |_, ev| batch.push(ev.clone()));
            st.consumed += batch.len() as u64;
            st.missed += out.missed;
            (consume(), out.missed)
        }
    };
    if batch.is_empty() {
        let what = if gone == 0 && what == consume() {
            idle()
        } else {
            what
        };
        return Ok((what, 0u64, gone).encode(env));
    }
    let n = batch.len() as u64;
    match pipe.process_external(&batch) {
        Ok(()) => {
            st.processed += n;
            st.batches += 1;
        }
        Err(_) => {
            st.dead_lettered += n;
            st.errors += 1;
        }
    }
    Ok((what, n, gone).encode(env))
}

/// Move a writer: behind the ring's cursor starts a replay of what the ring
/// still holds from `position` on (`{:error, {:not_held, oldest}}` if it
/// no longer holds `position`), at the cursor ends a replay, ahead of it
/// skips (consumes without processing) up to `position`: `:ok`.
#[rustler::nif(schedule = "DirtyCpu")]
fn rb_writer_set_position<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    c: ResourceArc<CursorRes>,
    position: u64,
) -> NifResult<Term<'a>> {
    let ring = single(env, &rb)?;
    let mut st = lock(&c.state);
    let cursor = ring.read_position();
    let head = ring.write_position();
    let oldest = head.saturating_sub(ring.capacity());
    if position < cursor {
        if position < oldest {
            return Ok((atoms::error(), (not_held(), oldest)).encode(env));
        }
        st.replay = Some((position, cursor));
        st.skip_to = 0;
    } else {
        st.replay = None;
        st.skip_to = if position > cursor { position } else { 0 };
    }
    Ok(atoms::ok().encode(env))
}

/// A writer's position and counters: `%{position, cursor, replay_end,
/// skip_to, consumed, replayed, replay_missed, skipped, missed, processed,
/// dead_lettered, batches, errors, claims}` (`replay_end` nil outside a
/// replay; `position` is where its next read starts).
#[rustler::nif(schedule = "DirtyCpu")]
fn rb_writer_info<'a>(
    env: Env<'a>,
    rb: Ref<RingRes>,
    c: ResourceArc<CursorRes>,
) -> NifResult<Term<'a>> {
    let ring = single(env, &rb)?;
    let st = lock(&c.state);
    let cursor = ring.read_position();
    let (position, replay_end) = match st.replay {
        Some((p, e)) => (p, Some(e)),
        None => (cursor, None),
    };
    let key = |name: &str| Atom::from_str(env, name).expect("atom");
    let mut m = map_new(env);
    for (k, v) in [
        ("position", position),
        ("cursor", cursor),
        ("skip_to", st.skip_to),
        ("consumed", st.consumed),
        ("replayed", st.replayed),
        ("replay_missed", st.replay_missed),
        ("skipped", st.skipped),
        ("missed", st.missed),
        ("processed", st.processed),
        ("dead_lettered", st.dead_lettered),
        ("batches", st.batches),
        ("errors", st.errors),
        ("claims", st.claims),
    ] {
        m = m.map_put(key(k), v)?;
    }
    m.map_put(key("replay_end"), replay_end)
}
