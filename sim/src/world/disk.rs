//! The simulated chunk store's write path: write errors, the sync that makes writes
//! durable, and what a crash does to writes not yet synced.
//!
//! As in the daemon's store, chunk bytes are synced before anything that depends on them is
//! acknowledged: an object is synced before its node claims it complete (announces it or
//! answers who-has with "complete"), published content and state objects are synced as
//! they are written, and fetched blocks are synced every housekeeping round. A crash loses
//! each unsynced block or leaves it torn (garbled bytes under its CID); on restart the
//! store's recovery verifies what was unsynced and drops torn blocks. A write error loses
//! one fetched block while the fetch core believes it stored (the core has no input for a
//! failed write); the node must then neither claim the object nor serve the block.
//!
//! The fault bound: only blocks of objects not yet complete on the writer are at risk, so
//! acknowledged data keeps its healthy copies.

use super::*;

/// With torn writes on, the probability that a node crashes right after writing a fetched
/// block.
const CRASH_MID_WRITE: f64 = 0.002;

impl World {
    /// A block a fetch of `root` delivered, written to node `i`'s store: it may fail (a
    /// write error during the faulty phase), else it is unsynced until the next sync.
    pub(super) fn store_fetched(&mut self, i: usize, root: Cid, cid: Cid, bytes: &[u8]) {
        let rate = if self.healed_at.is_none() { self.mix.write_error } else { 0.0 };
        let state = matches!(self.nodes[i].fetches.get(&root), Some((_, Purpose::State)));
        if rate > 0.0 && !state && self.rng.gen_bool(rate) {
            self.fault("write-error", i as u64);
            self.nodes[i].write_failed.entry(root).or_default().insert(cid);
            return;
        }
        let fresh = !self.nodes[i].store.contains_key(&cid);
        self.store(i, cid, bytes);
        if fresh {
            self.nodes[i].unsynced.insert(cid);
        }
        // A chosen crash point: right after a write, before the sync (crashes at random
        // times rarely find a fetch half written).
        if self.mix.torn_writes && self.healed_at.is_none() && self.rng.gen_bool(CRASH_MID_WRITE) {
            self.crash(i);
            self.fault("crash-mid-write", i as u64);
            let at = self.now + self.rng.gen_range(50..5_000);
            self.push(at, Ev::Fault(Fault::Restart(i)));
        }
    }

    /// Node `i` syncs its store: every write so far is durable.
    pub(super) fn sync_store(&mut self, i: usize) {
        self.nodes[i].unsynced.clear();
    }

    /// At a crash: every unsynced block is lost or torn (or, by luck, survives); the
    /// recovery at restart looks at them.
    pub(super) fn tear_unsynced(&mut self, i: usize) {
        let unsynced = std::mem::take(&mut self.nodes[i].unsynced);
        if !self.mix.torn_writes {
            return;
        }
        for cid in unsynced {
            match self.rng.gen_range(0..4) {
                0 | 1 => {
                    self.nodes[i].store.remove(&cid);
                    self.fault("write-lost", i as u64);
                }
                2 => {
                    let Some(b) = self.nodes[i].store.get(&cid) else { continue };
                    // A torn write: the tail never reached the disk.
                    let mut v = b.to_vec();
                    let keep = v.len() / 2;
                    v[keep..].fill(0);
                    if v.is_empty() {
                        v.push(0xff);
                    }
                    self.nodes[i].store.insert(cid, Rc::from(v));
                    self.fault("write-torn", i as u64);
                }
                _ => {}
            }
            self.nodes[i].recovering.insert(cid);
        }
    }

    /// At restart: the store's recovery verifies the blocks that were unsynced at the crash
    /// and drops the torn ones; none may remain.
    pub(super) fn recover_store(&mut self, i: usize) {
        let suspects = std::mem::take(&mut self.nodes[i].recovering);
        for cid in suspects {
            let torn = self.nodes[i].store.get(&cid).is_some_and(|b| !cid.matches(b));
            if torn {
                self.nodes[i].store.remove(&cid);
                self.record("torn-dropped", i as u64, 0);
            }
        }
    }

    /// Before node `i` tells anyone what it holds: it claims no object with a block whose
    /// write failed and that it does not hold.
    pub(super) fn check_claims(&mut self, i: usize) {
        if self.nodes[i].write_failed.is_empty() {
            return;
        }
        let n = &self.nodes[i];
        let mut bad = None;
        for (root, cids) in &n.write_failed {
            if n.complete.contains(root) && cids.iter().any(|c| !n.store.contains_key(c)) {
                bad = Some(*root);
            }
        }
        let n = &mut self.nodes[i];
        let store = &n.store;
        let (complete, fetches) = (&n.complete, &n.fetches);
        n.write_failed.retain(|root, cids| {
            cids.retain(|c| !store.contains_key(c));
            !cids.is_empty() && (complete.contains(root) || fetches.contains_key(root))
        });
        if let Some(root) = bad {
            let detail =
                format!("node {i} claims {root} complete, but a write of one of its blocks failed");
            self.checker.fail(self.now, "safety:claims-unwritten-chunk", detail);
        }
    }
}
