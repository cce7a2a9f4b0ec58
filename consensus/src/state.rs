//! The cluster state machine: small declarative state the quorum agrees on.
//!
//! Every replica applies the same entries in the same order and reaches the same state:
//! application is a pure function of the state and the entry. A proposal's commands apply
//! all or none (an undo journal restores the state when one fails), duplicates of a
//! `(PeerId, sequence)` already applied return the first outcome without applying again,
//! and commands whose semantics later issues define are rejected with a reason.

use std::collections::{BTreeMap, BTreeSet};

use bincode::{Decode, Encode};
use mycel_chunker::codec;

use mycel_policy::access::{self, DEFAULT_NAMESPACE, Permission, Subject};

use crate::command::{Command, Grant, Member, Pin, Proposal, Role};
use crate::topology::{self, Topology};

/// Format version of a serialised state (snapshots).
pub const STATE_VERSION: u8 = 2;
/// Largest serialised state (1M pins fit).
pub const STATE_BYTES_MAX: usize = 1 << 30;

/// A join token as committed: only the hash of its secret.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Token {
    /// Role it admits.
    pub role: Role,
    /// Zone it assigns.
    pub zone: String,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
    /// Uses left.
    pub uses: u32,
}

/// The result of applying one proposal.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Outcome {
    /// Every command applied.
    Applied,
    /// Nothing applied, for this reason.
    Rejected(String),
}

/// The replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ClusterState {
    /// Set by the first entry.
    pub cluster_id: Option<[u8; 16]>,
    /// Next Raft id to hand out (ids are never reused).
    pub next_raft_id: u64,
    /// Members by PeerId bytes.
    pub members: BTreeMap<Vec<u8>, Member>,
    /// PeerIds removed from the cluster: never admitted again.
    pub removed: BTreeSet<Vec<u8>>,
    /// Tokens by secret hash.
    pub tokens: BTreeMap<[u8; 32], Token>,
    /// Pins by root CID bytes.
    pub pins: BTreeMap<Vec<u8>, Pin>,
    /// Grants, sorted.
    pub grants: Vec<Grant>,
    /// Policies.
    pub policies: BTreeMap<String, String>,
    /// Topology files by name: versions, the active one, schema, canary.
    pub topologies: BTreeMap<String, Topology>,
    /// Last sequence number applied per proposer, with its outcome.
    pub dedup: BTreeMap<Vec<u8>, (u64, Outcome)>,
    /// Index of the last entry applied.
    pub applied_index: u64,
}

enum Undo {
    ClusterId(Option<[u8; 16]>),
    NextRaftId(u64),
    Member(Vec<u8>, Option<Member>),
    Removed(Vec<u8>, bool),
    Token([u8; 32], Option<Token>),
    Pin(Vec<u8>, Option<Pin>),
    Grants(Vec<Grant>),
    Policy(String, Option<String>),
    Topology(String, Option<Topology>),
}

impl ClusterState {
    /// Serialises the state (snapshot data).
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_limited::<_, STATE_BYTES_MAX>(STATE_VERSION, self)
    }

    /// Reads a serialised state.
    ///
    /// # Errors
    /// A message if the bytes are not a state of this version.
    pub fn decode(bytes: &[u8]) -> Result<ClusterState, String> {
        codec::decode_limited::<_, STATE_BYTES_MAX>(STATE_VERSION, bytes).map_err(|e| e.to_string())
    }

    /// A digest of the state, for comparing replicas.
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&self.encode()).as_bytes()
    }

    /// The member with this Raft id.
    pub fn member_by_raft_id(&self, id: u64) -> Option<&Member> {
        self.members.values().find(|m| m.raft_id == id)
    }

    /// Applies the proposal in entry `index` (empty data: a leader's no-op entry).
    pub fn apply(&mut self, index: u64, data: &[u8]) -> Option<(Vec<u8>, u64, Outcome)> {
        assert!(index > self.applied_index, "apply {index} after {}", self.applied_index);
        self.applied_index = index;
        if data.is_empty() {
            return None;
        }
        let proposal = match Proposal::decode(data) {
            Ok(p) => p,
            Err(e) => return Some((Vec::new(), 0, Outcome::Rejected(e.to_string()))),
        };
        if let Some((seq, outcome)) = self.dedup.get(&proposal.from)
            && *seq >= proposal.seq
        {
            let outcome = if *seq == proposal.seq {
                outcome.clone()
            } else {
                Outcome::Rejected(format!("sequence {} already superseded by {seq}", proposal.seq))
            };
            return Some((proposal.from, proposal.seq, outcome));
        }
        let mut journal = Vec::new();
        let mut outcome = Outcome::Applied;
        for command in &proposal.commands {
            if let Err(reason) = self.apply_command(&proposal.from, command, &mut journal) {
                outcome = Outcome::Rejected(reason);
                break;
            }
        }
        if outcome != Outcome::Applied {
            for undo in journal.into_iter().rev() {
                self.undo(undo);
            }
        }
        self.dedup.insert(proposal.from.clone(), (proposal.seq, outcome.clone()));
        Some((proposal.from, proposal.seq, outcome))
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::ClusterId(v) => self.cluster_id = v,
            Undo::NextRaftId(v) => self.next_raft_id = v,
            Undo::Member(k, v) => restore(&mut self.members, k, v),
            Undo::Removed(k, was) => {
                if was {
                    self.removed.insert(k);
                } else {
                    self.removed.remove(&k);
                }
            }
            Undo::Token(k, v) => restore(&mut self.tokens, k, v),
            Undo::Pin(k, v) => restore(&mut self.pins, k, v),
            Undo::Grants(v) => self.grants = v,
            Undo::Policy(k, v) => restore(&mut self.policies, k, v),
            Undo::Topology(k, v) => restore(&mut self.topologies, k, v),
        }
    }

    fn set_member(&mut self, m: Member, j: &mut Vec<Undo>) {
        let old = self.members.insert(m.peer.clone(), m.clone());
        j.push(Undo::Member(m.peer, old));
    }

    fn new_raft_id(&mut self, j: &mut Vec<Undo>) -> u64 {
        j.push(Undo::NextRaftId(self.next_raft_id));
        let id = self.next_raft_id.max(1);
        self.next_raft_id = id + 1;
        id
    }

    /// Whether the proposer `from` holds `needed` on `namespace` (managers hold everything).
    fn authorise(&self, from: &[u8], namespace: &str, needed: Permission) -> Result<(), String> {
        let Some(m) = self.members.get(from) else {
            return Err("unauthorised: the proposer is not a member".into());
        };
        let who = Subject::new(&m.peer, m.role.as_str(), &m.zone, &m.tags);
        let grants = self
            .grants
            .iter()
            .map(|g| (g.subject.as_str(), g.permission.as_str(), g.namespace.as_str()));
        if access::allowed(grants, &who, namespace, needed) {
            Ok(())
        } else {
            Err(format!(
                "unauthorised: {} lacks {} on namespace {namespace:?}",
                who.peer,
                needed.as_str()
            ))
        }
    }

    /// Who may propose what: pins need `publish` on their namespace, grants `admin` on
    /// theirs, tokens and policies are the managers'. (Membership changes are checked where
    /// they are proposed: the cluster protocol accepts proposals only from members, signed
    /// for the sending node.)
    fn check_proposer(&self, from: &[u8], c: &Command) -> Result<(), String> {
        match c {
            Command::CreateToken { .. }
            | Command::RevokeToken { .. }
            | Command::SetPolicy { .. } => {
                if self.members.get(from).is_some_and(|m| m.role == Role::Manager) {
                    Ok(())
                } else {
                    Err("unauthorised: only managers may propose this".into())
                }
            }
            Command::AddPin(p) => self.authorise(from, &p.namespace, Permission::Publish),
            Command::RemovePin { root } => {
                let ns = self.pins.get(root).map_or(DEFAULT_NAMESPACE, |p| p.namespace.as_str());
                self.authorise(from, ns, Permission::Publish)
            }
            Command::AddGrant(g) | Command::RemoveGrant(g) => {
                self.authorise(from, &g.namespace, Permission::Admin)
            }
            _ => Ok(()),
        }
    }

    fn apply_command(&mut self, from: &[u8], c: &Command, j: &mut Vec<Undo>) -> Result<(), String> {
        if let Some(name) = topology::command_name(c) {
            return self.apply_topology(name, from, c, j);
        }
        self.check_proposer(from, c)?;
        match c {
            Command::InitCluster { cluster_id } => {
                if self.cluster_id.is_some() {
                    return Err("the cluster is already initialised".into());
                }
                j.push(Undo::ClusterId(self.cluster_id));
                self.cluster_id = Some(*cluster_id);
            }
            Command::CreateToken { hash, role, zone, expires_ms, uses } => {
                if *uses == 0 {
                    return Err("a token needs at least one use".into());
                }
                let old = self.tokens.insert(
                    *hash,
                    Token { role: *role, zone: zone.clone(), expires_ms: *expires_ms, uses: *uses },
                );
                j.push(Undo::Token(*hash, old));
            }
            Command::RevokeToken { hash } => {
                let old = self.tokens.remove(hash).ok_or("no such token")?;
                j.push(Undo::Token(*hash, Some(old)));
            }
            Command::Join { secret, peer, addrs, tags, capacity_bytes, now_ms } => {
                let hash = *blake3::hash(secret).as_bytes();
                let token = self.tokens.get(&hash).cloned().ok_or("unknown or revoked token")?;
                if token.expires_ms < *now_ms {
                    return Err("the token has expired".into());
                }
                if self.removed.contains(peer) {
                    return Err("this node was removed; run `mycel init` again to rejoin".into());
                }
                if self.members.contains_key(peer) {
                    return Err("already a member".into());
                }
                let raft_id = self.new_raft_id(j);
                self.set_member(
                    Member {
                        peer: peer.clone(),
                        raft_id,
                        role: token.role,
                        zone: token.zone.clone(),
                        tags: tags.clone(),
                        capacity_bytes: *capacity_bytes,
                        addrs: addrs.clone(),
                    },
                    j,
                );
                j.push(Undo::Token(hash, Some(token.clone())));
                if token.uses <= 1 {
                    self.tokens.remove(&hash);
                } else {
                    self.tokens.insert(hash, Token { uses: token.uses - 1, ..token });
                }
            }
            Command::AddMember(m) => {
                if self.removed.contains(&m.peer) {
                    return Err("this node was removed; it must init again".into());
                }
                if self.members.contains_key(&m.peer) {
                    return Err("already a member".into());
                }
                let raft_id = self.new_raft_id(j);
                self.set_member(Member { raft_id, ..m.clone() }, j);
            }
            Command::RemoveMember { peer } => {
                let old = self.members.remove(peer).ok_or("not a member")?;
                j.push(Undo::Member(peer.clone(), Some(old)));
                j.push(Undo::Removed(peer.clone(), self.removed.contains(peer)));
                self.removed.insert(peer.clone());
            }
            Command::SetRole { peer, role } => {
                let mut m = self.members.get(peer).cloned().ok_or("not a member")?;
                m.role = *role;
                self.set_member(m, j);
            }
            Command::UpdateMember { peer, addrs, tags, capacity_bytes } => {
                let mut m = self.members.get(peer).cloned().ok_or("not a member")?;
                m.addrs = addrs.clone();
                m.tags = tags.clone();
                m.capacity_bytes = *capacity_bytes;
                self.set_member(m, j);
            }
            Command::AddPin(p) => {
                if p.replicas_min > p.replicas_max || p.replicas_min == 0 {
                    return Err("replicas must satisfy 1 <= min <= max".into());
                }
                access::validate_namespace(&p.namespace)?;
                let old = self.pins.insert(p.root.clone(), p.clone());
                j.push(Undo::Pin(p.root.clone(), old));
            }
            Command::RemovePin { root } => {
                let old = self.pins.remove(root).ok_or("no such pin")?;
                j.push(Undo::Pin(root.clone(), Some(old)));
            }
            Command::AddGrant(g) => {
                access::validate_grant(&g.subject, &g.permission, &g.namespace)?;
                j.push(Undo::Grants(self.grants.clone()));
                if !self.grants.contains(g) {
                    self.grants.push(g.clone());
                    self.grants.sort_by(|a, b| {
                        (&a.namespace, &a.subject, &a.permission).cmp(&(
                            &b.namespace,
                            &b.subject,
                            &b.permission,
                        ))
                    });
                }
            }
            Command::RemoveGrant(g) => {
                if !self.grants.contains(g) {
                    return Err("no such grant".into());
                }
                j.push(Undo::Grants(self.grants.clone()));
                self.grants.retain(|x| x != g);
            }
            Command::StageTopology(_)
            | Command::ActivateTopology { .. }
            | Command::EndTopologyCanary { .. }
            | Command::SetTopologySchema { .. }
            | Command::SetTopologyCanary { .. } => unreachable!("handled above"),
            Command::SetPolicy { key, value } => {
                let old = self.policies.insert(key.clone(), value.clone());
                j.push(Undo::Policy(key.clone(), old));
            }
        }
        Ok(())
    }

    /// Applies a topology command to a copy of its name's record, kept only on success.
    fn apply_topology(
        &mut self,
        name: &str,
        from: &[u8],
        c: &Command,
        j: &mut Vec<Undo>,
    ) -> Result<(), String> {
        topology::validate_name(name)
            .map_err(|e| format!("{} {e}", topology::Refusal::Invalid.marker()))?;
        let old = self.topologies.get(name).cloned();
        if old.is_none() && self.topologies.len() >= topology::NAMES_MAX {
            return Err(format!(
                "{} the cluster has {} topology names, the most allowed",
                topology::Refusal::Invalid.marker(),
                topology::NAMES_MAX
            ));
        }
        let mut record = old.clone().unwrap_or_default();
        let cx = topology::Context {
            members: &self.members,
            grants: &self.grants,
            from,
            index: self.applied_index,
        };
        topology::apply(&mut record, c, &cx)?;
        self.topologies.insert(name.to_owned(), record);
        j.push(Undo::Topology(name.to_owned(), old));
        Ok(())
    }

    /// Checks internal consistency.
    ///
    /// # Panics
    /// On a broken invariant: a bug.
    pub fn check_invariants(&self) {
        let mut ids = BTreeSet::new();
        for (k, m) in &self.members {
            assert_eq!(k, &m.peer, "member key");
            assert!(
                m.raft_id >= 1 && m.raft_id < self.next_raft_id.max(2),
                "raft id {}",
                m.raft_id
            );
            assert!(ids.insert(m.raft_id), "raft id {} used twice", m.raft_id);
            assert!(!self.removed.contains(k), "a removed peer is a member");
        }
        for t in self.tokens.values() {
            assert!(t.uses >= 1, "a spent token is kept");
        }
        for p in self.pins.values() {
            assert!(p.replicas_min <= p.replicas_max);
        }
        assert!(self.topologies.len() <= topology::NAMES_MAX, "{}", self.topologies.len());
        for (name, t) in &self.topologies {
            assert!(topology::validate_name(name).is_ok(), "topology name {name:?}");
            t.check_invariants(name);
            for v in &t.versions {
                assert!(v.staged_index <= self.applied_index, "name={name} v={}", v.number);
            }
            assert!(t.activated_index <= self.applied_index, "name={name}");
        }
    }
}

fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, k: K, v: Option<V>) {
    match v {
        Some(v) => {
            map.insert(k, v);
        }
        None => {
            map.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(n: u8, role: Role) -> Member {
        Member {
            peer: vec![n; 38],
            raft_id: 0,
            role,
            zone: "z".into(),
            tags: vec![],
            capacity_bytes: 0,
            addrs: vec![],
        }
    }

    fn entry(from: u8, seq: u64, commands: Vec<Command>) -> Vec<u8> {
        Proposal { from: vec![from; 38], seq, commands }.encode()
    }

    #[test]
    fn batches_apply_all_or_nothing_and_duplicates_once() {
        // A batch whose second command fails leaves the state as it was; a duplicate
        // (PeerId, seq) returns the first outcome and changes nothing; raft ids never repeat.
        let mut s = ClusterState::default();
        let e = entry(1, 1, vec![Command::AddMember(member(1, Role::Manager))]);
        assert_eq!(s.apply(1, &e).unwrap().2, Outcome::Applied);
        let before = s.clone();
        let bad = entry(
            1,
            2,
            vec![
                Command::AddMember(member(2, Role::Edge)),
                Command::RemoveMember { peer: vec![9; 38] },
            ],
        );
        assert!(matches!(s.apply(2, &bad).unwrap().2, Outcome::Rejected(_)));
        assert_eq!(s.members, before.members);
        assert_eq!(s.next_raft_id, before.next_raft_id);
        let again = s.apply(3, &e).unwrap().2;
        assert_eq!(again, Outcome::Rejected("sequence 1 already superseded by 2".into()));
        s.apply(4, &entry(1, 3, vec![Command::RemoveMember { peer: vec![1; 38] }]));
        s.apply(5, &entry(1, 4, vec![Command::AddMember(member(3, Role::Edge))]));
        assert_eq!(s.members[&vec![3; 38]].raft_id, 2, "ids are not reused");
        let rejoin = s.apply(6, &entry(1, 5, vec![Command::AddMember(member(1, Role::Edge))]));
        assert!(
            matches!(rejoin.unwrap().2, Outcome::Rejected(_)),
            "a removed node cannot come back"
        );
        s.check_invariants();
        assert_eq!(ClusterState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn pins_need_publish_and_grants_need_admin() {
        // An edge without grants cannot pin into a namespace or grant itself access; once a
        // manager grants it `publish`, the same pin is accepted (positive control), and an
        // edge may pin into `default` only with a grant too.
        let mut s = ClusterState::default();
        s.apply(1, &entry(1, 1, vec![Command::AddMember(member(1, Role::Manager))]));
        s.apply(2, &entry(1, 2, vec![Command::AddMember(member(2, Role::Edge))]));
        let pin = Command::AddPin(Pin {
            root: vec![9; 36],
            name: String::new(),
            namespace: "maps".into(),
            replicas_min: 1,
            replicas_max: 2,
            zones: vec![],
            tags: vec![],
            preposition: vec![],
            deadline_ms: 0,
        });
        let grant = |subject: &str, permission: &str| Grant {
            subject: subject.into(),
            permission: permission.into(),
            namespace: "maps".into(),
        };
        let r = s.apply(3, &entry(2, 1, vec![pin.clone()])).unwrap().2;
        assert!(matches!(r, Outcome::Rejected(ref w) if w.starts_with("unauthorised")), "{r:?}");
        let r = s.apply(4, &entry(2, 2, vec![Command::AddGrant(grant("zone:z", "admin"))]));
        assert!(matches!(r.unwrap().2, Outcome::Rejected(_)), "no self-service admin");
        let r = s.apply(5, &entry(1, 3, vec![Command::AddGrant(grant("zone:z", "publish"))]));
        assert_eq!(r.unwrap().2, Outcome::Applied);
        assert_eq!(s.apply(6, &entry(2, 3, vec![pin])).unwrap().2, Outcome::Applied);
        let bad = Command::AddGrant(Grant { permission: "write".into(), ..grant("zone:z", "") });
        assert!(matches!(s.apply(7, &entry(1, 4, vec![bad])).unwrap().2, Outcome::Rejected(_)));
        let token = Command::CreateToken {
            hash: [1; 32],
            role: Role::Edge,
            zone: "z".into(),
            expires_ms: 10,
            uses: 1,
        };
        assert!(matches!(s.apply(8, &entry(2, 4, vec![token])).unwrap().2, Outcome::Rejected(_)));
        s.check_invariants();
    }

    #[test]
    fn tokens_admit_until_spent_or_expired() {
        // A two-use token admits two nodes, then is gone; an expired one admits nobody;
        // activating a topology version that was never staged is rejected.
        let mut s = ClusterState::default();
        s.apply(1, &entry(1, 1, vec![Command::AddMember(member(1, Role::Manager))]));
        let secret = [7u8; 32];
        let hash = *blake3::hash(&secret).as_bytes();
        s.apply(
            2,
            &entry(
                1,
                2,
                vec![Command::CreateToken {
                    hash,
                    role: Role::Edge,
                    zone: "eu".into(),
                    expires_ms: 1000,
                    uses: 2,
                }],
            ),
        );
        let join = |peer: u8, now_ms: u64| Command::Join {
            secret,
            peer: vec![peer; 38],
            addrs: vec![],
            tags: vec![],
            capacity_bytes: 0,
            now_ms,
        };
        assert_eq!(s.apply(3, &entry(2, 1, vec![join(2, 10)])).unwrap().2, Outcome::Applied);
        assert_eq!(s.members[&vec![2; 38]].zone, "eu");
        assert!(matches!(
            s.apply(4, &entry(3, 1, vec![join(3, 2000)])).unwrap().2,
            Outcome::Rejected(_)
        ));
        assert_eq!(s.apply(5, &entry(3, 2, vec![join(3, 20)])).unwrap().2, Outcome::Applied);
        assert!(s.tokens.is_empty());
        assert!(matches!(
            s.apply(6, &entry(4, 1, vec![join(4, 30)])).unwrap().2,
            Outcome::Rejected(_)
        ));
        let topo = Command::ActivateTopology { name: "x".into(), version: 1, canary: false };
        assert!(matches!(s.apply(7, &entry(1, 3, vec![topo])).unwrap().2, Outcome::Rejected(_)));
        s.check_invariants();
    }
}
