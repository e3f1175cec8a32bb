//! A checker for external term format (ETF) blobs found in trace files.
//!
//! Payload terms the tape cannot hold natively (bignums, references, funs,
//! remote pids) are kept as ETF. Before such a blob from a file may reach
//! `binary_to_term`, [`scan`] walks it completely: every tag known to
//! OTP 25's `term_to_binary`, every length against the bytes left, nesting
//! at most [`MAX_ETF_DEPTH`], nothing after the term. It reports each atom
//! (so the binding can check it exists or create it within its budget) and
//! each node reference (so a pid, port or reference of another VM can get
//! a creation that keeps it foreign). Compressed terms, distribution
//! headers and atom-cache references are refused.

use super::bytes::{Cursor, Short};

/// Deepest nesting accepted in an ETF blob.
pub const MAX_ETF_DEPTH: u32 = 200;

/// What the scan reports.
pub trait EtfVisitor {
    /// An atom (`utf8`: its bytes are UTF-8, else Latin-1).
    fn atom(&mut self, name: &[u8], utf8: bool) -> Result<(), String>;
    /// A node reference of a pid, port or reference: the node's atom name
    /// and creation; return a new creation to patch it in place.
    fn node(&mut self, name: &[u8], utf8: bool, creation: u32) -> Option<u32>;
}

fn short(_: Short) -> String {
    "external term cut short".to_string()
}

fn skip(c: &mut Cursor, n: usize) -> Result<(), String> {
    c.take(n).map(|_| ()).map_err(short)
}

/// Check an ETF blob (with its version byte), patching creations as the
/// visitor asks.
pub fn scan<V: EtfVisitor>(blob: &mut [u8], v: &mut V) -> Result<(), String> {
    let mut patches: Vec<(usize, u32, bool)> = Vec::new();
    {
        let mut c = Cursor::new(blob);
        if c.u8().map_err(short)? != 131 {
            return Err("external term without version byte 131".into());
        }
        term(&mut c, v, 0, &mut patches)?;
        if !c.is_empty() {
            return Err("bytes after the external term".into());
        }
    }
    for (at, creation, wide) in patches {
        if wide {
            blob[at..at + 4].copy_from_slice(&creation.to_be_bytes());
        } else {
            blob[at] = creation as u8;
        }
    }
    Ok(())
}

/// An atom term; returns its name and encoding.
fn atom<'a>(c: &mut Cursor<'a>) -> Result<(&'a [u8], bool), String> {
    let tag = c.u8().map_err(short)?;
    let (n, utf8) = match tag {
        100 => (c.u16_be().map_err(short)? as usize, false),
        118 => (c.u16_be().map_err(short)? as usize, true),
        115 => (c.u8().map_err(short)? as usize, false),
        119 => (c.u8().map_err(short)? as usize, true),
        t => return Err(format!("expected an atom, found tag {t}")),
    };
    let name = c.take(n).map_err(short)?;
    if utf8 && std::str::from_utf8(name).is_err() {
        return Err("atom is not UTF-8".into());
    }
    Ok((name, utf8))
}

fn node_ref<V: EtfVisitor>(
    c: &mut Cursor,
    v: &mut V,
    wide: bool,
    trailing: usize,
    patches: &mut Vec<(usize, u32, bool)>,
) -> Result<(), String> {
    let (name, utf8) = atom(c)?;
    v.atom(name, utf8)?;
    // Numbers before the creation.
    c.take(trailing).map_err(short)?;
    let at = c.pos();
    let creation = if wide {
        c.u32_be().map_err(short)?
    } else {
        c.u8().map_err(short)? as u32
    };
    if let Some(new) = v.node(name, utf8, creation) {
        patches.push((at, new, wide));
    }
    Ok(())
}

fn term<V: EtfVisitor>(
    c: &mut Cursor,
    v: &mut V,
    depth: u32,
    patches: &mut Vec<(usize, u32, bool)>,
) -> Result<(), String> {
    if depth > MAX_ETF_DEPTH {
        return Err(format!("external term nested deeper than {MAX_ETF_DEPTH}"));
    }
    let tag = c.peek().ok_or_else(|| short(Short::Eof))?;
    if matches!(tag, 100 | 115 | 118 | 119) {
        let (name, utf8) = atom(c)?;
        return v.atom(name, utf8);
    }
    c.u8().map_err(short)?;
    let count = |c: &mut Cursor, n: usize| -> Result<usize, String> {
        if n > c.remaining() {
            Err(format!("external term claims {n} elements"))
        } else {
            Ok(n)
        }
    };
    match tag {
        97 => skip(c, 1)?, // SMALL_INTEGER_EXT
        98 => skip(c, 4)?, // INTEGER_EXT
        70 => {
            // NEW_FLOAT_EXT
            let b = c.take(8).map_err(short)?;
            if !f64::from_be_bytes(b.try_into().expect("8")).is_finite() {
                return Err("float is not finite".into());
            }
        }
        99 => skip(c, 31)?, // FLOAT_EXT
        106 => {}           // NIL_EXT
        107 => {
            // STRING_EXT
            let n = c.u16_be().map_err(short)? as usize;
            c.take(n).map_err(short)?;
        }
        109 => {
            // BINARY_EXT
            let n = c.u32_be().map_err(short)? as usize;
            c.take(n).map_err(short)?;
        }
        77 => {
            // BIT_BINARY_EXT
            let n = c.u32_be().map_err(short)? as usize;
            let bits = c.u8().map_err(short)?;
            if !(1..=8).contains(&bits) || n == 0 {
                return Err("bad bit binary".into());
            }
            c.take(n).map_err(short)?;
        }
        110 => {
            // SMALL_BIG_EXT
            let n = c.u8().map_err(short)? as usize;
            c.take(1 + n).map_err(short)?;
        }
        111 => {
            // LARGE_BIG_EXT
            let n = c.u32_be().map_err(short)? as usize;
            c.take(1).map_err(short)?;
            c.take(n).map_err(short)?;
        }
        104 | 105 => {
            // SMALL_TUPLE_EXT, LARGE_TUPLE_EXT
            let n = if tag == 104 {
                c.u8().map_err(short)? as usize
            } else {
                c.u32_be().map_err(short)? as usize
            };
            for _ in 0..count(c, n)? {
                term(c, v, depth + 1, patches)?;
            }
        }
        108 => {
            // LIST_EXT: n elements and a tail
            let n = c.u32_be().map_err(short)? as usize;
            for _ in 0..count(c, n)? {
                term(c, v, depth + 1, patches)?;
            }
            term(c, v, depth + 1, patches)?;
        }
        116 => {
            // MAP_EXT
            let n = c.u32_be().map_err(short)? as usize;
            for _ in 0..count(c, n.saturating_mul(2))? {
                term(c, v, depth + 1, patches)?;
            }
        }
        88 => node_ref(c, v, true, 8, patches)?, // NEW_PID_EXT: id, serial, creation
        103 => node_ref(c, v, false, 8, patches)?, // PID_EXT
        89 => node_ref(c, v, true, 4, patches)?, // NEW_PORT_EXT
        120 => node_ref(c, v, true, 8, patches)?, // V4_PORT_EXT
        102 => node_ref(c, v, false, 4, patches)?, // PORT_EXT
        101 => node_ref(c, v, false, 4, patches)?, // REFERENCE_EXT
        114 | 90 => {
            // NEW_REFERENCE_EXT / NEWER_REFERENCE_EXT: len, node, creation, ids
            let n = c.u16_be().map_err(short)? as usize;
            if n > 5 {
                return Err(format!("reference of {n} words"));
            }
            node_ref(c, v, tag == 90, 0, patches)?;
            c.take(4 * n).map_err(short)?;
        }
        113 => {
            // EXPORT_EXT: module, function, arity
            for _ in 0..2 {
                let (name, utf8) = atom(c)?;
                v.atom(name, utf8)?;
            }
            if c.u8().map_err(short)? != 97 {
                return Err("export arity is not a small integer".into());
            }
            c.take(1).map_err(short)?;
        }
        112 => {
            // NEW_FUN_EXT: size, arity, uniq[16], index, numfree, module,
            // old index, old uniq, pid, free variables
            let size = c.u32_be().map_err(short)? as usize;
            if size < 4 || size - 4 > c.remaining() {
                return Err("fun size out of range".into());
            }
            let start = c.pos();
            c.take(1 + 16 + 4).map_err(short)?;
            let free = c.u32_be().map_err(short)? as usize;
            let (name, utf8) = atom(c)?;
            v.atom(name, utf8)?;
            for _ in 0..3 {
                term(c, v, depth + 1, patches)?;
            }
            for _ in 0..count(c, free)? {
                term(c, v, depth + 1, patches)?;
            }
            if c.pos() - start != size - 4 {
                return Err("fun size does not match its contents".into());
            }
        }
        80 => return Err("compressed external terms are not accepted".into()),
        82 => return Err("atom cache references are not accepted".into()),
        t => return Err(format!("unknown external term tag {t}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect(Vec<String>);
    impl EtfVisitor for Collect {
        fn atom(&mut self, name: &[u8], _: bool) -> Result<(), String> {
            self.0.push(String::from_utf8_lossy(name).into());
            Ok(())
        }
        fn node(&mut self, _: &[u8], _: bool, creation: u32) -> Option<u32> {
            Some(creation + 1)
        }
    }

    #[test]
    fn scans_a_pid_and_patches_its_creation() {
        // term_to_binary(self()) on OTP 25 (nonode@nohost, creation 0).
        let mut b = vec![
            131, 88, 100, 0, 13, 110, 111, 110, 111, 100, 101, 64, 110, 111, 104, 111, 115, 116, 0,
            0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let mut v = Collect(vec![]);
        scan(&mut b, &mut v).unwrap();
        assert_eq!(v.0, ["nonode@nohost"]);
        assert_eq!(&b[26..30], &[0, 0, 0, 1]);
    }

    #[test]
    fn refuses_lies_and_trailing_bytes() {
        let mut v = Collect(vec![]);
        // A list claiming 2^32-1 elements in 6 bytes.
        assert!(scan(&mut [131, 108, 255, 255, 255, 255, 106], &mut v).is_err());
        assert!(scan(&mut [131, 106, 0], &mut v).is_err());
        assert!(scan(&mut [131, 80, 0, 0, 0, 1, 0], &mut v).is_err());
        assert!(scan(&mut [130, 106], &mut v).is_err());
        let mut deep = vec![131];
        deep.extend(std::iter::repeat([104u8, 1]).take(300).flatten());
        deep.push(106);
        assert!(scan(&mut deep, &mut v).unwrap_err().contains("deeper"));
    }
}
