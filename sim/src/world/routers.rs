//! Routers sharing a topology file, driven as the daemon drives them
//! (`node/daemon/src/daemon/topology.rs`): routers propose signed versions, fetch staged versions
//! through the exchange, report what they hold and apply to the managers, and apply the
//! version the committed state makes active for them; managers feed the real
//! [`Decider`] with what they observe (gossip and reports), and the leader proposes its
//! decisions. The decisions all live in `mycel_consensus::topology`; this module only maps
//! them onto the simulated network and disk, and checks what routers apply.
//!
//! Checks: a router applies only a version that a committed state made active (or canary)
//! under that activation index, and only the bytes of that version
//! (`safety:topology-uncommitted`, `safety:topology-bytes`); managers agree on which version
//! each activation index activated (`safety:topology-activation`); after the heal, every live
//! router holds the active version's bytes and no version waits for activation
//! (`liveness:topology`).

use super::*;
use crate::report::TopologyStats;
use crate::scenario::Scenario;
use mycel_consensus::command::StageTopology;
use mycel_consensus::topology::{HookResult, Observation, VersionState};

/// How often a router reports to the managers (the daemon: every second).
const REPORT_MS: u64 = 1_000;
/// A report counts a router as live this long (the daemon: 3 s).
const REPORT_LIVE_MS: u64 = 3_000;
/// The deciders repeat an uncommitted decision after this long (the daemon: 3 s).
const REPROPOSE_MS: u64 = 3_000;
/// After the configuration converged, every live router is on the active version within
/// this long.
pub(super) const HEAL_TOPOLOGY_MS: u64 = 60_000;

/// A router's report (the daemon's `TopologyReport` frame, reduced to what the managers
/// read from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Report {
    /// The version waiting for activation, if this router holds it (0: none).
    holding: u64,
    /// The activation handled last (0: none).
    activation_index: u64,
    /// The version whose bytes are in the router's file.
    applied_version: u64,
    /// Whether the last activation's hook succeeded.
    applied: bool,
}

/// One apply record: the activation handled and the file it left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Applied {
    activation_index: u64,
    /// The version whose bytes are in the file (the previous one after a failed hook).
    version: u64,
    /// BLAKE3 of the file.
    hash: [u8; 32],
    hook_ok: bool,
}

/// A router's topology state on its simulated disk.
#[derive(Debug, Default)]
pub(super) struct RouterState {
    /// The record (and file) as synced.
    synced: Option<Applied>,
    /// The record (and file) as last written; synced at the next housekeeping round.
    current: Option<Applied>,
    next_report: u64,
    /// Activation indexes whose hook ran here (durably recorded).
    handled: BTreeSet<u64>,
}

impl RouterState {
    /// A crash: the unsynced record is lost. Returns whether one was.
    pub(super) fn crash(&mut self) -> bool {
        let lost = self.current != self.synced;
        if lost && let Some(a) = self.current {
            self.handled.remove(&a.activation_index);
        }
        self.current = self.synced;
        self.next_report = 0;
        lost
    }
}

/// The fleet's topology file: what the checkers know.
#[derive(Debug)]
pub(super) struct Fleet {
    name: String,
    /// BLAKE3 of the canonical bytes of every proposed version, by root.
    docs: BTreeMap<Cid, [u8; 32]>,
    /// Every activation (and canary start) a manager's committed state showed, by the
    /// Raft index that made it: (version, root, canary).
    activations: BTreeMap<u64, (u64, Vec<u8>, bool)>,
    pub(super) stats: TopologyStats,
}

impl Fleet {
    pub(super) fn new(name: &str, routers: u32) -> Fleet {
        Fleet {
            name: name.to_owned(),
            docs: BTreeMap::new(),
            activations: BTreeMap::new(),
            stats: TopologyStats { routers, ..TopologyStats::default() },
        }
    }
}

/// The swarm's draw for a seed without configured routers: with probability
/// `swarm_pct`, some of the non-manager nodes become routers with a topology workload.
pub(super) fn draw(rng: &mut ChaCha8Rng, sc: &mut Scenario) {
    let t = &mut sc.topology;
    if t.swarm_pct == 0 || rng.gen_range(0..100) >= t.swarm_pct {
        return;
    }
    let room = sc.nodes.saturating_sub(sc.managers + sc.eligible.max(1) + 1);
    if room < 2 {
        return;
    }
    t.routers = rng.gen_range(2..=room.min(8));
    t.versions = rng.gen_range(2..=6);
    t.rollbacks = rng.gen_range(0..=2);
    t.canary = rng.gen_bool(0.3);
    t.hook_fail_pct = if t.canary { rng.gen_range(0..60) } else { 0 };
}

impl World {
    /// Commands the cluster's init adds for routers: routers may publish topology files;
    /// with a canary, the routers of the first router's zone take each version first.
    pub(super) fn topology_bootstrap(&self) -> Vec<Command> {
        if self.topo.is_none() {
            return Vec::new();
        }
        let t = &self.sc.topology;
        let mut out = vec![Command::AddGrant(Grant {
            subject: "role:router".into(),
            permission: "publish".into(),
            namespace: topo::namespace(&t.name).into(),
        })];
        let first = self.nodes[..self.members].iter().find(|n| n.kind == Kind::Router);
        if t.canary
            && let Some(r) = first
        {
            out.push(Command::SetTopologyCanary {
                name: t.name.clone(),
                subjects: vec![format!("zone:{}", r.zone)],
                fail_pct_max: t.canary_fail_pct,
            });
        }
        out
    }

    /// A live router proposes version `k`: it stores the object (as `mycel topology
    /// propose` does) and asks the quorum to stage it on the latest version it knows,
    /// signed with its key (now and then forced).
    pub(super) fn topology_propose(&mut self, k: u32) {
        if self.healed_at.is_some() {
            return;
        }
        let Some(fleet) = &self.topo else { return };
        let name = fleet.name.clone();
        let routers: Vec<usize> = (0..self.members)
            .filter(|&j| self.nodes[j].kind == Kind::Router && self.nodes[j].live())
            .collect();
        let Some(&i) = routers.choose(&mut self.rng) else { return };
        let base = self.nodes[i].view().topologies.get(&name).map_or(0, |t| t.latest());
        let doc = content::topology_doc(self.seed ^ 0x7070, u64::from(k) + 1, self.members as u32);
        for (cid, b) in &doc.object.blocks {
            self.store(i, *cid, b);
        }
        let (source, source_bytes) = doc.source.clone();
        self.store(i, source, &source_bytes);
        self.nodes[i].complete.insert(doc.object.root);
        let local = self.nodes[i].local(self.now);
        self.nodes[i].announcer.announce_soon(Timestamp(local));
        let force = self.rng.gen_bool(0.2);
        let mut stage = StageTopology {
            name,
            base,
            canonical: doc.canonical,
            chunker: content::chunker_config().into(),
            root: doc.object.root.to_bytes().to_vec(),
            source: source.to_bytes().to_vec(),
            proposer: self.nodes[i].peer.as_bytes().to_vec(),
            proposed_ms: local,
            signature: Vec::new(),
            force,
        };
        topo::sign(&mut stage, &self.nodes[i].secret);
        let fleet = self.topo.as_mut().expect("checked");
        fleet.docs.insert(doc.object.root, doc.hash);
        fleet.stats.proposed += 1;
        self.nodes[i].proposals.push_back((vec![Command::StageTopology(Box::new(stage))], vec![]));
        self.record("topology-propose", i as u64, u64::from(k));
        self.pump(i);
        self.after(i);
    }

    /// A live manager activates an earlier version (`mycel topology activate NAME
    /// --version N`).
    pub(super) fn topology_rollback(&mut self) {
        if self.healed_at.is_some() {
            return;
        }
        let Some(fleet) = &self.topo else { return };
        let name = fleet.name.clone();
        let managers: Vec<usize> = (0..self.members)
            .filter(|&j| self.nodes[j].live() && self.nodes[j].core.is_some())
            .collect();
        let Some(&i) = managers.choose(&mut self.rng) else { return };
        let Some(active) = self.nodes[i].view().topologies.get(&name).and_then(|t| t.active) else {
            return;
        };
        if active < 2 {
            return;
        }
        let version = self.rng.gen_range(1..active);
        self.nodes[i]
            .proposals
            .push_back((vec![Command::ActivateTopology { name, version, canary: false }], vec![]));
        if let Some(f) = self.topo.as_mut() {
            f.stats.rollbacks += 1;
        }
        self.record("topology-rollback", i as u64, version);
        self.pump(i);
        self.after(i);
    }

    /// After a step at a node running a core: the activations its committed state shows
    /// (every state a router can follow was such a state at a step's end).
    pub(super) fn observe_topology(&mut self, i: usize) {
        let Some(fleet) = self.topo.as_mut() else { return };
        let Some(c) = self.nodes[i].core.as_ref() else { return };
        let Some(t) = c.state().topologies.get(&fleet.name) else { return };
        fleet.stats.staged = fleet.stats.staged.max(t.latest());
        let mut seen = Vec::new();
        if let Some(a) = t.active
            && let Some(v) = t.version(a)
        {
            seen.push((t.activated_index, (a, v.root.clone(), false)));
        }
        if let Some(p) = t.canary_phase
            && let Some(v) = t.version(p.version)
        {
            seen.push((p.started_index, (p.version, v.root.clone(), true)));
        }
        for (index, rec) in seen {
            match fleet.activations.get(&index) {
                Some(first) if *first != rec => {
                    let detail = format!(
                        "node {i}: index {index} activated version {} of {}, another manager saw version {}",
                        rec.0, fleet.name, first.0
                    );
                    self.checker.fail(self.now, "safety:topology-activation", detail);
                }
                Some(_) => {}
                None => {
                    fleet.activations.insert(index, rec);
                    fleet.stats.activations += 1;
                }
            }
        }
    }

    /// A router's housekeeping: sync the apply record, fetch the versions it needs, apply
    /// the activation its committed view gives it, report to the managers.
    pub(super) fn router_tick(&mut self, i: usize, local: u64) {
        let Some(fleet) = &self.topo else { return };
        let name = fleet.name.clone();
        let me = self.nodes[i].peer.as_bytes().to_vec();
        if self.nodes[i].kind != Kind::Router {
            return;
        }
        // The record written at the last round is durable now (group commit).
        self.nodes[i].router.synced = self.nodes[i].router.current;
        let view = self.nodes[i].view();
        let Some(member) = view.members.get(&me) else { return };
        if member.role != Role::Router || !topo::subscribed(member, &name) {
            return;
        }
        // What to hold: the version waiting for activation, the canary version, the target.
        let mut wanted: BTreeSet<Cid> = BTreeSet::new();
        let t = view.topologies.get(&name);
        if let Some(v) = t.and_then(|t| t.versions.last())
            && matches!(v.state, VersionState::Staged | VersionState::Canary)
            && let Ok(c) = Cid::from_bytes(&v.root)
        {
            wanted.insert(c);
        }
        if let Some(t) = t
            && let Some(p) = t.canary_phase
            && let Some(c) = t.version(p.version).and_then(|v| Cid::from_bytes(&v.root).ok())
        {
            wanted.insert(c);
        }
        let mut target = topo::target(view, &name, &me);
        if cfg!(feature = "sim-bugs")
            && self.bugs & crate::bugs::ROUTER_APPLIES_STAGED != 0
            && let Some(t) = t
            && let Some(v) = t.versions.last().filter(|v| v.state == VersionState::Staged)
        {
            // Planted: the router applies the version waiting for activation.
            target = Some(topo::Target {
                name: name.clone(),
                version: v.number,
                root: v.root.clone(),
                activation_index: v.staged_index,
                canary: false,
            });
        }
        let holding = t
            .and_then(|t| t.versions.last())
            .filter(|v| matches!(v.state, VersionState::Staged | VersionState::Canary))
            .filter(|v| Cid::from_bytes(&v.root).is_ok_and(|c| self.nodes[i].complete.contains(&c)))
            .map_or(0, |v| v.number);
        if let Some(t) = &target
            && let Ok(c) = Cid::from_bytes(&t.root)
        {
            wanted.insert(c);
        }
        for root in wanted {
            let n = &mut self.nodes[i];
            if !n.complete.contains(&root) && !n.fetches.contains_key(&root) {
                let f = Fetch::new(root, FetchConfig::default(), Timestamp(local));
                n.fetches.insert(root, (f, Purpose::Topology));
                self.record("topology-fetch", i as u64, 0);
            }
        }
        if let Some(t) = target {
            self.router_apply(i, &t);
        }
        if local >= self.nodes[i].router.next_report {
            self.nodes[i].router.next_report = local + REPORT_MS;
            let cur = self.nodes[i].router.current;
            let report = Report {
                holding,
                activation_index: cur.map_or(0, |a| a.activation_index),
                applied_version: cur.map_or(0, |a| a.version),
                applied: cur.is_some_and(|a| a.hook_ok),
            };
            for m in self.manager_nodes(i) {
                self.send(i, m, Msg::Topology(report));
            }
        }
        self.refresh_peers(i);
    }

    /// Applies `t` at router `i` if it holds the version and has not handled the
    /// activation: the file is written atomically and the hook runs (a canary hook may
    /// fail, and the previous file is restored).
    fn router_apply(&mut self, i: usize, t: &topo::Target) {
        let cur = self.nodes[i].router.current;
        if cur.is_some_and(|a| a.activation_index == t.activation_index) {
            return;
        }
        let Ok(root) = Cid::from_bytes(&t.root) else { return };
        if !self.nodes[i].complete.contains(&root) {
            return;
        }
        let Some(bytes) = content::read_file(&self.nodes[i].store, &root) else {
            // A block that no longer reads back: the version is fetched again.
            self.nodes[i].complete.remove(&root);
            return;
        };
        let hash = *blake3::hash(&bytes).as_bytes();
        let fail_pct = self.sc.topology.hook_fail_pct;
        let hook_fails = t.canary
            && self.healed_at.is_none()
            && fail_pct > 0
            && self.rng.gen_range(0..100) < fail_pct;
        let fleet = self.topo.as_mut().expect("routers run with a fleet");
        let applied = if hook_fails {
            fleet.stats.hook_failures += 1;
            let (version, hash) = cur.map_or((0, [0; 32]), |a| (a.version, a.hash));
            Applied { activation_index: t.activation_index, version, hash, hook_ok: false }
        } else {
            // The check: this activation index made this version active (or canary) in a
            // committed state, and the file holds that version's bytes.
            let now = self.now;
            match fleet.activations.get(&t.activation_index) {
                Some((v, r, _)) if *v == t.version && *r == t.root => {}
                other => {
                    let detail = format!(
                        "router {i} applied version {} of {} under index {}, which committed {:?}",
                        t.version,
                        fleet.name,
                        t.activation_index,
                        other.map(|(v, _, canary)| (v, canary))
                    );
                    self.checker.fail(now, "safety:topology-uncommitted", detail);
                }
            }
            if fleet.docs.get(&root) != Some(&hash) {
                let detail = format!(
                    "router {i} applied bytes of version {} that are not the proposed document",
                    t.version
                );
                self.checker.fail(now, "safety:topology-bytes", detail);
            }
            Applied {
                activation_index: t.activation_index,
                version: t.version,
                hash,
                hook_ok: true,
            }
        };
        fleet.stats.applies += 1;
        if !self.nodes[i].router.handled.insert(t.activation_index) {
            // The hook runs again for an activation it ran for: a canary router whose
            // canary was rolled back returns to the activation it had before the canary
            // (`topology::target` gives it the same activation index), and the previous
            // file must be written back.
            fleet.stats.hook_reruns += 1;
        }
        self.nodes[i].router.current = Some(applied);
        self.nodes[i].router.next_report = 0;
        self.record("topology-apply", i as u64, t.version);
    }

    /// A manager's housekeeping: observe the version waiting for activation (gossip and
    /// reports), feed the decider, and, leading, propose its decisions.
    pub(super) fn manager_topology_tick(&mut self, i: usize, local: u64) {
        let Some(fleet) = &self.topo else { return };
        let name = fleet.name.clone();
        let Some(core) = self.nodes[i].core.as_ref() else { return };
        let state = core.state();
        let leading = core.is_leader();
        let Some(t) = state.topologies.get(&name) else { return };
        let pending = match t.canary_phase {
            Some(p) => Some(p.version),
            None => t.versions.last().filter(|v| v.state == VersionState::Staged).map(|v| v.number),
        };
        let n = &self.nodes[i];
        let alive_ms = 3 * self.sc.announce_period.0;
        let observation = pending.and_then(|version| {
            let root = Cid::from_bytes(&t.version(version)?.root).ok()?;
            let mut obs = Observation::default();
            for m in state.members.values().filter(|m| topo::subscribed(m, &name)) {
                let j = m.raft_id as usize - 1;
                let Ok(peer) = PeerId::from_bytes(&m.peer).ok_or(()) else { continue };
                let report = n
                    .reports
                    .get(&j)
                    .filter(|(at, _)| local.saturating_sub(*at) <= REPORT_LIVE_MS)
                    .map(|(_, r)| *r);
                let heard = n
                    .directory
                    .node(&peer)
                    .is_some_and(|x| local.saturating_sub(x.seen.0) <= alive_ms);
                if j != i && !heard && report.is_none() {
                    continue;
                }
                obs.live.insert(m.peer.clone());
                let gossip =
                    n.directory.holding(&root, &peer).is_some_and(|(complete, _)| complete);
                let reported =
                    report.is_some_and(|r| r.applied_version == version || r.holding == version);
                if gossip || reported || (j == i && n.complete.contains(&root)) {
                    obs.holders.insert(m.peer.clone());
                }
                if let Some(r) = report.filter(|r| r.activation_index > 0) {
                    obs.hooks.insert(
                        m.peer.clone(),
                        HookResult { activation_index: r.activation_index, applied: r.applied },
                    );
                }
            }
            Some((version, obs))
        });
        let Node { core, decider, .. } = &mut self.nodes[i];
        let decider = decider.get_or_insert_with(|| Decider::new(REPROPOSE_MS));
        if let Some((version, obs)) = observation {
            decider.handle_observation(&name, version, obs);
        }
        if !leading {
            return;
        }
        let Some(core) = core.as_ref() else { return };
        let batches = decider.poll(core.state(), CoreTime(local));
        if std::env::var("MYCEL_SIM_TOPO_DEBUG").is_ok() {
            eprintln!(
                "{} leader {i} pending {pending:?} batches {batches:?} decider {decider:?}",
                self.now
            );
        }
        if batches.is_empty() {
            return;
        }
        if let Some(f) = self.topo.as_mut() {
            f.stats.decisions += batches.len() as u64;
        }
        for commands in batches {
            self.record("topology-decide", i as u64, 0);
            self.nodes[i].proposals.push_back((commands, Vec::new()));
        }
        self.pump(i);
    }

    /// Why the routers have not converged, if they have not: under the agreed leader's
    /// state, a canary phase runs or the latest version waits for activation, or a live
    /// router's file is not the version its target names.
    pub(super) fn topology_short(&self) -> Option<String> {
        let fleet = self.topo.as_ref()?;
        let Some(leader) = self.agreed_leader() else {
            return Some("no agreed leader".into());
        };
        let state = self.nodes[leader].core.as_ref()?.state();
        let Some(t) = state.topologies.get(&fleet.name) else {
            // Nothing was ever staged (every proposal failed or none was made).
            return None;
        };
        if let Some(p) = t.canary_phase {
            let root = t.version(p.version).and_then(|v| Cid::from_bytes(&v.root).ok());
            let routers: Vec<String> = state
                .members
                .values()
                .filter(|m| m.role == Role::Router)
                .map(|m| {
                    let j = m.raft_id as usize - 1;
                    let n = &self.nodes[j];
                    let reported = self.nodes[leader].reports.get(&j).map(|(at, r)| (*at, *r));
                    let gossip = root.and_then(|c| {
                        self.nodes[leader].directory.holding(&c, &n.peer).map(|x| x.0)
                    });
                    format!(
                        "{j}{}{}: gossip {gossip:?} {:?} holds {} reported {:?}",
                        if n.live() { "" } else { "(down)" },
                        if topo::is_canary(t, m) { "(canary)" } else { "" },
                        n.router.current.map(|a| (a.version, a.activation_index, a.hook_ok)),
                        root.is_some_and(|c| n.complete.contains(&c)),
                        reported
                    )
                })
                .collect();
            return Some(format!(
                "version {} of {} is still in its canary phase (started at {}; canary routers {}; leader {} at local {})",
                p.version,
                fleet.name,
                p.started_index,
                routers.join(", "),
                leader,
                self.nodes[leader].local(self.now)
            ));
        }
        if let Some(v) = t.versions.last()
            && v.state == VersionState::Staged
        {
            return Some(format!("version {} of {} was never activated", v.number, fleet.name));
        }
        for m in state.members.values().filter(|m| m.role == Role::Router) {
            let j = m.raft_id as usize - 1;
            if j >= self.members || !self.nodes[j].live() {
                continue;
            }
            let Some(target) = topo::target(state, &fleet.name, &m.peer) else { continue };
            let want = Cid::from_bytes(&target.root).ok().and_then(|c| fleet.docs.get(&c));
            let cur = self.nodes[j].router.current;
            let ok = cur.is_some_and(|a| {
                a.activation_index == target.activation_index
                    && a.version == target.version
                    && Some(&a.hash) == want
            });
            if !ok {
                return Some(format!(
                    "router {j} has {:?}, not version {} under activation {}",
                    cur.map(|a| (a.version, a.activation_index, a.hook_ok)),
                    target.version,
                    target.activation_index
                ));
            }
        }
        None
    }
}
