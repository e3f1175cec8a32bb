//! A pretend VM for trace-file tests: words tagged like the 64-bit BEAM's
//! immediates (atoms, local pids, small integers, `[]`), each VM with its
//! own atom numbering, so a file saved by one and loaded by another must
//! map every word by name.
#![allow(dead_code)]

use elixir_scope_core::tape::{T_BIN, T_ETF, T_FLOAT, T_IMM, T_LIST, T_MAP, T_TUPLE};
use elixir_scope_core::tracefile::etf::{scan, EtfVisitor};
use elixir_scope_core::tracefile::ptape::MapError;
use elixir_scope_core::tracefile::{
    ErrorKind, FileHeader, Local, Resolver, Symbol, Symbolizer, TapeResolver, WordClass,
};
use elixir_scope_core::{CorrelationFields, Event, EventKind, EventStore, StoreConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub fn atom_word(i: u64) -> u64 {
    (i << 6) | 0x0B
}
pub fn pid_word(n: u64) -> u64 {
    (n << 4) | 0x3
}
pub fn small_word(v: i64) -> u64 {
    ((v << 4) as u64) | 0xF
}
pub const NIL: u64 = 0x3B;

/// One pretend VM: an atom table, its node and incarnation.
pub struct Vm {
    pub node: String,
    pub creation: u32,
    pub vm_id: u64,
    pub atoms: Vec<String>,
    pub by_name: HashMap<String, u64>,
    /// Atoms the loader may still create.
    pub budget: usize,
    pub created: usize,
    /// Foreign pids seen by loads: key → (node, id, creation).
    pub foreign: HashMap<u64, (String, u32, u32)>,
    current_vm: u64,
}

impl Vm {
    pub fn new(node: &str, vm_id: u64, atoms: &[&str]) -> Vm {
        let mut vm = Vm {
            node: node.into(),
            creation: 0,
            vm_id,
            atoms: Vec::new(),
            by_name: HashMap::new(),
            budget: 1000,
            created: 0,
            foreign: HashMap::new(),
            current_vm: 0,
        };
        vm.atom(node);
        for a in atoms {
            vm.atom(a);
        }
        vm
    }

    /// The word of atom `name`, creating it.
    pub fn atom(&mut self, name: &str) -> u64 {
        if let Some(&i) = self.by_name.get(name) {
            return atom_word(i);
        }
        let i = self.atoms.len() as u64;
        self.atoms.push(name.into());
        self.by_name.insert(name.into(), i);
        atom_word(i)
    }

    pub fn atom_name(&self, w: u64) -> Option<&str> {
        (w & 0x3F == 0x0B)
            .then(|| self.atoms.get((w >> 6) as usize).map(String::as_str))
            .flatten()
    }

    pub fn header(&self) -> FileHeader {
        FileHeader {
            node: self.node.clone(),
            vm_id: self.vm_id,
            saved_at_ns: 1_700_000_000_000_000_000,
            time_offset_ns: 1_000_000,
            writer: "test".into(),
            otp: "25".into(),
            ..FileHeader::default()
        }
    }
}

/// A fake external pid: `131, 88, SMALL_ATOM_UTF8 node, id, serial, creation`.
pub fn pid_etf(node: &str, id: u32, creation: u32) -> Vec<u8> {
    let mut b = vec![131, 88, 119, node.len() as u8];
    b.extend_from_slice(node.as_bytes());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&creation.to_be_bytes());
    b
}

impl Symbolizer for Vm {
    fn classify(&mut self, w: u64) -> WordClass {
        match w & 0xF {
            0xF => return WordClass::Small((w as i64) >> 4),
            0x3 => {
                return WordClass::Pid {
                    node: self.node.clone().into_bytes(),
                    id: (w >> 4) as u32,
                    serial: 0,
                    creation: self.creation,
                }
            }
            _ => {}
        }
        if w == NIL {
            return WordClass::Nil;
        }
        if let Some(name) = self.atom_name(w) {
            return WordClass::Atom(name.as_bytes().to_vec());
        }
        if w & 0x3 == 0 {
            if let Some((node, id, creation)) = self.foreign.get(&w) {
                return WordClass::Pid {
                    node: node.clone().into_bytes(),
                    id: *id,
                    serial: 0,
                    creation: *creation,
                };
            }
            return WordClass::Key;
        }
        WordClass::Unportable
    }
}

struct Atoms<'a>(&'a mut Vm);

impl EtfVisitor for Atoms<'_> {
    fn atom(&mut self, name: &[u8], _utf8: bool) -> Result<(), String> {
        let name = std::str::from_utf8(name).map_err(|e| e.to_string())?;
        self.0.ensure_atom(name).map(|_| ()).map_err(|e| e.detail)
    }
    fn node(&mut self, _name: &[u8], _utf8: bool, _creation: u32) -> Option<u32> {
        None
    }
}

impl Vm {
    fn ensure_atom(&mut self, name: &str) -> Result<u64, MapError> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(atom_word(i));
        }
        if self.created >= self.budget {
            return Err(MapError {
                kind: ErrorKind::TooManyAtoms,
                detail: format!("atom budget exhausted at {name:?}"),
            });
        }
        self.created += 1;
        Ok(self.atom(name))
    }
}

impl TapeResolver for Vm {
    fn small_word(&self, v: i64) -> Option<u64> {
        (-(1i64 << 59)..(1i64 << 59))
            .contains(&v)
            .then_some(small_word(v))
    }
    fn nil_word(&self) -> u64 {
        NIL
    }
    fn check_etf(&mut self, etf: &mut Vec<u8>) -> Result<(), MapError> {
        scan(etf, &mut Atoms(self)).map_err(MapError::term)
    }
}

impl Resolver for Vm {
    fn begin_file(&mut self, _index: usize, header: &FileHeader) {
        self.current_vm = header.vm_id;
    }
    fn resolve(&mut self, sym: &Symbol, symbols: &[Symbol]) -> Result<Local, MapError> {
        match sym {
            Symbol::Atom(name) => {
                let name = std::str::from_utf8(name).expect("checked UTF-8");
                Ok(Local::Imm(self.ensure_atom(name)?))
            }
            Symbol::Pid {
                node, id, creation, ..
            } => {
                let Symbol::Atom(node) = &symbols[*node as usize] else {
                    panic!("checked by the reader")
                };
                let node = String::from_utf8(node.clone()).unwrap();
                self.ensure_atom(&node)?;
                if node == self.node && *creation == self.creation && self.current_vm == self.vm_id
                {
                    Ok(Local::Imm(pid_word(*id as u64)))
                } else {
                    let etf = pid_etf(&node, *id, *creation);
                    let key = elixir_scope_core::hash_bytes(&etf) << 2;
                    self.foreign.insert(key, (node, *id, *creation));
                    Ok(Local::Foreign {
                        key,
                        etf: etf.into(),
                    })
                }
            }
            Symbol::Port { .. } => Err(MapError {
                kind: ErrorKind::BadSymbol,
                detail: "no ports in the pretend VM".into(),
            }),
            Symbol::Pair { .. } => unreachable!("pairs are mapped by the loader"),
        }
    }
    fn header_raw_ok(&self, w: u64) -> bool {
        w & 0xF == 0xF || w & 0x3 == 0
    }
}

/// Tape builders (VM-local tapes as the binding writes them).
pub fn t_imm(out: &mut Vec<u8>, w: u64) {
    out.push(T_IMM);
    out.extend_from_slice(&w.to_le_bytes());
}
pub fn t_bin(out: &mut Vec<u8>, b: &[u8]) {
    out.push(T_BIN);
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}
pub fn t_tuple(out: &mut Vec<u8>, n: u32) {
    out.push(T_TUPLE);
    out.extend_from_slice(&n.to_le_bytes());
}
pub fn t_list(out: &mut Vec<u8>, n: u32) {
    out.push(T_LIST);
    out.extend_from_slice(&n.to_le_bytes());
}
pub fn t_map(out: &mut Vec<u8>, n: u32) {
    out.push(T_MAP);
    out.extend_from_slice(&n.to_le_bytes());
}
pub fn t_float(out: &mut Vec<u8>, f: f64) {
    out.push(T_FLOAT);
    out.extend_from_slice(&f.to_le_bytes());
}
pub fn t_etf(out: &mut Vec<u8>, b: &[u8]) {
    out.push(T_ETF);
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A fresh temporary path.
pub fn temp(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("es_tracefile_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!(
        "{}_{}.trace",
        name,
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A correlated workload like the pipeline stores: processes calling
/// (nested), returning, sending and receiving (some receives linked
/// late), spawning; payloads of every tape type.
pub fn workload(vm: &mut Vm, seed: u64, n: usize, first_id: u64, max_events: usize) -> EventStore {
    let mut rng = Rng(seed | 1);
    let mut store = EventStore::new(StoreConfig {
        max_events,
        max_age_ns: None,
    });
    let modules: Vec<u64> = (0..5).map(|i| vm.atom(&format!("Elixir.Mod{i}"))).collect();
    let funs: Vec<u64> = (0..7).map(|i| vm.atom(&format!("fun_{i}"))).collect();
    let ok = vm.atom("ok");
    let pids: Vec<u64> = (0..6).map(|i| pid_word(100 + i)).collect();
    let mut stacks: Vec<Vec<u64>> = vec![Vec::new(); pids.len()];
    let mut pending_sends: Vec<(u64, usize)> = Vec::new();
    let mut id = first_id;
    let mut ts = 1_000_000i64 + first_id as i64 * 10_000;
    let mut late = Vec::new();
    for _ in 0..n {
        id += 1;
        ts += rng.below(2000) as i64;
        let p = rng.below(pids.len() as u64) as usize;
        let mut ev = Event {
            id,
            timestamp: ts,
            wall_time: ts + 1_000_000 + (rng.below(3) as i64),
            pid: pids[p],
            ..Event::default()
        };
        let mut corr = CorrelationFields {
            correlation_id: id,
            parent_id: 0,
            root_id: 0,
        };
        let roll = rng.below(10);
        if roll < 4 || stacks[p].is_empty() && roll < 6 {
            ev.kind = EventKind::FunctionCall as u8;
            ev.module = modules[rng.below(5) as usize];
            ev.function = funs[rng.below(7) as usize];
            ev.aux = rng.below(4) as i64;
            if rng.below(2) == 0 {
                // Arguments: [1, "bin", {ok, 2.5}, %{ok => []}, bignum]
                let p = &mut ev.payload;
                t_list(p, 5);
                t_imm(p, small_word(rng.below(1000) as i64 - 500));
                t_bin(p, b"binary");
                t_tuple(p, 2);
                t_imm(p, ok);
                t_float(p, 2.5);
                t_map(p, 1);
                t_imm(p, ok);
                t_imm(p, NIL);
                t_etf(p, &[131, 110, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
                t_imm(p, NIL);
                t_imm(p, pids[p.len() % 6]);
            }
            corr.parent_id = stacks[p].last().copied().unwrap_or(0);
            corr.root_id = stacks[p].first().copied().unwrap_or(id);
            stacks[p].push(id);
        } else if roll < 7 && !stacks[p].is_empty() {
            let call = stacks[p].pop().unwrap();
            ev.kind = if rng.below(8) == 0 {
                EventKind::FunctionException
            } else {
                EventKind::FunctionReturn
            } as u8;
            ev.aux = rng.below(100_000) as i64;
            t_imm(&mut ev.payload, ok);
            corr.correlation_id = call;
            corr.parent_id = stacks[p].last().copied().unwrap_or(0);
        } else if roll < 8 {
            let to = rng.below(pids.len() as u64) as usize;
            ev.kind = EventKind::MessageSend as u8;
            ev.peer = pids[to];
            ev.aux = rng.next() as i64;
            t_imm(&mut ev.payload, pids[p]);
            t_imm(&mut ev.payload, pids[to]);
            t_tuple(&mut ev.payload, 2);
            t_imm(&mut ev.payload, ok);
            t_imm(&mut ev.payload, small_word(id as i64));
            corr.parent_id = stacks[p].last().copied().unwrap_or(0);
            pending_sends.push((id, to));
        } else if roll < 9 && !pending_sends.is_empty() {
            let (send, to) = pending_sends.remove(0);
            ev.kind = EventKind::MessageReceive as u8;
            ev.pid = pids[to];
            t_imm(&mut ev.payload, pids[to]);
            if rng.below(3) == 0 {
                // Learnt after it was stored.
                late.push((id, send));
            } else {
                corr.correlation_id = send;
            }
        } else {
            ev.kind = EventKind::ProcessSpawn as u8;
            ev.peer = pids[p];
            ev.pid = pid_word(1000 + id);
            t_imm(&mut ev.payload, ev.pid);
            t_imm(&mut ev.payload, pids[p]);
        }
        store.insert(&ev, corr);
    }
    for (rid, send) in late {
        store.relink(rid, send);
    }
    store
}
