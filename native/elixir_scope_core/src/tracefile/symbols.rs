//! Portable symbols: what a VM-local word (an atom, a local pid or port)
//! means, by name and numbers, so another VM can map it back.
//!
//! A file numbers its symbols 0, 1, 2... in order of first use; symbol
//! blocks define them before the event blocks that refer to them.

use super::bytes::{put_bytes, put_varint, Cursor, Short};
use crate::hash::FastMap;
use std::collections::HashMap;

/// Longest atom name accepted (bytes; the VM's limit is 255 characters).
pub const MAX_ATOM_BYTES: usize = 1020;

/// How a header word is stored: none, a symbol, or a raw VM-independent
/// word (a small integer, a content-hash key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum WordCode {
    /// The word 0 (no value).
    #[default]
    None,
    /// Symbol number.
    Sym(u32),
    /// A word that means the same in every VM.
    Raw(u64),
}

impl WordCode {
    /// Append the code: `0` none, `(n + 1) << 1` symbol `n`, `1` then 8
    /// bytes for a raw word.
    #[inline(always)]
    pub fn put(self, out: &mut Vec<u8>) {
        match self {
            WordCode::None => out.push(0),
            WordCode::Sym(n) => put_varint(out, (n as u64 + 1) << 1),
            WordCode::Raw(w) => {
                out.push(1);
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
    }

    /// Read a code written by [`WordCode::put`].
    #[inline(always)]
    pub fn get(c: &mut Cursor) -> Result<WordCode, Short> {
        let v = c.varint()?;
        Ok(match v {
            0 => WordCode::None,
            1 => WordCode::Raw(c.u64_le()?),
            v if v & 1 == 0 && (v >> 1) <= u32::MAX as u64 + 1 => {
                WordCode::Sym((v >> 1) as u32 - 1)
            }
            _ => return Err(Short::BadVarint),
        })
    }
}

/// One symbol of a file.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Symbol {
    /// An atom, by its UTF-8 name.
    Atom(Vec<u8>),
    /// A pid: its node (an atom symbol) and the numbers of its external
    /// form (`NEW_PID_EXT`).
    Pid {
        /// Symbol number of the node's atom.
        node: u32,
        /// Process number.
        id: u32,
        /// Serial.
        serial: u32,
        /// Node incarnation.
        creation: u32,
    },
    /// A port: its node (an atom symbol), number and creation.
    Port {
        /// Symbol number of the node's atom.
        node: u32,
        /// Port number.
        id: u64,
        /// Node incarnation.
        creation: u32,
    },
    /// A (module, function) header pair.
    Pair {
        /// The module word.
        module: WordCode,
        /// The function word.
        function: WordCode,
    },
}

const S_ATOM: u8 = 1;
const S_PID: u8 = 2;
const S_PORT: u8 = 3;
const S_PAIR: u8 = 4;

impl Symbol {
    /// Append the symbol's encoding.
    pub fn put(&self, out: &mut Vec<u8>) {
        match self {
            Symbol::Atom(name) => {
                out.push(S_ATOM);
                put_bytes(out, name);
            }
            Symbol::Pid {
                node,
                id,
                serial,
                creation,
            } => {
                out.push(S_PID);
                for v in [*node as u64, *id as u64, *serial as u64, *creation as u64] {
                    put_varint(out, v);
                }
            }
            Symbol::Port { node, id, creation } => {
                out.push(S_PORT);
                for v in [*node as u64, *id, *creation as u64] {
                    put_varint(out, v);
                }
            }
            Symbol::Pair { module, function } => {
                out.push(S_PAIR);
                module.put(out);
                function.put(out);
            }
        }
    }

    /// Read one symbol; `defined` is the number of symbols before it (a
    /// pid's node must be an atom defined earlier: checked by the caller
    /// with [`Symbol::check_refs`]).
    pub fn get(c: &mut Cursor) -> Result<Symbol, String> {
        let short = |_| "symbol cut short".to_string();
        let u32_of = |v: u64, what: &str| -> Result<u32, String> {
            u32::try_from(v).map_err(|_| format!("{what} {v} out of range"))
        };
        match c.u8().map_err(short)? {
            S_ATOM => {
                let name = c.bytes().map_err(short)?;
                if name.len() > MAX_ATOM_BYTES {
                    return Err(format!("atom name of {} bytes", name.len()));
                }
                if std::str::from_utf8(name).is_err() {
                    return Err("atom name is not UTF-8".into());
                }
                Ok(Symbol::Atom(name.to_vec()))
            }
            S_PID => {
                let node = u32_of(c.varint().map_err(short)?, "node")?;
                let id = u32_of(c.varint().map_err(short)?, "pid number")?;
                let serial = u32_of(c.varint().map_err(short)?, "pid serial")?;
                let creation = u32_of(c.varint().map_err(short)?, "creation")?;
                Ok(Symbol::Pid {
                    node,
                    id,
                    serial,
                    creation,
                })
            }
            S_PORT => {
                let node = u32_of(c.varint().map_err(short)?, "node")?;
                let id = c.varint().map_err(short)?;
                let creation = u32_of(c.varint().map_err(short)?, "creation")?;
                Ok(Symbol::Port { node, id, creation })
            }
            S_PAIR => {
                let module = WordCode::get(c).map_err(short)?;
                let function = WordCode::get(c).map_err(short)?;
                Ok(Symbol::Pair { module, function })
            }
            t => Err(format!("unknown symbol tag {t}")),
        }
    }

    /// Check that the symbols this one refers to are defined before it
    /// (`table` holds symbols `0..table.len()`) and have the right type.
    pub fn check_refs(&self, table: &[Symbol]) -> Result<(), String> {
        let atom = |n: u32| match table.get(n as usize) {
            Some(Symbol::Atom(_)) => Ok(()),
            Some(_) => Err(format!("symbol {n} is not an atom")),
            None => Err(format!("symbol {n} used before it is defined")),
        };
        let word = |w: &WordCode| match w {
            WordCode::Sym(n) => match table.get(*n as usize) {
                Some(Symbol::Pair { .. }) => Err(format!("symbol {n} is a pair")),
                Some(_) => Ok(()),
                None => Err(format!("symbol {n} used before it is defined")),
            },
            _ => Ok(()),
        };
        match self {
            Symbol::Atom(_) => Ok(()),
            Symbol::Pid { node, .. } | Symbol::Port { node, .. } => atom(*node),
            Symbol::Pair { module, function } => word(module).and_then(|_| word(function)),
        }
    }
}

/// What a VM-local word is, as told by the binding when saving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WordClass {
    /// An atom (UTF-8 name).
    Atom(Vec<u8>),
    /// A pid: node name and external-form numbers.
    Pid {
        /// Node name.
        node: Vec<u8>,
        /// Process number.
        id: u32,
        /// Serial.
        serial: u32,
        /// Creation.
        creation: u32,
    },
    /// A port.
    Port {
        /// Node name.
        node: Vec<u8>,
        /// Port number.
        id: u64,
        /// Creation.
        creation: u32,
    },
    /// A small integer (its value).
    Small(i64),
    /// `[]`.
    Nil,
    /// A word meaningful in any VM (a content-hash key): stored raw. Valid
    /// in headers only.
    Key,
    /// A word that cannot be made portable (saving fails).
    Unportable,
}

/// The binding's view of VM-local words, used while saving.
pub trait Symbolizer {
    /// What `word` is. Called once per distinct atom, pid or port word,
    /// and for every other word met in a payload (keep it cheap for small
    /// integers and `[]`).
    fn classify(&mut self, word: u64) -> WordClass;
}

/// Interns the symbols of a file being written and collects the ones not
/// yet written out.
#[derive(Default)]
pub struct SymbolWriter {
    words: FastMap<u64, u32>,
    pairs: FastMap<(u64, u64), u32>,
    atoms: HashMap<Vec<u8>, u32>,
    next: u32,
    /// Encoded symbols not yet written, and how many.
    pending: Vec<u8>,
    pending_count: u32,
    pending_first: u32,
    /// Raw-word classifications of header words (small integers, keys).
    raw_header: FastMap<u64, WordCode>,
}

/// Symbols not yet written: `first` is the number of the first one.
pub struct PendingSymbols<'a> {
    /// Number of the first symbol.
    pub first: u32,
    /// How many.
    pub count: u32,
    /// Their encodings, back to back.
    pub bytes: &'a [u8],
}

/// A word a payload holds, in portable form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapeWord {
    /// A symbol.
    Sym(u32),
    /// A small integer.
    Small(i64),
    /// `[]`.
    Nil,
}

impl SymbolWriter {
    /// An empty table.
    pub fn new() -> SymbolWriter {
        SymbolWriter::default()
    }

    /// Symbols defined so far.
    pub fn len(&self) -> u32 {
        self.next
    }

    /// No symbols yet?
    pub fn is_empty(&self) -> bool {
        self.next == 0
    }

    fn define(&mut self, s: Symbol) -> u32 {
        let n = self.next;
        if self.pending_count == 0 {
            self.pending_first = n;
        }
        s.put(&mut self.pending);
        self.pending_count += 1;
        self.next += 1;
        n
    }

    fn atom(&mut self, name: Vec<u8>) -> u32 {
        if let Some(&n) = self.atoms.get(&name) {
            return n;
        }
        let n = self.define(Symbol::Atom(name.clone()));
        self.atoms.insert(name, n);
        n
    }

    /// The symbol of an atom/pid/port word, defining it on first use;
    /// `None` for other words (with their class).
    fn intern(&mut self, word: u64, class: WordClass) -> Result<u32, WordClass> {
        let n = match class {
            WordClass::Atom(name) => self.atom(name),
            WordClass::Pid {
                node,
                id,
                serial,
                creation,
            } => {
                let node = self.atom(node);
                self.define(Symbol::Pid {
                    node,
                    id,
                    serial,
                    creation,
                })
            }
            WordClass::Port { node, id, creation } => {
                let node = self.atom(node);
                self.define(Symbol::Port { node, id, creation })
            }
            other => return Err(other),
        };
        self.words.insert(word, n);
        Ok(n)
    }

    /// The code of a header word (pid, peer, module, function).
    #[inline]
    pub fn header_word<S: Symbolizer>(&mut self, word: u64, sym: &mut S) -> Result<WordCode, u64> {
        if word == 0 {
            return Ok(WordCode::None);
        }
        if let Some(&n) = self.words.get(&word) {
            return Ok(WordCode::Sym(n));
        }
        if let Some(&c) = self.raw_header.get(&word) {
            return Ok(c);
        }
        match self.intern(word, sym.classify(word)) {
            Ok(n) => Ok(WordCode::Sym(n)),
            Err(WordClass::Unportable) => Err(word),
            Err(_) => {
                // Small integers, `[]` and keys mean the same everywhere.
                self.raw_header.insert(word, WordCode::Raw(word));
                Ok(WordCode::Raw(word))
            }
        }
    }

    /// The pair symbol of a (module, function) header pair; 0 for (0, 0),
    /// else the symbol number + 1.
    #[inline]
    pub fn pair<S: Symbolizer>(
        &mut self,
        module: u64,
        function: u64,
        sym: &mut S,
    ) -> Result<u32, u64> {
        if module == 0 && function == 0 {
            return Ok(0);
        }
        if let Some(&n) = self.pairs.get(&(module, function)) {
            return Ok(n + 1);
        }
        let m = self.header_word(module, sym)?;
        let f = self.header_word(function, sym)?;
        let n = self.define(Symbol::Pair {
            module: m,
            function: f,
        });
        self.pairs.insert((module, function), n);
        Ok(n + 1)
    }

    /// The portable form of a word inside a payload.
    #[inline]
    pub fn tape_word<S: Symbolizer>(&mut self, word: u64, sym: &mut S) -> Result<TapeWord, u64> {
        if let Some(&n) = self.words.get(&word) {
            return Ok(TapeWord::Sym(n));
        }
        match sym.classify(word) {
            WordClass::Small(v) => Ok(TapeWord::Small(v)),
            WordClass::Nil => Ok(TapeWord::Nil),
            WordClass::Key | WordClass::Unportable => Err(word),
            class => self
                .intern(word, class)
                .map(TapeWord::Sym)
                .map_err(|_| word),
        }
    }

    /// The symbol of a pid word (for the process-name table).
    pub fn pid<S: Symbolizer>(&mut self, word: u64, sym: &mut S) -> Option<u32> {
        match self.header_word(word, sym) {
            Ok(WordCode::Sym(n)) => Some(n),
            _ => None,
        }
    }

    /// Symbols defined since the last [`SymbolWriter::clear_pending`].
    pub fn pending(&self) -> Option<PendingSymbols<'_>> {
        (self.pending_count > 0).then_some(PendingSymbols {
            first: self.pending_first,
            count: self.pending_count,
            bytes: &self.pending,
        })
    }

    /// Forget the pending symbols (they were written).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_count = 0;
    }
}
