//! VM-local words ⇄ portable symbols, for trace files.
//!
//! Saving asks [`BeamSymbolizer`] what each stored word is: an atom (its
//! name), a local pid or port (node, numbers and creation, from its
//! external term format), a small integer, `[]`, or an index key. Loading
//! maps symbols back with [`BeamResolver`]:
//!
//! * **Atoms** that exist are used; missing ones are created, at most
//!   `max_new_atoms` per load and [`MAX_FILE_ATOMS`] over the life of the
//!   VM (then loading fails with `too_many_atoms`). Atoms inside
//!   external-term-format payloads count alike.
//! * **Pids and ports** are rebuilt from node, numbers and creation. In
//!   the VM instance that saved the file they are its local pids again.
//!   Elsewhere a pid of this node's name and creation (another run of the
//!   same node: not one of this VM's processes) gets creation + 1, so it
//!   stays a distinct, foreign pid. A foreign pid or port is kept in the
//!   store under a key (`hash(term_to_binary) << 2`, never an immediate,
//!   the key [`term_key`](crate::store_nif::term_key) computes for it) and
//!   its external form sits in a process-wide registry while a store uses
//!   it, so queries and results map key ⇄ term.

use elixir_scope_core::hash_bytes;
use elixir_scope_core::tracefile::etf::{scan, EtfVisitor};
use elixir_scope_core::tracefile::ptape::MapError;
use elixir_scope_core::tracefile::{
    ErrorKind, FileHeader, Local, Resolver, Symbol, Symbolizer, TapeResolver, WordClass,
};
use rustler::sys::{
    enif_binary_to_term, enif_release_binary, enif_term_to_binary, ErlNifBinary,
    ErlNifTerm as ERL_NIF_TERM, ERL_NIF_BIN2TERM_SAFE,
};
use rustler::{Encoder, Env};
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::codec::{from_word, is_immediate, word};

/// Most atoms trace-file loads may create over the life of the VM.
pub const MAX_FILE_ATOMS: u64 = 100_000;
/// Most distinct foreign pids and ports held by loaded stores at a time.
pub const MAX_FOREIGN: usize = 1_000_000;

static ATOMS_CREATED: AtomicU64 = AtomicU64::new(0);

/// Atoms created by trace-file loads so far (bounded by [`MAX_FILE_ATOMS`]).
pub fn atoms_created() -> u64 {
    ATOMS_CREATED.load(Ordering::Relaxed)
}

/// This VM instance's identity in the files it writes (random, per load
/// of the NIF library).
pub fn vm_id() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id() as u64);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish().max(1)
    })
}

/// `term_to_binary(t)`; `None` if the VM refuses.
pub fn to_etf(env: Env, t: ERL_NIF_TERM) -> Option<Vec<u8>> {
    let mut bin = MaybeUninit::<ErlNifBinary>::uninit();
    // SAFETY: valid env and term; the binary is copied, then released once.
    unsafe {
        if enif_term_to_binary(env.as_c_arg(), t, bin.as_mut_ptr()) == 0 {
            return None;
        }
        let mut bin = bin.assume_init();
        let v = std::slice::from_raw_parts(bin.data, bin.size).to_vec();
        enif_release_binary(&mut bin);
        Some(v)
    }
}

/// `binary_to_term(etf)`, only with existing atoms (`safe`) or not.
fn from_etf(env: Env, etf: &[u8], safe: bool) -> Option<ERL_NIF_TERM> {
    let mut out = ERL_NIF_TERM::default();
    let flags = if safe { ERL_NIF_BIN2TERM_SAFE } else { 0 };
    // SAFETY: valid env; `etf` is readable for its length.
    let used =
        unsafe { enif_binary_to_term(env.as_c_arg(), etf.as_ptr(), etf.len(), &mut out, flags) };
    (used == etf.len()).then_some(out)
}

/// An atom's ETF (`ATOM_UTF8_EXT`).
fn atom_etf(name: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(name.len() + 4);
    b.push(131);
    b.push(118);
    b.extend_from_slice(&(name.len() as u16).to_be_bytes());
    b.extend_from_slice(name);
    b
}

/// An atom name as UTF-8 (`utf8`: it is already; else Latin-1).
fn utf8_name(raw: &[u8], utf8: bool) -> Vec<u8> {
    if utf8 {
        raw.to_vec()
    } else {
        raw.iter()
            .map(|&c| c as char)
            .collect::<String>()
            .into_bytes()
    }
}

/// Parse an atom ETF term at the start of `b`: (UTF-8 name, bytes used).
fn parse_atom(b: &[u8]) -> Option<(Vec<u8>, usize)> {
    let (len, at, utf8) = match *b.first()? {
        100 => (
            u16::from_be_bytes([*b.get(1)?, *b.get(2)?]) as usize,
            3,
            false,
        ),
        118 => (
            u16::from_be_bytes([*b.get(1)?, *b.get(2)?]) as usize,
            3,
            true,
        ),
        115 => (*b.get(1)? as usize, 2, false),
        119 => (*b.get(1)? as usize, 2, true),
        _ => return None,
    };
    let raw = b.get(at..at + len)?;
    let name = if utf8 {
        raw.to_vec()
    } else {
        raw.iter()
            .map(|&c| c as char)
            .collect::<String>()
            .into_bytes()
    };
    Some((name, at + len))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A pid's or port's external form as a [`WordClass`].
fn class_of_etf(etf: &[u8]) -> WordClass {
    let parse = || -> Option<WordClass> {
        if *etf.first()? != 131 {
            return None;
        }
        let tag = *etf.get(1)?;
        let (node, n) = parse_atom(etf.get(2..)?)?;
        let at = 2 + n;
        Some(match tag {
            88 => WordClass::Pid {
                node,
                id: be32(etf, at)?,
                serial: be32(etf, at + 4)?,
                creation: be32(etf, at + 8)?,
            },
            89 => WordClass::Port {
                node,
                id: be32(etf, at)? as u64,
                creation: be32(etf, at + 4)?,
            },
            120 => WordClass::Port {
                node,
                id: u64::from_be_bytes(etf.get(at..at + 8)?.try_into().ok()?),
                creation: be32(etf, at + 8)?,
            },
            _ => return None,
        })
    };
    parse().unwrap_or(WordClass::Unportable)
}

/// The process-wide registry of foreign pids and ports: key → (external
/// form, number of loaded stores using it).
type Registry = HashMap<u64, (Box<[u8]>, usize)>;

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

fn registry_lock() -> std::sync::MutexGuard<'static, Registry> {
    registry().lock().unwrap_or_else(|p| p.into_inner())
}

/// The external form of a registered foreign key.
pub fn foreign_etf(key: u64) -> Option<Box<[u8]>> {
    registry_lock().get(&key).map(|(e, _)| e.clone())
}

/// The key of a foreign (boxed) pid or port term.
pub fn foreign_key(env: Env, t: ERL_NIF_TERM) -> Option<u64> {
    to_etf(env, t).map(|e| hash_bytes(&e) << 2)
}

/// The registry entries one loaded store holds; released on drop.
#[derive(Default)]
pub struct ForeignGuard {
    keys: Vec<u64>,
}

impl ForeignGuard {
    /// Foreign pids and ports held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

impl Drop for ForeignGuard {
    fn drop(&mut self) {
        let mut r = registry_lock();
        for k in &self.keys {
            if let Some(e) = r.get_mut(k) {
                e.1 -= 1;
                if e.1 == 0 {
                    r.remove(k);
                }
            }
        }
    }
}

/// The term of a stored header word: nil for 0, the word itself for an
/// immediate, a registered foreign pid or port, else nil (an index key
/// of a term that is not kept, such as a hashed non-atom module).
pub fn word_term(env: Env, w: u64) -> ERL_NIF_TERM {
    if w == 0 {
        return crate::atoms::nil().encode(env).as_c_arg();
    }
    if is_immediate(from_word(w)) {
        return from_word(w);
    }
    match foreign_etf(w).and_then(|etf| from_etf(env, &etf, true)) {
        Some(t) => t,
        None => crate::atoms::nil().encode(env).as_c_arg(),
    }
}

/// Saving: the store's words as portable symbols.
pub struct BeamSymbolizer<'a> {
    env: Env<'a>,
    nil: u64,
}

impl<'a> BeamSymbolizer<'a> {
    /// A symbolizer calling into `env`.
    pub fn new(env: Env<'a>) -> BeamSymbolizer<'a> {
        BeamSymbolizer {
            env,
            nil: word(crate::nil_word()),
        }
    }
}

impl Symbolizer for BeamSymbolizer<'_> {
    fn classify(&mut self, w: u64) -> WordClass {
        match w & 0xF {
            0xF => return WordClass::Small((w as i64) >> 4),
            0x3 | 0x7 => {
                // A local pid or port: its external form names it.
                return to_etf(self.env, from_word(w))
                    .map_or(WordClass::Unportable, |e| class_of_etf(&e));
            }
            _ => {}
        }
        if w == self.nil {
            return WordClass::Nil;
        }
        if w & 0x3F == 0x0B {
            return match to_etf(self.env, from_word(w)).and_then(|e| parse_atom(&e[1..])) {
                Some((name, _)) => WordClass::Atom(name),
                None => WordClass::Unportable,
            };
        }
        if w & 0x3 == 0 {
            // An index key: a registered foreign pid or port, or a hash.
            return match foreign_etf(w) {
                Some(etf) => class_of_etf(&etf),
                None => WordClass::Key,
            };
        }
        WordClass::Unportable
    }
}

/// Loading: symbols of a file mapped into this VM (see the module
/// documentation for the rules).
pub struct BeamResolver<'a> {
    env: Env<'a>,
    /// Atoms this load may still create.
    budget: u64,
    /// Atoms this load created.
    pub created: u64,
    local_node: Vec<u8>,
    local_creation: u32,
    file_vm: u64,
    /// Foreign pids and ports registered by this load.
    pub guard: ForeignGuard,
}

impl<'a> BeamResolver<'a> {
    /// A resolver creating at most `max_new_atoms` atoms.
    pub fn new(env: Env<'a>, max_new_atoms: u64) -> BeamResolver<'a> {
        let me = to_etf(env, env.pid().encode(env).as_c_arg()).map(|e| class_of_etf(&e));
        let (local_node, local_creation) = match me {
            Some(WordClass::Pid { node, creation, .. }) => (node, creation),
            _ => (Vec::new(), 0),
        };
        BeamResolver {
            env,
            budget: max_new_atoms,
            created: 0,
            local_node,
            local_creation,
            file_vm: 0,
            guard: ForeignGuard::default(),
        }
    }

    /// The atom named `name` (UTF-8), created within the budgets.
    pub fn atom(&mut self, name: &[u8]) -> Result<ERL_NIF_TERM, MapError> {
        let etf = atom_etf(name);
        if let Some(t) = from_etf(self.env, &etf, true) {
            return Ok(t);
        }
        let shown = String::from_utf8_lossy(&name[..name.len().min(64)]).into_owned();
        if self.created >= self.budget {
            return Err(MapError {
                kind: ErrorKind::TooManyAtoms,
                detail: format!(
                    "atom {shown:?} does not exist and this load may create no more than {} atoms",
                    self.budget
                ),
            });
        }
        if ATOMS_CREATED.fetch_add(1, Ordering::Relaxed) >= MAX_FILE_ATOMS {
            ATOMS_CREATED.fetch_sub(1, Ordering::Relaxed);
            return Err(MapError {
                kind: ErrorKind::TooManyAtoms,
                detail: format!(
                    "atom {shown:?} does not exist and trace-file loads already created {MAX_FILE_ATOMS} atoms in this VM"
                ),
            });
        }
        match from_etf(self.env, &etf, false) {
            Some(t) => {
                self.created += 1;
                Ok(t)
            }
            None => {
                ATOMS_CREATED.fetch_sub(1, Ordering::Relaxed);
                Err(MapError {
                    kind: ErrorKind::BadSymbol,
                    detail: format!("{shown:?} is not a valid atom name"),
                })
            }
        }
    }

    /// The creation to give a pid/port of `node` with `creation` from the
    /// current file (see the module documentation).
    fn creation_for(&self, node: &[u8], creation: u32) -> u32 {
        if self.file_vm != crate::portable::vm_id()
            && node == self.local_node.as_slice()
            && creation == self.local_creation
        {
            creation.wrapping_add(1)
        } else {
            creation
        }
    }

    fn process(&mut self, etf: Vec<u8>, what: &str) -> Result<Local, MapError> {
        let t = from_etf(self.env, &etf, true).ok_or_else(|| MapError {
            kind: ErrorKind::BadSymbol,
            detail: format!("the {what} cannot be rebuilt in this VM"),
        })?;
        if is_immediate(t) {
            return Ok(Local::Imm(word(t)));
        }
        let canonical = to_etf(self.env, t).ok_or_else(|| MapError {
            kind: ErrorKind::BadSymbol,
            detail: format!("the {what} has no external form"),
        })?;
        let key = hash_bytes(&canonical) << 2;
        let mut r = registry_lock();
        match r.get_mut(&key) {
            Some(e) => e.1 += 1,
            None => {
                if r.len() >= MAX_FOREIGN {
                    return Err(MapError {
                        kind: ErrorKind::BadSymbol,
                        detail: format!(
                            "loaded stores already hold {MAX_FOREIGN} foreign pids and ports"
                        ),
                    });
                }
                r.insert(key, (canonical.clone().into_boxed_slice(), 1));
            }
        }
        drop(r);
        self.guard.keys.push(key);
        Ok(Local::Foreign {
            key,
            etf: canonical.into_boxed_slice(),
        })
    }
}

struct EtfAtoms<'r, 'a>(&'r mut BeamResolver<'a>, Option<MapError>);

impl EtfVisitor for EtfAtoms<'_, '_> {
    fn atom(&mut self, name: &[u8], utf8: bool) -> Result<(), String> {
        let name = utf8_name(name, utf8);
        self.0.atom(&name).map(|_| ()).map_err(|e| {
            let d = e.detail.clone();
            self.1 = Some(e);
            d
        })
    }

    fn node(&mut self, name: &[u8], utf8: bool, creation: u32) -> Option<u32> {
        let name = utf8_name(name, utf8);
        let c = self.0.creation_for(&name, creation);
        (c != creation).then_some(c)
    }
}

impl TapeResolver for BeamResolver<'_> {
    fn small_word(&self, v: i64) -> Option<u64> {
        // 60-bit small integers of the 64-bit VM.
        (-(1i64 << 59)..(1i64 << 59))
            .contains(&v)
            .then_some(((v << 4) as u64) | 0xF)
    }

    fn nil_word(&self) -> u64 {
        word(crate::nil_word())
    }

    fn check_etf(&mut self, etf: &mut Vec<u8>) -> Result<(), MapError> {
        let mut v = EtfAtoms(self, None);
        if let Err(d) = scan(etf, &mut v) {
            return Err(v.1.take().unwrap_or_else(|| MapError::term(d)));
        }
        // Every atom exists now: the VM's own decoder has the last word.
        if from_etf(self.env, etf, true).is_none() {
            return Err(MapError::term("external term refused by binary_to_term"));
        }
        Ok(())
    }
}

impl Resolver for BeamResolver<'_> {
    fn begin_file(&mut self, _index: usize, header: &FileHeader) {
        self.file_vm = header.vm_id;
    }

    fn resolve(&mut self, sym: &Symbol, symbols: &[Symbol]) -> Result<Local, MapError> {
        let node_name = |n: u32| match &symbols[n as usize] {
            Symbol::Atom(name) => Ok(name.clone()),
            _ => Err(MapError {
                kind: ErrorKind::BadSymbol,
                detail: "a node that is not an atom".into(),
            }),
        };
        match sym {
            Symbol::Atom(name) => self.atom(name).map(|t| Local::Imm(word(t))),
            Symbol::Pid {
                node,
                id,
                serial,
                creation,
            } => {
                let node = node_name(*node)?;
                self.atom(&node)?;
                let mut etf = vec![131, 88];
                etf.extend_from_slice(&atom_etf(&node)[1..]);
                etf.extend_from_slice(&id.to_be_bytes());
                etf.extend_from_slice(&serial.to_be_bytes());
                etf.extend_from_slice(&self.creation_for(&node, *creation).to_be_bytes());
                self.process(etf, "pid")
            }
            Symbol::Port { node, id, creation } => {
                let node = node_name(*node)?;
                self.atom(&node)?;
                let c = self.creation_for(&node, *creation);
                let mut etf = vec![131];
                if *id <= u32::MAX as u64 {
                    etf.push(89);
                    etf.extend_from_slice(&atom_etf(&node)[1..]);
                    etf.extend_from_slice(&(*id as u32).to_be_bytes());
                } else {
                    etf.push(120);
                    etf.extend_from_slice(&atom_etf(&node)[1..]);
                    etf.extend_from_slice(&id.to_be_bytes());
                }
                etf.extend_from_slice(&c.to_be_bytes());
                self.process(etf, "port")
            }
            Symbol::Pair { .. } => Err(MapError {
                kind: ErrorKind::BadSymbol,
                detail: "a pair where a term was expected".into(),
            }),
        }
    }

    fn header_raw_ok(&self, w: u64) -> bool {
        w & 0xF == 0xF || w & 0x3 == 0 || w == word(crate::nil_word())
    }
}
