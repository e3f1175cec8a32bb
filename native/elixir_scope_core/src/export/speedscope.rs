//! speedscope's JSON file format
//! (<https://www.speedscope.app/file-format-schema.json>): one evented
//! profile per process (`O`/`C` frame events in nanoseconds since the
//! oldest event of the store), the functions as shared frames.
//!
//! The file lists each process's events together while the store holds
//! them interleaved: each process's events are rendered into a buffer of
//! its own, and buffers are moved to a spool file next to the output
//! whenever they hold more than [`SPOOL_AT`] bytes in total, then copied
//! into the output process by process at the end. Memory stays at most
//! [`SPOOL_AT`] plus a few words per process and per function.

use super::json::{put_str, put_u64};
use super::{Close, Cx, ExportOptions, Open, Sink, Thread, Threads};
use crate::store::StoredEvent;
use crate::tracefile::Symbolizer;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Buffered event bytes (all processes) above which buffers are spooled
/// (the default of [`ExportOptions::spool_at`]).
pub const SPOOL_AT: usize = 8 << 20;

#[derive(Default)]
struct Prof {
    events: u64,
    first: i64,
    last: i64,
    buf: Vec<u8>,
    /// Spooled parts: (offset, length).
    parts: Vec<(u64, u64)>,
}

/// The speedscope exporter.
pub struct Speedscope {
    profs: Vec<Prof>,
    buffered: usize,
    spool: Option<File>,
    spool_len: u64,
    spool_dir: PathBuf,
    title: String,
    spool_at: usize,
    /// Spooled bytes in all.
    pub spooled: u64,
}

impl Speedscope {
    /// An exporter spooling into `opts.spool_dir`.
    pub fn new(opts: &ExportOptions) -> Speedscope {
        Speedscope {
            profs: Vec::new(),
            buffered: 0,
            spool: None,
            spool_len: 0,
            spool_dir: opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir),
            title: opts.title.clone(),
            spool_at: opts.spool_at,
            spooled: 0,
        }
    }

    fn spool_file(&mut self) -> io::Result<&File> {
        if self.spool.is_none() {
            let mut p = self.spool_dir.join(".elixir_scope_spool");
            p = crate::tracefile::writer::temp_path(&p);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)?;
            // Unlinked at once: the space is freed when the file closes.
            let _ = std::fs::remove_file(&p);
            self.spool = Some(f);
        }
        Ok(self.spool.as_ref().expect("opened"))
    }

    fn spill(&mut self) -> io::Result<()> {
        let mut profs = std::mem::take(&mut self.profs);
        let result = (|| {
            for p in profs.iter_mut().filter(|p| !p.buf.is_empty()) {
                let at = self.spool_len;
                self.spool_file()?.write_all_at(&p.buf, at)?;
                p.parts.push((at, p.buf.len() as u64));
                self.spool_len += p.buf.len() as u64;
                self.spooled += p.buf.len() as u64;
                p.buf = Vec::new();
            }
            Ok(())
        })();
        self.profs = profs;
        self.buffered = 0;
        result
    }

    fn event(&mut self, th: &Thread, ty: u8, frame: u32, at: i64) {
        let i = th.tid as usize - 1;
        if self.profs.len() <= i {
            self.profs.resize_with(i + 1, Prof::default);
        }
        let p = &mut self.profs[i];
        let before = p.buf.len();
        if p.events == 0 {
            p.first = at;
        } else {
            p.buf.push(b',');
        }
        p.events += 1;
        p.last = at;
        p.buf.extend_from_slice(b"{\"type\":\"");
        p.buf.push(ty);
        p.buf.extend_from_slice(b"\",\"frame\":");
        put_u64(&mut p.buf, frame as u64);
        p.buf.extend_from_slice(b",\"at\":");
        put_u64(&mut p.buf, at.max(0) as u64);
        p.buf.push(b'}');
        self.buffered += p.buf.len() - before;
    }
}

impl<S: Symbolizer> Sink<S> for Speedscope {
    fn open(&mut self, _cx: &mut Cx<'_, '_, S>, th: &Thread, f: &Open) -> u32 {
        self.event(th, b'O', f.frame, f.start);
        0
    }

    fn close(
        &mut self,
        _cx: &mut Cx<'_, '_, S>,
        th: &Thread,
        f: &Open,
        end: i64,
        _how: Close,
        _ret: Option<&StoredEvent<'_>>,
    ) {
        self.event(th, b'C', f.frame, end);
    }

    fn chunk_done(&mut self) -> io::Result<()> {
        if self.buffered > self.spool_at {
            self.spill()?;
        }
        Ok(())
    }

    fn finish<W: Write>(
        &mut self,
        cx: &mut Cx<'_, '_, S>,
        threads: &Threads,
        w: &mut W,
    ) -> io::Result<()> {
        let mut o = Vec::new();
        o.extend_from_slice(
            b"{\"$schema\":\"https://www.speedscope.app/file-format-schema.json\",\
              \"exporter\":\"elixir_scope\",\"name\":",
        );
        put_str(&mut o, &self.title);
        // The busiest process is shown first.
        let shown: Vec<usize> = (0..self.profs.len())
            .filter(|&i| self.profs[i].events > 0)
            .collect();
        let active = shown
            .iter()
            .enumerate()
            .max_by_key(|(k, &i)| (self.profs[i].events, std::cmp::Reverse(*k)))
            .map_or(0, |(k, _)| k);
        o.extend_from_slice(b",\"activeProfileIndex\":");
        put_u64(&mut o, active as u64);
        o.extend_from_slice(b",\"profiles\":[");
        w.write_all(&o)?;
        let mut chunk = Vec::new();
        for (k, &i) in shown.iter().enumerate() {
            let th = &threads.list[i];
            let p = &self.profs[i];
            o.clear();
            if k > 0 {
                o.push(b',');
            }
            o.extend_from_slice(b"\n{\"type\":\"evented\",\"name\":");
            put_str(&mut o, &th.label);
            o.extend_from_slice(b",\"unit\":\"nanoseconds\",\"startValue\":");
            put_u64(&mut o, p.first.max(0) as u64);
            o.extend_from_slice(b",\"endValue\":");
            put_u64(&mut o, p.last.max(0) as u64);
            o.extend_from_slice(b",\"events\":[");
            w.write_all(&o)?;
            for &(at, len) in &p.parts {
                let spool = self.spool.as_ref().expect("spooled parts have a spool");
                let mut off = 0u64;
                while off < len {
                    let n = (len - off).min(1 << 20) as usize;
                    chunk.resize(n, 0);
                    spool.read_exact_at(&mut chunk, at + off)?;
                    w.write_all(&chunk)?;
                    off += n as u64;
                }
            }
            w.write_all(&p.buf)?;
            w.write_all(b"]}")?;
        }
        cx.summary.stacks = shown.len() as u64;
        o.clear();
        o.extend_from_slice(b"\n],\"shared\":{\"frames\":[");
        for (i, f) in cx.names.frames.iter().enumerate() {
            if i > 0 {
                o.push(b',');
            }
            o.extend_from_slice(b"\n{\"name\":");
            put_str(&mut o, f);
            o.push(b'}');
            if o.len() > 1 << 20 {
                w.write_all(&o)?;
                o.clear();
            }
        }
        o.extend_from_slice(b"]}}\n");
        w.write_all(&o)?;
        self.spool = None;
        Ok(())
    }
}
