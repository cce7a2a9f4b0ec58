//! Topology files in the daemon: routers apply what the committed state says they should
//! (`mycel_consensus::topology::targets`) and report the result to the managers; managers
//! feed what they observe (live subscribed routers, who holds each staged version, hook
//! results) to the leader's `Decider` and propose its decisions.
//!
//! The decisions are the cores': `targets` says what a router applies, the `Decider` when a
//! version is activated, promoted or rolled back, and `crate::topology::apply` how a file is
//! written and its hook run. This module only gathers inputs and executes outputs: it
//! fetches the versions a router needs through the mesh, runs one apply per name at a time
//! on a blocking thread, and sends reports to managers every second (a lost report is
//! replaced by the next, so nothing depends on one arriving).
//!
//! It touches the store (reads), `DATA_DIR/topology/` (through `crate::topology`, and
//! `watches.json` for watches added with `mycel topology watch`), and the watched files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use mycel_chunker::Cid;
use mycel_consensus::command::Command as CCommand;
use mycel_consensus::state::{ClusterState, Outcome};
use mycel_consensus::topology::{
    self as rules, Decider, HookResult, Observation, Target, VersionState,
};
use serde_json::json;
use tokio::sync::oneshot;

use super::Daemon;
use crate::cluster::{ClusterFrame, TOPOLOGY_REPORT_TEXT_MAX, TopologyReport};
use crate::store::Store;
use crate::topology::{self as apply, Activation, Drift, Watch, WatchConfig};
use crate::{net, restore};

/// How often the topology work runs in the loop.
const TICK: Duration = Duration::from_millis(200);
/// How often routers send their reports to managers.
const REPORT_PERIOD: Duration = Duration::from_secs(1);
/// A router whose report is older than this is not live by its reports alone.
const REPORT_LIVE: Duration = Duration::from_secs(3);
/// How often a router re-checks its files for drift.
const DRIFT_PERIOD: Duration = Duration::from_secs(5);
/// An apply that failed for an environmental reason is retried after this.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// How often the holders of a version being fetched are dialed.
const DIAL_PERIOD: Duration = Duration::from_secs(2);
/// The leader repeats an uncommitted decision after this.
const REPROPOSE_MS: u64 = 3_000;
/// File of the watches added at run time, in `DATA_DIR/topology/`.
const WATCHES_FILE: &str = "watches.json";

/// Requests from the admin API about topology files.
#[derive(Debug)]
pub enum Request {
    /// Every name (`None`) or one name as JSON: versions with states and observed counts,
    /// the schema, the canary configuration.
    View {
        /// The name.
        name: Option<String>,
        /// The answer.
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// Each subscribed router's applied version and drift, as this node knows them (a
    /// manager hears every router's reports).
    Status {
        /// The name.
        name: String,
        /// The answer.
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// Adds or replaces a run-time watch: persisted, and this node subscribes.
    Watch {
        /// The watch.
        config: WatchConfig,
        /// The answer.
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
    /// Removes a run-time watch (watches in `config.toml` stay).
    Unwatch {
        /// The name.
        name: String,
        /// The answer.
        reply: oneshot::Sender<Result<serde_json::Value, String>>,
    },
}

/// What a blocking job finished.
enum Done {
    Applied { report: TopologyReport },
    Drift { name: String, drift: String },
}

/// The topology state of the daemon.
pub(super) struct Wiring {
    /// The leader's decisions (used on managers).
    decider: Decider,
    /// Watches from `config.toml` (fixed) and from `mycel topology watch` (persisted).
    configured: BTreeMap<String, WatchConfig>,
    added: BTreeMap<String, WatchConfig>,
    watches: BTreeMap<String, Watch>,
    /// Names with an apply running.
    running: BTreeSet<String>,
    /// A drift check is running.
    checking: bool,
    done: Arc<Mutex<Vec<Done>>>,
    /// This node's last result per name, and the drift of its file.
    results: BTreeMap<String, TopologyReport>,
    drift: BTreeMap<String, String>,
    retry_at: BTreeMap<String, Instant>,
    /// When each version this router needs was last asked for (fetches are restarted at most
    /// every [`RETRY_AFTER`]).
    fetched_at: BTreeMap<Cid, Instant>,
    /// When the holders of each version being fetched were last dialed.
    dialed_at: BTreeMap<Cid, Instant>,
    /// Managers: the routers' reports, by sender.
    reports: BTreeMap<PeerId, (Instant, Vec<TopologyReport>)>,
    next_tick: Instant,
    next_report: Instant,
    next_drift: Instant,
    next_tags: Instant,
    /// Run-time watches were loaded.
    loaded: bool,
}

impl Wiring {
    /// Watches from the config file; run-time ones are loaded at the first tick.
    pub(super) fn new(configured: &[WatchConfig]) -> Wiring {
        let now = Instant::now();
        Wiring {
            decider: Decider::new(REPROPOSE_MS),
            configured: configured.iter().map(|w| (w.name.clone(), w.clone())).collect(),
            added: BTreeMap::new(),
            watches: BTreeMap::new(),
            running: BTreeSet::new(),
            checking: false,
            done: Arc::default(),
            results: BTreeMap::new(),
            drift: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            fetched_at: BTreeMap::new(),
            dialed_at: BTreeMap::new(),
            reports: BTreeMap::new(),
            next_tick: now,
            next_report: now,
            next_drift: now + DRIFT_PERIOD,
            next_tags: now,
            loaded: false,
        }
    }

    /// Rebuilds the checked watches: the config file's win over run-time ones.
    fn rebuild(&mut self) {
        self.watches.clear();
        for (name, c) in self.added.iter().chain(&self.configured) {
            match c.watch() {
                Ok(w) => {
                    self.watches.insert(name.clone(), w);
                }
                Err(e) => tracing::warn!(name, "topology watch ignored: {e}"),
            }
        }
        self.results.retain(|n, _| self.watches.contains_key(n));
        self.drift.retain(|n, _| self.watches.contains_key(n));
    }
}

fn watches_path(data_dir: &Path) -> PathBuf {
    data_dir.join("topology").join(WATCHES_FILE)
}

fn load_added(data_dir: &Path) -> Result<Vec<WatchConfig>, String> {
    let path = watches_path(data_dir);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn save_added(data_dir: &Path, added: &BTreeMap<String, WatchConfig>) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = data_dir.join("topology");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = watches_path(data_dir);
    let tmp = dir.join(format!(".{WATCHES_FILE}.tmp"));
    let list: Vec<&WatchConfig> = added.values().collect();
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| format!("{}: {e}", path.display()))
}

fn clip(s: &str) -> String {
    if s.len() <= TOPOLOGY_REPORT_TEXT_MAX {
        return s.to_owned();
    }
    // Keep the tail (the end of a hook's output says most), on a character boundary.
    let mut start = s.len() - TOPOLOGY_REPORT_TEXT_MAX;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_owned()
}

fn drift_text(d: Drift) -> &'static str {
    match d {
        Drift::InSync => "in sync",
        Drift::Changed => "changed",
        Drift::Missing => "missing",
    }
}

/// Applies one activation (on a blocking thread): reads the canonical bytes from the store,
/// runs `crate::topology::apply`, and checks the file afterwards.
fn apply_job(store: &Store, data_dir: &Path, watch: &Watch, target: &Target, cid: Cid) -> Done {
    let mut report = TopologyReport {
        name: target.name.clone(),
        activation_index: target.activation_index,
        version: target.version,
        applied_version: 0,
        applied: false,
        status: "error".into(),
        error: String::new(),
        drift: String::new(),
        holding: 0,
    };
    let canonical = match restore::read_object(store, &cid) {
        Ok(b) => b,
        Err(e) => {
            report.error = clip(&format!("reading {cid}: {e}"));
            return Done::Applied { report };
        }
    };
    let last = apply::last_applied(data_dir, &watch.name).ok().flatten();
    let activation = Activation {
        name: target.name.clone(),
        version: target.version,
        cid: cid.to_string(),
        previous_version: last.map(|r| r.applied_version).filter(|v| *v > 0),
        activation_index: target.activation_index,
    };
    let hook_text = |h: &apply::HookRun| {
        let how = if h.timed_out {
            format!("timed out after {} ms", h.elapsed_ms)
        } else {
            match h.code {
                Some(c) => format!("exit code {c}"),
                None => "killed by a signal".into(),
            }
        };
        clip(&format!("hook {how}: {}", h.output.trim()))
    };
    match apply::apply(data_dir, watch, &activation, &canonical) {
        Ok(apply::Outcome::Applied { .. }) => {
            report.applied = true;
            report.status = "applied".into();
        }
        Ok(apply::Outcome::Unchanged) => {
            report.applied = true;
            report.status = "unchanged".into();
        }
        Ok(apply::Outcome::HookFailed { hook }) => {
            report.status = "hook failed".into();
            report.error = hook_text(&hook);
        }
        Ok(apply::Outcome::Handled(r)) => {
            let (applied, status) = match r.status {
                apply::Status::Succeeded => (true, "applied"),
                apply::Status::Unchanged => (true, "unchanged"),
                apply::Status::Failed => (false, "hook failed"),
                apply::Status::Started => (false, "interrupted"),
            };
            report.applied = applied;
            report.status = status.into();
            if r.status == apply::Status::Started {
                report.error = "the node stopped while the hook ran; it is not run again".into();
            }
        }
        Err(e) => report.error = clip(&e.to_string()),
    }
    report.applied_version =
        apply::last_applied(data_dir, &watch.name).ok().flatten().map_or(0, |r| r.applied_version);
    if let Ok(d) = apply::drift(watch, report.applied_version.max(1), &canonical)
        && report.applied_version == target.version
    {
        report.drift = drift_text(d).into();
    }
    Done::Applied { report }
}

impl Daemon {
    /// The topology work of one loop turn (rate-limited to [`TICK`]).
    pub(super) fn topology_tick(&mut self) {
        let now = Instant::now();
        if now < self.topo.next_tick {
            return;
        }
        self.topo.next_tick = now + TICK;
        if !self.topo.loaded {
            self.topo.loaded = true;
            match load_added(&self.dir.path) {
                Ok(list) => {
                    self.topo.added = list.into_iter().map(|w| (w.name.clone(), w)).collect()
                }
                Err(e) => tracing::warn!("topology watches: {e}"),
            }
            self.topo.rebuild();
        }
        self.topology_collect();
        if !self.in_cluster() {
            return;
        }
        self.topology_tags();
        self.topology_router();
        if now >= self.topo.next_report {
            self.topo.next_report = now + REPORT_PERIOD;
            self.topology_send_reports();
        }
        if self.core.is_some() {
            self.topology_decide();
        }
    }

    /// Results of finished blocking jobs.
    fn topology_collect(&mut self) {
        let done = std::mem::take(&mut *self.topo.done.lock().expect("topology done lock"));
        for d in done {
            match d {
                Done::Applied { report } => {
                    self.topo.running.remove(&report.name);
                    if report.status == "error" {
                        tracing::warn!(
                            name = report.name,
                            version = report.version,
                            "topology apply: {}",
                            report.error
                        );
                        self.topo
                            .retry_at
                            .insert(report.name.clone(), Instant::now() + RETRY_AFTER);
                    } else {
                        tracing::info!(
                            name = report.name,
                            version = report.version,
                            activation_index = report.activation_index,
                            status = report.status,
                            "topology activation handled{}",
                            if report.error.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", report.error)
                            }
                        );
                        self.topo.retry_at.remove(&report.name);
                    }
                    if !report.drift.is_empty() {
                        self.topo.drift.insert(report.name.clone(), report.drift.clone());
                    }
                    self.topo.results.insert(report.name.clone(), report);
                    // Tell the managers now rather than at the next period.
                    self.topo.next_report = Instant::now();
                }
                Done::Drift { name, drift } => {
                    self.topo.checking = false;
                    if name.is_empty() {
                        continue;
                    }
                    if drift.is_empty() {
                        self.topo.drift.remove(&name);
                    } else {
                        self.topo.drift.insert(name, drift);
                    }
                }
            }
        }
    }

    /// Keeps this member's `topology:NAME` tags equal to its watches.
    fn topology_tags(&mut self) {
        let now = Instant::now();
        if now < self.topo.next_tags || self.client.pending() != 0 {
            return;
        }
        let Some(mine) = self.cluster_state().members.get(&self.me.to_bytes()).cloned() else {
            return;
        };
        let mut want: Vec<String> = mine
            .tags
            .iter()
            .filter(|t| !t.starts_with(rules::SUBSCRIPTION_TAG_PREFIX))
            .cloned()
            .collect();
        want.extend(self.topo.watches.keys().map(|n| rules::subscription_tag(n)));
        let have: BTreeSet<&String> = mine.tags.iter().collect();
        if want.iter().collect::<BTreeSet<_>>() == have {
            return;
        }
        self.topo.next_tags = now + Duration::from_secs(2);
        tracing::info!(tags = ?want, "topology: updating this member's subscriptions");
        let (tx, rx) = oneshot::channel();
        self.propose(
            vec![CCommand::UpdateMember {
                peer: mine.peer,
                addrs: mine.addrs,
                tags: want,
                capacity_bytes: mine.capacity_bytes,
            }],
            tx,
        );
        tokio::spawn(async move {
            if let Ok(Ok((_, Outcome::Rejected(why)))) = rx.await {
                tracing::warn!("topology subscription refused: {why}");
            }
        });
    }

    /// Router side: fetch the versions this node needs, apply the ones it has not applied.
    fn topology_router(&mut self) {
        if self.topo.watches.is_empty() {
            return;
        }
        let me = self.me.to_bytes();
        let state = self.cluster_state();
        let targets = rules::targets(state, &me);
        // Hold the target and the version waiting for activation (so the leader sees it held).
        let mut wanted: BTreeSet<Cid> = BTreeSet::new();
        for name in self.topo.watches.keys() {
            let Some(t) = state.topologies.get(name) else { continue };
            if let Some(v) = t.versions.last()
                && matches!(v.state, VersionState::Staged | VersionState::Canary)
                && let Ok(c) = Cid::from_bytes(&v.root)
            {
                wanted.insert(c);
            }
            if let Some(p) = t.canary_phase
                && let Some(v) = t.version(p.version)
                && let Ok(c) = Cid::from_bytes(&v.root)
            {
                wanted.insert(c);
            }
        }
        for t in &targets {
            if self.topo.watches.contains_key(&t.name)
                && let Ok(c) = Cid::from_bytes(&t.root)
            {
                wanted.insert(c);
            }
        }
        let now = Instant::now();
        self.topo.fetched_at.retain(|c, _| wanted.contains(c));
        for root in wanted {
            if matches!(self.store.root(&root), Ok(Some(_))) {
                continue;
            }
            let recent = self.topo.fetched_at.get(&root).is_some_and(|t| now < *t + RETRY_AFTER);
            if !self.jobs.contains_key(&root) && !recent {
                tracing::info!(%root, "topology: fetching a version");
                self.topo.fetched_at.insert(root, now);
                self.start_fetch(root, None);
            }
            if self.topo.dialed_at.get(&root).is_none_or(|t| now >= *t + DIAL_PERIOD) {
                self.topo.dialed_at.insert(root, now);
                self.topology_dial_holders(&root);
            }
        }
        self.topo.dialed_at.retain(|c, _| self.jobs.contains_key(c));
        for target in targets {
            let name = target.name.clone();
            let Some(watch) = self.topo.watches.get(&name).cloned() else { continue };
            if self.topo.running.contains(&name) {
                continue;
            }
            let handled = self.topo.results.get(&name).is_some_and(|r| {
                r.activation_index == target.activation_index && r.status != "error"
            });
            if handled || self.topo.retry_at.get(&name).is_some_and(|t| now < *t) {
                continue;
            }
            let Ok(cid) = Cid::from_bytes(&target.root) else { continue };
            if !matches!(self.store.root(&cid), Ok(Some(_))) {
                continue; // being fetched
            }
            self.topo.running.insert(name.clone());
            tracing::info!(
                name,
                version = target.version,
                index = target.activation_index,
                canary = target.canary,
                "topology: applying"
            );
            let store = self.store.clone();
            let data_dir = self.dir.path.clone();
            let done = self.topo.done.clone();
            tokio::task::spawn_blocking(move || {
                let d = apply_job(&store, &data_dir, &watch, &target, cid);
                done.lock().expect("topology done lock").push(d);
            });
        }
        // Drift: the file against the version it should hold, now and then.
        if now >= self.topo.next_drift && !self.topo.checking {
            self.topo.next_drift = now + DRIFT_PERIOD;
            let checks: Vec<(Watch, u64, Cid)> = rules::targets(self.cluster_state(), &me)
                .into_iter()
                .filter(|t| !self.topo.running.contains(&t.name))
                .filter_map(|t| {
                    let w = self.topo.watches.get(&t.name)?.clone();
                    Some((w, t.version, Cid::from_bytes(&t.root).ok()?))
                })
                .collect();
            if checks.is_empty() {
                return;
            }
            self.topo.checking = true;
            let store = self.store.clone();
            let done = self.topo.done.clone();
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                for (w, version, cid) in checks {
                    let drift = restore::read_object(&store, &cid)
                        .ok()
                        .and_then(|c| apply::drift(&w, version, &c).ok())
                        .map_or(String::new(), |d| drift_text(d).to_owned());
                    out.push(Done::Drift { name: w.name.clone(), drift });
                }
                // Marks the check finished even if every entry failed.
                out.push(Done::Drift { name: String::new(), drift: String::new() });
                done.lock().expect("topology done lock").extend(out);
            });
        }
    }

    /// Dials the members gossip says hold `root` (in full or in part) and that this node is
    /// not connected to, at their committed addresses: routers are usually connected to the
    /// managers only, and a dial by PeerId alone finds no address for another router.
    fn topology_dial_holders(&mut self, root: &Cid) {
        let holders: Vec<PeerId> = self
            .directory
            .holders(root)
            .iter()
            .filter_map(|h| net::libp2p_peer(&h.peer))
            .filter(|p| *p != self.me && !self.connected.contains_key(p))
            .collect();
        for p in holders {
            self.dial_member(p);
        }
    }

    /// One report per watched name: the last result (if any), the drift, and whether the
    /// version waiting for activation is held here.
    fn my_reports(&self) -> Vec<TopologyReport> {
        let state = self.cluster_state();
        self.topo
            .watches
            .keys()
            .map(|name| {
                let mut r = self.topo.results.get(name).cloned().unwrap_or(TopologyReport {
                    name: name.clone(),
                    activation_index: 0,
                    version: 0,
                    applied_version: 0,
                    applied: false,
                    status: "none".into(),
                    error: String::new(),
                    drift: String::new(),
                    holding: 0,
                });
                if let Some(d) = self.topo.drift.get(name) {
                    r.drift.clone_from(d);
                }
                r.holding = state
                    .topologies
                    .get(name)
                    .and_then(|t| t.versions.last())
                    .filter(|v| matches!(v.state, VersionState::Staged | VersionState::Canary))
                    .filter(|v| {
                        Cid::from_bytes(&v.root)
                            .is_ok_and(|c| matches!(self.store.root(&c), Ok(Some(_))))
                    })
                    .map_or(0, |v| v.number);
                r
            })
            .collect()
    }

    /// Sends this router's results to every connected manager (and keeps them here if this
    /// node is one).
    fn topology_send_reports(&mut self) {
        let reports = self.my_reports();
        if self.core.is_some() {
            self.topo.reports.insert(self.me, (Instant::now(), reports.clone()));
        }
        if reports.is_empty() {
            return;
        }
        for m in self.connected_managers() {
            let link = self.clink(m);
            link.send(ClusterFrame::TopologyReport { reports: reports.clone() });
        }
    }

    /// A router's reports arrived (managers keep them; others ignore them).
    pub(super) fn on_topology_report(
        &mut self,
        peer: PeerId,
        member: bool,
        reports: Vec<TopologyReport>,
    ) {
        if !member || self.core.is_none() || reports.len() > rules::NAMES_MAX {
            return;
        }
        let reports = reports
            .into_iter()
            .map(|mut r| {
                r.error = clip(&r.error);
                r.status = clip(&r.status);
                r.drift = clip(&r.drift);
                r
            })
            .collect();
        self.topo.reports.insert(peer, (Instant::now(), reports));
    }

    /// Whether a member counts as live for topology decisions: this node, a node heard by
    /// gossip within `node_lost_ms`, or one whose report arrived within [`REPORT_LIVE`].
    fn topology_live(&self, peer: &[u8]) -> bool {
        let Ok(p) = PeerId::from_bytes(peer) else { return false };
        if p == self.me {
            return true;
        }
        let now = self.ts();
        let heard = self
            .directory
            .node(&net::core_peer(&p))
            .is_some_and(|n| now.since(n.seen) <= self.config.node.node_lost_ms);
        let reported = self.topo.reports.get(&p).is_some_and(|(at, _)| at.elapsed() <= REPORT_LIVE)
            && self.connected.contains_key(&p);
        heard || reported
    }

    fn report_of(&self, peer: &[u8], name: &str) -> Option<TopologyReport> {
        let p = PeerId::from_bytes(peer).ok()?;
        if p == self.me {
            return self.my_reports().into_iter().find(|r| r.name == name);
        }
        self.topo.reports.get(&p)?.1.iter().find(|r| r.name == name).cloned()
    }

    /// Whether `peer` holds `root` completely, as gossip (or its report) says.
    fn topology_holds(&self, peer: &[u8], root: &[u8], name: &str, version: u64) -> bool {
        let Ok(p) = PeerId::from_bytes(peer) else { return false };
        let Ok(cid) = Cid::from_bytes(root) else { return false };
        if p == self.me {
            return matches!(self.store.root(&cid), Ok(Some(_)));
        }
        let gossip =
            self.directory.holding(&cid, &net::core_peer(&p)).is_some_and(|(complete, _)| complete);
        gossip
            || self
                .report_of(peer, name)
                .is_some_and(|r| r.applied_version == version || r.holding == version)
    }

    /// The observation of one version of `name`.
    fn topology_observe(&self, state: &ClusterState, name: &str, version: u64) -> Observation {
        let mut obs = Observation::default();
        let Some(v) = state.topologies.get(name).and_then(|t| t.version(version)) else {
            return obs;
        };
        for m in state.members.values().filter(|m| rules::subscribed(m, name)) {
            if !self.topology_live(&m.peer) {
                continue;
            }
            obs.live.insert(m.peer.clone());
            if self.topology_holds(&m.peer, &v.root, name, version) {
                obs.holders.insert(m.peer.clone());
            }
            if let Some(r) = self.report_of(&m.peer, name).filter(|r| r.activation_index > 0) {
                obs.hooks.insert(
                    m.peer.clone(),
                    HookResult { activation_index: r.activation_index, applied: r.applied },
                );
            }
        }
        obs
    }

    /// Managers: feed the decider; the leader proposes its decisions.
    fn topology_decide(&mut self) {
        // Reports of members that left are dropped.
        let state = self.cluster_state();
        let members: BTreeSet<PeerId> = crate::cluster::member_peers(state).into_iter().collect();
        let mut observations = Vec::new();
        for (name, t) in &state.topologies {
            let pending = match t.canary_phase {
                Some(p) => Some(p.version),
                None => {
                    t.versions.last().filter(|v| v.state == VersionState::Staged).map(|v| v.number)
                }
            };
            if let Some(version) = pending {
                observations.push((
                    name.clone(),
                    version,
                    self.topology_observe(state, name, version),
                ));
            }
        }
        self.topo.reports.retain(|p, _| members.contains(p));
        for (name, version, obs) in observations {
            self.topo.decider.handle_observation(&name, version, obs);
        }
        let leading = self.core.as_ref().is_some_and(mycel_consensus::Core::is_leader);
        if !leading {
            return;
        }
        let now = mycel_consensus::Timestamp(self.ts().0);
        let batches = {
            let Daemon { core, follower, topo, .. } = self;
            let state = match core {
                Some(c) if c.state().applied_index >= follower.state().applied_index => c.state(),
                _ => follower.state(),
            };
            topo.decider.poll(state, now)
        };
        for commands in batches {
            tracing::info!(?commands, "topology: the leader proposes");
            let (tx, rx) = oneshot::channel();
            self.propose(commands, tx);
            tokio::spawn(async move {
                if let Ok(Ok((_, Outcome::Rejected(why)))) = rx.await {
                    tracing::info!("topology decision not applied: {why}");
                }
            });
        }
    }

    /// Answers an API request.
    pub(super) fn on_topology_request(&mut self, request: Request) {
        match request {
            Request::View { name, reply } => {
                let _ = reply.send(self.topology_view(name.as_deref()));
            }
            Request::Status { name, reply } => {
                let _ = reply.send(self.topology_status(&name));
            }
            Request::Watch { config, reply } => {
                let r = self.topology_watch(config);
                let _ = reply.send(r);
            }
            Request::Unwatch { name, reply } => {
                let r = if self.topo.configured.contains_key(&name) {
                    Err(format!("{name} is watched in config.toml: remove it there and restart"))
                } else if self.topo.added.remove(&name).is_none() {
                    Err(format!("{name} is not watched"))
                } else {
                    save_added(&self.dir.path, &self.topo.added).map(|()| {
                        self.topo.rebuild();
                        self.topo.next_tags = Instant::now();
                        json!({"unwatched": name})
                    })
                };
                let _ = reply.send(r);
            }
        }
    }

    fn topology_watch(&mut self, config: WatchConfig) -> Result<serde_json::Value, String> {
        let watch = config.watch().map_err(|e| e.to_string())?;
        if self.topo.configured.contains_key(&config.name) {
            return Err(format!("{} is already watched in config.toml", config.name));
        }
        if !watch.path.is_absolute() {
            return Err(format!("{}: the output path must be absolute", watch.path.display()));
        }
        if let Some(parent) = watch.path.parent()
            && !parent.as_os_str().is_empty()
            && !parent.is_dir()
        {
            return Err(format!("{}: no such directory", parent.display()));
        }
        let old = self.topo.added.insert(config.name.clone(), config.clone());
        if let Err(e) = save_added(&self.dir.path, &self.topo.added) {
            match old {
                Some(o) => self.topo.added.insert(config.name.clone(), o),
                None => self.topo.added.remove(&config.name),
            };
            return Err(e);
        }
        self.topo.rebuild();
        self.topo.next_tags = Instant::now();
        // A changed watch applies the current activation again.
        self.topo.results.remove(&config.name);
        Ok(json!({
            "name": watch.name,
            "out": watch.path,
            "format": watch.format.to_string(),
            "exec": watch.hook,
            "hook_timeout_ms": watch.hook_timeout_ms,
        }))
    }

    fn peer_text(b: &[u8]) -> String {
        PeerId::from_bytes(b).map_or_else(|_| "?".into(), |p| p.to_string())
    }

    fn topology_view(&self, only: Option<&str>) -> serde_json::Value {
        let state = self.cluster_state();
        let one = |name: &str, t: &rules::Topology| {
            let subscribed: Vec<&mycel_consensus::command::Member> =
                state.members.values().filter(|m| rules::subscribed(m, name)).collect();
            let versions: Vec<serde_json::Value> = t
                .versions
                .iter()
                .map(|v| {
                    let holding = subscribed
                        .iter()
                        .filter(|m| self.topology_holds(&m.peer, &v.root, name, v.number))
                        .count();
                    let applied = subscribed
                        .iter()
                        .filter(|m| {
                            self.report_of(&m.peer, name)
                                .is_some_and(|r| r.applied_version == v.number)
                        })
                        .count();
                    let cid = |b: &[u8]| {
                        Cid::from_bytes(b).map_or_else(|_| "?".into(), |c| c.to_string())
                    };
                    json!({
                        "version": v.number,
                        "cid": cid(&v.root),
                        "source_cid": cid(&v.source),
                        "proposer": Daemon::peer_text(&v.proposer),
                        "proposed_ms": v.proposed_ms,
                        "staged_index": v.staged_index,
                        "state": v.state.as_str(),
                        "holding": holding,
                        "applied": applied,
                    })
                })
                .collect();
            json!({
                "name": name,
                "latest": t.latest(),
                "active": t.active,
                "activated_index": t.activated_index,
                "schema": String::from_utf8_lossy(&t.schema),
                "canary": t.canary.as_ref().map(|c| json!({"subjects": c.subjects, "fail_pct_max": c.fail_pct_max})),
                "canary_phase": t.canary_phase.map(|p| json!({"version": p.version, "started_index": p.started_index})),
                "share_permille": rules::activation_share(state, name).permille(),
                "subscribed": subscribed.len(),
                "versions": versions,
            })
        };
        match only {
            Some(name) => match state.topologies.get(name) {
                Some(t) => one(name, t),
                None => json!({"name": name, "latest": 0, "active": null, "versions": [],
                    "schema": "", "canary": null, "canary_phase": null}),
            },
            None => json!({
                "topologies": state.topologies.iter().map(|(n, t)| json!({
                    "name": n, "latest": t.latest(), "active": t.active,
                    "canary_phase": t.canary_phase.map(|p| p.version),
                })).collect::<Vec<_>>(),
                "watches": self.topo.watches.values().map(|w| json!({
                    "name": w.name, "out": w.path, "format": w.format.to_string(),
                    "exec": w.hook, "config_file": self.topo.configured.contains_key(&w.name),
                })).collect::<Vec<_>>(),
            }),
        }
    }

    fn topology_status(&self, name: &str) -> serde_json::Value {
        let state = self.cluster_state();
        let t = state.topologies.get(name);
        let routers: Vec<serde_json::Value> = state
            .members
            .values()
            .filter(|m| rules::subscribed(m, name))
            .map(|m| {
                let target = rules::target(state, name, &m.peer);
                let report = self.report_of(&m.peer, name);
                let age_ms = PeerId::from_bytes(&m.peer)
                    .ok()
                    .and_then(|p| self.topo.reports.get(&p))
                    .map(|(at, _)| at.elapsed().as_millis() as u64);
                let in_sync = report.as_ref().is_some_and(|r| {
                    target
                        .as_ref()
                        .is_some_and(|t| r.applied_version == t.version && r.drift == "in sync")
                });
                json!({
                    "peer_id": Daemon::peer_text(&m.peer),
                    "role": m.role.as_str(),
                    "zone": m.zone,
                    "live": self.topology_live(&m.peer),
                    "target_version": target.as_ref().map(|t| t.version),
                    "canary": target.as_ref().is_some_and(|t| t.canary),
                    "applied_version": report.as_ref().map(|r| r.applied_version),
                    "activation_index": report.as_ref().map(|r| r.activation_index),
                    "status": report.as_ref().map(|r| r.status.clone()),
                    "error": report.as_ref().map(|r| r.error.clone()).filter(|e| !e.is_empty()),
                    "drift": report.as_ref().map(|r| r.drift.clone()).filter(|d| !d.is_empty()),
                    "in_sync": in_sync,
                    "report_age_ms": age_ms,
                })
            })
            .collect();
        json!({
            "name": name,
            "active": t.and_then(|t| t.active),
            "activated_index": t.map(|t| t.activated_index),
            "canary_phase": t.and_then(|t| t.canary_phase).map(|p| p.version),
            "manager": self.core.is_some(),
            "routers": routers,
        })
    }
}
