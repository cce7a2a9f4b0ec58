//! What a run reports: counts, faults injected by kind, convergence times, violations, the
//! trace hash, and how to reproduce it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::scenario::Mix;

/// The commit the simulator was built from.
pub const COMMIT: &str = env!("MYCEL_SIM_COMMIT");

/// One broken property.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Simulated time, milliseconds.
    pub at_ms: u64,
    /// Which checker: `safety:...` or `liveness:...`.
    pub check: String,
    /// What happened.
    pub detail: String,
}

/// Simulated milliseconds from the heal to each convergence goal (None: not reached).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Convergence {
    /// A leader all live voters follow.
    pub leader_ms: Option<u64>,
    /// Every live node on the latest configuration.
    pub config_ms: Option<u64>,
    /// Every pin at its minimum replicas and every pre-position complete.
    pub replicas_ms: Option<u64>,
    /// Every live router applied the active version of its topology file, and no version
    /// waits for activation (runs with routers).
    pub topology_ms: Option<u64>,
}

/// What a run with routers did to their topology file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TopologyStats {
    /// Routers in the fleet.
    pub routers: u32,
    /// Stage proposals made by routers.
    pub proposed: u64,
    /// Versions committed (the latest version number seen in a manager's state).
    pub staged: u64,
    /// Distinct activations committed (canary starts included).
    pub activations: u64,
    /// Rollbacks proposed (a manager activating an earlier version).
    pub rollbacks: u64,
    /// Decisions the leaders' deciders proposed.
    pub decisions: u64,
    /// Activations applied by routers (hook run).
    pub applies: u64,
    /// Canary hooks that failed (the previous file restored).
    pub hook_failures: u64,
    /// Apply records lost in a crash before they were synced.
    pub records_lost: u64,
    /// Hooks run a second time for an activation index the router had handled (after a
    /// canary rollback; docs/sim.md, known limits).
    pub hook_reruns: u64,
}

/// The outcome of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The scenario's name.
    pub scenario: String,
    /// The scenario's hash.
    pub scenario_hash: String,
    /// Nodes simulated (outsiders included).
    pub nodes: u32,
    /// Simulated milliseconds in all (faulty and healed phases).
    pub simulated_ms: u64,
    /// Events processed.
    pub events: u64,
    /// Messages sent.
    pub messages: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Proposals acknowledged.
    pub acknowledged: u64,
    /// Replication plans run.
    pub plans_run: u64,
    /// Replication plans skipped because their inputs had not changed.
    pub plans_skipped: u64,
    /// Objects published and pinned.
    pub pins: u64,
    /// The fault mix drawn.
    pub mix: Mix,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Convergence after the heal.
    pub convergence: Convergence,
    /// Every broken property (the first ones; bounded).
    pub violations: Vec<Violation>,
    /// Replicas released by plans (the copy dropped).
    pub releases: u64,
    /// Reads of another zone's namespace that completed: under a temporary grant, or in the
    /// known window before the pin reaches the server's view (docs/sim.md, known limits).
    pub granted_reads: u64,
    /// Pre-position deadlines met (checked, or complete before they came).
    pub deadlines_met: u64,
    /// Pre-position deadlines too soon after the heal for the healed network to meet.
    pub deadlines_not_required: u64,
    /// The router fleet's topology file, in runs with routers.
    pub topology: Option<TopologyStats>,
    /// BLAKE3 over every event.
    pub trace_hash: String,
    /// The commit.
    pub commit: String,
}

impl Report {
    /// Whether every property held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this run.
    pub fn reproduce(&self, scenario_arg: &str) -> String {
        format!(
            "mycel-sim run --seed {}{scenario_arg}   # scenario {} ({}), commit {}",
            self.seed, self.scenario, self.scenario_hash, self.commit
        )
    }

    /// A human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "seed {} scenario {} ({}): {} nodes, {:.1} simulated s, {} events, {} messages, {} bytes\n",
            self.seed,
            self.scenario,
            self.scenario_hash,
            self.nodes,
            self.simulated_ms as f64 / 1000.0,
            self.events,
            self.messages,
            self.bytes
        );
        s += &format!(
            "  pins {}, acknowledged proposals {}, replicas released {}, reads of another zone's namespace {}, pre-position deadlines met {} (not required {})\n",
            self.pins,
            self.acknowledged,
            self.releases,
            self.granted_reads,
            self.deadlines_met,
            self.deadlines_not_required
        );
        let faults: Vec<String> = self.faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s += &format!(
            "  faults: {}\n",
            if faults.is_empty() { "none".into() } else { faults.join(" ") }
        );
        let ms = |v: Option<u64>| v.map_or("not reached".to_string(), |v| format!("{v} ms"));
        s += &format!(
            "  after heal: leader {}, configuration {}, replicas {}\n",
            ms(self.convergence.leader_ms),
            ms(self.convergence.config_ms),
            ms(self.convergence.replicas_ms)
        );
        if let Some(t) = &self.topology {
            s += &format!(
                "  topology: {} routers, {} proposed, {} staged, {} activations ({} rollbacks proposed, {} leader decisions), {} applies, {} hook failures, {} hook reruns, {} apply records lost; converged {}\n",
                t.routers,
                t.proposed,
                t.staged,
                t.activations,
                t.rollbacks,
                t.decisions,
                t.applies,
                t.hook_failures,
                t.hook_reruns,
                t.records_lost,
                ms(self.convergence.topology_ms)
            );
        }
        s += &format!("  trace {}\n", self.trace_hash);
        if self.violations.is_empty() {
            s += "  every check passed\n";
        } else {
            for v in &self.violations {
                s += &format!("  VIOLATION at {} ms [{}] {}\n", v.at_ms, v.check, v.detail);
            }
        }
        s
    }
}
