//! Match specifications evaluated natively: the payload filters of live
//! subscriptions (`args:` of a call, `message:` of a send or receive).
//!
//! A specification `[{head, guards, body}]` is compiled once, at subscribe
//! time, into a pattern tree and guard expressions whose literals are
//! copied into an environment the matcher owns. Matching decodes the one
//! payload field it needs into a per-thread environment (cleared after each
//! event) and walks it with the NIF API, so comparisons follow the VM's own
//! term order (`enif_compare`, `enif_is_identical`).
//!
//! Supported, as in `:ets` and trace match specifications: heads with
//! literals, `:_`, `:"$N"` variables (a repeated variable must be bound to
//! equal terms), tuples, lists (also improper) and maps (the listed keys
//! must be present; keys are literals); guards with the comparison
//! operators, `and`/`or`/`xor`/`not`/`andalso`/`orelse`, the type tests,
//! `element`, `hd`, `tl`, `length`, `tuple_size`, `map_size`, `map_get`,
//! `is_map_key`, `abs`, `+`, `-`, `*`, `div`, `rem` on integers, `{:const,
//! term}` and `{{...}}` tuple construction. A guard that fails (a bad
//! argument) is false, as in the VM. The body is not used: a clause matches
//! when its head matches and its guards are true. Anything else is refused
//! at compile time with a message naming it.

use rustler::env::OwnedEnv;
use rustler::sys::{
    enif_compare, enif_get_int64, enif_get_list_cell, enif_get_list_length, enif_get_map_size,
    enif_get_map_value, enif_get_tuple, enif_is_identical, enif_make_copy, enif_make_int64,
    enif_term_type, ErlNifEnv, ErlNifTerm as ERL_NIF_TERM, ErlNifTermType,
};
use rustler::{Atom, Env, Term};
use std::cell::RefCell;

use crate::atoms;
use crate::codec::{Scratch, TapeDecoder};

/// Most distinct `$N` variables in one clause.
const MAX_VARS: usize = 64;
/// Deepest pattern or guard nesting accepted.
const MAX_DEPTH: u32 = 64;

#[derive(Debug)]
enum Pat {
    Any,
    Var(usize),
    Lit(ERL_NIF_TERM),
    Tuple(Vec<Pat>),
    Cons(Box<Pat>, Box<Pat>),
    Map(Vec<(ERL_NIF_TERM, Pat)>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    ExactEq,
    ExactNe,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    Xor,
    Not,
    AndAlso,
    OrElse,
    IsAtom,
    IsInteger,
    IsFloat,
    IsNumber,
    IsBinary,
    IsList,
    IsTuple,
    IsMap,
    IsPid,
    IsReference,
    IsFunction,
    IsPort,
    IsBoolean,
    Element,
    Hd,
    Tl,
    Length,
    TupleSize,
    MapSize,
    MapGet,
    IsMapKey,
    Abs,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

const OPS: &[(&str, Op, usize)] = &[
    ("==", Op::Eq, 2),
    ("/=", Op::Ne, 2),
    ("=:=", Op::ExactEq, 2),
    ("=/=", Op::ExactNe, 2),
    ("<", Op::Lt, 2),
    ("=<", Op::Le, 2),
    (">", Op::Gt, 2),
    (">=", Op::Ge, 2),
    ("and", Op::And, 2),
    ("or", Op::Or, 2),
    ("xor", Op::Xor, 2),
    ("not", Op::Not, 1),
    ("andalso", Op::AndAlso, 2),
    ("orelse", Op::OrElse, 2),
    ("is_atom", Op::IsAtom, 1),
    ("is_integer", Op::IsInteger, 1),
    ("is_float", Op::IsFloat, 1),
    ("is_number", Op::IsNumber, 1),
    ("is_binary", Op::IsBinary, 1),
    ("is_list", Op::IsList, 1),
    ("is_tuple", Op::IsTuple, 1),
    ("is_map", Op::IsMap, 1),
    ("is_pid", Op::IsPid, 1),
    ("is_reference", Op::IsReference, 1),
    ("is_function", Op::IsFunction, 1),
    ("is_port", Op::IsPort, 1),
    ("is_boolean", Op::IsBoolean, 1),
    ("element", Op::Element, 2),
    ("hd", Op::Hd, 1),
    ("tl", Op::Tl, 1),
    ("length", Op::Length, 1),
    ("tuple_size", Op::TupleSize, 1),
    ("map_size", Op::MapSize, 1),
    ("map_get", Op::MapGet, 2),
    ("is_map_key", Op::IsMapKey, 2),
    ("abs", Op::Abs, 1),
    ("+", Op::Add, 2),
    ("-", Op::Sub, 2),
    ("*", Op::Mul, 2),
    ("div", Op::Div, 2),
    ("rem", Op::Rem, 2),
];

#[derive(Debug)]
enum Expr {
    Var(usize),
    Lit(ERL_NIF_TERM),
    Tuple(Vec<Expr>),
    Call(Op, Vec<Expr>),
}

#[derive(Debug)]
struct Clause {
    head: Pat,
    guards: Vec<Expr>,
}

/// A compiled match specification.
pub struct MatchSpec {
    clauses: Vec<Clause>,
    /// Holds the literals the clauses refer to.
    _lits: OwnedEnv,
}

// SAFETY: the literals' environment is written only while compiling (one
// thread, before the matcher is shared); afterwards its terms are only read,
// which the VM allows from any thread.
unsafe impl Send for MatchSpec {}
unsafe impl Sync for MatchSpec {}

/// Why a specification was refused.
pub type CompileError = String;

struct Compiler<'a> {
    env: Env<'a>,
    lits: *mut ErlNifEnv,
    vars: usize,
}

fn atom_name(t: Term) -> Option<String> {
    t.atom_to_string().ok()
}

/// `Some(n)` for the atom `:"$n"`.
fn var_index(t: Term) -> Option<Result<usize, CompileError>> {
    let name = atom_name(t)?;
    let digits = name.strip_prefix('$')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(match digits.parse::<usize>() {
        Ok(n) if n < MAX_VARS => Ok(n),
        _ => Err(format!(
            "variable {name} out of range (at most $0..${})",
            MAX_VARS - 1
        )),
    })
}

impl Compiler<'_> {
    fn lit(&self, t: Term) -> ERL_NIF_TERM {
        // SAFETY: `lits` is the matcher's live environment; `t` is a term
        // of the calling env.
        unsafe { enif_make_copy(self.lits, t.as_c_arg()) }
    }

    fn pat(&mut self, t: Term, depth: u32) -> Result<Pat, CompileError> {
        if depth > MAX_DEPTH {
            return Err("pattern nested too deeply".into());
        }
        if t.is_atom() {
            if atom_name(t).as_deref() == Some("_") {
                return Ok(Pat::Any);
            }
            if let Some(v) = var_index(t) {
                let v = v?;
                self.vars = self.vars.max(v + 1);
                return Ok(Pat::Var(v));
            }
            return Ok(Pat::Lit(self.lit(t)));
        }
        if t.is_tuple() {
            let elems = rustler::types::tuple::get_tuple(t).map_err(|_| "bad tuple")?;
            let mut out = Vec::with_capacity(elems.len());
            for e in elems {
                out.push(self.pat(e, depth + 1)?);
            }
            return Ok(Pat::Tuple(out));
        }
        if let Ok((h, tl)) = t.list_get_cell() {
            let h = self.pat(h, depth + 1)?;
            let tl = self.pat(tl, depth + 1)?;
            return Ok(Pat::Cons(Box::new(h), Box::new(tl)));
        }
        if t.is_map() {
            let mut out = Vec::new();
            let iter = rustler::types::map::MapIterator::new(t).ok_or("bad map")?;
            for (k, v) in iter {
                if k.is_atom() && (atom_name(k).as_deref() == Some("_") || var_index(k).is_some()) {
                    return Err("map keys in a match specification must be literals".into());
                }
                out.push((self.lit(k), self.pat(v, depth + 1)?));
            }
            return Ok(Pat::Map(out));
        }
        Ok(Pat::Lit(self.lit(t)))
    }

    fn expr(&mut self, t: Term, depth: u32) -> Result<Expr, CompileError> {
        if depth > MAX_DEPTH {
            return Err("guard nested too deeply".into());
        }
        if t.is_atom() {
            if let Some(v) = var_index(t) {
                let v = v?;
                if v >= self.vars {
                    return Err(format!("guard variable ${v} is not bound in the head"));
                }
                return Ok(Expr::Var(v));
            }
            if matches!(atom_name(t).as_deref(), Some("$_" | "$$" | "_")) {
                return Err("'$_', '$$' and '_' cannot be used in a guard".into());
            }
            return Ok(Expr::Lit(self.lit(t)));
        }
        if t.is_tuple() {
            let elems = rustler::types::tuple::get_tuple(t).map_err(|_| "bad tuple")?;
            let Some(&first) = elems.first() else {
                return Ok(Expr::Lit(self.lit(t)));
            };
            // {{a, b}}: a tuple built from expressions.
            if elems.len() == 1 && first.is_tuple() {
                let inner = rustler::types::tuple::get_tuple(first).map_err(|_| "bad tuple")?;
                let mut out = Vec::with_capacity(inner.len());
                for e in inner {
                    out.push(self.expr(e, depth + 1)?);
                }
                return Ok(Expr::Tuple(out));
            }
            let name = atom_name(first).ok_or_else(|| {
                "a guard tuple must start with a function name (or be {{...}} or {:const, term})"
                    .to_string()
            })?;
            if name == "const" && elems.len() == 2 {
                return Ok(Expr::Lit(self.lit(elems[1])));
            }
            let args = &elems[1..];
            let Some(&(_, op, arity)) = OPS.iter().find(|(n, _, _)| *n == name) else {
                return Err(format!(
                    "unsupported guard function {name}/{} in a match specification",
                    args.len()
                ));
            };
            if arity != args.len() {
                return Err(format!("guard function {name} takes {arity} argument(s)"));
            }
            let mut out = Vec::with_capacity(args.len());
            for a in args {
                out.push(self.expr(*a, depth + 1)?);
            }
            return Ok(Expr::Call(op, out));
        }
        if t.is_list() && !t.is_empty_list() {
            return Err("lists in guards must be written as {:const, list}".into());
        }
        Ok(Expr::Lit(self.lit(t)))
    }
}

impl MatchSpec {
    /// Compiles `spec`, a list of `{head, guards, body}` clauses.
    pub fn compile(env: Env, spec: Term) -> Result<MatchSpec, CompileError> {
        let lits = OwnedEnv::new();
        let raw = lits.run(|e| e.as_c_arg());
        let mut clauses = Vec::new();
        let mut rest = spec;
        while let Ok((clause, tail)) = rest.list_get_cell() {
            let parts = rustler::types::tuple::get_tuple(clause)
                .ok()
                .filter(|p| p.len() == 3)
                .ok_or("each clause must be a {head, guards, body} tuple")?;
            let mut c = Compiler {
                env,
                lits: raw,
                vars: 0,
            };
            let head = c.pat(parts[0], 0)?;
            let mut guards = Vec::new();
            let mut g = parts[1];
            while let Ok((x, tl)) = g.list_get_cell() {
                guards.push(c.expr(x, 0)?);
                g = tl;
            }
            if !g.is_empty_list() {
                return Err("the guards of a clause must be a list".into());
            }
            if !parts[2].is_list() {
                return Err("the body of a clause must be a list".into());
            }
            let _ = c.env;
            clauses.push(Clause { head, guards });
            rest = tail;
        }
        if !rest.is_empty_list() {
            return Err("a match specification must be a proper list of clauses".into());
        }
        if clauses.is_empty() {
            return Err("a match specification needs at least one clause".into());
        }
        Ok(MatchSpec {
            clauses,
            _lits: lits,
        })
    }

    /// Does `t` (a term of `env`) match some clause?
    pub fn matches(&self, env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> bool {
        let mut vars = [None; MAX_VARS];
        self.clauses.iter().any(|c| {
            vars.iter_mut().for_each(|v| *v = None);
            let mut ev = Eval {
                env,
                vars: &mut vars,
            };
            ev.pat(&c.head, t) && c.guards.iter().all(|g| ev.truthy(g))
        })
    }

    /// Decodes payload field `field` of a tape into a per-thread
    /// environment and matches it; false if the field is not there.
    pub fn matches_field(&self, payload: &[u8], field: usize) -> bool {
        DECODE.with(|cell| {
            let mut cell = cell.borrow_mut();
            let (owned, scratch) = &mut *cell;
            let r = owned.run(|env| {
                let mut d = TapeDecoder::new(payload);
                let mut t = None;
                for _ in 0..=field {
                    t = d.try_next(env, scratch);
                    if t.is_none() {
                        break;
                    }
                }
                t.is_some_and(|t| self.matches(env.as_c_arg(), t.as_c_arg()))
            });
            owned.clear();
            scratch.clear();
            r
        })
    }
}

thread_local! {
    static DECODE: RefCell<(OwnedEnv, Scratch)> = RefCell::new((OwnedEnv::new(), Scratch::new()));
}

struct Eval<'v> {
    env: *mut ErlNifEnv,
    vars: &'v mut [Option<ERL_NIF_TERM>; MAX_VARS],
}

fn tt(env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> ErlNifTermType {
    // SAFETY: a valid term (ours or the matcher's literals).
    unsafe { enif_term_type(env, t) }
}

fn is(env: *mut ErlNifEnv, t: ERL_NIF_TERM, ty: ErlNifTermType) -> bool {
    tt(env, t) as i32 == ty as i32
}

fn identical(a: ERL_NIF_TERM, b: ERL_NIF_TERM) -> bool {
    // SAFETY: valid terms.
    unsafe { enif_is_identical(a, b) != 0 }
}

fn tuple_elems<'t>(env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> Option<&'t [ERL_NIF_TERM]> {
    let mut n = 0;
    let mut p: *const ERL_NIF_TERM = std::ptr::null();
    // SAFETY: valid env and term; on success `p` points at `n` elements that
    // live as long as the term.
    unsafe {
        if enif_get_tuple(env, t, &mut n, &mut p) == 0 {
            return None;
        }
        Some(std::slice::from_raw_parts(p, n as usize))
    }
}

fn cell(env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> Option<(ERL_NIF_TERM, ERL_NIF_TERM)> {
    let (mut h, mut tl) = (ERL_NIF_TERM::default(), ERL_NIF_TERM::default());
    // SAFETY: valid env and term, live out-pointers.
    (unsafe { enif_get_list_cell(env, t, &mut h, &mut tl) } != 0).then_some((h, tl))
}

fn int(env: *mut ErlNifEnv, t: ERL_NIF_TERM) -> Option<i64> {
    let mut i = 0;
    // SAFETY: valid env and term.
    (unsafe { enif_get_int64(env, t, &mut i) } != 0).then_some(i)
}

impl Eval<'_> {
    fn pat(&mut self, p: &Pat, t: ERL_NIF_TERM) -> bool {
        match p {
            Pat::Any => true,
            Pat::Var(v) => match self.vars[*v] {
                Some(b) => identical(b, t),
                None => {
                    self.vars[*v] = Some(t);
                    true
                }
            },
            Pat::Lit(l) => identical(*l, t),
            Pat::Tuple(ps) => match tuple_elems(self.env, t) {
                Some(es) if es.len() == ps.len() => {
                    ps.iter().zip(es.iter()).all(|(p, &e)| self.pat(p, e))
                }
                _ => false,
            },
            Pat::Cons(h, tl) => match cell(self.env, t) {
                Some((a, b)) => self.pat(h, a) && self.pat(tl, b),
                None => false,
            },
            Pat::Map(kvs) => {
                if !is(self.env, t, ErlNifTermType::ERL_NIF_TERM_TYPE_MAP) {
                    return false;
                }
                kvs.iter().all(|(k, vp)| {
                    let mut v = ERL_NIF_TERM::default();
                    // SAFETY: valid env and terms, live out-pointer.
                    let found = unsafe { enif_get_map_value(self.env, t, *k, &mut v) } != 0;
                    found && self.pat(vp, v)
                })
            }
        }
    }

    fn boolean(&self, b: bool) -> ERL_NIF_TERM {
        atom_term(if b { atoms::true_() } else { atoms::false_() })
    }

    fn as_bool(&self, t: ERL_NIF_TERM) -> Option<bool> {
        if identical(t, atom_term(atoms::true_())) {
            Some(true)
        } else if identical(t, atom_term(atoms::false_())) {
            Some(false)
        } else {
            None
        }
    }

    fn truthy(&mut self, e: &Expr) -> bool {
        self.eval(e).and_then(|t| self.as_bool(t)) == Some(true)
    }

    fn eval(&mut self, e: &Expr) -> Option<ERL_NIF_TERM> {
        match e {
            Expr::Var(v) => self.vars[*v],
            Expr::Lit(l) => Some(*l),
            Expr::Tuple(es) => {
                let mut vals = Vec::with_capacity(es.len());
                for x in es {
                    vals.push(self.eval(x)?);
                }
                // SAFETY: terms of (or valid in) our env.
                Some(unsafe {
                    rustler::sys::enif_make_tuple_from_array(
                        self.env,
                        vals.as_ptr(),
                        vals.len() as u32,
                    )
                })
            }
            Expr::Call(op, args) => self.call(*op, args),
        }
    }

    fn call(&mut self, op: Op, args: &[Expr]) -> Option<ERL_NIF_TERM> {
        use ErlNifTermType as T;
        // Short-circuit operators evaluate lazily.
        match op {
            Op::AndAlso => {
                let a = self.eval(&args[0]).and_then(|t| self.as_bool(t))?;
                return if a {
                    self.eval(&args[1])
                } else {
                    Some(self.boolean(false))
                };
            }
            Op::OrElse => {
                let a = self.eval(&args[0]).and_then(|t| self.as_bool(t))?;
                return if a {
                    Some(self.boolean(true))
                } else {
                    self.eval(&args[1])
                };
            }
            _ => {}
        }
        let mut v = [ERL_NIF_TERM::default(); 2];
        for (i, a) in args.iter().enumerate() {
            v[i] = self.eval(a)?;
        }
        let env = self.env;
        let cmp = || {
            // SAFETY: valid terms.
            unsafe { enif_compare(v[0], v[1]) }
        };
        let ty = |t: T| is(env, v[0], t);
        let b = |x: bool| Some(self.boolean(x));
        let mk = |i: i64| {
            // SAFETY: our env.
            Some(unsafe { enif_make_int64(env, i) })
        };
        match op {
            Op::Eq => b(cmp() == 0),
            Op::Ne => b(cmp() != 0),
            Op::ExactEq => b(identical(v[0], v[1])),
            Op::ExactNe => b(!identical(v[0], v[1])),
            Op::Lt => b(cmp() < 0),
            Op::Le => b(cmp() <= 0),
            Op::Gt => b(cmp() > 0),
            Op::Ge => b(cmp() >= 0),
            Op::And | Op::Or | Op::Xor => {
                let x = self.as_bool(v[0])?;
                let y = self.as_bool(v[1])?;
                b(match op {
                    Op::And => x && y,
                    Op::Or => x || y,
                    _ => x ^ y,
                })
            }
            Op::Not => b(!self.as_bool(v[0])?),
            Op::IsAtom => b(ty(T::ERL_NIF_TERM_TYPE_ATOM)),
            Op::IsInteger => b(ty(T::ERL_NIF_TERM_TYPE_INTEGER)),
            Op::IsFloat => b(ty(T::ERL_NIF_TERM_TYPE_FLOAT)),
            Op::IsNumber => b(ty(T::ERL_NIF_TERM_TYPE_INTEGER) || ty(T::ERL_NIF_TERM_TYPE_FLOAT)),
            Op::IsBinary => {
                let mut bin = std::mem::MaybeUninit::uninit();
                // SAFETY: valid env/term; inspecting does not retain the binary.
                b(unsafe { rustler::sys::enif_inspect_binary(env, v[0], bin.as_mut_ptr()) } != 0)
            }
            Op::IsList => b(ty(T::ERL_NIF_TERM_TYPE_LIST)),
            Op::IsTuple => b(ty(T::ERL_NIF_TERM_TYPE_TUPLE)),
            Op::IsMap => b(ty(T::ERL_NIF_TERM_TYPE_MAP)),
            Op::IsPid => b(ty(T::ERL_NIF_TERM_TYPE_PID)),
            Op::IsReference => b(ty(T::ERL_NIF_TERM_TYPE_REFERENCE)),
            Op::IsFunction => b(ty(T::ERL_NIF_TERM_TYPE_FUN)),
            Op::IsPort => b(ty(T::ERL_NIF_TERM_TYPE_PORT)),
            Op::IsBoolean => b(self.as_bool(v[0]).is_some()),
            Op::Element => {
                let i = int(env, v[0])?;
                let es = tuple_elems(env, v[1])?;
                (i >= 1 && (i as usize) <= es.len()).then(|| es[i as usize - 1])
            }
            Op::Hd => cell(env, v[0]).map(|c| c.0),
            Op::Tl => cell(env, v[0]).map(|c| c.1),
            Op::Length => {
                let mut n = 0;
                // SAFETY: valid env/term.
                (unsafe { enif_get_list_length(env, v[0], &mut n) } != 0)
                    .then(|| mk(n as i64))
                    .flatten()
            }
            Op::TupleSize => mk(tuple_elems(env, v[0])?.len() as i64),
            Op::MapSize => {
                let mut n = 0;
                // SAFETY: valid env/term.
                (unsafe { enif_get_map_size(env, v[0], &mut n) } != 0)
                    .then(|| mk(n as i64))
                    .flatten()
            }
            Op::MapGet | Op::IsMapKey => {
                let mut out = ERL_NIF_TERM::default();
                // SAFETY: valid env/terms; a non-map answers 0.
                let found = unsafe { enif_get_map_value(env, v[1], v[0], &mut out) } != 0;
                if op == Op::IsMapKey {
                    if !is(env, v[1], T::ERL_NIF_TERM_TYPE_MAP) {
                        return None;
                    }
                    b(found)
                } else {
                    found.then_some(out)
                }
            }
            Op::Abs => int(env, v[0])?.checked_abs().and_then(mk),
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Rem => {
                let (x, y) = (int(env, v[0])?, int(env, v[1])?);
                let r = match op {
                    Op::Add => x.checked_add(y),
                    Op::Sub => x.checked_sub(y),
                    Op::Mul => x.checked_mul(y),
                    Op::Div => x.checked_div(y),
                    _ => x.checked_rem(y),
                }?;
                mk(r)
            }
            Op::AndAlso | Op::OrElse => unreachable!("handled above"),
        }
    }
}

fn atom_term(a: Atom) -> ERL_NIF_TERM {
    // Atoms are immediates: their word is valid in every environment.
    a.as_c_arg()
}
