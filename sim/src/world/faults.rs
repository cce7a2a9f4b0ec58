//! Faults: partitions, crashes and restarts, bit flips at rest, and the heal that ends the
//! faulty phase.

use super::*;

impl World {
    pub(super) fn on_fault(&mut self, f: Fault) {
        if self.healed_at.is_some() && !matches!(f, Fault::Restart(_)) {
            return;
        }
        match f {
            Fault::Crash { restart_after, role, node } => {
                let Some(i) = node.or_else(|| self.pick(role, true)) else { return };
                if !self.nodes[i].live() {
                    return;
                }
                self.crash(i);
                match restart_after {
                    Some(after) => {
                        self.fault("crash", i as u64);
                        let at = self.now + after;
                        self.push(at, Ev::Fault(Fault::Restart(i)));
                    }
                    None => {
                        self.fault("kill", i as u64);
                        self.nodes[i].dead = true;
                    }
                }
            }
            Fault::Restart(i) => self.restart(i),
            Fault::Pause(node, len) => {
                let Some(i) = node.or_else(|| self.pick(None, true)) else { return };
                self.nodes[i].paused_until = self.now + len;
                self.fault("pause", i as u64);
            }
            Fault::Partition(p, len) => {
                let p = match p {
                    Some(Partition::Isolate(i)) => Partition::Isolate(i),
                    Some(p) => p,
                    None => self.random_partition(),
                };
                let kind = match &p {
                    Partition::Zones(_) => "partition-zones",
                    Partition::Isolate(_) => "partition-isolate",
                    Partition::OneWay(..) => "partition-one-way",
                };
                let id = self.next_partition;
                self.next_partition += 1;
                self.partitions.insert(id, p);
                self.fault(kind, id);
                let at = self.now + len;
                self.push(at, Ev::Fault(Fault::Unpartition(id)));
            }
            Fault::IsolateRole(role, len) => {
                if let Some(i) = self.pick(role, true) {
                    self.on_fault(Fault::Partition(Some(Partition::Isolate(i)), len));
                }
            }
            Fault::Unpartition(id) => {
                self.partitions.remove(&id);
                self.record("unpartition", id, 0);
            }
            Fault::BitFlip => self.bitflip(),
            Fault::FsyncFail => {
                let Some(i) = self.pick(Some(Kind::Manager), true) else { return };
                if self.nodes[i].core.is_none() {
                    return;
                }
                self.nodes[i].backend.fail_syncs(true);
                self.fault("fsync-fail", i as u64);
            }
            Fault::Loss(rate) => {
                self.loss = rate;
                self.fault("loss", (rate * 1e6) as u64);
            }
            Fault::HealAll => {
                self.partitions.clear();
                self.loss = 0.0;
                self.record("heal-network", 0, 0);
            }
        }
    }

    pub(super) fn random_partition(&mut self) -> Partition {
        match self.rng.gen_range(0..3) {
            0 if self.zones.len() > 1 => {
                let z = self.rng.gen_range(0..self.zones.len());
                Partition::Zones(BTreeSet::from([z]))
            }
            1 => {
                let i = self.rng.gen_range(0..self.members);
                Partition::Isolate(i)
            }
            _ => {
                let a = self.rng.gen_range(0..self.members);
                let b = self.rng.gen_range(0..self.members);
                Partition::OneWay(a, b)
            }
        }
    }

    pub(super) fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if !n.up {
            return;
        }
        n.backend.crash();
        n.core = None;
        n.up = false;
        n.fetches.clear();
        n.outstanding = None;
        n.proposals.clear();
        // Volatile: a restarted node's client starts over, above the sequences it used.
        n.client = Client::new(n.peer, ClientConfig::default(), n.client.last_seq());
        // The followed state is on disk (the daemon saves it); who was asked is not.
        let followed = n.follower.state().clone();
        n.follower = Follower::new(followed, FOLLOW);
        n.banned.clear();
        n.timer_at = u64::MAX;
        n.paused_until = 0;
        n.decider = None;
        n.reports.clear();
        // The fetches the last plan asked for are gone: the next plan must run.
        n.last_plan = None;
        // An apply record not yet synced is lost (the rename was not yet durable: the
        // previous file and record are back).
        if n.router.crash()
            && let Some(f) = self.topo.as_mut()
        {
            f.stats.records_lost += 1;
        }
        self.tear_unsynced(i);
        self.record("crash", i as u64, 0);
    }

    pub(super) fn restart(&mut self, i: usize) {
        if self.nodes[i].up || self.nodes[i].dead {
            return;
        }
        let local = self.nodes[i].local(self.now);
        let seed = self.seed ^ (i as u64) << 20 ^ self.nodes[i].restarts << 40;
        let n = &mut self.nodes[i];
        n.up = true;
        n.restarts += 1;
        n.backend.fail_syncs(false);
        n.announcer = Announcer::new(
            n.peer,
            &n.zone.clone(),
            self.sc.announce_period.0,
            Timestamp(local),
            seed,
        );
        // As the daemon does: sequence numbers start at the start time, so peers that
        // remember a higher number from before the crash do not ignore the new ones.
        n.announcer.start_seq_at(local);
        n.directory = Directory::new(3 * self.sc.announce_period.0);
        n.next_housekeeping = local;
        n.next_plan = local + 1_000;
        n.up_busy_us = self.now * 1000;
        self.recover_store(i);
        let n = &mut self.nodes[i];
        // Complete roots are found again by reading the store.
        let roots: Vec<Cid> = n.complete.iter().copied().collect();
        for r in roots {
            if content::object_blocks(&n.store, &r).is_none() {
                n.complete.remove(&r);
            }
        }
        let was_manager = self.nodes[i].kind == Kind::Manager
            || self.nodes[i]
                .view()
                .member_by_raft_id(self.nodes[i].raft_id)
                .is_some_and(|m| m.role == Role::Manager);
        if was_manager || self.nodes[i].backend.syncs() > 0 {
            self.start_core(i, Vec::new());
        }
        self.fault("restart", i as u64);
        self.after(i);
    }

    /// Flips a bit in one stored copy of a block that has another healthy copy elsewhere
    /// (the fault bound: one healthy copy of acknowledged data always exists).
    pub(super) fn bitflip(&mut self) {
        if self.bitflips_left == 0 {
            return;
        }
        let cands: Vec<usize> = (0..self.members)
            .filter(|&j| !self.nodes[j].store.is_empty() && !self.nodes[j].dead)
            .collect();
        let Some(&i) = cands.choose(&mut self.rng) else { return };
        let k = self.rng.gen_range(0..self.nodes[i].store.len());
        let Some((&cid, b)) = self.nodes[i].store.iter().nth(k) else { return };
        let b = b.clone();
        // The other copy must be part of an object its node holds complete: a block left
        // over from a fetch that did not finish (a write error, a crash) is served to no
        // one who does not already know to ask.
        let healthy_elsewhere = (0..self.members).any(|j| {
            let n = &self.nodes[j];
            j != i
                && !n.dead
                && n.hostility == Hostility::Honest
                && n.store.get(&cid).is_some_and(|x| cid.matches(x))
                && n.complete
                    .iter()
                    .any(|r| content::object_cids(&n.store, r).is_some_and(|c| c.contains(&cid)))
        });
        // One damaged copy of an object at a time: nothing scrubs yet (the scrub-and-repair
        // issue), so latent damage on several copies, then a plan releasing the one healthy
        // copy (the others look complete), loses data no node could have seen coming.
        let damaged_elsewhere = (0..self.members).any(|j| {
            let n = &self.nodes[j];
            j != i
                && n.complete.iter().any(|r| {
                    content::object_cids(&n.store, r).is_some_and(|cids| {
                        cids.contains(&cid)
                            && cids.iter().any(|c| n.store.get(c).is_some_and(|x| !c.matches(x)))
                    })
                })
        });
        if !healthy_elsewhere || damaged_elsewhere {
            return;
        }
        let mut v = b.to_vec();
        let at = self.rng.gen_range(0..v.len().max(1));
        if let Some(x) = v.get_mut(at) {
            *x ^= 1 << self.rng.gen_range(0..8);
        }
        self.nodes[i].store.insert(cid, Rc::from(v));
        self.bitflips_left -= 1;
        self.fault("bitflip", i as u64);
    }

    pub(super) fn heal(&mut self) {
        self.healed_at = Some(self.now);
        self.partitions.clear();
        self.loss = 0.0;
        self.record("heal", 0, 0);
        for i in 0..self.members {
            self.nodes[i].paused_until = 0;
            self.nodes[i].backend.fail_syncs(false);
            if !self.nodes[i].up && !self.nodes[i].dead {
                self.restart(i);
            }
        }
        let at = self.now + 500;
        self.push(at, Ev::Converge);
    }

    pub(super) fn schedule_faults(&mut self) {
        let d = self.end_faulty;
        let timeline = self.sc.faults.timeline.clone();
        let mut next_version = self.sc.topology.versions;
        for step in &timeline {
            // Topology changes at chosen moments (a partition, a manager down).
            match step.action.as_str() {
                "topology-propose" if self.topo.is_some() => {
                    self.push(step.at.0, Ev::TopologyPropose(next_version));
                    next_version += 1;
                }
                "topology-rollback" if self.topo.is_some() => {
                    self.push(step.at.0, Ev::TopologyRollback);
                }
                _ => {}
            }
            if let Some(f) = self.scripted(step) {
                self.push(step.at.0, Ev::Fault(f));
            }
        }
        if self.sc.faults.mode != FaultMode::Swarm {
            return;
        }
        let minutes = d as f64 / 60_000.0;
        let start = 2_000.min(d / 4);
        let mix = self.mix.clone();
        let count = |rng: &mut ChaCha8Rng, rate: f64| -> u64 {
            let x = rate * minutes;
            x.floor() as u64 + u64::from(rng.gen_bool(x.fract()))
        };
        for _ in 0..count(&mut self.rng, mix.crashes_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            let after = self.rng.gen_range(50..15_000);
            let role = if self.rng.gen_bool(0.5) { Some(Kind::Manager) } else { None };
            self.push(at, Ev::Fault(Fault::Crash { restart_after: Some(after), role, node: None }));
        }
        for _ in 0..count(&mut self.rng, mix.pauses_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            let len = self.rng.gen_range(200..8_000);
            self.push(at, Ev::Fault(Fault::Pause(None, len)));
        }
        for _ in 0..count(&mut self.rng, mix.partitions_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            let len = self.rng.gen_range(1_000..20_000);
            self.push(at, Ev::Fault(Fault::Partition(None, len)));
        }
        let flips = count(&mut self.rng, mix.bitflips_per_min);
        self.bitflips_left = flips as u32;
        for _ in 0..flips {
            let at = self.rng.gen_range(start..d.max(start + 1));
            self.push(at, Ev::Fault(Fault::BitFlip));
        }
        for _ in 0..count(&mut self.rng, mix.fsync_failures_per_min) {
            let at = self.rng.gen_range(start..d.max(start + 1));
            self.push(at, Ev::Fault(Fault::FsyncFail));
        }
    }

    pub(super) fn scripted(&mut self, s: &Step) -> Option<Fault> {
        let node = s.node.map(|n| n as usize);
        let role = match s.role.as_deref() {
            Some("manager") => Some(Kind::Manager),
            Some("edge") => Some(Kind::Edge),
            Some("router") => Some(Kind::Router),
            _ => None,
        };
        let len = s.duration.map_or(5_000, |d| d.0);
        Some(match s.action.as_str() {
            "crash" => Fault::Crash { restart_after: Some(len), role, node },
            "kill" => Fault::Crash { restart_after: None, role, node },
            "restart" => Fault::Restart(node?),
            "pause" => Fault::Pause(node, len),
            "isolate" => match node {
                Some(n) => Fault::Partition(Some(Partition::Isolate(n)), len),
                None => Fault::IsolateRole(role, len),
            },
            "one-way" => Fault::Partition(Some(Partition::OneWay(node?, s.to? as usize)), len),
            "partition-zones" => {
                let set: BTreeSet<usize> =
                    s.zones.iter().filter_map(|z| self.zones.iter().position(|x| x == z)).collect();
                Fault::Partition(Some(Partition::Zones(set)), len)
            }
            "loss" => Fault::Loss(s.rate.unwrap_or(0.05)),
            "heal" => Fault::HealAll,
            _ => return None,
        })
    }
}
