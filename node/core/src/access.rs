//! Who may read what: every serving decision, as the daemon's exchange and the simulator's
//! serving nodes both make it.
//!
//! The rule is [`mycel_policy::access::allowed`] over the committed grants. This module adds
//! what serving needs around it: the namespace a root is served under (its committed pin's,
//! else the one it was added under on this node, else the default one), and a check that a
//! manifest block asked for under a root belongs to that root's tree, so naming a readable
//! root does not open another root's manifests.
//!
//! Outside a cluster (a static member list) there are no grants: every member may read.
//! A node that loses contact with every manager keeps serving on its last configuration:
//! a revocation it has not heard of is not enforced by it until it hears again, and a grant
//! likewise; the alternative (refusing everything) would turn a manager outage into a data
//! outage for the whole fleet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use mycel_base::PeerId;
use mycel_chunker::cbor::Value;
use mycel_chunker::{Cid, Codec};
use mycel_consensus::state::ClusterState;
use mycel_policy::access::{self, DEFAULT_NAMESPACE, Permission, Subject};

/// Manifest blocks remembered per root at most; a larger tree is not served under access
/// control beyond this many index nodes (about 64 TiB of content in 64 KiB chunks).
pub const TREE_NODES_MAX: usize = 1 << 20;
/// Roots whose manifest sets are remembered.
const TREES_MAX: usize = 64;
/// Read decisions remembered per configuration (the exchange asks once per block served).
const ANSWERS_MAX: usize = 65_536;

/// Why a block is not served; its text is the reason sent to the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The requester is not in the committed member list.
    #[error("not a member of the cluster")]
    NotMember,
    /// The requester holds no read grant on the namespace.
    #[error("no read grant on namespace {0}")]
    NoReadGrant(String),
    /// A manifest block asked for under a root it does not belong to.
    #[error("{cid} is not part of {root}")]
    NotInTree {
        /// The block asked for.
        cid: Cid,
        /// The root it was asked for under.
        root: Cid,
    },
}

/// The namespace `root` is served under: its committed pin's; else `local`, the one it was
/// added under on this node; else the default one.
pub fn namespace<'a>(state: &'a ClusterState, root: &Cid, local: Option<&'a str>) -> &'a str {
    state
        .pins
        .get(root.to_bytes().as_slice())
        .map(|p| p.namespace.as_str())
        .or(local)
        .unwrap_or(DEFAULT_NAMESPACE)
}

/// Whether the member `who` may read namespace `ns` under `state`'s grants (false for a
/// peer that is not a member).
pub fn may_read_namespace(state: &ClusterState, who: &PeerId, ns: &str) -> bool {
    let Some(m) = state.members.get(who.as_bytes()) else { return false };
    if access::open_to_members(ns, Permission::Read) {
        return true; // (before building a subject: every plan asks this of every member)
    }
    let grants = state
        .grants
        .iter()
        .map(|g| (g.subject.as_str(), g.permission.as_str(), g.namespace.as_str()));
    // The base58 form of the PeerId is only needed by `member:` grants; encoding it for every
    // check dominated large fleets' plans.
    let peer = if state.grants.iter().any(|g| g.namespace == ns && g.subject.starts_with("member:"))
    {
        Subject::new(who.as_bytes(), "", "", &[]).peer
    } else {
        String::new()
    };
    let subject = Subject {
        peer,
        role: m.role.as_str().to_string(),
        zone: m.zone.clone(),
        tags: m.tags.clone(),
    };
    access::allowed(grants, &subject, ns, Permission::Read)
}

/// Whether `who` may read `root` (whose namespace as added here is `local`) under the
/// committed `state`.
///
/// # Errors
/// The [`Refusal`] to send.
pub fn check_read(
    state: &ClusterState,
    who: &PeerId,
    root: &Cid,
    local: Option<&str>,
) -> Result<(), Refusal> {
    check_read_by(state, who, root, local, |ns| may_read_namespace(state, who, ns))
}

/// [`check_read`] with the namespace decision made by `allowed`.
fn check_read_by(
    state: &ClusterState,
    who: &PeerId,
    root: &Cid,
    local: Option<&str>,
    allowed: impl FnOnce(&str) -> bool,
) -> Result<(), Refusal> {
    if !state.members.contains_key(who.as_bytes()) {
        return Err(Refusal::NotMember);
    }
    let ns = namespace(state, root, local);
    if allowed(ns) { Ok(()) } else { Err(Refusal::NoReadGrant(ns.into())) }
}

/// Stored blocks, as the tree check reads them: the daemon's store, the simulator's disk.
pub trait Blocks {
    /// The verified bytes of `cid` if it is stored here.
    fn block(&self, cid: &Cid) -> Option<Vec<u8>>;
}

/// Every manifest (DAG-CBOR) block reachable from `root` that is stored here, at most
/// [`TREE_NODES_MAX`] of them.
pub fn manifest_nodes(blocks: &dyn Blocks, root: &Cid) -> BTreeSet<Cid> {
    let mut seen = BTreeSet::new();
    let mut queue = vec![*root];
    while let Some(cid) = queue.pop() {
        if seen.len() >= TREE_NODES_MAX || !seen.insert(cid) {
            continue;
        }
        let Some(bytes) = blocks.block(&cid) else { continue };
        let Ok(value) = Value::decode(&bytes) else { continue };
        collect_links(&value, &mut queue);
    }
    seen
}

fn collect_links(v: &Value, out: &mut Vec<Cid>) {
    match v {
        Value::Link(c) if c.codec() == Codec::DagCbor => out.push(*c),
        Value::List(items) => items.iter().for_each(|i| collect_links(i, out)),
        Value::Map(entries) => entries.iter().for_each(|(_, i)| collect_links(i, out)),
        _ => {}
    }
}

/// The manifest sets of recently served roots, so the tree check costs a lookup; rebuilt for
/// a root when a block is not found in it (more of the tree may have arrived since).
#[derive(Debug, Default)]
pub struct Trees {
    sets: Mutex<BTreeMap<Cid, Arc<BTreeSet<Cid>>>>,
}

impl Trees {
    /// Whether manifest block `cid` belongs to the tree of `root` (raw chunks are not
    /// checked here: their CIDs are only learned from manifests).
    pub fn contains(&self, blocks: &dyn Blocks, root: &Cid, cid: &Cid) -> bool {
        if cid.codec() == Codec::Raw || cid == root {
            return true;
        }
        let cached = self.sets.lock().expect("trees lock").get(root).cloned();
        if cached.is_some_and(|set| set.contains(cid)) {
            return true;
        }
        let set = Arc::new(manifest_nodes(blocks, root));
        let found = set.contains(cid);
        let mut sets = self.sets.lock().expect("trees lock");
        if sets.len() >= TREES_MAX {
            sets.clear();
        }
        sets.insert(*root, set);
        found
    }
}

/// The committed configuration as serving needs it, swapped whole when it changes.
#[derive(Debug, Default)]
pub struct Access {
    /// Whether grants apply (in a cluster).
    enabled: bool,
    state: ClusterState,
    trees: Trees,
    /// Read decisions under this configuration, by (member, namespace).
    answers: Mutex<BTreeMap<(PeerId, String), bool>>,
}

impl Access {
    /// The view of a committed state; `enabled` is false outside a cluster.
    pub fn new(state: ClusterState, enabled: bool) -> Access {
        Access { enabled, state, trees: Trees::default(), answers: Mutex::default() }
    }

    /// The namespace `root` is served under ([`namespace`]).
    pub fn namespace<'a>(&'a self, root: &Cid, local: Option<&'a str>) -> &'a str {
        namespace(&self.state, root, local)
    }

    /// Whether `peer` may read `root`, whose namespace as added here is `local`.
    ///
    /// # Errors
    /// The [`Refusal`] to send.
    pub fn may_read(&self, peer: &PeerId, root: &Cid, local: Option<&str>) -> Result<(), Refusal> {
        if !self.enabled {
            return Ok(());
        }
        check_read_by(&self.state, peer, root, local, |ns| self.may_read_namespace(peer, ns))
    }

    /// Whether `peer` may read namespace `ns` (true outside a cluster); remembered per
    /// configuration, since serving asks before every block.
    pub fn may_read_namespace(&self, peer: &PeerId, ns: &str) -> bool {
        if !self.enabled {
            return true;
        }
        let key = (*peer, ns.to_owned());
        if let Some(ok) = self.answers.lock().expect("answers lock").get(&key) {
            return *ok;
        }
        let ok = may_read_namespace(&self.state, peer, ns);
        let mut answers = self.answers.lock().expect("answers lock");
        if answers.len() >= ANSWERS_MAX {
            answers.clear();
        }
        answers.insert(key, ok);
        ok
    }

    /// Whether block `cid`, asked for under `root`, may be served as part of it.
    ///
    /// # Errors
    /// [`Refusal::NotInTree`].
    pub fn check_in_tree(&self, blocks: &dyn Blocks, root: &Cid, cid: &Cid) -> Result<(), Refusal> {
        if !self.enabled || self.trees.contains(blocks, root, cid) {
            Ok(())
        } else {
            Err(Refusal::NotInTree { cid: *cid, root: *root })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycel_consensus::command::{Grant, Member, Pin, Role};

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[0, 36, 8, 1, 18, 32, n]).expect("short")
    }

    fn member(p: PeerId, role: Role, zone: &str) -> Member {
        Member {
            peer: p.as_bytes().to_vec(),
            raft_id: 0,
            role,
            zone: zone.into(),
            tags: vec![],
            capacity_bytes: 0,
            addrs: vec![],
        }
    }

    struct Map(BTreeMap<Cid, Vec<u8>>);
    impl Blocks for Map {
        fn block(&self, cid: &Cid) -> Option<Vec<u8>> {
            self.0.get(cid).cloned()
        }
    }

    /// Reads need membership and, outside the default namespace, a grant; a pin's namespace
    /// governs its root over the one it was added under here.
    #[test]
    fn reads_follow_membership_grants_and_pins() {
        let (edge, other, stranger) = (peer(1), peer(2), peer(3));
        let root = Cid::raw(b"root");
        let mut state = ClusterState::default();
        state.members.insert(edge.as_bytes().to_vec(), member(edge, Role::Edge, "z1"));
        state.members.insert(other.as_bytes().to_vec(), member(other, Role::Edge, "z2"));
        assert_eq!(check_read(&state, &stranger, &root, None), Err(Refusal::NotMember));
        assert_eq!(check_read(&state, &edge, &root, None), Ok(()));
        assert_eq!(
            check_read(&state, &edge, &root, Some("maps")),
            Err(Refusal::NoReadGrant("maps".into()))
        );
        state.grants.push(Grant {
            subject: "zone:z1".into(),
            permission: "read".into(),
            namespace: "maps".into(),
        });
        assert_eq!(check_read(&state, &edge, &root, Some("maps")), Ok(()));
        assert!(check_read(&state, &other, &root, Some("maps")).is_err());
        // The remembered answers of a configuration's view are the same, asked twice.
        let view = Access::new(state.clone(), true);
        for _ in 0..2 {
            assert_eq!(view.may_read(&edge, &root, Some("maps")), Ok(()));
            assert!(view.may_read(&other, &root, Some("maps")).is_err());
            assert_eq!(view.may_read(&stranger, &root, None), Err(Refusal::NotMember));
        }
        let pin = Pin {
            root: root.to_bytes().to_vec(),
            name: "r".into(),
            namespace: "secret".into(),
            replicas_min: 1,
            replicas_max: 1,
            zones: vec![],
            tags: vec![],
            preposition: vec![],
            deadline_ms: 0,
        };
        state.pins.insert(root.to_bytes().to_vec(), pin);
        assert_eq!(namespace(&state, &root, Some("maps")), "secret");
        assert!(check_read(&state, &edge, &root, Some("maps")).is_err());
        // Outside a cluster every member reads.
        let open = Access::new(state, false);
        assert!(open.may_read(&stranger, &root, None).is_ok());
    }

    /// A manifest block is served under a root only if the root's tree links it.
    #[test]
    fn tree_check_refuses_foreign_manifests() {
        let leaf = Value::Map(vec![("x".into(), Value::Uint(1))]).encode();
        let leaf_cid = Cid::dag_cbor(&leaf);
        let root_bytes = Value::List(vec![Value::Link(leaf_cid)]).encode();
        let root = Cid::dag_cbor(&root_bytes);
        let foreign = Value::Map(vec![("y".into(), Value::Uint(2))]).encode();
        let foreign_cid = Cid::dag_cbor(&foreign);
        let blocks =
            Map(BTreeMap::from([(root, root_bytes), (leaf_cid, leaf), (foreign_cid, foreign)]));
        let access = Access::new(ClusterState::default(), true);
        assert_eq!(access.check_in_tree(&blocks, &root, &leaf_cid), Ok(()));
        assert_eq!(
            access.check_in_tree(&blocks, &root, &foreign_cid),
            Err(Refusal::NotInTree { cid: foreign_cid, root })
        );
        // Raw chunks are not walked for.
        assert!(access.check_in_tree(&blocks, &root, &Cid::raw(b"any")).is_ok());
    }
}
