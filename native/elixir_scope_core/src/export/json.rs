//! Small JSON writing helpers (the exports write JSON by hand, in chunks).

/// Append `s` as a JSON string (quoted, escaped).
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    put_escaped(out, s);
    out.push(b'"');
}

/// Append the escaped contents of a JSON string (no quotes).
pub fn put_escaped(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let mut start = 0;
    for (i, &c) in b.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f | 0x7f => {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(format!("\\u{:04x}", c).as_bytes());
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&b[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&b[start..]);
}

/// Append an unsigned integer.
#[inline]
pub fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Append a signed integer.
#[inline]
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    put_u64(out, v.unsigned_abs());
}

/// Append nanoseconds as microseconds with three decimals (`12.345`).
#[inline]
pub fn put_us(out: &mut Vec<u8>, ns: i64) {
    if ns < 0 {
        out.push(b'-');
    }
    let a = ns.unsigned_abs();
    put_u64(out, a / 1000);
    let f = a % 1000;
    if f != 0 {
        out.push(b'.');
        out.push(b'0' + (f / 100) as u8);
        out.push(b'0' + (f / 10 % 10) as u8);
        out.push(b'0' + (f % 10) as u8);
    }
}

/// Append an id: a number when JavaScript reads it exactly (below 2^53),
/// else a hex string.
#[inline]
pub fn put_id(out: &mut Vec<u8>, id: u64) {
    if id < 1 << 53 {
        put_u64(out, id);
    } else {
        out.extend_from_slice(format!("\"0x{id:x}\"").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_numbers() {
        let mut o = Vec::new();
        put_str(&mut o, "a\"b\\c\nd\u{1}é");
        assert_eq!(String::from_utf8(o).unwrap(), "\"a\\\"b\\\\c\\nd\\u0001é\"");
        let mut o = Vec::new();
        put_us(&mut o, 12_345);
        o.push(b' ');
        put_us(&mut o, 7_000);
        o.push(b' ');
        put_us(&mut o, -5);
        o.push(b' ');
        put_i64(&mut o, i64::MIN);
        o.push(b' ');
        put_id(&mut o, 1 << 60);
        assert_eq!(
            String::from_utf8(o).unwrap(),
            "12.345 7 -0.005 -9223372036854775808 \"0x1000000000000000\""
        );
    }
}
