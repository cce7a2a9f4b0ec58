//! Frames of the exchange protocol (`/mycel/exchange/1`) and the gossip announcement.
//!
//! A frame on a stream is `[len: u32 LE][version: u8][bincode body]`, `len` counting the
//! version byte and body and never above [`FRAME_BYTES_MAX`]. Every request names the root
//! it serves, so the serving side can authorise it. Decoding is bounded: an oversized
//! length, an unknown version, a malformed body, a want list over [`WANT_CIDS_MAX`] or a
//! block over the chunk limit is an error, and the driver resets the stream.

use bincode::{Decode, Encode};
use mycel_chunker::{Cid, NODE_BYTES_MAX, codec};

/// Format version of frames and announcements.
pub const FRAME_VERSION: u8 = 1;
/// Largest frame body: one block (chunk or manifest node) plus headroom.
pub const FRAME_BYTES_MAX: usize = NODE_BYTES_MAX + 4096;
/// Most CIDs in one want list.
pub const WANT_CIDS_MAX: usize = 256;
/// Longest reason text in a refusal.
pub const REASON_BYTES_MAX: usize = 256;
/// Longest [`Frame::Block`] header after the length prefix: version, variant, request id,
/// CID, byte count (see [`Frame::parse_block_header`]).
pub const BLOCK_HEADER_MAX: usize = 1 + 1 + 9 + Cid::BYTES + 9;
/// Largest announcement.
pub const ANNOUNCE_BYTES_MAX: usize = 64 * 1024;
/// Complete roots per announcement page.
pub const ANNOUNCE_ROOTS_MAX: usize = 1024;
/// Partial transfers per announcement.
pub const ANNOUNCE_PARTIAL_MAX: usize = 64;
/// Longest zone name.
pub const ZONE_BYTES_MAX: usize = 64;
/// Listen addresses per announcement.
pub const ANNOUNCE_ADDRS_MAX: usize = 8;
/// Longest announced address.
pub const ADDR_BYTES_MAX: usize = 256;
/// Format version of announcements (2: with the node's listen addresses).
pub const ANNOUNCE_VERSION: u8 = 2;
/// Longest namespace name.
pub const NAMESPACE_BYTES_MAX: usize = 64;

const _: () = assert!(FRAME_BYTES_MAX >= NODE_BYTES_MAX + 64, "a frame holds the largest block");
const _: () = assert!(WANT_CIDS_MAX * (Cid::BYTES + 2) + 64 < FRAME_BYTES_MAX);
const _: () = assert!(
    ANNOUNCE_ROOTS_MAX * (Cid::BYTES + 1)
        + ANNOUNCE_PARTIAL_MAX * 64
        + ANNOUNCE_ADDRS_MAX * (ADDR_BYTES_MAX + 3)
        < ANNOUNCE_BYTES_MAX
);

/// A CID on the wire (its 36-byte binary form).
pub type CidBytes = [u8; Cid::BYTES];

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Frame {
    /// Asks for blocks of `root`.
    Want {
        /// Request id, echoed in the answers.
        req: u64,
        /// The object these blocks belong to.
        root: CidBytes,
        /// The blocks.
        cids: Vec<CidBytes>,
    },
    /// One block.
    Block {
        /// Request id.
        req: u64,
        /// The block's CID.
        cid: CidBytes,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The server does not hold this block.
    DontHave {
        /// Request id.
        req: u64,
        /// The block.
        cid: CidBytes,
    },
    /// Asks whether the server holds `root`.
    WhoHas {
        /// Request id.
        req: u64,
        /// The object.
        root: CidBytes,
    },
    /// Answer to [`Frame::WhoHas`].
    Holding {
        /// Request id.
        req: u64,
        /// The object.
        root: CidBytes,
        /// Whether every block is held.
        complete: bool,
    },
    /// The request was refused (not a member, no grant, over a limit).
    Refused {
        /// Request id.
        req: u64,
        /// Why.
        reason: String,
    },
    /// The namespace whose grants the server applies to `root`, sent before the blocks of a
    /// want when it is not `default`: a fetcher that holds no pin naming one serves its copy
    /// under the same namespace.
    Namespace {
        /// Request id.
        req: u64,
        /// The object.
        root: CidBytes,
        /// Its namespace.
        namespace: String,
    },
}

/// Why a frame or announcement was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Length prefix over the limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Zero length.
    #[error("empty frame")]
    Empty,
    /// Body did not decode (wrong version, malformed, trailing bytes).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Decoded, but breaks a protocol bound.
    #[error("frame breaks a limit: {0}")]
    Limit(&'static str),
}

impl Frame {
    /// The frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let body = codec::encode_limited::<_, FRAME_BYTES_MAX>(FRAME_VERSION, self);
        assert!(body.len() <= FRAME_BYTES_MAX, "frame of {} bytes", body.len());
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// The start of a [`Frame::Block`] on the wire, length prefix included, up to its bytes:
    /// followed by the `len` bytes it is exactly [`Frame::encode`] of the block, so a server
    /// writes the bytes from where they lie without copying them into a frame.
    ///
    /// # Panics
    /// If `len` exceeds [`NODE_BYTES_MAX`] (no block is larger).
    pub fn block_header(req: u64, cid: &CidBytes, len: usize) -> Vec<u8> {
        assert!(len <= NODE_BYTES_MAX, "block of {len} bytes");
        let empty = Frame::Block { req, cid: *cid, bytes: Vec::new() };
        let mut body = codec::encode_limited::<_, FRAME_BYTES_MAX>(FRAME_VERSION, &empty);
        // The bytes come last, as their length (a varint: 0 is one zero byte) and the bytes.
        assert_eq!(body.pop(), Some(0), "a block's bytes are its last field");
        let varint = bincode::encode_to_vec(len as u64, bincode::config::standard())
            .expect("a length encodes");
        body.extend_from_slice(&varint);
        let total = body.len() + len;
        assert!(total <= FRAME_BYTES_MAX, "frame of {total} bytes");
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(total as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads the start of a frame body (after its length prefix; `head` is its first up to
    /// [`BLOCK_HEADER_MAX`] bytes, `frame_len` the prefix's value): if it begins a
    /// [`Frame::Block`] encoded exactly as [`Frame::block_header`] writes it, with a length
    /// that ends the block where the frame ends and within the block limit, returns the
    /// request id, the CID, the header's length and the block's length. A receiver then
    /// reads the block's bytes straight into their own buffer. `None` for anything else,
    /// which the caller decodes whole with [`Frame::decode`] (so the same frames are
    /// accepted either way).
    pub fn parse_block_header(
        head: &[u8],
        frame_len: usize,
    ) -> Option<(u64, CidBytes, usize, usize)> {
        // bincode's varint, in its shortest form only (what the encoder writes).
        fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
            let first = *b.get(*at)?;
            let (width, least) = match first {
                0..=250 => {
                    *at += 1;
                    return Some(u64::from(first));
                }
                251 => (2, 251),
                252 => (4, u64::from(u16::MAX) + 1),
                253 => (8, u64::from(u32::MAX) + 1),
                _ => return None,
            };
            let raw = b.get(*at + 1..*at + 1 + width)?;
            *at += 1 + width;
            let mut le = [0u8; 8];
            le[..width].copy_from_slice(raw);
            Some(u64::from_le_bytes(le)).filter(|v| *v >= least)
        }
        // Version, then the variant index of `Block` (1, one varint byte).
        if head.first() != Some(&FRAME_VERSION) || head.get(1) != Some(&1) {
            return None;
        }
        let mut at = 2;
        let req = varint(head, &mut at)?;
        let cid: CidBytes = head.get(at..at + Cid::BYTES)?.try_into().ok()?;
        at += Cid::BYTES;
        let len = usize::try_from(varint(head, &mut at)?).ok()?;
        (len <= NODE_BYTES_MAX && at.checked_add(len)? == frame_len).then_some((req, cid, at, len))
    }

    /// Checks a length prefix before reading the body.
    ///
    /// # Errors
    /// [`WireError::TooLarge`] or [`WireError::Empty`].
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, WireError> {
        let len = u32::from_le_bytes(prefix) as usize;
        if len == 0 {
            return Err(WireError::Empty);
        }
        if len > FRAME_BYTES_MAX {
            return Err(WireError::TooLarge(len));
        }
        Ok(len)
    }

    /// Decodes a body (after the length prefix) and checks protocol bounds.
    ///
    /// # Errors
    /// [`WireError`] for anything but a well-formed frame within the limits.
    pub fn decode(body: &[u8]) -> Result<Frame, WireError> {
        if body.len() > FRAME_BYTES_MAX {
            return Err(WireError::TooLarge(body.len()));
        }
        let frame: Frame = codec::decode_limited::<_, FRAME_BYTES_MAX>(FRAME_VERSION, body)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        match &frame {
            Frame::Want { cids, .. } if cids.len() > WANT_CIDS_MAX => {
                Err(WireError::Limit("want list too long"))
            }
            Frame::Want { cids, .. } if cids.is_empty() => Err(WireError::Limit("empty want list")),
            Frame::Block { bytes, .. } if bytes.len() > NODE_BYTES_MAX => {
                Err(WireError::Limit("block larger than any chunk or node"))
            }
            Frame::Refused { reason, .. } if reason.len() > REASON_BYTES_MAX => {
                Err(WireError::Limit("reason too long"))
            }
            Frame::Namespace { namespace, .. } if namespace.len() > NAMESPACE_BYTES_MAX => {
                Err(WireError::Limit("namespace too long"))
            }
            _ => Ok(frame),
        }
    }
}

/// Progress of an object a node is still fetching.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Partial {
    /// The object.
    pub root: CidBytes,
    /// Content bytes held.
    pub done_bytes: u64,
    /// Content bytes in all.
    pub total_bytes: u64,
}

/// A node's periodic digest of what it holds, published on its zone's gossip topic.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Announcement {
    /// The announcing node's PeerId bytes.
    pub node: Vec<u8>,
    /// Its zone.
    pub zone: String,
    /// Increases with every announcement of this node.
    pub seq: u64,
    /// This page of the node's complete roots.
    pub roots: Vec<CidBytes>,
    /// Page number (roots beyond one page rotate across announcements).
    pub page: u32,
    /// Pages in all.
    pub pages: u32,
    /// Objects being fetched.
    pub partial: Vec<Partial>,
    /// Transfers in progress (served and fetched).
    pub load: u32,
    /// Free store capacity in bytes.
    pub free_bytes: u64,
    /// Where the node listens (multiaddrs without `/p2p/`), so members that have never met
    /// it can dial it when the peers between them are gone.
    pub addrs: Vec<String>,
}

impl Announcement {
    /// Encodes (version byte first).
    pub fn encode(&self) -> Vec<u8> {
        let out = codec::encode_limited::<_, ANNOUNCE_BYTES_MAX>(ANNOUNCE_VERSION, self);
        assert!(out.len() <= ANNOUNCE_BYTES_MAX, "announcement of {} bytes", out.len());
        out
    }

    /// Decodes and checks bounds.
    ///
    /// # Errors
    /// [`WireError`] for malformed or oversized announcements.
    pub fn decode(bytes: &[u8]) -> Result<Announcement, WireError> {
        if bytes.len() > ANNOUNCE_BYTES_MAX {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let a: Announcement =
            codec::decode_limited::<_, ANNOUNCE_BYTES_MAX>(ANNOUNCE_VERSION, bytes)
                .map_err(|e| WireError::Malformed(e.to_string()))?;
        if a.roots.len() > ANNOUNCE_ROOTS_MAX
            || a.partial.len() > ANNOUNCE_PARTIAL_MAX
            || a.zone.len() > ZONE_BYTES_MAX
            || a.node.len() > mycel_base::PEER_ID_BYTES_MAX
            || a.page >= a.pages.max(1)
            || a.addrs.len() > ANNOUNCE_ADDRS_MAX
            || a.addrs.iter().any(|x| x.is_empty() || x.len() > ADDR_BYTES_MAX)
        {
            return Err(WireError::Limit("announcement over its bounds"));
        }
        Ok(a)
    }
}

/// A CID from its wire form.
///
/// # Errors
/// [`WireError::Malformed`] if the bytes are not a CID mycel uses.
pub fn cid(bytes: &CidBytes) -> Result<Cid, WireError> {
    Cid::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_bounds_hold() {
        // Each frame kind decodes to itself; an oversized length, a long want list, an
        // empty want list and a wrong version are refused.
        let c = Cid::raw(b"x").to_bytes();
        for f in [
            Frame::Want { req: 1, root: c, cids: vec![c; 3] },
            Frame::Block { req: 2, cid: c, bytes: vec![7; 1000] },
            Frame::DontHave { req: 3, cid: c },
            Frame::WhoHas { req: 4, root: c },
            Frame::Holding { req: 5, root: c, complete: true },
            Frame::Refused { req: 6, reason: "no".into() },
            Frame::Namespace { req: 7, root: c, namespace: "secret".into() },
        ] {
            let bytes = f.encode();
            let len = Frame::check_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, bytes.len() - 4);
            assert_eq!(Frame::decode(&bytes[4..]).unwrap(), f);
        }
        // A block header and the bytes after it are the block frame, for any length
        // (the length's varint takes 1, 3 or 5 bytes).
        for len in [0, 1, 250, 251, 65_535, 65_536, NODE_BYTES_MAX] {
            let block = Frame::Block { req: u64::MAX - 1, cid: c, bytes: vec![9; len] };
            let mut wire = Frame::block_header(u64::MAX - 1, &c, len);
            wire.extend_from_slice(&vec![9; len]);
            assert_eq!(wire, block.encode(), "len {len}");
            // Its start parses back, for every cut of the head a reader may have.
            let body = &wire[4..];
            let head = &body[..body.len().min(BLOCK_HEADER_MAX)];
            let (req, cid, at, n) = Frame::parse_block_header(head, body.len()).unwrap();
            assert_eq!((req, cid, n), (u64::MAX - 1, c, len));
            assert_eq!(Frame::decode(body).unwrap(), block);
            assert_eq!(&body[at..], &vec![9; len][..]);
            // A length that does not end where the frame ends is left to the full decode.
            assert_eq!(Frame::parse_block_header(head, body.len() + 1), None);
        }
        // Other frames are not block headers.
        let dh = Frame::DontHave { req: 3, cid: c }.encode();
        assert_eq!(Frame::parse_block_header(&dh[4..], dh.len() - 4), None);
        // A non-canonical request id (251 -> u16) is left to the full decode.
        let mut odd = vec![FRAME_VERSION, 1, 251, 7, 0];
        odd.extend_from_slice(&c);
        odd.push(0);
        assert_eq!(Frame::parse_block_header(&odd, odd.len()), None);
        assert!(Frame::check_len((FRAME_BYTES_MAX as u32 + 1).to_le_bytes()).is_err());
        assert!(Frame::check_len([0; 4]).is_err());
        let long = Frame::Want { req: 1, root: c, cids: vec![c; WANT_CIDS_MAX + 1] }.encode();
        assert_eq!(Frame::decode(&long[4..]), Err(WireError::Limit("want list too long")));
        let empty = Frame::Want { req: 1, root: c, cids: vec![] }.encode();
        assert!(Frame::decode(&empty[4..]).is_err());
        let mut wrong = Frame::DontHave { req: 3, cid: c }.encode();
        wrong[4] = 9;
        assert!(matches!(Frame::decode(&wrong[4..]), Err(WireError::Malformed(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 2048,
            rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
            ..ProptestConfig::default()
        })]
        #[test]
        fn block_headers_parse_as_the_full_decode_reads_them(
            req in any::<u64>(),
            len in 0usize..70_000,
            flip in any::<(usize, u8)>(),
        ) {
            // A block frame's header parses to its fields; with one header byte changed it
            // parses only if the full decode reads the same fields from it.
            let c = Cid::raw(&req.to_le_bytes()).to_bytes();
            let mut body = Frame::Block { req, cid: c, bytes: vec![5; len] }.encode().split_off(4);
            let cut = body.len().min(BLOCK_HEADER_MAX);
            let (r, k, _, n) = Frame::parse_block_header(&body[..cut], body.len()).unwrap();
            prop_assert_eq!((r, k, n), (req, c, len));
            let i = flip.0 % cut;
            body[i] ^= flip.1.max(1);
            if let Some((r, k, _, n)) = Frame::parse_block_header(&body[..cut], body.len()) {
                let decoded = Frame::decode(&body);
                prop_assert!(matches!(&decoded, Ok(Frame::Block { req, cid, bytes })
                    if *req == r && *cid == k && bytes.len() == n), "{decoded:?}");
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Arbitrary bytes are an error or a frame within bounds, never a panic.
            if let Ok(Frame::Want { cids, .. }) = Frame::decode(&bytes) {
                prop_assert!(cids.len() <= WANT_CIDS_MAX);
            }
            // A block header that parses is one the full decode accepts, with those fields.
            let head = &bytes[..bytes.len().min(BLOCK_HEADER_MAX)];
            if let Some((req, cid, _, len)) = Frame::parse_block_header(head, bytes.len()) {
                let decoded = Frame::decode(&bytes);
                prop_assert!(matches!(&decoded, Ok(Frame::Block { req: r, cid: k, bytes })
                    if *r == req && *k == cid && bytes.len() == len), "{decoded:?}");
            }
            let _ = Announcement::decode(&bytes);
        }
    }
}
