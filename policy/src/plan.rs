//! The replication plan: desired pins against observed holdings give per-node actions.
//!
//! For each pin:
//! - **Eligible** nodes are live storage nodes (edges) matching the pin's zone and tag
//!   constraints with room for it. **Targets** of a pre-position are the live storage nodes
//!   in the named zones (or with the named `tag:T`); every one of them must hold the pin.
//! - **Replicas** are complete holders among eligible nodes and targets ("held as placed");
//!   a copy elsewhere (the publishing node, a reader's cache) does not count.
//! - Below the minimum, new copies go to the best-ranked eligible nodes (see
//!   [`placement`](crate::placement)), zones without a replica first; copies already in
//!   progress count, unless their node is overloaded (then the work moves: the node cancels
//!   and the next node fetches from every holder, keeping what the fetch engine already
//!   has).
//! - Between minimum and maximum nothing happens (hysteresis: a node that flaps causes no
//!   copy storm). Above the maximum the lowest-ranked replicas that no pre-position needs
//!   are released, never leaving a zone without a replica while another has two.
//! - Load balancing: when `(most - least) / most` of the storage nodes' loads exceeds the
//!   configured spread, one replica moves per plan from the most to the least loaded node:
//!   a copy is added there first, and the most loaded node releases once it is complete.
//!
//! Every node runs the same function on the same committed pins and its view of holdings,
//! and carries out only its own actions; views converge through gossip, and so do plans.

use std::collections::{BTreeMap, BTreeSet};

use crate::placement::{self, Candidate, ScoreCache};

/// A pin as the plan needs it (from the committed configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinSpec {
    /// Root CID bytes.
    pub root: Vec<u8>,
    /// Fewest replicas.
    pub replicas_min: u32,
    /// Most replicas.
    pub replicas_max: u32,
    /// Zones replicas must be in (empty: any).
    pub zones: Vec<String>,
    /// Tags replica nodes must carry, all of them.
    pub tags: Vec<String>,
    /// Pre-position targets: zone names, or `tag:T`.
    pub preposition: Vec<String>,
    /// Pre-position deadline, ms since the epoch (0: none).
    pub deadline_ms: u64,
    /// Content bytes, if known (0: unknown).
    pub size_bytes: u64,
}

/// How much of a root a node holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Every block.
    Complete,
    /// Being fetched.
    Partial {
        /// Content bytes held.
        done: u64,
        /// Content bytes in all.
        total: u64,
    },
}

/// A node as observed.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeState {
    /// Identity, zone, tags, capacity, load, latency.
    pub node: Candidate,
    /// Whether it stores pinned content (edges do; managers and routers do not).
    pub storage: bool,
    /// Heard from recently.
    pub alive: bool,
    /// What it holds, by root CID bytes.
    pub holdings: BTreeMap<Vec<u8>, Held>,
}

/// Tunables (committed policies, with defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// A node reporting more transfers than this gets no new copy work and loses its own.
    pub overload: u32,
    /// Relative load spread that triggers balancing (0.0..=1.0; above 1.0 disables).
    pub balance_spread: f64,
    /// Balancing acts only when the most loaded node reports at least this many transfers.
    pub balance_min_load: u32,
    /// A pre-position not complete this long before its deadline is at risk.
    pub risk_window_ms: u64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            overload: 64,
            balance_spread: 0.8,
            balance_min_load: 16,
            risk_window_ms: 600_000,
        }
    }
}

/// What one node should do.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Fetch the root (from every holder) and keep it as a replica.
    Fetch {
        /// The node.
        node: Vec<u8>,
        /// The root.
        root: Vec<u8>,
    },
    /// Stop fetching: the work moved elsewhere or is no longer needed.
    Cancel {
        /// The node.
        node: Vec<u8>,
        /// The root.
        root: Vec<u8>,
    },
    /// No longer a replica: the copy becomes evictable cache.
    Release {
        /// The node.
        node: Vec<u8>,
        /// The root.
        root: Vec<u8>,
    },
}

impl Action {
    /// The node that acts.
    pub fn node(&self) -> &[u8] {
        match self {
            Action::Fetch { node, .. }
            | Action::Cancel { node, .. }
            | Action::Release { node, .. } => node,
        }
    }
}

/// Where a pre-position stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// Every target holds it.
    Met,
    /// In progress, with time to spare (or no deadline).
    Pending,
    /// Not complete and the deadline is within the risk window.
    AtRisk,
    /// The deadline passed before every target held it.
    Missed,
}

impl Deadline {
    /// Lowercase name for status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Deadline::Met => "met",
            Deadline::Pending => "pending",
            Deadline::AtRisk => "at-risk",
            Deadline::Missed => "missed",
        }
    }
}

/// One pin's standing.
#[derive(Clone, Debug, PartialEq)]
pub struct PinReport {
    /// Root CID bytes.
    pub root: Vec<u8>,
    /// Complete replicas held as placed.
    pub replicas: u32,
    /// Copies in progress that count.
    pub copying: u32,
    /// Nodes holding it as placed.
    pub holders: Vec<Vec<u8>>,
    /// Why it is (partly) unplaceable, if it is.
    pub unplaceable: Option<String>,
    /// Pre-position progress: (targets holding, targets), and the deadline standing.
    pub preposition: Option<(u32, u32, Deadline)>,
}

/// A whole plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Actions, sorted.
    pub actions: Vec<Action>,
    /// One report per pin, in pin order.
    pub pins: Vec<PinReport>,
}

impl Plan {
    /// The actions of one node.
    pub fn for_node<'a>(&'a self, node: &'a [u8]) -> impl Iterator<Item = &'a Action> + 'a {
        self.actions.iter().filter(move |a| a.node() == node)
    }
}

fn matches_target(n: &Candidate, target: &str) -> bool {
    match target.strip_prefix("tag:") {
        Some(tag) => n.tags.iter().any(|t| t == tag),
        None => n.zone == target,
    }
}

/// The plan for `pins` over `nodes` at `now_ms`.
pub fn plan(pins: &[PinSpec], nodes: &[NodeState], settings: &Settings, now_ms: u64) -> Plan {
    plan_cached(pins, nodes, settings, now_ms, &mut ScoreCache::default())
}

/// [`plan`], keeping placement draws in `cache` for the next plan (a planner that plans
/// every period keeps one cache; the plan is the same with or without it).
pub fn plan_cached(
    pins: &[PinSpec],
    nodes: &[NodeState],
    settings: &Settings,
    now_ms: u64,
    cache: &mut ScoreCache,
) -> Plan {
    let live: Vec<&NodeState> = nodes.iter().filter(|n| n.alive && n.storage).collect();
    plan_live(pins, &live, settings, now_ms, cache)
}

/// [`plan_cached`] for pins in namespaces: each namespace's pins (in the order of the
/// namespaces' names) are planned with only the storage nodes that `may_read(node id,
/// namespace)` counted as storage. Actions come namespace by namespace, each part sorted.
pub fn plan_namespaced(
    pins: &[PinSpec],
    namespace_of: &dyn Fn(&PinSpec) -> String,
    may_read: &mut dyn FnMut(&[u8], &str) -> bool,
    nodes: &[NodeState],
    settings: &Settings,
    now_ms: u64,
    cache: &mut ScoreCache,
) -> Plan {
    let mut by_ns: BTreeMap<String, Vec<PinSpec>> = BTreeMap::new();
    for spec in pins {
        by_ns.entry(namespace_of(spec)).or_default().push(spec.clone());
    }
    let mut out = Plan::default();
    for (ns, specs) in by_ns {
        let live: Vec<&NodeState> =
            nodes.iter().filter(|n| n.alive && n.storage && may_read(&n.node.id, &ns)).collect();
        let part = plan_live(&specs, &live, settings, now_ms, cache);
        out.actions.extend(part.actions);
        out.pins.extend(part.pins);
    }
    out
}

/// The plan over `live`: the live storage nodes.
fn plan_live(
    pins: &[PinSpec],
    live: &[&NodeState],
    settings: &Settings,
    now_ms: u64,
    cache: &mut ScoreCache,
) -> Plan {
    let mut out = Plan::default();
    let balance = Balance::new(live, settings);
    let mut balance_moved = false;
    // Holdings by root, gathered once: a pin then looks up its few holders, not every node's
    // holdings. Keyed by each node's address in `live` (looked up, never iterated).
    let mut by_root: BTreeMap<&[u8], BTreeMap<usize, Held>> = BTreeMap::new();
    for n in live {
        for (root, held) in &n.holdings {
            by_root.entry(root.as_slice()).or_default().insert(node_key(n), *held);
        }
    }
    let none = BTreeMap::new();
    for pin in pins {
        let held = by_root.get(pin.root.as_slice()).unwrap_or(&none);
        let report = plan_pin(pin, live, held, settings, now_ms, &mut out.actions, cache);
        if !balance_moved && report.unplaceable.is_none() {
            balance_moved = balance.apply(pin, &report, &mut out.actions);
        }
        out.pins.push(report);
    }
    out.actions.sort();
    out.actions.dedup();
    out
}

/// A node's key in a plan's holdings index: its address, stable while the plan borrows it.
fn node_key(n: &NodeState) -> usize {
    std::ptr::from_ref(n) as usize
}

/// One pin's plan; `held` is what each node of `live` holds of it (by [`node_key`]).
fn plan_pin(
    pin: &PinSpec,
    live: &[&NodeState],
    held: &BTreeMap<usize, Held>,
    settings: &Settings,
    now_ms: u64,
    actions: &mut Vec<Action>,
    cache: &mut ScoreCache,
) -> PinReport {
    let holds = |n: &NodeState| held.get(&node_key(n)).copied();
    let constrained = |n: &NodeState| {
        (pin.zones.is_empty() || pin.zones.contains(&n.node.zone))
            && pin.tags.iter().all(|t| n.node.tags.contains(t))
    };
    let roomy = |n: &NodeState| n.node.free_bytes >= pin.size_bytes || holds(n).is_some();
    let eligible: Vec<&NodeState> =
        live.iter().copied().filter(|n| constrained(n) && roomy(n)).collect();
    let targets: Vec<&NodeState> = live
        .iter()
        .copied()
        .filter(|n| pin.preposition.iter().any(|t| matches_target(&n.node, t)))
        .collect();
    let target_keys: BTreeSet<usize> = targets.iter().map(|t| node_key(t)).collect();
    let is_target = |n: &NodeState| target_keys.contains(&node_key(n));
    let placed: Vec<&NodeState> = {
        let mut v: Vec<&NodeState> = eligible.clone();
        if !targets.is_empty() {
            let eligible_keys: BTreeSet<usize> = eligible.iter().map(|e| node_key(e)).collect();
            v.extend(targets.iter().copied().filter(|t| !eligible_keys.contains(&node_key(t))));
        }
        v
    };
    let overloaded = |n: &NodeState| n.node.load > settings.overload;
    let holders: Vec<&NodeState> =
        placed.iter().copied().filter(|n| holds(n) == Some(Held::Complete)).collect();
    let mut copying: Vec<&NodeState> = Vec::new();
    for n in &placed {
        if let Some(Held::Partial { .. }) = holds(n) {
            if overloaded(n) && !is_target(n) {
                actions.push(Action::Cancel { node: n.node.id.clone(), root: pin.root.clone() });
            } else {
                copying.push(n);
            }
        }
    }
    // Pre-position targets all fetch.
    for t in &targets {
        if holds(t).is_none() {
            actions.push(Action::Fetch { node: t.node.id.clone(), root: pin.root.clone() });
            copying.push(t);
        }
    }
    let min = pin.replicas_min as usize;
    let max = pin.replicas_max as usize;
    let have = holders.len() + copying.len();
    let cands: Vec<&Candidate> = eligible.iter().map(|n| &n.node).collect();
    let held_zones: BTreeSet<&str> = holders.iter().map(|n| n.node.zone.as_str()).collect();
    // Zone spread: with every replica complete and nothing copying, a replica set that
    // covers fewer zones than it could (placed before a zone's nodes were heard) gains a copy
    // in an uncovered zone; the count then exceeds the maximum (or not) and the release rule
    // takes one from a zone holding two. Only a set with two replicas in one zone can gain
    // (checked first, since finding a usable node in another zone takes a pass).
    let usable = |i: usize| !overloaded(eligible[i]) && holds(eligible[i]).is_none();
    let spread_wanted = copying.is_empty()
        && holders.len() >= min.max(2)
        && held_zones.len() < holders.len()
        && (0..cands.len()).any(|i| usable(i) && !held_zones.contains(cands[i].zone.as_str()))
        && spread_copy_kept(&holders, &is_target, max);
    // Ranking is what planning costs; a pin at its replica count with nothing to add, cancel
    // or release needs none (most pins, most periods).
    // (Copies and replicas over the maximum are cancelled or released only on non-targets:
    // a pre-position's targets alone exceeding it, as they usually do, need no ranking.)
    let releasable = holders.len() > max && holders.iter().any(|h| !is_target(h));
    let cancellable = holders.len() >= min && have > max && copying.iter().any(|n| !is_target(n));
    let needs_rank = have < min || releasable || cancellable || spread_wanted;
    let ranked =
        if needs_rank { placement::rank_cached(&pin.root, &cands, cache) } else { Vec::new() };
    // A node's place in the ranking (usize::MAX if not a candidate), indexed on first use.
    let places: std::cell::OnceCell<BTreeMap<usize, usize>> = std::cell::OnceCell::new();
    let rank_of = |n: &NodeState| {
        let places = places.get_or_init(|| {
            ranked.iter().enumerate().map(|(place, &i)| (node_key(eligible[i]), place)).collect()
        });
        places.get(&node_key(n)).copied().unwrap_or(usize::MAX)
    };
    let mut unplaceable = None;
    if have < min {
        let busy: BTreeSet<&[u8]> =
            holders.iter().chain(copying.iter()).map(|n| n.node.id.as_slice()).collect();
        let free: Vec<usize> = ranked
            .iter()
            .copied()
            .filter(|&i| !busy.contains(cands[i].id.as_slice()) && !overloaded(eligible[i]))
            .collect();
        let used_zones: BTreeSet<String> =
            holders.iter().chain(copying.iter()).map(|n| n.node.zone.clone()).collect();
        let chosen = placement::choose(&cands, &free, min - have, &used_zones);
        for &i in &chosen {
            actions.push(Action::Fetch { node: cands[i].id.clone(), root: pin.root.clone() });
        }
        if have + chosen.len() < min {
            unplaceable = Some(why_short(pin, live, eligible.len(), have + chosen.len()));
        }
    } else if holders.len() >= min && have > max {
        // Enough complete replicas: cancel copies beyond the maximum, worst first.
        let mut extra: Vec<&&NodeState> = copying.iter().filter(|n| !is_target(n)).collect();
        extra.sort_by_key(|n| std::cmp::Reverse(rank_of(n)));
        for n in extra.into_iter().take(have - max) {
            actions.push(Action::Cancel { node: n.node.id.clone(), root: pin.root.clone() });
        }
    }
    if unplaceable.is_none()
        && spread_wanted
        && let Some(&i) =
            ranked.iter().find(|&&i| usable(i) && !held_zones.contains(cands[i].zone.as_str()))
    {
        actions.push(Action::Fetch { node: cands[i].id.clone(), root: pin.root.clone() });
    }
    if releasable {
        release_extras(pin, &holders, &is_target, &rank_of, holders.len() - max, actions);
    }
    let preposition = (!pin.preposition.is_empty()).then(|| {
        let held = targets.iter().filter(|t| holds(t) == Some(Held::Complete)).count() as u32;
        let all = targets.len() as u32;
        let standing = if held == all {
            Deadline::Met
        } else if pin.deadline_ms != 0 && now_ms > pin.deadline_ms {
            Deadline::Missed
        } else if pin.deadline_ms != 0 && now_ms + settings.risk_window_ms > pin.deadline_ms {
            Deadline::AtRisk
        } else {
            Deadline::Pending
        };
        (held, all, standing)
    });
    if unplaceable.is_none() && !pin.preposition.is_empty() && targets.is_empty() {
        unplaceable = Some(format!(
            "no live storage node matches the pre-position targets {:?}",
            pin.preposition
        ));
    }
    PinReport {
        root: pin.root.clone(),
        replicas: holders.len() as u32,
        copying: copying.len() as u32,
        holders: holders.iter().map(|n| n.node.id.clone()).collect(),
        unplaceable,
        preposition,
    }
}

/// Whether a copy added in an uncovered zone would survive [`release_extras`], which takes
/// replicas over the maximum first from zones holding two and never from pre-position
/// targets. When the replicas over the maximum could only come from zones holding one (say
/// a pre-position's targets alone exceed the maximum), the release rule would take the new
/// copy back, or another zone's only copy, and the next plan would add it again, for ever.
fn spread_copy_kept(
    holders: &[&NodeState],
    is_target: &dyn Fn(&NodeState) -> bool,
    max: usize,
) -> bool {
    let excess = (holders.len() + 1).saturating_sub(max);
    let mut zones: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for h in holders {
        let z = zones.entry(h.node.zone.as_str()).or_default();
        z.0 += 1;
        z.1 += usize::from(!is_target(h));
    }
    let releasable: usize = zones.values().map(|&(all, free)| free.min(all - 1)).sum();
    excess <= releasable
}

fn release_extras(
    pin: &PinSpec,
    holders: &[&NodeState],
    is_target: &dyn Fn(&NodeState) -> bool,
    rank_of: &dyn Fn(&NodeState) -> usize,
    mut excess: usize,
    actions: &mut Vec<Action>,
) {
    let mut zone_count: BTreeMap<&str, usize> = BTreeMap::new();
    for h in holders {
        *zone_count.entry(h.node.zone.as_str()).or_default() += 1;
    }
    let mut order: Vec<&&NodeState> = holders.iter().filter(|h| !is_target(h)).collect();
    order.sort_by_key(|h| std::cmp::Reverse(rank_of(h)));
    // First pass: only from zones holding more than one replica; then anything.
    for pass in 0..2 {
        for h in &order {
            if excess == 0 {
                return;
            }
            let zone = h.node.zone.as_str();
            let released = actions.iter().any(|a| {
                matches!(a, Action::Release { node, root } if node == &h.node.id && root == &pin.root)
            });
            if released || (pass == 0 && zone_count[zone] < 2) {
                continue;
            }
            *zone_count.get_mut(zone).unwrap_or(&mut 0) -= 1;
            actions.push(Action::Release { node: h.node.id.clone(), root: pin.root.clone() });
            excess -= 1;
        }
    }
}

fn why_short(pin: &PinSpec, live: &[&NodeState], eligible: usize, placeable: usize) -> String {
    let matching = live
        .iter()
        .filter(|n| {
            (pin.zones.is_empty() || pin.zones.contains(&n.node.zone))
                && pin.tags.iter().all(|t| n.node.tags.contains(t))
        })
        .count();
    let mut why = format!(
        "{placeable} of {} replicas placeable: {} live storage nodes",
        pin.replicas_min,
        live.len()
    );
    if !pin.zones.is_empty() || !pin.tags.is_empty() {
        why += &format!(", {matching} in zones {:?} with tags {:?}", pin.zones, pin.tags);
    }
    if eligible < matching {
        why += &format!(", {} without {} bytes free", matching - eligible, pin.size_bytes);
    }
    if placeable < eligible {
        why += &format!(", {} overloaded", eligible - placeable);
    }
    why
}

/// Load balancing across storage nodes: at most one replica moves per plan.
struct Balance<'a> {
    most: Option<&'a NodeState>,
    least: Option<&'a NodeState>,
}

impl<'a> Balance<'a> {
    fn new(live: &[&'a NodeState], settings: &Settings) -> Balance<'a> {
        let most =
            live.iter().copied().max_by_key(|n| (n.node.load, std::cmp::Reverse(&n.node.id)));
        let least = live.iter().copied().min_by_key(|n| (n.node.load, &n.node.id));
        match (most, least) {
            (Some(m), Some(l))
                if m.node.load >= settings.balance_min_load
                    && f64::from(m.node.load - l.node.load) / f64::from(m.node.load)
                        > settings.balance_spread =>
            {
                Balance { most: Some(m), least: Some(l) }
            }
            _ => Balance { most: None, least: None },
        }
    }

    /// Adds the move's action for `pin` if it is the one to move; true if it did.
    fn apply(&self, pin: &PinSpec, report: &PinReport, actions: &mut Vec<Action>) -> bool {
        let (Some(most), Some(least)) = (self.most, self.least) else { return false };
        let holds = |n: &NodeState| n.holdings.get(&pin.root).copied();
        let fits = (pin.zones.is_empty() || pin.zones.contains(&least.node.zone))
            && pin.tags.iter().all(|t| least.node.tags.contains(t))
            && !pin.preposition.iter().any(|t| matches_target(&most.node, t));
        if !fits || !report.holders.contains(&most.node.id) || report.copying > 0 {
            return false;
        }
        match holds(least) {
            None if report.replicas < pin.replicas_max => {
                actions.push(Action::Fetch { node: least.node.id.clone(), root: pin.root.clone() });
                true
            }
            Some(Held::Complete) if report.replicas > pin.replicas_min => {
                actions
                    .push(Action::Release { node: most.node.id.clone(), root: pin.root.clone() });
                true
            }
            _ => false,
        }
    }
}
