//! Raft log storage: the in-memory view raft-rs reads ([`LogStore`]) and the durable
//! backend behind a trait ([`LogBackend`]): the node's store on disk, or [`MemBackend`] for
//! tests and the simulator, which can crash and lose every unsynced write.

use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// What survives a restart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Persisted {
    /// Term, vote, commit.
    pub hard_state: HardState,
    /// The last snapshot's metadata (with its conf state) and data.
    pub snapshot: Option<(SnapshotMetadata, Vec<u8>)>,
    /// Log entries after the snapshot.
    pub entries: Vec<Entry>,
    /// The applied state image and its index, saved together.
    pub state: Option<(u64, Vec<u8>)>,
    /// The conf state as of the last applied conf change.
    pub conf_state: ConfState,
}

/// Durable log operations. Writes are buffered until [`LogBackend::sync`], which the core
/// calls once per Ready batch before sending the messages that depend on them.
pub trait LogBackend: Send {
    /// Appends entries; an entry at an index already present replaces it and everything after.
    fn append(&mut self, entries: &[Entry]);
    /// Records the hard state.
    fn set_hard_state(&mut self, hs: &HardState);
    /// Records the conf state.
    fn set_conf_state(&mut self, cs: &ConfState);
    /// Records a snapshot and drops the log up to its index.
    fn set_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]);
    /// Records the applied state image with its index (atomically).
    fn save_state(&mut self, applied: u64, state: &[u8]);
    /// Makes everything recorded durable.
    ///
    /// # Errors
    /// A failed sync: the node must stop (fail-stop), since what it acknowledged may be lost.
    fn sync(&mut self) -> Result<(), String>;
    /// Everything durable, for a restart.
    ///
    /// # Errors
    /// If the durable state cannot be read.
    fn load(&self) -> Result<Persisted, String>;
}

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<Entry>),
    HardState(HardState),
    ConfState(ConfState),
    Snapshot(SnapshotMetadata, Vec<u8>),
    State(u64, Vec<u8>),
}

fn apply_op(p: &mut Persisted, op: Op) {
    match op {
        Op::Append(entries) => {
            if let Some(first) = entries.first() {
                p.entries.retain(|e| e.index < first.index);
                p.entries.extend(entries);
            }
        }
        Op::HardState(hs) => p.hard_state = hs,
        Op::ConfState(cs) => p.conf_state = cs,
        Op::Snapshot(meta, data) => {
            p.entries.retain(|e| e.index > meta.index);
            p.conf_state = meta.get_conf_state().clone();
            p.snapshot = Some((meta, data));
        }
        Op::State(i, s) => p.state = Some((i, s)),
    }
}

/// An in-memory backend that can crash: unsynced writes are lost (tests, simulator).
#[derive(Clone, Debug, Default)]
pub struct MemBackend {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Debug, Default)]
struct MemInner {
    durable: Persisted,
    pending: Vec<Op>,
    syncs: u64,
    fail_sync: bool,
    /// Planted bug [`bugs::ACK_BEFORE_FSYNC`]: writes a sync reported durable but did not
    /// make durable.
    #[cfg(feature = "sim-bugs")]
    behind: Vec<Op>,
}

impl MemBackend {
    /// An empty backend.
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// Drops every unsynced write, as a power loss would.
    pub fn crash(&self) {
        let mut inner = self.inner.lock().expect("mem backend lock");
        inner.pending.clear();
        #[cfg(feature = "sim-bugs")]
        inner.behind.clear();
    }

    /// Syncs performed so far.
    pub fn syncs(&self) -> u64 {
        self.inner.lock().expect("mem backend lock").syncs
    }

    /// Makes the next syncs fail (a disk fault).
    pub fn fail_syncs(&self, fail: bool) {
        self.inner.lock().expect("mem backend lock").fail_sync = fail;
    }

    fn push(&self, op: Op) {
        self.inner.lock().expect("mem backend lock").pending.push(op);
    }
}

impl LogBackend for MemBackend {
    fn append(&mut self, entries: &[Entry]) {
        self.push(Op::Append(entries.to_vec()));
    }

    fn set_hard_state(&mut self, hs: &HardState) {
        self.push(Op::HardState(hs.clone()));
    }

    fn set_conf_state(&mut self, cs: &ConfState) {
        self.push(Op::ConfState(cs.clone()));
    }

    fn set_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) {
        self.push(Op::Snapshot(meta.clone(), data.to_vec()));
    }

    fn save_state(&mut self, applied: u64, state: &[u8]) {
        self.push(Op::State(applied, state.to_vec()));
    }

    fn sync(&mut self) -> Result<(), String> {
        let mut inner = self.inner.lock().expect("mem backend lock");
        if inner.fail_sync {
            return Err("simulated fsync failure".into());
        }
        #[cfg(feature = "sim-bugs")]
        if bugs::on(bugs::ACK_BEFORE_FSYNC) {
            // Write-behind: this sync makes durable only what the previous one was given, so
            // the core acknowledges a batch that a crash can still lose.
            let due = std::mem::take(&mut inner.behind);
            inner.behind = std::mem::take(&mut inner.pending);
            for op in due {
                apply_op(&mut inner.durable, op);
            }
            inner.syncs += 1;
            return Ok(());
        }
        let ops = std::mem::take(&mut inner.pending);
        for op in ops {
            apply_op(&mut inner.durable, op);
        }
        inner.syncs += 1;
        Ok(())
    }

    fn load(&self) -> Result<Persisted, String> {
        #[allow(unused_mut)]
        let mut p = self.inner.lock().expect("mem backend lock").durable.clone();
        #[cfg(feature = "sim-bugs")]
        if bugs::on(bugs::FORGET_VOTE) {
            // The persisted vote is lost: after a restart the node may vote again in a term
            // it already voted in.
            p.hard_state.vote = 0;
        }
        Ok(p)
    }
}

/// Planted bugs of the in-memory backend (feature `sim-bugs`, simulator only): its switches
/// in the shared word of [`mycel_base::bugs`] (bits 4 and up).
#[cfg(feature = "sim-bugs")]
pub mod bugs {
    pub use mycel_base::bugs::{on, set};

    /// [`super::MemBackend::sync`] acknowledges a batch before it is durable.
    pub const ACK_BEFORE_FSYNC: u32 = 1 << 4;
    /// [`super::MemBackend`] forgets the persisted vote on restart (votes twice in a term).
    pub const FORGET_VOTE: u32 = 1 << 5;
}

/// Encodes a log entry (protobuf, raft-rs's own codec) for a backend.
pub fn encode_entry(e: &Entry) -> Vec<u8> {
    e.write_to_bytes().expect("entries encode")
}

/// Decodes [`encode_entry`].
///
/// # Errors
/// A message for bytes that are not an entry.
pub fn decode_entry(b: &[u8]) -> Result<Entry, String> {
    Entry::parse_from_bytes(b).map_err(|e| e.to_string())
}

/// The log as raft-rs reads it: everything since the last snapshot, in memory.
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot_meta: SnapshotMetadata,
    snapshot_data: Vec<u8>,
    entries: Vec<Entry>,
}

impl LogStore {
    /// From what a backend persisted.
    pub fn from_persisted(p: &Persisted) -> LogStore {
        let mut s = LogStore {
            hard_state: p.hard_state.clone(),
            conf_state: p.conf_state.clone(),
            ..LogStore::default()
        };
        if let Some((meta, data)) = &p.snapshot {
            s.snapshot_meta = meta.clone();
            s.snapshot_data = data.clone();
            if p.conf_state == ConfState::default() {
                s.conf_state = meta.get_conf_state().clone();
            }
        }
        s.entries = p.entries.iter().filter(|e| e.index > s.snapshot_meta.index).cloned().collect();
        s
    }

    /// A fresh log whose voters are `voters` (cluster bootstrap).
    pub fn bootstrap(voters: Vec<u64>) -> LogStore {
        let mut s = LogStore::default();
        s.conf_state.voters = voters;
        s
    }

    pub(crate) fn set_hard_state(&mut self, hs: HardState) {
        self.hard_state = hs;
    }

    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub(crate) fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = commit;
    }

    pub(crate) fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// The conf state.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub(crate) fn append(&mut self, entries: &[Entry]) {
        if let Some(first) = entries.first() {
            self.entries.retain(|e| e.index < first.index);
            self.entries.extend_from_slice(entries);
        }
    }

    pub(crate) fn apply_snapshot(&mut self, snap: &Snapshot) {
        let meta = snap.get_metadata();
        self.entries.retain(|e| e.index > meta.index);
        self.snapshot_meta = meta.clone();
        self.snapshot_data = snap.data.to_vec();
        self.conf_state = meta.get_conf_state().clone();
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        if self.hard_state.term < meta.term {
            self.hard_state.term = meta.term;
        }
    }

    /// Records a snapshot taken locally and drops the log up to it.
    pub(crate) fn compact_to(&mut self, meta: SnapshotMetadata, data: Vec<u8>) {
        self.entries.retain(|e| e.index > meta.index);
        self.snapshot_meta = meta;
        self.snapshot_data = data;
    }

    /// Entries in the log (after the snapshot).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entries follow the snapshot.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The snapshot's index.
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_meta.index
    }

    fn first(&self) -> u64 {
        self.snapshot_meta.index + 1
    }

    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snapshot_meta.index, |e| e.index)
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(high <= self.last() + 1, "entries [{low}, {high}) past last {}", self.last());
        let offset = self.first();
        let mut out: Vec<Entry> =
            self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut s = Snapshot::default();
        s.set_metadata(self.snapshot_meta.clone());
        s.data = self.snapshot_data.clone().into();
        Ok(s)
    }
}
