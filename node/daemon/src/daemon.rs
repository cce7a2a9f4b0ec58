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
use crate::cluster::{self, ClusterFrame, TokenText};
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
use mycel_core::cluster::follow::{self, Config as FollowConfig, Follower};

mod commands;
mod dial;
mod fetching;
mod quorum;
mod replication;
mod swarm;
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
    follower: Follower,
    clinks: BTreeMap<PeerId, cluster::Link>,
    cluster_tx: mpsc::Sender<cluster::Inbound>,
    /// The node core's cluster client: this node's proposals, and answers to others'.
    client: mycel_core::cluster::client::Client,
    /// Who waits for each of this node's proposals, by sequence.
    proposal_waiters: BTreeMap<u64, cluster::ProposeReply>,
    joining: Option<TokenText>,
    next_follow: Instant,
    awaiting_state: Option<Cid>,
    /// Raft id -> PeerId, learned from messages (a new manager's log may not list members yet).
    raft_peers: BTreeMap<u64, PeerId>,
    /// Rotates requests over managers, so a dead one (whose connection has not timed out
    /// yet) does not swallow every follow request and proposal.
    rotate: usize,
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
            .spawn(move || fetching::store_worker(&store, &store_rx, &done_tx))
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
        follower: Follower::new(ClusterState::default(), FollowConfig::default()),
        clinks: BTreeMap::new(),
        cluster_tx,
        client: mycel_core::cluster::client::Client::new(
            net::core_peer(&me),
            mycel_core::cluster::client::Config::default(),
            unix_ms().saturating_mul(1024),
        ),
        proposal_waiters: BTreeMap::new(),
        joining: None,
        next_follow: Instant::now(),
        awaiting_state: None,
        raft_peers: BTreeMap::new(),
        rotate: 0,
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
        if let Some(t) = self.client.poll_timeout() {
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
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
