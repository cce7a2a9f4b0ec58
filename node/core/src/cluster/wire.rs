//! The frames of `/mycel/cluster/1`: Raft messages between managers, proposals and their
//! answers, configuration following, router reports. Length-prefixed, versioned and bounded;
//! the daemon writes them to QUIC streams and the simulator passes the same bytes between
//! simulated nodes.

use bincode::{Decode, Encode};
use mycel_chunker::codec;

/// Largest cluster frame (a whole state for a following edge).
pub const CLUSTER_FRAME_MAX: usize = 256 << 20;
const CLUSTER_FRAME_VERSION: u8 = 1;

/// Frames of `/mycel/cluster/1`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ClusterFrame {
    /// A Raft message (protobuf), manager to manager.
    Raft {
        /// Sender's Raft id.
        from: u64,
        /// The message.
        msg: Vec<u8>,
    },
    /// A proposal for the leader.
    Propose {
        /// Request id.
        req: u64,
        /// An encoded proposal.
        proposal: Vec<u8>,
    },
    /// The proposal was applied (or rejected) at `index`.
    Proposed {
        /// Request id.
        req: u64,
        /// Log index.
        index: u64,
        /// Whether it applied.
        applied: bool,
        /// Why not.
        reason: String,
    },
    /// Not the leader: ask this one (PeerId bytes; empty if unknown).
    NotLeader {
        /// Request id.
        req: u64,
        /// The leader's PeerId bytes.
        leader: Vec<u8>,
    },
    /// A manager's mean round-trip time to the other members, for the leader's preference.
    RttReport {
        /// Sender's Raft id.
        from: u64,
        /// Mean round trip in ms.
        mean_rtt_ms: u64,
    },
    /// Asks for the configuration if it is newer than `since`.
    Follow {
        /// The follower's applied index.
        since: u64,
    },
    /// The configuration (empty: nothing newer).
    State {
        /// Its applied index.
        applied: u64,
        /// The encoded state.
        state: Vec<u8>,
    },
    /// The entries applied after the follower's index, in order (configuration changes with
    /// empty data): the follower applies them to reach the manager's state.
    Entries {
        /// `(index, proposal bytes)`.
        entries: Vec<(u64, Vec<u8>)>,
    },
    /// A router's topology results, one per watched name, sent to managers periodically
    /// (a lost frame is replaced by the next one).
    TopologyReport {
        /// At most [`mycel_consensus::topology::NAMES_MAX`] entries.
        reports: Vec<TopologyReport>,
    },
}

/// What a router last did for one topology name (see `docs/topology.md`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct TopologyReport {
    /// Topology name.
    pub name: String,
    /// The activation (or canary start) index handled.
    pub activation_index: u64,
    /// The version of that activation.
    pub version: u64,
    /// The version the router's file holds (0: none).
    pub applied_version: u64,
    /// The file is in place and the hook succeeded (or nothing needed doing).
    pub applied: bool,
    /// `applied`, `unchanged`, `hook failed`, `interrupted` or `error`.
    pub status: String,
    /// The hook's output tail or the error (at most [`TOPOLOGY_REPORT_TEXT_MAX`] bytes).
    pub error: String,
    /// `in sync`, `changed`, `missing`, or empty when unknown.
    pub drift: String,
    /// The version waiting for activation (the latest, staged or in its canary phase) if
    /// this router holds it completely, else 0. Gossip says the same, but a restarted
    /// router's announcements can be ignored for a while; this report cannot.
    pub holding: u64,
}

/// Longest text in a [`TopologyReport`].
pub const TOPOLOGY_REPORT_TEXT_MAX: usize = 1024;

/// Why bytes are not a cluster frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is zero or over [`CLUSTER_FRAME_MAX`].
    #[error("cluster frame size {0} out of bounds")]
    Size(usize),
    /// The body does not decode.
    #[error("malformed cluster frame: {0}")]
    Malformed(String),
}

impl ClusterFrame {
    /// The body length a 4-byte prefix announces, checked against the limit before
    /// anything is allocated.
    ///
    /// # Errors
    /// [`FrameError::Size`].
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
        let len = u32::from_le_bytes(prefix) as usize;
        if len == 0 || len > CLUSTER_FRAME_MAX + 1 {
            return Err(FrameError::Size(len));
        }
        Ok(len)
    }

    /// Decodes a body (without its length prefix).
    ///
    /// # Errors
    /// [`FrameError::Malformed`].
    pub fn decode(body: &[u8]) -> Result<ClusterFrame, FrameError> {
        codec::decode_limited::<_, CLUSTER_FRAME_MAX>(CLUSTER_FRAME_VERSION, body)
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// Length-prefixed encoding.
    pub fn encode(&self) -> Vec<u8> {
        let body = codec::encode_limited::<_, CLUSTER_FRAME_MAX>(CLUSTER_FRAME_VERSION, self);
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every frame decodes back to itself from its encoding.
    #[test]
    fn frames_round_trip() {
        let frames = [
            ClusterFrame::Raft { from: 3, msg: vec![1, 2, 3] },
            ClusterFrame::Propose { req: 9, proposal: vec![7; 40] },
            ClusterFrame::Proposed { req: 9, index: 4, applied: false, reason: "no".into() },
            ClusterFrame::NotLeader { req: 9, leader: vec![0, 36, 1] },
            ClusterFrame::Follow { since: 12 },
            ClusterFrame::Entries { entries: vec![(13, vec![]), (14, vec![1])] },
        ];
        for f in frames {
            let bytes = f.encode();
            let len = ClusterFrame::check_len(bytes[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, bytes.len() - 4);
            assert_eq!(ClusterFrame::decode(&bytes[4..]).unwrap(), f);
        }
        assert!(ClusterFrame::check_len([0; 4]).is_err());
        assert!(ClusterFrame::check_len(u32::MAX.to_le_bytes()).is_err());
    }

    proptest! {
        /// Arbitrary bytes decode or fail cleanly.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = ClusterFrame::decode(&body);
        }
    }
}
