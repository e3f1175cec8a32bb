//! Exports of a store to timeline and flame-graph viewers: the Chrome
//! Trace Event Format ([`chrome`]), speedscope's file format
//! ([`speedscope`]), folded stacks and an SVG flame graph ([`folded`]).
//!
//! Every export is one pass over the store in `seq` order (each process's
//! event order), in chunks of [`ExportOptions::lock_chunk`] records: each
//! chunk is rendered into a buffer under the store's lock and written to
//! the output with the lock released, so a pipeline keeps storing and the
//! output is never held whole in memory. Like a trace-file save, the
//! export holds the events stored when it started.
//!
//! # Calls
//!
//! Per process, a stack of open calls is pushed by call events and popped
//! by the return or exception that completes the call (its correlation id
//! is the call's id). Frames above a completed call (left by a crash) are
//! closed at the same time ("unwound"); calls still open at the end are
//! closed at the process's last event ("unfinished"); a return whose call
//! is not in the store (evicted, or made before the trace) is shown from
//! the process's previous event to the return ("orphan"). Timestamps are
//! made non-decreasing per process, so calls of one process always nest.
//!
//! # Names
//!
//! Modules print as in Elixir (`MyApp.Worker`, `:lists`), functions as
//! `Module.function/arity`, pids as `<0.123.0>` on the trace's own node
//! ([`ExportOptions::home_node`]) and `<node.123.0>` elsewhere, and a
//! process by its pid and the name the caller gives (registered name or
//! initial call).

pub mod chrome;
pub mod folded;
pub mod json;
pub mod preview;
pub mod speedscope;

use crate::event::EventKind;
use crate::hash::FastMap;
use crate::store::{EventStore, StoredEvent};
use crate::tracefile::{Symbolizer, WordClass};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

/// The export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Chrome Trace Event Format JSON (Perfetto, `chrome://tracing`).
    ChromeTrace,
    /// speedscope's JSON file format, one evented profile per process.
    Speedscope,
    /// Folded stacks (`a;b;c weight`), for flamegraph.pl and inferno.
    Folded,
    /// An SVG flame graph rendered by inferno.
    Flamegraph,
}

/// What a folded stack's weight counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Weight {
    /// Time inside the call minus its traced callees (ns).
    #[default]
    OwnTime,
    /// Number of calls.
    Calls,
}

/// How to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The format.
    pub format: Format,
    /// Folded stacks and flame graphs: the weight.
    pub weight: Weight,
    /// Chrome trace: longest payload preview in an event's args (bytes).
    pub preview_bytes: usize,
    /// Records rendered per hold of the store lock.
    pub lock_chunk: usize,
    /// Folded stacks: frames deeper than this are merged into one `…`
    /// frame at this depth.
    pub max_depth: usize,
    /// Folded stacks: start each stack with its process.
    pub process_roots: bool,
    /// Title of a flame graph, name of a speedscope file.
    pub title: String,
    /// The node whose pids print as `<0.N.S>`.
    pub home_node: Vec<u8>,
    /// Speedscope: where to spool (default: the system's temporary
    /// directory; [`export_to_path`] uses the output's directory).
    pub spool_dir: Option<std::path::PathBuf>,
    /// Speedscope: buffered bytes above which buffers are spooled.
    pub spool_at: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            format: Format::ChromeTrace,
            weight: Weight::OwnTime,
            preview_bytes: 160,
            lock_chunk: 4096,
            max_depth: 512,
            process_roots: true,
            title: "ElixirScope trace".into(),
            home_node: Vec::new(),
            spool_dir: None,
            spool_at: speedscope::SPOOL_AT,
        }
    }
}

/// What an export wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportSummary {
    /// Events read.
    pub events: u64,
    /// Calls exported (completed, unwound, unfinished and orphans).
    pub calls: u64,
    /// Calls still open at the end of their process's events.
    pub unfinished: u64,
    /// Calls left without a return by a crash (closed with an outer call).
    pub unwound: u64,
    /// Returns whose call was not in the store.
    pub orphans: u64,
    /// Instant events (Chrome trace).
    pub instants: u64,
    /// Send → receive arrows (Chrome trace).
    pub flows: u64,
    /// Processes seen.
    pub processes: u64,
    /// Nodes seen.
    pub nodes: u64,
    /// Distinct functions.
    pub frames: u64,
    /// Lines or profiles written (folded: stacks; speedscope: profiles).
    pub stacks: u64,
    /// Folded: calls merged into their parent's stack because the stack
    /// table was full.
    pub untracked: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// A word as the exports print it.
#[derive(Clone, Debug)]
pub enum Word {
    /// An atom's name.
    Atom(Box<str>),
    /// A pid: node index and numbers.
    Pid {
        /// Index of its node.
        node: u32,
        /// Process number.
        id: u32,
        /// Serial.
        serial: u32,
    },
    /// A port: node index and number.
    Port {
        /// Index of its node.
        node: u32,
        /// Port number.
        id: u64,
    },
    /// A small integer.
    Small(i64),
    /// `[]`.
    Nil,
    /// Anything else.
    Other,
}

/// Words, nodes, functions and processes met so far, as printed.
pub struct Names<'s, S: Symbolizer> {
    sym: &'s mut S,
    words: FastMap<u64, Word>,
    /// Node names (index: node number).
    pub nodes: Vec<Box<str>>,
    node_ids: FastMap<Box<[u8]>, u32>,
    /// Function labels (index: frame number).
    pub frames: Vec<Box<str>>,
    frame_ids: FastMap<(u64, u64, i64), u32>,
    /// Names the caller gave to processes.
    given: FastMap<u64, Box<str>>,
}

impl<'s, S: Symbolizer> Names<'s, S> {
    /// A table classifying words with `sym`; node 0 is `home`;
    /// `given` names processes.
    pub fn new(sym: &'s mut S, home: &[u8], given: &[(u64, Vec<u8>)]) -> Names<'s, S> {
        let mut n = Names {
            sym,
            words: FastMap::default(),
            nodes: Vec::new(),
            node_ids: FastMap::default(),
            frames: Vec::new(),
            frame_ids: FastMap::default(),
            given: given
                .iter()
                .map(|(w, b)| (*w, String::from_utf8_lossy(b).into()))
                .collect(),
        };
        n.node(home);
        n
    }

    fn node(&mut self, name: &[u8]) -> u32 {
        if let Some(&i) = self.node_ids.get(name) {
            return i;
        }
        let i = self.nodes.len() as u32;
        self.nodes.push(String::from_utf8_lossy(name).into());
        self.node_ids.insert(name.into(), i);
        i
    }

    /// What `w` is.
    pub fn word(&mut self, w: u64) -> &Word {
        if !self.words.contains_key(&w) {
            let word = match self.sym.classify(w) {
                WordClass::Atom(name) => Word::Atom(String::from_utf8_lossy(&name).into()),
                WordClass::Pid {
                    node, id, serial, ..
                } => Word::Pid {
                    node: self.node(&node),
                    id,
                    serial,
                },
                WordClass::Port { node, id, .. } => Word::Port {
                    node: self.node(&node),
                    id,
                },
                WordClass::Small(v) => Word::Small(v),
                WordClass::Nil => Word::Nil,
                WordClass::Key | WordClass::Unportable => Word::Other,
            };
            self.words.insert(w, word);
        }
        &self.words[&w]
    }

    /// Append `w` printed as a term (`:ok`, `MyApp`, `<0.1.0>`, `42`).
    pub fn put_word(&mut self, out: &mut String, w: u64) {
        use std::fmt::Write as _;
        match self.word(w).clone() {
            Word::Atom(a) => put_atom(out, &a),
            Word::Pid { node, id, serial } => {
                if node == 0 {
                    let _ = write!(out, "<0.{id}.{serial}>");
                } else {
                    let _ = write!(out, "<{}.{id}.{serial}>", self.nodes[node as usize]);
                }
            }
            Word::Port { node, id } => {
                if node == 0 {
                    let _ = write!(out, "#Port<0.{id}>");
                } else {
                    let _ = write!(out, "#Port<{}.{id}>", self.nodes[node as usize]);
                }
            }
            Word::Small(v) => {
                let _ = write!(out, "{v}");
            }
            Word::Nil => out.push_str("[]"),
            Word::Other => out.push_str("#Term"),
        }
    }

    /// The frame number of `module.function/arity`.
    pub fn frame(&mut self, module: u64, function: u64, arity: i64) -> u32 {
        if let Some(&f) = self.frame_ids.get(&(module, function, arity)) {
            return f;
        }
        let mut s = String::new();
        if module == 0 && function == 0 {
            s.push_str("(unknown function)");
        } else {
            match self.word(module).clone() {
                Word::Atom(m) => put_module(&mut s, &m),
                _ => self.put_word(&mut s, module),
            }
            s.push('.');
            match self.word(function).clone() {
                Word::Atom(f) => s.push_str(&f),
                _ => self.put_word(&mut s, function),
            }
            if arity >= 0 {
                use std::fmt::Write as _;
                let _ = write!(s, "/{arity}");
            }
        }
        let f = self.frames.len() as u32;
        self.frames.push(s.into());
        self.frame_ids.insert((module, function, arity), f);
        f
    }

    /// A process's label: its pid, then the name given for it, if any.
    pub fn process_label(&mut self, pid: u64) -> String {
        let mut s = String::new();
        if pid == 0 {
            s.push_str("(no process)");
            return s;
        }
        self.put_word(&mut s, pid);
        if let Some(n) = self.given.get(&pid) {
            s.push(' ');
            s.push_str(n);
        }
        s
    }

    /// The node index of a pid word (0: the home node or unknown).
    pub fn node_of(&mut self, pid: u64) -> u32 {
        match self.word(pid) {
            Word::Pid { node, .. } | Word::Port { node, .. } => *node,
            _ => 0,
        }
    }
}

/// Does `a` print bare after a colon (`:ok`) in Elixir?
fn plain_atom(a: &str) -> bool {
    let mut cs = a.chars();
    match cs.next() {
        Some(c) if c.is_lowercase() || c == '_' => {}
        _ => return false,
    }
    let mut rest: Vec<char> = cs.collect();
    if matches!(rest.last(), Some('?') | Some('!')) {
        rest.pop();
    }
    rest.iter()
        .all(|&c| c.is_alphanumeric() || c == '_' || c == '@')
}

/// Append an atom as Elixir prints it.
pub fn put_atom(out: &mut String, a: &str) {
    if matches!(a, "nil" | "true" | "false") {
        out.push_str(a);
    } else if let Some(m) = a.strip_prefix("Elixir.") {
        out.push_str(m);
    } else if plain_atom(a) {
        out.push(':');
        out.push_str(a);
    } else {
        out.push_str(":\"");
        for c in a.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

/// Append a module name (`MyApp.Worker`, `:lists`).
fn put_module(out: &mut String, m: &str) {
    put_atom(out, m)
}

/// How an open call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Close {
    /// By its return.
    Return,
    /// By its exception.
    Exception,
    /// Left by a crash: an outer call's return or exception came first.
    Unwound,
    /// Still open after the process's last event.
    Unfinished,
    /// A return whose call is not in the store.
    Orphan,
}

impl Close {
    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Close::Return => "return",
            Close::Exception => "exception",
            Close::Unwound => "unwound",
            Close::Unfinished => "unfinished",
            Close::Orphan => "orphan",
        }
    }
}

/// An open call.
#[derive(Clone, Debug)]
pub struct Open {
    /// Id of the call event (0 for an orphan).
    pub call_id: u64,
    /// Frame number.
    pub frame: u32,
    /// Start (ns, relative to the export's origin).
    pub start: i64,
    /// Time in completed traced callees (ns).
    pub child_ns: i64,
    /// The sink's own value (folded: the stack node).
    pub tag: u32,
    /// Preview of the arguments (when the sink wants them).
    pub args: Option<Box<str>>,
}

/// One process of the export.
pub struct Thread {
    /// Its number in the export (1, 2, ...).
    pub tid: u32,
    /// Its node's index.
    pub node: u32,
    /// Its pid word.
    pub pid: u64,
    /// Open calls, outermost first.
    pub stack: Vec<Open>,
    /// Latest timestamp of its events so far (relative ns).
    pub last_ts: i64,
    /// Its first timestamp (relative ns).
    pub first_ts: i64,
    /// Its label.
    pub label: Box<str>,
}

/// What the driver hands an exporter.
pub(crate) struct Cx<'n, 's, S: Symbolizer> {
    pub names: &'n mut Names<'s, S>,
    /// Output of the current chunk (written out with the lock released).
    pub buf: Vec<u8>,
    pub origin: i64,
    pub summary: ExportSummary,
    pub preview_bytes: usize,
}

/// An exporter fed by [`drive`].
pub(crate) trait Sink<S: Symbolizer> {
    /// Render call argument previews into [`Open::args`]?
    fn wants_args(&self) -> bool {
        false
    }
    /// Output before the events.
    fn begin(&mut self, _cx: &mut Cx<'_, '_, S>) -> io::Result<()> {
        Ok(())
    }
    /// A process seen for the first time.
    fn thread(&mut self, _cx: &mut Cx<'_, '_, S>, _th: &Thread) {}
    /// A call opened on `th` (pushed after this returns; `th.stack` holds
    /// its callers); returns [`Open::tag`].
    fn open(&mut self, cx: &mut Cx<'_, '_, S>, th: &Thread, f: &Open) -> u32;
    /// A call closed at `end` (already popped from `th.stack`); `ret` is
    /// the return or exception event.
    fn close(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        th: &Thread,
        f: &Open,
        end: i64,
        how: Close,
        ret: Option<&StoredEvent<'_>>,
    );
    /// Any other event, at `ts` on `th`.
    fn instant(
        &mut self,
        _cx: &mut Cx<'_, '_, S>,
        _threads: &mut Threads,
        _th: usize,
        _ts: i64,
        _e: &StoredEvent<'_>,
        _store: &EventStore,
    ) {
    }
    /// A chunk was written out (the store is not locked).
    fn chunk_done(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Output after the events (to `w` directly: the store is not locked).
    fn finish<W: Write>(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        threads: &Threads,
        w: &mut W,
    ) -> io::Result<()>;
}

/// The processes of an export.
#[derive(Default)]
pub struct Threads {
    /// In order of appearance.
    pub list: Vec<Thread>,
    by_pid: FastMap<u64, usize>,
}

impl Threads {
    /// The index of `pid`'s thread, and whether it is new.
    pub(crate) fn get<S: Symbolizer>(
        &mut self,
        names: &mut Names<'_, S>,
        pid: u64,
        ts: i64,
    ) -> (usize, bool) {
        if let Some(&i) = self.by_pid.get(&pid) {
            return (i, false);
        }
        let i = self.list.len();
        let node = names.node_of(pid);
        self.list.push(Thread {
            tid: i as u32 + 1,
            node,
            pid,
            stack: Vec::new(),
            last_ts: ts,
            first_ts: ts,
            label: names.process_label(pid).into(),
        });
        self.by_pid.insert(pid, i);
        (i, true)
    }
}

fn lock(store: &Mutex<EventStore>) -> std::sync::MutexGuard<'_, EventStore> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// A counting writer.
pub(crate) struct Counted<W: Write> {
    pub w: W,
    pub bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.w.write(b)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Run `sink` over the store.
pub(crate) fn drive<S: Symbolizer, K: Sink<S>, W: Write>(
    store: &Mutex<EventStore>,
    names: &mut Names<'_, S>,
    sink: &mut K,
    opts: &ExportOptions,
    w: W,
) -> io::Result<ExportSummary> {
    let (end, origin) = {
        let s = lock(store);
        (s.next_seq(), s.stats().oldest_timestamp.unwrap_or(0))
    };
    let mut out = Counted { w, bytes: 0 };
    let mut cx = Cx {
        names,
        buf: Vec::with_capacity(1 << 20),
        origin,
        summary: ExportSummary::default(),
        preview_bytes: opts.preview_bytes,
    };
    sink.begin(&mut cx)?;
    let mut threads = Threads::default();
    let wants_args = sink.wants_args();
    let mut cursor = 0u64;
    let chunk = opts.lock_chunk.max(1);
    loop {
        let next = {
            let s = lock(store);
            let st: &EventStore = &s;
            st.scan(cursor, chunk, |e| {
                if e.seq >= end {
                    return;
                }
                cx.summary.events += 1;
                event(&mut cx, sink, &mut threads, e, st, wants_args);
            })
        };
        out.write_all(&cx.buf)?;
        cx.buf.clear();
        sink.chunk_done()?;
        match next {
            Some(n) if n < end => cursor = n,
            _ => break,
        }
    }
    // Calls still open: closed at their process's last event.
    for i in 0..threads.list.len() {
        let last = threads.list[i].last_ts;
        while let Some(f) = threads.list[i].stack.pop() {
            close(
                &mut cx,
                sink,
                &mut threads.list[i],
                f,
                last,
                Close::Unfinished,
                None,
            );
        }
        if cx.buf.len() > 1 << 20 {
            out.write_all(&cx.buf)?;
            cx.buf.clear();
        }
    }
    out.write_all(&cx.buf)?;
    cx.buf.clear();
    cx.summary.processes = threads.list.len() as u64;
    sink.finish(&mut cx, &threads, &mut out)?;
    out.flush()?;
    cx.summary.nodes = cx.names.nodes.len() as u64;
    cx.summary.frames = cx.names.frames.len() as u64;
    cx.summary.bytes = out.bytes;
    Ok(cx.summary)
}

fn close<S: Symbolizer, K: Sink<S>>(
    cx: &mut Cx<'_, '_, S>,
    sink: &mut K,
    th: &mut Thread,
    f: Open,
    end: i64,
    how: Close,
    ret: Option<&StoredEvent<'_>>,
) {
    let d = (end - f.start).max(0);
    if let Some(p) = th.stack.last_mut() {
        p.child_ns += d;
    }
    cx.summary.calls += 1;
    match how {
        Close::Unfinished => cx.summary.unfinished += 1,
        Close::Unwound => cx.summary.unwound += 1,
        Close::Orphan => cx.summary.orphans += 1,
        _ => {}
    }
    sink.close(cx, th, &f, end, how, ret);
}

#[inline]
fn is_exit(kind: u8) -> bool {
    kind == EventKind::FunctionReturn as u8 || kind == EventKind::FunctionException as u8
}

fn event<S: Symbolizer, K: Sink<S>>(
    cx: &mut Cx<'_, '_, S>,
    sink: &mut K,
    threads: &mut Threads,
    e: &StoredEvent<'_>,
    store: &EventStore,
    wants_args: bool,
) {
    let rel = e.timestamp.saturating_sub(cx.origin).max(0);
    let (ti, new) = threads.get(cx.names, e.pid, rel);
    if new {
        sink.thread(cx, &threads.list[ti]);
    }
    let prev = threads.list[ti].last_ts;
    let ts = rel.max(prev);
    threads.list[ti].last_ts = ts;
    if e.kind == EventKind::FunctionCall as u8 {
        let frame = cx.names.frame(e.module, e.function, e.aux);
        let args = if wants_args {
            preview::field_preview(cx.names, e.payload, 0, cx.preview_bytes).map(Into::into)
        } else {
            None
        };
        let mut f = Open {
            call_id: e.id,
            frame,
            start: ts,
            child_ns: 0,
            tag: 0,
            args,
        };
        f.tag = sink.open(cx, &threads.list[ti], &f);
        threads.list[ti].stack.push(f);
    } else if is_exit(e.kind) {
        let th = &mut threads.list[ti];
        let how = if e.kind == EventKind::FunctionException as u8 {
            Close::Exception
        } else {
            Close::Return
        };
        match th.stack.iter().rposition(|f| f.call_id == e.correlation_id) {
            Some(i) => {
                while th.stack.len() > i + 1 {
                    let f = th.stack.pop().expect("above i");
                    close(cx, sink, th, f, ts, Close::Unwound, None);
                }
                let f = th.stack.pop().expect("frame i");
                close(cx, sink, th, f, ts, how, Some(e));
            }
            None => {
                // Its call is not in the store: everything open was left
                // by a crash inside it.
                let unwound = !th.stack.is_empty();
                while let Some(f) = th.stack.pop() {
                    close(cx, sink, th, f, ts, Close::Unwound, None);
                }
                // From the process's previous event (its calls all ended
                // by then) or the measured duration, whichever is later.
                let floor = if new { 0 } else { prev };
                let start = if unwound {
                    ts
                } else if e.aux > 0 {
                    (ts - e.aux).max(floor)
                } else {
                    floor
                };
                let mut f = Open {
                    call_id: 0,
                    frame: cx.names.frame(e.module, e.function, -1),
                    start,
                    child_ns: 0,
                    tag: 0,
                    args: None,
                };
                f.tag = sink.open(cx, th, &f);
                close(cx, sink, th, f, ts, Close::Orphan, Some(e));
            }
        }
        if e.kind == EventKind::FunctionException as u8 {
            sink.instant(cx, threads, ti, ts, e, store);
        }
    } else {
        sink.instant(cx, threads, ti, ts, e, store);
    }
}

/// Export the store to `w` in `opts.format`.
pub fn export<W: Write, S: Symbolizer>(
    store: &Mutex<EventStore>,
    w: W,
    names: &[(u64, Vec<u8>)],
    sym: &mut S,
    opts: &ExportOptions,
) -> io::Result<ExportSummary> {
    let mut names = Names::new(sym, &opts.home_node, names);
    match opts.format {
        Format::ChromeTrace => {
            let mut sink = chrome::Chrome::default();
            drive(store, &mut names, &mut sink, opts, w)
        }
        Format::Speedscope => {
            let mut sink = speedscope::Speedscope::new(opts);
            drive(store, &mut names, &mut sink, opts, w)
        }
        Format::Folded | Format::Flamegraph => {
            let mut sink = folded::Folded::new(opts);
            drive(store, &mut names, &mut sink, opts, w)
        }
    }
}

/// Export to the file `path`: written to a temporary file next to it
/// (`PATH.partial-<os pid>-<n>`), then renamed over `path`, so `path` is
/// either its old self or the complete export. On error the temporary
/// file is removed.
pub fn export_to_path<S: Symbolizer>(
    store: &Mutex<EventStore>,
    path: &Path,
    names: &[(u64, Vec<u8>)],
    sym: &mut S,
    opts: &ExportOptions,
) -> io::Result<ExportSummary> {
    let mut opts = opts.clone();
    if opts.spool_dir.is_none() {
        opts.spool_dir = Some(match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        });
    }
    crate::tracefile::writer::write_atomically(path, true, |w| export(store, w, names, sym, &opts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::store::{CorrelationFields, StoreConfig};

    /// Words: pids are `0x1000 + n` (node "a@h"), atoms `0x10 + n`.
    struct Fake;
    impl Symbolizer for Fake {
        fn classify(&mut self, w: u64) -> WordClass {
            if w >= 0x1000 {
                return WordClass::Pid {
                    node: b"a@h".to_vec(),
                    id: (w - 0x1000) as u32,
                    serial: 0,
                    creation: 1,
                };
            }
            let atoms = ["Elixir.M", "f", "g", "h"];
            match atoms.get((w - 0x10) as usize) {
                Some(a) => WordClass::Atom(a.as_bytes().to_vec()),
                None => WordClass::Unportable,
            }
        }
    }

    /// Nested calls in 5 processes, a crash (unwound frames), a return
    /// whose call was never stored (orphan), and calls left open.
    fn store() -> Mutex<EventStore> {
        let mut s = EventStore::new(StoreConfig::default());
        let mut id = 0u64;
        let mut put = |s: &mut EventStore, kind: EventKind, pid, f, ts, corr| {
            id += 1;
            let e = Event {
                id,
                timestamp: ts,
                pid,
                module: 0x10,
                function: f,
                aux: if kind == EventKind::FunctionCall {
                    1
                } else {
                    0
                },
                kind: kind as u8,
                ..Event::default()
            };
            s.insert(
                &e,
                CorrelationFields {
                    correlation_id: corr,
                    ..CorrelationFields::default()
                },
            );
            id
        };
        let mut ts = 0;
        for round in 0..400u64 {
            for p in 0..5u64 {
                let pid = 0x1000 + p;
                ts += 10;
                let a = put(&mut s, EventKind::FunctionCall, pid, 0x11, ts, 0);
                ts += 10;
                let b = put(&mut s, EventKind::FunctionCall, pid, 0x12, ts, 0);
                ts += 10;
                if round % 7 == 0 {
                    // A crash: b never returns, a's exception closes both.
                    put(&mut s, EventKind::FunctionException, pid, 0x11, ts, a);
                } else {
                    put(&mut s, EventKind::FunctionReturn, pid, 0x12, ts, b);
                    ts += 10;
                    put(&mut s, EventKind::FunctionReturn, pid, 0x11, ts, a);
                }
            }
        }
        ts += 10;
        put(&mut s, EventKind::FunctionReturn, 0x1000, 0x13, ts, 999_999);
        ts += 10;
        put(&mut s, EventKind::FunctionCall, 0x1001, 0x13, ts, 0);
        Mutex::new(s)
    }

    fn run(store: &Mutex<EventStore>, opts: &ExportOptions) -> (Vec<u8>, ExportSummary) {
        let mut out = Vec::new();
        let s = export(
            store,
            &mut out,
            &[(0x1000, b"first".to_vec())],
            &mut Fake,
            opts,
        )
        .unwrap();
        (out, s)
    }

    #[test]
    fn speedscope_spooled_equals_buffered_and_counts_add_up() {
        let st = store();
        let dir = std::env::temp_dir();
        let opts = ExportOptions {
            format: Format::Speedscope,
            home_node: b"a@h".to_vec(),
            spool_dir: Some(dir),
            lock_chunk: 64,
            ..ExportOptions::default()
        };
        let (whole, s1) = run(&st, &opts);
        let (spooled, s2) = run(
            &st,
            &ExportOptions {
                spool_at: 1024,
                ..opts.clone()
            },
        );
        assert_eq!(whole, spooled);
        assert_eq!(s1, s2);
        // 400 rounds × 5 processes × 2 calls, + the orphan and the open call.
        assert_eq!(s1.calls, 4002);
        assert_eq!(s1.unwound, 5 * 58);
        assert_eq!(s1.orphans, 1);
        assert_eq!(s1.unfinished, 1);
        assert_eq!(s1.processes, 5);
        assert_eq!(s1.stacks, 5);
        let text = String::from_utf8(whole).unwrap();
        assert!(text.contains("\"name\":\"<0.0.0> first\""));
        assert!(text.contains("{\"name\":\"M.f/1\"}"));
        assert_eq!(text.matches("\"type\":\"O\"").count(), 4002);
        assert_eq!(text.matches("\"type\":\"C\"").count(), 4002);
    }

    #[test]
    fn folded_weights_sum_to_calls_and_root_time() {
        let st = store();
        let opts = ExportOptions {
            format: Format::Folded,
            weight: Weight::Calls,
            home_node: b"a@h".to_vec(),
            ..ExportOptions::default()
        };
        let (out, s) = run(&st, &opts);
        let text = String::from_utf8(out).unwrap();
        let total: u64 = text
            .lines()
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert_eq!(total, s.calls);
        assert!(text.contains("<0.0.0> first;M.f/1;M.g/1 400\n"));
        let (out, _) = run(
            &st,
            &ExportOptions {
                weight: Weight::OwnTime,
                max_depth: 1,
                process_roots: false,
                ..opts
            },
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().all(|l| l.split(';').count() <= 2));
        assert!(text.contains("M.f/1;…"));
    }

    #[test]
    fn an_io_error_is_returned() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(28))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let st = store();
        for format in [
            Format::ChromeTrace,
            Format::Speedscope,
            Format::Folded,
            Format::Flamegraph,
        ] {
            let opts = ExportOptions {
                format,
                ..ExportOptions::default()
            };
            let e = export(&st, Broken, &[], &mut Fake, &opts).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(28));
        }
    }
}
