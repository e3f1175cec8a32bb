//! OTP callbacks: which traced functions are gen_server / gen_statem
//! callbacks ([`CallbackTable`], built by `ElixirScope.Tracer` from the
//! modules' behaviours), where a callback's return value holds the new
//! state ([`shape`], used both when the tracer records the return and when
//! a query reads it back), and the message that triggered a callback,
//! rebuilt from its arguments ([`trigger`]).

use elixir_scope_core::{Callback, FLAG_SETS_DATA, FLAG_SETS_NAME, FLAG_STATEM, FLAG_STOP};
use rustler::sys::ErlNifTerm as ERL_NIF_TERM;
use rustler::{Encoder, Env, NifResult, Term};

use crate::atoms;
use crate::codec::{tuple_items, word};

/// The OTP callbacks of a trace's target modules: `(module, function,
/// arity) → flags` (callback class and [`FLAG_STATEM`]), sorted for a
/// binary search. Empty when states are not captured.
#[derive(Default)]
pub struct CallbackTable {
    entries: Vec<(u64, u64, i64, u8)>,
}

impl CallbackTable {
    /// From a list of `{module, function, arity, flags}`.
    pub fn from_term(list: Term) -> NifResult<CallbackTable> {
        let mut entries = Vec::new();
        for item in crate::codec::proper_list(list).ok_or(rustler::Error::BadArg)? {
            let (m, f, a, flags): (Term, Term, i64, u8) = item.decode()?;
            if !m.is_atom() || !f.is_atom() || Callback::of_flags(flags).is_none() {
                return Err(rustler::Error::BadArg);
            }
            entries.push((word(m.as_c_arg()), word(f.as_c_arg()), a, flags));
        }
        entries.sort_unstable();
        entries.dedup_by_key(|e| (e.0, e.1, e.2));
        Ok(CallbackTable { entries })
    }

    /// No callbacks?
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The callback flags of `module:function/arity` (0: not a callback).
    #[inline]
    pub fn lookup(&self, module: u64, function: u64, arity: i64) -> u8 {
        match self
            .entries
            .binary_search_by(|e| (e.0, e.1, e.2).cmp(&(module, function, arity)))
        {
            Ok(i) => self.entries[i].3,
            Err(_) => 0,
        }
    }
}

#[inline]
fn is(t: ERL_NIF_TERM, a: rustler::Atom) -> bool {
    word(t) == word(a.as_c_arg())
}

/// What a callback's return value says (see [`shape`]).
#[derive(Default, Clone, Copy)]
pub struct Shape {
    /// The value has a shape this callback may return (`terminate`'s
    /// always does).
    pub matched: bool,
    /// `FLAG_SETS_DATA`, `FLAG_SETS_NAME`, `FLAG_STOP`.
    pub flags: u8,
    /// The tag of the return value (`:reply`, `:next_state`, ...; the
    /// atom itself for a bare atom such as `:keep_state_and_data`).
    pub tag: Option<ERL_NIF_TERM>,
    /// The new data (a gen_server's whole state).
    pub data: Option<ERL_NIF_TERM>,
    /// A gen_statem's new state name.
    pub name: Option<ERL_NIF_TERM>,
    /// The reply (`handle_call/3`'s `:reply` and `:stop` with a reply;
    /// gen_statem's `:stop_and_reply` replies).
    pub reply: Option<ERL_NIF_TERM>,
    /// What else it asked for: a timeout, `:hibernate`, `{:continue, _}`,
    /// gen_statem actions.
    pub actions: Option<ERL_NIF_TERM>,
    /// The stop reason of a `:stop`.
    pub stop: Option<ERL_NIF_TERM>,
}

/// Reads the return value `v` of an OTP callback of class `flags` (see
/// [`Callback`]): which parts of the state it sets and where they are.
/// Shapes it does not know set nothing (the state in force is kept).
pub fn shape(env: Env, flags: u8, v: Term) -> Shape {
    let mut s = Shape::default();
    let Some(class) = Callback::of_flags(flags) else {
        return s;
    };
    if class == Callback::Terminate {
        s.matched = true;
        return s;
    }
    let statem = flags & FLAG_STATEM != 0;
    let raw = v.as_c_arg();
    let items = tuple_items(v);
    let (tag, rest): (ERL_NIF_TERM, &[ERL_NIF_TERM]) = match items.split_first() {
        Some((t, rest)) => (*t, rest),
        None if v.is_atom() => (raw, &[]),
        None => return s,
    };
    // SAFETY: the tag is `v` itself or one of its elements.
    if !unsafe { Term::new(env, tag) }.is_atom() {
        return s;
    }
    s.tag = Some(tag);
    let data = |s: &mut Shape, t: ERL_NIF_TERM| {
        s.data = Some(t);
        s.flags |= FLAG_SETS_DATA;
    };
    let name = |s: &mut Shape, t: ERL_NIF_TERM| {
        s.name = Some(t);
        s.flags |= FLAG_SETS_NAME;
    };
    let stop = |s: &mut Shape, r: Option<ERL_NIF_TERM>| {
        s.stop = r.or(Some(atoms::normal().encode(env).as_c_arg()));
        s.flags |= FLAG_STOP;
    };
    use Callback::*;
    s.matched = true;
    match (class, statem, rest.len()) {
        // init/1 and code_change
        (Init | CodeChange, false, 1 | 2) if is(tag, atoms::ok()) => {
            data(&mut s, rest[0]);
            s.actions = rest.get(1).copied();
        }
        (Init | CodeChange, true, 2 | 3) if is(tag, atoms::ok()) => {
            name(&mut s, rest[0]);
            data(&mut s, rest[1]);
            s.actions = rest.get(2).copied();
        }
        (Init, _, 0) if is(tag, atoms::ignore()) => stop(&mut s, Some(tag)),
        (Init, _, 1) if is(tag, atoms::stop()) => stop(&mut s, Some(rest[0])),
        // gen_server
        (HandleCall, false, 2 | 3) if is(tag, atoms::reply()) => {
            s.reply = Some(rest[0]);
            data(&mut s, rest[1]);
            s.actions = rest.get(2).copied();
        }
        (HandleCall | HandleNoreply, false, 1 | 2) if is(tag, atoms::noreply()) => {
            data(&mut s, rest[0]);
            s.actions = rest.get(1).copied();
        }
        (HandleCall, false, 3) if is(tag, atoms::stop()) => {
            stop(&mut s, Some(rest[0]));
            s.reply = Some(rest[1]);
            data(&mut s, rest[2]);
        }
        (HandleCall | HandleNoreply, false, 2) if is(tag, atoms::stop()) => {
            stop(&mut s, Some(rest[0]));
            data(&mut s, rest[1]);
        }
        // gen_statem events
        (StatemEvent, true, 2 | 3) if is(tag, atoms::next_state()) => {
            name(&mut s, rest[0]);
            data(&mut s, rest[1]);
            s.actions = rest.get(2).copied();
        }
        (StatemEvent, true, 1 | 2)
            if is(tag, atoms::keep_state()) || is(tag, atoms::repeat_state()) =>
        {
            data(&mut s, rest[0]);
            s.actions = rest.get(1).copied();
        }
        (StatemEvent, true, 0 | 1)
            if is(tag, atoms::keep_state_and_data()) || is(tag, atoms::repeat_state_and_data()) =>
        {
            s.actions = rest.first().copied();
        }
        (StatemEvent, true, 0 | 1) if is(tag, atoms::stop()) => {
            stop(&mut s, rest.first().copied());
        }
        (StatemEvent, true, 2) if is(tag, atoms::stop()) => {
            stop(&mut s, Some(rest[0]));
            data(&mut s, rest[1]);
        }
        (StatemEvent, true, 2 | 3) if is(tag, atoms::stop_and_reply()) => {
            stop(&mut s, Some(rest[0]));
            s.reply = Some(rest[1]);
            if let Some(&d) = rest.get(2) {
                data(&mut s, d);
            }
        }
        _ => s.matched = false,
    }
    s
}

/// The message that triggered an OTP callback, rebuilt from its
/// arguments `args` (a list): `{:"$gen_call", from, request}` for
/// `handle_call/3` and gen_statem `{:call, from}` events, `{:"$gen_cast",
/// request}` for casts, the message itself for `handle_info/2` and `:info`
/// events; `None` for callbacks no message triggers.
pub fn trigger<'a>(env: Env<'a>, flags: u8, function: u64, args: Term<'a>) -> Option<Term<'a>> {
    let mut a: [Option<Term<'a>>; 4] = [None; 4];
    let mut cur = args;
    for slot in a.iter_mut() {
        let Ok((h, t)) = cur.list_get_cell() else {
            break;
        };
        *slot = Some(h);
        cur = t;
    }
    let gen_call = |from: Term<'a>, req: Term<'a>| Some((atoms::gen_call(), from, req).encode(env));
    let gen_cast = |req: Term<'a>| Some((atoms::gen_cast(), req).encode(env));
    match Callback::of_flags(flags)? {
        Callback::HandleCall => gen_call(a[1]?, a[0]?),
        Callback::HandleNoreply
            if function == word(atoms::handle_cast().encode(env).as_c_arg()) =>
        {
            gen_cast(a[0]?)
        }
        Callback::HandleNoreply
            if function == word(atoms::handle_info().encode(env).as_c_arg()) =>
        {
            a[0]
        }
        Callback::StatemEvent => {
            let (typ, content) = (a[0]?, a[1]?);
            if typ.as_c_arg() == atoms::cast().encode(env).as_c_arg() {
                gen_cast(content)
            } else if typ.as_c_arg() == atoms::info().encode(env).as_c_arg() {
                Some(content)
            } else {
                match tuple_items(typ) {
                    &[tag, from] if is(tag, atoms::call()) => {
                        // SAFETY: an element of a term of `env`.
                        gen_call(unsafe { Term::new(env, from) }, content)
                    }
                    _ => None,
                }
            }
        }
        _ => None,
    }
}
