//! The hashing shared by the store's and the correlator's tables: a cheap
//! multiply-rotate hasher over integer keys with a full 64-bit finalizer.
//! Ids, pids and sequence numbers are not attacker-chosen, and SipHash
//! costs more than the rest of a lookup; tables keyed by content that
//! traced code can influence use a random per-table seed ([`Seeded`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// A 64-bit finalizer (fmix64): every input bit affects every output bit.
#[inline]
pub(crate) fn mix(k: u64) -> u64 {
    let mut x = k ^ (k >> 33);
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Folds written words with a multiply-rotate step; finishes with [`mix`].
#[derive(Default, Clone, Copy)]
pub(crate) struct MixHasher(u64);

impl Hasher for MixHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix(self.0)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(29) ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A map over integer keys with [`MixHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<MixHasher>>;

/// [`MixHasher`] starting from a random per-map seed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seeded(u64);

impl Seeded {
    /// A seed from the standard library's random hash keys.
    pub(crate) fn random() -> Seeded {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Seeded(h.finish())
    }
}

impl BuildHasher for Seeded {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(self.0)
    }
}

/// A map keyed by content hashes traced code can influence.
pub(crate) type SeededMap<K, V> = HashMap<K, V, Seeded>;

/// The last `bytes.len() % 8` bytes of `bytes` as a little-endian word,
/// zero-padded: one (overlapping) 8-byte load when there are at least 8
/// bytes, no `memcpy` call.
#[inline(always)]
fn tail_word(bytes: &[u8]) -> u64 {
    let n = bytes.len();
    let rem = n % 8;
    if rem == 0 {
        return 0;
    }
    if n >= 8 {
        let last = u64::from_le_bytes(bytes[n - 8..].try_into().expect("8 bytes"));
        return last >> (8 * (8 - rem));
    }
    let mut w = 0u64;
    for (i, &b) in bytes.iter().enumerate() {
        w |= (b as u64) << (8 * i);
    }
    w
}

/// A fast 64-bit hash of `bytes` (multiply-xor over 8-byte words, then a
/// final avalanche); never 0.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = (bytes.len() as u64).wrapping_mul(K);
    for c in bytes.chunks_exact(8) {
        let w = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    h = (h ^ tail_word(bytes)).wrapping_mul(K);
    h ^= h >> 32;
    h = h.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 32;
    h.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hash_bytes` as first written (tail copied into a zeroed word).
    fn reference(bytes: &[u8]) -> u64 {
        const K: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut h: u64 = (bytes.len() as u64).wrapping_mul(K);
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().unwrap());
            h = (h ^ w).wrapping_mul(K).rotate_left(29);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
        h ^= h >> 32;
        h = h.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        h ^= h >> 32;
        h.max(1)
    }

    #[test]
    fn hash_bytes_unchanged_for_every_tail_length() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..9 {
            for len in 0..(data.len() - start) {
                let b = &data[start..start + len];
                assert_eq!(hash_bytes(b), reference(b), "start {start} len {len}");
            }
        }
    }
}
