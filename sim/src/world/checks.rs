//! Convergence after the heal, the end-of-run checks, and the report.

use super::*;

impl World {
    pub(super) fn live_members(&self) -> Vec<usize> {
        (0..self.members).filter(|&j| self.nodes[j].live()).collect()
    }

    pub(super) fn converge(&mut self) {
        let healed = self.healed_at.expect("after heal");
        let since = self.now - healed;
        if self.conv.leader_ms.is_none() {
            if self.agreed_leader().is_some() {
                self.conv.leader_ms = Some(since);
            } else if since > HEAL_LEADER_ELECTIONS * ELECTION_MS {
                let now = self.now;
                self.checker.fail(
                    now,
                    "liveness:leader",
                    format!("no leader {} election timeouts after the heal", HEAL_LEADER_ELECTIONS),
                );
                self.done = true;
                return;
            }
        }
        if let (Some(leader_ms), None) = (self.conv.leader_ms, self.conv.config_ms) {
            let leader = self.agreed_leader();
            let state = leader.and_then(|l| self.nodes[l].core.as_ref()).map(|c| c.state());
            // The cluster must exist: initialised, with every node a member (or removed).
            let formed = state.is_some_and(|s| {
                s.cluster_id.is_some()
                    && (0..self.members).all(|j| {
                        let p = self.nodes[j].peer.as_bytes();
                        s.members.contains_key(p) || s.removed.contains(p)
                    })
            });
            let target = state.filter(|_| formed).map(|s| (s.applied_index, s.removed.clone()));
            let all = target.as_ref().is_some_and(|(t, removed)| {
                self.live_members().iter().all(|&j| {
                    self.nodes[j].view().applied_index == *t
                        || removed.contains(self.nodes[j].peer.as_bytes())
                })
            });
            let target = target.map(|(t, _)| t);
            if all {
                self.conv.config_ms = Some(since);
            } else if since > leader_ms + HEAL_CONFIG_MS {
                let behind: Vec<usize> = self
                    .live_members()
                    .into_iter()
                    .filter(|&j| Some(self.nodes[j].view().applied_index) != target)
                    .take(8)
                    .collect();
                let now = self.now;
                self.checker.fail(
                    now,
                    "liveness:configuration",
                    format!("nodes {behind:?} not on the latest configuration (index {target:?}) 30 s after the leader"),
                );
                self.done = true;
                return;
            }
        }
        if self.conv.replicas_ms.is_none() {
            match self.replicas_short() {
                None => self.conv.replicas_ms = Some(since),
                Some(why) if since > HEAL_REPLICAS_MS => {
                    let now = self.now;
                    self.checker.fail(
                        now,
                        "liveness:replicas",
                        format!("5 simulated minutes after the heal: {why}"),
                    );
                    self.done = true;
                    return;
                }
                Some(_) => {}
            }
        }
        self.check_deadlines();
        if let (Some(config_ms), true, None) =
            (self.conv.config_ms, self.topo.is_some(), self.conv.topology_ms)
        {
            match self.topology_short() {
                None => self.conv.topology_ms = Some(since),
                Some(why) if since > config_ms + routers::HEAL_TOPOLOGY_MS => {
                    let now = self.now;
                    self.checker.fail(
                        now,
                        "liveness:topology",
                        format!(
                            "{} s after the configuration converged: {why}",
                            routers::HEAL_TOPOLOGY_MS / 1000
                        ),
                    );
                    self.done = true;
                    return;
                }
                Some(_) => {}
            }
        }
        if self.conv.leader_ms.is_some()
            && self.conv.config_ms.is_some()
            && self.conv.replicas_ms.is_some()
            && (self.topo.is_none() || self.conv.topology_ms.is_some())
        {
            self.done = true;
            return;
        }
        let at = self.now + 500;
        self.push(at, Ev::Converge);
    }

    /// A leader that every live voter follows.
    pub(super) fn agreed_leader(&self) -> Option<usize> {
        let leader = (0..self.members)
            .filter(|&j| self.nodes[j].live())
            .filter(|&j| self.nodes[j].core.as_ref().is_some_and(|c| c.is_leader()))
            .max_by_key(|&j| self.nodes[j].core.as_ref().map(|c| c.term()))?;
        let c = self.nodes[leader].core.as_ref()?;
        let (voters, _) = c.conf();
        let id = c.id();
        let ok = voters.iter().all(|v| {
            let j = *v as usize - 1;
            j >= self.members
                || !self.nodes[j].live()
                || self.nodes[j].core.as_ref().is_some_and(|x| x.leader() == id)
        });
        ok.then_some(leader)
    }

    /// Why some acknowledged pin is below its minimum (or a pre-position incomplete), from
    /// what nodes really hold.
    pub(super) fn replicas_short(&self) -> Option<String> {
        self.pins_short(None)
    }

    /// [`World::replicas_short`] for the pre-position of `root` alone.
    pub(super) fn preposition_short(&self, root: &Cid) -> Option<String> {
        self.pins_short(Some(root))
    }

    pub(super) fn pins_short(&self, only: Option<&Cid>) -> Option<String> {
        let Some(leader) = self.agreed_leader() else {
            return Some("no agreed leader".into());
        };
        let state = self.nodes[leader].core.as_ref()?.state();
        let pins: Vec<PinSpec> = state
            .pins
            .values()
            .filter(|p| Cid::from_bytes(&p.root).is_ok_and(|c| self.acked_pins.contains(&c)))
            .filter(|p| only.is_none_or(|o| o.to_bytes()[..] == p.root[..]))
            .map(|p| mycel_core::replicate::pin_spec(p, 0))
            .collect();
        let nodes: Vec<NodeState> = state
            .members
            .values()
            .map(|m| {
                let j = m.raft_id as usize - 1;
                let n = &self.nodes[j];
                NodeState {
                    node: Candidate {
                        id: m.peer.clone(),
                        zone: m.zone.clone(),
                        tags: m.tags.clone(),
                        free_bytes: CAPACITY_BYTES,
                        load: 0,
                        rtt_ms: None,
                    },
                    storage: m.role == Role::Edge,
                    alive: n.live(),
                    holdings: n
                        .complete
                        .iter()
                        .map(|c| (c.to_bytes().to_vec(), Held::Complete))
                        .collect(),
                }
            })
            .collect();
        let p = plan::plan(&pins, &nodes, &Settings::default(), 0);
        for (spec, r) in pins.iter().zip(&p.pins) {
            let eligible = nodes
                .iter()
                .filter(|n| {
                    n.alive
                        && n.storage
                        && (spec.zones.is_empty() || spec.zones.contains(&n.node.zone))
                        && spec.tags.iter().all(|t| n.node.tags.contains(t))
                })
                .count() as u32;
            let want = spec.replicas_min.min(eligible);
            let root = Cid::from_bytes(&spec.root).map(|c| c.to_string()).unwrap_or_default();
            if r.replicas < want {
                return Some(format!(
                    "pin {root} has {} of {want} replicas ({})",
                    r.replicas,
                    self.fetch_status(&spec.root)
                ));
            }
            if let Some((held, all, _)) = r.preposition
                && held < all
            {
                return Some(format!(
                    "pre-position {root} reached {held} of {all} targets ({})",
                    self.fetch_status(&spec.root)
                ));
            }
        }
        None
    }

    /// Who holds and who fetches `root`, for a liveness failure's message.
    pub(super) fn fetch_status(&self, root: &[u8]) -> String {
        let Ok(root) = Cid::from_bytes(root) else { return String::new() };
        let mut parts = Vec::new();
        for (j, n) in self.nodes.iter().enumerate().take(self.members) {
            if n.complete.contains(&root) {
                parts.push(format!("{j}:holds{}", if n.live() { "" } else { "(down)" }));
            } else if let Some((f, p)) = n.fetches.get(&root) {
                let pr = f.progress();
                parts.push(format!(
                    "{j}:fetching {:?} {}/{} bytes from {} peers",
                    p,
                    pr.done_bytes,
                    pr.total_bytes,
                    f.peers().count()
                ));
            }
        }
        parts.join(", ")
    }

    pub(super) fn final_checks(&mut self) {
        let now = self.now;
        if self.healed_at.is_none() {
            self.checker.fail(
                now,
                "liveness:run",
                "the run ended before the heal (event queue empty)".into(),
            );
        }
        // Acknowledged proposals are in the log and in the leader's state.
        let applied = self.checker.applied_proposals();
        let acked: Vec<(Vec<u8>, u64)> = self.checker.acked.iter().cloned().collect();
        for (from, seq) in &acked {
            if !applied.contains(&(from.clone(), *seq)) {
                self.checker.fail(
                    now,
                    "safety:acknowledged-lost",
                    format!(
                        "proposal ({:?}, {seq}) acknowledged but never applied",
                        PeerId::from_bytes(from)
                    ),
                );
            }
        }
        if let Some(l) = self.agreed_leader()
            && let Some(c) = &self.nodes[l].core
        {
            let st = c.state();
            let mut lost = Vec::new();
            for (from, seq) in &acked {
                if st.dedup.get(from).is_none_or(|(s, _)| s < seq) {
                    lost.push((from.clone(), *seq));
                }
            }
            for (from, seq) in lost {
                self.checker.fail(
                    now,
                    "safety:acknowledged-lost",
                    format!(
                        "proposal ({:?}, {seq}) acknowledged but missing from the leader's state",
                        PeerId::from_bytes(&from)
                    ),
                );
            }
        }
        // Equal applied indexes, equal states: managers' cores, and every member's followed
        // configuration (reached by log deltas) against them.
        let mut digests: BTreeMap<u64, ([u8; 32], usize)> = BTreeMap::new();
        let cores = (0..self.members).filter_map(|j| {
            let n = &self.nodes[j];
            n.core.as_ref().filter(|_| n.live()).map(|c| (j, c.state()))
        });
        let followed = (0..self.members)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].kind != Kind::Outsider)
            .map(|j| (j, self.nodes[j].follower.state()))
            .filter(|(_, s)| s.applied_index > 0);
        let states: Vec<(usize, &ClusterState)> = cores.chain(followed).collect();
        let mut disagree = Vec::new();
        for (j, s) in states {
            let d = s.digest();
            match digests.get(&s.applied_index) {
                Some((other, k)) if *other != d => disagree.push((*k, j, s.applied_index)),
                Some(_) => {}
                None => {
                    digests.insert(s.applied_index, (d, j));
                }
            }
        }
        for (k, j, idx) in disagree {
            self.checker.fail(
                now,
                "safety:state-agreement",
                format!("nodes {k} and {j} differ at applied index {idx}"),
            );
        }
        // Every acknowledged pin is recoverable from some node's disk.
        let pins: Vec<Cid> = self.acked_pins.iter().copied().collect();
        for root in pins {
            let ok = (0..self.members).any(|j| {
                !self.nodes[j].dead && content::object_blocks(&self.nodes[j].store, &root).is_some()
            }) || self.recoverable_from_union(&root);
            if !ok {
                self.checker.fail(
                    now,
                    "safety:pin-recoverable",
                    format!("acknowledged pin {root} cannot be rebuilt from any disk"),
                );
            }
        }
    }

    pub(super) fn recoverable_from_union(&self, root: &Cid) -> bool {
        let mut union: BTreeMap<Cid, Rc<[u8]>> = BTreeMap::new();
        for n in self.nodes.iter().take(self.members).filter(|n| !n.dead) {
            for (c, b) in &n.store {
                if cid_ok(c, b) {
                    union.entry(*c).or_insert_with(|| b.clone());
                }
            }
        }
        content::object_blocks(&union, root).is_some()
    }

    pub(super) fn report(&mut self) -> Report {
        let mut violations = self.checker.violations.clone();
        if self.checker.dropped > 0 {
            violations.push(crate::report::Violation {
                at_ms: self.now,
                check: "more".into(),
                detail: format!("{} more violations not listed", self.checker.dropped),
            });
        }
        Report {
            seed: self.seed,
            scenario: self.sc.name.clone(),
            scenario_hash: self.scenario_hash.clone(),
            nodes: self.nodes.len() as u32,
            simulated_ms: self.now,
            events: self.events,
            messages: self.messages,
            bytes: self.bytes,
            acknowledged: self.checker.acked.len() as u64,
            plans_run: self.plans.0,
            plans_skipped: self.plans.1,
            pins: self.acked_pins.len() as u64,
            mix: self.mix.clone(),
            faults: self.faults.clone(),
            convergence: self.conv.clone(),
            violations,
            topology: self.topo.as_ref().map(|t| t.stats.clone()),
            releases: self.releases,
            granted_reads: self.granted_reads,
            deadlines_met: self.deadline_counts.0,
            deadlines_not_required: self.deadline_counts.1,
            trace_hash: self.trace.finalize().to_hex().to_string(),
            commit: COMMIT.into(),
        }
    }
}
