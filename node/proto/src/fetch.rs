//! One object fetched from every peer that holds it at once.
//!
//! A [`Fetch`] walks the object's manifest as blocks arrive: the root block names the
//! tree, index nodes name chunks and child nodes, directory entries name child trees. Each
//! block it learns of is first looked up locally ([`Action::Lookup`]); only blocks the store
//! lacks are requested, so a fetch resumes from whatever is stored, after a restart too,
//! and a stored chunk is never requested again.
//!
//! Missing blocks are spread over the peers in want lists. Each peer has a window of
//! blocks in flight that grows while it delivers and halves when it stalls, so work flows
//! to peers in proportion to the rate they deliver; same-zone peers get work first. A
//! block that fails verification is dropped, its sender penalised (and past a threshold
//! disconnected) and the block asked of another peer; work at a peer that times out or
//! leaves moves to the others. Memory stays bounded: manifest nodes are expanded only while
//! the queue of chunks to request is short.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use mycel_chunker::manifest::{EntryType, Kind, Node, NodeEntry, Root};
use mycel_chunker::{Cid, Codec};

use crate::wire::WANT_CIDS_MAX;

/// Manifest blocks held unexpanded at most before more are requested.
const DEFERRED_MAX: usize = 64;
use crate::{PeerId, Timestamp};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tuning of a fetch.
#[derive(Clone, Debug)]
pub struct Config {
    /// Blocks in flight per peer at first.
    pub window_initial: u32,
    /// Most blocks in flight per peer.
    pub window_max: u32,
    /// Blocks per want list.
    pub want_batch: usize,
    /// A request unanswered this long moves to other peers.
    pub timeout_ms: u64,
    /// Corrupt blocks from one peer before it is disconnected.
    pub corrupt_max: u32,
    /// Consecutive timeouts before a peer is dropped from this fetch.
    pub stalls_max: u32,
    /// Chunks discovered but not yet requested, at most (bounds memory).
    pub queue_max: usize,
    /// How often to ask who holds the root while no peer can serve what is missing.
    pub who_has_ms: u64,
    /// `DontHave` answers remembered per peer, at most.
    pub lacks_max: usize,
    /// How long a peer's `DontHave` answers are believed: a partial holder is still
    /// fetching, so what it lacked may be there a moment later (a swarm relays that way).
    pub lacks_ttl_ms: u64,
    /// Queueing delay a peer may build up: a block that took longer than this from request
    /// to arrival shrinks the peer's window (at most once per this interval). Without it a
    /// holder shared by many fetchers queues far more than it can send, requests time out
    /// there, and it sends blocks nobody waits for any more.
    pub queue_target_ms: u64,
    /// Seeds the choice of which pending chunks to ask for first when several peers serve
    /// the fetch (distinct per node, so fetchers of one object ask a shared holder for
    /// different chunks and can then serve each other).
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            window_initial: 8,
            window_max: 64,
            want_batch: 16,
            timeout_ms: 10_000,
            corrupt_max: 3,
            stalls_max: 3,
            queue_max: 65_536,
            who_has_ms: 2_000,
            lacks_max: 100_000,
            lacks_ttl_ms: 2_000,
            queue_target_ms: 1_500,
            seed: 0,
        }
    }
}

/// What the store answered to [`Action::Lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    /// Not stored.
    Absent,
    /// Stored (a chunk: the bytes are not needed).
    Present,
    /// Stored, with its bytes (a manifest block the walk must read).
    Bytes(Vec<u8>),
}

/// Why a peer was penalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Penalty {
    /// Sent bytes that do not match the CID.
    Corrupt,
    /// Let requests time out.
    Stalled,
    /// Sent a block nobody asked it for.
    Unsolicited,
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Look the block up in the store and answer with [`Fetch::handle_local`].
    Lookup {
        /// The block.
        cid: Cid,
        /// Whether the bytes are needed (manifest blocks).
        need_bytes: bool,
    },
    /// Send a want list to a peer.
    Request {
        /// The peer.
        peer: PeerId,
        /// Request id (answers echo it).
        req: u64,
        /// The object served.
        root: Cid,
        /// The blocks.
        cids: Vec<Cid>,
    },
    /// Store a verified block.
    Store {
        /// The block.
        cid: Cid,
        /// Its bytes (checked against the CID).
        bytes: Vec<u8>,
        /// Who sent it.
        from: PeerId,
    },
    /// Penalise a peer; disconnect it if `disconnect`.
    Penalize {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: Penalty,
        /// Past the threshold: close the connection.
        disconnect: bool,
    },
    /// No known peer can serve what is missing: ask connected peers who holds the root.
    WhoHas {
        /// The object.
        root: Cid,
    },
    /// Every block is stored.
    Complete {
        /// The object.
        root: Cid,
        /// Its kind.
        kind: Kind,
        /// Its content length.
        len: u64,
    },
    /// The object cannot be fetched (its manifest is invalid).
    Failed {
        /// The object.
        root: Cid,
        /// Why.
        reason: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// The root block.
    Root,
    /// An index node of an object of this kind.
    Node(Kind),
    /// A chunk of this length.
    Chunk(u64),
}

impl Want {
    fn is_manifest(self) -> bool {
        !matches!(self, Want::Chunk(_))
    }
}

#[derive(Clone, Debug)]
struct PeerState {
    same_zone: bool,
    window: u32,
    /// Fractional window growth, in 1/window steps.
    credit: u32,
    /// Doubling the window every round trip until the first stall (as TCP's slow start).
    slow_start: bool,
    inflight: u32,
    corrupt: u32,
    stalls: u32,
    lacks: BTreeSet<Cid>,
    /// When `lacks` is forgotten (set by its first entry).
    lacks_until: Option<Timestamp>,
    /// The window shrinks at most once per queue target interval.
    next_decrease: Timestamp,
    /// How many pending blocks are in `lacks`: when it equals the pending count, the peer has
    /// nothing to offer and is not scanned (a swarm's partial holders lack most of the queue,
    /// and scanning it per peer per event was most of a fetching node's CPU).
    lacked_pending: usize,
}

impl PeerState {
    /// Forgets what the peer said it lacks (the caller keeps `lacking` and `next_forget`).
    fn forget_lacks(&mut self) {
        self.lacks.clear();
        self.lacked_pending = 0;
        self.lacks_until = None;
    }
}

#[derive(Clone, Debug)]
struct InFlight {
    peer: PeerId,
    want: Want,
    deadline: Timestamp,
}

/// Progress for people and for announcements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Content bytes in the object (0 until the root block is read).
    pub total_bytes: u64,
    /// Content bytes stored (chunks and holes).
    pub done_bytes: u64,
    /// Bytes received from each peer.
    pub by_peer: Vec<(PeerId, u64)>,
    /// Blocks requested more than once (timeouts, corruption, departures).
    pub rerequested: u64,
}

/// The fetch of one object.
#[derive(Debug)]
pub struct Fetch {
    root: Cid,
    config: Config,
    kind: Option<Kind>,
    total_bytes: u64,
    done_bytes: u64,
    peers: BTreeMap<PeerId, PeerState>,
    /// The peers whose `lacks` is not empty (a fleet's fetch can have a thousand peers, and
    /// most lack nothing).
    lacking: BTreeSet<PeerId>,
    /// The earliest `lacks_until` of any peer.
    next_forget: Option<Timestamp>,
    /// Lookups sent, awaiting `handle_local`.
    looking: BTreeMap<Cid, Want>,
    /// Missing manifest blocks, then missing chunks, in walk order.
    pending_nodes: VecDeque<(Cid, Want)>,
    pending_chunks: VecDeque<(Cid, Want)>,
    /// What is pending, authoritatively: the queues keep the order and may hold stale
    /// entries (blocks that arrived meanwhile), skipped when met.
    pending: BTreeMap<Cid, Want>,
    inflight: BTreeMap<Cid, InFlight>,
    /// The requests' deadlines in the order they were set (so ascending): the earliest
    /// deadline in flight is the first entry still in `inflight`, found without a scan of
    /// every flight (the driver asks after every event). Entries of blocks that arrived are
    /// dropped from the front as it is reached.
    deadlines: VecDeque<(Timestamp, Cid)>,
    /// Manifest blocks stored but not yet expanded (expansion waits while the queue is full).
    deferred: VecDeque<(Cid, Want, Vec<u8>)>,
    /// Blocks known stored or received (so duplicates and repeats are recognised).
    done: BTreeSet<Cid>,
    requested_once: BTreeSet<Cid>,
    rerequested: u64,
    /// Bytes received per peer, kept after a peer leaves.
    received: BTreeMap<PeerId, u64>,
    actions: VecDeque<Action>,
    next_req: u64,
    next_who_has: Timestamp,
    finished: bool,
    /// The latest time an input gave.
    clock: Timestamp,
    /// Picks where in the chunk queue a request starts (see [`Config::seed`]).
    rng: ChaCha8Rng,
}

impl Fetch {
    /// Starts fetching `root`; the first action looks the root block up locally.
    pub fn new(root: Cid, config: Config, now: Timestamp) -> Fetch {
        let rng = ChaCha8Rng::seed_from_u64(config_seed(&root, config.seed));
        assert!(config.want_batch >= 1 && config.want_batch <= WANT_CIDS_MAX);
        assert!(config.window_initial >= 1 && config.window_initial <= config.window_max);
        let mut f = Fetch {
            root,
            config,
            kind: None,
            total_bytes: 0,
            done_bytes: 0,
            peers: BTreeMap::new(),
            lacking: BTreeSet::new(),
            next_forget: None,
            looking: BTreeMap::new(),
            pending_nodes: VecDeque::new(),
            pending_chunks: VecDeque::new(),
            pending: BTreeMap::new(),
            inflight: BTreeMap::new(),
            deadlines: VecDeque::new(),
            deferred: VecDeque::new(),
            done: BTreeSet::new(),
            requested_once: BTreeSet::new(),
            rerequested: 0,
            received: BTreeMap::new(),
            actions: VecDeque::new(),
            next_req: 1,
            next_who_has: now,
            finished: false,
            clock: now,
            rng,
        };
        f.lookup(root, Want::Root);
        f
    }

    /// The object.
    pub fn root(&self) -> Cid {
        self.root
    }

    /// Whether it completed or failed.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// A peer that may hold the object (`same_zone` peers are preferred).
    pub fn add_peer(&mut self, peer: PeerId, same_zone: bool) {
        // A peer heard from again while nothing else can be asked (it answered who-has, or
        // announced the root): what it lacked may have been transient (a read error, a copy
        // since completed), so it may be asked again.
        if self.starved()
            && let Some(p) = self.peers.get_mut(&peer)
        {
            p.forget_lacks();
            self.lacking.remove(&peer);
            self.refresh_forget();
        }
        self.peers.entry(peer).or_insert(PeerState {
            same_zone,
            window: self.config.window_initial,
            credit: 0,
            slow_start: true,
            inflight: 0,
            corrupt: 0,
            stalls: 0,
            lacks: BTreeSet::new(),
            lacks_until: None,
            next_decrease: Timestamp(0),
            lacked_pending: 0,
        });
    }

    /// The peers currently used.
    pub fn peers(&self) -> impl Iterator<Item = &PeerId> {
        self.peers.keys()
    }

    /// A peer left or was dropped: its outstanding work goes back to the queue. The bytes
    /// it delivered stay counted.
    pub fn peer_gone(&mut self, peer: &PeerId) {
        let Some(gone) = self.peers.remove(peer) else { return };
        self.lacking.remove(peer);
        if gone.lacks_until.is_some() {
            self.refresh_forget();
        }
        let lost: Vec<Cid> =
            self.inflight.iter().filter(|(_, f)| &f.peer == peer).map(|(c, _)| *c).collect();
        for cid in lost {
            let f = self.inflight.remove(&cid).expect("listed above");
            self.requeue(cid, f.want);
        }
    }

    fn lookup(&mut self, cid: Cid, want: Want) {
        if self.done.contains(&cid)
            || self.looking.contains_key(&cid)
            || self.inflight.contains_key(&cid)
        {
            return;
        }
        self.looking.insert(cid, want);
        self.actions.push_back(Action::Lookup { cid, need_bytes: want.is_manifest() });
    }

    fn requeue(&mut self, cid: Cid, want: Want) {
        if self.pending.insert(cid, want).is_some() {
            return;
        }
        self.count_lacked(&cid, true);
        if want.is_manifest() {
            self.pending_nodes.push_front((cid, want));
        } else {
            self.pending_chunks.push_front((cid, want));
        }
    }

    fn enqueue(&mut self, cid: Cid, want: Want) {
        if self.pending.insert(cid, want).is_some() {
            return;
        }
        self.count_lacked(&cid, true);
        if want.is_manifest() {
            self.pending_nodes.push_back((cid, want));
        } else {
            self.pending_chunks.push_back((cid, want));
        }
    }

    /// `cid` entered (`true`) or left `pending`: the peers that lack it lack one more (or one
    /// fewer) pending block.
    fn count_lacked(&mut self, cid: &Cid, entered: bool) {
        for id in &self.lacking {
            let Some(p) = self.peers.get_mut(id) else { continue };
            if p.lacks.contains(cid) {
                if entered {
                    p.lacked_pending += 1;
                } else {
                    p.lacked_pending -= 1;
                }
            }
        }
    }

    /// `peer` lacks `cid` (remembered up to `lacks_max` blocks), counted if it is pending.
    fn note_lacks(&mut self, peer: PeerId, cid: Cid) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        if p.lacks.len() < self.config.lacks_max && p.lacks.insert(cid) {
            self.lacking.insert(peer);
            if self.pending.contains_key(&cid) {
                p.lacked_pending += 1;
            }
        }
    }

    /// Recomputes the earliest time a peer's `lacks` is forgotten.
    fn refresh_forget(&mut self) {
        self.next_forget = self.peers.values().filter_map(|p| p.lacks_until).min();
    }

    /// Whether `p` takes a request now: it has room for a whole want list (or half its
    /// window, if that is less), or nothing in flight, or room for all that is pending.
    /// Requests then carry many blocks: a slot freed by each arriving block would otherwise
    /// be refilled by a want list of one, and the serving side would read, and both sides
    /// frame and track, every block alone.
    fn has_room(&self, p: &PeerState) -> bool {
        let free = p.window.saturating_sub(p.inflight) as usize;
        let batch = self.config.want_batch.min((p.window as usize / 2).max(1));
        free > 0 && (free >= batch || p.inflight == 0 || self.pending.len() <= free)
    }

    /// Whether `p` may hold something pending (it does not lack every pending block).
    fn may_offer(&self, p: &PeerState) -> bool {
        p.lacked_pending < self.pending.len()
    }

    /// Pending chunks (not counting stale queue entries).
    fn pending_chunk_count(&self) -> usize {
        self.pending.len().saturating_sub(self.pending_nodes.len().min(self.pending.len()))
    }

    /// The store's answer to [`Action::Lookup`].
    pub fn handle_local(&mut self, cid: Cid, local: Local) {
        let Some(want) = self.looking.remove(&cid) else {
            return;
        };
        match local {
            Local::Absent => self.enqueue(cid, want),
            Local::Present if !want.is_manifest() => self.mark_done(cid, want),
            // A manifest block must be read to continue the walk.
            Local::Present => self.enqueue(cid, want),
            Local::Bytes(bytes) => {
                if !cid.matches(&bytes) {
                    // The store returns verified blocks; treat a mismatch as absent.
                    self.enqueue(cid, want);
                    return;
                }
                self.mark_done(cid, want);
                if want.is_manifest() {
                    self.deferred.push_back((cid, want, bytes));
                }
            }
        }
        self.expand();
        self.check_complete();
    }

    fn mark_done(&mut self, cid: Cid, want: Want) {
        if self.done.insert(cid)
            && let Want::Chunk(len) = want
        {
            self.done_bytes += len;
        }
    }

    /// Expands stored manifest blocks while the chunk queue has room.
    fn expand(&mut self) {
        while self.pending_chunk_count() < self.config.queue_max {
            let Some((cid, want, bytes)) = self.deferred.pop_front() else { return };
            if let Err(reason) = self.read_manifest(cid, want, &bytes) {
                self.fail(reason);
                return;
            }
        }
    }

    fn read_manifest(&mut self, cid: Cid, want: Want, bytes: &[u8]) -> Result<(), String> {
        let children = match want {
            Want::Root => {
                let root = Root::decode(cid, bytes).map_err(|e| e.to_string())?;
                self.kind = Some(root.kind);
                self.total_bytes = root.len;
                match root.tree {
                    None => Vec::new(),
                    Some(t) if t.codec() == Codec::Raw => vec![(t, Want::Chunk(root.len))],
                    Some(t) => vec![(t, Want::Node(root.kind))],
                }
            }
            Want::Node(kind) => {
                let node = Node::decode(cid, bytes, kind).map_err(|e| e.to_string())?;
                let mut out = Vec::with_capacity(node.entries.len());
                for entry in node.entries {
                    match entry {
                        NodeEntry::Chunk { len, cid } => out.push((cid, Want::Chunk(len))),
                        NodeEntry::Hole { len } => self.done_bytes += len,
                        NodeEntry::Child { cid, .. } => out.push((cid, Want::Node(kind))),
                        NodeEntry::Dir(d) => match (d.entry_type, d.cid) {
                            (EntryType::File, Some(c)) if c.codec() == Codec::Raw => {
                                out.push((c, Want::Chunk(d.len)));
                            }
                            (EntryType::File, Some(c)) => out.push((c, Want::Node(Kind::File))),
                            (EntryType::Dir, Some(c)) => out.push((c, Want::Node(Kind::Dir))),
                            _ => {}
                        },
                    }
                }
                out
            }
            Want::Chunk(_) => unreachable!("chunks are not manifests"),
        };
        for (child, w) in children {
            self.lookup(child, w);
        }
        Ok(())
    }

    fn fail(&mut self, reason: String) {
        if !self.finished {
            self.finished = true;
            self.actions.push_back(Action::Failed { root: self.root, reason });
        }
    }

    fn check_complete(&mut self) {
        if self.finished || self.kind.is_none() {
            return;
        }
        if self.looking.is_empty()
            && self.pending.is_empty()
            && self.inflight.is_empty()
            && self.deferred.is_empty()
        {
            self.finished = true;
            let kind = self.kind.expect("checked above");
            self.actions.push_back(Action::Complete {
                root: self.root,
                kind,
                len: self.total_bytes,
            });
        }
    }

    /// A block from `peer`.
    pub fn handle_block(&mut self, peer: PeerId, cid: Cid, bytes: Vec<u8>, now: Timestamp) {
        self.clock = self.clock.max(now);
        let flight = self.inflight.get(&cid).filter(|f| f.peer == peer).cloned();
        let want = match (&flight, self.wanted(&cid)) {
            (Some(f), _) => f.want,
            // A late answer after a timeout moved the block elsewhere: still useful.
            (None, Some(w)) => w,
            (None, None) => {
                if !self.done.contains(&cid) {
                    self.penalize(peer, Penalty::Unsolicited);
                }
                return;
            }
        };
        let cid_ok = cid.matches(&bytes);
        #[cfg(feature = "sim-bugs")]
        let cid_ok = cid_ok || crate::bugs::on(crate::bugs::SKIP_CID_CHECK);
        let valid = cid_ok
            && match want {
                Want::Chunk(len) => bytes.len() as u64 == len && cid.codec() == Codec::Raw,
                _ => cid.codec() == Codec::DagCbor,
            };
        if flight.is_some() {
            self.inflight.remove(&cid);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.inflight -= 1;
            }
        }
        if !valid {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.corrupt += 1;
            }
            self.note_lacks(peer, cid);
            self.penalize(peer, Penalty::Corrupt);
            if flight.is_some() {
                self.requeue(cid, want);
            }
            return;
        }
        // Drop other copies of this block from the queues and from other peers' flights.
        if let Some(other) = self.inflight.remove(&cid)
            && let Some(p) = self.peers.get_mut(&other.peer)
        {
            p.inflight -= 1;
        }
        if self.pending.remove(&cid).is_some() {
            self.count_lacked(&cid, false);
        }
        *self.received.entry(peer).or_default() += bytes.len() as u64;
        // Time from request to arrival: mostly the queue at the peer.
        let queued_ms = flight.as_ref().map_or(0, |f| {
            now.0.saturating_sub(f.deadline.0.saturating_sub(self.config.timeout_ms))
        });
        let target = self.config.queue_target_ms;
        if let Some(p) = self.peers.get_mut(&peer) {
            p.stalls = 0;
            if queued_ms > target {
                // Too much queued there: back off (multiplicatively, once per interval).
                p.slow_start = false;
                p.credit = 0;
                if now >= p.next_decrease {
                    p.window = (p.window * 3 / 4).max(1);
                    p.next_decrease = now.plus_ms(target);
                }
            } else if p.slow_start {
                p.window = (p.window + 1).min(self.config.window_max);
            } else {
                // Additive increase: one more slot per window's worth of deliveries.
                p.credit += 1;
                if p.credit >= p.window {
                    p.credit = 0;
                    p.window = (p.window + 1).min(self.config.window_max);
                }
            }
        }
        self.mark_done(cid, want);
        if want.is_manifest() {
            self.deferred.push_back((cid, want, bytes.clone()));
        }
        self.actions.push_back(Action::Store { cid, bytes, from: peer });
        let _ = now;
        self.expand();
        self.check_complete();
    }

    fn wanted(&self, cid: &Cid) -> Option<Want> {
        if let Some(f) = self.inflight.get(cid) {
            return Some(f.want);
        }
        self.pending.get(cid).copied()
    }

    /// `peer` does not hold `cid` (a partial holder): ask someone else.
    pub fn handle_dont_have(&mut self, peer: PeerId, cid: Cid) {
        let Some(f) = self.inflight.get(&cid).filter(|f| f.peer == peer).cloned() else {
            return;
        };
        self.inflight.remove(&cid);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.inflight -= 1;
            let until = *p.lacks_until.get_or_insert(self.clock.plus_ms(self.config.lacks_ttl_ms));
            self.next_forget = Some(self.next_forget.map_or(until, |t| t.min(until)));
        }
        self.note_lacks(peer, cid);
        self.requeue(cid, f.want);
    }

    /// `peer` refused the request (not allowed, over a limit): stop using it.
    pub fn handle_refused(&mut self, peer: PeerId) {
        self.peer_gone(&peer);
    }

    fn penalize(&mut self, peer: PeerId, reason: Penalty) {
        let disconnect = match reason {
            Penalty::Corrupt => {
                self.peers.get(&peer).is_some_and(|p| p.corrupt >= self.config.corrupt_max)
            }
            Penalty::Stalled => {
                self.peers.get(&peer).is_some_and(|p| p.stalls >= self.config.stalls_max)
            }
            Penalty::Unsolicited => false,
        };
        self.actions.push_back(Action::Penalize { peer, reason, disconnect });
        if disconnect {
            self.peer_gone(&peer);
        }
    }

    /// The earliest time [`Fetch::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if self.finished {
            return None;
        }
        let deadline =
            self.deadlines.iter().find(|(t, c)| self.in_flight_until(c, *t)).map(|d| d.0);
        let who_has = self.starved().then_some(self.next_who_has);
        [deadline, who_has, self.next_forget].into_iter().flatten().min()
    }

    /// Whether `cid` is in flight with deadline `t` (an entry of `deadlines` is live).
    fn in_flight_until(&self, cid: &Cid, t: Timestamp) -> bool {
        self.inflight.get(cid).is_some_and(|f| f.deadline == t)
    }

    /// Drops the entries of `deadlines` at its front that are no longer live.
    fn prune_deadlines(&mut self) {
        while let Some((t, c)) = self.deadlines.front() {
            if self.in_flight_until(c, *t) {
                return;
            }
            self.deadlines.pop_front();
        }
    }

    /// Whether something is missing that no current peer can be asked for.
    fn starved(&self) -> bool {
        self.inflight.is_empty()
            && !self.pending.is_empty()
            && !self
                .pending
                .keys()
                .take(64)
                .any(|c| self.peers.values().any(|p| !p.lacks.contains(c)))
    }

    /// Moves timed-out work to other peers, and asks who-has when starved.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.clock = self.clock.max(now);
        if self.next_forget.is_some_and(|t| t <= now) {
            for (id, p) in &mut self.peers {
                if p.lacks_until.is_some_and(|t| t <= now) {
                    p.forget_lacks();
                    self.lacking.remove(id);
                }
            }
            self.refresh_forget();
        }
        let expired: Vec<Cid> =
            self.inflight.iter().filter(|(_, f)| f.deadline <= now).map(|(c, _)| *c).collect();
        let mut stalled: BTreeSet<PeerId> = BTreeSet::new();
        for cid in expired {
            let f = self.inflight.remove(&cid).expect("listed above");
            if let Some(p) = self.peers.get_mut(&f.peer) {
                p.inflight -= 1;
            }
            stalled.insert(f.peer);
            self.requeue(cid, f.want);
        }
        for peer in stalled {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.stalls += 1;
                p.slow_start = false;
                p.window = (p.window / 2).max(1);
                p.credit = 0;
            }
            self.penalize(peer, Penalty::Stalled);
        }
        if self.starved() && now >= self.next_who_has {
            self.next_who_has = now.plus_ms(self.config.who_has_ms);
            self.actions.push_back(Action::WhoHas { root: self.root });
        }
    }

    /// The next action for the driver, assigning requested work to peers as windows allow.
    pub fn poll_action(&mut self, now: Timestamp) -> Option<Action> {
        self.clock = self.clock.max(now);
        self.prune_deadlines();
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self.finished {
            return None;
        }
        self.assign(now)
    }

    fn assign(&mut self, now: Timestamp) -> Option<Action> {
        if self.pending.is_empty() {
            return None;
        }
        // Same-zone peers first, then the least filled window; ties by PeerId. The best peer
        // nearly always takes work, so it is found in one pass; the rest are sorted only when
        // it lacks everything pending (a fleet's fetch can have a thousand peers).
        // A peer that lacks every pending block is skipped: asking it would find nothing.
        let mut open =
            self.peers.iter().filter(|(_, p)| self.has_room(p) && self.may_offer(p)).map(
                |(id, p)| (!p.same_zone, u64::from(p.inflight) * 1000 / u64::from(p.window), *id),
            );
        let best = open.next()?;
        let best = open.fold(best, std::cmp::min);
        if let Some(a) = self.assign_to(best.2, now) {
            return Some(a);
        }
        let mut order: Vec<(bool, u64, PeerId)> = self
            .peers
            .iter()
            .filter(|(id, p)| self.has_room(p) && self.may_offer(p) && **id != best.2)
            .map(|(id, p)| (!p.same_zone, u64::from(p.inflight) * 1000 / u64::from(p.window), *id))
            .collect();
        order.sort();
        order.into_iter().find_map(|(_, _, peer)| self.assign_to(peer, now))
    }

    /// Up to one batch of pending work for `peer` (which has room in its window), as a
    /// request; `None` if it lacks everything pending.
    fn assign_to(&mut self, peer: PeerId, now: Timestamp) -> Option<Action> {
        let take = {
            let p = &self.peers[&peer];
            ((p.window - p.inflight) as usize).min(self.config.want_batch)
        };
        let mut cids = Vec::new();
        let mut wants = Vec::new();
        // Manifest nodes wait while enough are already read but unexpanded (bounds memory).
        let nodes_ok = self.deferred.len() < DEFERRED_MAX;
        // With several peers, chunks are taken from a random place in the queue: fetchers of
        // one object then ask a shared holder for different chunks, and serve each other.
        if self.peers.len() > 1 && self.pending_chunks.len() > take {
            let start = self.rng.gen_range(0..self.pending_chunks.len());
            self.pending_chunks.rotate_left(start);
        }
        for (qi, queue) in
            [&mut self.pending_nodes, &mut self.pending_chunks].into_iter().enumerate()
        {
            if qi == 0 && !nodes_ok {
                continue;
            }
            let lacks = &self.peers[&peer].lacks;
            let pending = &mut self.pending;
            let mut i = 0;
            while i < queue.len() && cids.len() < take {
                let c = queue[i].0;
                if !pending.contains_key(&c) {
                    queue.remove(i); // stale: it arrived or moved meanwhile
                    continue;
                }
                if lacks.contains(&c) {
                    i += 1;
                    continue;
                }
                let (c, w) = queue.remove(i).expect("index in range");
                pending.remove(&c);
                cids.push(c);
                wants.push(w);
            }
            // Manifest nodes are requested alone first: they unlock the most work.
            if !cids.is_empty() {
                break;
            }
        }
        if cids.is_empty() {
            return None;
        }
        for c in &cids {
            self.count_lacked(c, false);
        }
        let req = self.next_req;
        self.next_req += 1;
        // From the latest time seen, so `deadlines` stays in ascending order.
        let deadline = now.max(self.clock).plus_ms(self.config.timeout_ms);
        for (c, w) in cids.iter().zip(wants) {
            self.deadlines.push_back((deadline, *c));
            if !self.requested_once.insert(*c) {
                self.rerequested += 1;
            }
            self.inflight.insert(*c, InFlight { peer, want: w, deadline });
        }
        self.peers.get_mut(&peer).expect("peer exists").inflight += cids.len() as u32;
        Some(Action::Request { peer, req, root: self.root, cids })
    }

    /// Progress so far.
    pub fn progress(&self) -> Progress {
        Progress {
            total_bytes: self.total_bytes,
            done_bytes: self.done_bytes,
            by_peer: self.received.iter().map(|(id, b)| (*id, *b)).collect(),
            rerequested: self.rerequested,
        }
    }

    /// Checks internal consistency.
    ///
    /// # Panics
    /// If the queues, flights and windows disagree: a bug.
    pub fn check_invariants(&self) {
        let earliest = self.inflight.values().map(|f| f.deadline).min();
        let queued = self.deadlines.iter().find(|(t, c)| self.in_flight_until(c, *t));
        assert_eq!(earliest, queued.map(|d| d.0), "the earliest deadline in flight");
        let lacking: BTreeSet<PeerId> =
            self.peers.iter().filter(|(_, p)| !p.lacks.is_empty()).map(|(id, _)| *id).collect();
        assert_eq!(lacking, self.lacking, "the peers that lack something");
        let forget = self.peers.values().filter_map(|p| p.lacks_until).min();
        assert_eq!(forget, self.next_forget, "the earliest expiry of lacks");
        for (id, p) in &self.peers {
            let n = self.inflight.values().filter(|f| &f.peer == id).count() as u32;
            assert_eq!(n, p.inflight, "{id:?} in-flight count");
            assert!(p.window >= 1 && p.window <= self.config.window_max, "{id:?} window");
            assert!(p.lacks.len() <= self.config.lacks_max);
            let lacked = if p.lacks.len() < self.pending.len() {
                p.lacks.iter().filter(|c| self.pending.contains_key(c)).count()
            } else {
                self.pending.keys().filter(|c| p.lacks.contains(c)).count()
            };
            assert_eq!(lacked, p.lacked_pending, "{id:?} lacked pending count");
        }
        for (cid, f) in &self.inflight {
            assert!(self.peers.contains_key(&f.peer), "{cid} in flight at a departed peer");
            assert!(!self.done.contains(cid), "{cid} in flight but done");
        }
        for cid in self.pending.keys() {
            assert!(!self.inflight.contains_key(cid), "{cid} both pending and in flight");
        }
        if self.kind.is_some() {
            assert!(
                self.done_bytes <= self.total_bytes,
                "done {} > total {}",
                self.done_bytes,
                self.total_bytes
            );
        }
        assert!(
            self.pending.len()
                <= self.config.queue_max
                    + crate::wire::FRAME_BYTES_MAX / 36
                    + DEFERRED_MAX * crate::wire::FRAME_BYTES_MAX / 36
        );
    }
}

/// A fetch's seed: the configured one mixed with the root, so one node's fetches of
/// different objects differ too.
fn config_seed(root: &Cid, seed: u64) -> u64 {
    let bytes = root.to_bytes();
    let tail: [u8; 8] = bytes[bytes.len() - 8..].try_into().expect("a CID ends in a digest");
    seed ^ u64::from_le_bytes(tail)
}

#[cfg(test)]
mod tests;
