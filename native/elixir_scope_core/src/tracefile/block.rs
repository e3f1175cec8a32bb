//! Blocks: the unit of a trace file (see [`super`] for the layout).

use super::bytes::Cursor;
use std::io::{self, Write};

/// Bytes of a block header.
pub const BLOCK_HEADER: usize = 40;
/// Largest uncompressed block payload.
pub const MAX_RAW: usize = 16 << 20;
/// Largest compression ratio a block may claim (raw bytes per stored
/// byte): a reader never decompresses more than this times what is on
/// disk. Real traces compress 2–5×; a writer stores a block that would
/// compress further uncompressed.
pub const MAX_RATIO: usize = 64;
/// Most records an event block may hold (the writer's `block_events`
/// bound).
pub const MAX_BLOCK_EVENTS: u32 = 1 << 20;

/// Block kinds.
pub mod tag {
    /// File header: node, clocks, store bounds and counters, metadata.
    pub const HEADER: u8 = b'H';
    /// Symbol definitions.
    pub const SYMBOLS: u8 = b'S';
    /// Process names.
    pub const NAMES: u8 = b'N';
    /// Events.
    pub const EVENTS: u8 = b'E';
    /// Per-process ranges of state records missing from the saved store.
    pub const STATE_GAPS: u8 = b'G';
    /// End of file: totals.
    pub const TRAILER: u8 = b'X';
}

/// How a block payload is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Codec {
    /// Stored as is.
    None,
    /// LZ4 block format (`lz4_flex`).
    Lz4,
    /// Zstandard (`zstd`), at a level.
    #[default]
    Zstd,
}

impl Codec {
    /// The codec's byte in a block header.
    pub fn byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        }
    }

    /// The codec of a header byte.
    pub fn from_byte(b: u8) -> Option<Codec> {
        match b {
            0 => Some(Codec::None),
            1 => Some(Codec::Lz4),
            2 => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// A block header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// Kind ([`tag`]).
    pub tag: u8,
    /// Compression.
    pub codec: Codec,
    /// Bytes stored after the header.
    pub stored_len: u32,
    /// Bytes after decompression.
    pub raw_len: u32,
    /// Records in the block.
    pub count: u32,
    /// Kind-specific (events: smallest id; symbols: first symbol number).
    pub a: u64,
    /// Kind-specific (events: largest id).
    pub b: u64,
    /// CRC-32 of the stored payload.
    pub payload_crc: u32,
}

impl BlockHeader {
    /// The 40 header bytes, with the header's own CRC-32 last.
    pub fn encode(&self) -> [u8; BLOCK_HEADER] {
        let mut h = [0u8; BLOCK_HEADER];
        h[0] = self.tag;
        h[1] = self.codec.byte();
        h[4..8].copy_from_slice(&self.stored_len.to_le_bytes());
        h[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        h[12..16].copy_from_slice(&self.count.to_le_bytes());
        h[16..24].copy_from_slice(&self.a.to_le_bytes());
        h[24..32].copy_from_slice(&self.b.to_le_bytes());
        h[32..36].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..36]);
        h[36..40].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parse and check a header: its CRC, codec, reserved bytes and
    /// length bounds.
    pub fn decode(h: &[u8; BLOCK_HEADER]) -> Result<BlockHeader, String> {
        let crc = u32::from_le_bytes(h[36..40].try_into().expect("4"));
        if crc32fast::hash(&h[..36]) != crc {
            return Err("block header checksum mismatch".into());
        }
        let mut c = Cursor::new(h);
        let tag = c.u8().expect("fixed");
        let codec = c.u8().expect("fixed");
        let reserved = c.u16_le().expect("fixed");
        let stored_len = c.u32_le().expect("fixed");
        let raw_len = c.u32_le().expect("fixed");
        let count = c.u32_le().expect("fixed");
        let a = c.u64_le().expect("fixed");
        let b = c.u64_le().expect("fixed");
        let payload_crc = c.u32_le().expect("fixed");
        if !matches!(
            tag,
            tag::HEADER | tag::SYMBOLS | tag::NAMES | tag::EVENTS | tag::STATE_GAPS | tag::TRAILER
        ) {
            return Err(format!("unknown block kind {tag}"));
        }
        let codec = Codec::from_byte(codec).ok_or_else(|| format!("unknown codec {codec}"))?;
        if reserved != 0 {
            return Err("reserved header bytes are set".into());
        }
        if raw_len as usize > MAX_RAW {
            return Err(format!("block claims {raw_len} bytes (most: {MAX_RAW})"));
        }
        let ratio_ok = match codec {
            Codec::None => raw_len == stored_len,
            _ => (raw_len as usize) <= (stored_len as usize).saturating_mul(MAX_RATIO),
        };
        if !ratio_ok || stored_len as usize > MAX_RAW + MAX_RAW / 64 + 1024 {
            return Err(format!(
                "block claims {raw_len} bytes from {stored_len} stored bytes"
            ));
        }
        if count as usize > raw_len as usize || count > MAX_BLOCK_EVENTS {
            return Err(format!("block claims {count} records in {raw_len} bytes"));
        }
        Ok(BlockHeader {
            tag,
            codec,
            stored_len,
            raw_len,
            count,
            a,
            b,
            payload_crc,
        })
    }
}

/// Compression state reused across blocks.
pub struct Compressor {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
}

impl Compressor {
    /// A compressor for `codec` (`level` is zstd's, 1..=19).
    pub fn new(codec: Codec, level: i32) -> io::Result<Compressor> {
        let zstd = match codec {
            Codec::Zstd => Some(zstd::bulk::Compressor::new(level)?),
            _ => None,
        };
        Ok(Compressor {
            codec,
            zstd,
            out: Vec::new(),
        })
    }

    /// The configured codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Compress `raw`; returns the codec actually used (a block that would
    /// not shrink, or would claim more than [`MAX_RATIO`], is stored as
    /// is) and the stored bytes.
    pub fn compress<'a>(&'a mut self, raw: &'a [u8]) -> io::Result<(Codec, &'a [u8])> {
        let used = match self.codec {
            Codec::None => return Ok((Codec::None, raw)),
            Codec::Lz4 => {
                self.out.clear();
                self.out
                    .resize(lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                let n = lz4_flex::block::compress_into(raw, &mut self.out)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                self.out.truncate(n);
                Codec::Lz4
            }
            Codec::Zstd => {
                let z = self.zstd.as_mut().expect("zstd context");
                self.out.clear();
                self.out.reserve(zstd::zstd_safe::compress_bound(raw.len()));
                z.compress_to_buffer(raw, &mut self.out)?;
                Codec::Zstd
            }
        };
        if self.out.len() >= raw.len() || raw.len() > self.out.len() * MAX_RATIO {
            return Ok((Codec::None, raw));
        }
        Ok((used, &self.out))
    }
}

/// Decompression state reused across blocks.
#[derive(Default)]
pub struct Decompressor {
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    /// Decompress `stored` into `out`, which must end up exactly `raw_len`
    /// bytes long (never more is allocated).
    pub fn decompress(
        &mut self,
        codec: Codec,
        stored: &[u8],
        raw_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        out.clear();
        match codec {
            Codec::None => {
                out.extend_from_slice(stored);
            }
            Codec::Lz4 => {
                out.resize(raw_len, 0);
                let n = lz4_flex::block::decompress_into(stored, out)
                    .map_err(|e| format!("lz4: {e}"))?;
                out.truncate(n);
            }
            Codec::Zstd => {
                if self.zstd.is_none() {
                    self.zstd =
                        Some(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?);
                }
                let z = self.zstd.as_mut().expect("just set");
                out.reserve_exact(raw_len);
                let n = z
                    .decompress_to_buffer(stored, out)
                    .map_err(|e| format!("zstd: {e}"))?;
                out.truncate(n);
            }
        }
        if out.len() != raw_len {
            return Err(format!(
                "block decompressed to {} bytes, header says {raw_len}",
                out.len()
            ));
        }
        Ok(())
    }
}

/// Write one block (header and stored payload); returns the bytes written.
#[allow(clippy::too_many_arguments)]
pub fn write_block<W: Write>(
    w: &mut W,
    comp: &mut Compressor,
    tag: u8,
    raw: &[u8],
    count: u32,
    a: u64,
    b: u64,
) -> io::Result<u64> {
    let (codec, stored) = comp.compress(raw)?;
    let h = BlockHeader {
        tag,
        codec,
        stored_len: stored.len() as u32,
        raw_len: raw.len() as u32,
        count,
        a,
        b,
        payload_crc: crc32fast::hash(stored),
    };
    w.write_all(&h.encode())?;
    w.write_all(stored)?;
    Ok((BLOCK_HEADER + stored.len()) as u64)
}
