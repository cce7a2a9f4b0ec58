//! The management quorum in the daemon: the consensus core on managers, configuration
//! following on every other member, proposals from any node, token joins.
//!
//! One stream protocol, `/mycel/cluster/1`, carries Raft messages between managers,
//! proposals (answered once applied), and configuration follow requests. Decisions (who
//! leads, what commits, which managers join the configuration) are the core's.

pub mod raftlog;

use std::io;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};

use mycel_consensus::state::{ClusterState, Outcome};
pub use mycel_core::cluster::wire::{
    CLUSTER_FRAME_MAX, ClusterFrame, TOPOLOGY_REPORT_TEXT_MAX, TopologyReport,
};
use tokio::sync::{mpsc, oneshot};

/// The cluster protocol.
pub const CLUSTER: StreamProtocol = StreamProtocol::new("/mycel/cluster/1");
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
    let len = ClusterFrame::check_len(prefix)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    ClusterFrame::decode(&body).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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
