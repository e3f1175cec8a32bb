//! Little helpers for the file format: LEB128 varints, zigzag integers and
//! a bounds-checked reader that never panics on hostile bytes.

/// Zigzag-encode a signed integer (small magnitudes give small varints).
#[inline(always)]
pub fn zigzag(i: i64) -> u64 {
    ((i << 1) ^ (i >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline(always)]
pub fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Append `x` as an unsigned LEB128 varint (1 to 10 bytes).
#[inline(always)]
pub fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    if x < 0x80 {
        out.push(x as u8);
        return;
    }
    let mut buf = [0u8; 10];
    let mut n = 0;
    while x >= 0x80 {
        buf[n] = (x as u8) | 0x80;
        x >>= 7;
        n += 1;
    }
    buf[n] = x as u8;
    out.extend_from_slice(&buf[..=n]);
}

/// Append a length-prefixed byte string.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Why bytes could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Short {
    /// Fewer bytes than announced.
    Eof,
    /// A varint longer than 10 bytes or overflowing 64 bits.
    BadVarint,
}

/// A cursor over a byte slice; every read is bounds-checked.
#[derive(Clone, Copy)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    /// Bytes consumed.
    #[inline]
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Everything consumed?
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// The next byte.
    #[inline(always)]
    pub fn u8(&mut self) -> Result<u8, Short> {
        let b = *self.buf.get(self.pos).ok_or(Short::Eof)?;
        self.pos += 1;
        Ok(b)
    }

    /// The next byte without consuming it.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// The next `n` bytes.
    #[inline(always)]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if n > self.remaining() {
            return Err(Short::Eof);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// A little-endian `u16`.
    pub fn u16_le(&mut self) -> Result<u16, Short> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }

    /// A little-endian `u32`.
    pub fn u32_le(&mut self) -> Result<u32, Short> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    /// A little-endian `u64`.
    pub fn u64_le(&mut self) -> Result<u64, Short> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// A big-endian `u16` (external term format).
    pub fn u16_be(&mut self) -> Result<u16, Short> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }

    /// A big-endian `u32` (external term format).
    pub fn u32_be(&mut self) -> Result<u32, Short> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }

    /// An unsigned LEB128 varint.
    #[inline(always)]
    pub fn varint(&mut self) -> Result<u64, Short> {
        let b = self.u8()?;
        if b < 0x80 {
            return Ok(b as u64);
        }
        let mut x = (b & 0x7f) as u64;
        let mut shift = 7;
        loop {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(Short::BadVarint);
            }
            x |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(x);
            }
            shift += 7;
            if shift > 63 {
                return Err(Short::BadVarint);
            }
        }
    }

    /// A zigzag varint.
    #[inline(always)]
    pub fn zigzag(&mut self) -> Result<i64, Short> {
        self.varint().map(unzigzag)
    }

    /// A varint that must fit `usize` and be at most `max`.
    pub fn len_at_most(&mut self, max: usize) -> Result<usize, Short> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(Short::Eof);
        }
        Ok(n as usize)
    }

    /// A length-prefixed byte string (its length checked against the
    /// bytes left before anything is allocated).
    pub fn bytes(&mut self) -> Result<&'a [u8], Short> {
        let n = self.len_at_most(self.remaining())?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for x in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX - 1, u64::MAX] {
            let mut v = Vec::new();
            put_varint(&mut v, x);
            assert_eq!(Cursor::new(&v).varint(), Ok(x));
        }
        for i in [0i64, -1, 1, i64::MIN, i64::MAX, -300] {
            assert_eq!(unzigzag(zigzag(i)), i);
        }
    }

    #[test]
    fn bad_varints_are_errors() {
        assert_eq!(Cursor::new(&[0x80; 11]).varint(), Err(Short::BadVarint));
        assert_eq!(Cursor::new(&[0x80, 0x80]).varint(), Err(Short::Eof));
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert_eq!(Cursor::new(&over).varint(), Err(Short::BadVarint));
    }
}
