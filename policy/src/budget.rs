//! Storage budget: capacity with high and low watermarks, and oldest-first eviction of
//! unpinned cache.
//!
//! When a node's used bytes pass the high watermark, cached objects that no pin needs on
//! this node are evicted, least recently used first, until use falls to the low watermark.
//! Pinned content is never evicted; if pinned content alone is above the high watermark,
//! the node reports that it is full (and placement stops choosing it, since its free bytes
//! fall short of new pins).

/// Watermarks as fractions of capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Watermarks {
    /// Eviction starts above this share of capacity.
    pub high: f64,
    /// Eviction stops at this share.
    pub low: f64,
}

impl Default for Watermarks {
    fn default() -> Watermarks {
        Watermarks { high: 0.90, low: 0.80 }
    }
}

impl Watermarks {
    /// Checks `0 < low <= high <= 1`.
    ///
    /// # Errors
    /// A message naming the bad value.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.low > 0.0 && self.low <= self.high && self.high <= 1.0) {
            return Err(format!(
                "watermarks must satisfy 0 < low <= high <= 1 (low {}, high {})",
                self.low, self.high
            ));
        }
        Ok(())
    }
}

/// One stored object, for eviction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cached {
    /// Root CID bytes.
    pub root: Vec<u8>,
    /// Bytes evicting it frees (its blocks no other kept object shares).
    pub bytes: u64,
    /// Last use (added, fetched or served), ms since the epoch.
    pub last_used_ms: u64,
    /// Needed on this node by a pin (a replica or pre-position): never evicted.
    pub pinned: bool,
}

/// What eviction decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Roots to evict, oldest first.
    pub evict: Vec<Vec<u8>>,
    /// Bytes they free.
    pub freed: u64,
    /// Pinned content alone keeps the node above its high watermark.
    pub full: bool,
}

/// Which cached objects to evict at `used` bytes of `capacity` (0: no budget).
pub fn evict(objects: &[Cached], used: u64, capacity: u64, marks: Watermarks) -> Eviction {
    let mut out = Eviction::default();
    if capacity == 0 || (used as f64) <= marks.high * capacity as f64 {
        return out;
    }
    let target = (marks.low * capacity as f64) as u64;
    let mut order: Vec<&Cached> = objects.iter().filter(|o| !o.pinned).collect();
    order.sort_by(|a, b| a.last_used_ms.cmp(&b.last_used_ms).then_with(|| a.root.cmp(&b.root)));
    let mut now_used = used;
    for o in order {
        if now_used <= target {
            break;
        }
        out.evict.push(o.root.clone());
        out.freed += o.bytes;
        now_used = now_used.saturating_sub(o.bytes);
    }
    out.full = (now_used as f64) > marks.high * capacity as f64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(r: u8, bytes: u64, at: u64, pinned: bool) -> Cached {
        Cached { root: vec![r], bytes, last_used_ms: at, pinned }
    }

    #[test]
    fn evicts_oldest_unpinned_down_to_the_low_watermark() {
        let objs =
            [obj(1, 30, 5, false), obj(2, 30, 1, true), obj(3, 20, 2, false), obj(4, 15, 9, false)];
        let m = Watermarks::default();
        assert_eq!(evict(&objs, 95, 100, m).evict, vec![vec![3]], "95 -> 75 after the oldest");
        assert_eq!(evict(&objs, 90, 100, m), Eviction::default(), "at the mark: nothing");
        assert_eq!(evict(&objs, 100, 100, m).evict, vec![vec![3]], "100 -> 80: at the low mark");
        let e = evict(&objs, 101, 100, m);
        assert_eq!(e.evict, vec![vec![3], vec![1]]);
        assert!(!e.full);
        let pinned = [obj(1, 95, 1, true), obj(2, 5, 2, false)];
        let e = evict(&pinned, 100, 100, m);
        assert_eq!(e.evict, vec![vec![2]], "cache goes, the pin stays");
        assert!(e.full, "pinned content alone is over the mark");
        assert_eq!(evict(&objs, 1000, 0, m), Eviction::default(), "no budget");
        assert!(Watermarks { high: 0.5, low: 0.6 }.validate().is_err());
    }
}
