//! Folded stacks (`root;caller;callee weight`, one line per distinct
//! stack, the format of flamegraph.pl's `stackcollapse` tools and
//! inferno) and the SVG flame graph inferno draws from them.
//!
//! Stacks are kept as a tree of (parent stack, frame) nodes with a weight
//! each: own time (ns: the call's time minus its traced callees') or
//! calls. Each stack starts with its process (`<0.123.0> name`) unless
//! [`ExportOptions::process_roots`] is off. Frames deeper than
//! [`ExportOptions::max_depth`] are merged into one `…` frame at that
//! depth, so a deep recursion costs lines in proportion to the cap, not
//! to its depth squared. At most [`MAX_STACKS`] stacks are kept; calls
//! that would need more are counted in their parent's stack
//! (`untracked`).

use super::{Close, Cx, ExportOptions, Format, Open, Sink, Thread, Threads, Weight};
use crate::hash::FastMap;
use crate::store::StoredEvent;
use crate::tracefile::Symbolizer;
use std::io::{self, Write};

/// Most distinct stacks kept.
pub const MAX_STACKS: usize = 1 << 20;

const ROOT: u32 = 0;
/// Frame number of the merged deeper frames.
const DEEPER: u32 = u32::MAX;

/// The folded-stacks (and flame graph) exporter.
pub struct Folded {
    /// (parent, frame) of each stack node; node 0 is the root.
    nodes: Vec<(u32, u32)>,
    weights: Vec<u64>,
    index: FastMap<(u32, u32), u32>,
    /// Frame numbers of the process roots (by tid).
    proc_frames: Vec<u32>,
    proc_labels: Vec<Box<str>>,
    weight: Weight,
    max_depth: usize,
    process_roots: bool,
    svg: bool,
    title: String,
}

impl Folded {
    /// An exporter for `opts`.
    pub fn new(opts: &ExportOptions) -> Folded {
        Folded {
            nodes: vec![(ROOT, ROOT)],
            weights: vec![0],
            index: FastMap::default(),
            proc_frames: Vec::new(),
            proc_labels: Vec::new(),
            weight: opts.weight,
            max_depth: opts.max_depth.max(1),
            process_roots: opts.process_roots,
            svg: opts.format == Format::Flamegraph,
            title: opts.title.clone(),
        }
    }

    /// The node (parent, frame), created if there is room; `None` if
    /// the table is full.
    fn child(&mut self, parent: u32, frame: u32) -> Option<u32> {
        if let Some(&n) = self.index.get(&(parent, frame)) {
            return Some(n);
        }
        if self.nodes.len() >= MAX_STACKS {
            return None;
        }
        let n = self.nodes.len() as u32;
        self.nodes.push((parent, frame));
        self.weights.push(0);
        self.index.insert((parent, frame), n);
        Some(n)
    }

    /// The process root node of `th` (frames above `u32::MAX / 2` are
    /// process labels).
    fn root_of(&mut self, th: &Thread) -> u32 {
        if !self.process_roots {
            return ROOT;
        }
        let i = th.tid as usize - 1;
        while self.proc_frames.len() <= i {
            let k = self.proc_labels.len() as u32;
            self.proc_frames.push(u32::MAX / 2 + k);
            self.proc_labels.push("".into());
        }
        if self.proc_labels[i].is_empty() {
            self.proc_labels[i] = th.label.clone();
        }
        let f = self.proc_frames[i];
        self.child(ROOT, f).unwrap_or(ROOT)
    }

    fn name<'a, S: Symbolizer>(&'a self, cx: &'a Cx<'_, '_, S>, frame: u32) -> &'a str {
        if frame == DEEPER {
            "…"
        } else if frame >= u32::MAX / 2 {
            &self.proc_labels[(frame - u32::MAX / 2) as usize]
        } else {
            &cx.names.frames[frame as usize]
        }
    }

    /// Append a frame name with the format's separators replaced.
    fn put_frame(out: &mut Vec<u8>, name: &str) {
        for c in name.chars() {
            match c {
                ';' => out.push(b':'),
                '\n' | '\r' => out.push(b' '),
                c => {
                    let mut b = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
    }

    /// Write the folded lines to `w` (sorted by node, i.e. by first
    /// appearance); returns the number of lines.
    fn lines<S: Symbolizer, W: Write>(&self, cx: &Cx<'_, '_, S>, w: &mut W) -> io::Result<u64> {
        let mut out = Vec::with_capacity(1 << 16);
        let mut path = Vec::new();
        let mut n = 0u64;
        for (i, &wt) in self.weights.iter().enumerate().skip(1) {
            if wt == 0 {
                continue;
            }
            path.clear();
            let mut at = i as u32;
            while at != ROOT {
                let (parent, frame) = self.nodes[at as usize];
                path.push(frame);
                at = parent;
            }
            for (k, &f) in path.iter().rev().enumerate() {
                if k > 0 {
                    out.push(b';');
                }
                Self::put_frame(&mut out, self.name(cx, f));
            }
            out.push(b' ');
            super::json::put_u64(&mut out, wt);
            out.push(b'\n');
            n += 1;
            if out.len() > 1 << 16 {
                w.write_all(&out)?;
                out.clear();
            }
        }
        w.write_all(&out)?;
        Ok(n)
    }
}

impl<S: Symbolizer> Sink<S> for Folded {
    fn open(&mut self, cx: &mut Cx<'_, '_, S>, th: &Thread, f: &Open) -> u32 {
        let depth = th.stack.len();
        let parent = match th.stack.last() {
            Some(p) => p.tag,
            None => self.root_of(th),
        };
        let node = if depth > self.max_depth {
            parent
        } else {
            let frame = if depth == self.max_depth {
                DEEPER
            } else {
                f.frame
            };
            match self.child(parent, frame) {
                Some(n) => n,
                None => {
                    cx.summary.untracked += 1;
                    parent
                }
            }
        };
        if self.weight == Weight::Calls {
            self.weights[node as usize] += 1;
        }
        node
    }

    fn close(
        &mut self,
        _cx: &mut Cx<'_, '_, S>,
        _th: &Thread,
        f: &Open,
        end: i64,
        _how: Close,
        _ret: Option<&StoredEvent<'_>>,
    ) {
        if self.weight == Weight::OwnTime {
            let own = ((end - f.start).max(0) - f.child_ns).max(0);
            self.weights[f.tag as usize] += own as u64;
        }
    }

    fn finish<W: Write>(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        _threads: &Threads,
        w: &mut W,
    ) -> io::Result<()> {
        if !self.svg {
            cx.summary.stacks = self.lines(cx, w)?;
            return Ok(());
        }
        let mut text = Vec::new();
        cx.summary.stacks = self.lines(cx, &mut text)?;
        let text = String::from_utf8_lossy(&text);
        let mut o = inferno::flamegraph::Options::default();
        o.title = self.title.clone();
        o.count_name = match self.weight {
            Weight::OwnTime => "ns".into(),
            Weight::Calls => "calls".into(),
        };
        o.name_type = "Function:".into();
        o.deterministic = true;
        if cx.summary.stacks == 0 {
            // inferno refuses an empty input: an empty graph says so.
            o.subtitle = Some("no completed calls in this trace".into());
            return inferno::flamegraph::from_lines(&mut o, ["(no calls) 1"], w);
        }
        inferno::flamegraph::from_lines(&mut o, text.lines(), w)
    }
}
