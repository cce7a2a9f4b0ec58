//! Store IO behind a trait: every byte the store reads or writes, the pack files and the
//! redb index file alike, goes through [`Vfs`] and [`VfsFile`].
//!
//! [`OsVfs`] is the real filesystem. [`crate::store::crash::CrashVfs`] keeps files in memory,
//! tracks what has been synced, and on a simulated crash drops every unsynced write, so tests
//! prove durability claims that `kill -9` (which keeps the page cache) cannot.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A filesystem as the store sees it.
pub trait Vfs: Debug + Send + Sync + 'static {
    /// Opens a file for reading and writing, creating it if `create` (the new directory
    /// entry is durable only after [`Vfs::sync_dir`] of its parent).
    ///
    /// # Errors
    /// The IO error.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>>;
    /// Like [`Vfs::open`], for a file written only in whole, 4 KiB-aligned blocks from
    /// 4 KiB-aligned memory: the real filesystem bypasses the page cache (O_DIRECT) where
    /// it can. Reads must still go through a handle from [`Vfs::open`].
    ///
    /// # Errors
    /// The IO error.
    fn open_direct(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        self.open(path, create)
    }

    /// Makes the directory's entries durable.
    ///
    /// # Errors
    /// The IO error.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a directory and its parents.
    ///
    /// # Errors
    /// The IO error.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes a file.
    ///
    /// # Errors
    /// The IO error.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The files in a directory (full paths, sorted).
    ///
    /// # Errors
    /// The IO error.
    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Whether a path exists.
    fn exists(&self, path: &Path) -> bool;
}

/// An open file.
#[allow(clippy::len_without_is_empty)] // a file's length is a number to use, not a test
pub trait VfsFile: Debug + Send + Sync + 'static {
    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// The IO error, `UnexpectedEof` past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    ///
    /// # Errors
    /// The IO error.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads from `offset` until `buf` is full or the file ends; how many bytes it read.
    ///
    /// # Errors
    /// The IO error.
    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let end = self.len()?.min(offset.saturating_add(buf.len() as u64));
        let n = usize::try_from(end.saturating_sub(offset)).map_err(io::Error::other)?;
        self.read_at(&mut buf[..n], offset)?;
        Ok(n)
    }
    /// Current length.
    ///
    /// # Errors
    /// The IO error.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros).
    ///
    /// # Errors
    /// The IO error.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable.
    ///
    /// # Errors
    /// The IO error; the caller must treat it as fatal for what it was syncing.
    fn sync_data(&self) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsVfs;

#[derive(Debug)]
struct OsFile(File);

impl Vfs for OsVfs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        Ok(Box::new(OsFile(file)))
    }

    fn open_direct(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match direct {
            Ok(file) => Ok(Box::new(OsFile(file))),
            // tmpfs and some others have no O_DIRECT: use the page cache there.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.open(path, create),
            Err(e) => Err(e),
        }
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            out.push(entry?.path());
        }
        out.sort();
        Ok(out)
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

impl VfsFile for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        // Direct reads of aligned pieces stop short only at the end of the file.
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

/// redb's storage on top of a [`VfsFile`], so the index obeys the same crash model.
#[derive(Debug)]
pub struct RedbBackend(pub Box<dyn VfsFile>);

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_at(out, offset)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_at(data, offset)
    }
}
