//! The management quorum in the daemon: the consensus core on managers, configuration
//! following on every other member, proposals from any node, token joins.
//!
//! One stream protocol, `/mycel/cluster/1`, carries Raft messages between managers,
//! proposals (answered once applied), and configuration follow requests. Decisions (who
//! leads, what commits, which managers join the configuration) are the core's.

pub mod raftlog;

use std::collections::BTreeMap;
use std::io;

use bincode::{Decode, Encode};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use mycel_chunker::codec;
use mycel_consensus::command::{Command, Proposal};
use mycel_consensus::state::{ClusterState, Outcome};
use tokio::sync::{mpsc, oneshot};

/// The cluster protocol.
pub const CLUSTER: StreamProtocol = StreamProtocol::new("/mycel/cluster/1");
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

impl ClusterFrame {
    /// Length-prefixed encoding.
    pub fn encode(&self) -> Vec<u8> {
        let body = codec::encode_limited::<_, CLUSTER_FRAME_MAX>(CLUSTER_FRAME_VERSION, self);
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }
}

/// Reads one frame; `Ok(None)` at a clean end.
///
/// # Errors
/// IO errors; `InvalidData` for oversized or malformed frames.
pub async fn read_frame<R: futures::AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<ClusterFrame>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len == 0 || len > CLUSTER_FRAME_MAX + 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "cluster frame size out of bounds"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    codec::decode_limited::<_, CLUSTER_FRAME_MAX>(CLUSTER_FRAME_VERSION, &body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Writes one frame.
///
/// # Errors
/// IO errors.
pub async fn write_frame<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    f: &ClusterFrame,
) -> io::Result<()> {
    w.write_all(&f.encode()).await?;
    w.flush().await
}

/// An inbound frame with a way to answer on its stream.
#[derive(Debug)]
pub struct Inbound {
    /// The sender.
    pub peer: PeerId,
    /// The frame.
    pub frame: ClusterFrame,
    /// Answers go back on the same stream.
    pub reply: mpsc::Sender<ClusterFrame>,
}

/// Serves one inbound cluster stream: frames go to the daemon loop, answers come back.
pub async fn serve(stream: libp2p::Stream, peer: PeerId, to_loop: mpsc::Sender<Inbound>) {
    let (mut reader, mut writer) = stream.split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<ClusterFrame>(64);
    let writing = tokio::spawn(async move {
        while let Some(f) = reply_rx.recv().await {
            if write_frame(&mut writer, &f).await.is_err() {
                return;
            }
        }
    });
    loop {
        match read_frame(&mut reader).await {
            Ok(Some(frame)) => {
                if to_loop.send(Inbound { peer, frame, reply: reply_tx.clone() }).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, "cluster stream: {e}");
                break;
            }
        }
    }
    drop(reply_tx);
    let _ = writing.await;
}

/// An outbound cluster stream to one peer: frames out, answers back as [`Inbound`]s
/// (whose `reply` writes to the same stream).
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::Sender<ClusterFrame>,
}

impl Link {
    /// Queues a frame; false if the link is gone or full.
    pub fn send(&self, f: ClusterFrame) -> bool {
        self.tx.try_send(f).is_ok()
    }

    /// Whether the link is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Opens a cluster link to `peer`.
pub fn spawn_link(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    to_loop: mpsc::Sender<Inbound>,
) -> Link {
    let (tx, mut rx) = mpsc::channel::<ClusterFrame>(1024);
    let reply_tx = tx.clone();
    tokio::spawn(async move {
        // An open that never completes (a connection going away under it) must not leave
        // the link waiting for ever: give up, and the next use opens a fresh one.
        let opened = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            control.open_stream(peer, CLUSTER),
        )
        .await;
        let Ok(Ok(stream)) = opened else { return };
        let (mut reader, mut writer) = stream.split();
        let reading = tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut reader).await {
                if to_loop.send(Inbound { peer, frame, reply: reply_tx.clone() }).await.is_err() {
                    return;
                }
            }
        });
        while let Some(f) = rx.recv().await {
            if write_frame(&mut writer, &f).await.is_err() {
                break;
            }
        }
        reading.abort();
    });
    Link { tx }
}

/// A join token: the secret, the cluster id and where to find managers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenText {
    /// The secret (only its hash is committed).
    pub secret: [u8; 32],
    /// The cluster.
    pub cluster_id: [u8; 16],
    /// Manager multiaddrs.
    pub addrs: Vec<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TokenText {
    /// `mycel1~SECRET~CLUSTER~ADDR,ADDR`.
    pub fn render(&self) -> String {
        format!("mycel1~{}~{}~{}", hex(&self.secret), hex(&self.cluster_id), self.addrs.join(","))
    }

    /// Parses [`TokenText::render`].
    ///
    /// # Errors
    /// A message saying what is malformed.
    pub fn parse(s: &str) -> Result<TokenText, String> {
        let parts: Vec<&str> = s.trim().splitn(4, '~').collect();
        if parts.len() != 4 || parts[0] != "mycel1" {
            return Err("not a mycel join token (expected mycel1~...)".into());
        }
        let secret = unhex::<32>(parts[1]).ok_or("bad token secret")?;
        let cluster_id = unhex::<16>(parts[2]).ok_or("bad token cluster id")?;
        let addrs = parts[3].split(',').filter(|a| !a.is_empty()).map(str::to_string).collect();
        Ok(TokenText { secret, cluster_id, addrs })
    }
}

/// The result of a proposal, for the API.
pub type ProposeReply = oneshot::Sender<Result<(u64, Outcome), String>>;

/// Proposal bookkeeping: sequence numbers that increase across restarts, and who waits.
#[derive(Debug, Default)]
pub struct Proposals {
    last_seq: u64,
    /// Local waiters by sequence.
    pub local: BTreeMap<u64, ProposeReply>,
    /// Proposals this node's loop forwarded, by request id: (sequence, encoded proposal).
    pub forwarded: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Remote proposers waiting for an apply on this leader: (from, seq) -> (req, reply stream).
    pub remote: BTreeMap<(Vec<u8>, u64), (u64, mpsc::Sender<ClusterFrame>)>,
}

impl Proposals {
    /// The next sequence: milliseconds since the epoch times 1024, kept increasing, so a
    /// restarted node never reuses one.
    pub fn next_seq(&mut self, now_ms: u64) -> u64 {
        self.last_seq = (now_ms.saturating_mul(1024)).max(self.last_seq + 1);
        self.last_seq
    }
}

/// Encodes a proposal from `peer`.
pub fn proposal(peer: &PeerId, seq: u64, commands: Vec<Command>) -> Vec<u8> {
    Proposal { from: peer.to_bytes(), seq, commands }.encode()
}

/// Members' PeerIds from a state.
pub fn member_peers(state: &ClusterState) -> Vec<PeerId> {
    state.members.keys().filter_map(|k| PeerId::from_bytes(k).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_garbage() {
        // A token renders and parses back; wrong prefixes and lengths are errors.
        let t = TokenText {
            secret: [7; 32],
            cluster_id: [9; 16],
            addrs: vec!["/ip4/127.0.0.1/udp/1/quic-v1/p2p/12D3KooWA".into()],
        };
        assert_eq!(TokenText::parse(&t.render()).unwrap(), t);
        assert!(TokenText::parse("mycel2~aa~bb~").is_err());
        assert!(TokenText::parse("mycel1~aa~bb~").is_err());
        assert!(TokenText::parse("").is_err());
    }
}
