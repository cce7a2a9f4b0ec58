//! Content identifiers: CIDv1 with a BLAKE3-256 multihash, for raw chunks and DAG-CBOR nodes.
//!
//! mycel only ever makes two kinds of CID, so [`Cid`] is a small `Copy` value (codec plus
//! digest) that is cheap to use as a map key; parsing and printing go through the `cid` crate
//! so the text form is the standard multibase base32 one (`bafk...` / `bafy...`).

pub use mycel_base::cmp_in_words;
use std::fmt;
use std::str::FromStr;

/// Multicodec of a raw chunk.
const CODEC_RAW: u64 = 0x55;
/// Multicodec of a DAG-CBOR block.
const CODEC_DAG_CBOR: u64 = 0x71;
/// Multihash code of BLAKE3-256.
const MH_BLAKE3: u64 = 0x1e;
/// Digest length in bytes.
const DIGEST_BYTES: usize = 32;

/// What a block's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Codec {
    /// A chunk of content (multicodec `raw`, 0x55).
    Raw,
    /// A manifest node (multicodec `dag-cbor`, 0x71).
    DagCbor,
}

impl Codec {
    /// The multicodec code.
    pub fn code(self) -> u64 {
        match self {
            Codec::Raw => CODEC_RAW,
            Codec::DagCbor => CODEC_DAG_CBOR,
        }
    }
}

/// A CIDv1 naming one block by the BLAKE3-256 hash of its bytes.
///
/// Ordered by codec, then digest (as derived), but the digest compares eight bytes at a
/// time: CIDs key the ordered maps of every hot path, where a `memcmp` call per comparison
/// showed up in profiles.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    codec: Codec,
    digest: [u8; DIGEST_BYTES],
}

impl Ord for Cid {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.codec.cmp(&other.codec).then_with(|| cmp_in_words(&self.digest, &other.digest))
    }
}

impl PartialOrd for Cid {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Why bytes or text are not a CID mycel can use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CidError {
    /// Not a CID at all.
    #[error("malformed CID: {0}")]
    Malformed(String),
    /// A CID, but not version 1.
    #[error("unsupported CID version (only CIDv1 is used)")]
    Version,
    /// A CID with a codec other than raw or dag-cbor.
    #[error("unsupported CID codec 0x{0:x} (expected raw 0x55 or dag-cbor 0x71)")]
    Codec(u64),
    /// A CID with a hash other than BLAKE3-256.
    #[error("unsupported multihash 0x{0:x} (expected blake3 0x1e, 32 bytes)")]
    Hash(u64),
}

impl Cid {
    /// Length of the binary form: version, codec, hash code, digest length, digest.
    pub const BYTES: usize = 4 + DIGEST_BYTES;

    /// The CID of a raw chunk with these bytes.
    pub fn raw(bytes: &[u8]) -> Cid {
        Cid::from_digest(Codec::Raw, *blake3::hash(bytes).as_bytes())
    }

    /// The CID of a DAG-CBOR block with these bytes.
    pub fn dag_cbor(bytes: &[u8]) -> Cid {
        Cid::from_digest(Codec::DagCbor, *blake3::hash(bytes).as_bytes())
    }

    /// A CID from its parts.
    pub fn from_digest(codec: Codec, digest: [u8; DIGEST_BYTES]) -> Cid {
        Cid { codec, digest }
    }

    /// The codec.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The BLAKE3 digest of the block's bytes.
    pub fn digest(&self) -> &[u8; DIGEST_BYTES] {
        &self.digest
    }

    /// Whether `bytes` hash to this CID.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        blake3::hash(bytes).as_bytes() == &self.digest
    }

    /// The binary CIDv1 form (36 bytes).
    pub fn to_bytes(&self) -> [u8; Cid::BYTES] {
        let mut out = [0u8; Cid::BYTES];
        out[0] = 0x01;
        out[1] = self.codec.code() as u8;
        out[2] = MH_BLAKE3 as u8;
        out[3] = DIGEST_BYTES as u8;
        out[4..].copy_from_slice(&self.digest);
        out
    }

    /// Parses the binary CIDv1 form.
    ///
    /// # Errors
    /// [`CidError`] if the bytes are not a CIDv1 of raw or dag-cbor with a BLAKE3-256 hash.
    pub fn from_bytes(bytes: &[u8]) -> Result<Cid, CidError> {
        // The form mycel writes ([`Cid::to_bytes`]), read in place; anything else goes
        // through the `cid` crate for its exact error (or its other encodings of the same).
        if let Ok(b) = <&[u8; Cid::BYTES]>::try_from(bytes)
            && b[0] == 0x01
            && b[2] == MH_BLAKE3 as u8
            && b[3] == DIGEST_BYTES as u8
        {
            let codec = match u64::from(b[1]) {
                CODEC_RAW => Some(Codec::Raw),
                CODEC_DAG_CBOR => Some(Codec::DagCbor),
                _ => None,
            };
            if let Some(codec) = codec {
                let mut digest = [0u8; DIGEST_BYTES];
                digest.copy_from_slice(&b[4..]);
                return Ok(Cid { codec, digest });
            }
        }
        let cid = ::cid::Cid::try_from(bytes).map_err(|e| CidError::Malformed(e.to_string()))?;
        if cid.to_bytes().len() != bytes.len() {
            return Err(CidError::Malformed("trailing bytes".into()));
        }
        Cid::from_cid(&cid)
    }

    fn from_cid(cid: &::cid::Cid) -> Result<Cid, CidError> {
        if cid.version() != ::cid::Version::V1 {
            return Err(CidError::Version);
        }
        let codec = match cid.codec() {
            CODEC_RAW => Codec::Raw,
            CODEC_DAG_CBOR => Codec::DagCbor,
            other => return Err(CidError::Codec(other)),
        };
        let hash = cid.hash();
        if hash.code() != MH_BLAKE3 || hash.digest().len() != DIGEST_BYTES {
            return Err(CidError::Hash(hash.code()));
        }
        let mut digest = [0u8; DIGEST_BYTES];
        digest.copy_from_slice(hash.digest());
        Ok(Cid { codec, digest })
    }

    fn to_cid(self) -> ::cid::Cid {
        let mh = multihash::Multihash::<64>::wrap(MH_BLAKE3, &self.digest)
            .expect("a 32-byte digest fits a 64-byte multihash");
        ::cid::Cid::new_v1(self.codec.code(), mh)
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_cid(), f)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Cid {
    type Err = CidError;

    fn from_str(s: &str) -> Result<Cid, CidError> {
        let cid = ::cid::Cid::try_from(s.trim()).map_err(|e| CidError::Malformed(e.to_string()))?;
        Cid::from_cid(&cid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_binary_forms_round_trip() {
        // A raw and a dag-cbor CID survive text and binary round trips and carry the
        // standard prefixes.
        for cid in [Cid::raw(b"hello"), Cid::dag_cbor(b"\xa0")] {
            let text = cid.to_string();
            assert!(text.starts_with('b'), "{text}");
            assert_eq!(text.parse::<Cid>().unwrap(), cid);
            assert_eq!(Cid::from_bytes(&cid.to_bytes()).unwrap(), cid);
        }
        assert!(Cid::raw(b"x").to_string().starts_with("bafk"));
    }

    proptest::proptest! {
        /// The hand-written order is the derived one: codec, then digest bytes.
        #[test]
        fn cids_order_by_codec_then_digest(
            a in proptest::array::uniform32(0u8..4),
            b in proptest::array::uniform32(0u8..4),
            raw_a: bool,
            raw_b: bool,
        ) {
            let codec = |raw| if raw { Codec::Raw } else { Codec::DagCbor };
            let (x, y) = (Cid { codec: codec(raw_a), digest: a }, Cid { codec: codec(raw_b), digest: b });
            let want = codec(raw_a).cmp(&codec(raw_b)).then_with(|| a.cmp(&b));
            proptest::prop_assert_eq!(x.cmp(&y), want);
            proptest::prop_assert_eq!(x == y, want.is_eq());
        }
    }

    proptest::proptest! {
        /// The in-place reading of the binary form agrees with the `cid` crate's on any
        /// bytes: the same CID or an error for both.
        #[test]
        fn binary_forms_read_in_place_as_the_cid_crate_reads_them(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 30..40),
            prefix in proptest::sample::select(vec![
                [0x01u8, 0x55, 0x1e, 0x20], [0x01, 0x71, 0x1e, 0x20], [0x01, 0x70, 0x1e, 0x20],
                [0x01, 0x55, 0x12, 0x20], [0x00, 0x55, 0x1e, 0x20], [0x01, 0x55, 0x1e, 0x1f],
            ]),
        ) {
            let mut b = bytes;
            let n = b.len().min(4);
            b[..n].copy_from_slice(&prefix[..n]);
            let slow = ::cid::Cid::try_from(b.as_slice())
                .ok()
                .filter(|c| c.to_bytes().len() == b.len())
                .and_then(|c| Cid::from_cid(&c).ok());
            proptest::prop_assert_eq!(Cid::from_bytes(&b).ok(), slow);
        }
    }

    #[test]
    fn foreign_cids_are_refused() {
        // A sha2-256 CID, a CIDv0 and garbage are errors, not panics.
        let v0 = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG";
        assert_eq!(v0.parse::<Cid>(), Err(CidError::Version));
        let sha = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy";
        assert!(matches!(sha.parse::<Cid>(), Err(CidError::Hash(0x12))));
        assert!(matches!("nonsense".parse::<Cid>(), Err(CidError::Malformed(_))));
        assert!(Cid::from_bytes(&[1, 0x55, 0x1e]).is_err());
    }
}
