//! The management quorum in the daemon's loop: the consensus core on managers, following
//! the configuration elsewhere, proposals, joins and tokens, and the gate kept in step with
//! the committed members.

use super::*;
use mycel_core::cluster::client::{Output as ClientOutput, Targets};

impl Daemon {
    /// The committed configuration this node knows.
    pub(super) fn cluster_state(&self) -> &ClusterState {
        // A new manager's log starts empty: until it catches up, the configuration it
        // followed as a member is the newer one.
        match &self.core {
            Some(c) if c.state().applied_index >= self.follower.state().applied_index => c.state(),
            _ => self.follower.state(),
        }
    }

    pub(super) fn in_cluster(&self) -> bool {
        self.cluster_state().cluster_id.is_some()
    }

    pub(super) fn fatal(&mut self, why: &str) {
        // A failed fsync of the Raft log: what was acknowledged may be lost. Fail-stop.
        tracing::error!("fatal: {why}; stopping");
        std::process::exit(crate::cli::EXIT_STORE.into());
    }

    pub(super) fn raft_log_path(&self) -> std::path::PathBuf {
        self.dir.path.join("raft.redb")
    }

    /// Resumes cluster membership from disk, or starts a pending join.
    pub(super) fn start_cluster(&mut self) -> Result<(), String> {
        let path = self.raft_log_path();
        if path.exists() {
            let log = RedbLog::open(&path)?;
            if let Some(b) = log.get_meta("followed_state")?
                && let Ok(s) = ClusterState::decode(&b)
            {
                self.follower = Follower::new(s, FollowConfig::default());
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

    pub(super) fn is_cluster_member(&self) -> bool {
        self.cluster_state().members.contains_key(&self.me.to_bytes())
    }

    pub(super) fn start_core(
        &mut self,
        id: u64,
        log: RedbLog,
        bootstrap: Vec<u64>,
    ) -> Result<(), String> {
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

    pub(super) fn cluster_init(&mut self, reply: oneshot::Sender<Result<String, String>>) {
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

    pub(super) fn my_member(&self, role: Role) -> Member {
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

    pub(super) fn token_create(
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

    /// Proposes commands through the node core's cluster client (to this node's consensus
    /// core when it leads, else forwarded); `reply` hears the outcome.
    pub(super) fn propose(&mut self, commands: Vec<CCommand>, reply: cluster::ProposeReply) {
        let targets = self.targets();
        let now = self.ts();
        let seq = self.client.propose(commands, self.core.as_mut(), &targets, now);
        self.proposal_waiters.insert(seq, reply);
        self.drain_client();
    }

    /// The committed managers this node is connected to (itself excluded).
    pub(super) fn connected_managers(&self) -> Vec<PeerId> {
        self.cluster_state()
            .members
            .values()
            .filter(|m| m.role == Role::Manager)
            .filter_map(|m| PeerId::from_bytes(&m.peer).ok())
            .filter(|p| *p != self.me && self.connected.contains_key(p))
            .collect()
    }

    /// Whom proposals and follow requests can go to now.
    pub(super) fn targets(&self) -> Targets {
        let me = net::core_peer(&self.me);
        let state = self.cluster_state();
        let leader =
            self.core.as_ref().and_then(|core| Targets::leader_in(state, core.leader(), &me));
        let connected = |p: &&PeerId| **p != self.me && self.connected.contains_key(p);
        let managers = self.connected_managers().iter().map(net::core_peer).collect();
        let bootstrap =
            self.bootstrap.iter().map(|(p, _)| p).filter(connected).map(net::core_peer).collect();
        Targets { leader, managers, bootstrap }
    }

    /// Whom to ask when one peer is needed: the leader if known, else a connected manager
    /// (the next each time), else a bootstrap peer.
    pub(super) fn proposal_target(&mut self) -> Option<PeerId> {
        let me = net::core_peer(&self.me);
        self.targets().pick(&me, &mut self.rotate).and_then(|p| net::libp2p_peer(&p))
    }

    /// Carries out the cluster client's outputs.
    pub(super) fn drain_client(&mut self) {
        while let Some(out) = self.client.poll_output() {
            self.client_output(out);
        }
    }

    fn client_output(&mut self, out: ClientOutput) {
        match out {
            ClientOutput::Send { to, frame } => {
                if let Some(p) = net::libp2p_peer(&to) {
                    self.clink(p).send(frame);
                }
            }
            ClientOutput::Resolved { seq, result } => {
                if let Some(w) = self.proposal_waiters.remove(&seq) {
                    let _ = w.send(result.map_err(|e| e.to_string()));
                }
            }
        }
    }

    pub(super) fn clink(&mut self, peer: PeerId) -> cluster::Link {
        if let Some(l) = self.clinks.get(&peer)
            && !l.is_closed()
        {
            return l.clone();
        }
        let l = cluster::spawn_link(self.control.clone(), peer, self.cluster_tx.clone());
        self.clinks.insert(peer, l.clone());
        l
    }

    pub(super) fn on_cluster(&mut self, inbound: cluster::Inbound) {
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
                let from = net::core_peer(&peer);
                self.client.handle_propose(from, member, req, proposal, self.core.as_mut());
                // Immediate answers (refusals, NotLeader) go back on the asking stream.
                while let Some(out) = self.client.poll_output() {
                    match out {
                        ClientOutput::Send { to, frame } if to == from => {
                            let _ = reply.try_send(frame);
                        }
                        other => self.client_output(other),
                    }
                }
            }
            ClusterFrame::Proposed { req, index, applied, reason } => {
                self.client.handle_proposed(net::core_peer(&peer), req, index, applied, reason);
                self.drain_client();
            }
            ClusterFrame::NotLeader { req, leader } => {
                self.client.handle_not_leader(net::core_peer(&peer), req, &leader);
                self.drain_client();
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
                let config = FollowConfig::default();
                let frame =
                    follow::answer(self.core.as_ref(), self.cluster_state(), since, &config);
                let _ = reply.try_send(frame);
            }
            ClusterFrame::Entries { entries } => {
                if self.core.is_some() {
                    return;
                }
                match self.follower.handle_entries(&net::core_peer(&peer), &entries) {
                    Ok(true) => {
                        if self.followed_saved.elapsed() >= Duration::from_secs(5)
                            && let Some(meta) = &self.raft_meta
                        {
                            self.followed_saved = Instant::now();
                            let _ =
                                meta.set_meta("followed_state", &self.follower.state().encode());
                        }
                        self.on_state_changed();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(%peer, "follow entries refused: {e}"),
                }
            }
            ClusterFrame::TopologyReport { reports } => {
                self.on_topology_report(peer, member, reports);
            }
            ClusterFrame::State { applied, state } => {
                if self.core.is_some() {
                    return;
                }
                match self.follower.handle_state(&net::core_peer(&peer), applied, &state) {
                    Ok(true) => {
                        if let Some(meta) = &self.raft_meta {
                            let _ = meta.set_meta("followed_state", &state);
                        }
                        self.on_state_changed();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(%peer, "follow state refused: {e}"),
                }
            }
        }
    }

    /// Members changed: update the gate, and start the core if this node became a manager.
    pub(super) fn on_state_changed(&mut self) {
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
                    let _ = meta.set_meta("followed_state", &self.follower.state().encode());
                }
            }
        }
    }

    /// The gate follows the committed members (plus the static list), and removed members
    /// are refused.
    pub(super) fn refresh_members(&mut self) {
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

    pub(super) fn apply_members(&mut self, new: BTreeSet<PeerId>, old: &BTreeSet<PeerId>) {
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

    pub(super) fn cluster_housekeeping(&mut self) {
        let now = Instant::now();
        let targets = self.targets();
        let ts = self.ts();
        self.client.handle_timeout(self.core.as_mut(), &targets, ts);
        self.drain_client();
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
            && self.client.pending() == 0
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
            if !now_addrs.is_empty() && mine.addrs != now_addrs && self.client.pending() == 0 {
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
            // Knowing no manager yet: every connected bootstrap peer (one that has not caught
            // up on this node's join ignores the request, and asking only the first one could
            // wait on it for as long as it lags); else whoever a proposal would go to.
            let all = self.targets();
            let asked = if all.managers.is_empty() { &all.bootstrap } else { &all.managers };
            let mut targets: Vec<PeerId> = asked.iter().filter_map(net::libp2p_peer).collect();
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
            let targets: Vec<mycel_core::PeerId> = targets.iter().map(net::core_peer).collect();
            let ts = self.ts();
            for (to, frame) in self.follower.poll_requests(ts, &targets) {
                if let Some(p) = net::libp2p_peer(&to) {
                    self.clink(p).send(frame);
                }
            }
        }
    }

    pub(super) fn drive_cluster(&mut self) {
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
                        .or_else(|| self.follower.state().member_by_raft_id(to))
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
                    self.client.handle_applied(index, &from, seq, &outcome);
                    self.drain_client();
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

    pub(super) fn cluster_view(&self) -> serde_json::Value {
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
