//! Manifests: the root block of an object and the content-cut tree of index nodes under it.
//!
//! An object (file, directory, disk image or topology file) is one root block:
//!
//! ```text
//! {"v": 1, "kind": "file"|"dir"|"disk"|"topology", "len": u64,
//!  "chunker": {"alg": "fastcdc-2020", "major": 5, "min", "avg", "max", "norm", "zero", "fanout"},
//!  "tree": link | null}
//! ```
//!
//! `tree` is null for empty content, a raw chunk when the content is exactly one chunk, or
//! an index node `{"v": 1, "len": u64, "level": u8, "entries": [...]}`. Entries store
//! lengths, never offsets, and every node stores its subtree length, so an insertion only
//! rewrites the path to it. Level-0 entries are `[len, chunk-link]`, `[len, null]` (a hole)
//! or, in directories, maps `{"name": bytes, "mode", "type": "file"|"dir"|"symlink", "len",
//! "cid": link|null, "target": bytes}`; higher levels hold `[len, node-link]`. A node is cut
//! after an entry whose hash has `fanout` low zero bits (or before it would pass
//! [`NODE_BYTES_MAX`]), so equal content gives equal nodes wherever it sits.

use crate::cbor::{self, Value};
use crate::{Cid, Codec, Config, NODE_BYTES_MAX};

/// Version of the manifest format, first field of every node.
pub const FORMAT_VERSION: u64 = 1;
/// Longest directory entry name in bytes.
pub const NAME_BYTES_MAX: usize = 1024;
/// Longest symlink target in bytes.
pub const TARGET_BYTES_MAX: usize = 4096;
/// Deepest tree accepted (fan-out 2 over 2^64 bytes stays far below).
pub const TREE_LEVELS_MAX: u64 = 64;
/// Space kept in a node for everything but its entries.
const NODE_OVERHEAD_BYTES: usize = 64;

const _: () = assert!(NAME_BYTES_MAX + TARGET_BYTES_MAX + 200 < NODE_BYTES_MAX / 4);

/// What an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory tree.
    Dir,
    /// A raw disk image or block device; zero runs are holes.
    Disk,
    /// A canonicalised topology file (the chunks hold its canonical JSON).
    Topology,
}

impl Kind {
    /// The name used in manifests and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Disk => "disk",
            Kind::Topology => "topology",
        }
    }

    /// Parses [`Kind::as_str`].
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "file" => Kind::File,
            "dir" => Kind::Dir,
            "disk" => Kind::Disk,
            "topology" => Kind::Topology,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An encoded block and its CID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The CID of `bytes`.
    pub cid: Cid,
    /// The block.
    pub bytes: Vec<u8>,
}

impl Block {
    /// A DAG-CBOR block.
    pub fn dag_cbor(bytes: Vec<u8>) -> Block {
        Block { cid: Cid::dag_cbor(&bytes), bytes }
    }
}

/// The root block of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    /// What the object is.
    pub kind: Kind,
    /// The chunker identity that cut it.
    pub config: Config,
    /// Content length (for directories, the sum of file lengths).
    pub len: u64,
    /// The content tree.
    pub tree: Option<Cid>,
}

/// Why a manifest block cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestError {
    /// Not canonical DAG-CBOR.
    #[error("block {cid}: {source}")]
    Cbor {
        /// The block.
        cid: Cid,
        /// The decoding error.
        source: cbor::DecodeError,
    },
    /// Canonical DAG-CBOR, but not a manifest node of this format.
    #[error("block {cid}: not a valid manifest node: {what}")]
    Invalid {
        /// The block.
        cid: Cid,
        /// What was wrong.
        what: String,
    },
    /// A block the source does not have.
    #[error("block {0} is missing")]
    Missing(Cid),
    /// A block whose bytes do not match its CID.
    #[error("block {0} is corrupt (hash mismatch)")]
    Corrupt(Cid),
    /// The block source failed.
    #[error("reading block {cid}: {message}")]
    Source {
        /// The block.
        cid: Cid,
        /// The source's error.
        message: String,
    },
}

fn invalid(cid: Cid, what: impl Into<String>) -> ManifestError {
    ManifestError::Invalid { cid, what: what.into() }
}

impl Root {
    /// Encodes the root block.
    pub fn encode(&self) -> Block {
        let c = &self.config;
        let chunker = Value::map(vec![
            ("alg".into(), Value::Text(Config::ALGORITHM.into())),
            ("major".into(), Value::Uint(u64::from(Config::FASTCDC_MAJOR))),
            ("min".into(), Value::Uint(u64::from(c.chunk_bytes_min))),
            ("avg".into(), Value::Uint(u64::from(c.chunk_bytes_avg))),
            ("max".into(), Value::Uint(u64::from(c.chunk_bytes_max))),
            ("norm".into(), Value::Uint(u64::from(c.normalization))),
            ("zero".into(), Value::Uint(c.zero_run_bytes)),
            ("fanout".into(), Value::Uint(u64::from(c.fanout_bits))),
        ]);
        let root = Value::map(vec![
            ("v".into(), Value::Uint(FORMAT_VERSION)),
            ("kind".into(), Value::Text(self.kind.as_str().into())),
            ("len".into(), Value::Uint(self.len)),
            ("chunker".into(), chunker),
            ("tree".into(), self.tree.map_or(Value::Null, Value::Link)),
        ]);
        Block::dag_cbor(root.encode())
    }

    /// Decodes and checks a root block.
    ///
    /// # Errors
    /// [`ManifestError`] if the block is not a root of this format.
    pub fn decode(cid: Cid, bytes: &[u8]) -> Result<Root, ManifestError> {
        if cid.codec() != Codec::DagCbor {
            return Err(invalid(cid, "a root is a dag-cbor block; this CID names a raw chunk"));
        }
        let value = Value::decode(bytes).map_err(|source| ManifestError::Cbor { cid, source })?;
        let fields = ["chunker", "kind", "len", "tree", "v"];
        check_fields(cid, &value, &fields)?;
        if uint(cid, &value, "v")? != FORMAT_VERSION {
            return Err(invalid(cid, "unsupported manifest version"));
        }
        let kind = match value.field("kind") {
            Some(Value::Text(k)) => Kind::parse(k).ok_or_else(|| invalid(cid, "unknown kind"))?,
            _ => return Err(invalid(cid, "kind is not text")),
        };
        let ch = value.field("chunker").ok_or_else(|| invalid(cid, "no chunker"))?;
        check_fields(cid, ch, &["alg", "avg", "fanout", "major", "max", "min", "norm", "zero"])?;
        if ch.field("alg") != Some(&Value::Text(Config::ALGORITHM.into())) {
            return Err(invalid(cid, "unknown chunking algorithm"));
        }
        let narrow = |key: &str, max: u64| -> Result<u64, ManifestError> {
            let n = uint(cid, ch, key)?;
            if n > max {
                return Err(invalid(cid, format!("chunker {key} out of range")));
            }
            Ok(n)
        };
        let _major = narrow("major", u64::from(u32::MAX))?;
        let config = Config {
            chunk_bytes_min: narrow("min", u64::from(u32::MAX))? as u32,
            chunk_bytes_avg: narrow("avg", u64::from(u32::MAX))? as u32,
            chunk_bytes_max: narrow("max", u64::from(u32::MAX))? as u32,
            normalization: narrow("norm", 255)? as u8,
            zero_run_bytes: uint(cid, ch, "zero")?,
            fanout_bits: narrow("fanout", 255)? as u8,
        };
        config.validate().map_err(|e| invalid(cid, e.to_string()))?;
        let tree = match value.field("tree") {
            Some(Value::Null) => None,
            Some(Value::Link(link)) => Some(*link),
            _ => return Err(invalid(cid, "tree is not a link or null")),
        };
        let len = uint(cid, &value, "len")?;
        if tree.is_none() && len != 0 {
            return Err(invalid(cid, "empty tree with non-zero length"));
        }
        Ok(Root { kind, config, len, tree })
    }
}

fn check_fields(cid: Cid, value: &Value, expected: &[&str]) -> Result<(), ManifestError> {
    match value {
        Value::Map(entries) => {
            let mut names: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            if names != expected {
                return Err(invalid(cid, format!("fields {names:?}, expected {expected:?}")));
            }
            Ok(())
        }
        _ => Err(invalid(cid, "not a map")),
    }
}

fn uint(cid: Cid, value: &Value, key: &str) -> Result<u64, ManifestError> {
    match value.field(key) {
        Some(Value::Uint(n)) => Ok(*n),
        _ => Err(invalid(cid, format!("{key} is not an unsigned integer"))),
    }
}

/// What a directory entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryType {
    /// A regular file; `cid` is its content tree.
    File,
    /// A subdirectory; `cid` is its entry tree.
    Dir,
    /// A symbolic link; `target` is where it points.
    Symlink,
}

impl EntryType {
    fn as_str(self) -> &'static str {
        match self {
            EntryType::File => "file",
            EntryType::Dir => "dir",
            EntryType::Symlink => "symlink",
        }
    }
}

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name, as bytes (validated by [`check_name`]).
    pub name: Vec<u8>,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// What it is.
    pub entry_type: EntryType,
    /// Content bytes (files), subtree content bytes (directories), 0 (symlinks).
    pub len: u64,
    /// The content or entry tree (`None` when empty, and for symlinks).
    pub cid: Option<Cid>,
    /// Symlink target (empty otherwise).
    pub target: Vec<u8>,
}

/// Why a directory entry name cannot be stored or restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameError {
    /// Empty names, `.`, `..`, or names with `/` or NUL could escape or corrupt a restore.
    #[error("unsafe entry name {0:?}")]
    Unsafe(String),
    /// A name longer than [`NAME_BYTES_MAX`].
    #[error("entry name longer than {NAME_BYTES_MAX} bytes")]
    TooLong,
}

/// Checks that a directory entry name is a single, safe path component.
///
/// # Errors
/// [`NameError`] for empty, `.`, `..`, too long, or containing `/` or NUL.
pub fn check_name(name: &[u8]) -> Result<(), NameError> {
    if name.len() > NAME_BYTES_MAX {
        return Err(NameError::TooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(NameError::Unsafe(String::from_utf8_lossy(name).into_owned()));
    }
    Ok(())
}

/// One entry of an index node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEntry {
    /// A chunk of content.
    Chunk {
        /// Bytes.
        len: u64,
        /// The raw chunk.
        cid: Cid,
    },
    /// A run of zeros that is not stored.
    Hole {
        /// Bytes.
        len: u64,
    },
    /// A directory entry.
    Dir(DirEntry),
    /// A child index node (levels above 0).
    Child {
        /// Subtree length.
        len: u64,
        /// The child node.
        cid: Cid,
    },
}

impl NodeEntry {
    /// The length this entry contributes to its node.
    pub fn len(&self) -> u64 {
        match self {
            NodeEntry::Chunk { len, .. }
            | NodeEntry::Hole { len }
            | NodeEntry::Child { len, .. } => *len,
            NodeEntry::Dir(d) => d.len,
        }
    }

    /// Whether the entry contributes no length.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn to_value(&self) -> Value {
        match self {
            NodeEntry::Chunk { len, cid } | NodeEntry::Child { len, cid } => {
                Value::List(vec![Value::Uint(*len), Value::Link(*cid)])
            }
            NodeEntry::Hole { len } => Value::List(vec![Value::Uint(*len), Value::Null]),
            NodeEntry::Dir(d) => Value::map(vec![
                ("name".into(), Value::Bytes(d.name.clone())),
                ("mode".into(), Value::Uint(u64::from(d.mode))),
                ("type".into(), Value::Text(d.entry_type.as_str().into())),
                ("len".into(), Value::Uint(d.len)),
                ("cid".into(), d.cid.map_or(Value::Null, Value::Link)),
                ("target".into(), Value::Bytes(d.target.clone())),
            ]),
        }
    }

    /// The hash whose low bits decide node cuts.
    fn cut_hash(&self) -> u64 {
        let word = |bytes: &[u8]| u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        match self {
            NodeEntry::Chunk { cid, .. } | NodeEntry::Child { cid, .. } => word(cid.digest()),
            NodeEntry::Hole { len } => {
                word(blake3::hash(&[b"hole".as_slice(), &len.to_le_bytes()].concat()).as_bytes())
            }
            NodeEntry::Dir(d) => word(blake3::hash(&d.name).as_bytes()),
        }
    }
}

/// A decoded index node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// 0 for leaves.
    pub level: u64,
    /// Sum of the entries' lengths.
    pub len: u64,
    /// Entries in order.
    pub entries: Vec<NodeEntry>,
}

impl Node {
    /// Decodes and checks an index node of an object of `kind`.
    ///
    /// # Errors
    /// [`ManifestError`] if the block is not a consistent index node for that kind.
    pub fn decode(cid: Cid, bytes: &[u8], kind: Kind) -> Result<Node, ManifestError> {
        if bytes.len() > NODE_BYTES_MAX {
            return Err(invalid(cid, "node larger than 1 MiB"));
        }
        let value = Value::decode(bytes).map_err(|source| ManifestError::Cbor { cid, source })?;
        check_fields(cid, &value, &["entries", "len", "level", "v"])?;
        if uint(cid, &value, "v")? != FORMAT_VERSION {
            return Err(invalid(cid, "unsupported node version"));
        }
        let level = uint(cid, &value, "level")?;
        if level >= TREE_LEVELS_MAX {
            return Err(invalid(cid, "tree too deep"));
        }
        let len = uint(cid, &value, "len")?;
        let Some(Value::List(items)) = value.field("entries") else {
            return Err(invalid(cid, "entries is not a list"));
        };
        if items.is_empty() {
            return Err(invalid(cid, "node without entries"));
        }
        let mut entries = Vec::with_capacity(items.len());
        let mut sum: u64 = 0;
        for item in items {
            let entry = decode_entry(cid, item, level, kind)?;
            sum = sum.checked_add(entry.len()).ok_or_else(|| invalid(cid, "length overflow"))?;
            if let NodeEntry::Dir(d) = &entry
                && let Some(NodeEntry::Dir(prev)) = entries.last()
                && prev.name >= d.name
            {
                return Err(invalid(cid, "directory entries unsorted or duplicated"));
            }
            entries.push(entry);
        }
        if sum != len {
            return Err(invalid(cid, format!("entries sum to {sum}, node says {len}")));
        }
        Ok(Node { level, len, entries })
    }
}

fn decode_entry(
    cid: Cid,
    item: &Value,
    level: u64,
    kind: Kind,
) -> Result<NodeEntry, ManifestError> {
    match item {
        Value::List(pair) if pair.len() == 2 => {
            let Value::Uint(len) = pair[0] else {
                return Err(invalid(cid, "entry length is not an unsigned integer"));
            };
            match (&pair[1], level) {
                (Value::Link(c), 0) if kind != Kind::Dir && c.codec() == Codec::Raw => {
                    if len == 0 || len > u64::from(crate::config::CHUNK_BYTES_MAX) {
                        return Err(invalid(cid, "chunk length out of range"));
                    }
                    Ok(NodeEntry::Chunk { len, cid: *c })
                }
                (Value::Null, 0) if kind == Kind::Disk && len > 0 => Ok(NodeEntry::Hole { len }),
                (Value::Link(c), 1..) if c.codec() == Codec::DagCbor => {
                    Ok(NodeEntry::Child { len, cid: *c })
                }
                _ => Err(invalid(cid, "entry does not fit its level and kind")),
            }
        }
        Value::Map(_) if level == 0 && kind == Kind::Dir => {
            check_fields(cid, item, &["cid", "len", "mode", "name", "target", "type"])?;
            let bytes = |key: &str| match item.field(key) {
                Some(Value::Bytes(b)) => Ok(b.clone()),
                _ => Err(invalid(cid, format!("{key} is not bytes"))),
            };
            let name = bytes("name")?;
            check_name(&name).map_err(|e| invalid(cid, e.to_string()))?;
            let target = bytes("target")?;
            let mode = uint(cid, item, "mode")?;
            if mode > 0o7777 {
                return Err(invalid(cid, "mode has bits beyond 0o7777"));
            }
            let entry_type = match item.field("type") {
                Some(Value::Text(t)) if t == "file" => EntryType::File,
                Some(Value::Text(t)) if t == "dir" => EntryType::Dir,
                Some(Value::Text(t)) if t == "symlink" => EntryType::Symlink,
                _ => return Err(invalid(cid, "unknown entry type")),
            };
            let link = match item.field("cid") {
                Some(Value::Null) => None,
                Some(Value::Link(c)) => Some(*c),
                _ => return Err(invalid(cid, "cid is not a link or null")),
            };
            let len = uint(cid, item, "len")?;
            let consistent = match entry_type {
                EntryType::Symlink => {
                    link.is_none()
                        && len == 0
                        && !target.is_empty()
                        && target.len() <= TARGET_BYTES_MAX
                }
                EntryType::File => target.is_empty() && (link.is_some() || len == 0),
                EntryType::Dir => {
                    target.is_empty() && link.is_none_or(|c| c.codec() == Codec::DagCbor)
                }
            };
            if !consistent {
                return Err(invalid(cid, "entry fields contradict its type"));
            }
            Ok(NodeEntry::Dir(DirEntry {
                name,
                mode: mode as u32,
                entry_type,
                len,
                cid: link,
                target,
            }))
        }
        _ => Err(invalid(cid, "entry has an unknown shape")),
    }
}

/// Builds a content-cut tree from entries pushed in order, emitting finished blocks.
#[derive(Debug)]
pub struct TreeBuilder {
    mask: u64,
    levels: Vec<Level>,
    blocks: Vec<Block>,
    single_chunk: bool,
}

#[derive(Debug, Default)]
struct Level {
    encoded: Vec<u8>,
    count: u64,
    len: u64,
    emitted: bool,
    first: Option<NodeEntry>,
}

impl TreeBuilder {
    /// A builder cutting nodes with `config`'s fan-out. `single_chunk_root` lets content
    /// that is exactly one chunk use that chunk as its tree (files, topology files).
    pub fn new(config: &Config, single_chunk_root: bool) -> TreeBuilder {
        assert!((1..=16).contains(&config.fanout_bits), "fanout={}", config.fanout_bits);
        TreeBuilder {
            mask: (1u64 << config.fanout_bits) - 1,
            levels: vec![Level::default()],
            blocks: Vec::new(),
            single_chunk: single_chunk_root,
        }
    }

    /// Appends a level-0 entry.
    pub fn push(&mut self, entry: NodeEntry) {
        assert!(!matches!(entry, NodeEntry::Child { .. }), "children are pushed by the builder");
        self.push_at(0, entry);
    }

    /// Blocks finished so far; the caller stores them (children before parents).
    pub fn take_blocks(&mut self) -> Vec<Block> {
        std::mem::take(&mut self.blocks)
    }

    fn push_at(&mut self, level: usize, entry: NodeEntry) {
        if level == self.levels.len() {
            self.levels.push(Level::default());
        }
        let mut encoded = Vec::new();
        entry.to_value().encode_into(&mut encoded);
        let over = self.levels[level].encoded.len() + encoded.len() + NODE_OVERHEAD_BYTES;
        if self.levels[level].count > 0 && over > NODE_BYTES_MAX {
            self.cut(level);
        }
        let hash = entry.cut_hash();
        let l = &mut self.levels[level];
        l.encoded.extend_from_slice(&encoded);
        l.count += 1;
        l.len = l.len.checked_add(entry.len()).expect("content length fits u64");
        if l.count == 1 {
            l.first = Some(entry);
        }
        if hash & self.mask == 0 {
            self.cut(level);
        }
    }

    /// Emits the pending entries of `level` as one node and pushes it to the level above.
    fn cut(&mut self, level: usize) {
        let block = self.node_block(level);
        let l = &mut self.levels[level];
        let len = l.len;
        *l = Level { emitted: true, ..Level::default() };
        let cid = block.cid;
        self.blocks.push(block);
        self.push_at(level + 1, NodeEntry::Child { len, cid });
    }

    fn node_block(&self, level: usize) -> Block {
        let l = &self.levels[level];
        assert!(l.count > 0, "cutting an empty level {level}");
        // Keys in DAG-CBOR order: "v", "len", "level", "entries".
        let mut out = Vec::with_capacity(l.encoded.len() + NODE_OVERHEAD_BYTES);
        out.push(0xa4);
        Value::Text("v".into()).encode_into(&mut out);
        Value::Uint(FORMAT_VERSION).encode_into(&mut out);
        Value::Text("len".into()).encode_into(&mut out);
        Value::Uint(l.len).encode_into(&mut out);
        Value::Text("level".into()).encode_into(&mut out);
        Value::Uint(level as u64).encode_into(&mut out);
        Value::Text("entries".into()).encode_into(&mut out);
        let before = out.len();
        Value::Uint(l.count).encode_into(&mut out);
        out[before] |= 0x80; // major type 4 (list) over the same length head
        out.extend_from_slice(&l.encoded);
        assert!(out.len() <= NODE_BYTES_MAX, "node of {} bytes", out.len());
        Block::dag_cbor(out)
    }

    /// Ends the tree: returns its root link (`None` for no entries) and total length. Call
    /// [`Self::take_blocks`] afterwards for the last blocks.
    pub fn finish(&mut self) -> (Option<Cid>, u64) {
        let mut level = 0;
        loop {
            let top = level + 1 == self.levels.len();
            let l = &self.levels[level];
            if top && !l.emitted {
                if l.count == 0 {
                    return (None, 0);
                }
                let len = l.len;
                match &l.first {
                    Some(NodeEntry::Child { cid, .. }) if l.count == 1 => return (Some(*cid), len),
                    Some(NodeEntry::Chunk { cid, .. }) if l.count == 1 && self.single_chunk => {
                        return (Some(*cid), len);
                    }
                    _ => {}
                }
                let block = self.node_block(level);
                let cid = block.cid;
                self.blocks.push(block);
                self.levels[level] = Level { emitted: true, ..Level::default() };
                return (Some(cid), len);
            }
            if l.count > 0 {
                self.cut(level);
            }
            level += 1;
        }
    }
}

/// Where the walkers get blocks from (the store, or the mesh).
pub trait BlockSource {
    /// The bytes of a block, already checked against its CID.
    ///
    /// # Errors
    /// [`ManifestError::Missing`], [`ManifestError::Corrupt`] or [`ManifestError::Source`].
    fn block(&self, cid: &Cid) -> Result<Vec<u8>, ManifestError>;
}

/// Reads the root block of an object.
///
/// # Errors
/// [`ManifestError`] when the block is missing, corrupt or not a root.
pub fn read_root(source: &dyn BlockSource, cid: &Cid) -> Result<Root, ManifestError> {
    let bytes = source.block(cid)?;
    Root::decode(*cid, &bytes)
}

/// Called with each index node's CID and size as a walk loads it.
pub type NodeVisitor<'a> = &'a mut dyn FnMut(&Cid, usize);

/// Iterates the level-0 entries of a tree in order, loading one path of nodes at a time.
pub struct Leaves<'a> {
    source: &'a dyn BlockSource,
    kind: Kind,
    stack: Vec<(Vec<NodeEntry>, usize)>,
    pending_raw: Option<(u64, Cid)>,
    visit: Option<NodeVisitor<'a>>,
}

impl std::fmt::Debug for Leaves<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaves").field("depth", &self.stack.len()).finish()
    }
}

impl<'a> Leaves<'a> {
    /// Walks `tree` (of an object of `kind` and length `len`).
    pub fn new(source: &'a dyn BlockSource, kind: Kind, tree: Option<Cid>, len: u64) -> Leaves<'a> {
        let mut leaves = Leaves { source, kind, stack: Vec::new(), pending_raw: None, visit: None };
        match tree {
            Some(cid) if cid.codec() == Codec::Raw => leaves.pending_raw = Some((len, cid)),
            Some(cid) => leaves.stack.push((vec![NodeEntry::Child { len, cid }], 0)),
            None => {}
        }
        leaves
    }

    /// Calls `visit(cid, bytes)` for every index node loaded (for GC marking and verify).
    pub fn with_visitor(mut self, visit: NodeVisitor<'a>) -> Leaves<'a> {
        self.visit = Some(visit);
        self
    }
}

impl Iterator for Leaves<'_> {
    type Item = Result<NodeEntry, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some((len, cid)) = self.pending_raw.take() {
            return Some(Ok(NodeEntry::Chunk { len, cid }));
        }
        loop {
            let (entries, at) = self.stack.last_mut()?;
            let Some(entry) = entries.get(*at).cloned() else {
                self.stack.pop();
                continue;
            };
            *at += 1;
            let NodeEntry::Child { len, cid } = entry else {
                return Some(Ok(entry));
            };
            if self.stack.len() as u64 > TREE_LEVELS_MAX {
                self.stack.clear();
                return Some(Err(invalid(cid, "tree too deep")));
            }
            let node = match self.source.block(&cid).and_then(|b| {
                if let Some(visit) = self.visit.as_mut() {
                    visit(&cid, b.len());
                }
                Node::decode(cid, &b, self.kind)
            }) {
                Ok(node) => node,
                Err(e) => {
                    self.stack.clear();
                    return Some(Err(e));
                }
            };
            if node.len != len {
                self.stack.clear();
                return Some(Err(invalid(cid, "node length differs from its parent's entry")));
            }
            self.stack.push((node.entries, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Mem(RefCell<BTreeMap<Cid, Vec<u8>>>);

    impl BlockSource for Mem {
        fn block(&self, cid: &Cid) -> Result<Vec<u8>, ManifestError> {
            self.0.borrow().get(cid).cloned().ok_or(ManifestError::Missing(*cid))
        }
    }

    impl Mem {
        fn put(&self, blocks: Vec<Block>) {
            for b in blocks {
                assert!(b.bytes.len() <= NODE_BYTES_MAX);
                self.0.borrow_mut().insert(b.cid, b.bytes);
            }
        }
    }

    fn chunk(i: u64) -> NodeEntry {
        let bytes = i.to_le_bytes();
        NodeEntry::Chunk { len: 1000 + i % 7, cid: Cid::raw(&bytes) }
    }

    fn build(entries: &[NodeEntry], config: &Config, mem: &Mem) -> (Option<Cid>, u64) {
        let mut b = TreeBuilder::new(config, true);
        for e in entries {
            b.push(e.clone());
            mem.put(b.take_blocks());
        }
        let out = b.finish();
        mem.put(b.take_blocks());
        out
    }

    #[test]
    fn trees_round_trip_at_every_size() {
        // Entries pushed come back from the walker in order, for empty, single, and
        // multi-level trees; subtree lengths add up.
        let config = Config { fanout_bits: 2, ..Config::default() };
        for n in [0u64, 1, 2, 3, 10, 100, 1000] {
            let mem = Mem::default();
            let entries: Vec<_> = (0..n).map(chunk).collect();
            let (tree, len) = build(&entries, &config, &mem);
            assert_eq!(len, entries.iter().map(NodeEntry::len).sum::<u64>());
            let back: Vec<_> =
                Leaves::new(&mem, Kind::File, tree, len).map(Result::unwrap).collect();
            assert_eq!(back, entries, "n={n}");
            if n == 1 {
                assert_eq!(tree.unwrap().codec(), Codec::Raw, "one chunk is its own tree");
            }
        }
    }

    #[test]
    fn an_insertion_touches_only_its_path() {
        // Inserting one entry in the middle of 100,000 changes few nodes: the cut points
        // resynchronise and every other node is shared.
        let config = Config::default();
        let entries: Vec<_> = (0..100_000).map(chunk).collect();
        let mut edited = entries.clone();
        edited.insert(50_000, chunk(1_000_000));
        let (a, b) = (Mem::default(), Mem::default());
        build(&entries, &config, &a);
        build(&edited, &config, &b);
        let new = b.0.borrow().keys().filter(|k| !a.0.borrow().contains_key(k)).count();
        assert!(new <= 4, "{new} new nodes");
        assert!(a.0.borrow().len() > 300);
    }

    #[test]
    fn roots_round_trip_and_reject_garbage() {
        // A root decodes to itself; bit flips and wrong shapes are errors, never panics.
        let root = Root {
            kind: Kind::Disk,
            config: Config::default(),
            len: 1 << 40,
            tree: Some(Cid::dag_cbor(b"x")),
        };
        let block = root.encode();
        assert_eq!(Root::decode(block.cid, &block.bytes).unwrap(), root);
        for i in 0..block.bytes.len() {
            let mut bad = block.bytes.clone();
            bad[i] ^= 0x40;
            let _ = Root::decode(block.cid, &bad);
        }
        assert!(Root::decode(Cid::raw(b"x"), &block.bytes).is_err());
        assert!(Node::decode(block.cid, &block.bytes, Kind::File).is_err());
    }

    #[test]
    fn node_size_is_bounded_by_bytes_not_count() {
        // Directory entries with long names force cuts before a node passes 1 MiB, even
        // with a fan-out that would otherwise never cut.
        let config = Config { fanout_bits: 16, ..Config::default() };
        let mut b = TreeBuilder::new(&config, false);
        let mut blocks = Vec::new();
        for i in 0..5000u32 {
            let mut name = format!("{i:08}").into_bytes();
            name.resize(NAME_BYTES_MAX, b'n');
            b.push(NodeEntry::Dir(DirEntry {
                name,
                mode: 0o644,
                entry_type: EntryType::Symlink,
                len: 0,
                cid: None,
                target: vec![b't'; 100],
            }));
            blocks.extend(b.take_blocks());
        }
        b.finish();
        blocks.extend(b.take_blocks());
        assert!(blocks.len() > 4);
        for block in &blocks {
            assert!(block.bytes.len() <= NODE_BYTES_MAX);
            assert!(Node::decode(block.cid, &block.bytes, Kind::Dir).is_ok());
        }
    }

    #[test]
    fn every_manifest_form_round_trips() {
        // Disk trees with holes, directory trees with every entry type, and roots of every
        // kind decode to what was built, and re-encode to the same bytes.
        let config = Config { fanout_bits: 2, ..Config::default() };
        let mem = Mem::default();
        let disk: Vec<NodeEntry> = (0..200u64)
            .map(|i| if i % 3 == 0 { NodeEntry::Hole { len: 65536 * (1 + i) } } else { chunk(i) })
            .collect();
        let mut b = TreeBuilder::new(&config, false);
        for e in &disk {
            b.push(e.clone());
        }
        let (tree, len) = b.finish();
        mem.put(b.take_blocks());
        let back: Vec<_> = Leaves::new(&mem, Kind::Disk, tree, len).map(Result::unwrap).collect();
        assert_eq!(back, disk);
        let dir: Vec<NodeEntry> = (0..100u32)
            .map(|i| {
                let name = format!("entry-{i:04}").into_bytes();
                NodeEntry::Dir(match i % 3 {
                    0 => DirEntry {
                        name,
                        mode: 0o644,
                        entry_type: EntryType::File,
                        len: u64::from(i),
                        cid: (i > 0).then(|| Cid::raw(&i.to_le_bytes())),
                        target: Vec::new(),
                    },
                    1 => DirEntry {
                        name,
                        mode: 0o755,
                        entry_type: EntryType::Dir,
                        len: 7,
                        cid: Some(Cid::dag_cbor(&i.to_le_bytes())),
                        target: Vec::new(),
                    },
                    _ => DirEntry {
                        name,
                        mode: 0o777,
                        entry_type: EntryType::Symlink,
                        len: 0,
                        cid: None,
                        target: b"../elsewhere".to_vec(),
                    },
                })
            })
            .collect();
        let mut b = TreeBuilder::new(&config, false);
        for e in &dir {
            b.push(e.clone());
        }
        let (tree, len) = b.finish();
        let blocks = b.take_blocks();
        for block in &blocks {
            let node = Node::decode(block.cid, &block.bytes, Kind::Dir).unwrap();
            assert!(!node.entries.is_empty());
            let value = Value::decode(&block.bytes).unwrap();
            assert_eq!(value.encode(), block.bytes);
        }
        mem.put(blocks);
        let back: Vec<_> = Leaves::new(&mem, Kind::Dir, tree, len).map(Result::unwrap).collect();
        assert_eq!(back, dir);
        for kind in [Kind::File, Kind::Dir, Kind::Disk, Kind::Topology] {
            let root = Root { kind, config, len, tree };
            let block = root.encode();
            assert_eq!(Root::decode(block.cid, &block.bytes).unwrap(), root);
        }
        let empty = Root { kind: Kind::File, config, len: 0, tree: None }.encode();
        assert_eq!(Root::decode(empty.cid, &empty.bytes).unwrap().tree, None);
    }

    #[test]
    fn unsafe_names_are_refused() {
        // Names that could escape a restore target are rejected.
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name(b"ok name \xff").unwrap();
    }
}
