//! Blocks read together, for serving a want list.
//!
//! A want list names blocks a fetcher lacks; a holder usually stores them side by side (a
//! pack holds an object's blocks in the order they were added or fetched). They are read
//! with one direct read per run of neighbouring blocks into a reused aligned buffer: no page
//! cache to fill and copy out of (on the benchmark VM a buffered read of cold pack data cost
//! more CPU than encrypting it), one system call per run, and blocks served from the buffer
//! in place. Every block is checked before it is handed out: against the CRC-32C its index
//! entry took when it was stored (itself checked against the CID then), or against its CID
//! for entries older than the CRC. The peer checks the CID on arrival.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use mycel_chunker::{Cid, NODE_BYTES_MAX};
use redb::ReadableDatabase;

use super::pack::Location;
use super::{AlignedBuf, CHUNKS, STAGE_ALIGN, Store, StoreError, index_err};

/// Buffer bytes of one batch: the blocks read together, at most.
pub const BATCH_BYTES: usize = 2 << 20;
/// Two blocks further apart than this in a pack are read separately.
const RUN_GAP_BYTES: u64 = 64 << 10;
/// Idle batch buffers kept for reuse.
const SPARE_BUFFERS: usize = 8;

const _: () = assert!(NODE_BYTES_MAX + 2 * STAGE_ALIGN <= BATCH_BYTES, "one block always fits");

/// One block of a [`Batch`].
#[derive(Debug)]
enum Slot {
    /// Verified bytes at this range of the buffer.
    Bytes(Range<usize>),
    /// Not stored here.
    Missing,
    /// Stored, but unreadable or not matching its CID (never served).
    Corrupt(String),
}

/// The first blocks of a want list, read and verified (see [`Store::read_batch`]).
#[derive(Debug)]
pub struct Batch {
    buf: AlignedBuf,
    blocks: Vec<(Cid, Slot)>,
    pool: Arc<Mutex<Vec<AlignedBuf>>>,
}

impl Batch {
    /// How many of the CIDs asked for this batch covers (the first ones, in order).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether it covers none (never, for a non-empty request).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Block `i`: its CID and its verified bytes; `Err` says why it is not served
    /// (`None`: not stored here).
    pub fn block(&self, i: usize) -> (Cid, Result<&[u8], Option<&str>>) {
        let (cid, slot) = &self.blocks[i];
        let bytes = match slot {
            Slot::Bytes(r) => Ok(&self.buf.bytes()[r.clone()]),
            Slot::Missing => Err(None),
            Slot::Corrupt(why) => Err(Some(why.as_str())),
        };
        (*cid, bytes)
    }

    /// Block `i`'s bytes to change in place (the test-only corrupting server).
    pub fn block_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        match &self.blocks[i].1 {
            Slot::Bytes(r) => Some(&mut self.buf.bytes_mut()[r.clone()]),
            _ => None,
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let buf = std::mem::replace(&mut self.buf, AlignedBuf::empty());
        let mut pool = self.pool.lock().expect("read buffers lock");
        if buf.len == BATCH_BYTES && pool.len() < SPARE_BUFFERS {
            pool.push(buf);
        }
    }
}

/// Blocks read with one IO: a span of one pack, aligned for direct reads.
struct Run {
    pack: u32,
    /// Aligned file offsets.
    start: u64,
    end: u64,
    /// Where the span goes in the buffer.
    at: usize,
}

impl Store {
    /// Reads the first blocks of `cids` (at least one; as many as fit [`BATCH_BYTES`]):
    /// blocks neighbouring in a pack are read with one direct read, each is checked
    /// ([`Location::check`]). A block that is not stored, or cannot be read, or does not match
    /// is marked so in the batch, not an error.
    ///
    /// # Errors
    /// Index errors.
    pub fn read_batch(&self, cids: &[Cid]) -> Result<Batch, StoreError> {
        // Each CID with its location and run, if stored.
        let mut located: Vec<(Cid, Option<(Location, usize)>)> = Vec::new();
        let mut runs: Vec<Run> = Vec::new();
        let mut need = 0usize;
        {
            let tx = self.db.begin_read().map_err(index_err)?;
            let table = tx.open_table(CHUNKS).map_err(index_err)?;
            for cid in cids {
                let loc = match table.get(cid.digest()).map_err(index_err)? {
                    None => None,
                    Some(v) => Some(Location::decode(v.value()).ok_or_else(|| {
                        StoreError::Corrupt { cid: *cid, what: "damaged index entry".into() }
                    })?),
                };
                let Some(loc) = loc else {
                    located.push((*cid, None));
                    continue;
                };
                let align = STAGE_ALIGN as u64;
                let start = loc.offset / align * align;
                let end = (loc.offset + u64::from(loc.len)).div_ceil(align) * align;
                // Joins the run if it lies after the run's start and not far past its end.
                let joins = runs.last().is_some_and(|r| {
                    r.pack == loc.pack && start >= r.start && start <= r.end + RUN_GAP_BYTES
                });
                let grow = match runs.last() {
                    Some(r) if joins => end.saturating_sub(r.end) as usize,
                    _ => (end - start) as usize,
                };
                if need + grow > BATCH_BYTES && !located.is_empty() {
                    break;
                }
                need += grow;
                match runs.last_mut() {
                    Some(r) if joins => r.end = r.end.max(end),
                    _ => runs.push(Run { pack: loc.pack, start, end, at: 0 }),
                }
                located.push((*cid, Some((loc, runs.len() - 1))));
            }
        }
        let mut buf = self
            .read_buffers
            .lock()
            .expect("read buffers lock")
            .pop()
            .unwrap_or_else(|| AlignedBuf::with_len(BATCH_BYTES));
        // Read each run; a failed or short read marks only its own blocks.
        let mut at = 0usize;
        let mut read: Vec<Result<usize, String>> = Vec::with_capacity(runs.len());
        for run in &mut runs {
            run.at = at;
            let span = (run.end - run.start) as usize;
            let result = self.direct_pack_file(run.pack).map_err(|e| e.to_string()).and_then(|f| {
                f.read_upto(&mut buf.bytes_mut()[at..at + span], run.start)
                    .map_err(|e| e.to_string())
            });
            read.push(result);
            at += span;
        }
        let blocks = located
            .into_iter()
            .map(|(cid, at)| {
                let Some((loc, r)) = at else { return (cid, Slot::Missing) };
                let run = &runs[r];
                let from = run.at + (loc.offset - run.start) as usize;
                let to = from + loc.len as usize;
                let slot = match &read[r] {
                    Err(e) => Slot::Corrupt(e.clone()),
                    Ok(n) if to - run.at > *n => {
                        Slot::Corrupt("pack is shorter than the index says".into())
                    }
                    Ok(_) if !loc.check(&cid, &buf.bytes()[from..to]) => Slot::Corrupt(
                        if loc.crc.is_some() { "checksum mismatch" } else { "hash mismatch" }
                            .into(),
                    ),
                    Ok(_) => Slot::Bytes(from..to),
                };
                (cid, slot)
            })
            .collect();
        Ok(Batch { buf, blocks, pool: self.read_buffers.clone() })
    }
}
