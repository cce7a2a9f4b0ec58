//! `mycel run`: the daemon. One task owns the swarm, the store handle and the cores
//! (announcer, directory, fetches) and runs the event loop; stream tasks move frames; a
//! store thread commits fetched blocks in groups; the admin API talks to the loop through
//! [`Command`]s.
//!
//! The loop translates and never decides: what to request from whom, when to time out, whom
//! to penalise and when an object is complete are answers from `mycel_proto`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, ping};
use mycel_chunker::Cid;
use mycel_proto::Timestamp;
use mycel_proto::announce::{Announcer, Directory, Holdings};
use mycel_proto::fetch::{self, Action, Fetch, Local};
use mycel_proto::wire::{Announcement, Frame, Partial};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::raftlog::RedbLog;
use crate::cluster::{self, ClusterFrame, Proposals, TokenText};
use crate::datadir::{DataDir, NodeConfig};
use crate::live::{self, LiveOutput};
use crate::metrics::Metrics;
use crate::net::exchange::{self, NetEvent, PeerLink, ServeCtx};
use crate::net::limit::Limiter;
use crate::net::{self, Behaviour, BehaviourEvent};
use crate::restore::GetReport;
use crate::store::{RootRecord, Store};
use mycel_consensus::command::{Command as CCommand, Member, Role};
use mycel_consensus::state::{ClusterState, Outcome};
use mycel_consensus::{Core, Output as COutput};
use mycel_core::access::Access;

mod dial;
pub mod topology;

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Setup failed (network, socket, store).
    #[error("{0}")]
    Setup(String),
}

/// Identity and addresses.
#[derive(Clone, Debug, Serialize)]
pub struct IdInfo {
    /// This node's PeerId.
    pub peer_id: String,
    /// Bound addresses, each ending in `/p2p/PEER_ID`.
    pub listen_addrs: Vec<String>,
    /// Zone.
    pub zone: String,
}

/// One fetch's progress, streamed to `mycel get`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct FetchUpdate {
    /// Content bytes in the object (0 until known).
    pub total_bytes: u64,
    /// Content bytes stored.
    pub done_bytes: u64,
    /// Bytes received from each peer (PeerId text).
    pub by_peer: BTreeMap<String, u64>,
    /// Peers currently used.
    pub peers: usize,
    /// Blocks requested more than once.
    pub rerequested: u64,
    /// `fetching`, `complete` or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With `complete`: the output the daemon wrote while fetching (asked for with `out`;
    /// absent if it was not, and the requester restores the object itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<GetReport>,
}

/// Requests from the admin API to the loop.
#[derive(Debug)]
pub enum Command {
    /// Identity and addresses.
    Id(oneshot::Sender<IdInfo>),
    /// Status as JSON.
    Status(oneshot::Sender<serde_json::Value>),
    /// Peers as JSON.
    Peers(oneshot::Sender<serde_json::Value>),
    /// Something was added: announce soon.
    Announce,
    /// Fetch `root` from the mesh (joins a running fetch), streaming updates.
    Fetch {
        /// The object.
        root: Cid,
        /// Updates until `complete` or `failed`.
        updates: mpsc::Sender<FetchUpdate>,
        /// Write the object here while fetching it (an absolute path; files and disk images).
        out: Option<std::path::PathBuf>,
    },
    /// Re-read `[cluster] members` from the config.
    ReloadMembers(oneshot::Sender<Result<usize, String>>),
    /// Make this node the first manager of a new cluster.
    ClusterInit(oneshot::Sender<Result<String, String>>),
    /// Propose commands to the quorum; answered once applied.
    Propose(Vec<CCommand>, cluster::ProposeReply),
    /// The cluster view as JSON (members, raft roles, tokens).
    ClusterView(oneshot::Sender<serde_json::Value>),
    /// Make a join token; answered with its text once committed.
    TokenCreate {
        /// Role it admits.
        role: Role,
        /// Zone.
        zone: String,
        /// Seconds it stays valid.
        ttl_s: u64,
        /// Uses.
        uses: u32,
        /// The answer.
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Revoke the token whose hash starts with this hex prefix.
    TokenRevoke(String, cluster::ProposeReply),
    /// Hand leadership to a manager (0: the best other one).
    LeaderTransfer(u64, oneshot::Sender<Result<u64, String>>),
    /// Pins and grants with their standing, or one pin's status per node.
    Pins(Option<Cid>, oneshot::Sender<serde_json::Value>),
    /// Topology files: views, status, watches.
    Topology(topology::Request),
}

/// Options of `mycel run` beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Test only: serve corrupt chunks.
    pub test_corrupt_serve: bool,
}

enum StoreJob {
    Block {
        cid: Cid,
        bytes: Vec<u8>,
        /// Where a requester's output wants the chunk, written once it is stored.
        place: Option<live::Placement>,
    },
    Root {
        root: Cid,
        record: RootRecord,
    },
    /// The namespace a holder serves `root` under (recorded before its blocks).
    Namespace {
        root: Cid,
        namespace: String,
    },
}

enum StoreDone {
    Complete(Cid),
    Failed(Cid, String),
    Error(String),
}

struct Job {
    fetch: Fetch,
    waiters: Vec<mpsc::Sender<FetchUpdate>>,
    storing: bool,
    /// Replication work: runs without waiters until the plan cancels it.
    keep: bool,
    /// The namespace a holder said it serves the root under (recorded once).
    namespace: Option<String>,
    /// A requester's output, written while the object arrives.
    output: Option<LiveOutput>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct PeerInfo {
    addrs: Vec<String>,
    rtt_ms: Option<f64>,
    agent: Option<String>,
}

struct Daemon {
    me: PeerId,
    /// Placement draws kept between replication plans.
    placement_scores: mycel_policy::placement::ScoreCache,
    dir: DataDir,
    config: NodeConfig,
    store: Arc<Store>,
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    links: BTreeMap<PeerId, PeerLink>,
    connected: BTreeMap<PeerId, PeerInfo>,
    members: Arc<RwLock<BTreeSet<PeerId>>>,
    policy: Arc<RwLock<net::gate::Policy>>,
    bootstrap: Vec<(PeerId, Multiaddr)>,
    announcer: Announcer,
    directory: Directory,
    jobs: BTreeMap<Cid, Job>,
    /// Daemon-wide request ids: which fetch (and how many answers are still due).
    reqs: BTreeMap<u64, (Cid, usize)>,
    next_req: u64,
    who_has: BTreeMap<u64, Cid>,
    net_tx: mpsc::Sender<NetEvent>,
    store_tx: std_mpsc::SyncSender<StoreJob>,
    download: Limiter,
    metrics: Arc<Metrics>,
    p2p_metrics: libp2p::metrics::Metrics,
    started: Instant,
    listen_addrs: Vec<Multiaddr>,
    next_housekeeping: Instant,
    /// The consensus core, on managers.
    core: Option<Core<RedbLog>>,
    /// The Raft log's meta table (Raft id, followed state), when in a cluster.
    raft_meta: Option<RedbLog>,
    /// The configuration as followed from managers (members that are not managers).
    followed: ClusterState,
    clinks: BTreeMap<PeerId, cluster::Link>,
    cluster_tx: mpsc::Sender<cluster::Inbound>,
    proposals: Proposals,
    /// Forwarded proposals: req -> (seq, bytes, sent, target).
    forwarded_at: BTreeMap<u64, Instant>,
    joining: Option<TokenText>,
    next_follow: Instant,
    awaiting_state: Option<Cid>,
    /// Raft id -> PeerId, learned from messages (a new manager's log may not list members yet).
    raft_peers: BTreeMap<u64, PeerId>,
    /// Rotates requests over managers, so a dead one (whose connection has not timed out
    /// yet) does not swallow every follow request and proposal.
    rotate: std::cell::Cell<usize>,
    /// When a pending join may be presented again.
    next_join: Instant,
    /// Linearizable reads waiting for their index: ctx -> (index, started, reply).
    reads: BTreeMap<Vec<u8>, (u64, Instant, oneshot::Sender<serde_json::Value>)>,
    next_read: u64,
    drives: u64,
    /// When a manager last answered a follow request.
    follow_answered: Instant,
    /// Who may read what, for the exchange.
    access: Arc<RwLock<Arc<Access>>>,
    /// The last replication plan.
    plan: mycel_policy::plan::Plan,
    next_plan: Instant,
    next_budget: Instant,
    /// An eviction pass is running on a blocking thread.
    evicting: Arc<std::sync::atomic::AtomicBool>,
    /// Zone topics subscribed to (every member's zone).
    zones: BTreeSet<String>,
    /// Free store bytes, refreshed with the budget.
    free_bytes: u64,
    /// When the followed state was last saved (deltas are saved at most every 5 s).
    followed_saved: Instant,
    /// Topology files: router applies, reports, the leader's decisions.
    topo: topology::Wiring,
    /// Members' addresses and when to dial whom (the node core's address book).
    book: mycel_core::addrs::Book,
    /// The book changed since it was last saved.
    book_dirty: bool,
    book_saved: Instant,
}

fn now(started: Instant) -> Timestamp {
    Timestamp(started.elapsed().as_millis() as u64)
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// # Errors
/// [`DaemonError::Setup`] when the network, the store or the API cannot start.
pub async fn run(dir: DataDir, opts: RunOptions) -> Result<(), DaemonError> {
    let setup = |e: &dyn std::fmt::Display| DaemonError::Setup(e.to_string());
    let config = dir.config().map_err(|e| setup(&e))?;
    let key = dir.identity().map_err(|e| setup(&e))?;
    let keypair =
        libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes()).map_err(|e| setup(&e))?;
    let me = keypair.public().to_peer_id();
    let store = Arc::new(Store::open(&dir.store_path()).map_err(|e| setup(&e))?);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let policy = Arc::new(RwLock::new(net::gate::Policy::default()));
    let mut swarm = net::build_swarm(keypair, &mut registry, policy.clone(), config.node.mdns)
        .map_err(|e| setup(&e))?;
    let p2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
    let members = Arc::new(RwLock::new(parse_members(&config, me).map_err(|e| setup(&e))?));
    policy.write().expect("gate lock").allowed = members.read().expect("members lock").clone();
    for addr in &config.node.listen {
        let ma: Multiaddr = addr.parse().map_err(|e| setup(&format!("listen {addr}: {e}")))?;
        swarm.listen_on(ma).map_err(|e| setup(&format!("listen {addr}: {e}")))?;
    }
    let mut bootstrap = Vec::new();
    for addr in &config.node.bootstrap {
        let ma: Multiaddr = addr.parse().map_err(|e| setup(&format!("bootstrap {addr}: {e}")))?;
        let Some(libp2p::multiaddr::Protocol::P2p(peer)) = ma.iter().last() else {
            return Err(setup(&format!("bootstrap {addr}: must end in /p2p/PEER_ID")));
        };
        bootstrap.push((peer, ma));
    }
    let topic = net::announce_topic(&config.node.zone);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| setup(&e))?;
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control.accept(net::EXCHANGE).map_err(|e| setup(&e))?;

    let (net_tx, mut net_rx) = mpsc::channel::<NetEvent>(4096);
    let (cluster_tx, mut cluster_rx) = mpsc::channel::<cluster::Inbound>(4096);
    let mut cluster_incoming = control.accept(cluster::CLUSTER).map_err(|e| setup(&e))?;
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(256);
    let (store_tx, store_rx) = std_mpsc::sync_channel::<StoreJob>(256);
    let (done_tx, mut done_rx) = mpsc::channel::<StoreDone>(256);
    {
        let store = store.clone();
        std::thread::Builder::new()
            .name("mycel-store".into())
            .spawn(move || store_worker(&store, &store_rx, &done_tx))
            .map_err(|e| setup(&e))?;
    }
    let access = Arc::new(RwLock::new(Arc::new(Access::default())));
    let serve_ctx = ServeCtx {
        access: access.clone(),
        store: store.clone(),
        upload: Limiter::new(config.node.upload_bytes_per_sec),
        members: members.clone(),
        metrics: metrics.clone(),
        corrupt: opts.test_corrupt_serve,
    };
    let api = crate::api::serve(&dir, &config, cmd_tx.clone(), store.clone(), Arc::new(registry))
        .await
        .map_err(|e| setup(&e))?;

    let started = Instant::now();
    let config_watches = config.topology.watch.clone();
    let seed = node_seed(&me);
    let mut d = Daemon {
        placement_scores: mycel_policy::placement::ScoreCache::default(),
        me,
        dir: dir.clone(),
        announcer: Announcer::new(
            net::core_peer(&me),
            &config.node.zone,
            config.node.announce_period_ms,
            now(started),
            seed,
        ),
        directory: Directory::new(config.node.announce_period_ms * 3),
        download: Limiter::new(config.node.download_bytes_per_sec),
        config,
        store,
        swarm,
        control,
        links: BTreeMap::new(),
        connected: BTreeMap::new(),
        members,
        policy,
        bootstrap,
        jobs: BTreeMap::new(),
        reqs: BTreeMap::new(),
        next_req: 1,
        who_has: BTreeMap::new(),
        net_tx,
        store_tx,
        metrics,
        p2p_metrics,
        started,
        listen_addrs: Vec::new(),
        next_housekeeping: Instant::now(),
        core: None,
        raft_meta: None,
        followed: ClusterState::default(),
        clinks: BTreeMap::new(),
        cluster_tx,
        proposals: Proposals::default(),
        forwarded_at: BTreeMap::new(),
        joining: None,
        next_follow: Instant::now(),
        awaiting_state: None,
        raft_peers: BTreeMap::new(),
        rotate: std::cell::Cell::new(0),
        next_join: Instant::now(),
        reads: BTreeMap::new(),
        next_read: 0,
        drives: 0,
        follow_answered: Instant::now(),
        access,
        plan: mycel_policy::plan::Plan::default(),
        next_plan: Instant::now(),
        next_budget: Instant::now(),
        evicting: Arc::default(),
        zones: BTreeSet::new(),
        free_bytes: 0,
        followed_saved: Instant::now(),
        topo: topology::Wiring::new(&config_watches),
        book: mycel_core::addrs::Book::new(mycel_core::addrs::Config::default()),
        book_dirty: false,
        book_saved: Instant::now(),
    };
    d.load_book();
    d.announcer.start_seq_at(unix_ms());
    d.start_cluster().map_err(|e| setup(&e))?;
    d.learn_bootstrap();
    tracing::info!(peer_id = %d.me, zone = %d.config.node.zone, "mycel daemon starting");
    d.dial_due();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| setup(&e))?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| setup(&e))?;
    loop {
        let wake = d.next_wake();
        tokio::select! {
            ev = d.swarm.select_next_some() => d.on_swarm(ev),
            Some(ev) = net_rx.recv() => d.on_net(ev),
            Some(cmd) = cmd_rx.recv() => d.on_command(cmd),
            Some(done) = done_rx.recv() => d.on_store_done(done),
            Some(inbound) = cluster_rx.recv() => d.on_cluster(inbound),
            Some((peer, stream)) = cluster_incoming.next() => {
                tokio::spawn(cluster::serve(stream, peer, d.cluster_tx.clone()));
            }
            Some((peer, stream)) = incoming.next() => {
                if d.members.read().expect("members lock").contains(&peer) {
                    tokio::spawn(exchange::serve(stream, peer, serve_ctx.clone()));
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => d.on_timer(),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                if let Err(e) = d.reload_members() {
                    tracing::warn!("reloading members: {e}");
                }
            }
        }
        d.drive();
    }
    tracing::info!("shutting down");
    d.save_book(true);
    drop(d.store_tx);
    api.shutdown().await;
    Ok(())
}

/// A seed of this node's own (the tail of its PeerId, which ends in its public key).
fn node_seed(me: &PeerId) -> u64 {
    let bytes = me.to_bytes();
    u64::from_le_bytes(
        bytes[bytes.len() - 8..].try_into().expect("a PeerId is longer than 8 bytes"),
    )
}

fn parse_members(config: &NodeConfig, me: PeerId) -> Result<BTreeSet<PeerId>, String> {
    let mut out = BTreeSet::new();
    out.insert(me);
    for m in &config.cluster.members {
        out.insert(net::parse_peer(m)?);
    }
    Ok(out)
}

impl Daemon {
    fn ts(&self) -> Timestamp {
        now(self.started)
    }

    fn next_wake(&self) -> Instant {
        let mut at = self.next_housekeeping;
        let mut consider = |t: Timestamp| {
            let i = self.started + Duration::from_millis(t.0);
            if i < at {
                at = i;
            }
        };
        consider(self.announcer.poll_timeout());
        if let Some(t) = self.book.poll_timeout() {
            consider(t);
        }
        if let Some(core) = &self.core {
            consider(Timestamp(core.poll_timeout().0));
        }
        for job in self.jobs.values() {
            if let Some(t) = job.fetch.poll_timeout() {
                consider(t);
            }
        }
        at.max(Instant::now())
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        self.members.read().expect("members lock").contains(peer)
    }

    fn reload_members(&mut self) -> Result<usize, String> {
        let config = self.dir.config().map_err(|e| e.to_string())?;
        let mut new = parse_members(&config, self.me)?;
        new.extend(crate::cluster::member_peers(self.cluster_state()));
        let old = self.members.read().expect("members lock").clone();
        self.config.cluster = config.cluster;
        self.apply_members(new.clone(), &old);
        self.config.node.bootstrap = config.node.bootstrap;
        tracing::info!(members = new.len(), "members reloaded");
        self.dial_due();
        Ok(new.len())
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&ev);
        match &ev {
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(found))) => {
                for (peer, addr) in found.iter().cloned() {
                    if peer != self.me && !self.connected.contains_key(&peer) {
                        tracing::debug!(%peer, %addr, "mDNS: discovered");
                        self.swarm.add_peer_address(peer, addr.clone());
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.p2p_metrics.record(e),
            _ => {}
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}/p2p/{}", self.me);
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::info!(peer = %peer_id, "connected via {}", endpoint.get_remote_address());
                // An address we dialled works; an inbound one is the peer's source port.
                let dialled =
                    endpoint.is_dialer().then(|| dial::addr_text(endpoint.get_remote_address()));
                self.book.connected(net::core_peer(&peer_id), dialled.as_deref());
                self.book_dirty = true;
                self.connected.entry(peer_id).or_default().addrs =
                    vec![endpoint.get_remote_address().to_string()];
                self.metrics.peers_connected.set(self.connected.len() as i64);
                // Ask the newcomer about everything we are fetching.
                let roots: Vec<Cid> = self.jobs.keys().copied().collect();
                for root in roots {
                    self.send_who_has(peer_id, root);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                tracing::info!(peer = %peer_id, "disconnected");
                self.book.disconnected(net::core_peer(&peer_id), self.ts());
                self.connected.remove(&peer_id);
                self.links.remove(&peer_id);
                self.metrics.peers_connected.set(self.connected.len() as i64);
                let cp = net::core_peer(&peer_id);
                self.directory.peer_gone(&cp);
                for job in self.jobs.values_mut() {
                    job.fetch.peer_gone(&cp);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => self.on_announcement(message),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in &info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr.clone());
                    if self.is_member(&peer_id) {
                        self.learn_addr(peer_id, addr, mycel_core::addrs::Source::Reported);
                    }
                }
                self.connected.entry(peer_id).or_default().agent = Some(info.agent_version);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(p) = self.connected.get_mut(&peer) {
                    p.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                }
                // Round trips feed the leader's decisions (reachability, leader preference).
                let now = mycel_consensus::Timestamp(self.ts().0);
                let raft_id = self.cluster_state().members.get(&peer.to_bytes()).map(|m| m.raft_id);
                if let (Some(id), Some(core)) = (raft_id, self.core.as_mut()) {
                    core.handle_rtt(id, rtt.as_millis() as u64, now);
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection refused: {error}");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                if let Some(p) = peer_id {
                    self.book.dial_failed(net::core_peer(&p), self.ts());
                }
            }
            _ => {}
        }
    }

    fn on_announcement(&mut self, message: gossipsub::Message) {
        let Some(source) = message.source else { return };
        if !self.is_member(&source) || source == self.me {
            return;
        }
        let ann = match Announcement::decode(&message.data) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(peer = %source, "bad announcement: {e}");
                return;
            }
        };
        let now = self.ts();
        if let Err(e) = self.directory.handle_announcement(net::core_peer(&source), &ann, now) {
            tracing::debug!(peer = %source, "announcement refused: {e}");
            return;
        }
        // Where the member listens, in its own signed words: how nodes that were introduced
        // through one bootstrap peer find each other once it is gone.
        for a in &ann.addrs {
            if let Ok(ma) = a.parse::<Multiaddr>() {
                self.learn_addr(source, &ma, mycel_core::addrs::Source::Reported);
            }
        }
        let same_zone = ann.zone == self.config.node.zone;
        let mut wanted = false;
        for job in self.jobs.values_mut() {
            let root = job.fetch.root().to_bytes();
            if ann.roots.contains(&root) || ann.partial.iter().any(|p| p.root == root) {
                job.fetch.add_peer(net::core_peer(&source), same_zone);
                wanted = true;
            }
        }
        // A holder heard through the gossip mesh but not connected yet: dial it (its
        // addresses come from identify or the committed member list).
        if wanted && !self.connected.contains_key(&source) {
            self.dial_member(source);
        }
    }

    fn link(&mut self, peer: PeerId) -> PeerLink {
        if let Some(l) = self.links.get(&peer) {
            return l.clone();
        }
        let l = exchange::spawn_link(
            self.control.clone(),
            peer,
            self.net_tx.clone(),
            self.download.clone(),
            self.metrics.clone(),
        );
        self.links.insert(peer, l.clone());
        l
    }

    fn send_who_has(&mut self, peer: PeerId, root: Cid) {
        if !self.is_member(&peer) || peer == self.me {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        self.who_has.insert(req, root);
        if self.who_has.len() > 10_000 {
            let oldest = *self.who_has.keys().next().expect("non-empty");
            self.who_has.remove(&oldest);
        }
        let link = self.link(peer);
        if !link.send(Frame::WhoHas { req, root: root.to_bytes() }) {
            self.links.remove(&peer);
        }
    }

    fn on_net(&mut self, ev: NetEvent) {
        let now = self.ts();
        match ev {
            NetEvent::Closed { peer, reason } => {
                tracing::debug!(%peer, "request stream closed: {reason}");
                self.links.remove(&peer);
                let cp = net::core_peer(&peer);
                for job in self.jobs.values_mut() {
                    job.fetch.peer_gone(&cp);
                }
            }
            NetEvent::Inbound { peer, frame } => {
                let cp = net::core_peer(&peer);
                match frame {
                    Frame::Block { req, cid, bytes } => {
                        let (Some(root), Some(cid)) =
                            (self.answered(req), exchange::frame_cid(&cid))
                        else {
                            return;
                        };
                        // The fetch core checks the block against its CID (a mismatch comes
                        // back as a penalty, counted there).
                        if let Some(job) = self.jobs.get_mut(&root) {
                            job.fetch.handle_block(cp, cid, bytes, now);
                        }
                    }
                    Frame::DontHave { req, cid } => {
                        if let Some(root) = self.who_has.remove(&req) {
                            let _ = root; // the peer does not hold it: nothing to record
                            return;
                        }
                        let (Some(root), Some(cid)) =
                            (self.answered(req), exchange::frame_cid(&cid))
                        else {
                            return;
                        };
                        if let Some(job) = self.jobs.get_mut(&root) {
                            job.fetch.handle_dont_have(cp, cid);
                        }
                    }
                    Frame::Holding { req, root, complete } => {
                        let (Some(asked), Some(root)) =
                            (self.who_has.remove(&req), exchange::frame_cid(&root))
                        else {
                            return;
                        };
                        if asked != root {
                            return;
                        }
                        self.directory.handle_holding(cp, root, complete, now);
                        let same_zone = self
                            .directory
                            .node(&cp)
                            .is_some_and(|n| n.zone == self.config.node.zone);
                        if let Some(job) = self.jobs.get_mut(&root) {
                            job.fetch.add_peer(cp, same_zone);
                        }
                    }
                    Frame::Namespace { req, root, namespace } => {
                        let Some(root) = exchange::frame_cid(&root) else { return };
                        self.on_namespace(peer, req, root, namespace);
                    }
                    Frame::Refused { req, reason } => {
                        tracing::warn!(%peer, "refused: {reason}");
                        let root = self
                            .reqs
                            .remove(&req)
                            .map(|r| r.0)
                            .or_else(|| self.who_has.remove(&req));
                        if let Some(root) = root
                            && let Some(job) = self.jobs.get_mut(&root)
                        {
                            job.fetch.handle_refused(cp);
                            // Every holder refused a requester's fetch: say why, store nothing.
                            if job.fetch.peers().count() == 0 && !job.keep {
                                let job = self.jobs.remove(&root).expect("present");
                                let why = format!("refused by {peer}: {reason}");
                                let update = self.update_of(&job, "failed", Some(why));
                                for w in &job.waiters {
                                    let _ = w.try_send(update.clone());
                                }
                            }
                        }
                    }
                    other => {
                        tracing::debug!(%peer, "unexpected frame on a request stream: {other:?}")
                    }
                }
            }
        }
    }

    /// The fetch a request belongs to; forgets the request once every answer is in.
    /// A holder serves `root` (asked for in `req`) under `namespace`: unless a committed pin
    /// names one, this node's copy is served under it too. Recorded through the store queue,
    /// so it commits no later than the blocks that follow it. A stricter namespace than
    /// `default` is all a peer can impose this way.
    fn on_namespace(&mut self, peer: PeerId, req: u64, root: Cid, namespace: String) {
        if self.reqs.get(&req).map(|r| r.0) != Some(root) {
            return;
        }
        if let Err(e) = mycel_policy::access::validate_namespace(&namespace) {
            tracing::debug!(%peer, "bad namespace for {root}: {e}");
            return;
        }
        let pinned = self.cluster_state().pins.contains_key(root.to_bytes().as_slice());
        let Some(job) = self.jobs.get_mut(&root) else { return };
        if pinned || namespace == mycel_policy::access::DEFAULT_NAMESPACE || job.namespace.is_some()
        {
            return;
        }
        job.namespace = Some(namespace.clone());
        let tx = self.store_tx.clone();
        tokio::task::block_in_place(|| {
            let _ = tx.send(StoreJob::Namespace { root, namespace });
        });
    }

    fn answered(&mut self, req: u64) -> Option<Cid> {
        let entry = self.reqs.get_mut(&req)?;
        let root = entry.0;
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            self.reqs.remove(&req);
        }
        Some(root)
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Pins(only, reply) => {
                let _ = reply.send(self.pins_json(only));
            }
            Command::Topology(request) => self.on_topology_request(request),
            Command::Id(reply) => {
                let _ = reply.send(self.id_info());
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let peers: Vec<serde_json::Value> = self
                    .connected
                    .iter()
                    .map(|(p, info)| {
                        let zone = self.directory.node(&net::core_peer(p)).map(|n| n.zone.clone());
                        serde_json::json!({"peer_id": p.to_string(), "addrs": info.addrs,
                            "rtt_ms": info.rtt_ms, "agent": info.agent, "zone": zone,
                            "member": self.is_member(p)})
                    })
                    .collect();
                let _ = reply.send(serde_json::json!(peers));
            }
            Command::Announce => self.announcer.announce_soon(self.ts()),
            Command::ReloadMembers(reply) => {
                let _ = reply.send(self.reload_members());
            }
            Command::Fetch { root, updates, out } => {
                self.start_fetch(root, Some(updates));
                if let Some(out) = out {
                    self.stream_output(root, &out);
                }
            }
            Command::ClusterInit(reply) => self.cluster_init(reply),
            Command::Propose(commands, reply) => self.propose(commands, reply),
            Command::ClusterView(reply) => {
                // On a manager the view is a linearizable read (ReadIndex): it reflects every
                // change committed before the request, whichever manager answers.
                match self.core.as_mut() {
                    Some(core) if core.is_leader() => {
                        self.next_read += 1;
                        let ctx = self.next_read.to_le_bytes().to_vec();
                        core.read_index(ctx.clone());
                        self.reads.insert(ctx, (u64::MAX, Instant::now(), reply));
                    }
                    _ => {
                        let _ = reply.send(self.cluster_view());
                    }
                }
            }
            Command::TokenCreate { role, zone, ttl_s, uses, reply } => {
                self.token_create(role, zone, ttl_s, uses, reply);
            }
            Command::TokenRevoke(prefix, reply) => {
                let matches: Vec<[u8; 32]> = self
                    .cluster_state()
                    .tokens
                    .keys()
                    .filter(|h| {
                        h.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                            .starts_with(&prefix)
                    })
                    .copied()
                    .collect();
                if matches.len() == 1 && !prefix.is_empty() {
                    self.propose(vec![CCommand::RevokeToken { hash: matches[0] }], reply);
                } else {
                    let _ = reply.send(Err(format!("{} tokens match {prefix:?}", matches.len())));
                }
            }
            Command::LeaderTransfer(to, reply) => {
                let r = match self.core.as_mut() {
                    Some(core) if core.is_leader() => {
                        let (voters, _) = core.conf();
                        let target = if to != 0 {
                            to
                        } else {
                            voters.iter().copied().find(|v| *v != core.id()).unwrap_or(0)
                        };
                        if target == 0 || !voters.contains(&target) {
                            Err(format!("{target} is not a voter"))
                        } else {
                            core.transfer_leader(target);
                            Ok(target)
                        }
                    }
                    Some(core) => Err(format!("not the leader; the leader is {}", core.leader())),
                    None => Err("this node is not a manager".into()),
                };
                let _ = reply.send(r);
            }
        }
    }

    fn id_info(&self) -> IdInfo {
        IdInfo {
            peer_id: self.me.to_string(),
            listen_addrs: self
                .listen_addrs
                .iter()
                .map(|a| format!("{a}/p2p/{}", self.me))
                .collect(),
            zone: self.config.node.zone.clone(),
        }
    }

    fn status(&self) -> serde_json::Value {
        let fetches: Vec<serde_json::Value> = self
            .jobs
            .iter()
            .map(|(root, job)| {
                let p = job.fetch.progress();
                serde_json::json!({"root": root.to_string(), "total_bytes": p.total_bytes,
                    "done_bytes": p.done_bytes, "peers": job.fetch.peers().count()})
            })
            .collect();
        let roots = self.store.roots().map(|r| r.len()).unwrap_or(0);
        serde_json::json!({
            "peer_id": self.me.to_string(),
            "zone": self.config.node.zone,
            "listen_addrs": self.id_info().listen_addrs,
            "peers_connected": self.connected.len(),
            "members": self.members.read().expect("members lock").len(),
            "roots": roots,
            "fetches": fetches,
            "sent_bytes": self.metrics.bytes_sent.get(),
            "received_bytes": self.metrics.bytes_received.get(),
            "refused_requests": self.metrics.refused_requests.get(),
            "evictions": self.metrics.evictions.get(),
            "free_bytes": self.free_bytes,
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }

    /// Starts (or joins) a fetch of `root`: for a requester streaming `updates`, or, with
    /// `None`, as replication work that runs until the plan cancels it.
    fn start_fetch(&mut self, root: Cid, updates: Option<mpsc::Sender<FetchUpdate>>) {
        let keep = updates.is_none();
        if let Ok(Some(_)) = self.store.root(&root) {
            let Some(updates) = updates else { return };
            let _ = updates.try_send(FetchUpdate {
                total_bytes: 0,
                done_bytes: 0,
                by_peer: BTreeMap::new(),
                peers: 0,
                rerequested: 0,
                state: "complete".into(),
                error: None,
                output: None,
            });
            return;
        }
        if let Some(job) = self.jobs.get_mut(&root) {
            job.waiters.extend(updates);
            job.keep |= keep;
            return;
        }
        let config = fetch::Config {
            timeout_ms: self.config.node.request_timeout_ms,
            want_batch: 32,
            window_max: 256,
            seed: node_seed(&self.me),
            ..fetch::Config::default()
        };
        let mut f = Fetch::new(root, config, self.ts());
        let cp_zone = self.config.node.zone.clone();
        for h in self.directory.holders(&root) {
            if let Some(p) = net::libp2p_peer(&h.peer)
                && self.connected.contains_key(&p)
            {
                f.add_peer(h.peer, h.zone.as_deref() == Some(cp_zone.as_str()));
            }
        }
        let waiters = updates.into_iter().collect();
        let job = Job { fetch: f, waiters, storing: false, keep, namespace: None, output: None };
        self.jobs.insert(root, job);
        self.metrics.fetches_active.set(self.jobs.len() as i64);
        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
        for p in peers {
            self.send_who_has(p, root);
        }
    }

    /// A requester asked for `root` at `out`: unless this fetch writes an output already,
    /// write it while it arrives (whatever passed before is written by the final pass).
    fn stream_output(&mut self, root: Cid, out: &std::path::Path) {
        let Some(job) = self.jobs.get_mut(&root) else { return };
        if job.output.is_some() {
            return;
        }
        match LiveOutput::create(root, out) {
            Ok(o) => job.output = Some(o),
            // The restore after the fetch reports it, as it would without a daemon.
            Err(e) => tracing::debug!(%root, "not streaming the output: {e}"),
        }
    }

    /// Runs the replication plan and carries out this node's part of it.
    fn replicate(&mut self) {
        let pins_now = self.cluster_state().pins.len();
        if !self.in_cluster() || pins_now == 0 {
            self.plan = mycel_policy::plan::Plan::default();
            return;
        }
        if pins_now > REPLICATION_PINS_MAX {
            // Planning is O(pins x members) on the event loop: past this size it would stall
            // the node (and a manager's Raft). Pins stay committed; placement waits.
            // (Planned at most every 1 + pins/10,000 intervals, so this warns rarely.)
            tracing::warn!(
                pins = pins_now,
                "replication planning skipped above {REPLICATION_PINS_MAX} pins"
            );
            self.plan = mycel_policy::plan::Plan::default();
            return;
        }
        let now = self.ts();
        // One store lookup per pinned root: whether it is held here, and its length.
        let held: BTreeMap<Cid, u64> = self
            .cluster_state()
            .pins
            .values()
            .filter_map(crate::replicate::pin_cid)
            .filter_map(|c| self.store.root(&c).ok().flatten().map(|r| (c, r.len)))
            .collect();
        let complete = |c: &Cid| held.contains_key(c);
        let fetching = self
            .jobs
            .iter()
            .map(|(r, j)| {
                let p = j.fetch.progress();
                (*r, (p.done_bytes, p.total_bytes))
            })
            .collect();
        let local = crate::replicate::Local {
            me: self.me,
            complete: &complete,
            fetching,
            free_bytes: self.free_bytes,
            load: self.jobs.len() as u32,
        };
        // Taken out while the committed state is borrowed; put back after planning.
        let mut scores = std::mem::take(&mut self.placement_scores);
        let state = self.cluster_state();
        let size_of = |c: &Cid| held.get(c).copied().unwrap_or(0);
        let pins = crate::replicate::pin_specs(state, &size_of);
        let nodes = crate::replicate::node_states(
            state,
            &self.directory,
            &local,
            now,
            self.config.node.node_lost_ms,
        );
        let settings = crate::replicate::settings(state);
        // Only nodes that may read a namespace hold its pins: plan each namespace with the
        // others marked as non-storage.
        let access = self.access.read().expect("access lock").clone();
        let namespace_of = |spec: &mycel_policy::plan::PinSpec| {
            state.pins.get(&spec.root).map_or("default", |p| p.namespace.as_str()).to_string()
        };
        let mut may_read = |id: &[u8], ns: &str| {
            mycel_proto::PeerId::from_bytes(id).is_some_and(|p| access.may_read_namespace(&p, ns))
        };
        let mut plan = mycel_policy::plan::plan_namespaced(
            &pins,
            &namespace_of,
            &mut may_read,
            &nodes,
            &settings,
            unix_ms(),
            &mut scores,
        );
        self.placement_scores = scores;
        // Reports in committed pin order, as `pins` is.
        let order: BTreeMap<&[u8], usize> =
            pins.iter().enumerate().map(|(i, p)| (p.root.as_slice(), i)).collect();
        plan.pins.sort_by_key(|r| order.get(r.root.as_slice()).copied());
        let me = self.me.to_bytes();
        let mine: Vec<mycel_policy::plan::Action> = plan.for_node(&me).cloned().collect();
        for action in mine {
            use mycel_policy::plan::Action as P;
            match action {
                P::Fetch { root, .. } => {
                    if let Ok(cid) = Cid::from_bytes(&root) {
                        if !self.jobs.contains_key(&cid) {
                            tracing::info!(%cid, "replication: fetching");
                        }
                        self.start_fetch(cid, None);
                    }
                }
                P::Cancel { root, .. } => {
                    if let Ok(cid) = Cid::from_bytes(&root)
                        && self.jobs.get(&cid).is_some_and(|j| j.keep && j.waiters.is_empty())
                    {
                        tracing::info!(%cid, "replication: copy work moved elsewhere");
                        self.jobs.remove(&cid);
                        self.reqs.retain(|_, (r, _)| *r != cid);
                    }
                }
                P::Release { root, .. } => {
                    if let Ok(cid) = Cid::from_bytes(&root) {
                        tracing::info!(%cid, "replication: replica released (now cache)");
                    }
                }
            }
        }
        let (mut under, mut risk, mut missed, mut unplaceable) = (0, 0, 0, 0);
        for (spec, r) in pins.iter().zip(&plan.pins) {
            debug_assert_eq!(spec.root, r.root);
            under += i64::from(r.replicas < spec.replicas_min);
            unplaceable += i64::from(r.unplaceable.is_some());
            match r.preposition.map(|p| p.2) {
                Some(mycel_policy::plan::Deadline::AtRisk) => risk += 1,
                Some(mycel_policy::plan::Deadline::Missed) => missed += 1,
                _ => {}
            }
        }
        self.metrics.pins_under_replicated.set(under);
        self.metrics.pins_unplaceable.set(unplaceable);
        self.metrics.prepositions_at_risk.set(risk);
        self.metrics.prepositions_missed.set(missed);
        self.metrics.fetches_active.set(self.jobs.len() as i64);
        self.plan = plan;
    }

    /// Roots this node must keep: replicas placed here, pre-positions here, copies of pins
    /// still under their minimum, and the cluster's state objects.
    fn pinned_here(&self) -> BTreeSet<Vec<u8>> {
        let me = self.me.to_bytes();
        let released: BTreeSet<&[u8]> = self
            .plan
            .for_node(&me)
            .filter_map(|a| match a {
                mycel_policy::plan::Action::Release { root, .. } => Some(root.as_slice()),
                _ => None,
            })
            .collect();
        let state = self.cluster_state();
        let mut keep = BTreeSet::new();
        for r in &self.plan.pins {
            let under = state.pins.get(&r.root).is_some_and(|p| r.replicas < p.replicas_min);
            let placed = r.holders.contains(&me) && !released.contains(r.root.as_slice());
            if under || placed {
                keep.insert(r.root.clone());
            }
        }
        // Before the first plan, every pinned root is kept.
        if self.plan.pins.is_empty() {
            keep.extend(state.pins.keys().cloned());
        }
        // Topology files are small and routers may need them at any moment: the active and
        // the latest version of every name (and their source bytes) are never evicted.
        for t in state.topologies.values() {
            for n in t.active.into_iter().chain(std::iter::once(t.latest())) {
                if let Some(v) = t.version(n) {
                    keep.insert(v.root.clone());
                    keep.insert(v.source.clone());
                }
            }
        }
        keep
    }

    /// Refreshes free bytes and, above the high watermark, evicts cached objects no pin
    /// needs here, oldest first, on a blocking thread.
    fn budget(&mut self) {
        let n = &self.config.node;
        let used = self.store.used_bytes().unwrap_or(0);
        self.free_bytes = if n.capacity_bytes > 0 {
            n.capacity_bytes.saturating_sub(used)
        } else {
            fs_free_bytes(&self.dir.path)
        };
        let marks = mycel_policy::budget::Watermarks {
            high: f64::from(n.high_watermark_pct) / 100.0,
            low: f64::from(n.low_watermark_pct) / 100.0,
        };
        if n.capacity_bytes == 0
            || (used as f64) <= marks.high * n.capacity_bytes as f64
            || self.evicting.load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let mut keep = self.pinned_here();
        keep.extend(self.jobs.keys().map(|c| c.to_bytes().to_vec()));
        let capacity = n.capacity_bytes;
        let store = self.store.clone();
        let flag = self.evicting.clone();
        let metrics = self.metrics.clone();
        flag.store(true, std::sync::atomic::Ordering::Release);
        tokio::task::spawn_blocking(move || {
            let result = evict(&store, &keep, used, capacity, marks, &metrics);
            if let Err(e) = result {
                tracing::warn!("eviction: {e}");
            }
            flag.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    fn pins_json(&self, only: Option<Cid>) -> serde_json::Value {
        let state = self.cluster_state();
        let report = |root: &[u8]| self.plan.pins.iter().find(|r| r.root == root);
        let peer_text =
            |b: &[u8]| PeerId::from_bytes(b).map_or_else(|_| "?".into(), |p| p.to_string());
        let pin_json = |p: &mycel_consensus::command::Pin| {
            let r = report(&p.root);
            let cid = Cid::from_bytes(&p.root).map_or_else(|_| "?".into(), |c| c.to_string());
            let pre = r.and_then(|r| r.preposition);
            serde_json::json!({
                "cid": cid,
                "name": p.name,
                "namespace": p.namespace,
                "replicas_min": p.replicas_min,
                "replicas_max": p.replicas_max,
                "zones": p.zones,
                "tags": p.tags,
                "preposition": p.preposition,
                "deadline_ms": p.deadline_ms,
                "replicas": r.map(|r| r.replicas),
                "copying": r.map(|r| r.copying),
                "holders": r.map(|r| r.holders.iter().map(|h| peer_text(h)).collect::<Vec<_>>()),
                "unplaceable": r.and_then(|r| r.unplaceable.clone()),
                "preposition_held": pre.map(|p| p.0),
                "preposition_targets": pre.map(|p| p.1),
                "deadline": pre.map(|p| p.2.as_str()),
            })
        };
        let Some(root) = only else {
            let pins: Vec<serde_json::Value> = state.pins.values().map(pin_json).collect();
            let grants: Vec<serde_json::Value> = state
                .grants
                .iter()
                .map(|g| {
                    serde_json::json!({"subject": g.subject, "permission": g.permission,
                    "namespace": g.namespace})
                })
                .collect();
            return serde_json::json!({"pins": pins, "grants": grants});
        };
        let key = root.to_bytes().to_vec();
        let Some(pin) = state.pins.get(&key) else {
            return serde_json::json!({"error": format!("{root} is not pinned")});
        };
        let fetch_planned: BTreeSet<&[u8]> = self
            .plan
            .actions
            .iter()
            .filter_map(|a| match a {
                mycel_policy::plan::Action::Fetch { node, root } if *root == key => {
                    Some(node.as_slice())
                }
                _ => None,
            })
            .collect();
        let now = self.ts();
        let nodes: Vec<serde_json::Value> = state
            .members
            .values()
            .filter_map(|m| {
                let peer = PeerId::from_bytes(&m.peer).ok()?;
                let (held, alive) = if peer == self.me {
                    let held = if matches!(self.store.root(&root), Ok(Some(_))) {
                        Some((true, None))
                    } else {
                        self.jobs.get(&root).map(|j| {
                            let p = j.fetch.progress();
                            (false, Some((p.done_bytes, p.total_bytes)))
                        })
                    };
                    (held, true)
                } else {
                    let cp = net::core_peer(&peer);
                    let alive = self
                        .directory
                        .node(&cp)
                        .is_some_and(|i| now.since(i.seen) <= self.config.node.node_lost_ms);
                    (self.directory.holding(&root, &cp), alive)
                };
                let (state_name, percent) = match held {
                    Some((true, _)) => ("held", Some(100.0)),
                    Some((false, Some((done, total)))) if total > 0 => {
                        ("fetching", Some((done as f64 * 1000.0 / total as f64).round() / 10.0))
                    }
                    Some((false, _)) => ("fetching", None),
                    None if fetch_planned.contains(m.peer.as_slice()) => ("queued", None),
                    None => ("-", None),
                };
                Some(serde_json::json!({
                    "peer_id": peer.to_string(),
                    "role": m.role.as_str(),
                    "zone": m.zone,
                    "alive": alive,
                    "state": state_name,
                    "percent": percent,
                    "replica": report(&key).is_some_and(|r| r.holders.contains(&m.peer)),
                }))
            })
            .collect();
        let mut v = pin_json(pin);
        v["nodes"] = serde_json::Value::Array(nodes);
        v
    }

    fn update_of(&self, job: &Job, state: &str, error: Option<String>) -> FetchUpdate {
        let p = job.fetch.progress();
        FetchUpdate {
            total_bytes: p.total_bytes,
            done_bytes: p.done_bytes,
            by_peer: p
                .by_peer
                .iter()
                .filter_map(|(peer, b)| net::libp2p_peer(peer).map(|p| (p.to_string(), *b)))
                .collect(),
            peers: job.fetch.peers().count(),
            rerequested: p.rerequested,
            state: state.into(),
            error,
            output: None,
        }
    }

    fn on_store_done(&mut self, done: StoreDone) {
        match done {
            StoreDone::Complete(root) if self.awaiting_state == Some(root) => {
                self.awaiting_state = None;
                self.jobs.remove(&root);
                let bytes = crate::restore::read_object(&self.store, &root);
                match (bytes, self.core.as_mut()) {
                    (Ok(b), Some(core)) => {
                        if let Err(e) = core.handle_snapshot_state(root, &b) {
                            self.fatal(&e.to_string());
                        }
                    }
                    (Err(e), _) => tracing::warn!("reading snapshot state {root}: {e}"),
                    _ => {}
                }
            }
            StoreDone::Complete(root) => {
                if let Some(mut job) = self.jobs.remove(&root) {
                    let mut update = self.update_of(&job, "complete", None);
                    match job.output.take() {
                        None => {
                            for w in &job.waiters {
                                let _ = w.try_send(update.clone());
                            }
                        }
                        // The rest of the output is written off the loop; the requesters
                        // hear of completion once it is in place.
                        Some(output) => {
                            let store = self.store.clone();
                            let waiters = job.waiters;
                            tokio::task::spawn_blocking(move || {
                                update.output = output.finish(&store).unwrap_or_else(|e| {
                                    tracing::warn!(%root, "writing the output: {e}");
                                    None
                                });
                                for w in &waiters {
                                    let _ = w.blocking_send(update.clone());
                                }
                            });
                        }
                    }
                }
                self.announcer.announce_soon(self.ts());
            }
            StoreDone::Failed(root, e) => {
                if let Some(job) = self.jobs.remove(&root) {
                    let update = self.update_of(&job, "failed", Some(e));
                    for w in &job.waiters {
                        let _ = w.try_send(update.clone());
                    }
                }
            }
            StoreDone::Error(e) => tracing::error!("store: {e}"),
        }
        self.metrics.fetches_active.set(self.jobs.len() as i64);
    }

    fn on_timer(&mut self) {
        let now = self.ts();
        if let Some(core) = self.core.as_mut()
            && core.poll_timeout().0 <= now.0
            && let Err(e) = core.handle_timeout(mycel_consensus::Timestamp(now.0))
        {
            self.fatal(&e.to_string());
        }
        self.cluster_housekeeping();
        self.topology_tick();
        for job in self.jobs.values_mut() {
            if job.fetch.poll_timeout().is_some_and(|t| t <= now) {
                job.fetch.handle_timeout(now);
            }
        }
        if self.announcer.poll_timeout() <= now {
            self.announce(now);
        }
        if Instant::now() >= self.next_budget {
            self.next_budget = Instant::now() + Duration::from_secs(5);
            self.budget();
        }
        if Instant::now() >= self.next_plan {
            // Large pin sets are planned less often: about 10,000 pins per interval.
            let scale = 1 + self.cluster_state().pins.len() as u64 / 10_000;
            self.next_plan = Instant::now()
                + Duration::from_millis(self.config.node.replication_interval_ms * scale);
            self.replicate();
        }
        if Instant::now() >= self.next_housekeeping {
            self.next_housekeeping = Instant::now() + Duration::from_millis(250);
            self.directory.expire(now);
            // Progress to waiters; drop waiters that went away.
            let updates: Vec<(Cid, FetchUpdate)> =
                self.jobs.iter().map(|(r, j)| (*r, self.update_of(j, "fetching", None))).collect();
            for (root, u) in updates {
                if let Some(job) = self.jobs.get_mut(&root) {
                    job.waiters.retain(|w| !w.is_closed());
                    for w in &job.waiters {
                        let _ = w.try_send(u.clone());
                    }
                    // Nobody waits any more: stop (what is stored stays, for a later resume).
                    if job.waiters.is_empty()
                        && !job.storing
                        && !job.keep
                        && self.awaiting_state != Some(root)
                    {
                        tracing::info!(%root, "fetch abandoned by its requesters");
                        self.jobs.remove(&root);
                        self.reqs.retain(|_, (r, _)| *r != root);
                    }
                }
            }
            self.metrics.fetches_active.set(self.jobs.len() as i64);
            self.dial_due();
            self.save_book(false);
        }
    }

    fn announce(&mut self, now: Timestamp) {
        let mut complete: Vec<Cid> = match self.store.roots() {
            Ok(r) => r.into_iter().map(|(c, _)| c).collect(),
            Err(e) => {
                tracing::warn!("listing roots: {e}");
                Vec::new()
            }
        };
        complete.sort();
        let partial = self
            .jobs
            .iter()
            .map(|(r, j)| {
                let p = j.fetch.progress();
                Partial { root: r.to_bytes(), done_bytes: p.done_bytes, total_bytes: p.total_bytes }
            })
            .collect();
        let holdings = Holdings {
            complete,
            partial,
            load: self.jobs.len() as u32,
            free_bytes: self.free_bytes,
            addrs: self.listen_addrs.iter().map(dial::addr_text).collect(),
        };
        let Some(ann) = self.announcer.handle_timeout(now, &holdings) else { return };
        let topic = net::announce_topic(&self.config.node.zone);
        match self.swarm.behaviour_mut().gossipsub.publish(topic, ann.encode()) {
            Ok(_) => {
                self.metrics.announcements.inc();
            }
            Err(e) => {
                tracing::debug!("announcement not published yet: {e}");
                self.metrics.publish_retries.inc();
                self.announcer.handle_publish_failed(now);
            }
        }
    }

    /// Runs every fetch core until it has nothing more to do right now.
    fn drive(&mut self) {
        self.drive_cluster();
        let now = self.ts();
        let roots: Vec<Cid> = self.jobs.keys().copied().collect();
        for root in roots {
            while let Some(action) = self.jobs.get_mut(&root).and_then(|j| j.fetch.poll_action(now))
            {
                self.execute(root, action);
            }
            // The full check walks every pending block: run it now and then, not per event.
            self.drives += 1;
            if self.drives.is_multiple_of(4096)
                && let Some(job) = self.jobs.get(&root)
            {
                job.fetch.check_invariants();
            }
        }
    }

    fn execute(&mut self, root: Cid, action: Action) {
        match action {
            Action::Lookup { cid, need_bytes } => {
                let local = if need_bytes {
                    match self.store.get(&cid) {
                        Ok(Some(b)) => {
                            if let Some(o) =
                                self.jobs.get_mut(&root).and_then(|j| j.output.as_mut())
                            {
                                o.on_block(&cid, &b);
                            }
                            Local::Bytes(b)
                        }
                        _ => Local::Absent,
                    }
                } else {
                    match self.store.has(&cid) {
                        Ok(true) => Local::Present,
                        _ => Local::Absent,
                    }
                };
                if let Some(job) = self.jobs.get_mut(&root) {
                    job.fetch.handle_local(cid, local);
                }
            }
            Action::Request { peer, root, cids, .. } => {
                let Some(p) = net::libp2p_peer(&peer) else { return };
                let req = self.next_req;
                self.next_req += 1;
                self.reqs.insert(req, (root, cids.len()));
                let link = self.link(p);
                let frame = Frame::Want {
                    req,
                    root: root.to_bytes(),
                    cids: cids.iter().map(Cid::to_bytes).collect(),
                };
                if !link.send(frame) {
                    self.links.remove(&p);
                    if let Some(job) = self.jobs.get_mut(&root) {
                        job.fetch.peer_gone(&peer);
                    }
                }
            }
            Action::Store { cid, bytes, .. } => {
                let output = self.jobs.get_mut(&root).and_then(|j| j.output.as_mut());
                let place = output.and_then(|o| o.on_block(&cid, &bytes));
                let job = StoreJob::Block { cid, bytes, place };
                // Backpressure: the store thread is the one place blocks become durable.
                if let Err(std_mpsc::TrySendError::Full(job)) = self.store_tx.try_send(job) {
                    let tx = self.store_tx.clone();
                    tokio::task::block_in_place(|| {
                        let _ = tx.send(job);
                    });
                }
            }
            Action::Penalize { peer, reason, disconnect } => {
                tracing::warn!(peer = ?net::libp2p_peer(&peer), ?reason, disconnect, "peer penalised");
                if reason == fetch::Penalty::Corrupt {
                    self.metrics.corrupt_blocks.inc();
                }
                if disconnect && let Some(p) = net::libp2p_peer(&peer) {
                    self.metrics.peers_disconnected.inc();
                    let _ = self.swarm.disconnect_peer_id(p);
                    self.links.remove(&p);
                }
            }
            Action::WhoHas { root } => {
                let peers: Vec<PeerId> = self.connected.keys().copied().collect();
                for p in peers {
                    self.send_who_has(p, root);
                }
            }
            Action::Complete { root, kind, len } => {
                if let Some(job) = self.jobs.get_mut(&root) {
                    job.storing = true;
                }
                let record = RootRecord {
                    kind: kind.to_string(),
                    len,
                    chunks: 0,
                    hole_bytes: 0,
                    added_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    name: "fetched".into(),
                    source: None,
                };
                let tx = self.store_tx.clone();
                tokio::task::block_in_place(|| {
                    let _ = tx.send(StoreJob::Root { root, record });
                });
            }
            Action::Failed { root, reason } => {
                if let Some(job) = self.jobs.remove(&root) {
                    let update = self.update_of(&job, "failed", Some(reason));
                    for w in &job.waiters {
                        let _ = w.try_send(update.clone());
                    }
                }
            }
        }
    }
}

/// Most pins the replication worker plans for (see [`Daemon::replicate`]).
const REPLICATION_PINS_MAX: usize = 100_000;

/// Most bytes of log entries in one follow answer (the follower asks again for the rest).
const FOLLOW_DELTA_BYTES: u64 = 8 << 20;

/// Objects younger than this are never evicted.
const EVICT_MIN_AGE_MS: u64 = 10_000;

/// Evicts cached roots oldest first down to the low watermark, then collects garbage.
fn evict(
    store: &Store,
    keep: &BTreeSet<Vec<u8>>,
    used: u64,
    capacity: u64,
    marks: mycel_policy::budget::Watermarks,
    metrics: &Metrics,
) -> Result<(), crate::store::StoreError> {
    let objects: Vec<mycel_policy::budget::Cached> = store
        .roots()?
        .into_iter()
        .map(|(cid, r)| mycel_policy::budget::Cached {
            root: cid.to_bytes().to_vec(),
            // Shared blocks make this an upper bound; the pass repeats until under the mark.
            bytes: r.len.saturating_sub(r.hole_bytes),
            last_used_ms: r.added_ms,
            // Just added or fetched (a reader may still be restoring it): kept a while.
            pinned: keep.contains(cid.to_bytes().as_slice())
                || r.name == "cluster-state"
                || unix_ms().saturating_sub(r.added_ms) < EVICT_MIN_AGE_MS,
        })
        .collect();
    let plan = mycel_policy::budget::evict(&objects, used, capacity, marks);
    if plan.full {
        tracing::warn!("store above its high watermark with pinned content alone");
    }
    if plan.evict.is_empty() {
        return Ok(());
    }
    for root in &plan.evict {
        if let Ok(cid) = Cid::from_bytes(root)
            && store.remove_root(&cid)?
        {
            tracing::info!(%cid, "evicted from cache (storage budget)");
            metrics.evictions.inc();
        }
    }
    let report = store.gc()?;
    tracing::info!(removed_blocks = report.removed_blocks, "eviction: garbage collected");
    Ok(())
}

/// Free bytes on the filesystem holding `path` (0 if unknown).
fn fs_free_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return 0 };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by statvfs on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    st.f_bavail.saturating_mul(st.f_frsize)
}

/// The store thread: appends fetched blocks and commits them in groups (by size, or as soon
/// as the queue runs dry), so the writer is free for adds in between.
fn store_worker(store: &Store, rx: &std_mpsc::Receiver<StoreJob>, done: &mpsc::Sender<StoreDone>) {
    const GROUP_BYTES: u64 = 32 << 20;
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut w = match store.writer() {
            Ok(w) => w,
            Err(e) => {
                let _ = done.blocking_send(StoreDone::Error(e.to_string()));
                continue;
            }
        };
        let mut job = Some(first);
        let mut bytes = 0u64;
        let mut finished: Vec<Cid> = Vec::new();
        while let Some(j) = job.take() {
            match j {
                StoreJob::Block { cid, bytes: b, place } => {
                    bytes += b.len() as u64;
                    if let Err(e) = w.put(cid, &b) {
                        let _ = done.blocking_send(StoreDone::Error(e.to_string()));
                    }
                    if let Some(place) = place {
                        place.write(cid, &b);
                    }
                }
                StoreJob::Root { root, record } => {
                    w.add_root(root, record);
                    finished.push(root);
                }
                StoreJob::Namespace { root, namespace } => w.set_namespace(root, &namespace),
            }
            if bytes >= GROUP_BYTES || !finished.is_empty() {
                break;
            }
            job = rx.recv_timeout(Duration::from_millis(20)).ok();
        }
        match w.commit() {
            Ok(()) => {
                for root in finished {
                    let _ = done.blocking_send(StoreDone::Complete(root));
                }
            }
            Err(e) => {
                for root in finished {
                    let _ = done.blocking_send(StoreDone::Failed(root, e.to_string()));
                }
                let _ = done.blocking_send(StoreDone::Error(e.to_string()));
            }
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Daemon {
    /// The committed configuration this node knows.
    fn cluster_state(&self) -> &ClusterState {
        // A new manager's log starts empty: until it catches up, the configuration it
        // followed as a member is the newer one.
        match &self.core {
            Some(c) if c.state().applied_index >= self.followed.applied_index => c.state(),
            _ => &self.followed,
        }
    }

    fn in_cluster(&self) -> bool {
        self.cluster_state().cluster_id.is_some()
    }

    fn fatal(&mut self, why: &str) {
        // A failed fsync of the Raft log: what was acknowledged may be lost. Fail-stop.
        tracing::error!("fatal: {why}; stopping");
        std::process::exit(crate::cli::EXIT_STORE.into());
    }

    fn raft_log_path(&self) -> std::path::PathBuf {
        self.dir.path.join("raft.redb")
    }

    /// Resumes cluster membership from disk, or starts a pending join.
    fn start_cluster(&mut self) -> Result<(), String> {
        let path = self.raft_log_path();
        if path.exists() {
            let log = RedbLog::open(&path)?;
            if let Some(b) = log.get_meta("followed_state")?
                && let Ok(s) = ClusterState::decode(&b)
            {
                self.followed = s;
            }
            let raft_id =
                log.get_meta("raft_id")?.and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
            self.raft_meta = Some(RedbLog::open_shared(&log));
            if let Some(id) = raft_id {
                self.start_core(id, log, Vec::new())?;
            }
        }
        if !self.config.cluster.join.is_empty() && !self.is_cluster_member() {
            let token = TokenText::parse(&self.config.cluster.join)?;
            for a in &token.addrs {
                if let Ok(ma) = a.parse::<Multiaddr>()
                    && let Some(libp2p::multiaddr::Protocol::P2p(p)) = ma.iter().last()
                {
                    self.bootstrap.push((p, ma.clone()));
                    self.members.write().expect("members lock").insert(p);
                }
            }
            self.joining = Some(token);
        }
        self.refresh_members();
        Ok(())
    }

    fn is_cluster_member(&self) -> bool {
        self.cluster_state().members.contains_key(&self.me.to_bytes())
    }

    fn start_core(&mut self, id: u64, log: RedbLog, bootstrap: Vec<u64>) -> Result<(), String> {
        let config = mycel_consensus::Config {
            id,
            tick_ms: self.config.cluster.tick_ms,
            election_ticks: self.config.cluster.election_ticks,
            heartbeat_ticks: 1,
            seed: u64::from_le_bytes(
                self.me.to_bytes()[self.me.to_bytes().len() - 8..].try_into().expect("8"),
            ),
            snapshot_entries: 10_000,
            grace_ms: self.config.cluster.grace_ms,
            ..mycel_consensus::Config::default()
        };
        let core = Core::new(config, log, bootstrap, mycel_consensus::Timestamp(self.ts().0))
            .map_err(|e| e.to_string())?;
        tracing::info!(raft_id = id, "consensus core started");
        self.core = Some(core);
        // Managers let joiners connect; their protocols refuse non-members.
        self.policy.write().expect("gate lock").open = true;
        Ok(())
    }

    fn cluster_init(&mut self, reply: oneshot::Sender<Result<String, String>>) {
        if self.core.is_some() || self.in_cluster() || self.is_cluster_member() {
            let _ = reply.send(Err("this node is already in a cluster".into()));
            return;
        }
        let log = match RedbLog::open(&self.raft_log_path()) {
            Ok(l) => l,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if let Err(e) = log.set_meta("raft_id", &1u64.to_le_bytes()) {
            let _ = reply.send(Err(e));
            return;
        }
        self.raft_meta = Some(RedbLog::open_shared(&log));
        if let Err(e) = self.start_core(1, log, vec![1]) {
            let _ = reply.send(Err(e));
            return;
        }
        if let Some(core) = self.core.as_mut() {
            core.campaign();
        }
        let mut cluster_id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut cluster_id);
        let me = self.my_member(Role::Manager);
        let (tx, rx) = oneshot::channel();
        self.propose(vec![CCommand::InitCluster { cluster_id }, CCommand::AddMember(me)], tx);
        let hexid: String = cluster_id.iter().map(|b| format!("{b:02x}")).collect();
        tokio::spawn(async move {
            let r = match rx.await {
                Ok(Ok((_, Outcome::Applied))) => Ok(hexid),
                Ok(Ok((_, Outcome::Rejected(why)))) => Err(why),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("the daemon stopped".into()),
            };
            let _ = reply.send(r);
        });
    }

    fn my_member(&self, role: Role) -> Member {
        Member {
            peer: self.me.to_bytes(),
            raft_id: 0,
            role,
            zone: self.config.node.zone.clone(),
            tags: self.config.cluster.tags.clone(),
            capacity_bytes: 0,
            addrs: self.id_info().listen_addrs,
        }
    }

    fn token_create(
        &mut self,
        role: Role,
        zone: String,
        ttl_s: u64,
        uses: u32,
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    ) {
        let Some(cluster_id) = self.cluster_state().cluster_id else {
            let _ = reply.send(Err(
                "this node is not in a cluster (run `mycel cluster init` on the first manager)"
                    .into(),
            ));
            return;
        };
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        let hash = *blake3::hash(&secret).as_bytes();
        let expires_ms = unix_ms() + ttl_s * 1000;
        let zone = if zone.is_empty() { self.config.node.zone.clone() } else { zone };
        let mut addrs: Vec<String> = self
            .cluster_state()
            .members
            .values()
            .filter(|m| m.role == Role::Manager)
            .flat_map(|m| m.addrs.iter().take(2).cloned())
            .collect();
        if addrs.is_empty() {
            addrs = self.id_info().listen_addrs;
        }
        let token = TokenText { secret, cluster_id, addrs }.render();
        let (tx, rx) = oneshot::channel();
        self.propose(
            vec![CCommand::CreateToken { hash, role, zone: zone.clone(), expires_ms, uses }],
            tx,
        );
        let hash_hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
        tokio::spawn(async move {
            let r = match rx.await {
                Ok(Ok((_, Outcome::Applied))) => {
                    Ok(serde_json::json!({"token": token, "id": hash_hex,
                    "role": role.as_str(), "zone": zone, "expires_ms": expires_ms, "uses": uses}))
                }
                Ok(Ok((_, Outcome::Rejected(why)))) => Err(why),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("the daemon stopped".into()),
            };
            let _ = reply.send(r);
        });
    }

    /// Proposes commands: directly if this node leads, else to the leader (or any manager,
    /// which answers with who leads). Retried until applied; (PeerId, seq) deduplicates.
    fn propose(&mut self, commands: Vec<CCommand>, reply: cluster::ProposeReply) {
        let seq = self.proposals.next_seq(unix_ms());
        let bytes = cluster::proposal(&self.me, seq, commands);
        self.proposals.local.insert(seq, reply);
        self.send_proposal(seq, bytes);
    }

    fn send_proposal(&mut self, seq: u64, bytes: Vec<u8>) {
        if let Some(core) = self.core.as_mut() {
            match core.propose(bytes.clone()) {
                Ok(()) => return,
                Err(mycel_consensus::ProposeError::NotLeader(_)) => {}
                Err(e) => {
                    if let Some(w) = self.proposals.local.remove(&seq) {
                        let _ = w.send(Err(e.to_string()));
                    }
                    return;
                }
            }
        }
        let req = self.next_req;
        self.next_req += 1;
        self.proposals.forwarded.insert(req, (seq, bytes.clone()));
        self.forwarded_at.insert(req, Instant::now());
        if let Some(target) = self.proposal_target() {
            let link = self.clink(target);
            link.send(ClusterFrame::Propose { req, proposal: bytes });
        }
    }

    /// Whom to send a proposal: the leader if known, else a connected manager, else a
    /// bootstrap peer.
    fn proposal_target(&self) -> Option<PeerId> {
        let state = self.cluster_state();
        if let Some(core) = &self.core
            && let Some(m) = state.member_by_raft_id(core.leader())
            && let Ok(p) = PeerId::from_bytes(&m.peer)
            && p != self.me
        {
            return Some(p);
        }
        let managers: Vec<PeerId> = state
            .members
            .values()
            .filter(|m| m.role == Role::Manager)
            .filter_map(|m| PeerId::from_bytes(&m.peer).ok())
            .filter(|p| *p != self.me && self.connected.contains_key(p))
            .collect();
        if !managers.is_empty() {
            let i = self.rotate.get();
            self.rotate.set(i.wrapping_add(1));
            return Some(managers[i % managers.len()]);
        }
        self.bootstrap.iter().map(|(p, _)| *p).find(|p| self.connected.contains_key(p))
    }

    fn clink(&mut self, peer: PeerId) -> cluster::Link {
        if let Some(l) = self.clinks.get(&peer)
            && !l.is_closed()
        {
            return l.clone();
        }
        let l = cluster::spawn_link(self.control.clone(), peer, self.cluster_tx.clone());
        self.clinks.insert(peer, l.clone());
        l
    }

    fn resolve_local(&mut self, seq: u64, result: Result<(u64, Outcome), String>) {
        if let Some(w) = self.proposals.local.remove(&seq) {
            let _ = w.send(result);
        }
        let reqs: Vec<u64> = self
            .proposals
            .forwarded
            .iter()
            .filter(|(_, (s, _))| *s == seq)
            .map(|(r, _)| *r)
            .collect();
        for r in reqs {
            self.proposals.forwarded.remove(&r);
            self.forwarded_at.remove(&r);
        }
    }

    fn on_cluster(&mut self, inbound: cluster::Inbound) {
        let cluster::Inbound { peer, frame, reply } = inbound;
        let member = self.is_member(&peer);
        match frame {
            ClusterFrame::Raft { msg, from } => {
                if !member {
                    tracing::debug!(%peer, from, "raft message from a non-member dropped");
                    return;
                }
                self.raft_peers.insert(from, peer);
                if let Some(core) = self.core.as_mut()
                    && let Err(e) = core.step(&msg)
                {
                    self.fatal(&e.to_string());
                }
            }
            ClusterFrame::Propose { req, proposal } => {
                let Ok(p) = mycel_consensus::command::Proposal::decode(&proposal) else { return };
                let join_only =
                    p.commands.len() == 1 && matches!(p.commands[0], CCommand::Join { .. });
                let refusal = if !member && !join_only {
                    Some("not a member")
                } else if p.from != peer.to_bytes() {
                    Some("proposal signed for another node")
                } else {
                    None
                };
                if let Some(reason) = refusal {
                    let _ = reply.try_send(ClusterFrame::Proposed {
                        req,
                        index: 0,
                        applied: false,
                        reason: reason.into(),
                    });
                    return;
                }
                let leader = match self.core.as_mut() {
                    Some(core) => match core.propose(proposal) {
                        Ok(()) => {
                            self.proposals.remote.insert((p.from, p.seq), (req, reply));
                            return;
                        }
                        Err(_) => core.leader(),
                    },
                    None => 0,
                };
                let leader_peer = self
                    .cluster_state()
                    .member_by_raft_id(leader)
                    .map(|m| m.peer.clone())
                    .unwrap_or_default();
                let _ = reply.try_send(ClusterFrame::NotLeader { req, leader: leader_peer });
            }
            ClusterFrame::Proposed { req, index, applied, reason } => {
                if let Some((seq, _)) = self.proposals.forwarded.get(&req).cloned() {
                    let outcome =
                        if applied { Outcome::Applied } else { Outcome::Rejected(reason) };
                    self.resolve_local(seq, Ok((index, outcome)));
                }
            }
            ClusterFrame::NotLeader { req, leader } => {
                let Some((_, bytes)) = self.proposals.forwarded.get(&req).cloned() else { return };
                if let Ok(l) = PeerId::from_bytes(&leader)
                    && l != peer
                {
                    self.forwarded_at.insert(req, Instant::now());
                    let link = self.clink(l);
                    link.send(ClusterFrame::Propose { req, proposal: bytes });
                }
                // Otherwise the retry timer tries again once a leader is known.
            }
            ClusterFrame::RttReport { from, mean_rtt_ms } => {
                let now = mycel_consensus::Timestamp(self.ts().0);
                if member && let Some(core) = self.core.as_mut() {
                    core.handle_rtt_report(from, mean_rtt_ms, now);
                }
            }
            ClusterFrame::Follow { since } => {
                if !member {
                    tracing::debug!(%peer, "follow request from a non-member ignored");
                    return;
                }
                // Deltas from the log when it still holds them; the whole state otherwise.
                let deltas = self
                    .core
                    .as_ref()
                    .filter(|_| since > 0)
                    .and_then(|c| c.applied_entries_since(since, FOLLOW_DELTA_BYTES))
                    .filter(|e| !e.is_empty());
                let state = self.cluster_state();
                let frame = if let Some(entries) = deltas {
                    ClusterFrame::Entries { entries }
                } else if state.applied_index > since && state.cluster_id.is_some() {
                    ClusterFrame::State { applied: state.applied_index, state: state.encode() }
                } else {
                    ClusterFrame::State { applied: state.applied_index, state: Vec::new() }
                };
                let _ = reply.try_send(frame);
            }
            ClusterFrame::Entries { entries } => {
                let next = self.followed.applied_index + 1;
                if self.core.is_some() || entries.first().is_none_or(|e| e.0 != next) {
                    return;
                }
                if entries.windows(2).any(|w| w[1].0 != w[0].0 + 1) {
                    tracing::warn!(%peer, "follow entries out of order: ignored");
                    return;
                }
                for (index, data) in &entries {
                    self.followed.apply(*index, data);
                }
                if self.followed_saved.elapsed() >= Duration::from_secs(5)
                    && let Some(meta) = &self.raft_meta
                {
                    self.followed_saved = Instant::now();
                    let _ = meta.set_meta("followed_state", &self.followed.encode());
                }
                self.on_state_changed();
            }
            ClusterFrame::TopologyReport { reports } => {
                self.on_topology_report(peer, member, reports);
            }
            ClusterFrame::State { applied, state } => {
                if self.core.is_some() || state.is_empty() || applied <= self.followed.applied_index
                {
                    return;
                }
                if let Ok(s) = ClusterState::decode(&state) {
                    self.followed = s;
                    if let Some(meta) = &self.raft_meta {
                        let _ = meta.set_meta("followed_state", &state);
                    }
                    self.on_state_changed();
                }
            }
        }
    }

    /// Members changed: update the gate, and start the core if this node became a manager.
    fn on_state_changed(&mut self) {
        self.refresh_members();
        if self.core.is_none()
            && let Some(me) = self.cluster_state().members.get(&self.me.to_bytes()).cloned()
        {
            self.joining = None;
            if me.role == Role::Manager {
                // The log file may already be open for the followed state: share it.
                let opened = match &self.raft_meta {
                    Some(meta) => Ok(RedbLog::open_shared(meta)),
                    None => RedbLog::open(&self.raft_log_path()),
                }
                .and_then(|log| {
                    log.set_meta("raft_id", &me.raft_id.to_le_bytes())?;
                    Ok(log)
                });
                match opened.and_then(|log| {
                    if self.raft_meta.is_none() {
                        self.raft_meta = Some(RedbLog::open_shared(&log));
                    }
                    self.start_core(me.raft_id, log, Vec::new())
                }) {
                    Ok(()) => {}
                    Err(e) => tracing::error!("starting the consensus core: {e}"),
                }
            } else if self.raft_meta.is_none() {
                match RedbLog::open(&self.raft_log_path()) {
                    Ok(log) => self.raft_meta = Some(log),
                    Err(e) => tracing::warn!("opening the cluster log: {e}"),
                }
                if let Some(meta) = &self.raft_meta {
                    let _ = meta.set_meta("followed_state", &self.followed.encode());
                }
            }
        }
    }

    /// The gate follows the committed members (plus the static list), and removed members
    /// are refused.
    fn refresh_members(&mut self) {
        let mut new = parse_members(&self.config, self.me).unwrap_or_default();
        new.extend(cluster::member_peers(self.cluster_state()));
        if let Some(t) = &self.joining {
            for a in &t.addrs {
                if let Ok(ma) = a.parse::<Multiaddr>()
                    && let Some(libp2p::multiaddr::Protocol::P2p(p)) = ma.iter().last()
                {
                    new.insert(p);
                }
            }
        }
        let old = self.members.read().expect("members lock").clone();
        self.apply_members(new, &old);
        let access = Access::new(self.cluster_state().clone(), self.in_cluster());
        *self.access.write().expect("access lock") = Arc::new(access);
        // Hear every zone's announcements: placement spans zones.
        let zones: BTreeSet<String> =
            self.cluster_state().members.values().map(|m| m.zone.clone()).collect();
        for z in zones {
            if !self.zones.contains(&z) {
                let topic = net::announce_topic(&z);
                if self.swarm.behaviour_mut().gossipsub.subscribe(&topic).is_ok() {
                    self.zones.insert(z);
                }
            }
        }
        let removed: Vec<PeerId> = self
            .cluster_state()
            .removed
            .iter()
            .filter_map(|b| PeerId::from_bytes(b).ok())
            .collect();
        for p in removed {
            self.policy.write().expect("gate lock").blocked.insert(p);
            if self.connected.contains_key(&p) {
                let _ = self.swarm.disconnect_peer_id(p);
            }
        }
        // Learn members' addresses, so Raft messages and fetches can reach them.
        let addrs: Vec<(PeerId, Vec<String>)> = self
            .cluster_state()
            .members
            .values()
            .filter_map(|m| PeerId::from_bytes(&m.peer).ok().map(|p| (p, m.addrs.clone())))
            .collect();
        for (p, list) in addrs {
            if p == self.me {
                continue;
            }
            for a in list {
                if let Ok(ma) = a.parse::<Multiaddr>() {
                    self.swarm.add_peer_address(p, ma.clone());
                    self.learn_addr(p, &ma, mycel_core::addrs::Source::Committed);
                }
            }
        }
        // Removed members' addresses are forgotten.
        let members = self.members.read().expect("members lock").clone();
        self.book.retain(|p| net::libp2p_peer(p).is_some_and(|p| members.contains(&p)));
    }

    fn apply_members(&mut self, new: BTreeSet<PeerId>, old: &BTreeSet<PeerId>) {
        *self.members.write().expect("members lock") = new.clone();
        let open = {
            let mut policy = self.policy.write().expect("gate lock");
            policy.allowed = new.clone();
            policy.open
        };
        for p in old.difference(&new) {
            if !open {
                let _ = self.swarm.disconnect_peer_id(*p);
            }
        }
    }

    fn cluster_housekeeping(&mut self) {
        let now = Instant::now();
        // Retry forwarded proposals (dedup by (PeerId, seq) makes this safe).
        let stale: Vec<u64> = self
            .forwarded_at
            .iter()
            .filter(|(_, t)| now.duration_since(**t) > Duration::from_millis(1500))
            .map(|(r, _)| *r)
            .collect();
        for req in stale {
            let Some((seq, bytes)) = self.proposals.forwarded.remove(&req) else {
                self.forwarded_at.remove(&req);
                continue;
            };
            self.forwarded_at.remove(&req);
            self.send_proposal(seq, bytes);
        }
        if now < self.next_follow {
            return;
        }
        self.next_follow = now + Duration::from_millis(500);
        // Stay connected to every manager (Raft needs manager-to-manager links; members need
        // a manager to follow).
        let managers: Vec<PeerId> = self
            .cluster_state()
            .members
            .values()
            .filter(|m| m.role == Role::Manager && !m.addrs.is_empty())
            .filter_map(|m| PeerId::from_bytes(&m.peer).ok())
            .filter(|p| *p != self.me && !self.connected.contains_key(p))
            .collect();
        for p in managers {
            self.dial_member(p);
        }
        // A pending join: present the token.
        if let Some(token) = self.joining.clone()
            && self.proposals.local.is_empty()
            && now >= self.next_join
            && let Some(target) = self.proposal_target()
        {
            self.next_join = now + Duration::from_secs(5);
            let _ = target;
            let (tx, rx) = oneshot::channel();
            let me = self.my_member(Role::Edge);
            self.propose(
                vec![CCommand::Join {
                    secret: token.secret,
                    peer: me.peer,
                    addrs: me.addrs,
                    tags: me.tags,
                    capacity_bytes: 0,
                    now_ms: unix_ms(),
                }],
                tx,
            );
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok((_, Outcome::Applied))) => {
                        tracing::info!("joined the cluster; following")
                    }
                    Ok(Ok((_, Outcome::Rejected(why)))) => tracing::error!("join refused: {why}"),
                    Ok(Err(e)) => tracing::warn!("join: {e}"),
                    Err(_) => {}
                }
            });
        }
        // Keep the committed addresses current (a restart on another port).
        if let Some(mine) = self.cluster_state().members.get(&self.me.to_bytes()).cloned() {
            let now_addrs = self.id_info().listen_addrs;
            if !now_addrs.is_empty() && mine.addrs != now_addrs && self.proposals.local.is_empty() {
                let (tx, _rx) = oneshot::channel();
                self.propose(
                    vec![CCommand::UpdateMember {
                        peer: mine.peer,
                        addrs: now_addrs,
                        tags: mine.tags,
                        capacity_bytes: mine.capacity_bytes,
                    }],
                    tx,
                );
            }
        }
        // Members that are not managers follow the configuration: ask every connected
        // manager (a dead one whose connection has not timed out yet must not stall them),
        // and keep the newest answer.
        if self.core.is_none() && (self.in_cluster() || self.joining.is_some()) {
            let since = self.followed.applied_index;
            let mut targets: Vec<PeerId> = self
                .cluster_state()
                .members
                .values()
                .filter(|m| m.role == Role::Manager)
                .filter_map(|m| PeerId::from_bytes(&m.peer).ok())
                .filter(|p| *p != self.me && self.connected.contains_key(p))
                .collect();
            // Knowing no manager yet: every connected bootstrap peer (one that has not caught
            // up on this node's join ignores the request, and asking only the first one could
            // wait on it for as long as it lags).
            if targets.is_empty() {
                targets = self
                    .bootstrap
                    .iter()
                    .map(|(p, _)| *p)
                    .filter(|p| *p != self.me && self.connected.contains_key(p))
                    .collect();
            }
            if targets.is_empty()
                && let Some(t) = self.proposal_target()
            {
                targets.push(t);
            }
            // No answer for a while: the streams may be wedged; open fresh ones.
            if self.follow_answered.elapsed() > Duration::from_secs(3) {
                for t in &targets {
                    self.clinks.remove(t);
                }
                self.follow_answered = Instant::now();
            }
            for target in targets {
                let link = self.clink(target);
                link.send(ClusterFrame::Follow { since });
            }
        }
    }

    fn drive_cluster(&mut self) {
        // A fatal error inside a call that returns none (a proposal's sync failing): stop.
        if let Some(e) = self.core.as_ref().and_then(Core::failed).cloned() {
            self.fatal(&e.to_string());
            return;
        }
        let mut changed = false;
        while let Some(out) = self.core.as_mut().and_then(Core::poll_output) {
            match out {
                COutput::Send { to, msg } => {
                    let peer = self
                        .cluster_state()
                        .member_by_raft_id(to)
                        .or_else(|| self.followed.member_by_raft_id(to))
                        .and_then(|m| PeerId::from_bytes(&m.peer).ok())
                        .or_else(|| self.raft_peers.get(&to).copied());
                    let from = self.core.as_ref().map_or(0, Core::id);
                    match peer {
                        Some(p) if p != self.me => {
                            let link = self.clink(p);
                            if !link.send(ClusterFrame::Raft { from, msg }) {
                                self.clinks.remove(&p);
                                if let Some(core) = self.core.as_mut() {
                                    core.report_unreachable(to);
                                }
                            }
                        }
                        _ => {
                            tracing::debug!(to, "no peer known for raft id");
                            if let Some(core) = self.core.as_mut() {
                                core.report_unreachable(to);
                            }
                        }
                    }
                }
                COutput::Applied { index, from, seq, outcome } => {
                    changed = true;
                    if from == self.me.to_bytes() {
                        self.resolve_local(seq, Ok((index, outcome.clone())));
                    }
                    if let Some((req, reply)) = self.proposals.remote.remove(&(from, seq)) {
                        let (applied, reason) = match &outcome {
                            Outcome::Applied => (true, String::new()),
                            Outcome::Rejected(r) => (false, r.clone()),
                        };
                        let _ =
                            reply.try_send(ClusterFrame::Proposed { req, index, applied, reason });
                    }
                }
                COutput::RoleChanged { term, leader, leading } => {
                    tracing::info!(term, leader, leading, "raft role changed");
                    changed = true;
                }
                COutput::Propose(commands) => {
                    tracing::info!(?commands, "the quorum core proposes");
                    // A decision of the leader's core (replace a lost manager): proposed under
                    // this node's identity; the outcome is in the log.
                    let (tx, _rx) = oneshot::channel();
                    self.propose(commands, tx);
                }
                COutput::ReportRtt { to, mean_rtt_ms } => {
                    let peer = self
                        .cluster_state()
                        .member_by_raft_id(to)
                        .and_then(|m| PeerId::from_bytes(&m.peer).ok());
                    let from = self.core.as_ref().map_or(0, Core::id);
                    if let Some(p) = peer.filter(|p| *p != self.me) {
                        let link = self.clink(p);
                        link.send(ClusterFrame::RttReport { from, mean_rtt_ms });
                    }
                }
                COutput::ReadReady { ctx, index } => {
                    if let Some(r) = self.reads.get_mut(&ctx) {
                        r.0 = index;
                    }
                }
                COutput::StoreBlocks(blocks) => {
                    let root = blocks.last().map(|b| b.0);
                    for (cid, bytes) in blocks {
                        let _ = self.store_tx.send(StoreJob::Block { cid, bytes, place: None });
                    }
                    if let Some(root) = root {
                        let record = RootRecord {
                            kind: "file".into(),
                            len: 0,
                            chunks: 0,
                            hole_bytes: 0,
                            added_ms: unix_ms(),
                            name: "cluster-state".into(),
                            source: None,
                        };
                        let _ = self.store_tx.send(StoreJob::Root { root, record });
                    }
                }
                COutput::NeedState(cid) => {
                    self.awaiting_state = Some(cid);
                    let (tx, _rx) = mpsc::channel(1);
                    self.start_fetch(cid, Some(tx));
                }
            }
        }
        if changed {
            self.on_state_changed();
        }
        // Serve reads whose index is applied; past 5 s without a quorum, answer locally and
        // say so.
        let applied = self.cluster_state().applied_index;
        let ready: Vec<Vec<u8>> = self
            .reads
            .iter()
            .filter(|(_, (i, t, _))| *i <= applied || t.elapsed() > Duration::from_secs(2))
            .map(|(k, _)| k.clone())
            .collect();
        for k in ready {
            if let Some((index, _, reply)) = self.reads.remove(&k) {
                let mut view = self.cluster_view();
                if index > applied {
                    view["stale"] = serde_json::json!(true);
                }
                let _ = reply.send(view);
            }
        }
    }

    fn cluster_view(&self) -> serde_json::Value {
        let state = self.cluster_state();
        let (voters, learners, leader) = match &self.core {
            Some(c) => {
                let (v, l) = c.conf();
                (v, l, c.leader())
            }
            None => (Vec::new(), Vec::new(), 0),
        };
        let members: Vec<serde_json::Value> = state
            .members
            .values()
            .map(|m| {
                let peer = PeerId::from_bytes(&m.peer).map(|p| p.to_string()).unwrap_or_default();
                let raft = if self.core.is_none() {
                    "unknown"
                } else if m.raft_id == leader {
                    "leader"
                } else if voters.contains(&m.raft_id) {
                    "voter"
                } else if learners.contains(&m.raft_id) {
                    "learner"
                } else {
                    "none"
                };
                let connected = PeerId::from_bytes(&m.peer).map(|p| p == self.me || self.connected.contains_key(&p)).unwrap_or(false);
                serde_json::json!({"peer_id": peer, "raft_id": m.raft_id, "role": m.role.as_str(),
                    "zone": m.zone, "tags": m.tags, "addrs": m.addrs, "raft": raft, "connected": connected})
            })
            .collect();
        let tokens: Vec<serde_json::Value> = state
            .tokens
            .iter()
            .map(|(h, t)| {
                let id: String = h.iter().take(8).map(|b| format!("{b:02x}")).collect();
                serde_json::json!({"id": id, "role": t.role.as_str(), "zone": t.zone, "expires_ms": t.expires_ms, "uses": t.uses})
            })
            .collect();
        serde_json::json!({
            "cluster_id": state.cluster_id.map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            "applied_index": state.applied_index,
            "leader": leader,
            "term": self.core.as_ref().map(Core::term),
            "this_node": self.me.to_string(),
            "manager": self.core.is_some(),
            "members": members,
            "tokens": tokens,
            "pins": state.pins.len(),
        })
    }
}
