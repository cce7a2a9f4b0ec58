//! `/mycel/exchange/1` streams: serving blocks to members, and one request stream per peer
//! we fetch from.
//!
//! Frames are read with their length checked before the body is read, so a peer can never
//! make us allocate more than one frame; a malformed or oversized frame closes the stream.

use std::collections::BTreeSet;
use std::io;
use std::sync::{Arc, RwLock};

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, Stream};
use mycel_chunker::{Cid, Codec};
use mycel_proto::wire::{self, Frame};
use tokio::sync::mpsc;

use super::EXCHANGE;
use super::limit::Limiter;
use crate::access::Access;
use crate::metrics::Metrics;
use crate::store::Store;

/// Reads one frame; `Ok(None)` at a clean end of stream.
///
/// # Errors
/// IO errors, and `InvalidData` for an oversized or malformed frame.
pub async fn read_frame<R: futures::AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    read_frame_into(r, &mut Vec::new()).await
}

/// [`read_frame`] reusing `buf` for the body (no allocation and zeroing per frame).
///
/// # Errors
/// As [`read_frame`].
pub async fn read_frame_into<R: futures::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Frame>> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len =
        Frame::check_len(prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // The length was checked against FRAME_BYTES_MAX before anything was allocated.
    if buf.len() < len {
        buf.resize(len, 0);
    }
    r.read_exact(&mut buf[..len]).await?;
    Frame::decode(&buf[..len]).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn write_frame<W: futures::AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode()).await
}

/// What serving needs.
#[derive(Clone, Debug)]
pub struct ServeCtx {
    /// The store.
    pub store: Arc<Store>,
    /// Upload cap.
    pub upload: Limiter,
    /// Current members (checked on every request, so a removal takes effect at once).
    pub members: Arc<RwLock<BTreeSet<PeerId>>>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Who may read what (swapped whole when the configuration changes; checked before
    /// every block, so a revocation stops transfers already under way).
    pub access: Arc<RwLock<Arc<Access>>>,
    /// Test only: flip a bit in every chunk served.
    pub corrupt: bool,
}

/// Serves one inbound stream until it ends or misbehaves.
pub async fn serve(mut stream: Stream, peer: PeerId, ctx: ServeCtx) {
    let mut buf = Vec::new();
    loop {
        let frame = match read_frame_into(&mut stream, &mut buf).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, "closing exchange stream: {e}");
                ctx.metrics.bad_frames.inc();
                return;
            }
        };
        let member = ctx.members.read().expect("members lock").contains(&peer);
        let result = match frame {
            _ if !member => {
                let req = match frame {
                    Frame::Want { req, .. } | Frame::WhoHas { req, .. } => req,
                    _ => 0,
                };
                write_frame(&mut stream, &Frame::Refused { req, reason: "not a member".into() })
                    .await
            }
            Frame::Want { req, root, cids } => {
                serve_want(&mut stream, peer, req, &root, &cids, &ctx).await
            }
            Frame::WhoHas { req, root } => {
                let answer = match wire::cid(&root) {
                    Ok(cid) => match (ctx.store.root(&cid), ctx.store.has(&cid)) {
                        (Ok(Some(_)), _) => Frame::Holding { req, root, complete: true },
                        (_, Ok(true)) => Frame::Holding { req, root, complete: false },
                        _ => Frame::DontHave { req, cid: root },
                    },
                    Err(_) => Frame::DontHave { req, cid: root },
                };
                write_frame(&mut stream, &answer).await
            }
            other => {
                tracing::debug!(%peer, "unexpected frame {other:?} on a serving stream");
                ctx.metrics.bad_frames.inc();
                return;
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, "exchange stream write failed: {e}");
            return;
        }
    }
}

async fn serve_want(
    stream: &mut Stream,
    peer: PeerId,
    req: u64,
    root: &wire::CidBytes,
    cids: &[wire::CidBytes],
    ctx: &ServeCtx,
) -> io::Result<()> {
    let Ok(root) = wire::cid(root) else {
        let reason = "malformed root".to_string();
        return write_frame(stream, &Frame::Refused { req, reason }).await;
    };
    // The namespace the root was added under here, which governs it until a pin commits.
    // Unreadable, the answer is no rather than the default namespace.
    let local = match ctx.store.local_namespace(&root) {
        Ok(ns) => ns,
        Err(e) => {
            let reason = format!("this node cannot tell who may read {root}: {e}");
            write_frame(stream, &Frame::Refused { req, reason }).await?;
            return stream.flush().await;
        }
    };
    // Not `default`: the fetcher learns it, so its copy is served under it too.
    let ns = ctx.access.read().expect("access lock").namespace(&root, local.as_deref()).to_owned();
    if ns != mycel_policy::access::DEFAULT_NAMESPACE {
        let root = root.to_bytes();
        write_frame(stream, &Frame::Namespace { req, root, namespace: ns }).await?;
    }
    for c in cids {
        // Checked per block: a revocation committed while this want is served stops it.
        let access = ctx.access.read().expect("access lock").clone();
        if let Err(reason) = access.may_read(&peer, &root, local.as_deref()) {
            ctx.metrics.refused_requests.inc();
            write_frame(stream, &Frame::Refused { req, reason }).await?;
            return stream.flush().await;
        }
        let cid = wire::cid(c).ok();
        if let Some(cid) = cid
            && !access.in_tree(&ctx.store, &root, &cid)
        {
            ctx.metrics.refused_requests.inc();
            let reason = format!("{cid} is not part of {root}");
            write_frame(stream, &Frame::Refused { req, reason }).await?;
            return stream.flush().await;
        }
        let answer = match cid.map(|cid| (cid, ctx.store.get(&cid))) {
            Some((cid, Ok(Some(mut bytes)))) => {
                if ctx.corrupt && cid.codec() == Codec::Raw && !bytes.is_empty() {
                    bytes[0] ^= 1;
                }
                ctx.upload.take(bytes.len()).await;
                ctx.metrics.bytes_sent.inc_by(bytes.len() as u64);
                Frame::Block { req, cid: *c, bytes }
            }
            Some((cid, Err(e))) => {
                // A corrupt stored block is never served: say we lack it.
                tracing::warn!("not serving {cid}: {e}");
                Frame::DontHave { req, cid: *c }
            }
            _ => Frame::DontHave { req, cid: *c },
        };
        write_frame(stream, &answer).await?;
    }
    stream.flush().await
}

/// Events from request streams to the daemon loop.
#[derive(Debug)]
pub enum NetEvent {
    /// A frame from a peer we asked.
    Inbound {
        /// The peer.
        peer: PeerId,
        /// The frame.
        frame: Frame,
    },
    /// The request stream to a peer ended.
    Closed {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
}

/// The sending half of a request stream.
#[derive(Debug, Clone)]
pub struct PeerLink {
    tx: mpsc::Sender<Frame>,
}

impl PeerLink {
    /// Queues a frame; false if the stream is gone.
    pub fn send(&self, frame: Frame) -> bool {
        self.tx.try_send(frame).is_ok()
    }
}

/// Opens a request stream to `peer` and runs it: frames sent through the returned link go
/// out; answers come back as [`NetEvent::Inbound`].
pub fn spawn_link(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    events: mpsc::Sender<NetEvent>,
    download: Limiter,
    metrics: Arc<Metrics>,
) -> PeerLink {
    // Bounded: the fetch core never has more than its windows in flight.
    let (tx, mut rx) = mpsc::channel::<Frame>(1024);
    tokio::spawn(async move {
        let stream = match control.open_stream(peer, EXCHANGE).await {
            Ok(s) => s,
            Err(e) => {
                let _ = events.send(NetEvent::Closed { peer, reason: e.to_string() }).await;
                return;
            }
        };
        let (mut reader, mut writer) = stream.split();
        let read_events = events.clone();
        let read_metrics = metrics.clone();
        let reading = tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                match read_frame_into(&mut reader, &mut buf).await {
                    Ok(Some(frame)) => {
                        if let Frame::Block { bytes, .. } = &frame {
                            download.take(bytes.len()).await;
                            read_metrics.bytes_received.inc_by(bytes.len() as u64);
                        }
                        if read_events.send(NetEvent::Inbound { peer, frame }).await.is_err() {
                            return "daemon stopped".to_string();
                        }
                    }
                    Ok(None) => return "stream ended".to_string(),
                    Err(e) => {
                        read_metrics.bad_frames.inc();
                        return format!("bad frame: {e}");
                    }
                }
            }
        });
        let mut reading = reading;
        let reason = loop {
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(f) => {
                        if let Err(e) = write_frame(&mut writer, &f).await {
                            break format!("write failed: {e}");
                        }
                        let _ = writer.flush().await;
                    }
                    None => break "link dropped".to_string(),
                },
                r = &mut reading => break r.unwrap_or_else(|e| e.to_string()),
            }
        };
        reading.abort();
        let _ = writer.close().await;
        let _ = events.send(NetEvent::Closed { peer, reason }).await;
    });
    PeerLink { tx }
}

/// The root CID of a `Holding`/`DontHave` answer, if it parses.
pub fn frame_cid(c: &wire::CidBytes) -> Option<Cid> {
    wire::cid(c).ok()
}
