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

use crate::datadir::{DataDir, NodeConfig};
use crate::metrics::Metrics;
use crate::net::exchange::{self, NetEvent, PeerLink, ServeCtx};
use crate::net::limit::Limiter;
use crate::net::{self, Behaviour, BehaviourEvent};
use crate::store::{RootRecord, Store};

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
    },
    /// Re-read `[cluster] members` from the config.
    ReloadMembers(oneshot::Sender<Result<usize, String>>),
}

/// Options of `mycel run` beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Test only: serve corrupt chunks.
    pub test_corrupt_serve: bool,
}

enum StoreJob {
    Block { cid: Cid, bytes: Vec<u8> },
    Root { root: Cid, record: RootRecord },
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
}

#[derive(Debug, Default, Clone, Serialize)]
struct PeerInfo {
    addrs: Vec<String>,
    rtt_ms: Option<f64>,
    agent: Option<String>,
}

struct Daemon {
    me: PeerId,
    dir: DataDir,
    config: NodeConfig,
    store: Arc<Store>,
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    links: BTreeMap<PeerId, PeerLink>,
    connected: BTreeMap<PeerId, PeerInfo>,
    members: Arc<RwLock<BTreeSet<PeerId>>>,
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
    let mut swarm = net::build_swarm(keypair, &mut registry).map_err(|e| setup(&e))?;
    let p2p_metrics = libp2p::metrics::Metrics::new(&mut registry);
    let members = Arc::new(RwLock::new(parse_members(&config, me).map_err(|e| setup(&e))?));
    for m in members.read().expect("members lock").iter() {
        swarm.behaviour_mut().gate.allow_peer(*m);
    }
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
    let serve_ctx = ServeCtx {
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
    let seed =
        u64::from_le_bytes(me.to_bytes()[me.to_bytes().len() - 8..].try_into().expect("8 bytes"));
    let mut d = Daemon {
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
    };
    tracing::info!(peer_id = %d.me, zone = %d.config.node.zone, "mycel daemon starting");
    d.dial_bootstrap();
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
    drop(d.store_tx);
    api.shutdown().await;
    Ok(())
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
        let new = parse_members(&config, self.me)?;
        let old = std::mem::replace(&mut *self.members.write().expect("members lock"), new.clone());
        for p in old.difference(&new) {
            self.swarm.behaviour_mut().gate.disallow_peer(*p);
            let _ = self.swarm.disconnect_peer_id(*p);
        }
        for p in new.difference(&old) {
            self.swarm.behaviour_mut().gate.allow_peer(*p);
        }
        self.config.cluster = config.cluster;
        self.config.node.bootstrap = config.node.bootstrap;
        tracing::info!(members = new.len(), "members reloaded");
        self.dial_bootstrap();
        Ok(new.len())
    }

    fn dial_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap.clone() {
            if !self.connected.contains_key(&peer)
                && self.is_member(&peer)
                && let Err(e) = self.swarm.dial(addr.clone())
            {
                tracing::debug!(%peer, "dial {addr}: {e}");
            }
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&ev);
        match &ev {
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
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection refused: {error}");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
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
        let same_zone = ann.zone == self.config.node.zone;
        for job in self.jobs.values_mut() {
            let root = job.fetch.root().to_bytes();
            if ann.roots.contains(&root) || ann.partial.iter().any(|p| p.root == root) {
                job.fetch.add_peer(net::core_peer(&source), same_zone);
            }
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
                        if !cid.matches(&bytes) {
                            self.metrics.corrupt_blocks.inc();
                        }
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
                    Frame::Refused { req, reason } => {
                        tracing::warn!(%peer, "refused: {reason}");
                        let root = self
                            .reqs
                            .remove(&req)
                            .map(|r| r.0)
                            .or_else(|| self.who_has.remove(&req));
                        if let Some(job) = root.and_then(|r| self.jobs.get_mut(&r)) {
                            job.fetch.handle_refused(cp);
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
            Command::Fetch { root, updates } => self.start_fetch(root, updates),
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
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }

    fn start_fetch(&mut self, root: Cid, updates: mpsc::Sender<FetchUpdate>) {
        if let Ok(Some(_)) = self.store.root(&root) {
            let _ = updates.try_send(FetchUpdate {
                total_bytes: 0,
                done_bytes: 0,
                by_peer: BTreeMap::new(),
                peers: 0,
                rerequested: 0,
                state: "complete".into(),
                error: None,
            });
            return;
        }
        if let Some(job) = self.jobs.get_mut(&root) {
            job.waiters.push(updates);
            return;
        }
        let config = fetch::Config {
            timeout_ms: self.config.node.request_timeout_ms,
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
        self.jobs.insert(root, Job { fetch: f, waiters: vec![updates], storing: false });
        self.metrics.fetches_active.set(self.jobs.len() as i64);
        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
        for p in peers {
            self.send_who_has(p, root);
        }
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
        }
    }

    fn on_store_done(&mut self, done: StoreDone) {
        match done {
            StoreDone::Complete(root) => {
                if let Some(job) = self.jobs.remove(&root) {
                    let update = self.update_of(&job, "complete", None);
                    for w in &job.waiters {
                        let _ = w.try_send(update.clone());
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
        for job in self.jobs.values_mut() {
            if job.fetch.poll_timeout().is_some_and(|t| t <= now) {
                job.fetch.handle_timeout(now);
            }
        }
        if self.announcer.poll_timeout() <= now {
            self.announce(now);
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
                    if job.waiters.is_empty() && !job.storing {
                        tracing::info!(%root, "fetch abandoned by its requesters");
                        self.jobs.remove(&root);
                        self.reqs.retain(|_, (r, _)| *r != root);
                    }
                }
            }
            self.metrics.fetches_active.set(self.jobs.len() as i64);
            if self.connected.len() < self.bootstrap.len() {
                self.dial_bootstrap();
            }
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
        let holdings = Holdings { complete, partial, load: self.jobs.len() as u32, free_bytes: 0 };
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
        let now = self.ts();
        let roots: Vec<Cid> = self.jobs.keys().copied().collect();
        for root in roots {
            while let Some(action) = self.jobs.get_mut(&root).and_then(|j| j.fetch.poll_action(now))
            {
                self.execute(root, action);
            }
            if let Some(job) = self.jobs.get(&root) {
                job.fetch.check_invariants();
            }
        }
    }

    fn execute(&mut self, root: Cid, action: Action) {
        match action {
            Action::Lookup { cid, need_bytes } => {
                let local = if need_bytes {
                    match self.store.get(&cid) {
                        Ok(Some(b)) => Local::Bytes(b),
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
                let job = StoreJob::Block { cid, bytes };
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
                StoreJob::Block { cid, bytes: b } => {
                    bytes += b.len() as u64;
                    if let Err(e) = w.put(cid, &b) {
                        let _ = done.blocking_send(StoreDone::Error(e.to_string()));
                    }
                }
                StoreJob::Root { root, record } => {
                    w.add_root(root, record);
                    finished.push(root);
                }
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
