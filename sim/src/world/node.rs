//! Driving one simulated node: its timers and housekeeping, announcements and gossip, the
//! consensus core's outputs and the delivery of messages to it.

use super::*;

impl World {
    pub(super) fn on_timer(&mut self, i: usize) {
        let local = self.nodes[i].local(self.now);
        if let Some(c) = self.nodes[i].core.as_mut()
            && c.poll_timeout().0 <= local
        {
            let r = c.handle_timeout(CoreTime(local));
            self.fatal(i, r);
        }
        if !self.nodes[i].live() {
            return;
        }
        if self.nodes[i].kind != Kind::Outsider && self.nodes[i].announcer.poll_timeout().0 <= local
        {
            self.check_claims(i);
            let holdings = self.holdings(i);
            if let Some(a) = self.nodes[i].announcer.handle_timeout(Timestamp(local), &holdings) {
                self.announce(i, &a);
            }
        }
        let due: Vec<Cid> = self.nodes[i]
            .fetches
            .iter()
            .filter(|(_, (f, _))| f.poll_timeout().is_some_and(|t| t.0 <= local))
            .map(|(c, _)| *c)
            .collect();
        for root in due {
            if let Some((f, _)) = self.nodes[i].fetches.get_mut(&root) {
                f.handle_timeout(Timestamp(local));
            }
        }
        if self.nodes[i].next_housekeeping <= local {
            self.nodes[i].next_housekeeping = local + HOUSEKEEPING_MS;
            self.housekeeping(i, local);
        }
        if self.nodes[i].next_plan <= local {
            self.nodes[i].next_plan = local + self.sc.plan_period.0;
            self.replication_plan(i, local);
        }
    }

    pub(super) fn holdings(&self, i: usize) -> Holdings {
        let n = &self.nodes[i];
        let used: u64 = n.store.values().map(|b| b.len() as u64).sum();
        Holdings {
            complete: n.complete.iter().copied().collect(),
            partial: n
                .fetches
                .iter()
                .filter(|(_, (_, p))| *p == Purpose::Replica)
                .map(|(root, (f, _))| {
                    let p = f.progress();
                    Partial {
                        root: root.to_bytes(),
                        done_bytes: p.done_bytes,
                        total_bytes: p.total_bytes,
                    }
                })
                .take(mycel_proto::wire::ANNOUNCE_PARTIAL_MAX)
                .collect(),
            load: n.fetches.len() as u32,
            free_bytes: CAPACITY_BYTES.saturating_sub(used),
            addrs: Vec::new(),
        }
    }

    pub(super) fn announce(&mut self, i: usize, a: &Announcement) {
        let bytes = Rc::new(a.encode());
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        self.record("announce", i as u64, a.seq);
        // Gossip: one delivery event per publish; the mesh carries it to every member.
        let lat = self.sc.links.cross_zone.0.max(self.sc.links.same_zone.0) + 5;
        self.push(self.now + lat, Ev::Gossip { from: i, bytes });
    }

    pub(super) fn on_gossip(&mut self, from: usize, bytes: &[u8]) {
        let Ok(a) = Announcement::decode(bytes) else {
            let now = self.now;
            self.checker.fail(
                now,
                "safety:announce",
                format!("node {from} published an undecodable announcement"),
            );
            return;
        };
        let faulty = self.healed_at.is_none();
        let peer = self.nodes[from].peer;
        for to in 0..self.members {
            if to == from || !self.nodes[to].live() || self.nodes[to].paused_until > self.now {
                continue;
            }
            if self.blocked(from, to) || (faulty && self.loss > 0.0 && self.rng.gen_bool(self.loss))
            {
                continue;
            }
            let local = self.nodes[to].local(self.now);
            let _ = self.nodes[to].directory.handle_announcement(peer, &a, Timestamp(local));
        }
        self.record("gossip", from as u64, a.seq);
    }

    pub(super) fn housekeeping(&mut self, i: usize, local: u64) {
        // Group commit: what was fetched is durable every few rounds (and before the node
        // claims an object).
        if (local / HOUSEKEEPING_MS).is_multiple_of(STORE_SYNC_ROUNDS) {
            self.sync_store(i);
        }
        let n = &mut self.nodes[i];
        if (local / HOUSEKEEPING_MS).is_multiple_of(5) {
            // Expiry walks every holder of every root: every few seconds is enough.
            n.directory.expire(Timestamp(local));
        }
        n.banned.retain(|_, until| *until > local);
        if n.kind == Kind::Outsider {
            return;
        }
        // Follow the committed configuration from the managers, as the daemon does.
        let managers: Vec<PeerId> =
            self.manager_nodes(i).into_iter().map(|j| self.nodes[j].peer).collect();
        for (to, frame) in self.nodes[i].follower.poll_requests(Timestamp(local), &managers) {
            if let Some(&j) = self.by_peer.get(&to) {
                self.send(i, j, Msg::Cluster(frame.encode()));
            }
        }
        // An edge the configuration made a manager starts its consensus core (it waits to
        // be added by the leader); the core then follows the log.
        if self.nodes[i].core.is_none()
            && self.nodes[i]
                .view()
                .member_by_raft_id(self.nodes[i].raft_id)
                .is_some_and(|m| m.role == Role::Manager)
        {
            self.start_core(i, Vec::new());
        }
        // Mesh pings from nodes running a core, to managers and eligible members.
        if self.nodes[i].core.is_some() {
            let targets: Vec<usize> = self.nodes[i]
                .view()
                .members
                .values()
                .filter(|m| m.role == Role::Manager || m.tags.iter().any(|t| t == ELIGIBLE_TAG))
                .map(|m| m.raft_id as usize - 1)
                .filter(|&j| j != i && j < self.members)
                .collect();
            for j in targets {
                self.send(i, j, Msg::Ping(local));
            }
        }
        // The operator's `cluster init` is retried at the first manager until it is applied.
        if i == 0
            && !self.initialised
            && self.nodes[0].outstanding.is_none()
            && self.nodes[0].proposals.is_empty()
        {
            let init = self.init.clone();
            self.nodes[0].proposals.push_back((init, Vec::new()));
        }
        // Proposals: the client sends again what is due, or the next one starts.
        let targets = self.targets(i);
        let n = &mut self.nodes[i];
        n.client.handle_timeout(n.core.as_mut(), &targets, Timestamp(local));
        self.drain_client(i);
        self.pump(i);
        // Curious fetches give up.
        let stale: Vec<Cid> = self.nodes[i]
            .fetches
            .iter()
            .filter(|(_, (_, p))| matches!(p, Purpose::Curious(t) if *t + CURIOUS_MS <= local))
            .map(|(c, _)| *c)
            .collect();
        for c in stale {
            self.nodes[i].fetches.remove(&c);
        }
        if self.topo.is_some() {
            self.router_tick(i, local);
            self.manager_topology_tick(i, local);
        }
    }

    pub(super) fn drain(&mut self, i: usize) {
        loop {
            let mut progressed = false;
            while let Some(out) = self.nodes[i].core.as_mut().and_then(|c| c.poll_output()) {
                progressed = true;
                self.on_output(i, out);
                if !self.nodes[i].live() {
                    return;
                }
            }
            let roots: Vec<Cid> = self.nodes[i].fetches.keys().copied().collect();
            for root in roots {
                let local = self.nodes[i].local(self.now);
                while let Some(a) = self.nodes[i]
                    .fetches
                    .get_mut(&root)
                    .and_then(|(f, _)| f.poll_action(Timestamp(local)))
                {
                    progressed = true;
                    self.on_fetch_action(i, root, a);
                    if !self.nodes[i].live() {
                        return;
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    pub(super) fn on_output(&mut self, i: usize, out: Output) {
        let now = self.now;
        match out {
            Output::Send { to, msg } => {
                let vote = self.checker.on_raft_send(now, &msg);
                if vote
                    && self.healed_at.is_none()
                    && self.mix.vote_crash > 0.0
                    && self.rng.gen_bool(self.mix.vote_crash)
                {
                    // A chosen crash point: right after the vote is persisted; half the time
                    // before the answer leaves.
                    if self.rng.gen_bool(0.5) && to >= 1 && (to as usize) <= self.members {
                        self.send(i, to as usize - 1, Msg::Raft(msg));
                    }
                    self.crash(i);
                    self.fault("crash-after-vote", i as u64);
                    let at = self.now + self.rng.gen_range(10..100);
                    self.push(at, Ev::Fault(Fault::Restart(i)));
                    return;
                }
                if to >= 1 && (to as usize) <= self.members {
                    self.send(i, to as usize - 1, Msg::Raft(msg));
                }
            }
            Output::Applied { index, from, seq, outcome } => {
                self.nodes[i].client.handle_applied(index, &from, seq, &outcome);
                self.checker.on_applied(now, i, index, (from, seq, outcome));
                self.drain_client(i);
            }
            Output::ReadReady { .. } => {}
            Output::RoleChanged { term, leader, leading } => {
                self.record("role", i as u64, term << 16 | leader);
                if leading {
                    self.checker.on_leader(now, term, i);
                }
            }
            Output::StoreBlocks(blocks) => {
                let root = blocks.last().map(|(c, _)| *c);
                for (cid, bytes) in blocks {
                    self.store(i, cid, &bytes);
                }
                if let Some(r) = root {
                    self.nodes[i].complete.insert(r);
                }
            }
            Output::NeedState(cid) => {
                let local = self.nodes[i].local(now);
                let mut f = Fetch::new(cid, FetchConfig::default(), Timestamp(local));
                for j in self.manager_nodes(i) {
                    let same = self.nodes[j].zone == self.nodes[i].zone;
                    f.add_peer(self.nodes[j].peer, same);
                }
                self.nodes[i].fetches.insert(cid, (f, Purpose::State));
            }
            Output::Propose(commands) => {
                self.nodes[i].proposals.push_back((commands, Vec::new()));
                self.pump(i);
            }
            Output::ReportRtt { to, mean_rtt_ms } => {
                if to >= 1 && (to as usize) <= self.members {
                    self.send(i, to as usize - 1, Msg::Report(mean_rtt_ms));
                }
            }
        }
    }

    pub(super) fn on_message(&mut self, from: usize, to: usize, msg: Msg) {
        let local = self.nodes[to].local(self.now);
        match msg {
            Msg::Raft(b) => {
                if let Some(c) = self.nodes[to].core.as_mut() {
                    let r = c.step(&b);
                    self.fatal(to, r);
                }
            }
            Msg::Cluster(bytes) => self.on_cluster_frame(from, to, &bytes),
            Msg::Ping(t) => self.send(to, from, Msg::Pong(t)),
            Msg::Pong(t) => {
                let rtt = local.saturating_sub(t);
                let id = self.nodes[from].raft_id;
                if let Some(c) = self.nodes[to].core.as_mut() {
                    c.handle_rtt(id, rtt, CoreTime(local));
                }
            }
            Msg::Report(mean) => {
                let id = self.nodes[from].raft_id;
                if let Some(c) = self.nodes[to].core.as_mut() {
                    c.handle_rtt_report(id, mean, CoreTime(local));
                }
            }
            Msg::Frame { root, bytes } => self.on_frame(from, to, root, &bytes, local),
            Msg::Topology(r) => {
                if self.nodes[to].core.is_some() && self.is_member(to, from) {
                    self.nodes[to].reports.insert(from, (local, r));
                }
            }
        }
    }
}
