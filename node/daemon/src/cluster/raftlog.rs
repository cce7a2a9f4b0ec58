//! The durable Raft log: a redb file of its own (`raft.redb`), one transaction per Ready
//! batch, so the log's fsyncs never wait behind chunk writes.

use std::path::Path;
use std::sync::Arc;

use mycel_consensus::log::{LogBackend, Persisted, decode_entry, encode_entry};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

enum Op {
    Append(Vec<Entry>),
    Hard(HardState),
    Conf(ConfState),
    Snapshot(SnapshotMetadata, Vec<u8>),
    State(u64, Vec<u8>),
}

/// The Raft log in redb.
pub struct RedbLog {
    db: Arc<Database>,
    pending: Vec<Op>,
}

impl std::fmt::Debug for RedbLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLog").field("pending", &self.pending.len()).finish()
    }
}

impl RedbLog {
    /// Opens (creating) the log at `path`.
    ///
    /// # Errors
    /// If redb cannot open it.
    pub fn open(path: &Path) -> Result<RedbLog, String> {
        let db =
            Database::builder().create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.set_quick_repair(true);
        {
            tx.open_table(ENTRIES).map_err(|e| e.to_string())?;
            tx.open_table(META).map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())?;
        Ok(RedbLog { db: Arc::new(db), pending: Vec::new() })
    }

    /// Another handle on the same database (for meta values while the core owns the log).
    pub fn open_shared(other: &RedbLog) -> RedbLog {
        RedbLog { db: other.db.clone(), pending: Vec::new() }
    }

    /// A small value kept beside the log (this node's Raft id, the cluster id).
    ///
    /// # Errors
    /// Index errors.
    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let t = tx.open_table(META).map_err(|e| e.to_string())?;
        Ok(t.get(key).map_err(|e| e.to_string())?.map(|v| v.value().to_vec()))
    }

    /// Sets [`RedbLog::get_meta`] durably.
    ///
    /// # Errors
    /// Index errors.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), String> {
        let mut tx = self.db.begin_write().map_err(|e| e.to_string())?;
        tx.set_quick_repair(true);
        {
            let mut t = tx.open_table(META).map_err(|e| e.to_string())?;
            t.insert(key, value).map_err(|e| e.to_string())?;
        }
        tx.commit().map_err(|e| e.to_string())
    }
}

impl LogBackend for RedbLog {
    fn append(&mut self, entries: &[Entry]) {
        self.pending.push(Op::Append(entries.to_vec()));
    }

    fn set_hard_state(&mut self, hs: &HardState) {
        self.pending.push(Op::Hard(hs.clone()));
    }

    fn set_conf_state(&mut self, cs: &ConfState) {
        self.pending.push(Op::Conf(cs.clone()));
    }

    fn set_snapshot(&mut self, meta: &SnapshotMetadata, data: &[u8]) {
        self.pending.push(Op::Snapshot(meta.clone(), data.to_vec()));
    }

    fn save_state(&mut self, applied: u64, state: &[u8]) {
        self.pending.push(Op::State(applied, state.to_vec()));
    }

    fn sync(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(|e| e.to_string())?;
        // Durable either way; quick repair would also persist the allocator state with every
        // batch, which doubles the commit time on the Raft critical path (0.2 vs 0.4 ms p50
        // here). The price is a full repair on open after a crash: 0.2 s for a 200 MB log.
        tx.set_quick_repair(false);
        tx.set_durability(Durability::Immediate).map_err(|e| e.to_string())?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(|e| e.to_string())?;
            let mut meta = tx.open_table(META).map_err(|e| e.to_string())?;
            for op in self.pending.drain(..) {
                match op {
                    Op::Append(es) => {
                        if let Some(first) = es.first() {
                            let stale: Vec<u64> = entries
                                .range(first.index..)
                                .map_err(|e| e.to_string())?
                                .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                                .collect();
                            for k in stale {
                                entries.remove(k).map_err(|e| e.to_string())?;
                            }
                        }
                        for e in es {
                            entries
                                .insert(e.index, encode_entry(&e).as_slice())
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    Op::Hard(hs) => {
                        meta.insert(
                            "hard_state",
                            hs.write_to_bytes().map_err(|e| e.to_string())?.as_slice(),
                        )
                        .map_err(|e| e.to_string())?;
                    }
                    Op::Conf(cs) => {
                        meta.insert(
                            "conf_state",
                            cs.write_to_bytes().map_err(|e| e.to_string())?.as_slice(),
                        )
                        .map_err(|e| e.to_string())?;
                    }
                    Op::Snapshot(m, data) => {
                        let upto: Vec<u64> = entries
                            .range(..=m.index)
                            .map_err(|e| e.to_string())?
                            .filter_map(|r| r.ok().map(|(k, _)| k.value()))
                            .collect();
                        for k in upto {
                            entries.remove(k).map_err(|e| e.to_string())?;
                        }
                        meta.insert(
                            "snapshot_meta",
                            m.write_to_bytes().map_err(|e| e.to_string())?.as_slice(),
                        )
                        .map_err(|e| e.to_string())?;
                        meta.insert("snapshot_data", data.as_slice()).map_err(|e| e.to_string())?;
                    }
                    Op::State(applied, state) => {
                        let mut v = applied.to_le_bytes().to_vec();
                        v.extend_from_slice(&state);
                        meta.insert("state", v.as_slice()).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }

    fn load(&self) -> Result<Persisted, String> {
        let tx = self.db.begin_read().map_err(|e| e.to_string())?;
        let entries_t = tx.open_table(ENTRIES).map_err(|e| e.to_string())?;
        let meta = tx.open_table(META).map_err(|e| e.to_string())?;
        let get = |k: &str| -> Result<Option<Vec<u8>>, String> {
            Ok(meta.get(k).map_err(|e| e.to_string())?.map(|v| v.value().to_vec()))
        };
        let mut p = Persisted::default();
        if let Some(b) = get("hard_state")? {
            p.hard_state = HardState::parse_from_bytes(&b).map_err(|e| e.to_string())?;
        }
        if let Some(b) = get("conf_state")? {
            p.conf_state = ConfState::parse_from_bytes(&b).map_err(|e| e.to_string())?;
        }
        if let Some(b) = get("snapshot_meta")? {
            let m = SnapshotMetadata::parse_from_bytes(&b).map_err(|e| e.to_string())?;
            p.snapshot = Some((m, get("snapshot_data")?.unwrap_or_default()));
        }
        if let Some(b) = get("state")?
            && b.len() >= 8
        {
            let applied = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            p.state = Some((applied, b[8..].to_vec()));
        }
        for item in entries_t.iter().map_err(|e| e.to_string())? {
            let (_, v) = item.map_err(|e| e.to_string())?;
            p.entries.push(decode_entry(v.value())?);
        }
        Ok(p)
    }
}
