//! The data directory: `config.toml`, the node's identity key, and the store.
//!
//! `--data-dir` or `MYCEL_DATA_DIR` select it for every command; the default is
//! `$XDG_DATA_HOME/mycel` (`~/.local/share/mycel`). The identity key is an ed25519 secret
//! in a versioned file of mode 0600; a key readable by anyone else is refused.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use mycel_chunker::Config as ChunkerConfig;
use serde::{Deserialize, Serialize};

/// Identity file format version.
const IDENTITY_VERSION: u8 = 1;
/// Identity file magic.
const IDENTITY_MAGIC: &[u8; 8] = b"MYCELID\0";

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// `init` was not run.
    #[error("{0} is not a mycel data directory (run `mycel init` first, or set --data-dir)")]
    NotInitialised(PathBuf),
    /// `init` on a directory that already has a node.
    #[error("{0} already holds a mycel node")]
    AlreadyInitialised(PathBuf),
    /// The key file can be read by others.
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions {
        /// The key file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// A damaged file.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// IO.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io { path: path.display().to_string(), source }
}

/// The node's configuration file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// How content is cut.
    #[serde(default)]
    pub chunker: ChunkerSection,
    /// Networking.
    #[serde(default)]
    pub node: NodeSection,
    /// Who may connect.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// The admin API.
    #[serde(default)]
    pub api: ApiSection,
    /// Topology files this node writes (routers): `[[topology.watch]]` tables.
    #[serde(default, skip_serializing_if = "TopologySection::is_empty")]
    pub topology: TopologySection,
}

/// `[topology]`: what a router applies.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TopologySection {
    /// One watch per name: `name`, `out`, `format`, `exec`, `hook_timeout_ms`.
    pub watch: Vec<crate::topology::WatchConfig>,
}

impl TopologySection {
    fn is_empty(&self) -> bool {
        self.watch.is_empty()
    }
}

/// `[node]`: addresses, zone, announcements, bandwidth.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Multiaddrs to listen on (QUIC only).
    pub listen: Vec<String>,
    /// Multiaddrs of peers to dial at start (and redial while disconnected).
    pub bootstrap: Vec<String>,
    /// This node's zone (announcements go to the zone's gossip topic).
    pub zone: String,
    /// Milliseconds between announcements of what this node holds.
    pub announce_period_ms: u64,
    /// Upload cap in bytes per second (0: none).
    pub upload_bytes_per_sec: u64,
    /// Download cap in bytes per second (0: none).
    pub download_bytes_per_sec: u64,
    /// A request unanswered this long moves to other peers.
    pub request_timeout_ms: u64,
    /// Store capacity in bytes for placement and the storage budget (0: the filesystem's
    /// free space, and no eviction).
    pub capacity_bytes: u64,
    /// Eviction of unpinned cache starts above this percentage of capacity...
    pub high_watermark_pct: u8,
    /// ...and stops at this one.
    pub low_watermark_pct: u8,
    /// Milliseconds between replication plans.
    pub replication_interval_ms: u64,
    /// A node not heard from this long is lost: its replicas are replaced.
    pub node_lost_ms: u64,
    /// Discover peers on the local network with mDNS (the gate still admits only members).
    pub mdns: bool,
}

impl Default for NodeSection {
    fn default() -> NodeSection {
        NodeSection {
            listen: vec!["/ip4/0.0.0.0/udp/0/quic-v1".into()],
            bootstrap: Vec::new(),
            zone: "default".into(),
            announce_period_ms: 5_000,
            upload_bytes_per_sec: 0,
            download_bytes_per_sec: 0,
            request_timeout_ms: 10_000,
            capacity_bytes: 0,
            high_watermark_pct: 90,
            low_watermark_pct: 80,
            replication_interval_ms: 1_000,
            node_lost_ms: 15_000,
            mdns: false,
        }
    }
}

/// `[cluster]`: membership. Until the quorum manages membership, the members are listed here;
/// a peer not listed can neither connect nor ask for anything.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// PeerIds allowed to connect (this node is always allowed), beside committed members.
    pub members: Vec<String>,
    /// A join token to present to the cluster's managers (set by `init --join`).
    pub join: String,
    /// This node's tags (`manager-eligible`, ...).
    pub tags: Vec<String>,
    /// Milliseconds per Raft tick.
    pub tick_ms: u64,
    /// Ticks before a follower without a leader starts an election.
    pub election_ticks: usize,
    /// A manager unreachable this long is replaced by a `manager-eligible` member.
    pub grace_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> ClusterSection {
        ClusterSection {
            members: Vec::new(),
            join: String::new(),
            tags: Vec::new(),
            tick_ms: 100,
            election_ticks: 10,
            grace_ms: 30_000,
        }
    }
}

/// `[api]`: the admin API. It always listens on `mycel.sock` in the data directory (mode
/// 0600); TCP only if `tcp` is set, and then only with the bearer `token`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// `HOST:PORT` for the TCP listener (off when empty).
    pub tcp: String,
    /// Bearer token required on TCP.
    pub token: String,
}

/// `[chunker]`: the chunker identity used for new adds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChunkerSection {
    /// Smallest chunk in bytes.
    pub min_bytes: u32,
    /// Average chunk in bytes.
    pub avg_bytes: u32,
    /// Largest chunk in bytes.
    pub max_bytes: u32,
    /// FastCDC normalisation level 0..=3.
    pub normalization: u8,
    /// Disk images: aligned zero runs at least this long are holes.
    pub zero_run_bytes: u64,
    /// Manifest index fan-out bits (average fan-out 2^bits).
    pub fanout_bits: u8,
}

impl Default for ChunkerSection {
    fn default() -> ChunkerSection {
        let c = ChunkerConfig::default();
        ChunkerSection {
            min_bytes: c.chunk_bytes_min,
            avg_bytes: c.chunk_bytes_avg,
            max_bytes: c.chunk_bytes_max,
            normalization: c.normalization,
            zero_run_bytes: c.zero_run_bytes,
            fanout_bits: c.fanout_bits,
        }
    }
}

impl ChunkerSection {
    /// The chunker identity.
    pub fn config(&self) -> ChunkerConfig {
        ChunkerConfig {
            chunk_bytes_min: self.min_bytes,
            chunk_bytes_avg: self.avg_bytes,
            chunk_bytes_max: self.max_bytes,
            normalization: self.normalization,
            zero_run_bytes: self.zero_run_bytes,
            fanout_bits: self.fanout_bits,
        }
    }
}

/// The commented config `init` writes.
pub const DEFAULT_CONFIG: &str = r#"# mycel node configuration.
# Every key is optional; the values shown are the defaults.

[node]
# QUIC multiaddrs to listen on.
listen = ["/ip4/0.0.0.0/udp/0/quic-v1"]
# Peers to dial at start, as multiaddrs ending in /p2p/PEER_ID.
bootstrap = []
# This node's zone: announcements go to the zone's topic, same-zone peers are preferred.
zone = "default"
# Milliseconds between announcements of what this node holds.
announce_period_ms = 5000
# Bandwidth caps in bytes per second (0: none).
upload_bytes_per_sec = 0
download_bytes_per_sec = 0
# A request unanswered this long moves to other peers.
request_timeout_ms = 10000
# Store capacity in bytes, for placement and the storage budget (0: the filesystem's free
# space, and no eviction). Above the high watermark (percent of capacity), cached content
# that no pin needs here is evicted oldest first down to the low watermark.
capacity_bytes = 0
high_watermark_pct = 90
low_watermark_pct = 80
# Milliseconds between replication plans, and silence after which a node counts as lost
# (its replicas are made again elsewhere).
replication_interval_ms = 1000
node_lost_ms = 15000
# Discover peers on the local network with mDNS (members only are admitted).
mdns = false

[cluster]
# PeerIds allowed to connect and fetch, beside the members the quorum commits.
# Nobody else gets a byte of content.
members = []
# A join token (`mycel init --join TOKEN` sets it).
join = ""
# This node's tags, e.g. ["manager-eligible"].
tags = []
# Raft timing: milliseconds per tick, and ticks before an election.
tick_ms = 100
election_ticks = 10
# A manager unreachable this long is replaced by a member tagged "manager-eligible".
grace_ms = 30000

[api]
# The admin API listens on mycel.sock in the data directory (mode 0600). Set tcp to also
# listen on TCP; then every request needs "Authorization: Bearer <token>".
tcp = ""
token = ""

[chunker]
# FastCDC 2020 chunk sizes. Nodes share chunks only when they cut alike, so change these
# for a whole fleet or not at all.
min_bytes = 16384
avg_bytes = 65536
max_bytes = 262144
# FastCDC normalisation level (0..=3).
normalization = 1
# Disk images: 4 KiB-aligned all-zero runs at least this long are holes (never stored).
zero_run_bytes = 65536
# Manifest index nodes are cut after an entry whose hash has this many low zero bits.
fanout_bits = 8

# Routers: write the active version of a topology file and run a hook, once per
# activation (docs/topology.md). One table per name; `mycel topology watch` adds more.
# [[topology.watch]]
# name = "backbone"
# out = "/etc/frr/backbone.json"
# format = "json"            # json, yaml or toml (default: from the extension of out)
# exec = "systemctl reload frr"
# hook_timeout_ms = 30000
"#;

/// Values `init` writes into the config instead of the defaults.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// `[node] listen`.
    pub listen: Vec<String>,
    /// `[node] bootstrap`.
    pub bootstrap: Vec<String>,
    /// `[node] zone`.
    pub zone: Option<String>,
    /// `[cluster] members`.
    pub members: Vec<String>,
    /// `[cluster] join`.
    pub join: Option<String>,
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> =
        items.iter().map(|i| toml::Value::String(i.clone()).to_string()).collect();
    format!("[{}]", quoted.join(", "))
}

impl InitOptions {
    /// The commented config with these values.
    pub fn render(&self) -> String {
        let mut text = DEFAULT_CONFIG.to_string();
        if !self.listen.is_empty() {
            text = text.replacen(
                "listen = [\"/ip4/0.0.0.0/udp/0/quic-v1\"]",
                &format!("listen = {}", toml_list(&self.listen)),
                1,
            );
        }
        if !self.bootstrap.is_empty() {
            text = text.replacen(
                "bootstrap = []",
                &format!("bootstrap = {}", toml_list(&self.bootstrap)),
                1,
            );
        }
        if let Some(zone) = &self.zone {
            text = text.replacen(
                "zone = \"default\"",
                &format!("zone = {}", toml::Value::String(zone.clone())),
                1,
            );
        }
        if !self.members.is_empty() {
            text = text.replacen(
                "members = []",
                &format!("members = {}", toml_list(&self.members)),
                1,
            );
        }
        if let Some(join) = &self.join {
            text = text.replacen(
                "join = \"\"",
                &format!("join = {}", toml::Value::String(join.clone())),
                1,
            );
        }
        text
    }
}

/// A node's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    /// Its path.
    pub path: PathBuf,
}

/// The default data directory.
pub fn default_path() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("mycel");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/mycel")
}

impl DataDir {
    /// The data directory at `path` (not yet checked).
    pub fn new(path: PathBuf) -> DataDir {
        DataDir { path }
    }

    /// `config.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.toml")
    }

    /// `identity.key`.
    pub fn key_path(&self) -> PathBuf {
        self.path.join("identity.key")
    }

    /// The admin API's unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.path.join("mycel.sock")
    }

    /// The addresses of members learned so far, kept across restarts.
    pub fn peers_path(&self) -> PathBuf {
        self.path.join("peers")
    }

    /// The store directory.
    pub fn store_path(&self) -> PathBuf {
        self.path.join("store")
    }

    /// Creates a new node: directory (0700), config, identity key (0600).
    ///
    /// # Errors
    /// [`DataDirError::AlreadyInitialised`] if a node is there; IO errors.
    pub fn init(&self, seed: [u8; 32]) -> Result<SigningKey, DataDirError> {
        self.init_with(seed, &InitOptions::default())
    }

    /// Like [`DataDir::init`], writing `opts` into the config.
    ///
    /// # Errors
    /// As [`DataDir::init`].
    pub fn init_with(
        &self,
        seed: [u8; 32],
        opts: &InitOptions,
    ) -> Result<SigningKey, DataDirError> {
        if self.key_path().exists() || self.config_path().exists() {
            return Err(DataDirError::AlreadyInitialised(self.path.clone()));
        }
        fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.path))?;
        let key = SigningKey::from_bytes(&seed);
        let mut record = Vec::with_capacity(41);
        record.extend_from_slice(IDENTITY_MAGIC);
        record.push(IDENTITY_VERSION);
        record.extend_from_slice(&seed);
        write_new(&self.key_path(), &record, 0o600)?;
        write_new(&self.config_path(), opts.render().as_bytes(), 0o644)?;
        fs::create_dir_all(self.store_path()).map_err(io_err(&self.path))?;
        Ok(key)
    }

    /// Checks the directory was initialised.
    ///
    /// # Errors
    /// [`DataDirError::NotInitialised`].
    pub fn check(&self) -> Result<(), DataDirError> {
        if !self.key_path().exists() {
            return Err(DataDirError::NotInitialised(self.path.clone()));
        }
        Ok(())
    }

    /// Loads the config (defaults for what it omits).
    ///
    /// # Errors
    /// A missing data directory, or a config that does not parse, with the reason.
    pub fn config(&self) -> Result<NodeConfig, DataDirError> {
        self.check()?;
        let path = self.config_path();
        if !path.exists() {
            return Ok(NodeConfig::default());
        }
        load_config(&path)
    }

    /// Loads the identity key, refusing one readable by others.
    ///
    /// # Errors
    /// Permissions, a damaged file, IO.
    pub fn identity(&self) -> Result<SigningKey, DataDirError> {
        self.check()?;
        let path = self.key_path();
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(DataDirError::KeyPermissions { path: path.display().to_string(), mode });
        }
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let invalid = |what: &str| DataDirError::Invalid {
            path: path.display().to_string(),
            what: what.into(),
        };
        if bytes.len() != 41 || &bytes[..8] != IDENTITY_MAGIC {
            return Err(invalid("not a mycel identity key"));
        }
        if bytes[8] != IDENTITY_VERSION {
            return Err(invalid("identity key format version not supported"));
        }
        let seed: [u8; 32] = bytes[9..].try_into().map_err(|_| invalid("bad key length"))?;
        Ok(SigningKey::from_bytes(&seed))
    }
}

/// Loads and checks a config file.
///
/// # Errors
/// IO, or a config that does not parse or names an invalid chunker identity.
pub fn load_config(path: &Path) -> Result<NodeConfig, DataDirError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let config: NodeConfig = toml::from_str(&text).map_err(|e| DataDirError::Invalid {
        path: path.display().to_string(),
        what: e.to_string(),
    })?;
    config.chunker.config().validate().map_err(|e| DataDirError::Invalid {
        path: path.display().to_string(),
        what: e.to_string(),
    })?;
    let n = &config.node;
    let invalid = |what: &str| DataDirError::Invalid {
        path: path.display().to_string(),
        what: what.to_string(),
    };
    if !(n.low_watermark_pct >= 1
        && n.low_watermark_pct <= n.high_watermark_pct
        && n.high_watermark_pct <= 100)
    {
        return Err(invalid(
            "[node] watermarks must satisfy 1 <= low_watermark_pct <= high_watermark_pct <= 100",
        ));
    }
    if n.replication_interval_ms == 0 || n.node_lost_ms == 0 {
        return Err(invalid("[node] replication_interval_ms and node_lost_ms must be above 0"));
    }
    let mut names = std::collections::BTreeSet::new();
    for w in &config.topology.watch {
        w.watch().map_err(|e| invalid(&format!("[[topology.watch]] {}: {e}", w.name)))?;
        if !names.insert(&w.name) {
            return Err(invalid(&format!("[[topology.watch]] {} is watched twice", w.name)));
        }
    }
    Ok(config)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DataDirError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_and_refuse_open_keys() {
        // init writes a loadable key and a config that parses to the defaults; a second init
        // is refused; a key made readable by others is refused.
        let dir = tempfile::tempdir().unwrap();
        let dd = DataDir::new(dir.path().join("node"));
        let key = dd.init([7u8; 32]).unwrap();
        assert_eq!(dd.identity().unwrap().verifying_key(), key.verifying_key());
        assert_eq!(dd.config().unwrap(), NodeConfig::default());
        assert!(matches!(dd.init([1u8; 32]), Err(DataDirError::AlreadyInitialised(_))));
        fs::set_permissions(dd.key_path(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(dd.identity(), Err(DataDirError::KeyPermissions { .. })));
    }

    #[test]
    fn default_config_text_matches_the_defaults() {
        // The commented file init writes says exactly what the defaults are.
        let parsed: NodeConfig = toml::from_str(DEFAULT_CONFIG).unwrap();
        assert_eq!(parsed, NodeConfig::default());
    }
}
