//! Native handles: resource types opened directly with the NIF API.
//!
//! A handle's resource object holds one pointer to a boxed `T`. Decoding a
//! handle is a single `enif_get_resource` with a cached type pointer (no
//! per-call type lookup), which matters on the per-event write path.
//! Dropping a large `T` happens off the scheduler thread.

use rustler::sys::{
    c_void, enif_alloc_resource, enif_get_resource, enif_make_resource, enif_open_resource_type,
    enif_release_resource, ErlNifEnv, ErlNifResourceFlags, ErlNifResourceType,
};
use rustler::{Decoder, Env, Error, NifResult, Term};
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A Rust value owned by an Erlang resource.
pub trait Handle: Sized + Send + Sync + 'static {
    /// Resource type name (unique in this library).
    const NAME: &'static CStr;
    /// Where the opened resource type is kept.
    fn type_slot() -> &'static AtomicPtr<ErlNifResourceType>;
    /// Should dropping this value run on a helper thread (it may take
    /// longer than a scheduler should be held)?
    fn drop_off_scheduler(&self) -> bool {
        false
    }
}

unsafe extern "C" fn destructor<T: Handle>(_env: *mut ErlNifEnv, obj: *mut c_void) {
    // SAFETY: `obj` is a resource object created by `make::<T>`, holding the
    // pointer produced by `Box::into_raw`; the VM calls this exactly once.
    let boxed = unsafe { Box::from_raw(*(obj as *mut *mut T)) };
    if boxed.drop_off_scheduler() {
        // Never block a scheduler freeing a big structure.
        if std::thread::Builder::new()
            .name("elixir_scope_drop".into())
            .spawn(move || {
                drop(boxed);
                return_freed_memory();
            })
            .is_err()
        {
            // Could not spawn: nothing else to do but drop here.
        }
    } else {
        drop(boxed);
    }
}

/// Gives the memory freed by dropping a big structure back to the OS:
/// glibc keeps freed heap memory (the store's segments are freed in
/// blocks of a few hundred KiB, under its mmap threshold once that has
/// adapted) until `malloc_trim` releases it. A no-op on other libcs.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: glibc's malloc_trim may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Open `T`'s resource type; call from the NIF `load` callback.
pub fn open<T: Handle>(env: Env) -> bool {
    // SAFETY: called during load with the load env; the name is a static C
    // string; the destructor matches the object layout used by `make`.
    let typ = unsafe {
        enif_open_resource_type(
            env.as_c_arg(),
            std::ptr::null(),
            T::NAME.as_ptr(),
            Some(destructor::<T>),
            ErlNifResourceFlags::ERL_NIF_RT_CREATE,
            std::ptr::null_mut(),
        )
    };
    if typ.is_null() {
        return false;
    }
    T::type_slot().store(typ as *mut _, Ordering::Release);
    true
}

/// Wrap `value` in a new resource term.
pub fn make<T: Handle>(env: Env, value: T) -> Term {
    let typ = T::type_slot().load(Ordering::Acquire);
    let ptr = Box::into_raw(Box::new(value));
    // SAFETY: the type was opened at load; the object holds one pointer,
    // written before the term is made; releasing our reference leaves the
    // term as the only owner.
    unsafe {
        let obj = enif_alloc_resource(typ, std::mem::size_of::<*mut T>()) as *mut *mut T;
        obj.write(ptr);
        let term = enif_make_resource(env.as_c_arg(), obj as *const c_void);
        enif_release_resource(obj as *const c_void);
        Term::new(env, term)
    }
}

/// A borrowed handle decoded from a NIF argument.
pub struct Ref<'a, T>(&'a T);

impl<T> std::ops::Deref for Ref<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        self.0
    }
}

impl<'a, T: Handle> Decoder<'a> for Ref<'a, T> {
    #[inline]
    fn decode(term: Term<'a>) -> NifResult<Self> {
        let typ = T::type_slot().load(Ordering::Relaxed);
        let mut obj: *const c_void = std::ptr::null();
        // SAFETY: valid env/term; on success `obj` points at our one-pointer
        // object, and the box outlives `term` (the term keeps the resource
        // alive for the duration of the call).
        unsafe {
            if enif_get_resource(term.get_env().as_c_arg(), term.as_c_arg(), typ, &mut obj) == 0 {
                return Err(Error::BadArg);
            }
            Ok(Ref(&**(obj as *const *const T)))
        }
    }
}

/// An extra reference to a resource object, so a Rust thread can keep it
/// alive and put it in messages (as the same term `make` returned).
/// Released when dropped (from any thread).
pub struct Kept<T: Handle> {
    obj: *const c_void,
    _t: std::marker::PhantomData<T>,
}

// SAFETY: the object is reference counted by the VM (keep/release are
// thread-safe) and `T: Send + Sync`.
unsafe impl<T: Handle> Send for Kept<T> {}
unsafe impl<T: Handle> Sync for Kept<T> {}

impl<T: Handle> Kept<T> {
    /// The resource term, in `env`.
    pub fn term<'a>(&self, env: Env<'a>) -> Term<'a> {
        // SAFETY: `obj` is a live resource object (we hold a reference).
        unsafe { Term::new(env, enif_make_resource(env.as_c_arg(), self.obj)) }
    }
}

impl<T: Handle> Drop for Kept<T> {
    fn drop(&mut self) {
        // SAFETY: balances the `enif_keep_resource` of `keep`.
        unsafe { enif_release_resource(self.obj) };
    }
}

/// Keep the resource behind `term` (a `T` handle) alive: `None` if it is
/// not one.
pub fn keep<T: Handle>(term: Term) -> Option<Kept<T>> {
    let typ = T::type_slot().load(Ordering::Relaxed);
    let mut obj: *const c_void = std::ptr::null();
    // SAFETY: valid env/term; on success `obj` is a live resource object of
    // type `T`, and `enif_keep_resource` adds the reference `Kept` releases.
    unsafe {
        if enif_get_resource(term.get_env().as_c_arg(), term.as_c_arg(), typ, &mut obj) == 0 {
            return None;
        }
        rustler::sys::enif_keep_resource(obj);
    }
    Some(Kept {
        obj,
        _t: std::marker::PhantomData,
    })
}
