//! Topology files for routers: the replicated records, the rules every replica checks when
//! it applies a topology command, what each router should apply, and the leader's decisions.
//!
//! Flow (`docs/topology.md` has it for users):
//!
//! 1. **Stage** ([`Command::StageTopology`]): a proposer signs
//!    [`signed_message`] with its ed25519 key (the one inside its PeerId) and sends the
//!    canonical bytes. Every replica checks, in this order, and rejects with a reason that
//!    starts with a stable marker ([`Refusal`]): the name and bounds; the signature
//!    (`unsigned:`, `bad signature:`); that the proposer is a member holding `publish` on the
//!    name's namespace (`unauthorised:`); that the bytes are canonical JSON whose object root
//!    is the named root (`invalid:`); the schema, if one is set (`schema invalid:`, with the
//!    JSON pointer of the failing value); and the base. A proposal based on the latest
//!    version N becomes N+1; one based on an older version is rejected (`stale base:`)
//!    unless it is forced, when it becomes the next version all the same.
//! 2. **Activate** ([`Command::ActivateTopology`]): the leader proposes it when the share of
//!    live subscribed routers holding the version meets the rule ([`Decider`], with the pure
//!    rules in [`mycel_policy::topology`]); an admin can propose it at any time, and
//!    activating an earlier version is the rollback. The previously active version becomes
//!    superseded. With a canary configuration ([`Command::SetTopologyCanary`]) the leader
//!    first activates on the canary routers ([`CanaryPhase`]), then promotes or rolls back
//!    ([`Command::EndTopologyCanary`]) from their hook results.
//! 3. **Apply**: a router subscribes to NAME with the member tag `topology:NAME`
//!    ([`subscription_tag`]); [`target`] says which version it should apply and under which
//!    activation index (the daemon's apply module runs the hook once per activation).
//!
//! Everything here is a pure function of the state and the command: no clock (times come in
//! commands), no IO. Activation, canary and schema commands need `admin` on the namespace
//! for the proposal's sender (`Proposal::from`, which the cluster protocol authenticates);
//! managers hold it everywhere, so the leader's own decisions pass.

use std::collections::{BTreeMap, BTreeSet};

use bincode::{Decode, Encode};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use mycel_chunker::{Cid, topology as canon};
use mycel_policy::access::{self, Permission, Subject};
use mycel_policy::topology as rules;

use crate::command::{Command, Grant, Member, StageTopology};
use crate::core::Timestamp;
use crate::state::ClusterState;

/// Largest canonical document a proposal may carry.
pub const CANONICAL_BYTES_MAX: usize = 1 << 20;
/// Largest JSON Schema.
pub const SCHEMA_BYTES_MAX: usize = 64 << 10;
/// Longest topology name.
pub const NAME_BYTES_MAX: usize = 128;
/// Most versions kept per name; staging past it is refused.
pub const VERSIONS_MAX: usize = 4096;
/// Most topology names in a cluster (with [`VERSIONS_MAX`] and [`SCHEMA_BYTES_MAX`], the
/// topology state stays under about 170 MB in the worst case, far below the state bound).
pub const NAMES_MAX: usize = 256;
/// Most canary subjects per name.
pub const CANARY_SUBJECTS_MAX: usize = 64;
/// Longest root or source CID, and the longest PeerId.
pub const ID_BYTES_MAX: usize = 64;
/// Domain separator at the start of every signed message.
pub const SIGNATURE_DOMAIN: &[u8] = b"mycel-topology-v1\0";
/// Prefix of the member tag that subscribes a node to a topology name.
pub const SUBSCRIPTION_TAG_PREFIX: &str = "topology:";
/// The namespace of names without a `NAMESPACE/` prefix.
pub const DEFAULT_NAMESPACE: &str = "topology";

const _: () = assert!(CANONICAL_BYTES_MAX + SCHEMA_BYTES_MAX < crate::command::PROPOSAL_BYTES_MAX);
const _: () = assert!(NAME_BYTES_MAX > access::NAMESPACE_BYTES_MAX);

/// The state of one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Encode, Decode)]
pub enum VersionState {
    /// Committed, never active.
    Staged,
    /// Active on the canary routers only.
    Canary,
    /// The active version.
    Active,
    /// Was active; another version is now.
    Superseded,
    /// Rolled back from its canary phase.
    Rejected,
}

impl VersionState {
    /// The name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Staged => "staged",
            VersionState::Canary => "canary",
            VersionState::Active => "active",
            VersionState::Superseded => "superseded",
            VersionState::Rejected => "rejected",
        }
    }
}

/// One committed version of a topology file.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Version {
    /// Version number, from 1.
    pub number: u64,
    /// Canonical root CID bytes.
    pub root: Vec<u8>,
    /// Source root CID bytes.
    pub source: Vec<u8>,
    /// The proposer's PeerId bytes.
    pub proposer: Vec<u8>,
    /// When it was proposed (the proposer's clock), ms since the epoch.
    pub proposed_ms: u64,
    /// The Raft index that staged it.
    pub staged_index: u64,
    /// Its state.
    pub state: VersionState,
}

/// Which subscribed routers take a new version first.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Canary {
    /// `tag:T`, `zone:Z` or `member:PEER` (base58).
    pub subjects: Vec<String>,
    /// Roll back when more than this percentage of canary hooks fail (0..=100).
    pub fail_pct_max: u32,
}

/// A version active on the canary routers only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CanaryPhase {
    /// The version.
    pub version: u64,
    /// The Raft index that started the phase.
    pub started_index: u64,
}

/// Everything the cluster knows about one topology name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct Topology {
    /// Versions in order: `versions[i].number == i + 1`.
    pub versions: Vec<Version>,
    /// The active version.
    pub active: Option<u64>,
    /// The Raft index of the activation that made `active` active.
    pub activated_index: u64,
    /// JSON Schema bytes (empty: none).
    pub schema: Vec<u8>,
    /// Canary configuration.
    pub canary: Option<Canary>,
    /// The canary phase in progress.
    pub canary_phase: Option<CanaryPhase>,
}

impl Topology {
    /// The latest version number (0: none).
    pub fn latest(&self) -> u64 {
        self.versions.len() as u64
    }

    /// Version `number`.
    pub fn version(&self, number: u64) -> Option<&Version> {
        let i = usize::try_from(number.checked_sub(1)?).ok()?;
        self.versions.get(i)
    }

    fn version_mut(&mut self, number: u64) -> Option<&mut Version> {
        let i = usize::try_from(number.checked_sub(1)?).ok()?;
        self.versions.get_mut(i)
    }

    /// Checks internal consistency.
    ///
    /// # Panics
    /// On a broken invariant: a bug.
    pub fn check_invariants(&self, name: &str) {
        assert!(
            self.versions.len() <= VERSIONS_MAX,
            "name={name} versions={}",
            self.versions.len()
        );
        assert!(self.schema.len() <= SCHEMA_BYTES_MAX, "name={name}");
        for (i, v) in self.versions.iter().enumerate() {
            assert_eq!(v.number, i as u64 + 1, "name={name} version numbering");
            let active = v.state == VersionState::Active;
            assert_eq!(active, self.active == Some(v.number), "name={name} v={} active", v.number);
            let canary = v.state == VersionState::Canary;
            let phase = self.canary_phase.map(|p| p.version);
            assert_eq!(canary, phase == Some(v.number), "name={name} v={} canary", v.number);
            assert!(v.staged_index >= 1, "name={name} v={}", v.number);
        }
        if let Some(a) = self.active {
            assert!(self.version(a).is_some(), "name={name} active {a} missing");
            assert!(self.activated_index >= 1, "name={name}");
        }
        if let Some(p) = self.canary_phase {
            assert!(self.canary.is_some(), "name={name} canary phase without configuration");
            assert!(Some(p.version) != self.active, "name={name} canary of the active version");
        }
        if let Some(c) = &self.canary {
            assert!(c.fail_pct_max <= 100, "name={name}");
            assert!(!c.subjects.is_empty() && c.subjects.len() <= CANARY_SUBJECTS_MAX);
        }
    }
}

/// The stable start of a rejection reason, for the CLI's exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// `stale base:` another version was staged on the same base first.
    StaleBase,
    /// `unauthorised:` not a member, or no `publish` (stage) / `admin` (others).
    Unauthorised,
    /// `unsigned:` no signature.
    Unsigned,
    /// `bad signature:` a signature that does not verify, or a PeerId that is no ed25519 key.
    BadSignature,
    /// `schema invalid:` the document fails the name's schema (or a schema fails to compile).
    SchemaInvalid,
    /// `invalid:` anything else about the command (bytes, root, name, bounds, states).
    Invalid,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::StaleBase,
        Refusal::Unauthorised,
        Refusal::Unsigned,
        Refusal::BadSignature,
        Refusal::SchemaInvalid,
        Refusal::Invalid,
    ];

    /// The marker a reason starts with.
    pub fn marker(self) -> &'static str {
        match self {
            Refusal::StaleBase => "stale base:",
            Refusal::Unauthorised => "unauthorised:",
            Refusal::Unsigned => "unsigned:",
            Refusal::BadSignature => "bad signature:",
            Refusal::SchemaInvalid => "schema invalid:",
            Refusal::Invalid => "invalid:",
        }
    }

    /// The refusal a rejection reason starts with, if any.
    pub fn of(reason: &str) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| reason.starts_with(r.marker()))
    }

    /// The `mycel` CLI's exit code for this refusal (`docs/topology.md`).
    pub fn exit_code(self) -> i32 {
        match self {
            Refusal::StaleBase => 10,
            Refusal::Unauthorised => 11,
            Refusal::SchemaInvalid => 12,
            Refusal::Unsigned | Refusal::BadSignature => 13,
            Refusal::Invalid => 4,
        }
    }

    fn with(self, what: impl std::fmt::Display) -> String {
        format!("{} {what}", self.marker())
    }
}

/// The namespace of topology `name`: the part before `/`, or [`DEFAULT_NAMESPACE`].
pub fn namespace(name: &str) -> &str {
    name.split_once('/').map_or(DEFAULT_NAMESPACE, |(ns, _)| ns)
}

/// Checks a topology name: `NAME` or `NAMESPACE/NAME`, each part 1 to 64 characters of
/// `a-z 0-9 . _ -` other than `.` and `..`, at most [`NAME_BYTES_MAX`] bytes in all (names
/// become file names on routers).
///
/// # Errors
/// A message saying what is allowed.
pub fn validate_name(name: &str) -> Result<(), String> {
    let parts: Vec<&str> = name.split('/').collect();
    let ok = name.len() <= NAME_BYTES_MAX
        && parts.len() <= 2
        && parts.iter().all(|p| access::validate_namespace(p).is_ok() && *p != "." && *p != "..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad topology name {name:?}: NAME or NAMESPACE/NAME, each 1 to 64 characters of a-z 0-9 . _ - (not . or ..)"
        ))
    }
}

/// The member tag that subscribes a node to `name`.
pub fn subscription_tag(name: &str) -> String {
    format!("{SUBSCRIPTION_TAG_PREFIX}{name}")
}

/// Whether `member` is subscribed to `name`.
pub fn subscribed(member: &Member, name: &str) -> bool {
    member.tags.iter().any(|t| t.strip_prefix(SUBSCRIPTION_TAG_PREFIX) == Some(name))
}

/// The message a proposer signs: [`SIGNATURE_DOMAIN`], then each field in order, byte
/// strings as a 4-byte big-endian length and the bytes, numbers as 8 bytes big-endian, the
/// flag as one byte: name, base, root, source, proposer, proposed_ms, force.
///
/// The canonical bytes are covered through the root, which every replica recomputes from
/// them.
pub fn signed_message(s: &StageTopology) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 64 + s.name.len() + 3 * 64);
    m.extend_from_slice(SIGNATURE_DOMAIN);
    let mut bytes = |b: &[u8]| {
        m.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
        m.extend_from_slice(b);
    };
    bytes(s.name.as_bytes());
    bytes(&s.base.to_be_bytes());
    bytes(&s.root);
    bytes(&s.source);
    bytes(&s.proposer);
    bytes(&s.proposed_ms.to_be_bytes());
    bytes(&[u8::from(s.force)]);
    m
}

/// Signs `s` in place with the ed25519 secret key of its proposer.
pub fn sign(s: &mut StageTopology, secret: &[u8; 32]) {
    let key = SigningKey::from_bytes(secret);
    s.signature = key.sign(&signed_message(s)).to_bytes().to_vec();
}

/// The PeerId bytes of an ed25519 public key: an identity multihash of the protobuf-encoded
/// key (`00 24 08 01 12 20` and the 32 bytes), as libp2p writes it.
pub fn peer_of_key(public: &[u8; 32]) -> Vec<u8> {
    let mut p = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    p.extend_from_slice(public);
    p
}

/// The ed25519 public key inside PeerId bytes, if they hold one.
pub fn key_of_peer(peer: &[u8]) -> Option<VerifyingKey> {
    let key: &[u8; 32] =
        peer.strip_prefix(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20])?.try_into().ok()?;
    VerifyingKey::from_bytes(key).ok()
}

/// A compiled JSON Schema (no remote or file references; `pattern` uses the linear-time
/// `regex` engine; `format` is asserted).
#[derive(Debug)]
pub struct Schema(jsonschema::Validator);

/// Most schema errors listed in one rejection.
const SCHEMA_ERRORS_MAX: usize = 3;

impl Schema {
    /// Compiles schema bytes.
    ///
    /// # Errors
    /// A message (starting `schema invalid:`) when the bytes are over the bound, not JSON, or
    /// not a schema that compiles.
    pub fn compile(bytes: &[u8]) -> Result<Schema, String> {
        let bad = Refusal::SchemaInvalid;
        if bytes.len() > SCHEMA_BYTES_MAX {
            return Err(bad.with(format!(
                "the schema is {} bytes, more than {SCHEMA_BYTES_MAX}",
                bytes.len()
            )));
        }
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| bad.with(format!("the schema is not JSON: {e}")))?;
        let patterns =
            jsonschema::PatternOptions::regex().size_limit(1 << 20).dfa_size_limit(1 << 20);
        jsonschema::options()
            .with_pattern_options(patterns)
            .should_validate_formats(true)
            .build(&value)
            .map(Schema)
            .map_err(|e| bad.with(format!("the schema does not compile: {e}")))
    }

    /// Validates a document.
    ///
    /// # Errors
    /// A message starting `schema invalid:` with the JSON pointer and message of the first
    /// few failing values, e.g. `schema invalid: at /nodes/0/asn: "x" is not of type "integer"`.
    pub fn validate(&self, document: &serde_json::Value) -> Result<(), String> {
        let errors: Vec<String> = self
            .0
            .iter_errors(document)
            .take(SCHEMA_ERRORS_MAX + 1)
            .map(|e| {
                let path = e.instance_path().as_str().to_owned();
                let path = if path.is_empty() { "/".to_owned() } else { path };
                format!("at {path}: {e}")
            })
            .collect();
        if errors.is_empty() {
            return Ok(());
        }
        let more = if errors.len() > SCHEMA_ERRORS_MAX { "; ..." } else { "" };
        let shown = &errors[..errors.len().min(SCHEMA_ERRORS_MAX)];
        Err(Refusal::SchemaInvalid.with(format!("{}{more}", shown.join("; "))))
    }
}

/// What applying a topology command needs from the rest of the state.
pub(crate) struct Context<'a> {
    pub members: &'a BTreeMap<Vec<u8>, Member>,
    pub grants: &'a [Grant],
    /// The proposal's sender.
    pub from: &'a [u8],
    /// The entry's Raft index.
    pub index: u64,
}

impl Context<'_> {
    fn allowed(&self, peer: &[u8], name: &str, needed: Permission) -> Result<(), String> {
        let Some(m) = self.members.get(peer) else {
            return Err(Refusal::Unauthorised
                .with(format!("{} is not a member", bs58::encode(peer).into_string())));
        };
        let who = Subject::new(&m.peer, m.role.as_str(), &m.zone, &m.tags);
        let grants = self
            .grants
            .iter()
            .map(|g| (g.subject.as_str(), g.permission.as_str(), g.namespace.as_str()));
        let ns = namespace(name);
        if access::allowed(grants, &who, ns, needed) {
            Ok(())
        } else {
            Err(Refusal::Unauthorised.with(format!(
                "{} lacks {} on namespace {ns:?}",
                who.peer,
                needed.as_str()
            )))
        }
    }
}

/// The name a topology command is about.
pub(crate) fn command_name(c: &Command) -> Option<&str> {
    Some(match c {
        Command::StageTopology(s) => &s.name,
        Command::ActivateTopology { name, .. }
        | Command::EndTopologyCanary { name, .. }
        | Command::SetTopologySchema { name, .. }
        | Command::SetTopologyCanary { name, .. } => name,
        _ => return None,
    })
}

/// Applies a topology command to the record of its name. On an error `t` is unchanged.
pub(crate) fn apply(t: &mut Topology, c: &Command, cx: &Context<'_>) -> Result<(), String> {
    let invalid = Refusal::Invalid;
    match c {
        Command::StageTopology(s) => stage(t, s, cx),
        Command::ActivateTopology { name, version, canary } => {
            cx.allowed(cx.from, name, Permission::Admin)?;
            let v = t.version(*version).ok_or_else(|| {
                invalid.with(format!("{name} has no version {version} (latest {})", t.latest()))
            })?;
            if v.state == VersionState::Active {
                return Err(invalid.with(format!("{name} version {version} is already active")));
            }
            if let Some(p) = t.canary_phase
                // Fully activating the canary version is its promotion; anything else waits.
                && (p.version != *version || *canary)
            {
                return Err(invalid.with(format!(
                    "{name} version {} is in its canary phase: promote or roll it back first",
                    p.version
                )));
            }
            if *canary {
                if t.canary.is_none() {
                    return Err(invalid.with(format!("{name} has no canary configuration")));
                }
                t.canary_phase = Some(CanaryPhase { version: *version, started_index: cx.index });
                set_state(t, *version, VersionState::Canary);
            } else {
                activate(t, *version, cx.index);
            }
            Ok(())
        }
        Command::EndTopologyCanary { name, version, promote } => {
            cx.allowed(cx.from, name, Permission::Admin)?;
            if t.canary_phase.map(|p| p.version) != Some(*version) {
                return Err(
                    invalid.with(format!("{name} version {version} is not in a canary phase"))
                );
            }
            if *promote {
                activate(t, *version, cx.index);
            } else {
                t.canary_phase = None;
                set_state(t, *version, VersionState::Rejected);
            }
            Ok(())
        }
        Command::SetTopologySchema { name, schema } => {
            cx.allowed(cx.from, name, Permission::Admin)?;
            if !schema.is_empty() {
                Schema::compile(schema)?;
            }
            t.schema = schema.clone();
            Ok(())
        }
        Command::SetTopologyCanary { name, subjects, fail_pct_max } => {
            cx.allowed(cx.from, name, Permission::Admin)?;
            if *fail_pct_max > 100 || subjects.len() > CANARY_SUBJECTS_MAX {
                return Err(invalid.with(format!(
                    "a canary has at most {CANARY_SUBJECTS_MAX} subjects and fails at 0 to 100%"
                )));
            }
            for s in subjects {
                rules::validate_canary_subject(s).map_err(|e| invalid.with(e))?;
            }
            if subjects.is_empty() {
                if t.canary_phase.is_some() {
                    return Err(invalid.with(format!(
                        "{name} is in a canary phase: promote or roll it back before removing the canary"
                    )));
                }
                t.canary = None;
            } else {
                t.canary = Some(Canary { subjects: subjects.clone(), fail_pct_max: *fail_pct_max });
            }
            Ok(())
        }
        _ => unreachable!("not a topology command: {c:?}"),
    }
}

fn set_state(t: &mut Topology, version: u64, state: VersionState) {
    t.version_mut(version).expect("checked by the caller").state = state;
}

fn activate(t: &mut Topology, version: u64, index: u64) {
    if let Some(old) = t.active {
        set_state(t, old, VersionState::Superseded);
    }
    if t.canary_phase.is_some_and(|p| p.version == version) {
        t.canary_phase = None;
    }
    set_state(t, version, VersionState::Active);
    t.active = Some(version);
    t.activated_index = index;
}

fn stage(t: &mut Topology, s: &StageTopology, cx: &Context<'_>) -> Result<(), String> {
    let invalid = Refusal::Invalid;
    validate_name(&s.name).map_err(|e| invalid.with(e))?;
    if s.canonical.len() > CANONICAL_BYTES_MAX {
        return Err(invalid.with(format!(
            "the document is {} bytes, more than {CANONICAL_BYTES_MAX}",
            s.canonical.len()
        )));
    }
    if [&s.root, &s.source, &s.proposer].iter().any(|b| b.len() > ID_BYTES_MAX) {
        return Err(invalid.with("a CID or PeerId longer than 64 bytes"));
    }
    // Signature: present, made by the key inside the proposer's PeerId, over this command.
    if s.signature.is_empty() {
        return Err(Refusal::Unsigned.with("the proposal carries no signature"));
    }
    let bad_sig = Refusal::BadSignature;
    let key = key_of_peer(&s.proposer)
        .ok_or_else(|| bad_sig.with("the proposer's PeerId holds no ed25519 public key"))?;
    let sig = Signature::from_slice(&s.signature)
        .map_err(|_| bad_sig.with("the signature is not 64 bytes"))?;
    key.verify(&signed_message(s), &sig)
        .map_err(|_| bad_sig.with("the signature does not verify with the proposer's key"))?;
    // Permission: a member holding publish on the namespace.
    cx.allowed(&s.proposer, &s.name, Permission::Publish)?;
    // The bytes: canonical JSON whose object root is the named root.
    let value = canon::parse(&s.canonical, canon::Format::Json)
        .map_err(|e| invalid.with(format!("the document is not JSON: {e}")))?;
    if canon::canonical_json(&value) != s.canonical {
        return Err(invalid.with("the document is not in canonical form"));
    }
    let root = canon::object_root(&s.canonical, &s.chunker.into())
        .map_err(|e| invalid.with(format!("chunker identity: {e}")))?;
    if root.to_bytes()[..] != s.root[..] {
        return Err(invalid.with(format!("the document's root is {root}, not the one named")));
    }
    Cid::from_bytes(&s.source)
        .map_err(|e| invalid.with(format!("the source root is not a CID: {e}")))?;
    // The schema.
    if !t.schema.is_empty() {
        let schema = Schema::compile(&t.schema)?;
        let doc: serde_json::Value = serde_json::from_slice(&s.canonical)
            .map_err(|e| invalid.with(format!("the document is not JSON: {e}")))?;
        schema.validate(&doc)?;
    }
    // The base.
    let latest = t.latest();
    if s.base > latest {
        return Err(invalid.with(format!(
            "base {} does not exist: the latest version of {} is {latest}",
            s.base, s.name
        )));
    }
    if s.base < latest && !s.force {
        return Err(Refusal::StaleBase.with(format!(
            "{} is at version {latest}, not {}; propose again on {latest} or force",
            s.name, s.base
        )));
    }
    if let Some(last) = t.versions.last()
        && last.root == s.root
    {
        return Err(invalid.with(format!("version {latest} of {} already has this root", s.name)));
    }
    if t.versions.len() >= VERSIONS_MAX {
        return Err(invalid.with(format!("{} has {VERSIONS_MAX} versions, the most kept", s.name)));
    }
    t.versions.push(Version {
        number: latest + 1,
        root: s.root.clone(),
        source: s.source.clone(),
        proposer: s.proposer.clone(),
        proposed_ms: s.proposed_ms,
        staged_index: cx.index,
        state: VersionState::Staged,
    });
    Ok(())
}

/// What a subscribed router should have applied for one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Topology name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Canonical root CID bytes.
    pub root: Vec<u8>,
    /// The Raft index of the activation (or canary start) this router follows: the hook runs
    /// once per distinct value.
    pub activation_index: u64,
    /// Whether this is a canary activation.
    pub canary: bool,
}

/// Whether `member` is one of `name`'s canary routers.
pub fn is_canary(t: &Topology, member: &Member) -> bool {
    t.canary.as_ref().is_some_and(|c| {
        let who = Subject::new(&member.peer, member.role.as_str(), &member.zone, &member.tags);
        rules::canary_matches(&c.subjects, &who)
    })
}

/// The version `peer` should apply for `name`, if it is a subscribed member and something is
/// active for it: the canary version on canary routers during a canary phase, otherwise the
/// active version.
pub fn target(state: &ClusterState, name: &str, peer: &[u8]) -> Option<Target> {
    let member = state.members.get(peer)?;
    if !subscribed(member, name) {
        return None;
    }
    let t = state.topologies.get(name)?;
    let (version, index, canary) = match t.canary_phase {
        Some(p) if is_canary(t, member) => (p.version, p.started_index, true),
        _ => (t.active?, t.activated_index, false),
    };
    let v = t.version(version)?;
    Some(Target {
        name: name.to_owned(),
        version,
        root: v.root.clone(),
        activation_index: index,
        canary,
    })
}

/// Every target of `peer`, by name.
pub fn targets(state: &ClusterState, peer: &[u8]) -> Vec<Target> {
    let Some(m) = state.members.get(peer) else { return Vec::new() };
    m.tags
        .iter()
        .filter_map(|t| t.strip_prefix(SUBSCRIPTION_TAG_PREFIX))
        .filter_map(|name| target(state, name, peer))
        .collect()
}

/// What the leader observed about one version: which live subscribed routers hold it, and
/// the hook results of the routers that applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// PeerIds of subscribed routers currently reachable (heard within the daemon's grace).
    pub live: BTreeSet<Vec<u8>>,
    /// PeerIds of routers that report holding the version.
    pub holders: BTreeSet<Vec<u8>>,
    /// Hook results by PeerId.
    pub hooks: BTreeMap<Vec<u8>, HookResult>,
}

/// A router's report of running its hook for one activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HookResult {
    /// The activation (or canary start) index it ran for: results of an earlier activation
    /// of the same version do not count.
    pub activation_index: u64,
    /// The file is in place and the hook succeeded (false: failed or timed out, the previous
    /// file restored).
    pub applied: bool,
}

/// Most names the [`Decider`] tracks observations for.
pub const OBSERVED_NAMES_MAX: usize = NAMES_MAX;

/// The leader's topology decisions: what it observed (fed by the daemon from gossip) and
/// what it proposed, so it proposes each decision once per `repropose_ms` until it commits.
///
/// The daemon calls [`Decider::handle_observation`] as reports arrive and, while this node
/// leads, [`Decider::poll`] on every tick, proposing each returned batch (as it proposes the
/// core's `Output::Propose`). A follower's decider may keep observing; only the leader polls.
#[derive(Debug)]
pub struct Decider {
    observed: BTreeMap<(String, u64), Observation>,
    proposed: BTreeMap<String, (Command, Timestamp)>,
    repropose_ms: u64,
}

impl Decider {
    /// A decider that repeats an uncommitted proposal after `repropose_ms`.
    pub fn new(repropose_ms: u64) -> Decider {
        Decider { observed: BTreeMap::new(), proposed: BTreeMap::new(), repropose_ms }
    }

    /// Records what the daemon observed about `name` version `version`, replacing the last
    /// observation of it and of older versions of `name`. Past [`OBSERVED_NAMES_MAX`]
    /// observations, the first in name order are dropped (names the state does not know are
    /// dropped at the next [`Decider::poll`]).
    pub fn handle_observation(&mut self, name: &str, version: u64, observation: Observation) {
        self.observed.retain(|(n, v), _| n != name || *v >= version);
        self.observed.insert((name.to_owned(), version), observation);
        while self.observed.len() > OBSERVED_NAMES_MAX {
            self.observed.pop_first();
        }
    }

    /// The proposals to make now, one single-command batch per name, given the committed
    /// state. Forgets observations of versions no longer pending.
    pub fn poll(&mut self, state: &ClusterState, now: Timestamp) -> Vec<Vec<Command>> {
        let mut out = Vec::new();
        self.observed.retain(|(name, v), _| {
            state.topologies.get(name).is_some_and(|t| {
                t.version(*v)
                    .is_some_and(|x| matches!(x.state, VersionState::Staged | VersionState::Canary))
            })
        });
        for ((name, version), obs) in &self.observed {
            let Some(t) = state.topologies.get(name) else { continue };
            let Some(c) = decide(state, t, name, *version, obs) else { continue };
            if let Some((prev, at)) = self.proposed.get(name)
                && *prev == c
                && now.0.saturating_sub(at.0) < self.repropose_ms
            {
                continue;
            }
            self.proposed.insert(name.clone(), (c.clone(), now));
            out.push(vec![c]);
        }
        self.proposed.retain(|name, _| state.topologies.contains_key(name));
        out
    }
}

/// The activation share for `name`: `topology.activate_share.NAME`, else
/// `topology.activate_share`, else 1 (every live subscribed router). A value that does not
/// parse counts as 1.
pub fn activation_share(state: &ClusterState, name: &str) -> rules::Share {
    let key = format!("{}.{name}", rules::ACTIVATE_SHARE_POLICY);
    state
        .policies
        .get(&key)
        .or_else(|| state.policies.get(rules::ACTIVATE_SHARE_POLICY))
        .and_then(|v| rules::Share::parse(v).ok())
        .unwrap_or(rules::Share::ALL)
}

/// The leader's decision for one observed version of `name`, if any.
fn decide(
    state: &ClusterState,
    t: &Topology,
    name: &str,
    version: u64,
    obs: &Observation,
) -> Option<Command> {
    let v = t.version(version)?;
    let share = activation_share(state, name);
    let subscribed: BTreeSet<Vec<u8>> = state
        .members
        .values()
        .filter(|m| subscribed(m, name) && obs.live.contains(&m.peer))
        .map(|m| m.peer.clone())
        .collect();
    let canaries: BTreeSet<Vec<u8>> = state
        .members
        .values()
        .filter(|m| subscribed.contains(&m.peer) && is_canary(t, m))
        .map(|m| m.peer.clone())
        .collect();
    match v.state {
        VersionState::Staged => {
            // Only the latest version is a candidate (an older staged one was overtaken; an
            // admin can still activate it), and never while a canary phase runs.
            if version != t.latest() || t.canary_phase.is_some() {
                return None;
            }
            let canary = t.canary.is_some() && !canaries.is_empty();
            let among = if canary { &canaries } else { &subscribed };
            let ready =
                rules::activation(among, &obs.holders, share) == rules::Activation::Activate;
            ready.then(|| Command::ActivateTopology { name: name.to_owned(), version, canary })
        }
        VersionState::Canary => {
            let c = t.canary.as_ref()?;
            let phase = t.canary_phase?;
            let hooks: BTreeMap<Vec<u8>, bool> = obs
                .hooks
                .iter()
                .filter(|(_, h)| h.activation_index == phase.started_index)
                .map(|(p, h)| (p.clone(), h.applied))
                .collect();
            match rules::canary(&canaries, &hooks, c.fail_pct_max) {
                rules::CanaryDecision::RollBack { .. } => Some(Command::EndTopologyCanary {
                    name: name.to_owned(),
                    version,
                    promote: false,
                }),
                rules::CanaryDecision::Promote => {
                    let ready = rules::activation(&subscribed, &obs.holders, share)
                        == rules::Activation::Activate;
                    ready.then(|| Command::EndTopologyCanary {
                        name: name.to_owned(),
                        version,
                        promote: true,
                    })
                }
                rules::CanaryDecision::Wait { .. } => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Proposal, Role};
    use crate::state::Outcome;
    use mycel_chunker::Config;

    /// A cluster under test: members with real ed25519 keys, applying entries in order.
    struct Cluster {
        state: ClusterState,
        index: u64,
        seq: u64,
    }

    fn secret(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn peer(n: u8) -> Vec<u8> {
        peer_of_key(&SigningKey::from_bytes(&secret(n)).verifying_key().to_bytes())
    }

    const MANAGER: u8 = 1;
    const ROUTER_A: u8 = 2;
    const ROUTER_B: u8 = 3;
    const ROUTER_C: u8 = 4;
    const STRANGER: u8 = 9;

    impl Cluster {
        /// A manager; routers A (tag canary), B and C subscribed to `lab`, in zone z.
        fn new() -> Cluster {
            let mut c = Cluster { state: ClusterState::default(), index: 0, seq: 0 };
            let member = |n: u8, role: Role, tags: &[&str]| Member {
                peer: peer(n),
                raft_id: 0,
                role,
                zone: "z".into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                capacity_bytes: 0,
                addrs: vec![],
            };
            let adds = vec![
                Command::AddMember(member(MANAGER, Role::Manager, &[])),
                Command::AddMember(member(ROUTER_A, Role::Router, &["topology:lab", "canary"])),
                Command::AddMember(member(ROUTER_B, Role::Router, &["topology:lab", "netops"])),
                Command::AddMember(member(ROUTER_C, Role::Router, &["topology:lab"])),
            ];
            assert_eq!(c.apply(MANAGER, adds), Outcome::Applied);
            c
        }

        fn apply(&mut self, from: u8, commands: Vec<Command>) -> Outcome {
            self.index += 1;
            self.seq += 1;
            let e = Proposal { from: peer(from), seq: self.seq, commands }.encode();
            let (_, _, outcome) = self.state.apply(self.index, &e).expect("an outcome");
            self.state.check_invariants();
            outcome
        }

        fn lab(&self) -> &Topology {
            &self.state.topologies["lab"]
        }

        fn states(&self) -> Vec<VersionState> {
            self.lab().versions.iter().map(|v| v.state).collect()
        }
    }

    fn canonical(json: &str) -> Vec<u8> {
        canon::canonical_json(&canon::parse(json.as_bytes(), canon::Format::Json).unwrap())
    }

    /// A signed proposal of `json` as the next version of `lab` on `base`, by `by`.
    fn stage(by: u8, base: u64, json: &str) -> StageTopology {
        let canonical = canonical(json);
        let config = Config::default();
        let root = canon::object_root(&canonical, &config).unwrap().to_bytes().to_vec();
        let source = Cid::raw(json.as_bytes()).to_bytes().to_vec();
        let mut s = StageTopology {
            name: "lab".into(),
            base,
            canonical,
            chunker: config.into(),
            root,
            source,
            proposer: peer(by),
            proposed_ms: 1_000 + base,
            signature: vec![],
            force: false,
        };
        sign(&mut s, &secret(by));
        s
    }

    fn cmd(s: StageTopology) -> Vec<Command> {
        vec![Command::StageTopology(Box::new(s))]
    }

    fn refusal(o: &Outcome) -> Option<Refusal> {
        match o {
            Outcome::Applied => None,
            Outcome::Rejected(r) => {
                Some(Refusal::of(r).unwrap_or_else(|| panic!("no marker: {r}")))
            }
        }
    }

    fn activate(version: u64, canary: bool) -> Vec<Command> {
        vec![Command::ActivateTopology { name: "lab".into(), version, canary }]
    }

    const DOC1: &str = r#"{"nodes": [{"id": "r1", "asn": 65001}]}"#;
    const DOC2: &str = r#"{"nodes": [{"id": "r1", "asn": 65001}, {"id": "r2", "asn": 65002}]}"#;
    const DOC3: &str = r#"{"nodes": [{"id": "r3", "asn": 65003}]}"#;

    #[test]
    fn signatures_are_checked() {
        // A manager's signed proposal stages; unsigned, tampered, signed with another key,
        // malformed, and a proposer whose PeerId is no ed25519 key are each refused with
        // their marker, and leave nothing staged.
        let mut c = Cluster::new();
        let mut unsigned = stage(MANAGER, 0, DOC1);
        unsigned.signature.clear();
        assert_eq!(refusal(&c.apply(MANAGER, cmd(unsigned))), Some(Refusal::Unsigned));
        let mut tampered = stage(MANAGER, 0, DOC1);
        tampered.force = true;
        assert_eq!(refusal(&c.apply(MANAGER, cmd(tampered))), Some(Refusal::BadSignature));
        let mut wrong_key = stage(MANAGER, 0, DOC1);
        sign(&mut wrong_key, &secret(ROUTER_A));
        assert_eq!(refusal(&c.apply(MANAGER, cmd(wrong_key))), Some(Refusal::BadSignature));
        let mut short = stage(MANAGER, 0, DOC1);
        short.signature.truncate(10);
        assert_eq!(refusal(&c.apply(MANAGER, cmd(short))), Some(Refusal::BadSignature));
        let mut not_ed25519 = stage(MANAGER, 0, DOC1);
        not_ed25519.proposer = vec![MANAGER; 38];
        assert_eq!(refusal(&c.apply(MANAGER, cmd(not_ed25519))), Some(Refusal::BadSignature));
        assert!(c.state.topologies.is_empty(), "nothing staged by a refused proposal");
        assert_eq!(c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1))), Outcome::Applied);
        let v = c.lab().version(1).unwrap();
        assert_eq!(
            (v.state, v.proposer.clone(), v.proposed_ms),
            (VersionState::Staged, peer(MANAGER), 1_000)
        );
        assert_eq!(v.staged_index, c.index);
    }

    #[test]
    fn publish_permission_is_needed_and_sufficient() {
        // Router B has no grant: refused as unauthorised. After a grant of publish on the
        // topology namespace to its tag, the same proposal stages (positive control). A
        // correctly signed proposal from a non-member is refused; a read grant is not enough.
        let mut c = Cluster::new();
        let p = stage(ROUTER_B, 0, DOC1);
        assert_eq!(refusal(&c.apply(ROUTER_B, cmd(p.clone()))), Some(Refusal::Unauthorised));
        let grant = |perm: &str| Grant {
            subject: "tag:netops".into(),
            permission: perm.into(),
            namespace: DEFAULT_NAMESPACE.into(),
        };
        assert_eq!(c.apply(MANAGER, vec![Command::AddGrant(grant("read"))]), Outcome::Applied);
        assert_eq!(refusal(&c.apply(ROUTER_B, cmd(p.clone()))), Some(Refusal::Unauthorised));
        assert_eq!(c.apply(MANAGER, vec![Command::AddGrant(grant("publish"))]), Outcome::Applied);
        assert_eq!(c.apply(ROUTER_B, cmd(p)), Outcome::Applied);
        assert_eq!(c.lab().latest(), 1);
        let outsider = stage(STRANGER, 1, DOC2);
        let o = c.apply(MANAGER, cmd(outsider));
        assert_eq!(refusal(&o), Some(Refusal::Unauthorised));
        assert!(matches!(&o, Outcome::Rejected(r) if r.contains("not a member")), "{o:?}");
        // Publish does not include admin: router B may not activate or set a schema.
        assert_eq!(refusal(&c.apply(ROUTER_B, activate(1, false))), Some(Refusal::Unauthorised));
        // A namespaced name needs publish on that namespace.
        let mut other = stage(ROUTER_B, 0, DOC1);
        other.name = "core/backbone".into();
        sign(&mut other, &secret(ROUTER_B));
        assert_eq!(refusal(&c.apply(ROUTER_B, cmd(other))), Some(Refusal::Unauthorised));
    }

    #[test]
    fn bytes_must_be_canonical_and_match_the_root() {
        // Non-canonical bytes, a root over other bytes, a bad chunker identity, an oversized
        // document and a bad name are refused as invalid; none of them panics.
        let mut c = Cluster::new();
        let resign = |mut s: StageTopology| {
            sign(&mut s, &secret(MANAGER));
            cmd(s)
        };
        let mut spaced = stage(MANAGER, 0, DOC1);
        spaced.canonical = DOC1.as_bytes().to_vec();
        assert_eq!(refusal(&c.apply(MANAGER, cmd(spaced))), Some(Refusal::Invalid));
        let mut other_root = stage(MANAGER, 0, DOC1);
        other_root.root = stage(MANAGER, 0, DOC2).root;
        assert_eq!(refusal(&c.apply(MANAGER, resign(other_root))), Some(Refusal::Invalid));
        let mut bad_chunker = stage(MANAGER, 0, DOC1);
        bad_chunker.chunker.fanout_bits = 0;
        assert_eq!(refusal(&c.apply(MANAGER, cmd(bad_chunker))), Some(Refusal::Invalid));
        let mut huge = stage(MANAGER, 0, DOC1);
        huge.canonical = vec![b' '; CANONICAL_BYTES_MAX + 1];
        assert_eq!(refusal(&c.apply(MANAGER, cmd(huge))), Some(Refusal::Invalid));
        let mut garbage = stage(MANAGER, 0, DOC1);
        garbage.canonical = vec![0xff, 0x00, b'{'];
        assert_eq!(refusal(&c.apply(MANAGER, cmd(garbage))), Some(Refusal::Invalid));
        let mut bad_name = stage(MANAGER, 0, DOC1);
        bad_name.name = "Lab/x/y".into();
        assert_eq!(refusal(&c.apply(MANAGER, resign(bad_name))), Some(Refusal::Invalid));
        assert!(c.state.topologies.is_empty());
    }

    #[test]
    fn schema_rejects_with_the_path_then_accepts_the_fix() {
        // A schema that does not compile is refused; a valid one is set (admin only). A
        // document failing it is refused naming the JSON pointer; the fixed document stages.
        // Clearing the schema lets anything through again.
        let mut c = Cluster::new();
        let set = |schema: &str| {
            vec![Command::SetTopologySchema {
                name: "lab".into(),
                schema: schema.as_bytes().to_vec(),
            }]
        };
        let broken = r#"{"type": "object", "properties": {"nodes": {"type": 12}}}"#;
        assert_eq!(refusal(&c.apply(MANAGER, set(broken))), Some(Refusal::SchemaInvalid));
        assert_eq!(refusal(&c.apply(MANAGER, set("{not json"))), Some(Refusal::SchemaInvalid));
        let remote = r#"{"$ref": "https://example.invalid/schema.json"}"#;
        assert_eq!(refusal(&c.apply(MANAGER, set(remote))), Some(Refusal::SchemaInvalid));
        let schema = r#"{"type": "object", "required": ["nodes"], "properties": {"nodes":
            {"type": "array", "items": {"type": "object", "required": ["id", "asn"],
             "properties": {"asn": {"type": "integer", "minimum": 1}}}}}}"#;
        assert_eq!(refusal(&c.apply(ROUTER_A, set(schema))), Some(Refusal::Unauthorised));
        assert_eq!(c.apply(MANAGER, set(schema)), Outcome::Applied);
        let bad = r#"{"nodes": [{"id": "r1", "asn": "65001"}]}"#;
        let o = c.apply(MANAGER, cmd(stage(MANAGER, 0, bad)));
        assert_eq!(refusal(&o), Some(Refusal::SchemaInvalid));
        let Outcome::Rejected(reason) = o else { unreachable!() };
        assert!(reason.contains("at /nodes/0/asn:"), "{reason}");
        assert!(reason.contains("integer"), "{reason}");
        assert_eq!(c.lab().latest(), 0);
        assert_eq!(c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1))), Outcome::Applied);
        let missing = r#"{"routers": []}"#;
        let o = c.apply(MANAGER, cmd(stage(MANAGER, 1, missing)));
        assert!(matches!(&o, Outcome::Rejected(r) if r.contains("at /:")), "{o:?}");
        assert_eq!(c.apply(MANAGER, set("")), Outcome::Applied);
        assert_eq!(c.apply(MANAGER, cmd(stage(MANAGER, 1, missing))), Outcome::Applied);
        let big = format!("{{\"description\": \"{}\"}}", "x".repeat(SCHEMA_BYTES_MAX));
        assert_eq!(refusal(&c.apply(MANAGER, set(&big))), Some(Refusal::SchemaInvalid));
    }

    #[test]
    fn one_of_two_proposals_on_a_base_wins_and_force_takes_the_next() {
        // Two proposals based on version 1: the first committed becomes 2, the second is a
        // stale base; forced, it becomes 3. A base beyond the latest is invalid even when
        // forced, and restaging the latest root changes nothing.
        let mut c = Cluster::new();
        assert_eq!(c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1))), Outcome::Applied);
        let first = stage(MANAGER, 1, DOC2);
        let second = stage(MANAGER, 1, DOC3);
        assert_eq!(c.apply(MANAGER, cmd(first)), Outcome::Applied);
        let o = c.apply(MANAGER, cmd(second.clone()));
        assert_eq!(refusal(&o), Some(Refusal::StaleBase));
        assert!(
            matches!(&o, Outcome::Rejected(r) if r.starts_with("stale base: lab is at version 2"))
        );
        let mut forced = second;
        forced.force = true;
        sign(&mut forced, &secret(MANAGER));
        assert_eq!(c.apply(MANAGER, cmd(forced.clone())), Outcome::Applied);
        assert_eq!(c.lab().latest(), 3);
        assert_eq!(c.lab().version(3).unwrap().root, forced.root);
        let mut ahead = stage(MANAGER, 7, DOC1);
        ahead.force = true;
        sign(&mut ahead, &secret(MANAGER));
        assert_eq!(refusal(&c.apply(MANAGER, cmd(ahead))), Some(Refusal::Invalid));
        assert_eq!(
            refusal(&c.apply(MANAGER, cmd(stage(MANAGER, 3, DOC3)))),
            Some(Refusal::Invalid)
        );
        assert_eq!(c.states(), vec![VersionState::Staged; 3]);
    }

    #[test]
    fn activation_and_rollback_move_every_router() {
        // Activating 1 then 2 supersedes 1; activating 1 again is the rollback (2 superseded)
        // with a new activation index, so routers run their hook again. Activating the
        // active version or a missing one is refused; an unsubscribed member has no target;
        // a batch that fails half-way leaves everything as it was.
        let mut c = Cluster::new();
        c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1)));
        c.apply(MANAGER, cmd(stage(MANAGER, 1, DOC2)));
        assert_eq!(target(&c.state, "lab", &peer(ROUTER_B)), None, "nothing active yet");
        assert_eq!(c.apply(MANAGER, activate(1, false)), Outcome::Applied);
        let t1 = target(&c.state, "lab", &peer(ROUTER_B)).unwrap();
        assert_eq!((t1.version, t1.activation_index, t1.canary), (1, c.index, false));
        assert_eq!(refusal(&c.apply(MANAGER, activate(1, false))), Some(Refusal::Invalid));
        assert_eq!(refusal(&c.apply(MANAGER, activate(5, false))), Some(Refusal::Invalid));
        assert_eq!(c.apply(MANAGER, activate(2, false)), Outcome::Applied);
        assert_eq!(c.states(), vec![VersionState::Superseded, VersionState::Active]);
        assert_eq!(c.apply(MANAGER, activate(1, false)), Outcome::Applied);
        assert_eq!(c.states(), vec![VersionState::Active, VersionState::Superseded]);
        let back = target(&c.state, "lab", &peer(ROUTER_C)).unwrap();
        assert_eq!(back.version, 1);
        assert_eq!(back.root, c.lab().version(1).unwrap().root);
        assert!(back.activation_index > t1.activation_index, "a new activation");
        assert_eq!(target(&c.state, "lab", &peer(MANAGER)), None, "not subscribed");
        assert_eq!(targets(&c.state, &peer(ROUTER_A)), vec![back]);
        let before = c.state.topologies.clone();
        let half = vec![
            Command::StageTopology(Box::new(stage(MANAGER, 2, DOC3))),
            Command::ActivateTopology { name: "lab".into(), version: 9, canary: false },
        ];
        assert!(matches!(c.apply(MANAGER, half), Outcome::Rejected(_)));
        assert_eq!(c.state.topologies, before, "all or nothing");
        assert_eq!(ClusterState::decode(&c.state.encode()).unwrap(), c.state);
    }

    #[test]
    fn canary_activates_a_subset_then_promotes_or_rolls_back() {
        // With canary tag:canary, a canary activation gives router A version 2 while B and C
        // stay on 1. Rolling back rejects 2 and returns A to 1; a second canary of 2 is then
        // promoted, making 2 active everywhere. Activation is refused while a canary runs, and
        // a canary start needs a configuration.
        let mut c = Cluster::new();
        c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1)));
        c.apply(MANAGER, activate(1, false));
        c.apply(MANAGER, cmd(stage(MANAGER, 1, DOC2)));
        assert_eq!(refusal(&c.apply(MANAGER, activate(2, true))), Some(Refusal::Invalid));
        let canary = |subjects: &[&str], pct: u32| {
            vec![Command::SetTopologyCanary {
                name: "lab".into(),
                subjects: subjects.iter().map(|s| s.to_string()).collect(),
                fail_pct_max: pct,
            }]
        };
        assert_eq!(refusal(&c.apply(MANAGER, canary(&["role:router"], 0))), Some(Refusal::Invalid));
        assert_eq!(
            refusal(&c.apply(MANAGER, canary(&["tag:canary"], 101))),
            Some(Refusal::Invalid)
        );
        assert_eq!(c.apply(MANAGER, canary(&["tag:canary"], 0)), Outcome::Applied);
        assert_eq!(c.apply(MANAGER, activate(2, true)), Outcome::Applied);
        let start = c.index;
        let a = target(&c.state, "lab", &peer(ROUTER_A)).unwrap();
        assert_eq!((a.version, a.canary, a.activation_index), (2, true, start));
        assert_eq!(target(&c.state, "lab", &peer(ROUTER_B)).unwrap().version, 1);
        assert_eq!(c.states(), vec![VersionState::Active, VersionState::Canary]);
        assert_eq!(refusal(&c.apply(MANAGER, activate(1, true))), Some(Refusal::Invalid));
        assert_eq!(refusal(&c.apply(MANAGER, canary(&[], 0))), Some(Refusal::Invalid));
        let end = |version: u64, promote: bool| {
            vec![Command::EndTopologyCanary { name: "lab".into(), version, promote }]
        };
        assert_eq!(refusal(&c.apply(MANAGER, end(1, false))), Some(Refusal::Invalid));
        assert_eq!(c.apply(MANAGER, end(2, false)), Outcome::Applied);
        assert_eq!(c.states(), vec![VersionState::Active, VersionState::Rejected]);
        assert_eq!(target(&c.state, "lab", &peer(ROUTER_A)).unwrap().version, 1);
        assert_eq!(c.apply(MANAGER, activate(2, true)), Outcome::Applied);
        assert_eq!(c.apply(MANAGER, end(2, true)), Outcome::Applied);
        assert_eq!(c.states(), vec![VersionState::Superseded, VersionState::Active]);
        for r in [ROUTER_A, ROUTER_B, ROUTER_C] {
            let t = target(&c.state, "lab", &peer(r)).unwrap();
            assert_eq!((t.version, t.canary, t.activation_index), (2, false, c.index));
        }
        assert_eq!(c.lab().canary_phase, None);
    }

    /// An observation; hooks are (router, activation index, applied).
    fn observed(live: &[u8], holders: &[u8], hooks: &[(u8, u64, bool)]) -> Observation {
        Observation {
            live: live.iter().map(|n| peer(*n)).collect(),
            holders: holders.iter().map(|n| peer(*n)).collect(),
            hooks: hooks
                .iter()
                .map(|(n, i, ok)| (peer(*n), HookResult { activation_index: *i, applied: *ok }))
                .collect(),
        }
    }

    #[test]
    fn the_leader_activates_when_enough_routers_hold_it() {
        // Default share 1: two of three live routers holding version 1 is not enough; all
        // three is, and the decision is proposed once per repropose period until it commits.
        // With the policy at 0.6, two of three suffice for version 2. A dead router does not
        // count against the share.
        let mut c = Cluster::new();
        let mut d = Decider::new(5_000);
        let all = [ROUTER_A, ROUTER_B, ROUTER_C];
        c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1)));
        d.handle_observation("lab", 1, observed(&all, &[ROUTER_A, ROUTER_B], &[]));
        assert!(d.poll(&c.state, Timestamp(1_000)).is_empty());
        d.handle_observation("lab", 1, observed(&all, &all, &[]));
        let p = d.poll(&c.state, Timestamp(2_000));
        assert_eq!(p, vec![activate(1, false)]);
        assert!(d.poll(&c.state, Timestamp(3_000)).is_empty(), "proposed once");
        assert_eq!(d.poll(&c.state, Timestamp(7_000)), p, "again after the period");
        assert_eq!(c.apply(MANAGER, p[0].clone()), Outcome::Applied);
        assert!(d.poll(&c.state, Timestamp(20_000)).is_empty(), "committed: nothing to do");
        c.apply(MANAGER, cmd(stage(MANAGER, 1, DOC2)));
        d.handle_observation("lab", 2, observed(&all, &[ROUTER_A, ROUTER_B], &[]));
        assert!(d.poll(&c.state, Timestamp(21_000)).is_empty());
        let share = vec![Command::SetPolicy {
            key: mycel_policy::topology::ACTIVATE_SHARE_POLICY.into(),
            value: "0.6".into(),
        }];
        c.apply(MANAGER, share);
        assert_eq!(d.poll(&c.state, Timestamp(22_000)), vec![activate(2, false)]);
        // Version 3 staged: router C is down, A and B hold it; share 1 of live routers.
        c.apply(MANAGER, activate(2, false));
        c.apply(
            MANAGER,
            vec![Command::SetPolicy {
                key: format!("{}.lab", mycel_policy::topology::ACTIVATE_SHARE_POLICY),
                value: "100%".into(),
            }],
        );
        c.apply(MANAGER, cmd(stage(MANAGER, 2, DOC3)));
        d.handle_observation("lab", 3, observed(&[ROUTER_A, ROUTER_C], &[ROUTER_A], &[]));
        assert!(d.poll(&c.state, Timestamp(30_000)).is_empty(), "per-name share of 1 applies");
        d.handle_observation("lab", 3, observed(&[ROUTER_A, ROUTER_B], &[ROUTER_A, ROUTER_B], &[]));
        assert_eq!(d.poll(&c.state, Timestamp(31_000)), vec![activate(3, false)]);
        // Version 4 overtaken by 5 before activation: only 5 is a candidate.
        c.apply(MANAGER, activate(3, false));
        c.apply(MANAGER, cmd(stage(MANAGER, 3, DOC1)));
        c.apply(MANAGER, cmd(stage(MANAGER, 4, DOC2)));
        d.handle_observation("lab", 4, observed(&all, &all, &[]));
        assert!(d.poll(&c.state, Timestamp(40_000)).is_empty(), "4 was overtaken");
        d.handle_observation("lab", 5, observed(&all, &all, &[]));
        assert_eq!(d.poll(&c.state, Timestamp(41_000)), vec![activate(5, false)]);
    }

    #[test]
    #[should_panic(expected = "active")]
    fn invariants_catch_two_active_versions() {
        // A state with a second version marked active (a bug) fails check_invariants.
        let mut c = Cluster::new();
        c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1)));
        c.apply(MANAGER, cmd(stage(MANAGER, 1, DOC2)));
        c.apply(MANAGER, activate(1, false));
        let lab = c.state.topologies.get_mut("lab").unwrap();
        lab.versions[1].state = VersionState::Active;
        c.state.check_invariants();
    }

    #[test]
    fn the_leader_runs_the_canary() {
        // Canary tag:canary (router A), 0% tolerated. Once A holds version 2 the leader starts
        // the canary; A's failed hook rolls it back. Version 3 goes through a canary whose
        // hook succeeds, and is promoted once every live router holds it.
        let mut c = Cluster::new();
        let mut d = Decider::new(5_000);
        let all = [ROUTER_A, ROUTER_B, ROUTER_C];
        c.apply(MANAGER, cmd(stage(MANAGER, 0, DOC1)));
        c.apply(MANAGER, activate(1, false));
        c.apply(
            MANAGER,
            vec![Command::SetTopologyCanary {
                name: "lab".into(),
                subjects: vec!["tag:canary".into()],
                fail_pct_max: 0,
            }],
        );
        c.apply(MANAGER, cmd(stage(MANAGER, 1, DOC2)));
        d.handle_observation("lab", 2, observed(&all, &[ROUTER_A], &[]));
        let start = d.poll(&c.state, Timestamp(1_000));
        assert_eq!(start, vec![activate(2, true)]);
        c.apply(MANAGER, start[0].clone());
        let i2 = c.lab().canary_phase.unwrap().started_index;
        d.handle_observation("lab", 2, observed(&all, &[ROUTER_A], &[]));
        assert!(d.poll(&c.state, Timestamp(2_000)).is_empty(), "waiting for the hook");
        let stale = observed(&all, &[ROUTER_A], &[(ROUTER_A, i2 - 1, false)]);
        d.handle_observation("lab", 2, stale);
        assert!(d.poll(&c.state, Timestamp(2_500)).is_empty(), "a result of another activation");
        d.handle_observation("lab", 2, observed(&all, &[ROUTER_A], &[(ROUTER_A, i2, false)]));
        let back = d.poll(&c.state, Timestamp(3_000));
        let end = |version: u64, promote: bool| {
            vec![Command::EndTopologyCanary { name: "lab".into(), version, promote }]
        };
        assert_eq!(back, vec![end(2, false)]);
        c.apply(MANAGER, back[0].clone());
        assert_eq!(c.states(), vec![VersionState::Active, VersionState::Rejected]);
        d.handle_observation("lab", 2, observed(&all, &all, &[(ROUTER_A, i2, false)]));
        assert!(d.poll(&c.state, Timestamp(4_000)).is_empty(), "a rejected version stays");
        c.apply(MANAGER, cmd(stage(MANAGER, 2, DOC3)));
        d.handle_observation("lab", 3, observed(&all, &[ROUTER_A], &[]));
        c.apply(MANAGER, d.poll(&c.state, Timestamp(5_000)).remove(0));
        assert_eq!(c.lab().canary_phase.map(|p| p.version), Some(3));
        let i3 = c.lab().canary_phase.unwrap().started_index;
        d.handle_observation("lab", 3, observed(&all, &[ROUTER_A], &[(ROUTER_A, i3, true)]));
        assert!(d.poll(&c.state, Timestamp(6_000)).is_empty(), "B and C do not hold it yet");
        d.handle_observation("lab", 3, observed(&all, &all, &[(ROUTER_A, i3, true)]));
        let promote = d.poll(&c.state, Timestamp(7_000));
        assert_eq!(promote, vec![end(3, true)]);
        c.apply(MANAGER, promote[0].clone());
        assert_eq!(c.lab().active, Some(3));
    }

    #[test]
    fn shipped_topologies_stage_and_the_schema_guards_its_graph() {
        // Every document in configs/topologies/ parses, canonicalises and stages through the
        // real checks; the backbone schema compiles, accepts backbone.json, and refuses a
        // copy whose first router has a string ASN, naming its path.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/topologies/");
        let docs = [
            ("lab.yaml", canon::Format::Yaml),
            ("backbone.json", canon::Format::Json),
            ("routing-policy.toml", canon::Format::Toml),
        ];
        let mut c = Cluster::new();
        for (i, (file, format)) in docs.iter().enumerate() {
            let bytes = std::fs::read(format!("{dir}{file}")).unwrap();
            let json = canon::canonical_json(&canon::parse(&bytes, *format).unwrap());
            let s = stage(MANAGER, i as u64, std::str::from_utf8(&json).unwrap());
            assert_eq!(c.apply(MANAGER, cmd(s)), Outcome::Applied, "{file}");
        }
        let schema = std::fs::read(format!("{dir}backbone.schema.json")).unwrap();
        let set = vec![Command::SetTopologySchema { name: "lab".into(), schema }];
        assert_eq!(c.apply(MANAGER, set), Outcome::Applied);
        let graph = std::fs::read_to_string(format!("{dir}backbone.json")).unwrap();
        let broken = graph.replacen("\"asn\": 64512", "\"asn\": \"64512\"", 1);
        let o = c.apply(MANAGER, cmd(stage(MANAGER, 3, &canon_text(&broken))));
        assert!(
            matches!(&o, Outcome::Rejected(r) if r.starts_with("schema invalid: at /routers/0/asn")),
            "{o:?}"
        );
        let fixed = graph.replacen("\"metric\": 10,", "\"metric\": 11,", 1);
        assert_eq!(c.apply(MANAGER, cmd(stage(MANAGER, 3, &canon_text(&fixed)))), Outcome::Applied);
    }

    fn canon_text(json: &str) -> String {
        String::from_utf8(canonical(json)).unwrap()
    }

    #[test]
    fn refusal_markers_map_to_exit_codes() {
        // Every marker is recognised at the start of a reason only, with a distinct code for
        // each refusal the CLI documents.
        assert_eq!(Refusal::of("stale base: lab is at 3"), Some(Refusal::StaleBase));
        assert_eq!(Refusal::of("the stale base: x"), None);
        let codes: BTreeSet<i32> = Refusal::ALL.iter().map(|r| r.exit_code()).collect();
        assert_eq!(codes.len(), 5, "unsigned and bad signature share one code");
        assert_eq!(namespace("core/backbone"), "core");
        assert_eq!(namespace("lab"), DEFAULT_NAMESPACE);
        assert!(validate_name("core/backbone").is_ok());
        for bad in ["a/b/c", "", "Lab", "../x", "x/..", ".", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_number_of_names_is_bounded() {
        // Records for NAMES_MAX names can be created (here through schema commands, the
        // cheapest); one more is refused, while commands on existing names still apply.
        let mut c = Cluster::new();
        let schema =
            |name: String| vec![Command::SetTopologySchema { name, schema: b"{}".to_vec() }];
        for i in 0..NAMES_MAX {
            assert_eq!(c.apply(MANAGER, schema(format!("n{i}"))), Outcome::Applied);
        }
        let o = c.apply(MANAGER, schema("one-more".into()));
        assert!(matches!(&o, Outcome::Rejected(r) if r.contains("most allowed")), "{o:?}");
        assert_eq!(c.apply(MANAGER, schema("n0".into())), Outcome::Applied);
        assert_eq!(c.state.topologies.len(), NAMES_MAX);
    }

    #[test]
    fn random_command_sequences_keep_the_invariants() {
        // Seeded random sequences of every topology command, from members with and without
        // the rights: after each entry the invariants hold, a rejected entry leaves the state
        // exactly as it was, each rejection carries a marker, the state round-trips through
        // its encoding, and at most one version is active. Several seeds, so an accepted
        // command of every kind is seen (checked at the end).
        use rand::{Rng, SeedableRng};
        let docs = [DOC1, DOC2, DOC3, r#"{"nodes": []}"#];
        let mut accepted = BTreeSet::new();
        for seed in 0..5u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut c = Cluster::new();
            c.apply(
                MANAGER,
                vec![Command::SetTopologyCanary {
                    name: "lab".into(),
                    subjects: vec!["tag:canary".into()],
                    fail_pct_max: 50,
                }],
            );
            for _ in 0..80 {
                let who = [MANAGER, MANAGER, ROUTER_A, STRANGER][rng.gen_range(0..4)];
                let latest = c.state.topologies.get("lab").map_or(0, Topology::latest);
                let version = rng.gen_range(0..=latest + 1);
                let command = match rng.gen_range(0..5) {
                    0 | 1 => {
                        let mut s =
                            stage(who, rng.gen_range(0..=latest + 1), docs[rng.gen_range(0..4)]);
                        s.force = rng.gen_bool(0.3);
                        sign(&mut s, &secret(who));
                        Command::StageTopology(Box::new(s))
                    }
                    2 => Command::ActivateTopology {
                        name: "lab".into(),
                        version,
                        canary: rng.gen_bool(0.5),
                    },
                    3 => Command::EndTopologyCanary {
                        name: "lab".into(),
                        version,
                        promote: rng.gen_bool(0.5),
                    },
                    _ => Command::SetTopologyCanary {
                        name: "lab".into(),
                        subjects: if rng.gen_bool(0.8) {
                            vec!["tag:canary".into()]
                        } else {
                            vec![]
                        },
                        fail_pct_max: rng.gen_range(0..=100),
                    },
                };
                let kind =
                    format!("{command:?}").split([' ', '(', '{']).next().unwrap_or("").to_owned();
                let before = c.state.topologies.clone();
                match c.apply(who, vec![command]) {
                    Outcome::Applied => {
                        accepted.insert(kind);
                    }
                    Outcome::Rejected(reason) => {
                        assert!(Refusal::of(&reason).is_some(), "no marker: {reason}");
                        assert_eq!(c.state.topologies, before, "rejected: {reason}");
                    }
                }
                if let Some(t) = c.state.topologies.get("lab") {
                    let active =
                        t.versions.iter().filter(|v| v.state == VersionState::Active).count();
                    assert!(active <= 1);
                }
            }
            assert_eq!(ClusterState::decode(&c.state.encode()).unwrap(), c.state);
        }
        let kinds = ["StageTopology", "ActivateTopology", "EndTopologyCanary", "SetTopologyCanary"];
        for k in kinds {
            assert!(accepted.contains(k), "no {k} was ever accepted: {accepted:?}");
        }
    }

    #[test]
    fn schema_reference_loops_terminate() {
        // Schemas that refer to themselves without consuming the document compile and
        // validate in bounded time (a crash here would stop every manager alike).
        for schema in [
            r##"{"$defs":{"a":{"$ref":"#/$defs/a"}},"$ref":"#/$defs/a"}"##,
            r##"{"$defs":{"a":{"$ref":"#/$defs/b"},"b":{"$ref":"#/$defs/a"}},"$ref":"#/$defs/a"}"##,
            r##"{"allOf":[{"$ref":"#"}]}"##,
        ] {
            let s = Schema::compile(schema.as_bytes()).unwrap();
            assert_eq!(s.validate(&serde_json::json!({"a": [1, {"b": null}]})), Ok(()), "{schema}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(Schema::compile(deep.as_bytes()).is_err(), "nesting past serde_json's limit");
    }
}
