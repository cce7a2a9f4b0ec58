//! The replication worker's inputs: the committed pins and members, and what this node
//! observes of holdings (gossip for others, the store and running fetches for itself), in
//! the shape [`mycel_policy::plan`] decides on. The daemon runs the plan and carries out only
//! its own actions.

use std::collections::BTreeMap;

use libp2p::PeerId;
use mycel_chunker::Cid;
use mycel_consensus::command::{Pin, Role};
use mycel_consensus::state::ClusterState;
use mycel_policy::placement::Candidate;
use mycel_policy::plan::{Held, NodeState, Settings};
use mycel_proto::Timestamp;
use mycel_proto::announce::Directory;

use crate::net;

/// What this node knows of itself.
#[allow(missing_debug_implementations, reason = "holds a closure")]
pub struct Local<'a> {
    /// Its PeerId.
    pub me: PeerId,
    /// Complete roots stored here.
    pub complete: &'a dyn Fn(&Cid) -> bool,
    /// Fetches running here: root -> (done, total).
    pub fetching: BTreeMap<Cid, (u64, u64)>,
    /// Free store bytes.
    pub free_bytes: u64,
    /// Transfers in progress.
    pub load: u32,
}

/// A pin's CID, if its committed bytes parse.
pub fn pin_cid(p: &Pin) -> Option<Cid> {
    Cid::from_bytes(&p.root).ok()
}

pub use mycel_core::replicate::pin_specs;

/// Every committed member as observed: alive if its announcements arrived within `alive_ms`;
/// holdings of the pinned roots from the directory (and, for this node, from the store).
pub fn node_states(
    state: &ClusterState,
    directory: &Directory,
    local: &Local<'_>,
    now: Timestamp,
    alive_ms: u64,
) -> Vec<NodeState> {
    let roots: Vec<Cid> = state.pins.values().filter_map(pin_cid).collect();
    state
        .members
        .values()
        .filter_map(|m| {
            let peer = PeerId::from_bytes(&m.peer).ok()?;
            let cp = net::core_peer(&peer);
            let info = directory.node(&cp);
            let mine = peer == local.me;
            let alive = mine || info.is_some_and(|i| now.since(i.seen) <= alive_ms);
            let mut holdings = BTreeMap::new();
            for root in &roots {
                let held = if mine {
                    if (local.complete)(root) {
                        Some(Held::Complete)
                    } else {
                        local.fetching.get(root).map(|&(done, total)| Held::Partial { done, total })
                    }
                } else {
                    directory.holding(root, &cp).map(|(complete, progress)| {
                        if complete {
                            Held::Complete
                        } else {
                            let (done, total) = progress.unwrap_or((0, 0));
                            Held::Partial { done, total }
                        }
                    })
                };
                if let Some(h) = held {
                    holdings.insert(root.to_bytes().to_vec(), h);
                }
            }
            let (free_bytes, load) = if mine {
                (local.free_bytes, local.load)
            } else {
                info.map_or((0, 0), |i| (i.free_bytes, i.load))
            };
            Some(NodeState {
                node: Candidate {
                    id: m.peer.clone(),
                    zone: m.zone.clone(),
                    tags: m.tags.clone(),
                    free_bytes,
                    load,
                    rtt_ms: None,
                },
                storage: m.role == Role::Edge,
                alive,
                holdings,
            })
        })
        .collect()
}

/// The plan's tunables from committed policies (`replication.overload`,
/// `replication.balance_spread`, `replication.balance_min_load`, `preposition.risk_window_s`),
/// defaults for anything unset or unparsable.
pub fn settings(state: &ClusterState) -> Settings {
    let d = Settings::default();
    let get = |k: &str| state.policies.get(k);
    Settings {
        overload: get("replication.overload").and_then(|v| v.parse().ok()).unwrap_or(d.overload),
        balance_spread: get("replication.balance_spread")
            .and_then(|v| v.parse().ok())
            .unwrap_or(d.balance_spread),
        balance_min_load: get("replication.balance_min_load")
            .and_then(|v| v.parse().ok())
            .unwrap_or(d.balance_min_load),
        risk_window_ms: get("preposition.risk_window_s")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(d.risk_window_ms, |s| s.saturating_mul(1000)),
    }
}
