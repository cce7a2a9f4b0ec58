//! A crash-testing [`Vfs`]: files in memory, with a record of what has been synced.
//!
//! Every mutating call counts as one step; at a chosen step the "machine" crashes: that call
//! and every later one fail. [`CrashVfs::after_crash`] then gives the disk as a reboot would
//! find it: directory entries only if their directory was synced, file contents only as
//! synced, and (in torn mode) a seeded random subset of the unsynced 4 KiB pages on top.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::vfs::{Vfs, VfsFile};

const PAGE: usize = 4096;

#[derive(Debug, Default, Clone)]
struct Inode {
    current: Vec<u8>,
    synced: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    inodes: Vec<Inode>,
    /// Directory entries as the running system sees them.
    entries: BTreeMap<PathBuf, usize>,
    /// Directory entries that survive a crash.
    durable_entries: BTreeMap<PathBuf, usize>,
    steps: u64,
    crash_at: Option<u64>,
    crashed: bool,
    /// Writes of at least this many bytes take `large_write_delay` (a slow device: writes
    /// that run on other threads are still under way when the caller moves on).
    large_write_bytes: usize,
    large_write_delay: std::time::Duration,
}

impl State {
    fn step(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(io::Error::other("simulated crash: the machine is down"));
        }
        self.steps += 1;
        if self.crash_at == Some(self.steps) {
            self.crashed = true;
            return Err(io::Error::other("simulated crash"));
        }
        Ok(())
    }
}

/// An in-memory filesystem that can crash.
#[derive(Debug, Clone, Default)]
pub struct CrashVfs {
    state: Arc<Mutex<State>>,
}

impl CrashVfs {
    /// An empty disk that never crashes until [`CrashVfs::crash_at`] says so.
    pub fn new() -> CrashVfs {
        CrashVfs::default()
    }

    /// Crashes at mutating step `step` (counted from now).
    pub fn crash_at(&self, step: u64) {
        let mut s = self.state.lock().expect("crash vfs lock");
        s.crash_at = Some(s.steps + step);
    }

    /// Makes every write of at least `bytes` take `delay`.
    pub fn slow_large_writes(&self, bytes: usize, delay: std::time::Duration) {
        let mut s = self.state.lock().expect("crash vfs lock");
        s.large_write_bytes = bytes;
        s.large_write_delay = delay;
    }

    /// Mutating steps so far.
    pub fn steps(&self) -> u64 {
        self.state.lock().expect("crash vfs lock").steps
    }

    /// Whether the crash happened.
    pub fn crashed(&self) -> bool {
        self.state.lock().expect("crash vfs lock").crashed
    }

    /// The disk a reboot finds: synced state only, plus (if `torn_seed`) a random subset of
    /// the unsynced pages, as a disk that wrote some of its cache before power failed.
    pub fn after_crash(&self, torn_seed: Option<u64>) -> CrashVfs {
        let s = self.state.lock().expect("crash vfs lock");
        let mut rng = torn_seed.map(ChaCha8Rng::seed_from_u64);
        let mut next = State::default();
        for (path, &ino) in &s.durable_entries {
            let inode = &s.inodes[ino];
            let mut content = inode.synced.clone();
            if let Some(rng) = rng.as_mut() {
                if inode.current.len() > content.len() && rng.gen_bool(0.5) {
                    content.resize(inode.current.len(), 0);
                }
                for page in (0..content.len().min(inode.current.len())).step_by(PAGE) {
                    let end = (page + PAGE).min(content.len()).min(inode.current.len());
                    if content[page..end] != inode.current[page..end] && rng.gen_bool(0.5) {
                        content[page..end].copy_from_slice(&inode.current[page..end]);
                    }
                }
            }
            next.inodes.push(Inode { current: content.clone(), synced: content });
            let id = next.inodes.len() - 1;
            next.entries.insert(path.clone(), id);
            next.durable_entries.insert(path.clone(), id);
        }
        CrashVfs { state: Arc::new(Mutex::new(next)) }
    }
}

#[derive(Debug)]
struct CrashFile {
    state: Arc<Mutex<State>>,
    ino: usize,
}

impl Vfs for CrashVfs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        let mut s = self.state.lock().expect("crash vfs lock");
        if let Some(&ino) = s.entries.get(path) {
            if s.crashed {
                return Err(io::Error::other("simulated crash: the machine is down"));
            }
            return Ok(Box::new(CrashFile { state: self.state.clone(), ino }));
        }
        if !create {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display())));
        }
        s.step()?;
        s.inodes.push(Inode::default());
        let ino = s.inodes.len() - 1;
        s.entries.insert(path.to_path_buf(), ino);
        Ok(Box::new(CrashFile { state: self.state.clone(), ino }))
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock().expect("crash vfs lock");
        s.step()?;
        let children: Vec<(PathBuf, usize)> = s
            .entries
            .iter()
            .filter(|(p, _)| p.parent() == Some(path))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        s.durable_entries.retain(|p, _| p.parent() != Some(path));
        s.durable_entries.extend(children);
        Ok(())
    }

    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        // Directories are implicit in the entry paths.
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state.lock().expect("crash vfs lock");
        s.step()?;
        s.entries
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}", path.display())))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let s = self.state.lock().expect("crash vfs lock");
        Ok(s.entries.keys().filter(|p| p.parent() == Some(dir)).cloned().collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let s = self.state.lock().expect("crash vfs lock");
        s.entries.contains_key(path) || s.entries.keys().any(|p| p.starts_with(path))
    }
}

impl VfsFile for CrashFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.state.lock().expect("crash vfs lock");
        if s.crashed {
            return Err(io::Error::other("simulated crash: the machine is down"));
        }
        let data = &s.inodes[self.ino].current;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.checked_add(buf.len()).ok_or_else(|| io::Error::other("overflow"))?;
        let src = data
            .get(start..end)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let delay = {
            let s = self.state.lock().expect("crash vfs lock");
            (s.large_write_bytes > 0 && buf.len() >= s.large_write_bytes)
                .then_some(s.large_write_delay)
        };
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
        let mut s = self.state.lock().expect("crash vfs lock");
        s.step()?;
        let data = &mut s.inodes[self.ino].current;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + buf.len();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.state.lock().expect("crash vfs lock");
        Ok(s.inodes[self.ino].current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock().expect("crash vfs lock");
        s.step()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        s.inodes[self.ino].current.resize(len, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.state.lock().expect("crash vfs lock");
        s.step()?;
        let inode = &mut s.inodes[self.ino];
        inode.synced = inode.current.clone();
        Ok(())
    }
}
