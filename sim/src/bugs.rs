//! Planted bugs: switches that break the system on purpose so the checkers can prove they
//! fail. They take effect only in a build with the `sim-bugs` feature (which also plants
//! the hooks in mycel-proto and mycel-consensus); elsewhere they are ignored.

/// The fetch core accepts blocks that do not match their CID.
pub const SKIP_CID_CHECK: u32 = 1 << 0;
/// The Raft log backend acknowledges a batch before it is durable.
pub const ACK_BEFORE_FSYNC: u32 = 1 << 1;
/// The Raft log backend forgets its vote on restart, so a node can vote twice in a term.
pub const VOTE_TWICE: u32 = 1 << 2;
/// The serving side skips the requester's read grant.
pub const SERVE_WITHOUT_GRANT: u32 = 1 << 3;

/// A router applies the topology version waiting for activation, before it is active.
pub const ROUTER_APPLIES_STAGED: u32 = 1 << 4;

/// Edges never fetch pre-positioned content.
pub const IGNORE_PREPOSITIONS: u32 = 1 << 5;

/// The serving side skips the tree check: a manifest block is served under any root the
/// requester may read.
pub const SERVE_OUTSIDE_TREE: u32 = 1 << 6;

/// The node core's cluster client takes a manager's "not the leader" answer for an apply.
pub const ACK_BEFORE_APPLY: u32 = 1 << 7;

/// The node core's follower skips an entry of each answer (its configuration drifts from
/// the managers' at the same index).
pub const FOLLOW_SKIPS_ENTRY: u32 = 1 << 8;

/// Every planted bug by name.
pub const ALL: [(&str, u32); 9] = [
    ("skip-cid-check", SKIP_CID_CHECK),
    ("ack-before-fsync", ACK_BEFORE_FSYNC),
    ("vote-twice", VOTE_TWICE),
    ("serve-without-grant", SERVE_WITHOUT_GRANT),
    ("router-applies-staged", ROUTER_APPLIES_STAGED),
    ("ignore-prepositions", IGNORE_PREPOSITIONS),
    ("serve-outside-tree", SERVE_OUTSIDE_TREE),
    ("ack-before-apply", ACK_BEFORE_APPLY),
    ("follow-skips-entry", FOLLOW_SKIPS_ENTRY),
];

/// Parses a comma-separated list of bug names.
///
/// # Errors
/// A message naming the unknown bug and the known ones.
pub fn parse(list: &str) -> Result<u32, String> {
    let mut out = 0;
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (_, bit) = ALL.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            let known: Vec<&str> = ALL.iter().map(|(n, _)| *n).collect();
            format!("unknown planted bug {name:?}: one of {}", known.join(", "))
        })?;
        out |= bit;
    }
    Ok(out)
}

/// Whether planted bugs take effect in this build.
pub const ENABLED: bool = cfg!(feature = "sim-bugs");
