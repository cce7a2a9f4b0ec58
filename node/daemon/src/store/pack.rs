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
    /// CRC-32C of the block's bytes, taken when they were stored (already checked against
    /// the CID then). Blocks read to serve a peer are checked with it instead of hashing them
    /// again: it catches what goes wrong at rest for a sixth of the CPU of BLAKE3, and the
    /// peer checks the CID on arrival in any case. `None` in entries written before version 2
    /// (those are checked against the CID).
    pub crc: Option<u32>,
}

impl Location {
    /// Whether `bytes` read from here are what was stored: the CRC when the entry has one,
    /// else the CID's hash.
    pub fn check(&self, cid: &Cid, bytes: &[u8]) -> bool {
        match self.crc {
            Some(crc) => crc32c(bytes) == crc,
            None => cid.matches(bytes),
        }
    }
}

/// CRC-32C (Castagnoli, as in iSCSI and ext4) of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    // A CRC-32 always fits 32 bits; the crate returns every width as u64.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// Index value format version (1: without the CRC).
const LOCATION_VERSION: u8 = 2;
/// Encoded size of a [`Location`].
pub const LOCATION_BYTES: usize = 1 + 4 + 8 + 4 + 1 + 4;
/// Encoded size of a version 1 entry.
const LOCATION_V1_BYTES: usize = LOCATION_BYTES - 4;

impl Location {
    /// Fixed-layout encoding, version byte first: version 2, or version 1 for an entry
    /// without a CRC (new entries always have one).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOCATION_BYTES);
        out.push(if self.crc.is_some() { LOCATION_VERSION } else { 1 });
        out.extend_from_slice(&self.pack.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(codec_byte(self.codec));
        if let Some(crc) = self.crc {
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// Decodes [`Location::encode`] and version 1 entries; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Location> {
        let crc = match (bytes.first(), bytes.len()) {
            (Some(1), LOCATION_V1_BYTES) => None,
            (Some(&LOCATION_VERSION), LOCATION_BYTES) => {
                Some(u32::from_le_bytes(bytes[18..22].try_into().ok()?))
            }
            _ => return None,
        };
        Some(Location {
            pack: u32::from_le_bytes(bytes[1..5].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[5..13].try_into().ok()?),
            len: u32::from_le_bytes(bytes[13..17].try_into().ok()?),
            codec: codec_from_byte(bytes[17])?,
            crc,
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
    fn crc32c_is_castagnoli() {
        // The standard check value, and the empty input.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn a_location_checks_its_crc_or_else_the_cid() {
        let bytes = b"a block of the object".to_vec();
        let cid = Cid::raw(&bytes);
        let mut damaged = bytes.clone();
        damaged[3] ^= 0x10;
        let v2 = Location {
            pack: 1,
            offset: 46,
            len: bytes.len() as u32,
            codec: Codec::Raw,
            crc: Some(crc32c(&bytes)),
        };
        assert!(v2.check(&cid, &bytes));
        assert!(!v2.check(&cid, &damaged));
        // The CRC decides, not the CID: a wrong CRC refuses the right bytes.
        let wrong = Location { crc: Some(crc32c(&damaged)), ..v2 };
        assert!(!wrong.check(&cid, &bytes));
        let v1 = Location { crc: None, ..v2 };
        assert!(v1.check(&cid, &bytes));
        assert!(!v1.check(&cid, &damaged));
        assert!(!v1.check(&Cid::raw(&damaged), &bytes));
    }

    #[test]
    fn locations_and_names_round_trip() {
        // The index value and the pack names decode to what was encoded; damage is refused.
        let loc = Location {
            pack: 7,
            offset: 1 << 33,
            len: 65536,
            codec: Codec::DagCbor,
            crc: Some(0xdead_beef),
        };
        assert_eq!(Location::decode(&loc.encode()), Some(loc));
        let mut bad = loc.encode();
        bad[0] = 9;
        assert_eq!(Location::decode(&bad), None);
        assert_eq!(Location::decode(&bad[..5]), None);
        // A version 2 value cut to version 1's length, and the other way round, are refused.
        assert_eq!(Location::decode(&loc.encode()[..LOCATION_V1_BYTES]), None);
        let mut v1 = loc.encode()[..LOCATION_V1_BYTES].to_vec();
        v1[0] = 1;
        let old = Location { crc: None, ..loc };
        assert_eq!(Location::decode(&v1), Some(old));
        assert_eq!(old.encode(), v1);
        v1.extend_from_slice(&[0; 4]);
        assert_eq!(Location::decode(&v1), None);
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("x.pack"), None);
    }
}
