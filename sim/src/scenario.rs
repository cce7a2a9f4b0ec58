//! Scenarios: the fleet (nodes, roles, zones, links), the workload and the fault plan, read
//! from TOML files in `configs/sim/` or built from command-line flags, and the swarm draw
//! that gives each seed its own fault mix.
//!
//! Durations are strings with a unit (`"500ms"`, `"30s"`, `"10m"`, `"1h"`). A malformed file
//! is an error naming the line and column, never a panic.

use std::collections::BTreeSet;
use std::fmt;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Deserializer, Serialize};

/// Most nodes one run may simulate (bounds memory).
pub const NODES_MAX: u32 = 10_000;
/// Longest faulty phase.
pub const DURATION_MAX_MS: u64 = 24 * 3_600_000;

/// A duration in milliseconds, written with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Millis(pub u64);

impl Millis {
    /// Parses `500ms`, `30s`, `10m`, `1h` (a bare number is milliseconds).
    ///
    /// # Errors
    /// A message naming the accepted forms.
    pub fn parse(s: &str) -> Result<Millis, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("bad duration {s:?}: use e.g. 500ms, 30s, 10m"))?;
        let scale = match unit {
            "" | "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
        };
        n.checked_mul(scale).map(Millis).ok_or_else(|| format!("duration {s:?} too large"))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(Millis(n)),
            Raw::Text(s) => Millis::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One zone of the fleet.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// Its name.
    pub name: String,
    /// Share of the edges placed here (relative weight).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Latency and bandwidth between two zones.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkPair {
    /// One zone.
    pub a: String,
    /// The other.
    pub b: String,
    /// One-way latency.
    pub latency: Millis,
    /// Bandwidth in megabits per second.
    #[serde(default)]
    pub bandwidth_mbps: Option<u32>,
}

/// The network: defaults plus a zone-pair matrix.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Links {
    /// One-way latency within a zone.
    pub same_zone: Millis,
    /// One-way latency between zones not listed in `pairs`.
    pub cross_zone: Millis,
    /// Random extra latency per message, at most.
    pub jitter: Millis,
    /// Upload bandwidth of every node, megabits per second.
    pub bandwidth_mbps: u32,
    /// Zone pairs with their own latency and bandwidth.
    pub pairs: Vec<LinkPair>,
}

impl Default for Links {
    fn default() -> Links {
        Links {
            same_zone: Millis(2),
            cross_zone: Millis(40),
            jitter: Millis(3),
            bandwidth_mbps: 200,
            pairs: Vec::new(),
        }
    }
}

/// What the fleet does.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Objects published during the faulty phase.
    pub objects: u32,
    /// Smallest object.
    pub object_kib_min: u32,
    /// Largest object.
    pub object_kib_max: u32,
    /// Fewest replicas per pin.
    pub replicas_min: u32,
    /// Most replicas per pin.
    pub replicas_max: u32,
    /// Share (percent) of objects placed in a zone's own namespace, readable only there.
    pub restricted_pct: u32,
    /// Objects pre-positioned to every edge of one zone.
    pub prepositions: u32,
    /// Size of a pre-positioned object (a large one), KiB.
    pub preposition_kib: u32,
    /// Attempts by edges to fetch content of a namespace they may not read.
    pub curious_fetches: u32,
    /// Temporary grants: an edge may read another zone's namespace for a while (it fetches
    /// from it), then the grant is revoked.
    pub grants: u32,
    /// Pre-position deadline after the publish (0: none).
    pub preposition_deadline: Millis,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            objects: 8,
            object_kib_min: 32,
            object_kib_max: 256,
            replicas_min: 2,
            replicas_max: 3,
            restricted_pct: 30,
            prepositions: 0,
            preposition_kib: 1024,
            curious_fetches: 4,
            grants: 0,
            preposition_deadline: Millis(0),
        }
    }
}

/// Routers sharing a topology file, and the changes proposed to it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// Members with the router role (the last nodes of the fleet), subscribed to `name`.
    pub routers: u32,
    /// The topology name.
    pub name: String,
    /// Versions proposed by routers during the faulty phase.
    pub versions: u32,
    /// Rollbacks during the faulty phase: a manager activates an earlier version.
    pub rollbacks: u32,
    /// Canary: the routers of the first zone holding routers take each version first.
    pub canary: bool,
    /// Roll a canary back when more than this percentage of its hooks fail.
    pub canary_fail_pct: u32,
    /// Probability (percent) that a canary router's hook fails during the faulty phase.
    pub hook_fail_pct: u32,
    /// Swarm mode with a drawn node count: the share (percent) of seeds that draw routers
    /// and a topology workload (when `routers` is 0).
    pub swarm_pct: u32,
}

impl Default for Topology {
    fn default() -> Topology {
        Topology {
            routers: 0,
            name: "fleet".into(),
            versions: 4,
            rollbacks: 1,
            canary: false,
            canary_fail_pct: 50,
            hook_fail_pct: 0,
            swarm_pct: 0,
        }
    }
}

/// How faults are chosen.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FaultMode {
    /// Each seed draws its own mix and rates.
    #[default]
    Swarm,
    /// Only the timeline.
    Scripted,
    /// No faults at all.
    None,
}

/// One scripted fault.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When (since the start).
    pub at: Millis,
    /// What: `crash`, `restart`, `kill` (crash for good), `pause`, `isolate`,
    /// `partition-zones`, `one-way`, `loss`, `heal`; with routers, also
    /// `topology-propose` (a router proposes a new version) and `topology-rollback` (a
    /// manager activates an earlier version).
    pub action: String,
    /// The node (by index), for node faults; `-1` or absent with `role` picks one.
    #[serde(default)]
    pub node: Option<u32>,
    /// Pick a live node of this role (`manager`, `edge`, `router`) when `node` is absent.
    #[serde(default)]
    pub role: Option<String>,
    /// The other node of a one-way cut.
    #[serde(default)]
    pub to: Option<u32>,
    /// Zones on one side of a partition.
    #[serde(default)]
    pub zones: Vec<String>,
    /// How long a pause lasts.
    #[serde(default)]
    pub duration: Option<Millis>,
    /// Loss probability for `loss`.
    #[serde(default)]
    pub rate: Option<f64>,
}

/// The fault plan.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Swarm, scripted or none.
    pub mode: FaultMode,
    /// Scripted faults (also applied in swarm mode).
    pub timeline: Vec<Step>,
    /// Hostile members (corrupt chunks, oversized frames); in swarm mode, at most this many.
    pub hostile: u32,
    /// Non-members trying to fetch; in swarm mode, at most this many.
    pub outsiders: u32,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults { mode: FaultMode::Swarm, timeline: Vec::new(), hostile: 1, outsiders: 1 }
    }
}

/// A whole scenario.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// Nodes in all (managers included, outsiders not).
    pub nodes: u32,
    /// If above `nodes`, each seed draws its node count from `nodes..=nodes_max` (and 3 or
    /// 5 managers when there are enough nodes).
    pub nodes_max: u32,
    /// Managers (Raft voters at bootstrap): 1, 3 or 5.
    pub managers: u32,
    /// Edges tagged `manager-eligible` (replacements for lost managers).
    pub eligible: u32,
    /// The faulty phase; the healed phase follows until everything converges.
    pub duration: Millis,
    /// Zones (edges spread by weight; managers one per zone in turn).
    pub zones: Vec<Zone>,
    /// The network.
    pub links: Links,
    /// The workload.
    pub workload: Workload,
    /// The fault plan.
    pub faults: Faults,
    /// Routers and their topology file.
    pub topology: Topology,
    /// How often nodes announce what they hold.
    pub announce_period: Millis,
    /// How often nodes run the replication plan.
    pub plan_period: Millis,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            name: "default".into(),
            nodes: 10,
            nodes_max: 0,
            managers: 3,
            eligible: 2,
            duration: Millis(120_000),
            zones: vec![
                Zone { name: "eu".into(), weight: 1 },
                Zone { name: "us".into(), weight: 1 },
                Zone { name: "ap".into(), weight: 1 },
            ],
            links: Links::default(),
            workload: Workload::default(),
            faults: Faults::default(),
            topology: Topology::default(),
            announce_period: Millis(5_000),
            plan_period: Millis(5_000),
        }
    }
}

/// A scenario that cannot be run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The TOML did not parse (the message names the line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, with line and column.
        message: String,
    },
    /// It parsed but breaks a rule.
    #[error("scenario {name:?}: {message}")]
    Invalid {
        /// The scenario's name.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl Scenario {
    /// Parses a scenario from TOML text (`path` names it in errors) and validates it.
    ///
    /// # Errors
    /// [`ScenarioError`] with the line of a syntax error or the broken rule.
    pub fn from_toml(path: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse { path: path.into(), message: e.to_string() })?;
        s.validate()?;
        Ok(s)
    }

    /// Checks the rules a run depends on.
    ///
    /// # Errors
    /// [`ScenarioError::Invalid`] naming the rule.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid { name: self.name.clone(), message: m });
        if self.managers == 0 || self.managers > 7 {
            return bad(format!("managers must be 1 to 7, not {}", self.managers));
        }
        if self.nodes < self.managers + 1 || self.nodes > NODES_MAX {
            return bad(format!(
                "nodes must be more than the managers and at most {NODES_MAX}, not {}",
                self.nodes
            ));
        }
        if self.nodes_max > NODES_MAX {
            return bad(format!("nodes_max must be at most {NODES_MAX}"));
        }
        if self.eligible > self.nodes - self.managers {
            return bad("more manager-eligible edges than edges".into());
        }
        if self.duration.0 == 0 || self.duration.0 > DURATION_MAX_MS {
            return bad(format!("duration must be within 1ms..24h, not {}", self.duration));
        }
        if self.zones.is_empty() || self.zones.iter().all(|z| z.weight == 0) {
            return bad("at least one zone with a positive weight".into());
        }
        let mut names = BTreeSet::new();
        for z in &self.zones {
            if z.name.is_empty() || z.name.len() > 32 || !names.insert(z.name.clone()) {
                return bad(format!("zone names must be unique, 1 to 32 bytes: {:?}", z.name));
            }
        }
        for p in &self.links.pairs {
            if !names.contains(&p.a) || !names.contains(&p.b) {
                return bad(format!("link pair {}-{} names an unknown zone", p.a, p.b));
            }
        }
        if self.links.bandwidth_mbps == 0 {
            return bad("bandwidth_mbps must be positive".into());
        }
        let w = &self.workload;
        if w.object_kib_min == 0
            || w.object_kib_min > w.object_kib_max
            || w.object_kib_max > 64 * 1024
        {
            return bad("object sizes must satisfy 1 <= min <= max <= 65536 KiB".into());
        }
        if w.replicas_min == 0 || w.replicas_min > w.replicas_max {
            return bad("replicas must satisfy 1 <= min <= max".into());
        }
        if w.objects > 10_000
            || w.grants > 1_000
            || w.prepositions > 100
            || w.preposition_kib > 256 * 1024
        {
            return bad(
                "workload over its bounds (10000 objects, 100 pre-positions of 256 MiB)".into()
            );
        }
        if w.restricted_pct > 100 {
            return bad("restricted_pct is a percentage".into());
        }
        let t = &self.topology;
        if t.routers > 0 && self.nodes < self.managers + t.routers + self.eligible.max(1) {
            return bad(format!(
                "{} routers leave no edge: nodes must be at least managers + routers + max(eligible, 1)",
                t.routers
            ));
        }
        if let Err(e) = mycel_consensus::topology::validate_name(&t.name) {
            return bad(format!("topology: {e}"));
        }
        if t.versions > 1_000 || t.rollbacks > 1_000 {
            return bad("topology: at most 1000 versions and 1000 rollbacks".into());
        }
        if t.canary_fail_pct > 100 || t.hook_fail_pct > 100 || t.swarm_pct > 100 {
            return bad(
                "topology: canary_fail_pct, hook_fail_pct and swarm_pct are percentages".into()
            );
        }
        if self.announce_period.0 < 100 || self.plan_period.0 < 100 {
            return bad("announce and plan periods must be at least 100ms".into());
        }
        for s in &self.faults.timeline {
            const ACTIONS: [&str; 11] = [
                "crash",
                "restart",
                "kill",
                "pause",
                "isolate",
                "partition-zones",
                "one-way",
                "loss",
                "heal",
                "topology-propose",
                "topology-rollback",
            ];
            if !ACTIONS.contains(&s.action.as_str()) {
                return bad(format!("unknown fault action {:?}: one of {ACTIONS:?}", s.action));
            }
            if let Some(n) = s.node
                && n >= self.nodes
            {
                return bad(format!("fault at {} names node {n} of {}", s.at, self.nodes));
            }
            if s.at.0 > self.duration.0 {
                return bad(format!("fault at {} is after the faulty phase", s.at));
            }
            if s.rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                return bad("fault rates are probabilities".into());
            }
        }
        Ok(())
    }

    /// A digest of the scenario, for reproduce commands.
    pub fn hash(&self) -> String {
        let text = toml::to_string(self).unwrap_or_default();
        blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
    }
}

/// The fault rates one seed runs with.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Mix {
    /// Message loss probability.
    pub loss: f64,
    /// Duplication probability.
    pub dup: f64,
    /// Extra random delay, at most (reordering).
    pub reorder_ms: u64,
    /// Partitions started per simulated minute.
    pub partitions_per_min: f64,
    /// Crashes per simulated minute.
    pub crashes_per_min: f64,
    /// Pauses per simulated minute.
    pub pauses_per_min: f64,
    /// Largest clock skew.
    pub skew_ms: u64,
    /// Largest clock drift, parts per million.
    pub drift_ppm: u64,
    /// Bit flips in stored blocks per simulated minute.
    pub bitflips_per_min: f64,
    /// Failed fsyncs per simulated minute (the node must fail-stop).
    pub fsync_failures_per_min: f64,
    /// Read errors: probability per served block.
    pub read_error: f64,
    /// Write errors: probability per fetched block written.
    pub write_error: f64,
    /// Crashes lose or tear the writes not yet synced.
    pub torn_writes: bool,
    /// Probability that a voter crashes right after granting a vote (a chosen crash
    /// point), restarting within 100 ms; half the time the vote never leaves.
    pub vote_crash: f64,
    /// Hostile members.
    pub hostile: u32,
    /// Non-members trying to fetch.
    pub outsiders: u32,
}

impl Mix {
    /// The swarm draw: each fault is on or off, and its rate is drawn, so seeds explore
    /// different combinations (swarm testing).
    pub fn draw(rng: &mut ChaCha8Rng, faults: &Faults) -> Mix {
        let mut pick = |p: f64| rng.gen_bool(p);
        let (loss_on, dup_on, reorder_on, part_on, crash_on, pause_on, skew_on, disk_on, fsync_on) = (
            pick(0.6),
            pick(0.4),
            pick(0.5),
            pick(0.5),
            pick(0.6),
            pick(0.3),
            pick(0.5),
            pick(0.4),
            pick(0.2),
        );
        let read_on = pick(0.3);
        let vote_on = pick(0.3);
        let write_on = pick(0.3);
        let torn_writes = pick(0.5);
        Mix {
            loss: if loss_on { rng.gen_range(0.001..0.15) } else { 0.0 },
            dup: if dup_on { rng.gen_range(0.001..0.05) } else { 0.0 },
            reorder_ms: if reorder_on { rng.gen_range(1..200) } else { 0 },
            partitions_per_min: if part_on { rng.gen_range(0.5..4.0) } else { 0.0 },
            crashes_per_min: if crash_on { rng.gen_range(0.5..6.0) } else { 0.0 },
            pauses_per_min: if pause_on { rng.gen_range(0.5..4.0) } else { 0.0 },
            skew_ms: if skew_on { rng.gen_range(1..5_000) } else { 0 },
            drift_ppm: if skew_on { rng.gen_range(0..500) } else { 0 },
            bitflips_per_min: if disk_on { rng.gen_range(0.5..5.0) } else { 0.0 },
            fsync_failures_per_min: if fsync_on { rng.gen_range(0.2..1.0) } else { 0.0 },
            read_error: if read_on { rng.gen_range(0.001..0.02) } else { 0.0 },
            write_error: if write_on { rng.gen_range(0.001..0.02) } else { 0.0 },
            torn_writes,
            vote_crash: if vote_on { rng.gen_range(0.2..0.8) } else { 0.0 },
            hostile: rng.gen_range(0..=faults.hostile),
            outsiders: rng.gen_range(0..=faults.outsiders),
        }
    }

    /// The scripted plan's mix: the configured hostile peers and outsiders, nothing random.
    pub fn scripted(faults: &Faults) -> Mix {
        Mix { hostile: faults.hostile, outsiders: faults.outsiders, ..Mix::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_errors_name_the_problem() {
        // Units parse; a bad file names its line; a broken rule names the rule.
        assert_eq!(Millis::parse("10m").unwrap(), Millis(600_000));
        assert_eq!(Millis::parse("250ms").unwrap(), Millis(250));
        assert!(Millis::parse("3 weeks").is_err());
        let err = Scenario::from_toml("x.toml", "name = \"a\"\nnodes = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = Scenario::from_toml("x.toml", "managers = 0\n").unwrap_err();
        assert!(err.to_string().contains("managers"), "{err}");
        let err = Scenario::from_toml("x.toml", "bogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
