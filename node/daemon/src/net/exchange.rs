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
use mycel_core::access::Access;

use super::core_peer;
use crate::metrics::Metrics;
use crate::store::{Batch, Store, StoreError};

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
    // A block's bytes are read straight into their own buffer (no copy out of `buf`).
    let mut head = [0u8; wire::BLOCK_HEADER_MAX];
    let head_len = len.min(head.len());
    r.read_exact(&mut head[..head_len]).await?;
    if let Some((req, cid, at, n)) = Frame::parse_block_header(&head[..head_len], len) {
        let mut bytes = Vec::with_capacity(n);
        bytes.extend_from_slice(&head[at..head_len]);
        let have = bytes.len();
        bytes.resize(n, 0);
        r.read_exact(&mut bytes[have..]).await?;
        return Ok(Some(Frame::Block { req, cid, bytes }));
    }
    // The length was checked against FRAME_BYTES_MAX before anything was allocated.
    if buf.len() < len {
        buf.resize(len, 0);
    }
    buf[..head_len].copy_from_slice(&head[..head_len]);
    r.read_exact(&mut buf[head_len..len]).await?;
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

/// Want lists whose blocks are read from the store while earlier answers are written.
const READ_AHEAD: usize = 1;

/// What the writing half of a serving stream sends next, in request order.
enum Reply {
    /// A frame as it is.
    Frame(Frame),
    /// The blocks of a want list, being read from the store.
    Want(PreparedWant),
}

/// A want list cleared to be answered, its first blocks being read.
struct PreparedWant {
    req: u64,
    root: Cid,
    /// The namespace the root was added under here.
    local: Option<String>,
    /// The CIDs asked for, in order (`None`: malformed, answered `DontHave`).
    cids: Vec<(wire::CidBytes, Option<Cid>)>,
    /// The well-formed CIDs, in order: what the reads cover.
    valid: Arc<Vec<Cid>>,
    /// The read of the first batch.
    first: Option<Read>,
}

/// A batch read on a blocking thread: the blocks of `valid[from..]` it covers.
type Read = tokio::task::JoinHandle<Result<Batch, StoreError>>;

fn start_read(store: &Arc<Store>, valid: &Arc<Vec<Cid>>, from: usize) -> Option<Read> {
    (from < valid.len()).then(|| {
        let (store, valid) = (store.clone(), valid.clone());
        tokio::task::spawn_blocking(move || store.read_batch(&valid[from..]))
    })
}

/// Serves one inbound stream until it ends or misbehaves. Requests are read as they come;
/// the blocks of the next want list are read from the store (on a blocking thread) while the
/// answer to the one before is written, so the disk and the network work at once.
pub async fn serve(stream: Stream, peer: PeerId, ctx: ServeCtx) {
    let (mut rd, mut wr) = stream.split();
    let (tx, mut rx) = mpsc::channel::<Reply>(READ_AHEAD);
    let reading = async {
        let mut buf = Vec::new();
        loop {
            let frame = match read_frame_into(&mut rd, &mut buf).await {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%peer, "closing exchange stream: {e}");
                    ctx.metrics.bad_frames.inc();
                    return;
                }
            };
            let Some(reply) = prepare(frame, peer, &ctx) else { return };
            for r in reply {
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        }
    };
    let writing = async {
        while let Some(reply) = rx.recv().await {
            let result = match reply {
                Reply::Frame(f) => write_frame(&mut wr, &f).await,
                Reply::Want(w) => serve_want(&mut wr, peer, w, &ctx).await,
            };
            // Flush once nothing more is ready: a burst of answers leaves together.
            let result = match result {
                Ok(()) if rx.is_empty() => wr.flush().await,
                r => r,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, "exchange stream write failed: {e}");
                return;
            }
        }
    };
    tokio::pin!(reading, writing);
    tokio::select! {
        () = &mut writing => {}
        // No more requests: answer those already read, then stop.
        () = &mut reading => writing.await,
    }
}

/// The answers to one request, in order; `None` ends the stream (a frame no client sends).
fn prepare(frame: Frame, peer: PeerId, ctx: &ServeCtx) -> Option<Vec<Reply>> {
    let member = ctx.members.read().expect("members lock").contains(&peer);
    let refuse = |req, reason: String| Some(vec![Reply::Frame(Frame::Refused { req, reason })]);
    match frame {
        Frame::Want { req, .. } | Frame::WhoHas { req, .. } if !member => {
            refuse(req, "not a member".into())
        }
        _ if !member => refuse(0, "not a member".into()),
        Frame::Want { req, root, cids } => {
            let Ok(root) = wire::cid(&root) else { return refuse(req, "malformed root".into()) };
            // The namespace the root was added under here, which governs it until a pin
            // commits. Unreadable, the answer is no rather than the default namespace.
            let local = match ctx.store.local_namespace(&root) {
                Ok(ns) => ns,
                Err(e) => {
                    return refuse(req, format!("this node cannot tell who may read {root}: {e}"));
                }
            };
            let mut replies = Vec::new();
            // Not `default`: the fetcher learns it, so its copy is served under it too.
            let ns = ctx
                .access
                .read()
                .expect("access lock")
                .namespace(&root, local.as_deref())
                .to_owned();
            if ns != mycel_policy::access::DEFAULT_NAMESPACE {
                let frame = Frame::Namespace { req, root: root.to_bytes(), namespace: ns };
                replies.push(Reply::Frame(frame));
            }
            let cids: Vec<_> = cids.into_iter().map(|c| (c, wire::cid(&c).ok())).collect();
            let valid = Arc::new(cids.iter().filter_map(|(_, c)| *c).collect::<Vec<_>>());
            let first = start_read(&ctx.store, &valid, 0);
            replies.push(Reply::Want(PreparedWant { req, root, local, cids, valid, first }));
            Some(replies)
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
            Some(vec![Reply::Frame(answer)])
        }
        other => {
            tracing::debug!(%peer, "unexpected frame {other:?} on a serving stream");
            ctx.metrics.bad_frames.inc();
            None
        }
    }
}

/// Writes the answers to one want list: each block from the batch read for it (the next
/// batch read meanwhile), `DontHave` for what is not served, and a refusal that ends the
/// list when access is revoked on the way.
async fn serve_want<W: futures::AsyncWrite + Unpin>(
    w: &mut W,
    peer: PeerId,
    want: PreparedWant,
    ctx: &ServeCtx,
) -> io::Result<()> {
    let PreparedWant { req, root, local, cids, valid, first } = want;
    let mut next = first;
    let mut batch: Option<Batch> = None;
    // Blocks of `valid` read so far, and the index into `batch` of the next one.
    let (mut covered, mut at) = (0usize, 0usize);
    for (c, cid) in cids {
        // Checked per block: a revocation committed while this want is served stops it.
        let access = ctx.access.read().expect("access lock").clone();
        if let Err(refusal) = access.may_read(&core_peer(&peer), &root, local.as_deref()) {
            ctx.metrics.refused_requests.inc();
            return write_frame(w, &Frame::Refused { req, reason: refusal.to_string() }).await;
        }
        let Some(cid) = cid else {
            write_frame(w, &Frame::DontHave { req, cid: c }).await?;
            continue;
        };
        if let Err(refusal) = access.check_in_tree(ctx.store.as_ref(), &root, &cid) {
            ctx.metrics.refused_requests.inc();
            return write_frame(w, &Frame::Refused { req, reason: refusal.to_string() }).await;
        }
        if batch.as_ref().is_none_or(|b| at == b.len()) {
            batch = None;
            let read = match next.take() {
                Some(r) => r.await.map_err(io::Error::other)?,
                None => Err(StoreError::Index("nothing left to read".into())),
            };
            match read {
                Ok(b) => {
                    covered += b.len();
                    next = start_read(&ctx.store, &valid, covered);
                    batch = Some(b);
                    at = 0;
                }
                // The index failed: say we lack this block (and the next one tries again).
                Err(e) => {
                    tracing::warn!("not serving {cid}: {e}");
                    covered += 1;
                    next = start_read(&ctx.store, &valid, covered);
                    write_frame(w, &Frame::DontHave { req, cid: c }).await?;
                    continue;
                }
            }
        }
        let b = batch.as_mut().expect("read above");
        if ctx.corrupt
            && cid.codec() == Codec::Raw
            && let Some(bytes) = b.block_mut(at)
            && !bytes.is_empty()
        {
            bytes[0] ^= 1;
        }
        let (read_cid, bytes) = b.block(at);
        at += 1;
        debug_assert_eq!(read_cid, cid);
        match bytes {
            Ok(bytes) => {
                ctx.upload.take(bytes.len()).await;
                ctx.metrics.bytes_sent.inc_by(bytes.len() as u64);
                w.write_all(&Frame::block_header(req, &c, bytes.len())).await?;
                w.write_all(bytes).await?;
            }
            Err(why) => {
                // A corrupt stored block is never served: say we lack it.
                if let Some(why) = why {
                    tracing::warn!("not serving {cid}: {why}");
                }
                write_frame(w, &Frame::DontHave { req, cid: c }).await?;
            }
        }
    }
    Ok(())
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
