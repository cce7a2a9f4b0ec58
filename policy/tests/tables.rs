//! Decision tables: each file in `testdata/` is an observed view (nodes, holdings, pins)
//! and the plan expected from it. Node patterns ending in `*` match any node id with that
//! prefix, so tables whose answer depends on rendezvous hashing within a group still pin
//! down the group.

use std::collections::BTreeMap;

use mycel_policy::placement::Candidate;
use mycel_policy::placement::ScoreCache;
use mycel_policy::plan::{Action, Held, NodeState, PinSpec, Settings, plan, plan_namespaced};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    about: String,
    #[serde(default)]
    now_ms: u64,
    #[serde(default)]
    settings: Option<TableSettings>,
    nodes: Vec<TableNode>,
    pins: Vec<TablePin>,
    expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableSettings {
    overload: u32,
    balance_spread: f64,
    balance_min_load: u32,
    risk_window_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableNode {
    id: String,
    zone: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default = "hundred")]
    free_gib: u64,
    #[serde(default)]
    load: u32,
    #[serde(default = "yes")]
    storage: bool,
    #[serde(default = "yes")]
    alive: bool,
    /// root -> "complete" or "DONE/TOTAL".
    #[serde(default)]
    holds: BTreeMap<String, String>,
    /// The namespaces it may read (all if absent).
    #[serde(default)]
    reads: Option<Vec<String>>,
}

fn hundred() -> u64 {
    100
}
fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TablePin {
    root: String,
    min: u32,
    max: u32,
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    preposition: Vec<String>,
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    size_gib: u64,
    /// The pin's namespace ("default" if absent).
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// "fetch NODE ROOT", "cancel ...", "release ...": exactly these, in any order.
    actions: Vec<String>,
    #[serde(default)]
    pins: BTreeMap<String, ExpectPin>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectPin {
    #[serde(default)]
    replicas: Option<u32>,
    /// A substring of the unplaceable reason, or "" for none.
    #[serde(default)]
    unplaceable: Option<String>,
    /// "met", "pending", "at-risk" or "missed".
    #[serde(default)]
    deadline: Option<String>,
}

const GIB: u64 = 1 << 30;

fn held(s: &str) -> Held {
    if s == "complete" {
        return Held::Complete;
    }
    let (d, t) = s.split_once('/').expect("DONE/TOTAL");
    Held::Partial { done: d.parse().unwrap(), total: t.parse().unwrap() }
}

fn render(a: &Action) -> String {
    let (verb, node, root) = match a {
        Action::Fetch { node, root } => ("fetch", node, root),
        Action::Cancel { node, root } => ("cancel", node, root),
        Action::Release { node, root } => ("release", node, root),
    };
    format!("{verb} {} {}", String::from_utf8_lossy(node), String::from_utf8_lossy(root))
}

fn matches(pattern: &str, actual: &str) -> bool {
    let (p, a): (Vec<&str>, Vec<&str>) =
        (pattern.split(' ').collect(), actual.split(' ').collect());
    p.len() == a.len()
        && p.iter().zip(&a).all(|(p, a)| match p.strip_suffix('*') {
            Some(prefix) => a.starts_with(prefix),
            None => p == a,
        })
}

fn run(path: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let t: Table = serde_json::from_str(&text).map_err(|e| format!("bad table: {e}"))?;
    let nodes: Vec<NodeState> = t
        .nodes
        .iter()
        .map(|n| NodeState {
            node: Candidate {
                id: n.id.as_bytes().to_vec(),
                zone: n.zone.clone(),
                tags: n.tags.clone(),
                free_bytes: n.free_gib * GIB,
                load: n.load,
                rtt_ms: Some(10),
            },
            storage: n.storage,
            alive: n.alive,
            holdings: n.holds.iter().map(|(r, h)| (r.as_bytes().to_vec(), held(h))).collect(),
        })
        .collect();
    let pins: Vec<PinSpec> = t
        .pins
        .iter()
        .map(|p| PinSpec {
            root: p.root.as_bytes().to_vec(),
            replicas_min: p.min,
            replicas_max: p.max,
            zones: p.zones.clone(),
            tags: p.tags.clone(),
            preposition: p.preposition.clone(),
            deadline_ms: p.deadline_ms,
            size_bytes: p.size_gib * GIB,
        })
        .collect();
    let settings = t.settings.map_or_else(Settings::default, |s| Settings {
        overload: s.overload,
        balance_spread: s.balance_spread,
        balance_min_load: s.balance_min_load,
        risk_window_ms: s.risk_window_ms,
    });
    let namespaced = t.pins.iter().any(|p| p.namespace.is_some());
    let got = if namespaced {
        // Namespaces as the daemon plans them: each apart, with only its readers as storage.
        let namespace_of = |spec: &PinSpec| {
            let pin = t.pins.iter().find(|p| p.root.as_bytes() == spec.root).expect("a pin");
            pin.namespace.clone().unwrap_or_else(|| "default".to_string())
        };
        let mut may_read = |id: &[u8], ns: &str| {
            let node = t.nodes.iter().find(|n| n.id.as_bytes() == id).expect("a node");
            node.reads.as_ref().is_none_or(|r| r.iter().any(|x| x == ns))
        };
        let mut cache = ScoreCache::default();
        let settings = &settings;
        plan_namespaced(&pins, &namespace_of, &mut may_read, &nodes, settings, t.now_ms, &mut cache)
    } else {
        plan(&pins, &nodes, &settings, t.now_ms)
    };
    let actual: Vec<String> = got.actions.iter().map(render).collect();
    let mut unmatched = actual.clone();
    for want in &t.expect.actions {
        match unmatched.iter().position(|a| matches(want, a)) {
            Some(i) => {
                unmatched.remove(i);
            }
            None => return Err(format!("{}: expected {want:?}, got {actual:?}", t.about)),
        }
    }
    if !unmatched.is_empty() {
        return Err(format!("{}: unexpected {unmatched:?} (all: {actual:?})", t.about));
    }
    for (root, want) in &t.expect.pins {
        let r = got
            .pins
            .iter()
            .find(|p| p.root == root.as_bytes())
            .ok_or_else(|| format!("{}: no report for {root}", t.about))?;
        if let Some(n) = want.replicas
            && r.replicas != n
        {
            return Err(format!("{}: {root} has {} replicas, expected {n}", t.about, r.replicas));
        }
        if let Some(why) = &want.unplaceable {
            let ok = match (&r.unplaceable, why.is_empty()) {
                (None, true) => true,
                (Some(got), false) => got.contains(why.as_str()),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "{}: {root} unplaceable {:?}, expected {why:?}",
                    t.about, r.unplaceable
                ));
            }
        }
        if let Some(d) = &want.deadline {
            let got = r.preposition.map(|p| p.2.as_str());
            if got != Some(d.as_str()) {
                return Err(format!("{}: {root} deadline {got:?}, expected {d}", t.about));
            }
        }
    }
    Ok(())
}

#[test]
fn decision_tables() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10, "tables: {paths:?}");
    let failures: Vec<String> = paths
        .iter()
        .filter_map(|p| run(p).err().map(|e| format!("{}: {e}", p.display())))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
