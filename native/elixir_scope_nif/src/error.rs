//! Error mapping: bad arguments raise `ArgumentError` with a message naming
//! the problem; expected failures are `{:error, reason}` tuples.

use rustler::types::map::map_new;
use rustler::{Encoder, Env, Error, Term};

use crate::atoms;

/// An `ArgumentError` exception term carrying `msg`.
fn argument_error<'a>(env: Env<'a>, msg: &str) -> Term<'a> {
    map_new(env)
        .map_put(atoms::struct_(), atoms::argument_error())
        .and_then(|m| m.map_put(atoms::exception_(), true))
        .and_then(|m| m.map_put(atoms::message(), msg))
        .unwrap_or_else(|_| atoms::error().encode(env))
}

/// `Err` that raises `ArgumentError` with `msg`.
pub fn badarg<T>(env: Env, msg: impl AsRef<str>) -> Result<T, Error> {
    Err(badarg_err(env, msg))
}

/// The error that raises `ArgumentError` with `msg`.
pub fn badarg_err(env: Env, msg: impl AsRef<str>) -> Error {
    let term = argument_error(env, msg.as_ref());
    Error::RaiseTerm(Box::new(SavedTerm(term.as_c_arg())))
}

/// A term of the calling env, re-encoded as itself.
struct SavedTerm(rustler::sys::ErlNifTerm);

// SAFETY-free: the wrapped word is only re-encoded into the same env that
// produced it, before the NIF returns (rustler raises it immediately).
unsafe impl Send for SavedTerm {}
unsafe impl Sync for SavedTerm {}

impl Encoder for SavedTerm {
    fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        // SAFETY: see above: the term belongs to `env`.
        unsafe { Term::new(env, self.0) }
    }
}
