//! Workload and checks around grants, releases and pre-position deadlines.
//!
//! - Temporary grants: a manager grants one edge `read` on another zone's namespace, the
//!   edge fetches content of that namespace while the grant holds, and the manager revokes
//!   the grant later. Content served while the grant was committed somewhere is legitimate;
//!   the edge keeps what it fetched. Once the revocation is in the serving node's committed
//!   view, that node serves nothing of the namespace to the edge
//!   (`safety:served-after-revocation`).
//! - Releases (`mycel_policy::plan::Action::Release`): the node drops its copy (the daemon
//!   turns it into evictable cache; the simulator evicts it at once, the worst case). A
//!   release must not leave an acknowledged pin with fewer than its minimum complete copies
//!   on nodes that are not dead (`safety:release-below-min`), and one node releasing the same copy
//!   again and again is a plan that flaps (`liveness:plan-flapping`).
//! - Pre-position deadlines: a pre-position whose deadline falls late enough after the heal
//!   for the healed network to carry the object to every target must be complete at every
//!   target by then (`liveness:preposition-deadline`).

use super::*;

/// The most times one node may release its copy of one root in a run.
const RELEASES_OF_ONE_COPY_MAX: u32 = 4;

/// A temporary grant of the workload.
#[derive(Debug, Clone)]
pub(super) struct TempGrant {
    /// The grantee (node index).
    node: usize,
    /// The zone whose namespace it may read.
    zone: String,
    grant: Grant,
}

/// A pre-position deadline the world checks.
#[derive(Debug, Clone)]
pub(super) struct DeadlineRec {
    pub(super) root: Cid,
    /// The deadline on the simulated global clock.
    pub(super) at: u64,
    /// Content bytes.
    pub(super) len: u64,
    /// Nodes it is pre-positioned to (the edges of its zones).
    pub(super) targets: u64,
    /// Checked (or decided not to be): true.
    pub(super) done: bool,
}

impl World {
    /// A live manager grants a live honest edge `read` on another zone's namespace; the edge
    /// fetches from it a little later, and the grant is revoked later still.
    pub(super) fn grant(&mut self, k: u32) {
        if self.healed_at.is_some() || self.zones.len() < 2 {
            return;
        }
        let edges: Vec<usize> = (0..self.members)
            .filter(|&j| self.nodes[j].kind == Kind::Edge && self.nodes[j].live())
            .filter(|&j| self.nodes[j].hostility == Hostility::Honest)
            .collect();
        let Some(&e) = edges.choose(&mut self.rng) else { return };
        let others: Vec<String> =
            self.zones.iter().filter(|z| **z != self.nodes[e].zone).cloned().collect();
        let Some(zone) = others.choose(&mut self.rng).cloned() else { return };
        let Some(m) = self.live_manager() else { return };
        let peer =
            mycel_policy::access::Subject::new(self.nodes[e].peer.as_bytes(), "", "", &[]).peer;
        let grant = Grant {
            subject: format!("member:{peer}"),
            permission: "read".into(),
            namespace: format!("ns-{zone}"),
        };
        self.nodes[m].proposals.push_back((vec![Command::AddGrant(grant.clone())], vec![]));
        self.grants.insert(k, TempGrant { node: e, zone, grant });
        self.record("grant", e as u64, u64::from(k));
        self.pump(m);
        self.after(m);
        let fetch_at = self.now + self.rng.gen_range(3_000..10_000);
        self.push(fetch_at, Ev::GrantedFetch(k));
        let revoke_at = self.now + self.rng.gen_range(10_000..40_000);
        self.push(revoke_at.min(self.end_faulty.saturating_sub(1)).max(self.now), Ev::Revoke(k));
    }

    /// The grantee fetches content of the namespace it was granted (served only once the
    /// grant is in the server's view).
    pub(super) fn granted_fetch(&mut self, k: u32) {
        if self.healed_at.is_some() {
            return;
        }
        let Some(g) = self.grants.get(&k).cloned() else { return };
        let roots: Vec<Cid> = self
            .pins
            .iter()
            .filter(|p| p.zone.as_deref() == Some(g.zone.as_str()))
            .filter(|p| self.acked_pins.contains(&p.root))
            .map(|p| p.root)
            .collect();
        let Some(&root) = roots.choose(&mut self.rng) else { return };
        let i = g.node;
        let n = &self.nodes[i];
        if !n.live() || n.complete.contains(&root) || n.fetches.contains_key(&root) {
            return;
        }
        let local = n.local(self.now);
        let mut f = Fetch::new(root, FetchConfig::default(), Timestamp(local));
        for j in 0..self.members {
            if j != i && self.nodes[j].complete.contains(&root) {
                let same = self.nodes[j].zone == self.nodes[i].zone;
                f.add_peer(self.nodes[j].peer, same);
            }
        }
        self.nodes[i].fetches.insert(root, (f, Purpose::Curious(local)));
        self.record("granted-fetch", i as u64, u64::from(k));
        self.after(i);
    }

    /// A live manager revokes temporary grant `k`.
    pub(super) fn revoke(&mut self, k: u32) {
        let Some(g) = self.grants.get(&k).cloned() else { return };
        let Some(m) = self.live_manager() else {
            // No manager up: try again shortly (the revocation is part of the workload).
            let at = self.now + 2_000;
            self.push(at, Ev::Revoke(k));
            return;
        };
        self.nodes[m].proposals.push_back((vec![Command::RemoveGrant(g.grant.clone())], vec![]));
        self.revoked
            .insert((self.nodes[g.node].peer.as_bytes().to_vec(), g.grant.namespace.clone()));
        self.record("revoke", g.node as u64, u64::from(k));
        self.pump(m);
        self.after(m);
    }

    fn live_manager(&mut self) -> Option<usize> {
        let managers: Vec<usize> = (0..self.members)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].core.is_some())
            .collect();
        managers.choose(&mut self.rng).copied()
    }

    /// Whether `f` was granted `ns` for a while and the grant was then revoked: a block of
    /// `ns` served to `f` by a node whose view no longer holds the grant.
    pub(super) fn served_after_revocation(&self, f: usize, ns: &str) -> bool {
        self.revoked.contains(&(self.nodes[f].peer.as_bytes().to_vec(), ns.to_owned()))
    }

    /// Node `i` releases its replica of `root`: its copy is evicted (blocks no other
    /// complete object here uses are dropped). The release must leave the pin at its
    /// minimum complete copies on nodes that are not dead.
    pub(super) fn release(&mut self, i: usize, root: Cid) {
        if !self.nodes[i].complete.contains(&root) || self.nodes[i].fetches.contains_key(&root) {
            return;
        }
        let Some(cids) = content::object_cids(&self.nodes[i].store, &root) else {
            self.nodes[i].complete.remove(&root);
            return;
        };
        let n = &mut self.nodes[i];
        n.complete.remove(&root);
        // Blocks shared with another complete object stay.
        let mut keep: BTreeSet<Cid> = BTreeSet::new();
        for r in n.complete.iter() {
            if let Some(c) = content::object_cids(&n.store, r) {
                keep.extend(c);
            }
        }
        for c in cids {
            if !keep.contains(&c) {
                n.store.remove(&c);
            }
        }
        let local = n.local(self.now);
        n.announcer.announce_soon(Timestamp(local));
        self.releases += 1;
        self.record("release", i as u64, 0);
        // A plan that fetches a copy and releases it again, round after round, moves the
        // whole object each time: a release repeated this often is a flapping plan.
        let n = self.released.entry((i, root)).or_default();
        *n += 1;
        if *n == RELEASES_OF_ONE_COPY_MAX + 1 {
            let detail = format!(
                "node {i} released {root} {} times: its plans fetch and release it in turn",
                RELEASES_OF_ONE_COPY_MAX + 1
            );
            self.checker.fail(self.now, "liveness:plan-flapping", detail);
        }
        if !self.acked_pins.contains(&root) {
            return;
        }
        let Some(min) = self
            .latest()
            .and_then(|s| s.pins.get(root.to_bytes().as_slice()))
            .map(|p| p.replicas_min)
        else {
            return;
        };
        // The copies a plan can know of: complete on a node that is not dead (a crashed
        // node's disk is still there; a hostile member's copy and a copy with a flipped bit
        // not yet read back look complete to every plan, and the fault bounds keep one
        // healthy copy elsewhere).
        let copies = (0..self.members)
            .filter(|&j| !self.nodes[j].dead && self.nodes[j].complete.contains(&root))
            .count() as u32;
        if copies < min {
            let seen: Vec<String> = self.nodes[i]
                .directory
                .holders(&root)
                .iter()
                .filter(|h| h.complete)
                .filter_map(|h| self.by_peer.get(&h.peer))
                .map(|&j| {
                    let n = &self.nodes[j];
                    let state = if !n.live() {
                        "down"
                    } else if !n.complete.contains(&root) {
                        "released"
                    } else if n.hostility != Hostility::Honest {
                        "hostile"
                    } else {
                        "holds"
                    };
                    format!("{j}:{state}")
                })
                .collect();
            let detail = format!(
                "node {i} released {root}, leaving {copies} complete copies on nodes that are not dead (minimum {min}); it saw complete copies at [{}]",
                seen.join(" ")
            );
            self.checker.fail(self.now, "safety:release-below-min", detail);
        }
    }

    /// Pre-position deadlines that have passed: each one late enough after the heal must
    /// be met. Once every pre-position is complete, the remaining deadlines are met.
    pub(super) fn check_deadlines(&mut self) {
        let Some(healed) = self.healed_at else { return };
        let complete = self.conv.replicas_ms.is_some();
        let links = &self.sc.links;
        let bw = links
            .pairs
            .iter()
            .filter_map(|p| p.bandwidth_mbps)
            .fold(links.bandwidth_mbps, u32::min);
        let settle = HEAL_CONFIG_MS + 2 * self.sc.plan_period.0 + 2 * self.sc.announce_period.0;
        let now = self.now;
        let mut due = Vec::new();
        for (k, d) in self.deadlines.iter_mut().enumerate().filter(|(_, d)| !d.done) {
            // What the healed network allows: the configuration and a plan round settle,
            // then one copy per target over the slowest uplink.
            let copy_ms = d.len * 8 / (u64::from(bw) * 1_000);
            let allowed = d.at >= healed + settle + d.targets * copy_ms + 10_000;
            if !allowed {
                d.done = true;
                self.deadline_counts.1 += 1;
            } else if complete {
                d.done = true;
                self.deadline_counts.0 += 1;
            } else if now >= d.at {
                d.done = true;
                due.push(k);
            }
        }
        for k in due {
            let root = self.deadlines[k].root;
            match self.preposition_short(&root) {
                None => self.deadline_counts.0 += 1,
                Some(why) => {
                    let detail = format!("pre-position {root} missed its deadline: {why}");
                    self.checker.fail(now, "liveness:preposition-deadline", detail);
                }
            }
        }
    }
}
