//! Pack files: chunk and manifest bytes appended one record after another.
//!
//! A pack starts with an 8-byte header (`MYCELPK` and the format version); each record is
//! `[version: u8][codec: u8][digest: 32][len: u32 LE][bytes]`. The redb index says where
//! every block lives and how far each pack is committed; bytes past that point are from a
//! write that never committed and are cut off when the store opens. Records carry their own
//! digest so a lost index can be rebuilt by scanning the packs.

use mycel_chunker::{Cid, Codec};

/// Magic and version at the start of every pack.
pub const PACK_HEADER: [u8; 8] = *b"MYCELPK\x01";
/// Record format version.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before a record's data.
pub const RECORD_HEADER_BYTES: u64 = 1 + 1 + 32 + 4;
/// A pack is closed once it passes this size.
pub const PACK_BYTES_MAX: u64 = 256 << 20;

/// Where one block lives, as stored in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Pack number.
    pub pack: u32,
    /// Offset of the block's bytes (after the record header).
    pub offset: u64,
    /// Length of the block.
    pub len: u32,
    /// The block's codec.
    pub codec: Codec,
}

/// Index value format version.
const LOCATION_VERSION: u8 = 1;
/// Encoded size of a [`Location`].
pub const LOCATION_BYTES: usize = 1 + 4 + 8 + 4 + 1;

impl Location {
    /// Fixed-layout encoding, version byte first.
    pub fn encode(&self) -> [u8; LOCATION_BYTES] {
        let mut out = [0u8; LOCATION_BYTES];
        out[0] = LOCATION_VERSION;
        out[1..5].copy_from_slice(&self.pack.to_le_bytes());
        out[5..13].copy_from_slice(&self.offset.to_le_bytes());
        out[13..17].copy_from_slice(&self.len.to_le_bytes());
        out[17] = codec_byte(self.codec);
        out
    }

    /// Decodes [`Location::encode`]; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Location> {
        if bytes.len() != LOCATION_BYTES || bytes[0] != LOCATION_VERSION {
            return None;
        }
        Some(Location {
            pack: u32::from_le_bytes(bytes[1..5].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[5..13].try_into().ok()?),
            len: u32::from_le_bytes(bytes[13..17].try_into().ok()?),
            codec: codec_from_byte(bytes[17])?,
        })
    }
}

/// The codec as one byte.
pub fn codec_byte(codec: Codec) -> u8 {
    match codec {
        Codec::Raw => 0,
        Codec::DagCbor => 1,
    }
}

/// Inverse of [`codec_byte`].
pub fn codec_from_byte(b: u8) -> Option<Codec> {
    match b {
        0 => Some(Codec::Raw),
        1 => Some(Codec::DagCbor),
        _ => None,
    }
}

/// The header of a record for `cid` with `len` bytes.
pub fn record_header(cid: &Cid, len: u32) -> [u8; RECORD_HEADER_BYTES as usize] {
    let mut out = [0u8; RECORD_HEADER_BYTES as usize];
    out[0] = RECORD_VERSION;
    out[1] = codec_byte(cid.codec());
    out[2..34].copy_from_slice(cid.digest());
    out[34..38].copy_from_slice(&len.to_le_bytes());
    out
}

/// File name of pack `n`.
pub fn file_name(n: u32) -> String {
    format!("{n:08}.pack")
}

/// Pack number from a file name.
pub fn parse_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".pack")?;
    if digits.len() != 8 {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_and_names_round_trip() {
        // The index value and the pack names decode to what was encoded; damage is refused.
        let loc = Location { pack: 7, offset: 1 << 33, len: 65536, codec: Codec::DagCbor };
        assert_eq!(Location::decode(&loc.encode()), Some(loc));
        let mut bad = loc.encode();
        bad[0] = 9;
        assert_eq!(Location::decode(&bad), None);
        assert_eq!(Location::decode(&bad[..5]), None);
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("x.pack"), None);
    }
}
