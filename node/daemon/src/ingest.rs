//! `mycel add`: files, disk images, directories and topology files into the store.
//!
//! A large file or image goes through a two-thread pipeline so both cores work: the reader
//! thread reads into reused page-aligned buffers, classifies holes (disk images) and finds
//! FastCDC cut points; the writer thread hashes each chunk, skips chunks already stored,
//! appends new ones to the pack, and builds the manifest tree. Buffers circulate through a
//! small pool, so memory stays bounded and reads never fault in fresh pages.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use mycel_chunker::cdc::Cutter;
use mycel_chunker::holes::{Piece, Segmenter};
use mycel_chunker::manifest::{
    self, Block, DirEntry, EntryType, Kind, NodeEntry, Root, TARGET_BYTES_MAX, TreeBuilder,
};
use mycel_chunker::{Cid, Config, HOLE_ALIGN_BYTES, topology};

use crate::store::{RootRecord, Store, StoreError, Writer};

/// Bytes per pipeline batch.
const BATCH_BYTES: usize = 8 << 20;
/// Room before each batch for the unfinished chunk carried over from the previous one.
const CARRY_BYTES: usize = 1 << 20;
/// Buffers in circulation (bounds the pipeline's memory to about 4 x 9 MiB).
const POOL_BUFFERS: usize = 4;
/// Files at most this large are chunked inline, without the pipeline threads.
const INLINE_BYTES_MAX: u64 = 4 << 20;
/// Largest topology file accepted.
pub const TOPOLOGY_BYTES_MAX: u64 = 64 << 20;
/// New bytes between intermediate commits of a long add.
const COMMIT_EVERY_BYTES: u64 = 1 << 30;

const _: () = assert!(CARRY_BYTES >= mycel_chunker::NODE_BYTES_MAX);
const _: () = assert!(BATCH_BYTES.is_multiple_of(HOLE_ALIGN_BYTES as usize));

/// What to treat the input as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Decide from the path: directory, block device, image extension or sparse file,
    /// topology extension, else file.
    Auto,
    /// A plain file.
    File,
    /// A directory tree.
    Dir,
    /// A disk image or block device.
    Disk,
    /// A topology file (JSON, YAML or TOML).
    Topology,
}

/// Why an add failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddError {
    /// The input could not be read.
    #[error("{path}: {source}")]
    Input {
        /// The path.
        path: String,
        /// The IO error.
        source: io::Error,
    },
    /// The input is not what was asked for, or not valid.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn input_err(path: &Path) -> impl FnOnce(io::Error) -> AddError + '_ {
    move |source| AddError::Input { path: path.display().to_string(), source }
}

/// The outcome of an add.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AddReport {
    /// The root CID.
    pub root: String,
    /// The kind stored.
    pub kind: String,
    /// Content bytes (directories: the sum of file bytes).
    pub bytes: u64,
    /// Chunks referenced.
    pub chunks: u64,
    /// Bytes newly written to the store (chunks and manifest nodes).
    pub stored_bytes: u64,
    /// Bytes of holes (disk images).
    pub hole_bytes: u64,
    /// Directories: files stored.
    pub files: u64,
    /// Topology files: the format it was read as and the root of the source bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_format: Option<String>,
    /// Topology files: the root of the source bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_root: Option<String>,
}

/// Counters shared with the progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Input bytes consumed.
    pub bytes: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    chunks: u64,
    hole_bytes: u64,
    files: u64,
}

/// Adds `path` (or standard input for `-`) to the store; `namespace`, when given, is
/// recorded with the root ([`crate::store::Writer::set_namespace`]) in the same commit.
///
/// # Errors
/// [`AddError`]: unreadable input, invalid topology, store failures. Nothing is
/// acknowledged unless the whole add committed.
pub fn add(
    store: &Store,
    path: &Path,
    kind: KindArg,
    namespace: Option<&str>,
    config: &Config,
    now_ms: u64,
    progress: &Progress,
) -> Result<AddReport, AddError> {
    config.validate().map_err(|e| AddError::Invalid(format!("chunker config: {e}")))?;
    let stdin = path == Path::new("-");
    let kind = if stdin {
        match kind {
            KindArg::Auto | KindArg::File => Kind::File,
            KindArg::Topology => Kind::Topology,
            KindArg::Disk => Kind::Disk,
            KindArg::Dir => {
                return Err(AddError::Invalid("a directory cannot come from stdin".into()));
            }
        }
    } else {
        resolve_kind(path, kind)?
    };
    let name = if stdin {
        "-".to_string()
    } else {
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let mut w = store.writer()?;
    let mut counts = Counts::default();
    let mut report = AddReport { kind: kind.to_string(), ..AddReport::default() };
    let mut source = None;
    let (tree, len) = match kind {
        Kind::File | Kind::Disk if stdin => {
            chunk_stream(io::stdin(), None, kind, config, &mut w, &mut counts, progress)?
        }
        Kind::File | Kind::Disk => {
            let file = File::open(path).map_err(input_err(path))?;
            let size = source_size(&file).map_err(input_err(path))?;
            if kind == Kind::File && size <= INLINE_BYTES_MAX {
                chunk_small(file, size, config, &mut w, &mut counts, progress)
                    .map_err(|e| lift(e, path))?
            } else {
                chunk_stream(file, Some(size), kind, config, &mut w, &mut counts, progress)
                    .map_err(|e| lift(e, path))?
            }
        }
        Kind::Dir => {
            let (tree, len) = add_dir(path, config, &mut w, &mut counts, progress)?;
            (tree, len)
        }
        Kind::Topology => {
            let mut bytes = Vec::new();
            if stdin {
                io::stdin()
                    .lock()
                    .take(TOPOLOGY_BYTES_MAX + 1)
                    .read_to_end(&mut bytes)
                    .map_err(input_err(path))?;
            } else {
                File::open(path)
                    .map_err(input_err(path))?
                    .take(TOPOLOGY_BYTES_MAX + 1)
                    .read_to_end(&mut bytes)
                    .map_err(input_err(path))?;
            }
            if bytes.len() as u64 > TOPOLOGY_BYTES_MAX {
                return Err(AddError::Invalid(format!(
                    "{}: topology files are limited to {} MiB",
                    path.display(),
                    TOPOLOGY_BYTES_MAX >> 20
                )));
            }
            let file_name = if stdin { None } else { Some(name.as_str()) };
            let format = topology::detect(file_name, &bytes).ok_or_else(|| {
                AddError::Invalid(format!(
                    "{}: not recognisable as JSON, YAML or TOML",
                    path.display()
                ))
            })?;
            let value = topology::parse(&bytes, format)
                .map_err(|e| AddError::Invalid(format!("{}: {e}", path.display())))?;
            let canonical = topology::canonical_json(&value);
            progress.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            // The source bytes as given, kept beside the canonical form.
            let mut source_counts = Counts::default();
            let (src_tree, src_len) =
                chunk_bytes(&bytes, Kind::File, config, &mut w, &mut source_counts)?;
            let src_root =
                Root { kind: Kind::File, config: *config, len: src_len, tree: src_tree }.encode();
            w.put(src_root.cid, &src_root.bytes)?;
            source = Some(src_root.cid);
            report.source_format = Some(format.to_string());
            report.source_root = Some(src_root.cid.to_string());
            chunk_bytes(&canonical, Kind::Topology, config, &mut w, &mut counts)?
        }
    };
    let root = Root { kind, config: *config, len, tree }.encode();
    w.put(root.cid, &root.bytes)?;
    w.add_root(
        root.cid,
        RootRecord {
            kind: kind.to_string(),
            len,
            chunks: counts.chunks,
            hole_bytes: counts.hole_bytes,
            added_ms: now_ms,
            name,
            source: source.map(|c| c.to_bytes()),
        },
    );
    if let Some(ns) = namespace {
        w.set_namespace(root.cid, ns);
    }
    w.commit()?;
    report.root = root.cid.to_string();
    report.bytes = len;
    report.chunks = counts.chunks;
    report.hole_bytes = counts.hole_bytes;
    report.files = counts.files;
    report.stored_bytes = w.stored_bytes();
    Ok(report)
}

fn lift(e: AddError, path: &Path) -> AddError {
    match e {
        AddError::Input { source, .. } => {
            AddError::Input { path: path.display().to_string(), source }
        }
        other => other,
    }
}

/// Decides the kind of a path.
fn resolve_kind(path: &Path, kind: KindArg) -> Result<Kind, AddError> {
    let meta = std::fs::symlink_metadata(path).map_err(input_err(path))?;
    let ft = meta.file_type();
    let follow =
        if ft.is_symlink() { std::fs::metadata(path).map_err(input_err(path))? } else { meta };
    let ft = follow.file_type();
    let is_file = ft.is_file() || ft.is_block_device();
    let wrong = |what: &str| {
        AddError::Invalid(format!("{}: is {what}; use --kind to say what it is", path.display()))
    };
    Ok(match kind {
        KindArg::Dir | KindArg::Auto if ft.is_dir() => Kind::Dir,
        KindArg::Dir => return Err(wrong("not a directory")),
        _ if ft.is_dir() => return Err(wrong("a directory")),
        _ if !is_file => return Err(wrong("neither a regular file nor a block device")),
        KindArg::File => Kind::File,
        KindArg::Disk => Kind::Disk,
        KindArg::Topology => Kind::Topology,
        KindArg::Auto => {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let sparse = ft.is_file() && follow.blocks() * 512 < follow.len();
            if ft.is_block_device() || matches!(ext.as_str(), "img" | "raw" | "iso") || sparse {
                Kind::Disk
            } else if matches!(ext.as_str(), "json" | "yaml" | "yml" | "toml") {
                Kind::Topology
            } else {
                Kind::File
            }
        }
    })
}

/// Size of a regular file or block device.
fn source_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        let size = f.seek(SeekFrom::End(0))?;
        f.seek(SeekFrom::Start(0))?;
        return Ok(size);
    }
    Ok(meta.len())
}

/// Chunks bytes already in memory, storing chunks and tree nodes.
fn chunk_bytes(
    bytes: &[u8],
    kind: Kind,
    config: &Config,
    w: &mut Writer<'_>,
    counts: &mut Counts,
) -> Result<(Option<Cid>, u64), AddError> {
    let cutter = Cutter::new(config);
    let mut tree = TreeBuilder::new(config, kind != Kind::Disk);
    let mut at = 0;
    for len in cutter.lengths(bytes) {
        let chunk = &bytes[at..at + len];
        at += len;
        let cid = Cid::raw(chunk);
        w.put(cid, chunk)?;
        counts.chunks += 1;
        tree.push(NodeEntry::Chunk { len: len as u64, cid });
        put_blocks(w, tree.take_blocks())?;
    }
    let out = tree.finish();
    put_blocks(w, tree.take_blocks())?;
    Ok(out)
}

fn chunk_small(
    mut file: File,
    size: u64,
    config: &Config,
    w: &mut Writer<'_>,
    counts: &mut Counts,
    progress: &Progress,
) -> Result<(Option<Cid>, u64), AddError> {
    let mut bytes = Vec::with_capacity(size as usize);
    file.by_ref()
        .take(INLINE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| AddError::Input { path: String::new(), source })?;
    if bytes.len() as u64 > INLINE_BYTES_MAX {
        // It grew while we read it: take the streaming path from the start.
        file.seek(SeekFrom::Start(0))
            .map_err(|source| AddError::Input { path: String::new(), source })?;
        return chunk_stream(file, None, Kind::File, config, w, counts, progress);
    }
    progress.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    chunk_bytes(&bytes, Kind::File, config, w, counts)
}

fn put_blocks(w: &mut Writer<'_>, blocks: Vec<Block>) -> Result<(), AddError> {
    for b in blocks {
        w.put(b.cid, &b.bytes)?;
    }
    Ok(())
}

/// A page-aligned buffer with `CARRY_BYTES` of room before the aligned read position.
struct Buf {
    raw: Vec<u8>,
    base: usize,
}

impl Buf {
    fn new() -> Buf {
        let raw = vec![0u8; CARRY_BYTES + BATCH_BYTES + 4096];
        let base = raw.as_ptr().align_offset(4096);
        assert!(base < 4096);
        Buf { raw, base }
    }

    /// The whole usable region: `[0, CARRY_BYTES)` for carry, then the batch.
    fn region(&self) -> &[u8] {
        &self.raw[self.base..self.base + CARRY_BYTES + BATCH_BYTES]
    }

    fn region_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.base..self.base + CARRY_BYTES + BATCH_BYTES]
    }
}

enum Msg {
    Chunks { buf: Buf, ranges: Vec<Range<usize>> },
    Hole(u64),
}

/// What the hashing stage hands the writer.
enum Hashed {
    Chunks { buf: Buf, chunks: Vec<(Range<usize>, Cid)> },
    Hole(u64),
}

/// The reader side: fills buffers and cuts them.
struct Cutting {
    cutter: Cutter,
    buf: Buf,
    begin: usize,
    end: usize,
    tx: SyncSender<Msg>,
    pool: Receiver<Buf>,
}

impl Cutting {
    fn spare(&mut self) -> &mut [u8] {
        let end = self.end;
        &mut self.buf.region_mut()[end..]
    }

    fn full(&self) -> bool {
        self.end == CARRY_BYTES + BATCH_BYTES
    }

    /// Cuts what can be cut and hands the batch on; carries the unfinished tail over.
    fn flush(&mut self, stream_end: bool) -> Result<(), AddError> {
        let mut ranges = Vec::new();
        let mut at = self.begin;
        while let Some(len) = self.cutter.cut(&self.buf.region()[at..self.end], stream_end) {
            ranges.push(at..at + len);
            at += len;
        }
        let carry = self.end - at;
        assert!(carry <= CARRY_BYTES, "carry={carry}");
        if ranges.is_empty() {
            return Ok(());
        }
        let mut next = self.pool.recv().map_err(|_| pipeline_gone())?;
        next.region_mut()[CARRY_BYTES - carry..CARRY_BYTES]
            .copy_from_slice(&self.buf.region()[at..self.end]);
        let full = std::mem::replace(&mut self.buf, next);
        self.begin = CARRY_BYTES - carry;
        self.end = CARRY_BYTES;
        self.tx.send(Msg::Chunks { buf: full, ranges }).map_err(|_| pipeline_gone())
    }

    fn push(&mut self, mut bytes: &[u8]) -> Result<(), AddError> {
        while !bytes.is_empty() {
            if self.full() {
                self.flush(false)?;
            }
            let spare = self.spare();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.end += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn push_zeros(&mut self, mut len: u64) -> Result<(), AddError> {
        while len > 0 {
            if self.full() {
                self.flush(false)?;
            }
            let spare = self.spare();
            let n = (spare.len() as u64).min(len) as usize;
            spare[..n].fill(0);
            self.end += n;
            len -= n as u64;
        }
        Ok(())
    }

    fn hole(&mut self, len: u64) -> Result<(), AddError> {
        self.flush(true)?;
        self.tx.send(Msg::Hole(len)).map_err(|_| pipeline_gone())
    }
}

fn pipeline_gone() -> AddError {
    AddError::Invalid("the writer stage stopped".into())
}

/// Streams a file or image through the two-thread pipeline.
fn chunk_stream<R: Read + Send + AsFd>(
    mut input: R,
    size: Option<u64>,
    kind: Kind,
    config: &Config,
    w: &mut Writer<'_>,
    counts: &mut Counts,
    progress: &Progress,
) -> Result<(Option<Cid>, u64), AddError> {
    let (tx, rx) = sync_channel::<Msg>(POOL_BUFFERS);
    let (pool_tx, pool_rx) = sync_channel::<Buf>(POOL_BUFFERS + 1);
    for _ in 0..POOL_BUFFERS {
        pool_tx.send(Buf::new()).expect("pool has room");
    }
    let first = pool_rx.recv().expect("pool was filled");
    let mut cutting = Cutting {
        cutter: Cutter::new(config),
        buf: first,
        begin: CARRY_BYTES,
        end: CARRY_BYTES,
        tx,
        pool: pool_rx,
    };
    let (htx, hrx) = sync_channel::<Hashed>(POOL_BUFFERS);
    std::thread::scope(|scope| {
        scope.spawn(move || hash_stage(rx, htx));
        let writer = scope.spawn(move || write_stage(hrx, pool_tx, kind, config, w));
        let read_result = if kind == Kind::Disk {
            read_image(&mut input, size, config, &mut cutting, progress)
        } else {
            read_plain(&mut input, &mut cutting, progress)
        };
        let read_result = read_result.and_then(|()| cutting.flush(true));
        drop(cutting);
        let written = writer.join().expect("writer stage panicked");
        // A writer failure explains a reader's "pipeline gone"; report it first.
        let (tree, len, c) = written?;
        read_result?;
        counts.chunks += c.chunks;
        counts.hole_bytes += c.hole_bytes;
        Ok((tree, len))
    })
}

use std::os::fd::AsFd;

fn read_plain<R: Read>(
    input: &mut R,
    cutting: &mut Cutting,
    progress: &Progress,
) -> Result<(), AddError> {
    loop {
        if cutting.full() {
            cutting.flush(false)?;
        }
        let spare = cutting.spare();
        let n = match input.read(spare) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(AddError::Input { path: String::new(), source }),
        };
        cutting.end += n;
        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Next data or hole offset at or after `from`, or `None` if the filesystem cannot say.
fn seek(fd: &impl AsFd, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(from) else { return Ok(None) };
    // SAFETY: lseek on a valid, borrowed descriptor; no memory is involved.
    let rc = unsafe { libc::lseek(fd.as_fd().as_raw_fd(), off, whence) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(Some(u64::MAX)),
            Some(libc::EINVAL) | Some(libc::ESPIPE) | Some(libc::EOPNOTSUPP) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(rc as u64))
}

fn read_image<R: Read + AsFd>(
    input: &mut R,
    size: Option<u64>,
    config: &Config,
    cutting: &mut Cutting,
    progress: &Progress,
) -> Result<(), AddError> {
    let align = HOLE_ALIGN_BYTES;
    let mut seg = Segmenter::new(config.zero_run_bytes);
    let mut pieces = Vec::new();
    let mut rbuf = Buf::new();
    let io_err = |source| AddError::Input { path: String::new(), source };
    let Some(size) = size else {
        // A pipe: read everything.
        loop {
            let n = read_full(input, &mut rbuf.region_mut()[..BATCH_BYTES]).map_err(io_err)?;
            if n == 0 {
                break;
            }
            progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
            feed(&mut seg, &rbuf.region()[..n], &mut pieces, cutting)?;
            if n < BATCH_BYTES {
                break;
            }
        }
        seg.finish(&mut pieces);
        return apply(&std::mem::take(&mut pieces), &[], cutting);
    };
    let mut off: u64 = 0;
    while off < size {
        let data_start =
            seek(input, off, libc::SEEK_DATA).map_err(io_err)?.unwrap_or(off).min(size);
        let zero_end = data_start / align * align;
        if zero_end > off {
            seg.zeros(zero_end - off);
            progress.bytes.fetch_add(zero_end - off, Ordering::Relaxed);
            off = zero_end;
        }
        if off >= size {
            break;
        }
        let hole_start =
            seek(input, off, libc::SEEK_HOLE).map_err(io_err)?.unwrap_or(size).min(size);
        let read_end = hole_start.div_ceil(align).saturating_mul(align).min(size).max(off + 1);
        // Read [off, read_end) in aligned batches.
        let file_pos = SeekFrom::Start(off);
        seek_to(input, file_pos).map_err(io_err)?;
        while off < read_end {
            let want = ((read_end - off) as usize).min(BATCH_BYTES);
            let n = read_full(input, &mut rbuf.region_mut()[..want]).map_err(io_err)?;
            if n == 0 {
                return Err(AddError::Invalid("the image shrank while it was read".into()));
            }
            progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
            feed(&mut seg, &rbuf.region()[..n], &mut pieces, cutting)?;
            off += n as u64;
        }
    }
    seg.finish(&mut pieces);
    let tail = std::mem::take(&mut pieces);
    apply(&tail, &[], cutting)
}

fn seek_to<R: AsFd>(input: &mut R, pos: SeekFrom) -> io::Result<()> {
    let SeekFrom::Start(at) = pos else { unreachable!("only absolute seeks") };
    let off = libc::off_t::try_from(at).map_err(io::Error::other)?;
    // SAFETY: lseek on a valid, borrowed descriptor; no memory is involved.
    let rc = unsafe { libc::lseek(input.as_fd().as_raw_fd(), off, libc::SEEK_SET) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_full<R: Read>(input: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn feed(
    seg: &mut Segmenter,
    data: &[u8],
    pieces: &mut Vec<Piece>,
    cutting: &mut Cutting,
) -> Result<(), AddError> {
    seg.data(data, pieces);
    let result = apply(pieces, data, cutting);
    pieces.clear();
    result
}

fn apply(pieces: &[Piece], data: &[u8], cutting: &mut Cutting) -> Result<(), AddError> {
    for piece in pieces {
        match piece {
            Piece::Data(range) => cutting.push(&data[range.clone()])?,
            Piece::Zeros(len) => cutting.push_zeros(*len)?,
            Piece::Hole(len) => cutting.hole(*len)?,
        }
    }
    Ok(())
}

/// The middle stage: BLAKE3 of every chunk.
fn hash_stage(rx: Receiver<Msg>, tx: SyncSender<Hashed>) {
    for msg in rx {
        let out = match msg {
            Msg::Chunks { buf, ranges } => {
                let chunks = ranges
                    .into_iter()
                    .map(|r| {
                        let cid = Cid::raw(&buf.region()[r.clone()]);
                        (r, cid)
                    })
                    .collect();
                Hashed::Chunks { buf, chunks }
            }
            Msg::Hole(len) => Hashed::Hole(len),
        };
        if tx.send(out).is_err() {
            // The writer stopped with an error; it reports it.
            return;
        }
    }
}

/// The last stage: skips stored chunks, appends new ones, builds the tree.
fn write_stage(
    rx: Receiver<Hashed>,
    pool: SyncSender<Buf>,
    kind: Kind,
    config: &Config,
    w: &mut Writer<'_>,
) -> Result<(Option<Cid>, u64, Counts), AddError> {
    let mut tree = TreeBuilder::new(config, kind != Kind::Disk);
    let mut counts = Counts::default();
    let mut since_commit = 0u64;
    for msg in rx {
        match msg {
            Hashed::Chunks { buf, chunks } => {
                for (range, cid) in chunks {
                    let chunk = &buf.region()[range];
                    if w.put(cid, chunk)? {
                        since_commit += chunk.len() as u64;
                    }
                    counts.chunks += 1;
                    tree.push(NodeEntry::Chunk { len: chunk.len() as u64, cid });
                }
                put_blocks(w, tree.take_blocks())?;
                // The reader may have finished; a closed pool is fine.
                let _ = pool.send(buf);
                if since_commit >= COMMIT_EVERY_BYTES {
                    w.commit()?;
                    since_commit = 0;
                }
            }
            Hashed::Hole(len) => {
                counts.hole_bytes += len;
                tree.push(NodeEntry::Hole { len });
            }
        }
    }
    let (root, len) = tree.finish();
    put_blocks(w, tree.take_blocks())?;
    Ok((root, len, counts))
}

/// Adds a directory tree: entries sorted by name bytes, symlinks stored as links (never
/// followed), special files refused.
fn add_dir(
    path: &Path,
    config: &Config,
    w: &mut Writer<'_>,
    counts: &mut Counts,
    progress: &Progress,
) -> Result<(Option<Cid>, u64), AddError> {
    use std::os::unix::ffi::OsStrExt;
    let mut names: Vec<(Vec<u8>, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(path).map_err(input_err(path))? {
        let entry = entry.map_err(input_err(path))?;
        names.push((entry.file_name().as_bytes().to_vec(), entry.path()));
    }
    names.sort();
    let mut tree = TreeBuilder::new(config, false);
    for (name, child) in names {
        manifest::check_name(&name)
            .map_err(|e| AddError::Invalid(format!("{}: {e}", child.display())))?;
        let meta = std::fs::symlink_metadata(&child).map_err(input_err(&child))?;
        let ft = meta.file_type();
        let mode = meta.permissions().mode() & 0o7777;
        let entry = if ft.is_symlink() {
            let target = std::fs::read_link(&child).map_err(input_err(&child))?;
            let target = target.as_os_str().as_bytes().to_vec();
            if target.is_empty() || target.len() > TARGET_BYTES_MAX {
                return Err(AddError::Invalid(format!(
                    "{}: symlink target too long",
                    child.display()
                )));
            }
            DirEntry { name, mode, entry_type: EntryType::Symlink, len: 0, cid: None, target }
        } else if ft.is_dir() {
            let (cid, len) = add_dir(&child, config, w, counts, progress)?;
            DirEntry { name, mode, entry_type: EntryType::Dir, len, cid, target: Vec::new() }
        } else if ft.is_file() {
            let file = File::open(&child).map_err(input_err(&child))?;
            let size = meta.len();
            let (cid, len) = if size <= INLINE_BYTES_MAX {
                chunk_small(file, size, config, w, counts, progress).map_err(|e| lift(e, &child))?
            } else {
                chunk_stream(file, Some(size), Kind::File, config, w, counts, progress)
                    .map_err(|e| lift(e, &child))?
            };
            counts.files += 1;
            DirEntry { name, mode, entry_type: EntryType::File, len, cid, target: Vec::new() }
        } else {
            return Err(AddError::Invalid(format!(
                "{}: special files (devices, sockets, fifos) are not stored",
                child.display()
            )));
        };
        tree.push(NodeEntry::Dir(entry));
        put_blocks(w, tree.take_blocks())?;
    }
    let out = tree.finish();
    put_blocks(w, tree.take_blocks())?;
    Ok(out)
}
