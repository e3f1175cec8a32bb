//! The Chrome Trace Event Format (JSON object form), as Perfetto and
//! Chrome's trace viewer read it.
//!
//! * Each node is a trace process (`pid` 1, 2, ... named by a
//!   `process_name` metadata event), each Erlang process a thread of it
//!   (`tid`, named `<0.123.0> registered name or initial call`).
//! * Every call is a complete event (`ph: "X"`) from its call to its
//!   return (args: `args`, `return` or `exception` previews, `end`: how it
//!   ended, `call_id`); calls of one thread nest.
//! * Sends, receives, spawns (on the parent's thread), exits, exceptions,
//!   links and unlinks, state records and other events are thread-scoped
//!   instant events (`ph: "i"`, `s: "t"`) with payload previews.
//! * Each matched send → receive pair is a flow: a start (`ph: "s"`) at
//!   the send, binding to the call the send was made in, and an end
//!   (`ph: "f"`) at the receive, binding to the next call of the
//!   receiver (the callback the message triggers), both with the send's
//!   id. Both are written when the receive is met, so every start has its
//!   end.
//!
//! Timestamps are microseconds (three decimals: nanoseconds) since the
//! oldest event of the store.

use super::json::{put_escaped, put_i64, put_id, put_str, put_u64, put_us};
use super::preview::{field_is_nil, field_preview};
use super::{Close, Cx, Open, Sink, Thread, Threads};
use crate::event::EventKind;
use crate::store::{EventStore, StoredEvent};
use crate::tracefile::Symbolizer;
use std::io::{self, Write};

/// The Chrome trace exporter.
#[derive(Default)]
pub struct Chrome {
    /// Events written (for the commas).
    written: u64,
    /// Nodes whose `process_name` was written.
    nodes_named: Vec<bool>,
}

impl Chrome {
    fn sep(&mut self, buf: &mut Vec<u8>) {
        if self.written > 0 {
            buf.extend_from_slice(b",\n");
        }
        self.written += 1;
    }

    /// `{"ph":PH,"name":NAME,"cat":CAT,"ts":TS,"pid":P,"tid":T` (open).
    #[allow(clippy::too_many_arguments)]
    fn head(
        &mut self,
        buf: &mut Vec<u8>,
        ph: &str,
        name: &str,
        cat: &str,
        ts: i64,
        node: u32,
        tid: u32,
    ) {
        self.sep(buf);
        buf.extend_from_slice(b"{\"ph\":\"");
        buf.extend_from_slice(ph.as_bytes());
        buf.extend_from_slice(b"\",\"name\":");
        put_str(buf, name);
        buf.extend_from_slice(b",\"cat\":\"");
        buf.extend_from_slice(cat.as_bytes());
        buf.extend_from_slice(b"\",\"ts\":");
        put_us(buf, ts);
        buf.extend_from_slice(b",\"pid\":");
        put_u64(buf, node as u64 + 1);
        buf.extend_from_slice(b",\"tid\":");
        put_u64(buf, tid as u64);
    }

    fn name_node<S: Symbolizer>(&mut self, cx: &mut Cx<'_, '_, S>, node: u32) {
        let n = node as usize;
        if self.nodes_named.len() <= n {
            self.nodes_named.resize(n + 1, false);
        }
        if self.nodes_named[n] {
            return;
        }
        self.nodes_named[n] = true;
        let name = cx.names.nodes[n].clone();
        let buf = &mut cx.buf;
        for (meta, arg) in [
            ("process_name", "name"),
            ("process_sort_index", "sort_index"),
        ] {
            self.sep(buf);
            buf.extend_from_slice(b"{\"ph\":\"M\",\"name\":\"");
            buf.extend_from_slice(meta.as_bytes());
            buf.extend_from_slice(b"\",\"pid\":");
            put_u64(buf, node as u64 + 1);
            buf.extend_from_slice(b",\"tid\":0,\"args\":{\"");
            buf.extend_from_slice(arg.as_bytes());
            buf.extend_from_slice(b"\":");
            if arg == "name" {
                put_str(buf, &name);
            } else {
                put_u64(buf, node as u64);
            }
            buf.extend_from_slice(b"}}");
        }
    }
}

/// `,"KEY":"VALUE"` (escaped).
fn arg(buf: &mut Vec<u8>, key: &str, value: &str) {
    buf.extend_from_slice(b",\"");
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(b"\":");
    put_str(buf, value);
}

/// The preview of field `i`, unless absent or the `nil` placeholder of
/// contents not captured.
fn captured<S: Symbolizer>(cx: &mut Cx<'_, '_, S>, payload: &[u8], i: usize) -> Option<String> {
    if field_is_nil(cx.names, payload, i) {
        return None;
    }
    field_preview(cx.names, payload, i, cx.preview_bytes)
}

fn label<S: Symbolizer>(cx: &mut Cx<'_, '_, S>, w: u64) -> String {
    let mut s = String::new();
    cx.names.put_word(&mut s, w);
    s
}

impl<S: Symbolizer> Sink<S> for Chrome {
    fn wants_args(&self) -> bool {
        true
    }

    fn begin(&mut self, cx: &mut Cx<'_, '_, S>) -> io::Result<()> {
        cx.buf
            .extend_from_slice(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n");
        Ok(())
    }

    fn thread(&mut self, cx: &mut Cx<'_, '_, S>, th: &Thread) {
        self.name_node(cx, th.node);
        let buf = &mut cx.buf;
        for (meta, key) in [("thread_name", "name"), ("thread_sort_index", "sort_index")] {
            self.sep(buf);
            buf.extend_from_slice(b"{\"ph\":\"M\",\"name\":\"");
            buf.extend_from_slice(meta.as_bytes());
            buf.extend_from_slice(b"\",\"pid\":");
            put_u64(buf, th.node as u64 + 1);
            buf.extend_from_slice(b",\"tid\":");
            put_u64(buf, th.tid as u64);
            buf.extend_from_slice(b",\"args\":{\"");
            buf.extend_from_slice(key.as_bytes());
            buf.extend_from_slice(b"\":");
            if key == "name" {
                put_str(buf, &th.label);
            } else {
                put_u64(buf, th.tid as u64);
            }
            buf.extend_from_slice(b"}}");
        }
    }

    fn open(&mut self, _cx: &mut Cx<'_, '_, S>, _th: &Thread, _f: &Open) -> u32 {
        0
    }

    fn close(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        th: &Thread,
        f: &Open,
        end: i64,
        how: Close,
        ret: Option<&StoredEvent<'_>>,
    ) {
        let (result, exception) = match (how, ret) {
            (Close::Exception, Some(e)) => {
                let class = field_preview(cx.names, e.payload, 0, 32).unwrap_or_default();
                let value = field_preview(cx.names, e.payload, 1, cx.preview_bytes);
                (
                    None,
                    Some(format!("{class}: {}", value.unwrap_or_default())),
                )
            }
            (_, Some(e)) if e.kind == EventKind::FunctionReturn as u8 => {
                (captured(cx, e.payload, 0), None)
            }
            _ => (None, None),
        };
        let name = cx.names.frames[f.frame as usize].clone();
        let buf = &mut cx.buf;
        self.head(buf, "X", &name, "call", f.start, th.node, th.tid);
        buf.extend_from_slice(b",\"dur\":");
        put_us(buf, (end - f.start).max(0));
        buf.extend_from_slice(b",\"args\":{\"end\":\"");
        buf.extend_from_slice(how.name().as_bytes());
        buf.push(b'"');
        if f.call_id != 0 {
            buf.extend_from_slice(b",\"call_id\":");
            put_id(buf, f.call_id);
        }
        if let Some(a) = &f.args {
            if &**a != "nil" {
                arg(buf, "args", a);
            }
        }
        if let Some(r) = result {
            arg(buf, "return", &r);
        }
        if let Some(x) = exception {
            arg(buf, "exception", &x);
        }
        buf.extend_from_slice(b"}}");
    }

    fn instant(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        threads: &mut Threads,
        ti: usize,
        ts: i64,
        e: &StoredEvent<'_>,
        store: &EventStore,
    ) {
        let kind = EventKind::from_u8(e.kind);
        let mut args: Vec<(&str, String)> = Vec::new();
        let mut on = ti;
        let (name, cat) = match kind {
            EventKind::MessageSend => {
                if e.peer != 0 {
                    args.push(("to", label(cx, e.peer)));
                } else if let Some(to) = field_preview(cx.names, e.payload, 1, 64) {
                    args.push(("to", to));
                }
                if let Some(m) = captured(cx, e.payload, 2) {
                    args.push(("message", m));
                }
                ("send", "message")
            }
            EventKind::MessageReceive => {
                if e.peer != 0 {
                    args.push(("from", label(cx, e.peer)));
                }
                if let Some(m) = captured(cx, e.payload, 1) {
                    args.push(("message", m));
                }
                ("receive", "message")
            }
            EventKind::ProcessSpawn => {
                args.push(("child", threads.list[ti].label.to_string()));
                if e.peer != 0 {
                    // Met through another process's event: no time of its own yet.
                    let (pi, new) = threads.get(cx.names, e.peer, 0);
                    if new {
                        self.thread(cx, &threads.list[pi]);
                    }
                    on = pi;
                }
                ("spawn", "process")
            }
            EventKind::ProcessExit => {
                if let Some(r) = field_preview(cx.names, e.payload, 1, cx.preview_bytes) {
                    args.push(("reason", r));
                }
                ("exit", "process")
            }
            EventKind::FunctionException => {
                let f = cx.names.frame(e.module, e.function, -1);
                args.push(("function", cx.names.frames[f as usize].to_string()));
                let class = field_preview(cx.names, e.payload, 0, 32).unwrap_or_default();
                let value = field_preview(cx.names, e.payload, 1, cx.preview_bytes);
                args.push((
                    "exception",
                    format!("{class}: {}", value.unwrap_or_default()),
                ));
                ("exception", "error")
            }
            EventKind::ProcessLink => {
                args.push(("with", label(cx, e.peer)));
                (if e.aux == 1 { "link" } else { "unlink" }, "process")
            }
            EventKind::StateChange | EventKind::StateSnapshot => {
                if let Some(s) = field_preview(cx.names, e.payload, 0, cx.preview_bytes) {
                    args.push(("state", s));
                }
                ("state", "state")
            }
            EventKind::Error => {
                if let Some(s) = field_preview(cx.names, e.payload, 0, cx.preview_bytes) {
                    args.push(("error", s));
                }
                ("error", "error")
            }
            EventKind::PerformanceMetric => {
                if let Some(s) = field_preview(cx.names, e.payload, 0, cx.preview_bytes) {
                    args.push(("metric", s));
                }
                ("metric", "metric")
            }
            _ => {
                if let Some(s) = field_preview(cx.names, e.payload, 0, cx.preview_bytes) {
                    args.push(("term", s));
                }
                ("event", "event")
            }
        };
        cx.summary.instants += 1;
        let (node, tid) = (threads.list[on].node, threads.list[on].tid);
        let buf = &mut cx.buf;
        self.head(buf, "i", name, cat, ts, node, tid);
        buf.extend_from_slice(b",\"s\":\"t\",\"args\":{\"id\":");
        put_id(buf, e.id);
        for (k, v) in &args {
            arg(buf, k, v);
        }
        buf.extend_from_slice(b"}}");

        // The arrow from the send, when it is stored.
        if kind == EventKind::MessageReceive && e.correlation_id != 0 {
            let Some(send) = store
                .get(e.correlation_id)
                .filter(|s| s.kind == EventKind::MessageSend as u8)
            else {
                return;
            };
            let sts = send.timestamp.saturating_sub(cx.origin).max(0);
            let (si, new) = threads.get(cx.names, send.pid, 0);
            if new {
                self.thread(cx, &threads.list[si]);
            }
            let (snode, stid) = (threads.list[si].node, threads.list[si].tid);
            let buf = &mut cx.buf;
            self.head(buf, "s", "message", "message", sts, snode, stid);
            buf.extend_from_slice(b",\"id\":");
            put_id(buf, send.id);
            buf.push(b'}');
            self.head(buf, "f", "message", "message", ts.max(sts), node, tid);
            buf.extend_from_slice(b",\"id\":");
            put_id(buf, send.id);
            buf.push(b'}');
            cx.summary.flows += 1;
        }
    }

    fn finish<W: Write>(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        threads: &Threads,
        w: &mut W,
    ) -> io::Result<()> {
        let s = &cx.summary;
        let mut o = Vec::new();
        o.extend_from_slice(b"\n],\"otherData\":{\"exporter\":\"elixir_scope\"");
        for (k, v) in [
            ("events", s.events),
            ("calls", s.calls),
            ("unfinished_calls", s.unfinished),
            ("unwound_calls", s.unwound),
            ("orphan_returns", s.orphans),
            ("instants", s.instants),
            ("flows", s.flows),
            ("processes", threads.list.len() as u64),
        ] {
            o.extend_from_slice(b",\"");
            put_escaped(&mut o, k);
            o.extend_from_slice(b"\":");
            put_u64(&mut o, v);
        }
        o.extend_from_slice(b",\"origin_ns\":");
        put_i64(&mut o, cx.origin);
        o.extend_from_slice(b"}}\n");
        w.write_all(&o)
    }
}
