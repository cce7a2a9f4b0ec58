//! Who may read what, as the exchange checks it on every block it serves.
//!
//! The decision is [`mycel_policy::access::allowed`] over the committed grants; this module
//! keeps the committed configuration in the shape serving needs (root → namespace,
//! member → subject), remembers answers per configuration, and checks that a manifest block
//! requested under a root belongs to that root's tree, so naming a readable root does not
//! open another root's manifests.
//!
//! Outside a cluster (a static member list) there are no grants: every member may read.
//! A node that loses contact with every manager keeps serving on its last configuration:
//! a revocation it has not heard of is not enforced by it until it hears again, and a grant
//! likewise; the alternative (refusing everything) would turn a manager outage into a data
//! outage for the whole fleet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use libp2p::PeerId;
use mycel_chunker::cbor::Value;
use mycel_chunker::{Cid, Codec};
use mycel_consensus::state::ClusterState;
use mycel_policy::access::{self, AccessCache, DEFAULT_NAMESPACE, Permission, Subject};

use crate::store::Store;

/// Manifest blocks remembered per root at most; a larger tree is not served under access
/// control beyond this many index nodes (about 64 TiB of content in 64 KiB chunks).
const TREE_NODES_MAX: usize = 1 << 20;
/// Roots whose manifest sets are remembered.
const TREES_MAX: usize = 64;

/// The committed configuration as serving needs it.
#[derive(Debug, Default)]
pub struct Access {
    /// Whether grants apply (in a cluster).
    enabled: bool,
    /// Configuration version (the applied index).
    version: u64,
    namespaces: BTreeMap<Vec<u8>, String>,
    subjects: BTreeMap<PeerId, Subject>,
    grants: Vec<(String, String, String)>,
    cache: Mutex<AccessCache>,
    trees: Mutex<BTreeMap<Cid, std::sync::Arc<BTreeSet<Cid>>>>,
}

impl Access {
    /// The view of a committed state; `enabled` is false outside a cluster.
    pub fn from_state(state: &ClusterState, enabled: bool) -> Access {
        Access {
            enabled,
            version: state.applied_index,
            namespaces: state
                .pins
                .values()
                .map(|p| (p.root.clone(), p.namespace.clone()))
                .collect(),
            subjects: state
                .members
                .values()
                .filter_map(|m| {
                    let peer = PeerId::from_bytes(&m.peer).ok()?;
                    Some((peer, Subject::new(&m.peer, m.role.as_str(), &m.zone, &m.tags)))
                })
                .collect(),
            grants: state
                .grants
                .iter()
                .map(|g| (g.subject.clone(), g.permission.clone(), g.namespace.clone()))
                .collect(),
            cache: Mutex::default(),
            trees: Mutex::default(),
        }
    }

    /// The namespace of a root: its committed pin's; else `local`, the one it was added
    /// under on this node ([`Store::local_namespace`]); else the default one.
    pub fn namespace<'a>(&'a self, root: &Cid, local: Option<&'a str>) -> &'a str {
        self.namespaces
            .get(root.to_bytes().as_slice())
            .map(String::as_str)
            .or(local)
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    /// Whether `peer` may read `root`, whose namespace as added here is `local`; `Err`
    /// says why not.
    ///
    /// # Errors
    /// The refusal reason sent to the peer.
    pub fn may_read(&self, peer: &PeerId, root: &Cid, local: Option<&str>) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let ns = self.namespace(root, local);
        let Some(subject) = self.subjects.get(peer) else {
            return Err("not a member of the cluster".into());
        };
        let grants = &self.grants;
        let ok = self.cache.lock().expect("access cache").check(
            self.version,
            &subject.peer,
            ns,
            Permission::Read,
            || {
                access::allowed(
                    grants.iter().map(|(s, p, n)| (s.as_str(), p.as_str(), n.as_str())),
                    subject,
                    ns,
                    Permission::Read,
                )
            },
        );
        if ok { Ok(()) } else { Err(format!("no read grant on namespace {ns}")) }
    }

    /// Whether `peer` may read namespace `ns` (true outside a cluster).
    pub fn may_read_namespace(&self, peer: &PeerId, ns: &str) -> bool {
        if !self.enabled {
            return true;
        }
        self.subjects.get(peer).is_some_and(|subject| {
            access::allowed(
                self.grants.iter().map(|(s, p, n)| (s.as_str(), p.as_str(), n.as_str())),
                subject,
                ns,
                Permission::Read,
            )
        })
    }

    /// Whether manifest block `cid` belongs to the tree of `root` (raw chunks are not
    /// checked: their CIDs are only learned from manifests).
    pub fn in_tree(&self, store: &Store, root: &Cid, cid: &Cid) -> bool {
        if !self.enabled || cid.codec() == Codec::Raw || cid == root {
            return true;
        }
        let cached = self.trees.lock().expect("trees").get(root).cloned();
        let set = match cached {
            Some(set) if set.contains(cid) => return true,
            // Built before more of the tree arrived here: build again below.
            Some(_) | None => std::sync::Arc::new(manifest_nodes(store, root)),
        };
        let found = set.contains(cid);
        let mut trees = self.trees.lock().expect("trees");
        if trees.len() >= TREES_MAX {
            trees.clear();
        }
        trees.insert(*root, set);
        found
    }
}

/// Every manifest (DAG-CBOR) block reachable from `root` that is stored here.
fn manifest_nodes(store: &Store, root: &Cid) -> BTreeSet<Cid> {
    let mut seen = BTreeSet::new();
    let mut queue = vec![*root];
    while let Some(cid) = queue.pop() {
        if seen.len() >= TREE_NODES_MAX || !seen.insert(cid) {
            continue;
        }
        let Ok(Some(bytes)) = store.get(&cid) else { continue };
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
