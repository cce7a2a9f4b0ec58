//! Reading objects for people: `inspect`, `diff`, and `verify` of one object.

use std::collections::{BTreeMap, BTreeSet};

use mycel_chunker::manifest::{EntryType, Kind, Leaves, NodeEntry, Root};
use mycel_chunker::{Cid, Codec, topology};
use serde::Serialize;

use crate::restore::{self, GetError};
use crate::store::{Store, StoreError};

/// What `inspect` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Inspection {
    /// The CID inspected.
    pub cid: String,
    /// `raw` for a chunk, else the object kind.
    pub kind: String,
    /// Content bytes.
    pub bytes: u64,
    /// The chunker identity (objects).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunker: Option<serde_json::Value>,
    /// Tree levels (0: no index node).
    pub levels: u64,
    /// Index nodes.
    pub nodes: u64,
    /// Bytes of index nodes.
    pub node_bytes: u64,
    /// Chunk references.
    pub chunks: u64,
    /// Distinct chunks.
    pub unique_chunks: u64,
    /// Holes and their bytes.
    pub holes: u64,
    /// Bytes of holes.
    pub hole_bytes: u64,
    /// Directory entries (whole tree).
    pub entries: u64,
    /// Label from the store's root table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Topology source root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Inspects a chunk or an object.
///
/// # Errors
/// Missing or corrupt blocks.
pub fn inspect(store: &Store, cid: &Cid) -> Result<Inspection, GetError> {
    if cid.codec() == Codec::Raw {
        let bytes = store.get(cid)?.ok_or(GetError::Missing(*cid))?;
        return Ok(Inspection {
            cid: cid.to_string(),
            kind: "raw".into(),
            bytes: bytes.len() as u64,
            chunker: None,
            levels: 0,
            nodes: 0,
            node_bytes: 0,
            chunks: 1,
            unique_chunks: 1,
            holes: 0,
            hole_bytes: 0,
            entries: 0,
            name: None,
            source: None,
        });
    }
    let root = restore::root(store, cid)?;
    let c = root.config;
    let record = store.root(cid)?;
    let mut out = Inspection {
        cid: cid.to_string(),
        kind: root.kind.to_string(),
        bytes: root.len,
        chunker: Some(serde_json::json!({
            "algorithm": mycel_chunker::Config::ALGORITHM,
            "fastcdc_major": mycel_chunker::Config::FASTCDC_MAJOR,
            "min_bytes": c.chunk_bytes_min,
            "avg_bytes": c.chunk_bytes_avg,
            "max_bytes": c.chunk_bytes_max,
            "normalization": c.normalization,
            "zero_run_bytes": c.zero_run_bytes,
            "fanout_bits": c.fanout_bits,
        })),
        levels: 0,
        nodes: 0,
        node_bytes: 0,
        chunks: 0,
        unique_chunks: 0,
        holes: 0,
        hole_bytes: 0,
        entries: 0,
        name: record.as_ref().map(|r| r.name.clone()),
        source: record.and_then(|r| r.source_cid()).map(|c| c.to_string()),
    };
    if let Some(tree) = root.tree.filter(|t| t.codec() == Codec::DagCbor) {
        let bytes = store.get(&tree)?.ok_or(GetError::Missing(tree))?;
        let top = mycel_chunker::manifest::Node::decode(tree, &bytes, root.kind)
            .map_err(|e| GetError::Corrupt(e.to_string()))?;
        out.levels = top.level + 1;
    }
    let mut unique = BTreeSet::new();
    walk_stats(store, root.kind, root.tree, root.len, &mut out, &mut unique)?;
    out.unique_chunks = unique.len() as u64;
    Ok(out)
}

fn walk_stats(
    store: &Store,
    kind: Kind,
    tree: Option<Cid>,
    len: u64,
    out: &mut Inspection,
    unique: &mut BTreeSet<Cid>,
) -> Result<(), GetError> {
    let mut nodes = 0u64;
    let mut node_bytes = 0u64;
    let mut children = Vec::new();
    {
        let mut visit = |_: &Cid, n: usize| {
            nodes += 1;
            node_bytes += n as u64;
        };
        for entry in Leaves::new(store, kind, tree, len).with_visitor(&mut visit) {
            match entry? {
                NodeEntry::Chunk { cid, .. } => {
                    out.chunks += 1;
                    unique.insert(cid);
                }
                NodeEntry::Hole { len } => {
                    out.holes += 1;
                    out.hole_bytes += len;
                }
                NodeEntry::Dir(d) => {
                    out.entries += 1;
                    match d.entry_type {
                        EntryType::File => children.push((Kind::File, d.cid, d.len)),
                        EntryType::Dir => children.push((Kind::Dir, d.cid, d.len)),
                        EntryType::Symlink => {}
                    }
                }
                NodeEntry::Child { .. } => {}
            }
        }
    }
    out.nodes += nodes;
    out.node_bytes += node_bytes;
    for (k, t, l) in children {
        walk_stats(store, k, t, l, out, unique)?;
    }
    Ok(())
}

/// One changed range, in bytes.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// One changed path (directories and topology files).
#[derive(Clone, Debug, Serialize)]
pub struct PathChange {
    /// The path.
    pub path: String,
    /// `added`, `removed` or `changed`.
    pub change: String,
    /// Old value (topology) or description (directories).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<serde_json::Value>,
    /// New value or description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<serde_json::Value>,
}

/// What `diff` finds.
#[derive(Clone, Debug, Serialize)]
pub struct Diff {
    /// First object.
    pub a: String,
    /// Second object.
    pub b: String,
    /// `bytes`, `dir` or `topology`.
    pub mode: String,
    /// Whether the contents are equal.
    pub identical: bool,
    /// Byte mode: ranges of B whose chunks A lacks (new or changed content).
    pub changed_in_b: Vec<Range>,
    /// Byte mode: ranges of A whose chunks B lacks.
    pub removed_from_a: Vec<Range>,
    /// Byte mode: total bytes in `changed_in_b`.
    pub changed_bytes: u64,
    /// Directory and topology modes: changed paths.
    pub paths: Vec<PathChange>,
}

/// Compares two objects.
///
/// # Errors
/// Missing or corrupt content.
pub fn diff(store: &Store, a: &Cid, b: &Cid) -> Result<Diff, GetError> {
    let ra = restore::root(store, a)?;
    let rb = restore::root(store, b)?;
    let mut out = Diff {
        a: a.to_string(),
        b: b.to_string(),
        mode: "bytes".into(),
        identical: ra.tree == rb.tree && ra.len == rb.len && ra.kind == rb.kind,
        changed_in_b: Vec::new(),
        removed_from_a: Vec::new(),
        changed_bytes: 0,
        paths: Vec::new(),
    };
    match (ra.kind, rb.kind) {
        (Kind::Topology, Kind::Topology) => {
            out.mode = "topology".into();
            let va = topology_value(store, &ra)?;
            let vb = topology_value(store, &rb)?;
            for c in topology::diff(&va, &vb) {
                out.paths.push(PathChange {
                    path: c.path.clone(),
                    change: format!("{:?}", c.kind).to_lowercase(),
                    old: c.old.as_ref().map(to_json),
                    new: c.new.as_ref().map(to_json),
                });
            }
            out.identical = out.paths.is_empty();
        }
        (Kind::Dir, Kind::Dir) => {
            out.mode = "dir".into();
            let mut fa = BTreeMap::new();
            let mut fb = BTreeMap::new();
            flatten(store, ra.tree, ra.len, "", &mut fa)?;
            flatten(store, rb.tree, rb.len, "", &mut fb)?;
            for (path, ea) in &fa {
                match fb.get(path) {
                    None => out.paths.push(PathChange {
                        path: path.clone(),
                        change: "removed".into(),
                        old: Some(serde_json::json!(ea)),
                        new: None,
                    }),
                    Some(eb) if eb != ea => out.paths.push(PathChange {
                        path: path.clone(),
                        change: "changed".into(),
                        old: Some(serde_json::json!(ea)),
                        new: Some(serde_json::json!(eb)),
                    }),
                    Some(_) => {}
                }
            }
            for (path, eb) in &fb {
                if !fa.contains_key(path) {
                    out.paths.push(PathChange {
                        path: path.clone(),
                        change: "added".into(),
                        old: None,
                        new: Some(serde_json::json!(eb)),
                    });
                }
            }
            out.paths.sort_by(|x, y| x.path.cmp(&y.path));
            out.identical = out.paths.is_empty();
        }
        (Kind::Dir, _) | (_, Kind::Dir) => {
            return Err(GetError::Invalid("cannot compare a directory with a file".into()));
        }
        _ => {
            let ea = leaves(store, &ra)?;
            let eb = leaves(store, &rb)?;
            let keys_a: BTreeSet<_> = ea.iter().map(|e| e.2).collect();
            let keys_b: BTreeSet<_> = eb.iter().map(|e| e.2).collect();
            out.changed_in_b = ranges_missing(&eb, &keys_a);
            out.removed_from_a = ranges_missing(&ea, &keys_b);
            out.changed_bytes = out.changed_in_b.iter().map(|r| r.end - r.start).sum();
            out.identical =
                ra.len == rb.len && out.changed_in_b.is_empty() && out.removed_from_a.is_empty();
        }
    }
    Ok(out)
}

type LeafKey = (Option<Cid>, u64);

fn leaves(store: &Store, root: &Root) -> Result<Vec<(u64, u64, LeafKey)>, GetError> {
    let mut out = Vec::new();
    let mut at = 0;
    for e in Leaves::new(store, root.kind, root.tree, root.len) {
        let (len, key) = match e? {
            NodeEntry::Chunk { cid, len } => (len, (Some(cid), len)),
            NodeEntry::Hole { len } => (len, (None, len)),
            _ => return Err(GetError::Corrupt("unexpected entry in a file tree".into())),
        };
        out.push((at, len, key));
        at += len;
    }
    Ok(out)
}

fn ranges_missing(entries: &[(u64, u64, LeafKey)], other: &BTreeSet<LeafKey>) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::new();
    for (start, len, key) in entries {
        // A hole is "present" in the other object if it has zeros there in any form.
        if other.contains(key) {
            continue;
        }
        let end = start + len;
        match out.last_mut() {
            Some(r) if r.end == *start => r.end = end,
            _ => out.push(Range { start: *start, end }),
        }
    }
    out
}

fn topology_value(store: &Store, root: &Root) -> Result<topology::Value, GetError> {
    let mut bytes = Vec::new();
    for e in Leaves::new(store, root.kind, root.tree, root.len) {
        if let NodeEntry::Chunk { cid, .. } = e? {
            bytes.extend_from_slice(&store.get(&cid)?.ok_or(GetError::Missing(cid))?);
        }
    }
    topology::parse(&bytes, topology::Format::Json).map_err(|e| GetError::Corrupt(e.to_string()))
}

fn to_json(v: &topology::Value) -> serde_json::Value {
    serde_json::from_slice(&topology::canonical_json(v)).unwrap_or(serde_json::Value::Null)
}

fn flatten(
    store: &Store,
    tree: Option<Cid>,
    len: u64,
    prefix: &str,
    out: &mut BTreeMap<String, String>,
) -> Result<(), GetError> {
    for e in Leaves::new(store, Kind::Dir, tree, len) {
        let NodeEntry::Dir(d) = e? else {
            return Err(GetError::Corrupt("unexpected entry in a directory tree".into()));
        };
        let path = format!("{prefix}/{}", String::from_utf8_lossy(&d.name));
        let desc = match d.entry_type {
            EntryType::File => format!(
                "file {} bytes mode {:o} {}",
                d.len,
                d.mode,
                d.cid.map(|c| c.to_string()).unwrap_or_default()
            ),
            EntryType::Dir => format!("dir mode {:o}", d.mode),
            EntryType::Symlink => format!("symlink -> {}", String::from_utf8_lossy(&d.target)),
        };
        out.insert(path.clone(), desc);
        if d.entry_type == EntryType::Dir {
            flatten(store, d.cid, d.len, &path, out)?;
        }
    }
    Ok(())
}

/// Result of verifying one object.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ObjectCheck {
    /// Blocks read and checked.
    pub blocks: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Blocks absent from the store.
    pub missing: Vec<String>,
    /// Blocks whose bytes do not match their CID, or that do not decode.
    pub corrupt: Vec<String>,
}

/// Reads every block of an object and checks it.
///
/// # Errors
/// Store failures other than missing or corrupt blocks (those are results).
pub fn verify_object(store: &Store, cid: &Cid) -> Result<ObjectCheck, StoreError> {
    let mut check = ObjectCheck::default();
    let root = match store.get(cid) {
        Ok(Some(bytes)) => {
            check.blocks += 1;
            check.bytes += bytes.len() as u64;
            if cid.codec() == Codec::Raw {
                return Ok(check);
            }
            match Root::decode(*cid, &bytes) {
                Ok(r) => r,
                Err(e) => {
                    check.corrupt.push(format!("{cid}: {e}"));
                    return Ok(check);
                }
            }
        }
        Ok(None) => {
            check.missing.push(cid.to_string());
            return Ok(check);
        }
        Err(StoreError::Corrupt { what, .. }) => {
            check.corrupt.push(format!("{cid}: {what}"));
            return Ok(check);
        }
        Err(e) => return Err(e),
    };
    verify_tree(store, root.kind, root.tree, root.len, &mut check)?;
    if let Some(source) = store.root(cid)?.and_then(|r| r.source_cid()) {
        let inner = verify_object(store, &source)?;
        check.blocks += inner.blocks;
        check.bytes += inner.bytes;
        check.missing.extend(inner.missing);
        check.corrupt.extend(inner.corrupt);
    }
    Ok(check)
}

fn verify_tree(
    store: &Store,
    kind: Kind,
    tree: Option<Cid>,
    len: u64,
    check: &mut ObjectCheck,
) -> Result<(), StoreError> {
    let mut nodes = 0u64;
    let mut node_bytes = 0u64;
    let mut children = Vec::new();
    let mut broken = None;
    {
        let mut visit = |_: &Cid, n: usize| {
            nodes += 1;
            node_bytes += n as u64;
        };
        for e in Leaves::new(store, kind, tree, len).with_visitor(&mut visit) {
            match e {
                Ok(NodeEntry::Chunk { cid, .. }) => match store.get(&cid) {
                    Ok(Some(b)) => {
                        check.blocks += 1;
                        check.bytes += b.len() as u64;
                    }
                    Ok(None) => check.missing.push(cid.to_string()),
                    Err(StoreError::Corrupt { what, .. }) => {
                        check.corrupt.push(format!("{cid}: {what}"))
                    }
                    Err(e) => return Err(e),
                },
                Ok(NodeEntry::Dir(d)) => match d.entry_type {
                    EntryType::File => children.push((Kind::File, d.cid, d.len)),
                    EntryType::Dir => children.push((Kind::Dir, d.cid, d.len)),
                    EntryType::Symlink => {}
                },
                Ok(_) => {}
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
    }
    check.blocks += nodes;
    check.bytes += node_bytes;
    match broken {
        Some(mycel_chunker::manifest::ManifestError::Missing(c)) => {
            check.missing.push(c.to_string())
        }
        Some(e) => check.corrupt.push(e.to_string()),
        None => {}
    }
    for (k, t, l) in children {
        verify_tree(store, k, t, l, check)?;
    }
    Ok(())
}
