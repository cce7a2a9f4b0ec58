//! `mycel get` through a daemon: the object is written to its output while it is fetched.
//!
//! A fetch through the daemon stores every verified block; written afterwards, the output
//! would read the whole object back from the store (a second pass over the disk, most of a
//! one-peer transfer's time). Instead the daemon decodes the manifest blocks as they pass,
//! learns at which offsets each chunk belongs, and the store thread writes a verified chunk
//! into a temporary file beside the target as it stores it. When the fetch completes, a
//! final pass walks the stored manifest as `mycel get` does and writes every chunk that was
//! not written on the way (chunks already stored before the fetch, repeats of a chunk seen
//! earlier, subtrees shared by two parents), then syncs and renames the file into place. The
//! final pass is the authority: what was written early only saves it work, so the output
//! is exactly what a restore from the store writes.
//!
//! Files and disk images stream; directories and topology files are written by the usual
//! restore once the fetch completes (the caller is told nothing was written).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mycel_chunker::manifest::{Kind, Node, NodeEntry, Root};
use mycel_chunker::{Cid, Codec};

use crate::restore::{self, GetError, GetReport};
use crate::store::Store;

/// Chunk placements remembered ahead of their chunks, at most: past this the rest of the
/// object is written by the final pass (memory stays bounded for any object).
const PLACES_MAX: usize = 1 << 20;

/// The temporary output file, shared with the store thread that writes chunks into it.
#[derive(Debug)]
pub struct OutFile {
    file: File,
    /// Offset -> chunk, for every chunk written.
    written: Mutex<HashMap<u64, Cid>>,
}

impl OutFile {
    /// Writes a verified chunk at each of `offsets`; a failed write is left to the final
    /// pass (which reports the error if it fails again).
    pub fn write(&self, cid: Cid, bytes: &[u8], offsets: &[u64]) {
        for &off in offsets {
            if self.file.write_all_at(bytes, off).is_ok() {
                self.written.lock().expect("written lock").insert(off, cid);
            }
        }
    }
}

/// Where a chunk goes: written by the store thread after the chunk is stored.
#[derive(Debug)]
pub struct Placement {
    /// The output.
    pub out: Arc<OutFile>,
    /// Offsets of the chunk in the object.
    pub offsets: Vec<u64>,
}

impl Placement {
    /// Writes `bytes` (the verified chunk `cid`) at every offset.
    pub fn write(&self, cid: Cid, bytes: &[u8]) {
        self.out.write(cid, bytes, &self.offsets);
    }
}

/// An output being written while its object is fetched.
#[derive(Debug)]
pub struct LiveOutput {
    root: Cid,
    target: PathBuf,
    tmp: PathBuf,
    out: Arc<OutFile>,
    /// Known once the root block passes; `None` before.
    kind: Option<Kind>,
    /// Not streamed (a directory or topology file): nothing more is placed.
    off: bool,
    /// Index nodes not seen yet -> the offsets their content starts at.
    nodes: HashMap<Cid, Vec<u64>>,
    /// Chunks not arrived yet -> the offsets they go to.
    chunks: HashMap<Cid, Vec<u64>>,
    /// Renamed into place: nothing to remove on drop.
    finished: bool,
}

impl LiveOutput {
    /// Creates the temporary file beside `target` for object `root`.
    ///
    /// # Errors
    /// [`GetError::Output`] if it cannot be created.
    pub fn create(root: Cid, target: &Path) -> Result<LiveOutput, GetError> {
        let mut tmp = restore::temp_path(target).into_os_string();
        tmp.push(".live");
        let tmp = PathBuf::from(tmp);
        let file = restore::create_new(&tmp)?;
        Ok(LiveOutput {
            root,
            target: target.to_path_buf(),
            tmp,
            out: Arc::new(OutFile { file, written: Mutex::new(HashMap::new()) }),
            kind: None,
            off: false,
            nodes: HashMap::new(),
            chunks: HashMap::new(),
            finished: false,
        })
    }

    /// A manifest block: learn where the chunks it names go. Blocks that do not decode are
    /// ignored here (the fetch fails on them, and the final pass checks the whole tree).
    fn on_manifest(&mut self, cid: &Cid, bytes: &[u8]) {
        if self.off {
            return;
        }
        if *cid == self.root {
            let Ok(root) = Root::decode(*cid, bytes) else { return };
            self.kind = Some(root.kind);
            if !matches!(root.kind, Kind::File | Kind::Disk) {
                self.off = true;
                return;
            }
            if root.kind == Kind::File && root.len > 0 {
                self.reserve(root.len);
            }
            match root.tree {
                Some(t) if t.codec() == Codec::Raw => self.place_chunk(t, 0),
                Some(t) => self.nodes.entry(t).or_default().push(0),
                None => {}
            }
            return;
        }
        let (Some(kind), Some(starts)) = (self.kind, self.nodes.remove(cid)) else { return };
        let Ok(node) = Node::decode(*cid, bytes, kind) else { return };
        for start in starts {
            let mut off = start;
            for entry in &node.entries {
                match entry {
                    NodeEntry::Chunk { cid, .. } => self.place_chunk(*cid, off),
                    NodeEntry::Child { cid, .. } if self.chunks.len() < PLACES_MAX => {
                        self.nodes.entry(*cid).or_default().push(off);
                    }
                    _ => {}
                }
                off += entry.len();
            }
        }
    }

    /// Reserves a file's space on a thread of its own (disk images stay sparse): a full
    /// disk shows before the transfer rather than at its end, and the pages exist before
    /// the chunks are written into them. A failure only means the writes allocate.
    fn reserve(&self, len: u64) {
        let out = self.out.clone();
        let spawned = std::thread::Builder::new().name("mycel-reserve".into()).spawn(move || {
            use std::os::fd::AsRawFd;
            let len = libc::off_t::try_from(len).unwrap_or(libc::off_t::MAX);
            // SAFETY: fallocate on a descriptor the Arc keeps open; no memory is involved.
            let rc = unsafe { libc::fallocate(out.file.as_raw_fd(), 0, 0, len) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                tracing::debug!("reserving {len} bytes for an output: {e}");
            }
        });
        if let Err(e) = spawned {
            tracing::debug!("reserving space for an output: {e}");
        }
    }

    fn place_chunk(&mut self, cid: Cid, off: u64) {
        if self.chunks.len() < PLACES_MAX || self.chunks.contains_key(&cid) {
            self.chunks.entry(cid).or_default().push(off);
        }
    }

    /// A verified block of the object passed (fetched, or a manifest block read from the
    /// store): a manifest block teaches where chunks go; for a chunk, where to write it, if
    /// known.
    pub fn on_block(&mut self, cid: &Cid, bytes: &[u8]) -> Option<Placement> {
        if cid.codec() != Codec::Raw {
            self.on_manifest(cid, bytes);
            return None;
        }
        let offsets = self.chunks.remove(cid)?;
        Some(Placement { out: self.out.clone(), offsets })
    }

    /// After the fetch completed and every block is committed (so after every placement
    /// was written): writes what is missing, syncs, renames into place. `Ok(None)` if this
    /// kind of object is not streamed (the caller restores it the usual way).
    ///
    /// # Errors
    /// Missing or corrupt content, or an unwritable output.
    pub fn finish(mut self, store: &Store) -> Result<Option<GetReport>, GetError> {
        let root = restore::root(store, &self.root)?;
        if !matches!(root.kind, Kind::File | Kind::Disk) {
            return Ok(None);
        }
        let written = std::mem::take(&mut *self.out.written.lock().expect("written lock"));
        let mut report = GetReport {
            root: self.root.to_string(),
            kind: root.kind.to_string(),
            bytes: root.len,
            ..GetReport::default()
        };
        let progress = restore::Progress::default();
        let file = &self.out.file;
        let skip = |off: u64, cid: &Cid| written.get(&off) == Some(cid);
        restore::write_tree(store, &root, file, &self.tmp, &mut report, &progress, &skip)?;
        restore::sync_and_rename(file, &self.tmp, &self.target)?;
        self.finished = true;
        Ok(Some(report))
    }
}

impl Drop for LiveOutput {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{self, KindArg};
    use mycel_chunker::Config;
    use rand::{RngCore, SeedableRng};

    /// Every block of `root` in the order a fetch meets them: the root, then each node
    /// before what it names (shared blocks once).
    fn walk(store: &Store, root: Cid) -> Vec<(Cid, Vec<u8>)> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let bytes = store.get(&root).unwrap().unwrap();
        let r = Root::decode(root, &bytes).unwrap();
        out.push((root, bytes));
        let mut queue: std::collections::VecDeque<Cid> = r.tree.into_iter().collect();
        while let Some(cid) = queue.pop_front() {
            if !seen.insert(cid) {
                continue;
            }
            let bytes = store.get(&cid).unwrap().unwrap();
            if cid.codec() == Codec::DagCbor {
                for e in Node::decode(cid, &bytes, r.kind).unwrap().entries {
                    match e {
                        NodeEntry::Chunk { cid, .. } | NodeEntry::Child { cid, .. } => {
                            queue.push_back(cid);
                        }
                        _ => {}
                    }
                }
            }
            out.push((cid, bytes));
        }
        out
    }

    /// A disk image with a repeated region (repeated chunks and subtrees) and a zero run
    /// (a hole), cut small so the tree has several levels.
    fn image(dir: &Path) -> (Vec<u8>, PathBuf) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut a = vec![0u8; 20_000];
        rng.fill_bytes(&mut a);
        let mut b = vec![0u8; 30_000];
        rng.fill_bytes(&mut b);
        let mut content = a.clone();
        content.extend_from_slice(&[0u8; 3 * 4096 + 100]);
        content.extend_from_slice(&a);
        content.extend_from_slice(&b);
        content.extend_from_slice(&a);
        let path = dir.join("image.bin");
        std::fs::write(&path, &content).unwrap();
        (content, path)
    }

    fn tiny() -> Config {
        Config {
            chunk_bytes_min: 64,
            chunk_bytes_avg: 256,
            chunk_bytes_max: 1024,
            fanout_bits: 1,
            zero_run_bytes: 4096,
            ..Config::default()
        }
    }

    /// Adds `path` as `kind` to a fresh store in `dir`: the store and the root.
    fn source(dir: &Path, path: &Path, kind: KindArg) -> (Store, Cid) {
        let store = Store::open(&dir.join("src")).unwrap();
        let progress = ingest::Progress::default();
        let report = ingest::add(&store, path, kind, None, &tiny(), 0, &progress).unwrap();
        let root = report.root.parse().unwrap();
        (store, root)
    }

    /// Passes `blocks` through a live output as the daemon does (manifests decoded, chunks
    /// written where placed) while storing them; returns the offsets written early.
    fn pass(live: &mut LiveOutput, store: &Store, blocks: &[(Cid, Vec<u8>)]) -> usize {
        let mut early = 0;
        let mut w = store.writer().unwrap();
        for (cid, bytes) in blocks {
            w.put(*cid, bytes).unwrap();
            if let Some(p) = live.on_block(cid, bytes) {
                early += p.offsets.len();
                p.write(*cid, bytes);
            }
        }
        w.commit().unwrap();
        early
    }

    #[test]
    fn a_streamed_output_equals_the_restore_with_holes_repeats_and_local_chunks() {
        // Chunks are written as they pass; the final pass writes the rest (chunks stored
        // before the fetch, later places of repeated blocks) and leaves holes sparse. The
        // file and the report equal a restore's from the same store.
        let dir = tempfile::tempdir().unwrap();
        let (content, path) = image(dir.path());
        let (src, root) = source(dir.path(), &path, KindArg::Disk);
        let blocks = walk(&src, root);
        let chunks = blocks.iter().filter(|(c, _)| c.codec() == Codec::Raw).count();
        for local_every in [0usize, 3, 1] {
            let store = Store::open(&dir.path().join(format!("dst{local_every}"))).unwrap();
            // Every local_every-th chunk is in the store before the fetch and never passes.
            let (local, fetched): (Vec<_>, Vec<_>) =
                blocks.iter().cloned().enumerate().partition(|(i, (c, _))| {
                    local_every > 0 && c.codec() == Codec::Raw && i % local_every == 0
                });
            let mut w = store.writer().unwrap();
            for (_, (cid, bytes)) in &local {
                w.put(*cid, bytes).unwrap();
            }
            w.commit().unwrap();
            drop(w);
            let fetched: Vec<_> = fetched.into_iter().map(|(_, b)| b).collect();
            let out = dir.path().join(format!("out{local_every}.img"));
            let mut live = LiveOutput::create(root, &out).unwrap();
            let early = pass(&mut live, &store, &fetched);
            assert!(early > 0 || local_every == 1, "chunks are written as they pass");
            if local_every == 0 {
                assert!(early >= chunks, "every fetched chunk placed: {early} of {chunks}");
            }
            let report = live.finish(&store).unwrap().expect("a disk image streams");
            assert_eq!(std::fs::read(&out).unwrap(), content, "local_every {local_every}");
            let again = dir.path().join(format!("restored{local_every}.img"));
            let opts = restore::GetOptions::default();
            let progress = restore::Progress::default();
            let restored =
                restore::get(&store, &root, &again, &opts, &progress, &mut Vec::new()).unwrap();
            assert_eq!(report, restored);
            assert!(report.hole_bytes > 0);
        }
    }

    #[test]
    fn a_directory_is_left_to_the_restore_and_an_abandoned_output_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::fs::write(tree.join("f"), b"some bytes").unwrap();
        let (src, root) = source(dir.path(), &tree, KindArg::Dir);
        let blocks = walk(&src, root);
        let out = dir.path().join("out");
        let mut live = LiveOutput::create(root, &out).unwrap();
        assert_eq!(pass(&mut live, &src, &blocks), 0, "nothing of a directory is placed");
        assert_eq!(live.finish(&src).unwrap(), None);
        // A fetch that fails or is dropped removes its temporary file.
        let (_, path) = image(dir.path());
        let (src2, root2) = source(&dir.path().join("2"), &path, KindArg::Disk);
        let mut live = LiveOutput::create(root2, &out).unwrap();
        pass(&mut live, &src2, &walk(&src2, root2)[..3]);
        drop(live);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("mycel-tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(!out.exists());
    }
}
