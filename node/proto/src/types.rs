//! Small shared types: peer identities and time.

use std::fmt;

/// Longest peer identity in bytes (libp2p's ed25519 PeerId is 38).
pub const PEER_ID_BYTES_MAX: usize = 64;

/// A peer's identity: the bytes of its libp2p PeerId (a multihash), opaque to the core.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
