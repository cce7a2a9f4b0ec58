//! Store tests: round trips, dedup, GC, and crash safety under a disk that drops every
//! unsynced write (and, in torn mode, keeps a random subset of unsynced pages).

use std::path::Path;
use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::crash::CrashVfs;
use super::*;

fn block(seed: u64, len: usize) -> (Cid, Vec<u8>) {
    let mut bytes = vec![0u8; len];
    ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut bytes);
    (Cid::raw(&bytes), bytes)
}

/// Puts `blocks` in one committed group.
fn put_all(store: &Store, blocks: &[(Cid, Vec<u8>)]) {
    let mut w = store.writer().unwrap();
    for (cid, bytes) in blocks {
        w.put(*cid, bytes).unwrap();
    }
    w.commit().unwrap();
}

/// Flips the lowest bit of byte `at` of `cid`'s stored bytes, in its pack under `dir`.
fn flip_pack_byte(store: &Store, dir: &Path, cid: &Cid, at: usize) {
    let loc = store.locate(cid).unwrap().unwrap();
    let path = dir.join("packs").join(pack::file_name(loc.pack));
    let mut raw = std::fs::read(&path).unwrap();
    raw[loc.offset as usize + at] ^= 1;
    std::fs::write(&path, raw).unwrap();
}

fn record(name: &str) -> RootRecord {
    RootRecord {
        kind: "file".into(),
        len: 0,
        chunks: 0,
        hole_bytes: 0,
        added_ms: 0,
        name: name.into(),
        source: None,
    }
}

#[test]
fn blocks_round_trip_and_deduplicate() {
    // A stored block reads back; storing it again writes nothing; a reopened store keeps it.
    let dir = tempfile::tempdir().unwrap();
    let (cid, bytes) = block(1, 70_000);
    {
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        assert!(w.put(cid, &bytes).unwrap());
        assert!(!w.put(cid, &bytes).unwrap());
        w.commit().unwrap();
        drop(w);
        let mut w = store.writer().unwrap();
        assert!(!w.put(cid, &bytes).unwrap());
        assert_eq!(w.stored_bytes(), 0);
        w.commit().unwrap();
        drop(w);
        assert_eq!(store.get(&cid).unwrap().unwrap(), bytes);
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get(&cid).unwrap().unwrap(), bytes);
    assert_eq!(store.get(&Cid::raw(b"absent")).unwrap(), None);
}

#[test]
fn a_second_process_is_locked_out() {
    // Two opens of one store in one machine: the second is refused with Locked.
    let dir = tempfile::tempdir().unwrap();
    let _a = Store::open(dir.path()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked(_))));
}

#[test]
fn corrupt_bytes_are_never_returned() {
    // Flipping a byte of a pack makes get() fail with Corrupt and verify_all name the block.
    let dir = tempfile::tempdir().unwrap();
    let (cid, bytes) = block(2, 5000);
    let store = Store::open(dir.path()).unwrap();
    put_all(&store, &[(cid, bytes)]);
    flip_pack_byte(&store, dir.path(), &cid, 10);
    assert!(matches!(store.get(&cid), Err(StoreError::Corrupt { .. })));
    let (checked, bad) = store.verify_all(&mut |_| {}).unwrap();
    assert_eq!(checked, 1);
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].0, cid);
}

#[test]
fn batches_read_neighbours_together_and_never_return_bad_bytes() {
    // A batch covers the CIDs asked for in order: stored blocks with their bytes (also when
    // asked out of pack order, or twice), absent ones marked, a corrupted one refused alone;
    // it stops before its buffer would overflow, and the next batch carries on.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let blocks: Vec<_> = (0..40u64).map(|i| block(100 + i, 1000 + 26_000 * i as usize)).collect();
    put_all(&store, &blocks);
    let bad = blocks[5].0;
    flip_pack_byte(&store, dir.path(), &bad, 3);
    let absent = Cid::raw(b"absent");
    let mut ask: Vec<Cid> = vec![blocks[3].0, absent, blocks[1].0, blocks[2].0, blocks[2].0];
    ask.extend(blocks[4..].iter().map(|b| b.0));
    let mut seen = 0;
    let mut batches = 0;
    while seen < ask.len() {
        let batch = store.read_batch(&ask[seen..]).unwrap();
        assert!(!batch.is_empty());
        batches += 1;
        for i in 0..batch.len() {
            let (cid, got) = batch.block(i);
            assert_eq!(cid, ask[seen + i]);
            match got {
                Ok(bytes) => {
                    let want = &blocks.iter().find(|b| b.0 == cid).unwrap().1;
                    assert_eq!(bytes, want.as_slice());
                }
                Err(None) => assert_eq!(cid, absent),
                Err(Some(why)) => {
                    assert_eq!(cid, bad);
                    assert!(why.contains("mismatch"), "{why}");
                }
            }
        }
        seen += batch.len();
    }
    // 40 blocks of 1 KB to 1 MB are about 20 MB: more than one batch, and each nearly full.
    let total: usize = blocks.iter().map(|b| b.1.len()).sum();
    assert!(batches > 1 && batches <= total / (BATCH_BYTES / 2) + 1, "{batches} batches");
}

/// Rewrites `cid`'s index entry as `f` makes it.
fn edit_entry(store: &Store, cid: &Cid, f: impl FnOnce(&mut Vec<u8>)) {
    let tx = store.db.begin_write().unwrap();
    {
        let mut table = tx.open_table(CHUNKS).unwrap();
        let mut value = table.get(cid.digest()).unwrap().unwrap().value().to_vec();
        f(&mut value);
        table.insert(cid.digest(), value.as_slice()).unwrap();
    }
    tx.commit().unwrap();
}

#[test]
fn served_blocks_are_checked_by_their_crc_and_older_entries_by_their_cid() {
    // Entries carry the CRC-32C of their bytes. One damaged in its CRC is refused for serving
    // (the bytes are fine, so get() returns them) and named by verify_all; a version 1 entry
    // (no CRC) is served checked against its CID, and refused once its bytes are damaged.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let blocks: Vec<_> = (0..4u64).map(|i| block(500 + i, 3000 + 700 * i as usize)).collect();
    put_all(&store, &blocks);
    for (cid, bytes) in &blocks {
        assert_eq!(store.locate(cid).unwrap().unwrap().crc, Some(pack::crc32c(bytes)));
    }
    // Block 0: its CRC damaged. Blocks 1 and 2: version 1 entries, block 2's bytes damaged.
    edit_entry(&store, &blocks[0].0, |v| v[20] ^= 4);
    for (cid, _) in &blocks[1..3] {
        edit_entry(&store, cid, |v| {
            v.truncate(v.len() - 4);
            v[0] = 1;
        });
    }
    assert_eq!(store.locate(&blocks[2].0).unwrap().unwrap().crc, None);
    flip_pack_byte(&store, dir.path(), &blocks[2].0, 99);

    let ask: Vec<Cid> = blocks.iter().map(|b| b.0).collect();
    let batch = store.read_batch(&ask).unwrap();
    assert_eq!(batch.len(), 4);
    assert_eq!(batch.block(0).1, Err(Some("checksum mismatch")));
    assert_eq!(batch.block(1).1, Ok(blocks[1].1.as_slice()));
    assert_eq!(batch.block(2).1, Err(Some("hash mismatch")));
    assert_eq!(batch.block(3).1, Ok(blocks[3].1.as_slice()));
    assert_eq!(store.get(&blocks[0].0).unwrap().as_deref(), Some(blocks[0].1.as_slice()));
    let (checked, mut bad) = store.verify_all(&mut |_| {}).unwrap();
    assert_eq!(checked, 4);
    bad.sort_by_key(|(cid, _)| ask.iter().position(|c| c == cid));
    let names: Vec<_> = bad.iter().map(|(c, why)| (*c, why.as_str())).collect();
    assert_eq!(
        names,
        [(blocks[0].0, "damaged index entry (checksum)"), (blocks[2].0, "hash mismatch")]
    );
}

fn set_layout_version(dir: &Path, version: u8) {
    let db = Database::create(dir.join("index.redb")).unwrap();
    let tx = db.begin_write().unwrap();
    tx.open_table(META).unwrap().insert("version", [version].as_slice()).unwrap();
    tx.commit().unwrap();
}

#[test]
fn a_version_1_store_opens_and_is_marked_2_and_a_newer_one_is_refused() {
    // A store from before the CRC keeps its blocks; once opened it says version 2, so a
    // build that reads only version 1 entries refuses it instead of calling them damaged.
    let dir = tempfile::tempdir().unwrap();
    let (cid, bytes) = block(9, 4000);
    {
        let store = Store::open(dir.path()).unwrap();
        put_all(&store, &[(cid, bytes.clone())]);
        edit_entry(&store, &cid, |v| {
            v.truncate(v.len() - 4);
            v[0] = 1;
        });
    }
    set_layout_version(dir.path(), 1);
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.get(&cid).unwrap().as_deref(), Some(bytes.as_slice()));
        let tx = store.db.begin_read().unwrap();
        let meta = tx.open_table(META).unwrap();
        assert_eq!(meta.get("version").unwrap().unwrap().value(), [2]);
    }
    set_layout_version(dir.path(), 3);
    match Store::open(dir.path()) {
        Err(StoreError::Metadata(why)) => assert!(why.contains("version [3]"), "{why}"),
        other => panic!("a version 3 store opened: {:?}", other.map(|_| ())),
    }
}

#[test]
fn gc_removes_unreachable_blocks_and_keeps_rooted_ones() {
    // Blocks under a root survive GC; orphans go, and a mostly-dead pack is rewritten.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let config = mycel_chunker::Config::default();
    let (kept, kept_bytes) = block(3, 1000);
    let mut w = store.writer().unwrap();
    for i in 0..50 {
        let (c, b) = block(100 + i, 20_000);
        w.put(c, &b).unwrap();
    }
    w.put(kept, &kept_bytes).unwrap();
    let root = manifest::Root { kind: Kind::File, config, len: 1000, tree: Some(kept) }.encode();
    w.put(root.cid, &root.bytes).unwrap();
    w.add_root(root.cid, record("kept"));
    w.commit().unwrap();
    drop(w);
    // Start a new pack so the old one can be rewritten.
    {
        let mut w = store.writer().unwrap();
        w.start_pack(w.pack + 1).unwrap();
        w.commit().unwrap();
    }
    let report = store.gc().unwrap();
    assert_eq!(report.removed_blocks, 50);
    assert_eq!(report.packs_rewritten, 1);
    assert_eq!(store.get(&kept).unwrap().unwrap(), kept_bytes);
    assert!(store.get(&root.cid).unwrap().is_some());
    assert_eq!(store.stats().unwrap().blocks, 2);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get(&kept).unwrap().unwrap(), kept_bytes);
}

/// Runs a workload of group commits on `vfs`, returning the blocks whose commit returned.
fn workload(vfs: &CrashVfs, dir: &Path, seed: u64) -> Vec<(Cid, Vec<u8>)> {
    workload_of(vfs, dir, 6, 4, |batch, i| {
        block(seed * 1000 + batch * 10 + i, 3000 + (i as usize) * 5000)
    })
}

/// `batches` group commits of `per_batch` blocks each, block `i` of batch `b` being
/// `make(b, i)`.
fn workload_of(
    vfs: &CrashVfs,
    dir: &Path,
    batches: u64,
    per_batch: u64,
    make: impl Fn(u64, u64) -> (Cid, Vec<u8>),
) -> Vec<(Cid, Vec<u8>)> {
    let mut acked = Vec::new();
    let Ok(store) = Store::open_with(Arc::new(vfs.clone()), dir) else {
        return acked;
    };
    for batch in 0..batches {
        let Ok(mut w) = store.writer() else { return acked };
        let mut group = Vec::new();
        for i in 0..per_batch {
            let (cid, bytes) = make(batch, i);
            if w.put(cid, &bytes).is_err() {
                return acked;
            }
            group.push((cid, bytes));
        }
        if w.commit().is_err() {
            return acked;
        }
        acked.extend(group);
    }
    acked
}

/// Reopens the crashed disk and checks it: every acknowledged block back, nothing corrupt,
/// new writes accepted.
fn check_after_crash(
    vfs: &CrashVfs,
    dir: &Path,
    acked: &[(Cid, Vec<u8>)],
    step: u64,
    torn: Option<u64>,
) {
    let after = vfs.after_crash(torn);
    let store = Store::open_with(Arc::new(after), dir)
        .unwrap_or_else(|e| panic!("reopen after crash at step {step} torn={torn:?}: {e}"));
    for (cid, bytes) in acked {
        let got = store.get(cid).unwrap_or_else(|e| panic!("step={step}: {e}"));
        assert_eq!(got.as_ref(), Some(bytes), "acknowledged block lost at step {step}");
    }
    let (_, bad) = store.verify_all(&mut |_| {}).unwrap();
    assert!(bad.is_empty(), "corrupt blocks after crash at step {step}: {bad:?}");
    let mut w = store.writer().unwrap();
    let (cid, bytes) = block(999, 1234);
    w.put(cid, &bytes).unwrap();
    w.commit().unwrap();
    drop(w);
    assert_eq!(store.get(&cid).unwrap().unwrap(), bytes);
}

#[test]
fn groups_larger_than_the_stage_write_in_flight_and_crash_safely() {
    // Groups of 12 MiB go out as several stage writes, two in flight at once on threads of
    // their own. A crash (every later IO failing, as a dying disk) at every step: the
    // commit under way fails, and what was acknowledged before is all there.
    let dir = Path::new("/mycel-crash-large");
    // The device is slow, so a commit that did not wait for its writes would sync and
    // index blocks whose bytes are still on their way.
    // Blocks made up front, so the puts take no time beside the writes.
    let blocks: Vec<(Cid, Vec<u8>)> = (0..36).map(|i| block(2000 + i, 1 << 20)).collect();
    let large = |vfs: &CrashVfs| {
        // Full stage writes (about 8 MiB) only: the padded tail a commit writes itself is
        // smaller.
        vfs.slow_large_writes(6 << 20, std::time::Duration::from_millis(10));
        workload_of(vfs, dir, 3, 12, |batch, i| blocks[(batch * 12 + i) as usize].clone())
    };
    let total_steps = {
        let vfs = CrashVfs::new();
        assert_eq!(large(&vfs).len(), 36, "the workload runs to the end without a crash");
        vfs.steps()
    };
    for step in 1..=total_steps {
        let vfs = CrashVfs::new();
        vfs.crash_at(step);
        let acked = large(&vfs);
        assert!(vfs.crashed(), "step={step}");
        assert_eq!(acked.len() % 12, 0, "only whole groups are acknowledged");
        check_after_crash(&vfs, dir, &acked, step, None);
    }
}

#[test]
fn crashes_lose_no_acknowledged_block_and_return_no_corrupt_one() {
    // At every crash point of a workload (dropping all unsynced writes, and again keeping a
    // random subset of unsynced pages), the reopened store holds every acknowledged block,
    // returns correct bytes for everything it returns, and accepts new writes.
    let dir = Path::new("/mycel-crash");
    let total_steps = {
        let vfs = CrashVfs::new();
        let acked = workload(&vfs, dir, 1);
        assert_eq!(acked.len(), 24, "the workload runs to the end without a crash");
        vfs.steps()
    };
    assert!(total_steps > 30, "steps={total_steps}");
    let mut crashes = 0;
    for step in 1..=total_steps {
        for torn in [None, Some(step)] {
            let vfs = CrashVfs::new();
            vfs.crash_at(step);
            let acked = workload(&vfs, dir, 1);
            assert!(vfs.crashed(), "step={step}");
            crashes += 1;
            check_after_crash(&vfs, dir, &acked, step, torn);
        }
    }
    assert!(crashes >= 60);
}
