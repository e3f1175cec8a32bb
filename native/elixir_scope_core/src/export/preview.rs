//! Payload previews: a stored payload's terms printed as Elixir prints
//! them (`{:ok, [1, 2]}`, `%{a: 1}` as `%{:a => 1}`), cut at a byte
//! budget with `…`. Words are named through [`Names`]; terms the tape
//! keeps in external term format print by kind (`#Reference<…>`,
//! `#Function<…>`), bignums in full when they fit 128 bits.

use super::Names;
use crate::tape::*;
use crate::tracefile::Symbolizer;
use std::fmt::Write as _;

/// Why rendering stopped early.
enum Stop {
    /// The budget was reached.
    Full,
    /// The tape is malformed (a preview says so, nothing else happens).
    Bad,
}

struct R<'t> {
    b: &'t [u8],
    at: usize,
}

impl<'t> R<'t> {
    fn take(&mut self, n: usize) -> Result<&'t [u8], Stop> {
        let end = self.at.checked_add(n).ok_or(Stop::Bad)?;
        let s = self.b.get(self.at..end).ok_or(Stop::Bad)?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Stop> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Stop> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, Stop> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

/// Skip one term.
fn skip(r: &mut R) -> Result<(), Stop> {
    // Terms still to skip (iterative: no recursion on hostile nesting).
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        match r.u8()? {
            T_IMM | T_I64 | T_U64 | T_FLOAT => {
                r.take(8)?;
            }
            T_BIN | T_ETF => {
                let n = r.u32()? as usize;
                r.take(n)?;
            }
            T_TUPLE => pending += r.u32()? as u64,
            T_LIST => pending += r.u32()? as u64 + 1,
            T_MAP => pending += 2 * r.u32()? as u64,
            T_TRUNC => {
                r.take(9)?;
            }
            _ => return Err(Stop::Bad),
        }
    }
    Ok(())
}

struct P<'n, 's, 'o, S: Symbolizer> {
    names: &'n mut Names<'s, S>,
    out: &'o mut String,
    max: usize,
}

impl<S: Symbolizer> P<'_, '_, '_, S> {
    fn check(&self) -> Result<(), Stop> {
        if self.out.len() > self.max {
            Err(Stop::Full)
        } else {
            Ok(())
        }
    }

    fn seq(&mut self, r: &mut R, n: u32, depth: u32) -> Result<(), Stop> {
        for i in 0..n {
            if i > 0 {
                self.out.push_str(", ");
            }
            self.term(r, depth)?;
        }
        Ok(())
    }

    fn term(&mut self, r: &mut R, depth: u32) -> Result<(), Stop> {
        self.check()?;
        if depth > MAX_DEPTH + 1 {
            return Err(Stop::Bad);
        }
        match r.u8()? {
            T_IMM => {
                let w = r.u64()?;
                self.names.put_word(self.out, w);
            }
            T_BIN => {
                let n = r.u32()? as usize;
                let b = r.take(n)?;
                self.binary(b);
            }
            T_TUPLE => {
                let n = r.u32()?;
                self.out.push('{');
                self.seq(r, n, depth + 1)?;
                self.out.push('}');
            }
            T_LIST => {
                let n = r.u32()?;
                if self.charlist(r, n)? {
                    return Ok(());
                }
                self.out.push('[');
                self.seq(r, n, depth + 1)?;
                // The tail: `[]` for a proper list.
                let save = r.at;
                let proper = r.u8()? == T_IMM && {
                    let w = r.u64()?;
                    matches!(self.names.word(w), super::Word::Nil)
                };
                if !proper {
                    r.at = save;
                    self.out.push_str(" | ");
                    self.term(r, depth + 1)?;
                }
                self.out.push(']');
            }
            T_MAP => {
                let n = r.u32()?;
                self.out.push_str("%{");
                for i in 0..n {
                    if i > 0 {
                        self.out.push_str(", ");
                    }
                    self.term(r, depth + 1)?;
                    self.out.push_str(" => ");
                    self.term(r, depth + 1)?;
                }
                self.out.push('}');
            }
            T_FLOAT => {
                let v = f64::from_bits(r.u64()?);
                let _ = write!(self.out, "{v:?}");
            }
            T_ETF => {
                let n = r.u32()? as usize;
                let b = r.take(n)?;
                self.etf(b);
            }
            T_TRUNC => {
                let _hint = r.u8()?;
                let n = r.u64()?;
                let _ = write!(self.out, "…({n} bytes not captured)");
            }
            T_I64 => {
                let _ = write!(self.out, "{}", r.u64()? as i64);
            }
            T_U64 => {
                let _ = write!(self.out, "{}", r.u64()?);
            }
            _ => return Err(Stop::Bad),
        }
        Ok(())
    }

    /// A proper list of printable ASCII characters, not all whitespace,
    /// prints as `'abc'` (as Elixir 1.14 does); true if it was one (and
    /// was printed).
    fn charlist(&mut self, r: &mut R, n: u32) -> Result<bool, Stop> {
        if n == 0 || n > 4096 {
            return Ok(false);
        }
        let start = r.at;
        let mut chars = String::new();
        for _ in 0..=n {
            if r.u8()? != T_IMM {
                r.at = start;
                return Ok(false);
            }
            let w = r.u64()?;
            match self.names.word(w) {
                super::Word::Small(c) if chars.chars().count() < n as usize => {
                    match u32::try_from(*c).ok().and_then(char::from_u32) {
                        Some(ch) if (' '..='~').contains(&ch) || ch == '\n' || ch == '\t' => {
                            chars.push(ch)
                        }
                        _ => {
                            r.at = start;
                            return Ok(false);
                        }
                    }
                }
                super::Word::Nil if chars.chars().count() == n as usize => {}
                _ => {
                    r.at = start;
                    return Ok(false);
                }
            }
        }
        // Only whitespace ([10]) reads better as numbers.
        if chars.chars().all(|c| c.is_ascii_whitespace()) {
            r.at = start;
            return Ok(false);
        }
        self.out.push('\'');
        for c in chars.chars() {
            match c {
                '\'' => self.out.push_str("\\'"),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\t' => self.out.push_str("\\t"),
                c => self.out.push(c),
            }
        }
        self.out.push('\'');
        Ok(true)
    }

    fn binary(&mut self, b: &[u8]) {
        match std::str::from_utf8(b) {
            Ok(s) if !s.chars().any(|c| c.is_control() && !"\n\t\r".contains(c)) => {
                self.out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => self.out.push_str("\\\""),
                        '\\' => self.out.push_str("\\\\"),
                        '\n' => self.out.push_str("\\n"),
                        '\t' => self.out.push_str("\\t"),
                        '\r' => self.out.push_str("\\r"),
                        c => self.out.push(c),
                    }
                    if self.out.len() > self.max {
                        return;
                    }
                }
                self.out.push('"');
            }
            _ => {
                self.out.push_str("<<");
                for (i, c) in b.iter().enumerate() {
                    if i > 0 {
                        self.out.push_str(", ");
                    }
                    let _ = write!(self.out, "{c}");
                    if self.out.len() > self.max {
                        return;
                    }
                }
                self.out.push_str(">>");
            }
        }
    }

    fn etf(&mut self, b: &[u8]) {
        let tag = b.get(1).copied().unwrap_or(0);
        let big = |b: &[u8], at: usize, n: usize| -> Option<(bool, u128)> {
            let sign = *b.get(at)?;
            let digits = b.get(at + 1..at + 1 + n)?;
            if n > 16 {
                return None;
            }
            let mut v = 0u128;
            for (i, d) in digits.iter().enumerate() {
                v |= (*d as u128) << (8 * i);
            }
            Some((sign != 0, v))
        };
        let shown = match tag {
            110 => b
                .get(2)
                .and_then(|&n| big(b, 3, n as usize))
                .map(|(neg, v)| format!("{}{v}", if neg { "-" } else { "" })),
            111 => b
                .get(2..6)
                .map(|n| u32::from_be_bytes(n.try_into().expect("4")) as usize)
                .and_then(|n| big(b, 6, n))
                .map(|(neg, v)| format!("{}{v}", if neg { "-" } else { "" })),
            _ => None,
        };
        match shown {
            Some(s) => self.out.push_str(&s),
            None => {
                let kind = match tag {
                    110 | 111 => "Integer",
                    88 | 103 => "PID",
                    89 | 102 | 120 => "Port",
                    90 | 114 | 101 => "Reference",
                    112 | 113 | 117 => "Function",
                    _ => "Term",
                };
                let _ = write!(self.out, "#{kind}<{} bytes>", b.len());
            }
        }
    }
}

/// Cut `s` to at most `max` bytes (on a character boundary) with `…`.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push('…');
    }
}

/// Field `index` of `payload` printed, at most `max` bytes (then `…`);
/// `None` when the payload has no such field. A field that is the atom
/// `nil` placeholder of a payload without contents prints as `nil`.
pub fn field_preview<S: Symbolizer>(
    names: &mut Names<'_, S>,
    payload: &[u8],
    index: usize,
    max: usize,
) -> Option<String> {
    let mut r = R { b: payload, at: 0 };
    for _ in 0..index {
        if r.at >= payload.len() || skip(&mut r).is_err() {
            return None;
        }
    }
    if r.at >= payload.len() {
        return None;
    }
    let mut out = String::new();
    let res = P {
        names,
        out: &mut out,
        max,
    }
    .term(&mut r, 0);
    match res {
        Ok(()) => {}
        Err(Stop::Full) => {}
        Err(Stop::Bad) => out.push_str("#malformed"),
    }
    cut(&mut out, max);
    Some(out)
}

/// Is field `index` of `payload` the atom `nil` (a placeholder for
/// contents that were not captured)?
pub fn field_is_nil<S: Symbolizer>(names: &mut Names<'_, S>, payload: &[u8], index: usize) -> bool {
    let mut r = R { b: payload, at: 0 };
    for _ in 0..index {
        if skip(&mut r).is_err() {
            return false;
        }
    }
    matches!(r.u8(), Ok(T_IMM))
        && r.u64()
            .map(|w| matches!(names.word(w), super::Word::Atom(a) if &**a == "nil"))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracefile::WordClass;

    /// Words: 0x10 + n is atom n of a fixed list, 0xF-tagged words are
    /// small integers, 0x3B is `[]`.
    struct Fake;
    impl Symbolizer for Fake {
        fn classify(&mut self, w: u64) -> WordClass {
            if w & 0xF == 0xF {
                return WordClass::Small((w as i64) >> 4);
            }
            if w == 0x3B {
                return WordClass::Nil;
            }
            let atoms = ["ok", "nil", "Elixir.Foo", "with space"];
            match atoms.get((w - 0x10) as usize) {
                Some(a) => WordClass::Atom(a.as_bytes().to_vec()),
                None => WordClass::Unportable,
            }
        }
    }

    fn imm(t: &mut Vec<u8>, w: u64) {
        t.push(T_IMM);
        t.extend_from_slice(&w.to_le_bytes());
    }

    #[test]
    fn prints_terms_as_elixir_does_and_cuts() {
        let mut t = Vec::new();
        // field 0: {:ok, [1, 2], "hi", %{Foo => :"with space"}, 1.5}
        t.push(T_TUPLE);
        t.extend_from_slice(&5u32.to_le_bytes());
        imm(&mut t, 0x10);
        t.push(T_LIST);
        t.extend_from_slice(&2u32.to_le_bytes());
        imm(&mut t, (1 << 4) | 0xF);
        imm(&mut t, (2 << 4) | 0xF);
        imm(&mut t, 0x3B);
        t.push(T_BIN);
        t.extend_from_slice(&2u32.to_le_bytes());
        t.extend_from_slice(b"hi");
        t.push(T_MAP);
        t.extend_from_slice(&1u32.to_le_bytes());
        imm(&mut t, 0x12);
        imm(&mut t, 0x13);
        t.push(T_FLOAT);
        t.extend_from_slice(&1.5f64.to_bits().to_le_bytes());
        // field 1: nil
        imm(&mut t, 0x11);
        let mut sym = Fake;
        let mut names = Names::new(&mut sym, b"a@b", &[]);
        assert_eq!(
            field_preview(&mut names, &t, 0, 200).unwrap(),
            "{:ok, [1, 2], \"hi\", %{Foo => :\"with space\"}, 1.5}"
        );
        assert_eq!(field_preview(&mut names, &t, 1, 200).unwrap(), "nil");
        assert!(field_is_nil(&mut names, &t, 1));
        assert!(field_preview(&mut names, &t, 2, 200).is_none());
        let short = field_preview(&mut names, &t, 0, 10).unwrap();
        assert!(short.ends_with('…') && short.len() <= 10 + '…'.len_utf8());
        // A malformed tape says so and never panics.
        for n in 0..t.len() {
            let _ = field_preview(&mut names, &t[..n], 0, 200);
        }
        // A charlist: 'hi'.
        let mut cl = vec![T_LIST];
        cl.extend_from_slice(&2u32.to_le_bytes());
        imm(&mut cl, ((b'h' as u64) << 4) | 0xF);
        imm(&mut cl, ((b'i' as u64) << 4) | 0xF);
        imm(&mut cl, 0x3B);
        assert_eq!(field_preview(&mut names, &cl, 0, 50).unwrap(), "'hi'");
        let bad = [T_LIST, 0xff, 0xff, 0xff, 0xff];
        assert!(field_preview(&mut names, &bad, 0, 50)
            .unwrap()
            .ends_with("#malformed"));
    }
}
