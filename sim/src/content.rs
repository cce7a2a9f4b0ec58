//! Generated content, cut by the real chunker into the real manifest format, and the block
//! pool that lets many simulated stores share one copy of identical bytes.

use std::collections::BTreeMap;
use std::rc::Rc;

use mycel_chunker::cdc::Cutter;
use mycel_chunker::holes::{Piece, Segmenter};
use mycel_chunker::manifest::{
    self, BlockSource, Kind, Leaves, ManifestError, NodeEntry, Root, TreeBuilder,
};
use mycel_chunker::{Cid, Config};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The chunker identity of simulated content: small chunks, so objects of a few hundred KiB
/// have tens of chunks and a tree of index nodes.
pub fn chunker_config() -> Config {
    Config {
        chunk_bytes_min: 2048,
        chunk_bytes_avg: 8192,
        chunk_bytes_max: 32768,
        fanout_bits: 3,
        ..Config::default()
    }
}

/// An object: its root and every block, root block last.
#[derive(Debug)]
pub struct Object {
    /// The root CID.
    pub root: Cid,
    /// Content bytes.
    pub len: u64,
    /// Every block (chunks, index nodes, the root block).
    pub blocks: Vec<(Cid, Rc<[u8]>)>,
}

/// Cuts `len` pseudo-random bytes drawn from `seed` into an object. Objects of 256 KiB and
/// more are disk images with a run of zeroes in the middle (a hole).
pub fn generate(seed: u64, len: usize) -> Object {
    let config = chunker_config();
    let mut data = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    // Large objects are disk images with a hole in the middle.
    let disk = len >= 256 * 1024;
    if disk {
        let at = (len / 2) & !4095;
        data[at..at + 128 * 1024].fill(0);
    }
    let mut blocks = Vec::new();
    let mut tree = TreeBuilder::new(&config, true);
    let mut pieces = Vec::new();
    let mut seg = Segmenter::new(config.zero_run_bytes);
    seg.data(&data, &mut pieces);
    seg.finish(&mut pieces);
    let cutter = Cutter::new(&config);
    // The bytes between two holes are one CDC stream.
    let mut stream: Vec<u8> = Vec::new();
    let flush =
        |stream: &mut Vec<u8>, tree: &mut TreeBuilder, blocks: &mut Vec<(Cid, Rc<[u8]>)>| {
            let mut at = 0;
            for l in cutter.lengths(stream) {
                let chunk = &stream[at..at + l];
                at += l;
                let cid = Cid::raw(chunk);
                blocks.push((cid, Rc::from(chunk)));
                tree.push(NodeEntry::Chunk { len: l as u64, cid });
            }
            stream.clear();
        };
    for piece in pieces {
        match piece {
            Piece::Data(r) => stream.extend_from_slice(&data[r]),
            Piece::Zeros(n) => stream.resize(stream.len() + n as usize, 0),
            Piece::Hole(n) => {
                flush(&mut stream, &mut tree, &mut blocks);
                tree.push(NodeEntry::Hole { len: n });
            }
        }
    }
    flush(&mut stream, &mut tree, &mut blocks);
    let (t, total) = tree.finish();
    for b in tree.take_blocks() {
        blocks.push((b.cid, Rc::from(b.bytes)));
    }
    let kind = if disk { Kind::Disk } else { Kind::File };
    let root = Root { kind, config, len: total, tree: t }.encode();
    blocks.push((root.cid, Rc::from(root.bytes)));
    Object { root: root.cid, len: total, blocks }
}

/// A topology document: its canonical bytes (through the real canonicalisation), the
/// source bytes as an operator would write them, and the stored object of the canonical
/// bytes (kind topology, cut by the simulation's chunker identity).
#[derive(Debug)]
pub struct TopologyDoc {
    /// Canonical JSON bytes (what a stage command carries).
    pub canonical: Vec<u8>,
    /// BLAKE3 of the canonical bytes (what a router's applied file must hash to).
    pub hash: [u8; 32],
    /// The source file, as written (indented JSON), one raw block.
    pub source: (Cid, Rc<[u8]>),
    /// The canonical object.
    pub object: Object,
}

/// Version `version` of a router fleet's topology file, drawn from `seed`: routers with
/// an AS number and a loopback, links between them with costs (a few tens of KiB, so the
/// object has several chunks and index nodes).
pub fn topology_doc(seed: u64, version: u64, routers: u32) -> TopologyDoc {
    use mycel_chunker::topology::{Format, canonical_json, parse, render};
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ version.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let n = routers.clamp(2, 64);
    let mut text = String::from("{\"version\":");
    text += &version.to_string();
    text += ",\"routers\":[";
    for r in 0..n {
        if r > 0 {
            text.push(',');
        }
        text += &format!(
            "{{\"name\":\"r{r}\",\"asn\":{},\"loopback\":\"10.{}.{}.1\",\"role\":\"{}\"}}",
            64_512 + rng.next_u32() % 1000,
            r / 250,
            r % 250,
            if r % 4 == 0 { "spine" } else { "leaf" }
        );
    }
    text += "],\"links\":[";
    let links = 40 + rng.next_u32() % 200;
    for l in 0..links {
        if l > 0 {
            text.push(',');
        }
        let (a, b) = (rng.next_u32() % n, rng.next_u32() % n);
        text += &format!(
            "{{\"a\":\"r{a}\",\"b\":\"r{b}\",\"cost\":{},\"mtu\":9000,\"note\":\"link {l} of version {version}\"}}",
            1 + rng.next_u32() % 100
        );
    }
    text += "]}";
    let value = parse(text.as_bytes(), Format::Json).expect("generated JSON parses");
    let canonical = canonical_json(&value);
    let source_bytes = render(&value, Format::Json).expect("JSON renders");
    let object = topology_object(&canonical);
    TopologyDoc {
        hash: *blake3::hash(&canonical).as_bytes(),
        source: (Cid::raw(&source_bytes), Rc::from(source_bytes)),
        canonical,
        object,
    }
}

/// The stored object of canonical topology bytes (as `mycel add` stores a topology file):
/// its root is the one a stage command names (`mycel_chunker::topology::object_root`).
pub fn topology_object(canonical: &[u8]) -> Object {
    let config = chunker_config();
    let mut blocks = Vec::new();
    let mut tree = TreeBuilder::new(&config, true);
    let mut at = 0;
    for l in Cutter::new(&config).lengths(canonical) {
        let chunk = &canonical[at..at + l];
        at += l;
        let cid = Cid::raw(chunk);
        blocks.push((cid, Rc::from(chunk)));
        tree.push(NodeEntry::Chunk { len: l as u64, cid });
    }
    let (t, total) = tree.finish();
    for b in tree.take_blocks() {
        blocks.push((b.cid, Rc::from(b.bytes)));
    }
    let root = Root { kind: Kind::Topology, config, len: total, tree: t }.encode();
    blocks.push((root.cid, Rc::from(root.bytes)));
    Object { root: root.cid, len: total, blocks }
}

/// A node's block store as a [`BlockSource`] (blocks verified as they are read).
#[derive(Debug)]
pub struct StoreSource<'a>(pub &'a BTreeMap<Cid, Rc<[u8]>>);

impl BlockSource for StoreSource<'_> {
    fn block(&self, cid: &Cid) -> Result<Vec<u8>, ManifestError> {
        let b = self.0.get(cid).ok_or(ManifestError::Missing(*cid))?;
        if !cid.matches(b) {
            return Err(ManifestError::Missing(*cid));
        }
        Ok(b.to_vec())
    }
}

/// Every block CID of the object `root` in `store`, or `None` if one is missing or corrupt.
pub fn object_blocks(store: &BTreeMap<Cid, Rc<[u8]>>, root: &Cid) -> Option<Vec<Cid>> {
    walk_object(store, root, |cid| store.get(cid).is_some_and(|b| cid.matches(b)))
}

/// Every block CID of the object `root` in `store`, or `None` if one is missing: like
/// [`object_blocks`], but chunks are only looked up, not hashed (manifest blocks are read,
/// and verified as they are). For bookkeeping that must not cost a hash of every byte.
pub fn object_cids(store: &BTreeMap<Cid, Rc<[u8]>>, root: &Cid) -> Option<Vec<Cid>> {
    walk_object(store, root, |cid| store.contains_key(cid))
}

/// The root, every chunk (each accepted by `chunk_ok`) and every manifest node of `root`.
fn walk_object(
    store: &BTreeMap<Cid, Rc<[u8]>>,
    root: &Cid,
    chunk_ok: impl Fn(&Cid) -> bool,
) -> Option<Vec<Cid>> {
    let source = StoreSource(store);
    let r = manifest::read_root(&source, root).ok()?;
    let mut cids = vec![*root];
    let mut nodes = Vec::new();
    let mut visit = |c: &Cid, _: usize| nodes.push(*c);
    for entry in Leaves::new(&source, r.kind, r.tree, r.len).with_visitor(&mut visit) {
        match entry.ok()? {
            NodeEntry::Chunk { cid, .. } if chunk_ok(&cid) => cids.push(cid),
            NodeEntry::Hole { .. } => {}
            _ => return None,
        }
    }
    cids.extend(nodes);
    Some(cids)
}

/// Reassembles a file object (a snapshot's state) from a store.
pub fn read_file(store: &BTreeMap<Cid, Rc<[u8]>>, root: &Cid) -> Option<Vec<u8>> {
    let source = StoreSource(store);
    let r = manifest::read_root(&source, root).ok()?;
    let mut out = Vec::with_capacity(r.len as usize);
    for entry in Leaves::new(&source, r.kind, r.tree, r.len) {
        match entry.ok()? {
            NodeEntry::Chunk { cid, .. } => out.extend_from_slice(&source.block(&cid).ok()?),
            NodeEntry::Hole { len } => out.resize(out.len() + len as usize, 0),
            _ => return None,
        }
    }
    (out.len() as u64 == r.len).then_some(out)
}

/// Interns block bytes: stores holding the same block share one allocation.
#[derive(Debug, Default)]
pub struct Pool(BTreeMap<Cid, Rc<[u8]>>);

impl Pool {
    /// The shared copy of `bytes` if the pool holds identical bytes under `cid`; else a new
    /// allocation (recorded when `valid`: the caller checked the bytes match the CID).
    pub fn intern(&mut self, cid: Cid, bytes: &[u8], valid: bool) -> Rc<[u8]> {
        if let Some(b) = self.0.get(&cid)
            && **b == *bytes
        {
            return b.clone();
        }
        let b: Rc<[u8]> = Rc::from(bytes);
        if valid {
            self.0.insert(cid, b.clone());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_objects_read_back() {
        // An object with a hole reassembles to its length and every block is listed once.
        let o = generate(7, 600 * 1024);
        let store: BTreeMap<Cid, Rc<[u8]>> = o.blocks.iter().cloned().collect();
        let bytes = read_file(&store, &o.root).unwrap();
        assert_eq!(bytes.len() as u64, o.len);
        let cids = object_blocks(&store, &o.root).unwrap();
        assert_eq!(cids.len(), store.len());
    }

    #[test]
    fn topology_objects_have_the_root_a_stage_command_names() {
        // The stored object of a generated document has the root the managers recompute
        // from the canonical bytes, reads back to those bytes, and versions differ.
        let d = topology_doc(9, 1, 12);
        let root = mycel_chunker::topology::object_root(&d.canonical, &chunker_config()).unwrap();
        assert_eq!(root, d.object.root);
        assert!(d.object.blocks.len() > 3, "several chunks: {}", d.object.blocks.len());
        let store: BTreeMap<Cid, Rc<[u8]>> = d.object.blocks.iter().cloned().collect();
        assert_eq!(read_file(&store, &d.object.root).unwrap(), d.canonical);
        assert_ne!(topology_doc(9, 2, 12).hash, d.hash);
    }
}
