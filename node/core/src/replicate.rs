//! The replication worker's inputs in the shape [`mycel_policy::plan`] decides on. (The
//! worker itself, plans to fetches, keeps and evictions, still runs in each driver; it moves
//! here next.)

use mycel_chunker::Cid;
use mycel_consensus::command::Pin;
use mycel_consensus::state::ClusterState;
use mycel_policy::plan::PinSpec;

/// A pin in the shape the plan wants, `size_bytes` its object's size where known (0 if not).
pub fn pin_spec(p: &Pin, size_bytes: u64) -> PinSpec {
    PinSpec {
        root: p.root.clone(),
        replicas_min: p.replicas_min,
        replicas_max: p.replicas_max,
        zones: p.zones.clone(),
        tags: p.tags.clone(),
        preposition: p.preposition.clone(),
        deadline_ms: p.deadline_ms,
        size_bytes,
    }
}

/// The committed pins whose roots parse, in the shape the plan wants, sized by `size_of`.
pub fn pin_specs(state: &ClusterState, size_of: &dyn Fn(&Cid) -> u64) -> Vec<PinSpec> {
    state
        .pins
        .values()
        .filter_map(|p| {
            let cid = Cid::from_bytes(&p.root).ok()?;
            Some(pin_spec(p, size_of(&cid)))
        })
        .collect()
}
