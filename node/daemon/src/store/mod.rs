//! The embedded store: blocks (chunks and manifest nodes) in pack files, indexed by redb.
//!
//! Layout under the data directory: `store/index.redb` (the index: where each block lives,
//! the roots, how far each pack is committed) and `store/packs/NNNNNNNN.pack`.
//!
//! Group commit: a [`Writer`] appends blocks to packs, then [`Writer::commit`] syncs the
//! packs' data, syncs the packs directory if a pack was created, and only then commits the
//! index (redb, durable, with quick repair so a crash never forces a full-file repair). A
//! caller acknowledges nothing before `commit` returns. On open, pack bytes past the
//! committed length and packs the index does not know are discarded: they belong to writes
//! that never committed. Every block read back is checked against its CID.

mod batch;
pub use batch::{BATCH_BYTES, Batch};
pub mod crash;
pub mod pack;
pub mod vfs;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bincode::{Decode, Encode};
use mycel_chunker::manifest::{self, BlockSource, EntryType, Kind, ManifestError, NodeEntry};
use mycel_chunker::{Cid, Codec};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use mycel_chunker::codec;
use pack::{Location, PACK_BYTES_MAX, PACK_HEADER, RECORD_HEADER_BYTES};
use vfs::{OsVfs, RedbBackend, Vfs, VfsFile};

const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
const ROOTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("roots");
const PACKS: TableDefinition<u32, u64> = TableDefinition::new("packs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Root CID bytes -> the namespace it was added under here (`mycel add --namespace`): it
/// governs who may read the root from this node until a committed pin names one.
const NAMESPACES: TableDefinition<&[u8], &str> = TableDefinition::new("namespaces");

/// Store layout version, kept in the meta table. Version 2 index entries carry a CRC-32C
/// ([`Location::crc`]); a version 1 store is read as it is and marked 2 on open (its old
/// entries stay valid), so a build that reads only 1 refuses it rather than misreading it.
const STORE_VERSION: u8 = 2;
/// Root record format version.
const ROOT_RECORD_VERSION: u8 = 1;
/// redb page cache.
const CACHE_BYTES: usize = 256 << 20;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The filesystem failed (including a full disk: see [`StoreError::is_disk_full`]).
    #[error("store IO: {0}")]
    Io(#[from] io::Error),
    /// The index engine failed.
    #[error("store index: {0}")]
    Index(String),
    /// Another process holds the store.
    #[error("the store at {0} is in use by another mycel process")]
    Locked(PathBuf),
    /// Stored bytes do not match their CID, or a record is damaged.
    #[error("corrupt block {cid}: {what}")]
    Corrupt {
        /// The block.
        cid: Cid,
        /// What was wrong.
        what: String,
    },
    /// The store's own metadata is damaged or from another version.
    #[error("store metadata: {0}")]
    Metadata(String),
}

impl StoreError {
    /// Whether the failure is a full disk.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io(e) if e.kind() == io::ErrorKind::StorageFull)
            || matches!(self, StoreError::Index(m) if m.contains("No space left"))
    }
}

fn index_err(e: impl std::fmt::Display) -> StoreError {
    let message = e.to_string();
    StoreError::Index(message)
}

/// What the store knows about one root (an object added or fetched whole).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct RootRecord {
    /// Kind name (`file`, `dir`, `disk`, `topology`).
    pub kind: String,
    /// Content length.
    pub len: u64,
    /// Chunks referenced (with repeats).
    pub chunks: u64,
    /// Bytes of holes (disk images).
    pub hole_bytes: u64,
    /// Milliseconds since the Unix epoch when it was added.
    pub added_ms: u64,
    /// A label: the file name it was added from.
    pub name: String,
    /// Topology files: the root of the source bytes as given.
    pub source: Option<[u8; Cid::BYTES]>,
}

impl RootRecord {
    /// The source object's CID, if any.
    pub fn source_cid(&self) -> Option<Cid> {
        self.source.and_then(|b| Cid::from_bytes(&b).ok())
    }
}

/// Counts from [`Store::stats`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    /// Blocks indexed.
    pub blocks: u64,
    /// Bytes of indexed blocks.
    pub block_bytes: u64,
    /// Pack files.
    pub packs: u64,
    /// Bytes of pack files (live and garbage).
    pub pack_bytes: u64,
    /// Roots.
    pub roots: u64,
}

/// What [`Store::gc`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Blocks reachable from a root.
    pub live_blocks: u64,
    /// Blocks removed from the index.
    pub removed_blocks: u64,
    /// Bytes of removed blocks.
    pub removed_bytes: u64,
    /// Packs rewritten or deleted.
    pub packs_rewritten: u64,
    /// Pack bytes given back to the filesystem.
    pub reclaimed_bytes: u64,
}

#[derive(Debug)]
struct Packs {
    files: BTreeMap<u32, Arc<dyn VfsFile>>,
    /// The same packs opened for direct reads ([`Store::read_batch`]).
    direct: BTreeMap<u32, Arc<dyn VfsFile>>,
}

/// The chunk and manifest store.
#[derive(Debug)]
pub struct Store {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    db: Database,
    packs: Mutex<Packs>,
    /// Whether a [`Writer`] exists (a flag, not a guard, so a writer can move to a thread).
    writing: Mutex<bool>,
    writer_done: Condvar,
    /// Stage buffers of the last writer, for the next one: a writer per group commit would
    /// otherwise allocate and zero 8 MiB each time (a fetching node commits tens of times a
    /// second when blocks trickle in).
    stage_buffers: Mutex<Vec<AlignedBuf>>,
    /// Buffers of [`Store::read_batch`], handed back when a batch is dropped.
    read_buffers: Arc<Mutex<Vec<AlignedBuf>>>,
    _lock_file: Option<File>,
}

/// The tree check of serving reads manifest blocks through this (a damaged or unreadable block
/// counts as absent: the walk never serves it, it only decides what else may be served).
impl mycel_core::access::Blocks for Store {
    fn block(&self, cid: &Cid) -> Option<Vec<u8>> {
        self.get(cid).ok().flatten()
    }
}

impl Store {
    /// Opens (creating if needed) the store under `dir` on the real filesystem, taking an
    /// exclusive lock so two processes never write it at once.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process holds it; IO or metadata errors.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir.join("packs"))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options().create(true).truncate(false).write(true).open(&lock_path)?;
        // SAFETY: flock on a valid, owned file descriptor; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(StoreError::Locked(dir.to_path_buf()));
        }
        let mut store = Store::open_with(Arc::new(OsVfs), dir)?;
        store._lock_file = Some(lock);
        Ok(store)
    }

    /// Opens the store under `dir` through `vfs` (tests use a crashing one).
    ///
    /// # Errors
    /// IO, index or metadata errors.
    pub fn open_with(vfs: Arc<dyn Vfs>, dir: &Path) -> Result<Store, StoreError> {
        let packs_dir = dir.join("packs");
        vfs.create_dir_all(&packs_dir)?;
        let index_path = dir.join("index.redb");
        // The marker is written only once the index exists durably: without it, whatever
        // is there is the debris of an initialisation that crashed, and nothing in it was
        // ever acknowledged.
        let marker = dir.join("FORMAT");
        let initialised = vfs.exists(&marker);
        if !initialised && vfs.exists(&index_path) {
            vfs.remove(&index_path)?;
        }
        let file = vfs.open(&index_path, true)?;
        if !initialised {
            vfs.sync_dir(dir)?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(RedbBackend(file))
            .map_err(index_err)?;
        let store = Store {
            vfs,
            dir: dir.to_path_buf(),
            db,
            packs: Mutex::new(Packs { files: BTreeMap::new(), direct: BTreeMap::new() }),
            writing: Mutex::new(false),
            writer_done: Condvar::new(),
            stage_buffers: Mutex::new(Vec::new()),
            read_buffers: Arc::new(Mutex::new(Vec::new())),
            _lock_file: None,
        };
        store.init_tables()?;
        if !initialised {
            let file = store.vfs.open(&marker, true)?;
            file.write_at(format!("mycel-store {STORE_VERSION}\n").as_bytes(), 0)?;
            file.sync_data()?;
            store.vfs.sync_dir(dir)?;
        }
        store.recover_packs()?;
        Ok(store)
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(index_err)?;
        tx.set_quick_repair(true);
        {
            tx.open_table(CHUNKS).map_err(index_err)?;
            tx.open_table(ROOTS).map_err(index_err)?;
            tx.open_table(PACKS).map_err(index_err)?;
            tx.open_table(NAMESPACES).map_err(index_err)?;
            let mut meta = tx.open_table(META).map_err(index_err)?;
            let version = meta.get("version").map_err(index_err)?.map(|v| v.value().to_vec());
            match version.as_deref() {
                None | Some([1]) => {
                    meta.insert("version", [STORE_VERSION].as_slice()).map_err(index_err)?;
                }
                Some([STORE_VERSION]) => {}
                Some(other) => {
                    return Err(StoreError::Metadata(format!(
                        "store layout version {other:?}, this build reads 1 to {STORE_VERSION}"
                    )));
                }
            }
        }
        tx.commit().map_err(index_err)?;
        Ok(())
    }

    /// Cuts uncommitted tails off packs and deletes packs the index never committed.
    fn recover_packs(&self) -> Result<(), StoreError> {
        let committed = self.committed_packs()?;
        let packs_dir = self.dir.join("packs");
        let mut removed = false;
        for path in self.vfs.list(&packs_dir)? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            match pack::parse_file_name(name) {
                Some(n) if committed.contains_key(&n) => {}
                Some(_) => {
                    self.vfs.remove(&path)?;
                    removed = true;
                }
                None => {}
            }
        }
        if removed {
            self.vfs.sync_dir(&packs_dir)?;
        }
        for (&n, &len) in &committed {
            let file = self.pack_file(n)?;
            let actual = file.len()?;
            if actual < len {
                return Err(StoreError::Metadata(format!(
                    "pack {n} is {actual} bytes but {len} were committed: the disk lost synced data"
                )));
            }
            if actual > len {
                file.set_len(len)?;
                file.sync_data()?;
            }
        }
        Ok(())
    }

    fn committed_packs(&self) -> Result<BTreeMap<u32, u64>, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let table = tx.open_table(PACKS).map_err(index_err)?;
        let mut out = BTreeMap::new();
        for item in table.iter().map_err(index_err)? {
            let (k, v) = item.map_err(index_err)?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    fn pack_path(&self, n: u32) -> PathBuf {
        self.dir.join("packs").join(pack::file_name(n))
    }

    /// Pack `n` opened for direct reads (page-cache bypassing where the filesystem allows).
    fn direct_pack_file(&self, n: u32) -> Result<Arc<dyn VfsFile>, StoreError> {
        self.cached_pack(n, true)
    }

    fn pack_file(&self, n: u32) -> Result<Arc<dyn VfsFile>, StoreError> {
        self.cached_pack(n, false)
    }

    /// Pack `n`, opened once (for direct reads or buffered) and kept open.
    fn cached_pack(&self, n: u32, direct: bool) -> Result<Arc<dyn VfsFile>, StoreError> {
        let mut packs = self.lock_packs();
        let cache = if direct { &mut packs.direct } else { &mut packs.files };
        if let Some(f) = cache.get(&n) {
            return Ok(f.clone());
        }
        let path = self.pack_path(n);
        let file = if direct {
            self.vfs.open_direct(&path, false)?
        } else {
            self.vfs.open(&path, false)?
        };
        let file: Arc<dyn VfsFile> = Arc::from(file);
        cache.insert(n, file.clone());
        Ok(file)
    }

    fn release_writer(&self) {
        *self.writing.lock().expect("writer flag poisoned") = false;
        self.writer_done.notify_one();
    }

    fn lock_packs(&self) -> MutexGuard<'_, Packs> {
        self.packs.lock().expect("pack table lock poisoned")
    }

    /// Where a block lives, if stored.
    ///
    /// # Errors
    /// Index errors, or a damaged index value.
    pub fn locate(&self, cid: &Cid) -> Result<Option<Location>, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let table = tx.open_table(CHUNKS).map_err(index_err)?;
        let Some(value) = table.get(cid.digest()).map_err(index_err)? else {
            return Ok(None);
        };
        Location::decode(value.value())
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt { cid: *cid, what: "damaged index entry".into() })
    }

    /// Whether a block is stored.
    ///
    /// # Errors
    /// Index errors.
    pub fn has(&self, cid: &Cid) -> Result<bool, StoreError> {
        Ok(self.locate(cid)?.is_some())
    }

    /// A block's bytes, checked against its CID; `None` if not stored.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] if the stored bytes do not hash to the CID; IO errors.
    pub fn get(&self, cid: &Cid) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(loc) = self.locate(cid)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; loc.len as usize];
        self.read_verified(cid, &loc, &mut buf)?;
        Ok(Some(buf))
    }

    /// Reads a located block into `buf` (of exactly its length) and checks it.
    fn read_verified(&self, cid: &Cid, loc: &Location, buf: &mut [u8]) -> Result<(), StoreError> {
        let file = self.pack_file(loc.pack)?;
        file.read_at(buf, loc.offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt {
                    cid: *cid,
                    what: "pack is shorter than the index says".into(),
                }
            } else {
                StoreError::Io(e)
            }
        })?;
        if !cid.matches(buf) {
            return Err(StoreError::Corrupt { cid: *cid, what: "hash mismatch".into() });
        }
        Ok(())
    }

    /// Starts a group of writes; one writer at a time.
    ///
    /// # Errors
    /// IO or index errors opening the current pack.
    pub fn writer(&self) -> Result<Writer<'_>, StoreError> {
        {
            let mut busy = self.writing.lock().expect("writer flag poisoned");
            while *busy {
                busy = self.writer_done.wait(busy).expect("writer flag poisoned");
            }
            *busy = true;
        }
        let committed = match self.committed_packs() {
            Ok(c) => c,
            Err(e) => {
                self.release_writer();
                return Err(e);
            }
        };
        let (pack, end, created) = match committed.iter().next_back() {
            Some((&n, &len)) if len < PACK_BYTES_MAX => (n, len, false),
            Some((&n, _)) => (n + 1, 0, true),
            None => (0, 0, true),
        };
        let mut w = Writer {
            store: self,
            pack,
            end,
            file: None,
            touched: BTreeMap::new(),
            created_pack: false,
            pending: HashMap::new(),
            roots: Vec::new(),
            removed_roots: Vec::new(),
            namespaces: Vec::new(),
            stored_bytes: 0,
            stage: Stage::with_buffers(std::mem::take(
                &mut *self.stage_buffers.lock().expect("stage buffers lock poisoned"),
            )),
            chunks: None,
            dead: Vec::new(),
            dropped_packs: Vec::new(),
        };
        if created {
            w.start_pack(pack)?;
        } else {
            w.continue_pack(pack, end)?;
        }
        Ok(w)
    }

    /// Every root, in CID order.
    ///
    /// # Errors
    /// Index errors or a damaged record.
    pub fn roots(&self) -> Result<Vec<(Cid, RootRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let table = tx.open_table(ROOTS).map_err(index_err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(index_err)? {
            let (k, v) = item.map_err(index_err)?;
            let cid = Cid::from_bytes(k.value())
                .map_err(|e| StoreError::Metadata(format!("root key: {e}")))?;
            let record = codec::decode(ROOT_RECORD_VERSION, v.value())
                .map_err(|e| StoreError::Metadata(format!("root {cid}: {e}")))?;
            out.push((cid, record));
        }
        Ok(out)
    }

    /// The record of one root.
    ///
    /// # Errors
    /// Index errors or a damaged record.
    pub fn root(&self, cid: &Cid) -> Result<Option<RootRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let table = tx.open_table(ROOTS).map_err(index_err)?;
        let Some(v) = table.get(cid.to_bytes().as_slice()).map_err(index_err)? else {
            return Ok(None);
        };
        codec::decode(ROOT_RECORD_VERSION, v.value())
            .map(Some)
            .map_err(|e| StoreError::Metadata(format!("root {cid}: {e}")))
    }

    /// The namespace `cid` was added under here, if one was given (see [`Writer::set_namespace`]).
    ///
    /// # Errors
    /// Index errors.
    pub fn local_namespace(&self, cid: &Cid) -> Result<Option<String>, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let table = tx.open_table(NAMESPACES).map_err(index_err)?;
        Ok(table.get(cid.to_bytes().as_slice()).map_err(index_err)?.map(|v| v.value().to_owned()))
    }

    /// Counts of blocks, packs and roots.
    ///
    /// # Errors
    /// Index or IO errors.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let chunks = tx.open_table(CHUNKS).map_err(index_err)?;
        let roots = tx.open_table(ROOTS).map_err(index_err)?;
        let packs = tx.open_table(PACKS).map_err(index_err)?;
        let mut stats = Stats {
            blocks: chunks.len().map_err(index_err)?,
            roots: roots.len().map_err(index_err)?,
            ..Stats::default()
        };
        for item in chunks.iter().map_err(index_err)? {
            let (_, v) = item.map_err(index_err)?;
            if let Some(loc) = Location::decode(v.value()) {
                stats.block_bytes += u64::from(loc.len);
            }
        }
        for item in packs.iter().map_err(index_err)? {
            let (_, v) = item.map_err(index_err)?;
            stats.packs += 1;
            stats.pack_bytes += v.value();
        }
        Ok(stats)
    }

    /// Reads and checks every stored block; calls `progress(bytes)` as it goes and returns
    /// the bad ones with the reason.
    ///
    /// # Errors
    /// Index errors (bad blocks are results, not errors).
    pub fn verify_all(
        &self,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(u64, Vec<(Cid, String)>), StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let table = tx.open_table(CHUNKS).map_err(index_err)?;
        let mut bad = Vec::new();
        let mut checked = 0;
        let mut buf = Vec::new();
        for item in table.iter().map_err(index_err)? {
            let (k, v) = item.map_err(index_err)?;
            let digest = *k.value();
            checked += 1;
            let Some(loc) = Location::decode(v.value()) else {
                bad.push((Cid::from_digest(Codec::Raw, digest), "damaged index entry".into()));
                continue;
            };
            let cid = Cid::from_digest(loc.codec, digest);
            buf.resize(loc.len as usize, 0);
            match self.read_verified(&cid, &loc, &mut buf) {
                // The bytes are right, so the entry's checksum is what is damaged: the block
                // would not be served. (Without a CRC, `check` is the hash just compared.)
                Ok(()) if loc.crc.is_some() && !loc.check(&cid, &buf) => {
                    bad.push((cid, "damaged index entry (checksum)".into()));
                }
                Ok(()) => {}
                Err(StoreError::Corrupt { what, .. }) => bad.push((cid, what)),
                Err(StoreError::Io(e)) => bad.push((cid, format!("unreadable: {e}"))),
                Err(e) => return Err(e),
            }
            progress(u64::from(loc.len));
        }
        Ok((checked, bad))
    }

    /// Every block reachable from every root: root blocks, index nodes, chunks, directory
    /// children and topology sources. Missing or unreadable blocks are skipped here (verify
    /// reports them).
    fn mark(&self) -> Result<HashSet<[u8; 32]>, StoreError> {
        let mut live = HashSet::new();
        for (cid, record) in self.roots()? {
            self.mark_object(&cid, &mut live);
            if let Some(source) = record.source_cid() {
                self.mark_object(&source, &mut live);
            }
        }
        Ok(live)
    }

    fn mark_object(&self, root: &Cid, live: &mut HashSet<[u8; 32]>) {
        live.insert(*root.digest());
        let Ok(r) = manifest::read_root(self, root) else {
            return;
        };
        self.mark_tree(r.kind, r.tree, r.len, live);
    }

    fn mark_tree(&self, kind: Kind, tree: Option<Cid>, len: u64, live: &mut HashSet<[u8; 32]>) {
        let mut nodes: Vec<[u8; 32]> = Vec::new();
        let mut children: Vec<(Kind, Option<Cid>, u64)> = Vec::new();
        {
            let mut visit = |cid: &Cid, _: usize| nodes.push(*cid.digest());
            let leaves = manifest::Leaves::new(self, kind, tree, len).with_visitor(&mut visit);
            for entry in leaves {
                match entry {
                    Ok(NodeEntry::Chunk { cid, .. }) => {
                        live.insert(*cid.digest());
                    }
                    Ok(NodeEntry::Dir(d)) => match d.entry_type {
                        EntryType::File => children.push((Kind::File, d.cid, d.len)),
                        EntryType::Dir => children.push((Kind::Dir, d.cid, d.len)),
                        EntryType::Symlink => {}
                    },
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        if let Some(t) = tree {
            live.insert(*t.digest());
        }
        live.extend(nodes);
        for (kind, tree, len) in children {
            self.mark_tree(kind, tree, len, live);
        }
    }

    /// Removes every block no root reaches, and rewrites packs that became mostly garbage.
    ///
    /// # Errors
    /// IO or index errors; the store stays consistent whatever step fails.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let live = self.mark()?;
        let mut report = GcReport { live_blocks: live.len() as u64, ..GcReport::default() };
        // Per pack: live bytes (records included) and the live blocks to move.
        let mut dead: Vec<[u8; 32]> = Vec::new();
        let mut live_by_pack: BTreeMap<u32, (u64, Vec<(Cid, Location)>)> = BTreeMap::new();
        {
            let tx = self.db.begin_read().map_err(index_err)?;
            let table = tx.open_table(CHUNKS).map_err(index_err)?;
            for item in table.iter().map_err(index_err)? {
                let (k, v) = item.map_err(index_err)?;
                let digest = *k.value();
                let Some(loc) = Location::decode(v.value()) else {
                    dead.push(digest);
                    continue;
                };
                if live.contains(&digest) {
                    let e = live_by_pack.entry(loc.pack).or_default();
                    e.0 += u64::from(loc.len) + RECORD_HEADER_BYTES;
                    e.1.push((Cid::from_digest(loc.codec, digest), loc));
                } else {
                    dead.push(digest);
                    report.removed_bytes += u64::from(loc.len);
                }
            }
        }
        report.removed_blocks = dead.len() as u64;
        let committed = self.committed_packs()?;
        let mut w = self.writer()?;
        let current = w.pack;
        // Packs under half live are rewritten (their live blocks move to the current pack).
        let mut rewrite = Vec::new();
        for (&n, &len) in &committed {
            if n == current {
                continue;
            }
            let live_bytes = live_by_pack.get(&n).map_or(0, |e| e.0);
            if live_bytes * 2 < len {
                rewrite.push(n);
                report.reclaimed_bytes += len - live_bytes;
            }
        }
        let mut buf = Vec::new();
        for &n in &rewrite {
            for (cid, loc) in live_by_pack.get(&n).map(|e| e.1.as_slice()).unwrap_or_default() {
                buf.resize(loc.len as usize, 0);
                self.read_verified(cid, loc, &mut buf)?;
                w.relocate(*cid, &buf)?;
            }
        }
        w.dead = dead;
        w.dropped_packs = rewrite.clone();
        w.commit()?;
        drop(w);
        // The index no longer names the rewritten packs: delete them.
        {
            let mut packs = self.lock_packs();
            for n in &rewrite {
                packs.files.remove(n);
                packs.direct.remove(n);
            }
        }
        for n in &rewrite {
            self.vfs.remove(&self.pack_path(*n))?;
        }
        if !rewrite.is_empty() {
            self.vfs.sync_dir(&self.dir.join("packs"))?;
        }
        report.packs_rewritten = rewrite.len() as u64;
        Ok(report)
    }

    /// Removes a root record (its blocks go at the next [`Store::gc`]).
    ///
    /// # Errors
    /// IO or index errors.
    pub fn remove_root(&self, cid: &Cid) -> Result<bool, StoreError> {
        self.remove_root_inner(cid)
    }

    /// Bytes of pack files, live and garbage: what the store occupies on disk (cheap: one
    /// row per pack).
    ///
    /// # Errors
    /// Index errors.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let packs = tx.open_table(PACKS).map_err(index_err)?;
        let mut total = 0;
        for item in packs.iter().map_err(index_err)? {
            total += item.map_err(index_err)?.1.value();
        }
        Ok(total)
    }

    fn remove_root_inner(&self, cid: &Cid) -> Result<bool, StoreError> {
        if self.root(cid)?.is_none() {
            return Ok(false);
        }
        let mut w = self.writer()?;
        w.removed_roots.push(*cid);
        w.commit()?;
        Ok(true)
    }
}

impl BlockSource for Store {
    fn block(&self, cid: &Cid) -> Result<Vec<u8>, ManifestError> {
        match self.get(cid) {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err(ManifestError::Missing(*cid)),
            Err(StoreError::Corrupt { .. }) => Err(ManifestError::Corrupt(*cid)),
            Err(e) => Err(ManifestError::Source { cid: *cid, message: e.to_string() }),
        }
    }
}

/// A group of writes, made durable together by [`Writer::commit`].
#[derive(Debug)]
pub struct Writer<'a> {
    store: &'a Store,
    pack: u32,
    end: u64,
    file: Option<Arc<dyn VfsFile>>,
    touched: BTreeMap<u32, (Arc<dyn VfsFile>, u64)>,
    created_pack: bool,
    pending: HashMap<[u8; 32], Location>,
    roots: Vec<(Cid, RootRecord)>,
    removed_roots: Vec<Cid>,
    namespaces: Vec<(Cid, String)>,
    stored_bytes: u64,
    /// Pack bytes not yet written, starting at a 4 KiB-aligned file offset.
    stage: Stage,
    /// A read view of the index for dedup checks, refreshed after each commit.
    chunks: Option<redb::ReadOnlyTable<&'static [u8; 32], &'static [u8]>>,
    /// Blocks GC removes from the index at commit.
    dead: Vec<[u8; 32]>,
    /// Packs GC drops from the index at commit.
    dropped_packs: Vec<u32>,
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        let buffers = self.stage.take_buffers();
        *self.store.stage_buffers.lock().expect("stage buffers lock poisoned") = buffers;
        self.store.release_writer();
    }
}

impl Writer<'_> {
    fn start_pack(&mut self, n: u32) -> Result<(), StoreError> {
        if self.file.is_some() {
            // Finish the previous pack: its padded tail goes out with the rest.
            self.flush_stage(true)?;
        }
        let path = self.store.pack_path(n);
        let file: Arc<dyn VfsFile> = Arc::from(self.store.vfs.open_direct(&path, true)?);
        file.set_len(0)?;
        self.pack = n;
        self.stage.reset(0);
        self.stage.push(&PACK_HEADER, &[]);
        self.end = PACK_HEADER.len() as u64;
        self.file = Some(file.clone());
        self.touched.insert(n, (file, self.end));
        self.created_pack = true;
        Ok(())
    }

    /// Appends to an existing pack from its committed end: the partial last 4 KiB block is
    /// read back into the stage so writes stay aligned.
    fn continue_pack(&mut self, n: u32, end: u64) -> Result<(), StoreError> {
        let file: Arc<dyn VfsFile> =
            Arc::from(self.store.vfs.open_direct(&self.store.pack_path(n), false)?);
        let aligned = end / STAGE_ALIGN as u64 * STAGE_ALIGN as u64;
        self.stage.reset(aligned);
        let partial = (end - aligned) as usize;
        if partial > 0 {
            let mut head = vec![0u8; partial];
            self.store.pack_file(n)?.read_at(&mut head, aligned)?;
            self.stage.push(&head, &[]);
        }
        self.pack = n;
        self.end = end;
        self.file = Some(file);
        Ok(())
    }

    /// Writes the stage's whole blocks (and with `pad`, the partial last block padded with
    /// zeros past the logical end, which recovery cuts off), keeping the partial block.
    fn flush_stage(&mut self, pad: bool) -> Result<(), StoreError> {
        let file = self.file.clone().expect("writer has a pack");
        let written = self.stage.flush(&file, pad)?;
        if written {
            self.touched.insert(self.pack, (file, self.end));
        }
        Ok(())
    }

    /// Bytes newly written to packs by this writer.
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes
    }

    /// Whether a block is stored or pending in this writer.
    ///
    /// # Errors
    /// Index errors.
    pub fn contains(&mut self, cid: &Cid) -> Result<bool, StoreError> {
        if self.pending.contains_key(cid.digest()) {
            return Ok(true);
        }
        if self.chunks.is_none() {
            let tx = self.store.db.begin_read().map_err(index_err)?;
            self.chunks = Some(tx.open_table(CHUNKS).map_err(index_err)?);
        }
        let table = self.chunks.as_ref().expect("opened above");
        Ok(table.get(cid.digest()).map_err(index_err)?.is_some())
    }

    /// Appends a block unless it is already stored; returns whether it was new. The caller
    /// has computed `cid` from `bytes`.
    ///
    /// # Errors
    /// IO errors (a full disk among them).
    pub fn put(&mut self, cid: Cid, bytes: &[u8]) -> Result<bool, StoreError> {
        if self.contains(&cid)? {
            return Ok(false);
        }
        self.append(cid, bytes)?;
        Ok(true)
    }

    fn append(&mut self, cid: Cid, bytes: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(bytes.len()).expect("blocks are at most 1 MiB");
        assert!(bytes.len() <= mycel_chunker::NODE_BYTES_MAX, "cid={cid} len={len}");
        if self.end >= PACK_BYTES_MAX {
            self.start_pack(self.pack + 1)?;
        }
        let record = RECORD_HEADER_BYTES as usize + bytes.len();
        if !self.stage.fits(record) {
            self.flush_stage(false)?;
        }
        assert!(self.stage.fits(record), "stage too small for {record} bytes");
        self.stage.push(&pack::record_header(&cid, len), bytes);
        let loc = Location {
            pack: self.pack,
            offset: self.end + RECORD_HEADER_BYTES,
            len,
            codec: cid.codec(),
            crc: Some(pack::crc32c(bytes)),
        };
        self.end += record as u64;
        assert_eq!(self.end, self.stage.end(), "stage and pack end agree");
        let file = self.file.clone().expect("writer has a pack");
        self.touched.insert(self.pack, (file, self.end));
        self.pending.insert(*cid.digest(), loc);
        self.stored_bytes += u64::from(len);
        Ok(())
    }

    fn relocate(&mut self, cid: Cid, bytes: &[u8]) -> Result<(), StoreError> {
        self.pending.remove(cid.digest());
        self.append(cid, bytes)
    }

    /// Records a root, committed with the blocks.
    pub fn add_root(&mut self, cid: Cid, record: RootRecord) {
        self.roots.push((cid, record));
    }

    /// Records the namespace a root is added under, committed with it (so it is never
    /// served without this answer to "who may read it").
    pub fn set_namespace(&mut self, cid: Cid, namespace: &str) {
        self.namespaces.push((cid, namespace.to_owned()));
    }

    /// Makes everything written so far durable: pack data, then the packs directory (for a
    /// new pack), then the index. Nothing may be acknowledged before this returns `Ok`.
    ///
    /// # Errors
    /// IO or index errors; then nothing of this group is acknowledged, and the uncommitted
    /// bytes are discarded on the next open.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        self.flush_stage(true)?;
        for (file, _) in self.touched.values() {
            file.sync_data()?;
        }
        if std::mem::take(&mut self.created_pack) {
            self.store.vfs.sync_dir(&self.store.dir.join("packs"))?;
        }
        let mut tx = self.store.db.begin_write().map_err(index_err)?;
        tx.set_quick_repair(true);
        tx.set_durability(Durability::Immediate).map_err(index_err)?;
        {
            let mut chunks = tx.open_table(CHUNKS).map_err(index_err)?;
            for (digest, loc) in &self.pending {
                chunks.insert(digest, loc.encode().as_slice()).map_err(index_err)?;
            }
            for digest in &self.dead {
                chunks.remove(digest).map_err(index_err)?;
            }
            let mut packs = tx.open_table(PACKS).map_err(index_err)?;
            for (n, (_, end)) in &self.touched {
                packs.insert(*n, *end).map_err(index_err)?;
            }
            for n in &self.dropped_packs {
                packs.remove(*n).map_err(index_err)?;
            }
            let mut roots = tx.open_table(ROOTS).map_err(index_err)?;
            for (cid, record) in &self.roots {
                let value = codec::encode(ROOT_RECORD_VERSION, record);
                roots.insert(cid.to_bytes().as_slice(), value.as_slice()).map_err(index_err)?;
            }
            let mut namespaces = tx.open_table(NAMESPACES).map_err(index_err)?;
            for (cid, ns) in &self.namespaces {
                namespaces.insert(cid.to_bytes().as_slice(), ns.as_str()).map_err(index_err)?;
            }
            for cid in &self.removed_roots {
                roots.remove(cid.to_bytes().as_slice()).map_err(index_err)?;
                namespaces.remove(cid.to_bytes().as_slice()).map_err(index_err)?;
            }
        }
        tx.commit().map_err(index_err)?;
        self.pending.clear();
        self.roots.clear();
        self.removed_roots.clear();
        self.namespaces.clear();
        self.dead.clear();
        self.dropped_packs.clear();
        self.chunks = None;
        self.touched.retain(|&n, _| n == self.pack);
        Ok(())
    }
}

/// Alignment of staged pack writes (and of O_DIRECT IO).
const STAGE_ALIGN: usize = 4096;
/// Bytes staged before a write; more than the largest record plus one partial block.
const STAGE_BYTES: usize = 8 << 20;
const _: () = assert!(STAGE_BYTES > mycel_chunker::NODE_BYTES_MAX + 2 * STAGE_ALIGN + 64);
/// Stage writes in flight at once. O_DIRECT writes block their thread until the device has
/// the data; two at a time keep the device busy while the caller fills the next stage (on
/// the benchmark machine's virtio disk, 2 concurrent 8 MiB writes move ~1.4x the bytes of
/// one).
const WRITES_IN_FLIGHT: usize = 2;

/// `STAGE_BYTES` of 4 KiB-aligned memory.
#[derive(Debug)]
struct AlignedBuf {
    raw: Vec<u8>,
    base: usize,
    len: usize,
}

impl AlignedBuf {
    fn new() -> AlignedBuf {
        AlignedBuf::with_len(STAGE_BYTES)
    }

    /// `len` bytes (a multiple of [`STAGE_ALIGN`]) of aligned memory.
    fn with_len(len: usize) -> AlignedBuf {
        debug_assert!(len.is_multiple_of(STAGE_ALIGN));
        let raw = vec![0u8; len + STAGE_ALIGN];
        let base = raw.as_ptr().align_offset(STAGE_ALIGN);
        assert!(base < STAGE_ALIGN);
        AlignedBuf { raw, base, len }
    }

    /// A placeholder for a buffer handed back ([`Stage::take_buffers`]); never written.
    fn empty() -> AlignedBuf {
        AlignedBuf { raw: Vec::new(), base: 0, len: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.base..self.base + self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.base..self.base + self.len]
    }
}

/// A write of whole blocks under way on its own thread; gives its buffer back.
type InFlight = std::thread::JoinHandle<(AlignedBuf, io::Result<()>)>;

/// A page-aligned buffer of pack bytes that starts at an aligned file offset, so pack
/// files can be written with O_DIRECT (no page-cache copy, no CPU spent on writeback).
/// Full buffers are written by threads of their own, [`WRITES_IN_FLIGHT`] at most, while
/// the next buffer fills; [`Stage::flush`] with `pad` (before a sync) waits for them all.
#[derive(Debug)]
struct Stage {
    buf: AlignedBuf,
    len: usize,
    file_offset: u64,
    in_flight: std::collections::VecDeque<InFlight>,
    spare: Vec<AlignedBuf>,
}

impl Stage {
    /// A stage using buffers a previous stage gave back (none: a fresh one).
    fn with_buffers(mut buffers: Vec<AlignedBuf>) -> Stage {
        let buf = buffers.pop().unwrap_or_else(AlignedBuf::new);
        Stage {
            buf,
            len: 0,
            file_offset: 0,
            in_flight: std::collections::VecDeque::new(),
            spare: buffers,
        }
    }

    /// Waits for the writes in flight and hands every buffer back; the stage is not used
    /// after this (its writer is being dropped).
    fn take_buffers(&mut self) -> Vec<AlignedBuf> {
        let _ = self.wait_all();
        let mut buffers = std::mem::take(&mut self.spare);
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        if !buf.raw.is_empty() {
            buffers.push(buf);
        }
        buffers
    }

    fn reset(&mut self, file_offset: u64) {
        assert!(file_offset.is_multiple_of(STAGE_ALIGN as u64), "offset={file_offset}");
        self.len = 0;
        self.file_offset = file_offset;
    }

    fn end(&self) -> u64 {
        self.file_offset + self.len as u64
    }

    fn fits(&self, n: usize) -> bool {
        self.len + n <= STAGE_BYTES
    }

    fn push(&mut self, a: &[u8], b: &[u8]) {
        let at = self.len;
        let bytes = self.buf.bytes_mut();
        bytes[at..at + a.len()].copy_from_slice(a);
        bytes[at + a.len()..at + a.len() + b.len()].copy_from_slice(b);
        self.len += a.len() + b.len();
    }

    /// Waits for the oldest write in flight; its error, if it failed.
    fn wait_one(&mut self) -> io::Result<()> {
        let Some(handle) = self.in_flight.pop_front() else { return Ok(()) };
        let (buf, result) =
            handle.join().map_err(|_| io::Error::other("a pack write thread panicked"))?;
        self.spare.push(buf);
        result
    }

    /// Waits for every write in flight; the first error.
    fn wait_all(&mut self) -> io::Result<()> {
        let mut first = Ok(());
        while !self.in_flight.is_empty() {
            let r = self.wait_one();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Writes whole blocks (and with `pad` the last partial one, zero-padded); returns
    /// whether anything was written. The partial block stays staged. Without `pad` the
    /// write may still be in flight on return (its error comes from a later call); with
    /// `pad` every write of this stage has reached the file.
    fn flush(&mut self, file: &Arc<dyn VfsFile>, pad: bool) -> io::Result<bool> {
        let whole = self.len / STAGE_ALIGN * STAGE_ALIGN;
        if pad {
            self.wait_all()?;
            let write_len = self.len.div_ceil(STAGE_ALIGN) * STAGE_ALIGN;
            if write_len == 0 {
                return Ok(false);
            }
            let (len, bytes) = (self.len, self.buf.bytes_mut());
            bytes[len..write_len].fill(0);
            file.write_at(&bytes[..write_len], self.file_offset)?;
            if whole > 0 {
                bytes.copy_within(whole..len, 0);
                self.file_offset += whole as u64;
                self.len -= whole;
            }
            return Ok(true);
        }
        if whole == 0 {
            return Ok(false);
        }
        while self.in_flight.len() >= WRITES_IN_FLIGHT {
            self.wait_one()?;
        }
        // The partial block moves to the front of a fresh buffer; the full one goes out.
        let mut next = self.spare.pop().unwrap_or_else(AlignedBuf::new);
        next.bytes_mut()[..self.len - whole].copy_from_slice(&self.buf.bytes()[whole..self.len]);
        let full = std::mem::replace(&mut self.buf, next);
        let (file, offset) = (file.clone(), self.file_offset);
        self.in_flight.push_back(std::thread::spawn(move || {
            let result = file.write_at(&full.bytes()[..whole], offset);
            (full, result)
        }));
        self.file_offset += whole as u64;
        self.len -= whole;
        Ok(true)
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        // An abandoned writer's bytes are never acknowledged; its threads still finish
        // before the files they write can be reused.
        let _ = self.wait_all();
    }
}

#[cfg(test)]
mod tests;
