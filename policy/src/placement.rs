//! Placement: which nodes should hold a pin.
//!
//! Each node gets a weight from what it offers (free capacity, load, round-trip time), in
//! coarse classes so that small fluctuations never reorder anything, and a pin ranks nodes
//! by weighted rendezvous hashing: `score = -weight / ln(u)` with `u` a uniform draw from
//! BLAKE3(pin root, node id). Adding or removing one node changes only the placements in
//! which that node wins or loses a place, about `replicas / nodes` of them.
//!
//! Choosing `n` nodes spreads across zones: the best-ranked node of each zone not yet used
//! is taken first (zones in the order of their best node), then the remaining places go by
//! rank.

use std::collections::{BTreeMap, BTreeSet};

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// PeerId bytes.
    pub id: Vec<u8>,
    /// Zone.
    pub zone: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Free store bytes it reports.
    pub free_bytes: u64,
    /// Transfers in progress it reports.
    pub load: u32,
    /// Measured round-trip time from the deciding node, if known.
    pub rtt_ms: Option<u32>,
}

const GIB: u64 = 1 << 30;

/// The node's weight, from coarse classes of capacity, load and latency.
pub fn weight(c: &Candidate) -> f64 {
    // Free capacity, rounded down to a power of two GiB (proportional, as storage weights
    // are, but steady while free space drifts within a doubling).
    let cap = (c.free_bytes / GIB).checked_ilog2().map_or(0.5, |b| f64::from(1u32 << b.min(30)));
    // Load: halves every 8 transfers in progress.
    let load_class = 1 + (c.load / 8).min(15);
    // Latency: a class per 50 ms.
    let rtt_class = 1 + c.rtt_ms.map_or(1, |r| (r / 50).min(15));
    cap / f64::from(load_class) / f64::from(rtt_class)
}

/// `ln(u)` of the uniform draw `u` in (0, 1) from BLAKE3(root, node): the part of a score
/// that does not change while the node's weight does.
fn log_draw(root: &[u8], node: &[u8]) -> f64 {
    let mut h = blake3::Hasher::new();
    h.update(&(root.len() as u64).to_le_bytes());
    h.update(root);
    h.update(node);
    let bytes = h.finalize();
    let mut x = [0u8; 8];
    x.copy_from_slice(&bytes.as_bytes()[..8]);
    // Uniform in (0, 1): 53 bits, never 0 or 1.
    let u = ((u64::from_le_bytes(x) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    u.ln()
}

/// The rendezvous score of `node` for `root` at `weight`.
pub fn score(root: &[u8], node: &[u8], weight: f64) -> f64 {
    -weight / log_draw(root, node)
}

/// One root's draws.
#[derive(Debug, Default)]
struct Draws {
    /// Every node drawn: (node id, ln(u)).
    drawn: Vec<(Vec<u8>, f64)>,
    /// Node fingerprint -> index in `drawn`.
    by_node: BTreeMap<u64, usize>,
    /// Indices in `drawn` of the last ranking's candidates, in their order: a planner ranks
    /// the same members in the same order every period, so a candidate is checked against
    /// one slot and the ordered map is searched only for what moved.
    last: Vec<usize>,
}

impl Draws {
    /// `node`'s index in `drawn`, drawing it if new.
    fn find_or_draw(&mut self, root: &[u8], node: &[u8]) -> usize {
        let key = fingerprint(node);
        match self.by_node.get(&key) {
            Some(&k) if self.drawn[k].0 == node => k,
            found => {
                self.drawn.push((node.to_vec(), log_draw(root, node)));
                // Another node with the same last 8 bytes keeps the slot it has.
                if found.is_none() {
                    self.by_node.insert(key, self.drawn.len() - 1);
                }
                self.drawn.len() - 1
            }
        }
    }
}

/// Remembered draws, so that planning the same pins over the same nodes again (every plan
/// period) costs no hashing. Only the draw is kept (weights change with every report); the
/// result is exactly [`score`]'s. Bounded: past [`ScoreCache::ENTRIES_MAX`] it starts over.
#[derive(Debug, Default)]
pub struct ScoreCache {
    by_root: BTreeMap<Vec<u8>, Draws>,
    entries: usize,
}

/// A node id's last 8 bytes (PeerIds share their first bytes): an ordered key that compares
/// as one integer. Hits are checked against the whole id.
fn fingerprint(node: &[u8]) -> u64 {
    node.iter().rev().take(8).fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

impl ScoreCache {
    /// Most draws kept (about 100 bytes each).
    pub const ENTRIES_MAX: usize = 1 << 20;

    /// [`score`] of each candidate for `root`, in order, remembered.
    pub fn scores(&mut self, root: &[u8], candidates: &[&Candidate]) -> Vec<f64> {
        if self.entries >= Self::ENTRIES_MAX {
            self.by_root.clear();
            self.entries = 0;
        }
        let draws = match self.by_root.get_mut(root) {
            Some(d) => d,
            None => self.by_root.entry(root.to_vec()).or_default(),
        };
        let before = draws.drawn.len();
        let mut last = Vec::with_capacity(candidates.len());
        let scores = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let k = match draws.last.get(i) {
                    Some(&k) if draws.drawn[k].0 == c.id => k,
                    _ => draws.find_or_draw(root, &c.id),
                };
                last.push(k);
                -weight(c) / draws.drawn[k].1
            })
            .collect();
        draws.last = last;
        self.entries += draws.drawn.len() - before;
        scores
    }
}

/// Indices of `candidates` from best to worst for `root`; ties go to the smaller id.
pub fn rank(root: &[u8], candidates: &[Candidate]) -> Vec<usize> {
    let refs: Vec<&Candidate> = candidates.iter().collect();
    rank_cached(root, &refs, &mut ScoreCache::default())
}

/// [`rank`] over borrowed candidates, with remembered draws.
pub fn rank_cached(root: &[u8], candidates: &[&Candidate], cache: &mut ScoreCache) -> Vec<usize> {
    let scores = cache.scores(root, candidates);
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b].total_cmp(&scores[a]).then_with(|| candidates[a].id.cmp(&candidates[b].id))
    });
    order
}

/// Up to `n` of `ranked` (indices into `candidates`), spread across zones: zones not in
/// `used_zones` first, each by its best node, then the rest by rank.
pub fn choose<C: std::borrow::Borrow<Candidate>>(
    candidates: &[C],
    ranked: &[usize],
    n: usize,
    used_zones: &BTreeSet<String>,
) -> Vec<usize> {
    let mut zones = used_zones.clone();
    let mut chosen = Vec::new();
    for &i in ranked {
        if chosen.len() == n {
            return chosen;
        }
        if zones.insert(candidates[i].borrow().zone.clone()) {
            chosen.push(i);
        }
    }
    for &i in ranked {
        if chosen.len() == n {
            break;
        }
        if !chosen.contains(&i) {
            chosen.push(i);
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(i: u32, zone: &str) -> Candidate {
        Candidate {
            id: i.to_be_bytes().to_vec(),
            zone: zone.into(),
            tags: vec![],
            free_bytes: 100 * GIB,
            load: 0,
            rtt_ms: Some(10),
        }
    }

    fn place(root: u32, nodes: &[Candidate], n: usize) -> BTreeSet<Vec<u8>> {
        let r = root.to_be_bytes();
        let ranked = rank(&r, nodes);
        choose(nodes, &ranked, n, &BTreeSet::new())
            .into_iter()
            .map(|i| nodes[i].id.clone())
            .collect()
    }

    #[test]
    fn adding_or_removing_a_node_moves_few_replicas() {
        // 1,000 pins × 3 replicas over 20 nodes in 2 zones: a 21st node takes about 3/21 of
        // the places and nothing else moves; removing a node moves only its own places.
        let nodes: Vec<_> = (0..20).map(|i| node(i, if i % 2 == 0 { "a" } else { "b" })).collect();
        let mut grown = nodes.clone();
        grown.push(node(20, "a"));
        let shrunk: Vec<_> = nodes.iter().filter(|c| c.id != 7u32.to_be_bytes()).cloned().collect();
        let (mut moved_add, mut moved_rm, mut lost) = (0, 0, 0);
        for root in 0..1000 {
            let before = place(root, &nodes, 3);
            let after = place(root, &grown, 3);
            moved_add += before.difference(&after).count();
            let after_rm = place(root, &shrunk, 3);
            lost += usize::from(before.contains(7u32.to_be_bytes().as_slice()));
            moved_rm += before.difference(&after_rm).count();
        }
        assert!(moved_add < 3000 * 2 / 21, "adding moved {moved_add} of 3000 places");
        assert_eq!(moved_rm, lost, "removing moves only the removed node's places");
    }

    #[test]
    fn remembered_scores_are_the_scores() {
        // The cache keeps draws, not scores: a weight that changed between plans still
        // counts, and every answer equals the uncached one.
        let mut cache = ScoreCache::default();
        let mut nodes: Vec<_> = (0..50).map(|i| node(i, "a")).collect();
        for round in 0..3u64 {
            for c in &mut nodes {
                c.load = (round as u32) * 9;
            }
            for root in 0..20u32 {
                let r = root.to_be_bytes();
                let refs: Vec<&Candidate> = nodes.iter().collect();
                assert_eq!(rank_cached(&r, &refs, &mut cache), rank(&r, &nodes));
                // In the same order, in another (every slot moved), and a subset.
                let reversed: Vec<&Candidate> = nodes.iter().rev().collect();
                let odd: Vec<&Candidate> = nodes.iter().skip(1).step_by(2).collect();
                for refs in [&refs, &reversed, &odd, &refs] {
                    let want: Vec<u64> =
                        refs.iter().map(|c| score(&r, &c.id, weight(c)).to_bits()).collect();
                    let got: Vec<u64> =
                        cache.scores(&r, refs).into_iter().map(f64::to_bits).collect();
                    assert_eq!(got, want);
                }
            }
        }
        assert_eq!(cache.entries, 20 * 50, "one draw per root and node");
    }

    #[test]
    fn nodes_sharing_a_fingerprint_get_their_own_draws() {
        // Ids equal in their last 8 bytes (the cache's ordered key) differ in the first.
        let nodes: Vec<Candidate> = (0..6u8)
            .map(|i| Candidate { id: [&[i][..], &[7; 12]].concat(), ..node(0, "a") })
            .collect();
        let mut cache = ScoreCache::default();
        let refs: Vec<&Candidate> = nodes.iter().collect();
        let rev: Vec<&Candidate> = nodes.iter().rev().collect();
        for refs in [&refs, &rev, &refs] {
            let want: Vec<u64> =
                refs.iter().map(|c| score(b"root", &c.id, weight(c)).to_bits()).collect();
            let got: Vec<u64> = cache.scores(b"root", refs).into_iter().map(f64::to_bits).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn choices_spread_across_zones_and_prefer_capacity() {
        let nodes: Vec<_> = (0..9).map(|i| node(i, ["a", "b", "c"][i as usize % 3])).collect();
        for root in 0..100 {
            let ids = place(root, &nodes, 3);
            let zones: BTreeSet<_> =
                nodes.iter().filter(|c| ids.contains(&c.id)).map(|c| c.zone.clone()).collect();
            assert_eq!(zones.len(), 3, "one replica per zone");
        }
        // A node with 40x the free space wins far more often than its share.
        let mut nodes: Vec<_> = (0..10).map(|i| node(i, "a")).collect();
        nodes[0].free_bytes = 4096 * GIB;
        let wins = (0..1000).filter(|r| place(*r, &nodes, 1).contains(&nodes[0].id)).count();
        assert!(wins > 500, "big node won {wins} of 1000");
        assert!(weight(&node(0, "a")) > weight(&Candidate { load: 64, ..node(0, "a") }));
    }
}
