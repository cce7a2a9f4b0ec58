//! The workload: publishing and pinning objects, each member's replication plan, curious
//! members and outsiders probing for what they may not read.

use super::*;

impl World {
    /// The replication plan of node `i` (mycel-policy), and the fetches it asks for.
    pub(super) fn replication_plan(&mut self, i: usize, local: u64) {
        let n = &self.nodes[i];
        // Storage follows the committed role, not how the node started: a replaced manager
        // becomes an edge.
        if n.kind == Kind::Outsider {
            return;
        }
        let view = n.view();
        let me = n.peer.as_bytes().to_vec();
        let Some(my_member) = view.members.get(&me) else { return };
        if my_member.role != Role::Edge || view.pins.is_empty() {
            self.refresh_peers(i);
            return;
        }
        if n.hostility != Hostility::Honest {
            // A hostile member collects every pin it may read, to be asked for it as often
            // as possible (and then serve it corrupt or oversized).
            let roots: Vec<Cid> = view
                .pins
                .keys()
                .filter_map(|r| Cid::from_bytes(r).ok())
                .filter(|r| core_access::check_read(view, &n.peer, r, None).is_ok())
                .filter(|r| !n.complete.contains(r) && !n.fetches.contains_key(r))
                .collect();
            for c in roots {
                let f = Fetch::new(c, FetchConfig::default(), Timestamp(local));
                self.nodes[i].fetches.insert(c, (f, Purpose::Replica));
            }
            self.refresh_peers(i);
            return;
        }
        let alive_ms = 3 * self.sc.announce_period.0;
        let pins: Vec<PinSpec> = mycel_core::replicate::pin_specs(view, &|_| 0);
        let roots: Vec<Cid> = view.pins.keys().filter_map(|r| Cid::from_bytes(r).ok()).collect();
        let mut holdings: BTreeMap<PeerId, BTreeMap<Vec<u8>, Held>> = BTreeMap::new();
        for r in &roots {
            let root = r.to_bytes().to_vec();
            for (peer, complete) in n.directory.holders_of(r) {
                let held =
                    if complete { Held::Complete } else { Held::Partial { done: 0, total: 0 } };
                holdings.entry(peer).or_default().insert(root.clone(), held);
            }
        }
        let mine = holdings.entry(n.peer).or_default();
        mine.clear();
        for r in &roots {
            if n.complete.contains(r) {
                mine.insert(r.to_bytes().to_vec(), Held::Complete);
            } else if let Some((f, _)) = n.fetches.get(r) {
                let p = f.progress();
                mine.insert(
                    r.to_bytes().to_vec(),
                    Held::Partial { done: p.done_bytes, total: p.total_bytes },
                );
            }
        }
        let nodes: Vec<NodeState> = view
            .members
            .values()
            .filter_map(|m| {
                let peer = PeerId::from_bytes(&m.peer)?;
                let info = n.directory.node(&peer);
                let alive = peer == n.peer
                    || info.is_some_and(|x| local.saturating_sub(x.seen.0) <= alive_ms);
                Some(NodeState {
                    node: Candidate {
                        id: m.peer.clone(),
                        zone: m.zone.clone(),
                        tags: m.tags.clone(),
                        free_bytes: info.map_or(CAPACITY_BYTES, |x| x.free_bytes),
                        load: info.map_or(0, |x| x.load),
                        rtt_ms: None,
                    },
                    storage: m.role == Role::Edge,
                    alive,
                    holdings: holdings.remove(&peer).unwrap_or_default(),
                })
            })
            .collect();
        // The plan is a pure function of its inputs: with the same inputs as last time it
        // would ask for the same actions, already carried out, so it is not run again (a
        // digest of the inputs is kept; this is what lets 1,000 nodes plan on one core).
        let digest = plan_digest(&pins, &nodes, view);
        if n.last_plan == Some(digest) {
            self.plans.1 += 1;
            return;
        }
        self.plans.0 += 1;
        // As the daemon does: one plan per namespace, with only the nodes that may read it
        // counted as storage.
        let namespace_of = |spec: &PinSpec| {
            view.pins
                .get(&spec.root)
                .map_or(access::DEFAULT_NAMESPACE.to_string(), |p| p.namespace.clone())
        };
        // (Every node planned over is a member, so the default namespace needs no lookup.)
        let mut may_read = |id: &[u8], ns: &str| {
            access::open_to_members(ns, access::Permission::Read)
                || PeerId::from_bytes(id)
                    .is_some_and(|p| core_access::may_read_namespace(view, &p, ns))
        };
        let p = plan::plan_namespaced(
            &pins,
            &namespace_of,
            &mut may_read,
            &nodes,
            &Settings::default(),
            local,
            &mut self.scores,
        );
        if std::env::var("MYCEL_SIM_PLAN_DEBUG").is_ok_and(|d| d == i.to_string()) {
            for a in p.for_node(&me) {
                let root = match a {
                    plan::Action::Fetch { root, .. }
                    | plan::Action::Cancel { root, .. }
                    | plan::Action::Release { root, .. } => root,
                };
                let spec = pins.iter().find(|s| &s.root == root);
                let holders: Vec<String> = nodes
                    .iter()
                    .filter_map(|n| {
                        let j = self.by_peer.get(&PeerId::from_bytes(&n.node.id)?)?;
                        let h = n.holdings.get(root)?;
                        let ns = view
                            .pins
                            .get(root)
                            .map_or(access::DEFAULT_NAMESPACE.to_string(), |p| p.namespace.clone());
                        Some(format!(
                            "{j}{}{}{}{}@{}",
                            if matches!(h, Held::Complete) { "C" } else { "P" },
                            if n.alive { "" } else { "(dead)" },
                            if n.storage { "" } else { "(nostore)" },
                            if core_access::may_read_namespace(
                                view,
                                &PeerId::from_bytes(&n.node.id)?,
                                &ns
                            ) {
                                ""
                            } else {
                                "(noread)"
                            },
                            n.node.zone
                        ))
                    })
                    .collect();
                eprintln!(
                    "{} node {i}@{} {:?} min/max {:?} holders {holders:?}",
                    self.now,
                    self.nodes[i].zone,
                    match a {
                        plan::Action::Fetch { .. } => "fetch",
                        plan::Action::Cancel { .. } => "cancel",
                        plan::Action::Release { .. } => "release",
                    },
                    spec.map(|s| (
                        s.replicas_min,
                        s.replicas_max,
                        s.zones.clone(),
                        s.preposition.clone()
                    ))
                );
            }
        }
        let mut start = Vec::new();
        let mut cancel = Vec::new();
        let mut release = Vec::new();
        for a in p.for_node(&me) {
            match a {
                plan::Action::Fetch { root, .. } => {
                    let skip = cfg!(feature = "sim-bugs")
                        && self.bugs & crate::bugs::IGNORE_PREPOSITIONS != 0
                        && view.pins.get(root).is_some_and(|p| !p.preposition.is_empty());
                    if let Ok(c) = Cid::from_bytes(root)
                        && !skip
                    {
                        start.push(c);
                    }
                }
                plan::Action::Cancel { root, .. } => {
                    if let Ok(c) = Cid::from_bytes(root) {
                        cancel.push(c);
                    }
                }
                plan::Action::Release { root, .. } => {
                    if let Ok(c) = Cid::from_bytes(root) {
                        release.push(c);
                    }
                }
            }
        }
        self.nodes[i].last_plan = Some(digest);
        for c in cancel {
            if matches!(self.nodes[i].fetches.get(&c), Some((_, Purpose::Replica))) {
                self.nodes[i].fetches.remove(&c);
            }
        }
        for c in release {
            self.release(i, c);
        }
        for c in start {
            if !self.nodes[i].complete.contains(&c) && !self.nodes[i].fetches.contains_key(&c) {
                let f = Fetch::new(c, FetchConfig::default(), Timestamp(local));
                self.nodes[i].fetches.insert(c, (f, Purpose::Replica));
                self.record("fetch", i as u64, 0);
            }
        }
        self.refresh_peers(i);
    }

    /// Adds every holder the directory knows to the node's fetches.
    pub(super) fn refresh_peers(&mut self, i: usize) {
        let roots: Vec<Cid> = self.nodes[i].fetches.keys().copied().collect();
        for r in roots {
            let holders = self.nodes[i].directory.holders(&r);
            let my_zone = self.nodes[i].zone.clone();
            let me = self.nodes[i].peer;
            let n = &mut self.nodes[i];
            if let Some((f, _)) = n.fetches.get_mut(&r) {
                for h in holders {
                    if h.peer != me && !n.banned.contains_key(&h.peer) {
                        f.add_peer(h.peer, h.zone.as_deref() == Some(my_zone.as_str()));
                    }
                }
            }
        }
    }

    pub(super) fn publish(&mut self, k: u32, preposition: bool) {
        if self.healed_at.is_some() {
            return;
        }
        let w = self.sc.workload.clone();
        let origins: Vec<usize> = (self.sc.managers as usize..self.members)
            .filter(|&j| self.nodes[j].kind == Kind::Edge)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].hostility == Hostility::Honest)
            .collect();
        let Some(&origin) = origins.choose(&mut self.rng) else { return };
        let zone = self.nodes[origin].zone.clone();
        let restricted = !preposition && self.rng.gen_range(0..100) < w.restricted_pct;
        let kib = if preposition {
            w.preposition_kib
        } else {
            self.rng.gen_range(w.object_kib_min..=w.object_kib_max)
        };
        let obj = content::generate(
            self.seed ^ (u64::from(k) << 32) ^ u64::from(preposition),
            kib as usize * 1024,
        );
        for (cid, b) in &obj.blocks {
            self.store(origin, *cid, b);
        }
        self.nodes[origin].complete.insert(obj.root);
        let local = self.nodes[origin].local(self.now);
        self.nodes[origin].announcer.announce_soon(Timestamp(local));
        let namespace =
            if restricted { format!("ns-{zone}") } else { access::DEFAULT_NAMESPACE.into() };
        let pin = Pin {
            root: obj.root.to_bytes().to_vec(),
            name: format!("object-{k}"),
            namespace: namespace.clone(),
            replicas_min: w.replicas_min,
            replicas_max: w.replicas_max,
            zones: if restricted { vec![zone.clone()] } else { vec![] },
            tags: vec![],
            preposition: if preposition { vec![zone.clone()] } else { vec![] },
            deadline_ms: if preposition && w.preposition_deadline.0 > 0 {
                local + w.preposition_deadline.0
            } else {
                0
            },
        };
        if pin.deadline_ms > 0 {
            self.deadlines.push(grants::DeadlineRec {
                root: obj.root,
                at: self.nodes[origin].global(pin.deadline_ms),
                len: obj.len,
                targets: (0..self.members)
                    .filter(|&j| self.nodes[j].kind == Kind::Edge && self.nodes[j].zone == zone)
                    .count() as u64,
                done: false,
            });
        }
        self.pin_by_root.insert(obj.root, self.pins.len());
        self.pins.push(PinRec { root: obj.root, namespace, zone: restricted.then_some(zone) });
        self.nodes[origin].proposals.push_back((vec![Command::AddPin(pin)], vec![obj.root]));
        self.record("publish", origin as u64, u64::from(k));
        self.pump(origin);
        self.after(origin);
    }

    /// An edge tries to fetch content of another zone's namespace: it must be refused.
    pub(super) fn curious(&mut self) {
        let restricted: Vec<PinRec> = self
            .pins
            .iter()
            .filter(|p| p.zone.is_some() && self.acked_pins.contains(&p.root))
            .cloned()
            .collect();
        let Some(p) = restricted.choose(&mut self.rng).cloned() else { return };
        let zone = p.zone.clone().unwrap_or_default();
        let cands: Vec<usize> = (self.sc.managers as usize..self.members)
            .filter(|&j| self.nodes[j].kind == Kind::Edge)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].zone != zone)
            .collect();
        let Some(&i) = cands.choose(&mut self.rng) else { return };
        self.probe_outside_tree(i, p.root);
        if self.nodes[i].complete.contains(&p.root) || self.nodes[i].fetches.contains_key(&p.root) {
            return;
        }
        let local = self.nodes[i].local(self.now);
        let mut f = Fetch::new(p.root, FetchConfig::default(), Timestamp(local));
        for j in 0..self.members {
            if self.nodes[j].complete.contains(&p.root) && j != i {
                f.add_peer(self.nodes[j].peer, false);
            }
        }
        self.nodes[i].fetches.insert(p.root, (f, Purpose::Curious(local)));
        self.record("curious", i as u64, 0);
        let _ = p.namespace;
        self.after(i);
    }

    /// Node `i` asks a holder of `secret` (a root it may not read) for that root's manifest
    /// under another root it may read: the serving side's tree check must refuse it.
    pub(super) fn probe_outside_tree(&mut self, i: usize, secret: Cid) {
        let peer = self.nodes[i].peer;
        let found = (0..self.members).filter(|&s| s != i && self.nodes[s].live()).find_map(|s| {
            let n = &self.nodes[s];
            if !n.complete.contains(&secret) {
                return None;
            }
            n.complete
                .iter()
                .find(|r| {
                    **r != secret && core_access::check_read(n.view(), &peer, r, None).is_ok()
                })
                .map(|r| (s, *r))
        });
        let Some((s, cover)) = found else { return };
        let want = Frame::Want { req: 0, root: cover.to_bytes(), cids: vec![secret.to_bytes()] };
        self.record("probe-tree", i as u64, s as u64);
        self.send(i, s, Msg::Frame { root: cover, bytes: want.encode() });
    }

    /// A non-member asks members for pinned content.
    pub(super) fn outsider(&mut self, i: usize) {
        if self.healed_at.is_none() {
            let at = self.now + 5_000;
            self.push(at, Ev::Outsider(i));
        }
        let roots: Vec<Cid> = self.acked_pins.iter().copied().collect();
        let Some(&root) = roots.choose(&mut self.rng) else { return };
        let to = self.rng.gen_range(0..self.members);
        let f = Frame::Want { req: 1, root: root.to_bytes(), cids: vec![root.to_bytes()] };
        self.send(i, to, Msg::Frame { root, bytes: f.encode() });
        self.record("outsider", i as u64, to as u64);
    }

    pub(super) fn pick(&mut self, role: Option<Kind>, alive: bool) -> Option<usize> {
        let c: Vec<usize> = (0..self.members)
            .filter(|&j| {
                role.is_none_or(|r| {
                    self.nodes[j].kind == r || (r == Kind::Manager && self.nodes[j].core.is_some())
                })
            })
            .filter(|&j| self.nodes[j].live() == alive && !self.nodes[j].dead)
            .collect();
        c.choose(&mut self.rng).copied()
    }

    pub(super) fn schedule_workload(&mut self) {
        let w = self.sc.workload.clone();
        let d = self.end_faulty;
        let lo = 3_000.min(d / 4);
        let hi = (d * 6 / 10).max(lo + 1);
        for k in 0..w.objects {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Publish(k));
        }
        for k in 0..w.prepositions {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Preposition(k));
        }
        for k in 0..w.grants {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Grant(k));
        }
        for _ in 0..w.curious_fetches {
            let at = self.rng.gen_range(hi / 2..hi.max(hi / 2 + 1) + d / 4);
            self.push(at.min(d), Ev::Curious);
        }
        for i in self.members..self.nodes.len() {
            let at = self.rng.gen_range(lo..hi);
            self.push(at, Ev::Outsider(i));
        }
        if self.topo.is_some() {
            let t = self.sc.topology.clone();
            for k in 0..t.versions {
                let at = self.rng.gen_range(lo..d.max(lo + 1));
                self.push(at, Ev::TopologyPropose(k));
            }
            for _ in 0..t.rollbacks {
                let at = self.rng.gen_range(hi / 2..d.max(hi / 2 + 1));
                self.push(at, Ev::TopologyRollback);
            }
        }
    }
}
