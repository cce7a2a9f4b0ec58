//! mycel-base: the types every core and driver shares, so that a peer and an instant mean one
//! thing across the workspace (the consensus core, the data plane, the node core, the daemon
//! and the simulator all use these).
//!
//! - [`PeerId`]: a peer's identity, the bytes of its libp2p PeerId, opaque here.
//! - [`Timestamp`]: milliseconds on the driver's clock.
//! - [`cmp_in_words`]: the byte-array order used by the identifiers that key hot maps.
//!
//! No dependencies: nothing here may touch the clock, the network or the filesystem.

#[cfg(feature = "sim-bugs")]
pub mod bugs;

use std::fmt;

/// Longest peer identity in bytes. libp2p's PeerIds are at most 44 bytes: an identity
/// multihash of a public key of up to 42 bytes (ed25519's PeerId is 38), or a 34-byte
/// SHA-256 multihash of a longer key. Kept small: every ordered map of peers holds them.
pub const PEER_ID_BYTES_MAX: usize = 48;

/// A peer's identity: the bytes of its libp2p PeerId (a multihash), opaque to the core.
///
/// Ordered by length, then bytes (as derived), but compared eight bytes at a time: PeerIds
/// share a multihash prefix, and ordered maps keyed by them are on every hot path, where a
/// `memcmp` call per comparison cost a sixth of a 1,000-node simulation.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId {
    len: u8,
    bytes: [u8; PEER_ID_BYTES_MAX],
}

impl PeerId {
    /// From the PeerId's bytes; `None` if longer than [`PEER_ID_BYTES_MAX`].
    pub fn from_bytes(b: &[u8]) -> Option<PeerId> {
        if b.is_empty() || b.len() > PEER_ID_BYTES_MAX {
            return None;
        }
        let mut bytes = [0u8; PEER_ID_BYTES_MAX];
        bytes[..b.len()].copy_from_slice(b);
        Some(PeerId { len: b.len() as u8, bytes })
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

impl Ord for PeerId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.len.cmp(&other.len).then_with(|| cmp_in_words(&self.bytes, &other.bytes))
    }
}

impl PartialOrd for PeerId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The tail of a multihash is the distinguishing part.
        let b = self.as_bytes();
        let tail = &b[b.len().saturating_sub(6)..];
        write!(f, "peer-")?;
        for x in tail {
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

/// Milliseconds on the driver's clock (monotonic in the daemon, virtual in tests and sim).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `ms` later.
    pub fn plus_ms(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds since `earlier` (0 if not earlier).
    pub fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// `a.cmp(b)` for byte arrays whose length is a multiple of 8, compared eight bytes at a time
/// as big-endian words (the same order, without a `memcmp` call): for identifiers that key
/// ordered maps on hot paths.
pub fn cmp_in_words<const N: usize>(a: &[u8; N], b: &[u8; N]) -> std::cmp::Ordering {
    for (x, y) in a.as_chunks::<8>().0.iter().zip(b.as_chunks::<8>().0) {
        let (x, y) = (u64::from_be_bytes(*x), u64::from_be_bytes(*y));
        if x != y {
            return x.cmp(&y);
        }
    }
    a.as_chunks::<8>().1.cmp(b.as_chunks::<8>().1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The hand-written order is the derived one: by length, then bytes.
        #[test]
        fn peer_ids_order_by_length_then_bytes(
            a in proptest::collection::vec(any::<u8>(), 1..=PEER_ID_BYTES_MAX),
            b in proptest::collection::vec(any::<u8>(), 1..=PEER_ID_BYTES_MAX),
            shared in 0usize..40,
        ) {
            // Often a shared prefix, as real multihashes have.
            let mut b = b;
            let n = shared.min(a.len()).min(b.len());
            b[..n].copy_from_slice(&a[..n]);
            let (x, y) = (PeerId::from_bytes(&a).unwrap(), PeerId::from_bytes(&b).unwrap());
            let want = a.len().cmp(&b.len()).then_with(|| a.cmp(&b));
            prop_assert_eq!(x.cmp(&y), want);
            prop_assert_eq!(x == y, want.is_eq());
        }
    }
}
