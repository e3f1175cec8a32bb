//! Store snapshots for chunked whole-trace passes: `ana_snapshot` takes a
//! consistent cut of a store ([`elixir_scope_core::Snapshot`]) under the
//! store lock (briefly) and returns it as a handle; chunked scans
//! (`ana_select`, `ana_messages`) then read it without the store lock
//! (`ana_messages` takes it briefly per chunk for index entry points), so
//! ingest into the
//! store goes on while they run, and every chunk sees the same cut.
//! `ana_snapshot_release` frees it at once (the memory of segments the
//! store has freed since the cut is held until then, or until the handle
//! is garbage-collected).

use elixir_scope_core::{EventStore, Snapshot};
use rustler::sys::ErlNifResourceType;
use rustler::{Atom, Env, NifResult, Term};
use std::ffi::CStr;
use std::sync::atomic::AtomicPtr;
use std::sync::{Arc, Mutex};

use crate::atoms;
use crate::error::badarg;
use crate::handle::{self, Handle, Ref};
use crate::store_nif::StoreRes;

/// A snapshot handle; `None` once released. Keeps the store it was cut
/// from, for the index lookups of `ana_messages` (a destroyed store is
/// replaced by an empty one, which the lookups tell apart).
pub struct SnapRes {
    snap: Mutex<Option<Arc<Snapshot>>>,
    store: Arc<Mutex<EventStore>>,
}

static SNAP_TYPE: AtomicPtr<ErlNifResourceType> = AtomicPtr::new(std::ptr::null_mut());

impl Handle for SnapRes {
    const NAME: &'static CStr = c"elixir_scope_snapshot";
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType> {
        &SNAP_TYPE
    }
    fn drop_off_scheduler(&self) -> bool {
        // It may hold the last reference to segments the store freed.
        true
    }
}

impl SnapRes {
    /// The snapshot, or an `ArgumentError` once released.
    /// The store the snapshot was cut from.
    pub(crate) fn store(&self) -> &Arc<Mutex<EventStore>> {
        &self.store
    }

    pub(crate) fn get(&self, env: Env) -> NifResult<Arc<Snapshot>> {
        let g = self.snap.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some(s) => Ok(Arc::clone(s)),
            None => badarg(env, "the store snapshot has been released"),
        }
    }
}

/// A consistent cut of the store (see the module documentation). Runs on
/// a dirty scheduler: the cut copies the open segment and the dead-record
/// bits of partly dead segments.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_snapshot<'a>(env: Env<'a>, s: Ref<StoreRes>) -> NifResult<Term<'a>> {
    let snap = s.lock(env)?.snapshot();
    Ok(handle::make(
        env,
        SnapRes {
            snap: Mutex::new(Some(Arc::new(snap))),
            store: Arc::clone(s.shared_store(env)?),
        },
    ))
}

/// Frees the snapshot now (later use raises `ArgumentError`). Dirty: the
/// snapshot may hold the last reference to many freed segments.
#[rustler::nif(schedule = "DirtyCpu")]
fn ana_snapshot_release(s: Ref<SnapRes>) -> Atom {
    let old = s.snap.lock().unwrap_or_else(|p| p.into_inner()).take();
    if old.is_some() {
        drop(old);
        handle::return_freed_memory();
    }
    atoms::ok()
}
