//! The commands the quorum agrees on, versioned; proposals carry a (PeerId, sequence) for
//! deduplication and a batch of commands applied atomically in one entry.
//!
//! A proposal of another format version, or with a variant this build does not know, fails
//! to decode and is rejected deterministically (state unchanged, reason given), so every
//! replica rejects it alike.

use bincode::{Decode, Encode};
use mycel_chunker::codec;

/// Format version of proposals in the Raft log.
pub const PROPOSAL_VERSION: u8 = 2;
/// Largest encoded proposal.
pub const PROPOSAL_BYTES_MAX: usize = 4 << 20;
/// Most commands in one proposal.
pub const BATCH_MAX: usize = 100_000;

/// A member's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Encode, Decode)]
pub enum Role {
    /// A Raft voter (or a learner on its way to becoming one).
    Manager,
    /// An edge node: stores, serves, fetches.
    Edge,
    /// A router: applies topology files.
    Router,
}

impl Role {
    /// The name used in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Edge => "edge",
            Role::Router => "router",
        }
    }

    /// Parses [`Role::as_str`].
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "manager" => Role::Manager,
            "edge" => Role::Edge,
            "router" => Role::Router,
            _ => return None,
        })
    }
}

/// A member as committed.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Member {
    /// PeerId bytes.
    pub peer: Vec<u8>,
    /// Raft id, from a committed counter, never reused.
    pub raft_id: u64,
    /// Role.
    pub role: Role,
    /// Zone.
    pub zone: String,
    /// Tags (`manager-eligible`, ...).
    pub tags: Vec<String>,
    /// Storage capacity in bytes (0: unknown).
    pub capacity_bytes: u64,
    /// Advertised multiaddrs.
    pub addrs: Vec<String>,
}

/// A pin: content that must live somewhere (semantics: the replication issue).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Pin {
    /// Root CID bytes.
    pub root: Vec<u8>,
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Fewest replicas.
    pub replicas_min: u32,
    /// Most replicas.
    pub replicas_max: u32,
    /// Zone constraints.
    pub zones: Vec<String>,
    /// Tag constraints.
    pub tags: Vec<String>,
    /// Pre-position targets (zones or tags).
    pub preposition: Vec<String>,
    /// Pre-position deadline, ms since the epoch (0: none).
    pub deadline_ms: u64,
}

/// A grant of a permission on a namespace (semantics: the access-control issue).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Grant {
    /// `member:PEER`, `role:R`, `zone:Z` or `tag:T`.
    pub subject: String,
    /// `read`, `publish` or `admin`.
    pub permission: String,
    /// The namespace.
    pub namespace: String,
}

/// A chunker identity as carried in commands (the fields of [`mycel_chunker::Config`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ChunkerIdentity {
    /// Smallest chunk.
    pub chunk_bytes_min: u32,
    /// Average chunk.
    pub chunk_bytes_avg: u32,
    /// Largest chunk.
    pub chunk_bytes_max: u32,
    /// FastCDC normalisation level.
    pub normalization: u8,
    /// Zero-run threshold.
    pub zero_run_bytes: u64,
    /// Index fan-out bits.
    pub fanout_bits: u8,
}

impl From<mycel_chunker::Config> for ChunkerIdentity {
    fn from(c: mycel_chunker::Config) -> ChunkerIdentity {
        ChunkerIdentity {
            chunk_bytes_min: c.chunk_bytes_min,
            chunk_bytes_avg: c.chunk_bytes_avg,
            chunk_bytes_max: c.chunk_bytes_max,
            normalization: c.normalization,
            zero_run_bytes: c.zero_run_bytes,
            fanout_bits: c.fanout_bits,
        }
    }
}

impl From<ChunkerIdentity> for mycel_chunker::Config {
    fn from(c: ChunkerIdentity) -> mycel_chunker::Config {
        mycel_chunker::Config {
            chunk_bytes_min: c.chunk_bytes_min,
            chunk_bytes_avg: c.chunk_bytes_avg,
            chunk_bytes_max: c.chunk_bytes_max,
            normalization: c.normalization,
            zero_run_bytes: c.zero_run_bytes,
            fanout_bits: c.fanout_bits,
        }
    }
}

/// A proposal to stage the next version of a topology file.
///
/// The canonical bytes travel in the command (they are at most
/// [`crate::topology::CANONICAL_BYTES_MAX`]) so every replica checks them alike: they must be
/// canonical JSON, their object root under `chunker` must be `root`, and `signature` must be
/// the proposer's ed25519 signature over [`crate::topology::signed_message`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StageTopology {
    /// Topology name (`NAME` or `NAMESPACE/NAME`).
    pub name: String,
    /// The version this one is based on (0: none yet).
    pub base: u64,
    /// The canonical JSON bytes.
    pub canonical: Vec<u8>,
    /// The chunker identity that gives `root` from `canonical`.
    pub chunker: ChunkerIdentity,
    /// Canonical root CID bytes.
    pub root: Vec<u8>,
    /// Source root CID bytes (the file as written, comments included).
    pub source: Vec<u8>,
    /// The proposer's PeerId bytes (an ed25519 key).
    pub proposer: Vec<u8>,
    /// When it was proposed, ms since the epoch, on the proposer's clock.
    pub proposed_ms: u64,
    /// Ed25519 signature over [`crate::topology::signed_message`] (64 bytes).
    pub signature: Vec<u8>,
    /// Stage as the next version even if `base` is stale.
    pub force: bool,
}

/// Every change the quorum can commit.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
#[non_exhaustive]
pub enum Command {
    /// Creates the cluster (first entry): its id.
    InitCluster {
        /// Random cluster id.
        cluster_id: [u8; 16],
    },
    /// Commits a join token: the hash of its secret, with what it admits.
    CreateToken {
        /// BLAKE3 of the secret.
        hash: [u8; 32],
        /// Role it admits.
        role: Role,
        /// Zone it assigns.
        zone: String,
        /// Expiry, ms since the epoch.
        expires_ms: u64,
        /// Uses left.
        uses: u32,
    },
    /// Revokes a token.
    RevokeToken {
        /// BLAKE3 of the secret.
        hash: [u8; 32],
    },
    /// Admits a node presenting a token's secret (consumes one use).
    Join {
        /// The secret presented.
        secret: [u8; 32],
        /// The joining node's PeerId bytes.
        peer: Vec<u8>,
        /// Its addresses.
        addrs: Vec<String>,
        /// Its tags.
        tags: Vec<String>,
        /// Its capacity.
        capacity_bytes: u64,
        /// The proposer's clock (ms since the epoch), checked against the expiry.
        now_ms: u64,
    },
    /// Adds a member directly (cluster init adds the first manager this way).
    AddMember(Member),
    /// Removes a member; its Raft id is never reused.
    RemoveMember {
        /// PeerId bytes.
        peer: Vec<u8>,
    },
    /// Changes a member's role.
    SetRole {
        /// PeerId bytes.
        peer: Vec<u8>,
        /// The new role.
        role: Role,
    },
    /// Updates a member's addresses, tags or capacity.
    UpdateMember {
        /// PeerId bytes.
        peer: Vec<u8>,
        /// Addresses.
        addrs: Vec<String>,
        /// Tags.
        tags: Vec<String>,
        /// Capacity.
        capacity_bytes: u64,
    },
    /// Adds or replaces a pin.
    AddPin(Pin),
    /// Removes a pin.
    RemovePin {
        /// Root CID bytes.
        root: Vec<u8>,
    },
    /// Adds a grant.
    AddGrant(Grant),
    /// Removes a grant.
    RemoveGrant(Grant),
    /// Stages the next version of a topology file; every replica checks the bytes against
    /// the root, the proposer's signature and permission, the schema and the base
    /// ([`crate::topology`] has the rules).
    StageTopology(Box<StageTopology>),
    /// Makes a version active, on every subscribed router or (`canary`) on the configured
    /// canary routers first. Rolling back is activating an earlier version.
    ActivateTopology {
        /// Topology name.
        name: String,
        /// Version.
        version: u64,
        /// Start a canary phase instead of activating everywhere.
        canary: bool,
    },
    /// Ends the canary phase of `version`: promote it everywhere, or roll it back (the
    /// version becomes rejected and the active version stays).
    EndTopologyCanary {
        /// Topology name.
        name: String,
        /// The version in its canary phase.
        version: u64,
        /// Promote (true) or roll back (false).
        promote: bool,
    },
    /// Sets the JSON Schema that staged versions of `name` must satisfy (empty: none).
    SetTopologySchema {
        /// Topology name.
        name: String,
        /// JSON Schema bytes.
        schema: Vec<u8>,
    },
    /// Sets which subscribed routers take a new version first (no subjects: no canary).
    SetTopologyCanary {
        /// Topology name.
        name: String,
        /// `tag:T`, `zone:Z` or `member:PEER` (base58).
        subjects: Vec<String>,
        /// Roll back when more than this percentage of canary hooks fail.
        fail_pct_max: u32,
    },
    /// Sets a cluster policy value (semantics: later issues).
    SetPolicy {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

/// One proposal: a batch from one node, deduplicated by `(from, seq)`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Proposal {
    /// The proposing node's PeerId bytes.
    pub from: Vec<u8>,
    /// Its sequence number (increasing per node).
    pub seq: u64,
    /// Applied together or not at all.
    pub commands: Vec<Command>,
}

/// Why a proposal could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("bad proposal: {0}")]
pub struct ProposalError(pub String);

impl Proposal {
    /// Encodes with the version byte.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_limited::<_, PROPOSAL_BYTES_MAX>(PROPOSAL_VERSION, self)
    }

    /// Decodes and checks the batch bound.
    ///
    /// # Errors
    /// [`ProposalError`] for anything malformed or oversized.
    pub fn decode(bytes: &[u8]) -> Result<Proposal, ProposalError> {
        let p: Proposal = codec::decode_limited::<_, PROPOSAL_BYTES_MAX>(PROPOSAL_VERSION, bytes)
            .map_err(|e| ProposalError(e.to_string()))?;
        if p.commands.len() > BATCH_MAX || p.from.len() > 64 {
            return Err(ProposalError("batch over its bounds".into()));
        }
        Ok(p)
    }
}
