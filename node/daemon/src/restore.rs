//! `mycel get`: objects out of the store onto the filesystem.
//!
//! Output appears atomically: it is written to a temporary name beside the target, synced,
//! and renamed into place. Disk images come out sparse (holes are never written). Directory
//! restores create every entry fresh inside a directory they made, with names checked as
//! single safe components, so nothing is written outside the target and no symlink is
//! followed. `--in-place` instead updates an existing file or image, writing only the
//! chunks whose bytes differ and punching holes where the image now has them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mycel_chunker::manifest::{self, EntryType, Kind, Leaves, ManifestError, NodeEntry, Root};
use mycel_chunker::{Cid, topology};

use crate::ingest::TOPOLOGY_BYTES_MAX;
use crate::store::{Store, StoreError};

/// Why a get failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetError {
    /// The object or one of its blocks is not in the store.
    #[error("{0} is not in the store")]
    Missing(Cid),
    /// A block failed verification or a manifest is invalid.
    #[error("{0}")]
    Corrupt(String),
    /// What was asked cannot be done for this object.
    #[error("{0}")]
    Invalid(String),
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Output {
        /// The path.
        path: String,
        /// The IO error.
        source: io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ManifestError> for GetError {
    fn from(e: ManifestError) -> GetError {
        match e {
            ManifestError::Missing(cid) => GetError::Missing(cid),
            other => GetError::Corrupt(other.to_string()),
        }
    }
}

fn out_err(path: &Path) -> impl FnOnce(io::Error) -> GetError + '_ {
    move |source| GetError::Output { path: path.display().to_string(), source }
}

/// Options of a get.
#[derive(Clone, Debug, Default)]
pub struct GetOptions {
    /// Update an existing file or image instead of replacing it.
    pub in_place: bool,
    /// Topology files: render in this format.
    pub format: Option<topology::Format>,
    /// Topology files: write the source bytes as given.
    pub source: bool,
}

/// The outcome of a get.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GetReport {
    /// The root.
    pub root: String,
    /// Its kind.
    pub kind: String,
    /// Content bytes.
    pub bytes: u64,
    /// Bytes written to the output.
    pub bytes_written: u64,
    /// Bytes of holes left unwritten or punched.
    pub hole_bytes: u64,
    /// In-place: bytes turned into holes that held data before.
    pub bytes_punched: u64,
    /// Files restored (directories).
    pub files: u64,
}

/// Counters for the progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Content bytes processed.
    pub bytes: AtomicU64,
}

/// Reads the root block of `cid`.
///
/// # Errors
/// [`GetError::Missing`] or [`GetError::Corrupt`].
pub fn root(store: &Store, cid: &Cid) -> Result<Root, GetError> {
    Ok(manifest::read_root(store, cid)?)
}

/// Writes object `cid` to `out` (`-` is standard output for files and topology files).
///
/// # Errors
/// [`GetError`]: missing or corrupt content, unwritable output.
pub fn get(
    store: &Store,
    cid: &Cid,
    out: &Path,
    opts: &GetOptions,
    progress: &Progress,
    sink: &mut dyn Write,
) -> Result<GetReport, GetError> {
    let root = root(store, cid)?;
    let mut report = GetReport {
        root: cid.to_string(),
        kind: root.kind.to_string(),
        bytes: root.len,
        ..GetReport::default()
    };
    if (opts.format.is_some() || opts.source) && root.kind != Kind::Topology {
        return Err(GetError::Invalid(format!(
            "--format and --source apply to topology files; {cid} is a {}",
            root.kind
        )));
    }
    if opts.in_place && !matches!(root.kind, Kind::File | Kind::Disk) {
        return Err(GetError::Invalid("--in-place applies to files and disk images".into()));
    }
    let stdout = out == Path::new("-");
    match root.kind {
        Kind::Topology if opts.source || opts.format.is_some() => {
            let bytes = if opts.source {
                let record = store.root(cid)?;
                let source = record.and_then(|r| r.source_cid()).ok_or_else(|| {
                    GetError::Invalid(format!("{cid}: the store has no source bytes for it"))
                })?;
                let src_root = self::root(store, &source)?;
                read_all(store, &src_root)?
            } else {
                let canonical = read_all(store, &root)?;
                let value = topology::parse(&canonical, topology::Format::Json)
                    .map_err(|e| GetError::Corrupt(format!("{cid}: stored canonical form: {e}")))?;
                let format = opts.format.expect("checked above");
                topology::render(&value, format).map_err(|e| GetError::Invalid(e.to_string()))?
            };
            progress.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            report.bytes_written = bytes.len() as u64;
            if stdout {
                sink.write_all(&bytes).and_then(|()| sink.flush()).map_err(out_err(out))?;
            } else {
                write_bytes_atomically(out, &bytes)?;
            }
        }
        Kind::File | Kind::Topology if stdout => {
            let lock = sink;
            for entry in Leaves::new(store, root.kind, root.tree, root.len) {
                let NodeEntry::Chunk { cid, .. } = entry? else {
                    return Err(GetError::Corrupt("unexpected entry in a file tree".into()));
                };
                let bytes = store.get(&cid)?.ok_or(GetError::Missing(cid))?;
                lock.write_all(&bytes).map_err(out_err(out))?;
                report.bytes_written += bytes.len() as u64;
                progress.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            lock.flush().map_err(out_err(out))?;
        }
        Kind::File | Kind::Topology | Kind::Disk if opts.in_place => {
            in_place(store, &root, out, &mut report, progress)?;
        }
        Kind::File | Kind::Topology | Kind::Disk => {
            if stdout && root.kind == Kind::Disk {
                return Err(GetError::Invalid(
                    "disk images are written to a file, not stdout".into(),
                ));
            }
            let tmp = temp_path(out);
            let result = (|| {
                let file = create_new(&tmp)?;
                write_tree(store, &root, &file, &tmp, &mut report, progress, &|_, _| false)?;
                sync_and_rename(&file, &tmp, out)
            })();
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result?;
        }
        Kind::Dir => {
            if stdout {
                return Err(GetError::Invalid(
                    "a directory is restored to a path, not stdout".into(),
                ));
            }
            if out.exists() {
                return Err(GetError::Invalid(format!(
                    "{}: exists; a directory is restored to a new path",
                    out.display()
                )));
            }
            let tmp = temp_path(out);
            let result = (|| {
                fs::create_dir(&tmp).map_err(out_err(&tmp))?;
                restore_dir(store, root.tree, root.len, &tmp, &mut report, progress)?;
                fs::rename(&tmp, out).map_err(out_err(out))?;
                sync_parent(out)
            })();
            if result.is_err() {
                let _ = fs::remove_dir_all(&tmp);
            }
            result?;
        }
    }
    Ok(report)
}

/// Every content byte of a file object of at most 1 GiB (cluster state snapshots).
///
/// # Errors
/// Missing or corrupt blocks, or an object too large.
pub fn read_object(store: &Store, cid: &Cid) -> Result<Vec<u8>, GetError> {
    let root = root(store, cid)?;
    collect(store, &root, 1 << 30)
}

/// Every content byte of a (small) file or topology object.
fn read_all(store: &Store, root: &Root) -> Result<Vec<u8>, GetError> {
    collect(store, root, TOPOLOGY_BYTES_MAX)
}

fn collect(store: &Store, root: &Root, len_max: u64) -> Result<Vec<u8>, GetError> {
    if root.len > len_max {
        return Err(GetError::Invalid("object too large to load in memory".into()));
    }
    let mut out = Vec::with_capacity(root.len as usize);
    for entry in Leaves::new(store, root.kind, root.tree, root.len) {
        match entry? {
            NodeEntry::Chunk { cid, .. } => {
                out.extend_from_slice(&store.get(&cid)?.ok_or(GetError::Missing(cid))?)
            }
            _ => return Err(GetError::Corrupt("unexpected entry in a file tree".into())),
        }
    }
    Ok(out)
}

/// The temporary name beside `out` that a restore writes before renaming.
pub(crate) fn temp_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    dir.join(format!(".{name}.mycel-tmp.{}", std::process::id()))
}

/// Creates `path`, which must not exist.
pub(crate) fn create_new(path: &Path) -> Result<File, GetError> {
    OpenOptions::new().write(true).create_new(true).open(path).map_err(out_err(path))
}

fn sync_parent(path: &Path) -> Result<(), GetError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(out_err(dir))
}

/// Syncs the written temporary file `tmp`, renames it to `out` and syncs the directory.
pub(crate) fn sync_and_rename(file: &File, tmp: &Path, out: &Path) -> Result<(), GetError> {
    file.sync_all().map_err(out_err(tmp))?;
    fs::rename(tmp, out).map_err(out_err(out))?;
    sync_parent(out)
}

fn write_bytes_atomically(out: &Path, bytes: &[u8]) -> Result<(), GetError> {
    let tmp = temp_path(out);
    let result = (|| {
        let file = create_new(&tmp)?;
        file.write_all_at(bytes, 0).map_err(out_err(&tmp))?;
        sync_and_rename(&file, &tmp, out)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a file or image tree into a fresh file; holes are left unwritten, and so are the
/// chunks `written(offset, cid)` says are there already.
pub(crate) fn write_tree(
    store: &Store,
    root: &Root,
    file: &File,
    path: &Path,
    report: &mut GetReport,
    progress: &Progress,
    written: &dyn Fn(u64, &Cid) -> bool,
) -> Result<(), GetError> {
    let mut offset = 0u64;
    for entry in Leaves::new(store, root.kind, root.tree, root.len) {
        match entry? {
            NodeEntry::Chunk { cid, len } if written(offset, &cid) => {
                report.bytes_written += len;
                offset += len;
            }
            NodeEntry::Chunk { cid, len } => {
                let bytes = store.get(&cid)?.ok_or(GetError::Missing(cid))?;
                if bytes.len() as u64 != len {
                    return Err(GetError::Corrupt(format!("chunk {cid} has the wrong length")));
                }
                file.write_all_at(&bytes, offset).map_err(out_err(path))?;
                report.bytes_written += len;
                offset += len;
            }
            NodeEntry::Hole { len } => {
                report.hole_bytes += len;
                offset += len;
            }
            _ => return Err(GetError::Corrupt("unexpected entry in a file tree".into())),
        }
        progress.bytes.store(offset, Ordering::Relaxed);
    }
    if offset != root.len {
        return Err(GetError::Corrupt(format!(
            "tree holds {offset} bytes, root says {}",
            root.len
        )));
    }
    file.set_len(root.len).map_err(out_err(path))?;
    Ok(())
}

/// Updates an existing file or image so it equals the object, writing only what differs.
fn in_place(
    store: &Store,
    root: &Root,
    out: &Path,
    report: &mut GetReport,
    progress: &Progress,
) -> Result<(), GetError> {
    let file = OpenOptions::new().read(true).write(true).open(out).map_err(out_err(out))?;
    let meta = file.metadata().map_err(out_err(out))?;
    let is_block = {
        use std::os::unix::fs::FileTypeExt;
        meta.file_type().is_block_device()
    };
    let existing = if is_block {
        use std::io::Seek;
        let mut f = &file;
        f.seek(io::SeekFrom::End(0)).map_err(out_err(out))?
    } else {
        meta.len()
    };
    if is_block && existing < root.len {
        return Err(GetError::Invalid(format!(
            "{}: device of {existing} bytes is smaller than the image ({} bytes)",
            out.display(),
            root.len
        )));
    }
    let mut offset = 0u64;
    let mut buf = Vec::new();
    for entry in Leaves::new(store, root.kind, root.tree, root.len) {
        match entry? {
            NodeEntry::Chunk { cid, len } => {
                let same = offset + len <= existing && {
                    buf.resize(len as usize, 0);
                    file.read_exact_at(&mut buf, offset).map_err(out_err(out))?;
                    cid.matches(&buf)
                };
                if !same {
                    let bytes = store.get(&cid)?.ok_or(GetError::Missing(cid))?;
                    file.write_all_at(&bytes, offset).map_err(out_err(out))?;
                    report.bytes_written += len;
                }
                offset += len;
            }
            NodeEntry::Hole { len } => {
                report.hole_bytes += len;
                let end = (offset + len).min(existing);
                if offset < end
                    && !range_is_zero(&file, offset, end, &mut buf).map_err(out_err(out))?
                {
                    punch_or_zero(&file, offset, end - offset, is_block).map_err(out_err(out))?;
                    report.bytes_punched += end - offset;
                }
                offset += len;
            }
            _ => return Err(GetError::Corrupt("unexpected entry in a file tree".into())),
        }
        progress.bytes.store(offset, Ordering::Relaxed);
    }
    if !is_block && existing != root.len {
        file.set_len(root.len).map_err(out_err(out))?;
    }
    file.sync_all().map_err(out_err(out))?;
    Ok(())
}

/// Whether `[start, end)` of the file reads as zeros (skipping what SEEK_DATA says is a hole).
fn range_is_zero(file: &File, start: u64, end: u64, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut at = start;
    while at < end {
        // SAFETY: lseek on a valid, borrowed descriptor; no memory is involved.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(true);
            }
        } else if data as u64 >= end {
            return Ok(true);
        } else {
            at = at.max(data as u64);
        }
        let n = ((end - at) as usize).min(1 << 20);
        buf.resize(n, 0);
        file.read_exact_at(buf, at)?;
        if !mycel_chunker::holes::is_zero(buf) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

fn punch_or_zero(file: &File, offset: u64, len: u64, is_block: bool) -> io::Result<()> {
    if !is_block {
        // SAFETY: fallocate on a valid, borrowed descriptor; no memory is involved.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
    }
    // No hole punching here (a device, or a filesystem without it): write zeros.
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut at = offset;
    while at < offset + len {
        let n = ((offset + len - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Restores a directory tree under `dir`, which this restore created.
fn restore_dir(
    store: &Store,
    tree: Option<Cid>,
    len: u64,
    dir: &Path,
    report: &mut GetReport,
    progress: &Progress,
) -> Result<(), GetError> {
    let mut dirs_to_chmod = Vec::new();
    for entry in Leaves::new(store, Kind::Dir, tree, len) {
        let NodeEntry::Dir(d) = entry? else {
            return Err(GetError::Corrupt("unexpected entry in a directory tree".into()));
        };
        // Decoding checked the name; check again where it is used.
        manifest::check_name(&d.name).map_err(|e| GetError::Corrupt(e.to_string()))?;
        let path = dir.join(std::ffi::OsStr::from_bytes(&d.name));
        match d.entry_type {
            EntryType::Symlink => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&d.target), &path)
                    .map_err(out_err(&path))?;
            }
            EntryType::Dir => {
                fs::create_dir(&path).map_err(out_err(&path))?;
                restore_dir(store, d.cid, d.len, &path, report, progress)?;
                dirs_to_chmod.push((path, d.mode));
            }
            EntryType::File => {
                let file = create_new(&path)?;
                let root =
                    Root { kind: Kind::File, config: Default::default(), len: d.len, tree: d.cid };
                write_tree(store, &root, &file, &path, report, progress, &|_, _| false)?;
                file.sync_all().map_err(out_err(&path))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(d.mode))
                    .map_err(out_err(&path))?;
                report.files += 1;
            }
        }
    }
    for (path, mode) in dirs_to_chmod {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(out_err(&path))?;
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(out_err(dir))?;
    Ok(())
}
