//! Who holds what: periodic announcements out, a directory of holders in.
//!
//! [`Announcer`] decides when to publish a node's digest (every period, with seeded jitter,
//! sooner after new content) and builds it within [`wire`](crate::wire) bounds, rotating
//! through pages when a node holds more roots than fit one message. A publish that finds no
//! subscribed peer is retried after a short delay, never treated as fatal.
//!
//! [`Directory`] keeps, per root, the peers that announced or answered who-has for it, and
//! forgets them when they stop announcing. Gossip may drop, duplicate or reorder
//! announcements: an older sequence number never overwrites a newer one.

use std::collections::{BTreeMap, BTreeSet};

use mycel_chunker::Cid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::wire::{
    ADDR_BYTES_MAX, ANNOUNCE_ADDRS_MAX, ANNOUNCE_PARTIAL_MAX, ANNOUNCE_ROOTS_MAX, Announcement,
    Partial, WireError, ZONE_BYTES_MAX,
};
use crate::{PeerId, Timestamp};

/// Retry delay after a publish found no subscribed peer.
const PUBLISH_RETRY_MS: u64 = 1_000;
/// Roots tracked per node at most (64 pages).
const NODE_ROOTS_MAX: usize = 64 * ANNOUNCE_ROOTS_MAX;

/// What a node holds, as the announcer needs it.
#[derive(Clone, Debug, Default)]
pub struct Holdings {
    /// Complete roots, sorted.
    pub complete: Vec<Cid>,
    /// Objects being fetched.
    pub partial: Vec<Partial>,
    /// Transfers in progress.
    pub load: u32,
    /// Free store bytes.
    pub free_bytes: u64,
    /// Where this node listens (announced so members can dial it without an introduction);
    /// at most [`ANNOUNCE_ADDRS_MAX`] of them are sent, longer ones skipped.
    pub addrs: Vec<String>,
}

/// Decides when to announce and what.
#[derive(Debug)]
pub struct Announcer {
    node: PeerId,
    zone: String,
    period_ms: u64,
    next_at: Timestamp,
    seq: u64,
    page: u32,
    rng: ChaCha8Rng,
}

impl Announcer {
    /// An announcer publishing every `period_ms` (the first within one period).
    ///
    /// # Panics
    /// On a zone name over the wire limit or a zero period (checked in config).
    pub fn new(node: PeerId, zone: &str, period_ms: u64, now: Timestamp, seed: u64) -> Announcer {
        assert!(zone.len() <= ZONE_BYTES_MAX, "zone={zone}");
        assert!(period_ms > 0);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let first = now.plus_ms(rng.gen_range(0..period_ms.clamp(1, 1000)));
        Announcer { node, zone: zone.into(), period_ms, next_at: first, seq: 0, page: 0, rng }
    }

    /// Starts sequence numbers at `seq` (the daemon passes its start time in ms since the
    /// epoch, so a restarted node's announcements outrank the ones peers remember from before
    /// the restart; starting at 0 again, they would be ignored as stale).
    pub fn start_seq_at(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// When [`Announcer::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Timestamp {
        self.next_at
    }

    /// Publish soon: new content was added or fetched.
    pub fn announce_soon(&mut self, now: Timestamp) {
        self.next_at = self.next_at.min(now.plus_ms(50));
    }

    /// The driver could not publish (no subscribed peer yet): try again shortly.
    pub fn handle_publish_failed(&mut self, now: Timestamp) {
        self.next_at = now.plus_ms(PUBLISH_RETRY_MS.min(self.period_ms));
    }

    /// At or after [`Announcer::poll_timeout`]: the announcement to publish now.
    pub fn handle_timeout(&mut self, now: Timestamp, holdings: &Holdings) -> Option<Announcement> {
        if now < self.next_at {
            return None;
        }
        // Jitter spreads a fleet's announcements over the period.
        let jitter = self.rng.gen_range(0..=self.period_ms / 10);
        self.next_at = now.plus_ms(self.period_ms - self.period_ms / 20 + jitter);
        self.seq += 1;
        let pages = holdings.complete.len().div_ceil(ANNOUNCE_ROOTS_MAX).max(1) as u32;
        let page = self.page % pages;
        self.page = self.page.wrapping_add(1);
        let start = page as usize * ANNOUNCE_ROOTS_MAX;
        let end = (start + ANNOUNCE_ROOTS_MAX).min(holdings.complete.len());
        Some(Announcement {
            node: self.node.as_bytes().to_vec(),
            zone: self.zone.clone(),
            seq: self.seq,
            roots: holdings.complete[start.min(end)..end].iter().map(|c| c.to_bytes()).collect(),
            page,
            pages,
            partial: holdings.partial.iter().take(ANNOUNCE_PARTIAL_MAX).cloned().collect(),
            load: holdings.load,
            free_bytes: holdings.free_bytes,
            addrs: holdings
                .addrs
                .iter()
                .filter(|a| !a.is_empty() && a.len() <= ADDR_BYTES_MAX)
                .take(ANNOUNCE_ADDRS_MAX)
                .cloned()
                .collect(),
        })
    }
}

/// What the directory knows of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its zone.
    pub zone: String,
    /// Last announcement sequence seen.
    pub seq: u64,
    /// When it was last heard from.
    pub seen: Timestamp,
    /// Its reported load.
    pub load: u32,
    /// Its reported free capacity.
    pub free_bytes: u64,
    /// Pages in its last announcement.
    pub pages: u32,
}

/// One peer holding (part of) a root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The peer.
    pub peer: PeerId,
    /// Whether it holds every block.
    pub complete: bool,
    /// Its zone, if known.
    pub zone: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    complete: bool,
    at: Timestamp,
    /// Content bytes held and in all, for a partial holder that announced its progress.
    progress: Option<(u64, u64)>,
}

/// What the directory holds of one peer: one entry, so that an announcement (which every
/// member receives from every other) finds its sender once.
#[derive(Debug, Default)]
struct Peer {
    /// From its last announcement, if one was heard.
    info: Option<NodeInfo>,
    /// The roots it is recorded as holding.
    roots: BTreeSet<Cid>,
}

/// Who holds which root, from announcements and who-has answers.
#[derive(Debug)]
pub struct Directory {
    expiry_ms: u64,
    roots: BTreeMap<Cid, BTreeMap<PeerId, Seen>>,
    peers: BTreeMap<PeerId, Peer>,
}

/// `peer` holds `root` (tracked in `tracked`, the roots known of `peer`), as of `now`.
fn record(
    roots: &mut BTreeMap<Cid, BTreeMap<PeerId, Seen>>,
    tracked: &mut BTreeSet<Cid>,
    peer: PeerId,
    root: Cid,
    complete: bool,
    now: Timestamp,
    progress: Option<(u64, u64)>,
) {
    if tracked.len() >= NODE_ROOTS_MAX && !tracked.contains(&root) {
        return;
    }
    tracked.insert(root);
    let seen = roots.entry(root).or_default().entry(peer).or_insert(Seen {
        complete,
        at: now,
        progress: None,
    });
    seen.complete = complete;
    seen.at = now;
    if progress.is_some() || complete {
        seen.progress = progress;
    }
}

impl Directory {
    /// A directory forgetting holders not heard from for `expiry_ms` (per announcement page).
    pub fn new(expiry_ms: u64) -> Directory {
        Directory { expiry_ms, roots: BTreeMap::new(), peers: BTreeMap::new() }
    }

    /// An announcement received from `from` (the gossip layer's verified source).
    ///
    /// # Errors
    /// [`WireError`] if the announcement claims another node or carries bad CIDs; nothing
    /// is recorded then.
    pub fn handle_announcement(
        &mut self,
        from: PeerId,
        a: &Announcement,
        now: Timestamp,
    ) -> Result<(), WireError> {
        if a.node != from.as_bytes() {
            return Err(WireError::Limit("announcement for another node"));
        }
        let mut roots = Vec::with_capacity(a.roots.len());
        for r in &a.roots {
            roots.push(crate::wire::cid(r)?);
        }
        let mut partial = Vec::with_capacity(a.partial.len());
        for p in &a.partial {
            partial.push((crate::wire::cid(&p.root)?, (p.done_bytes, p.total_bytes)));
        }
        let peer = self.peers.entry(from).or_default();
        match &mut peer.info {
            Some(info) if info.seq >= a.seq => return Ok(()), // duplicate or reordered
            Some(info) => {
                if info.zone != a.zone {
                    info.zone.clone_from(&a.zone);
                }
                info.seq = a.seq;
                info.seen = now;
                info.load = a.load;
                info.free_bytes = a.free_bytes;
                info.pages = a.pages.max(1);
            }
            None => {
                peer.info = Some(NodeInfo {
                    zone: a.zone.clone(),
                    seq: a.seq,
                    seen: now,
                    load: a.load,
                    free_bytes: a.free_bytes,
                    pages: a.pages.max(1),
                });
            }
        }
        let tracked = &mut peer.roots;
        for root in roots {
            record(&mut self.roots, tracked, from, root, true, now, None);
        }
        for (root, progress) in partial {
            record(&mut self.roots, tracked, from, root, false, now, Some(progress));
        }
        Ok(())
    }

    /// A who-has answer: `from` holds `root` (completely or in part).
    pub fn handle_holding(&mut self, from: PeerId, root: Cid, complete: bool, now: Timestamp) {
        let tracked = &mut self.peers.entry(from).or_default().roots;
        record(&mut self.roots, tracked, from, root, complete, now, None);
    }

    /// A peer left the mesh: forget what it held.
    pub fn peer_gone(&mut self, peer: &PeerId) {
        for root in self.peers.remove(peer).map(|p| p.roots).unwrap_or_default() {
            if let Some(holders) = self.roots.get_mut(&root) {
                holders.remove(peer);
                if holders.is_empty() {
                    self.roots.remove(&root);
                }
            }
        }
    }

    /// Forgets holders not refreshed in time (longer for nodes with many pages).
    pub fn expire(&mut self, now: Timestamp) {
        let mut stale: Vec<(Cid, PeerId)> = Vec::new();
        for (root, holders) in &self.roots {
            for (peer, seen) in holders {
                let pages = self.node(peer).map_or(1, |n| u64::from(n.pages));
                if now.since(seen.at) > self.expiry_ms.saturating_mul(pages) {
                    stale.push((*root, *peer));
                }
            }
        }
        for (root, peer) in stale {
            if let Some(h) = self.roots.get_mut(&root) {
                h.remove(&peer);
                if h.is_empty() {
                    self.roots.remove(&root);
                }
            }
            if let Some(p) = self.peers.get_mut(&peer) {
                p.roots.remove(&root);
            }
        }
    }

    /// The peers known to hold `root`, complete holders first.
    pub fn holders(&self, root: &Cid) -> Vec<Holder> {
        let mut out: Vec<Holder> = self
            .roots
            .get(root)
            .map(|h| {
                h.iter()
                    .map(|(peer, seen)| Holder {
                        peer: *peer,
                        complete: seen.complete,
                        zone: self.node(peer).map(|n| n.zone.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|h| (!h.complete, h.peer));
        out
    }

    /// The peers known to hold `root` and whether each holds all of it, in peer order
    /// ([`Directory::holders`] without the sorting and the zones).
    pub fn holders_of<'a>(&'a self, root: &Cid) -> impl Iterator<Item = (PeerId, bool)> + 'a {
        self.roots.get(root).into_iter().flat_map(|h| h.iter().map(|(p, s)| (*p, s.complete)))
    }

    /// Whether `peer` holds `root`: `Some((complete, progress))`, with progress as (content
    /// bytes held, content bytes in all) when a partial holder announced it.
    pub fn holding(&self, root: &Cid, peer: &PeerId) -> Option<(bool, Option<(u64, u64)>)> {
        self.roots.get(root)?.get(peer).map(|s| (s.complete, s.progress))
    }

    /// Every node heard from, with what is known of it.
    pub fn nodes(&self) -> impl Iterator<Item = (&PeerId, &NodeInfo)> {
        self.peers.iter().filter_map(|(id, p)| p.info.as_ref().map(|i| (id, i)))
    }

    /// What is known of a node.
    pub fn node(&self, peer: &PeerId) -> Option<&NodeInfo> {
        self.peers.get(peer).and_then(|p| p.info.as_ref())
    }

    /// Checks the two indexes agree.
    ///
    /// # Panics
    /// If they do not: a bug.
    pub fn check_invariants(&self) {
        for (root, holders) in &self.roots {
            assert!(!holders.is_empty(), "empty holder set for {root}");
            for peer in holders.keys() {
                assert!(
                    self.peers.get(peer).is_some_and(|p| p.roots.contains(root)),
                    "{peer:?} holds {root} in one index only"
                );
            }
        }
        for (peer, p) in &self.peers {
            assert!(p.roots.len() <= NODE_ROOTS_MAX);
            for root in &p.roots {
                assert!(self.roots.get(root).is_some_and(|h| h.contains_key(peer)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[n; 38]).unwrap()
    }

    #[test]
    fn announcements_page_through_many_roots() {
        // 2,500 roots take three pages; successive announcements rotate through them and
        // the directory ends up knowing all of them.
        let me = peer(1);
        let mut a = Announcer::new(me, "eu", 1000, Timestamp(0), 7);
        let holdings = Holdings {
            complete: (0..2500u32).map(|i| Cid::raw(&i.to_le_bytes())).collect(),
            ..Holdings::default()
        };
        let mut dir = Directory::new(10_000);
        let mut now = Timestamp(0);
        for _ in 0..3 {
            now = a.poll_timeout();
            let ann = a.handle_timeout(now, &holdings).unwrap();
            assert_eq!(ann.pages, 3);
            let bytes = ann.encode();
            let back = Announcement::decode(&bytes).unwrap();
            dir.handle_announcement(me, &back, now).unwrap();
        }
        dir.check_invariants();
        for c in &holdings.complete {
            assert_eq!(dir.holders(c).len(), 1);
        }
        // Expiry forgets them once they stop coming.
        dir.expire(now.plus_ms(10_000 * 3 + 1));
        assert!(dir.holders(&holdings.complete[0]).is_empty());
        dir.check_invariants();
    }

    #[test]
    fn a_restarted_node_outranks_what_peers_remember() {
        // Before a restart the node announced many times; after it, an announcer starting its
        // sequence at the (later) start time is heard, and its new holdings replace the old.
        let me = peer(1);
        let (old_root, new_root) = (Cid::raw(b"old"), Cid::raw(b"new"));
        let mut dir = Directory::new(60_000);
        let mut before = Announcer::new(me, "eu", 1000, Timestamp(0), 1);
        before.start_seq_at(1_000_000);
        let h = Holdings { complete: vec![old_root], ..Holdings::default() };
        for _ in 0..5 {
            let a = before.handle_timeout(before.poll_timeout(), &h).unwrap();
            dir.handle_announcement(me, &a, Timestamp(0)).unwrap();
        }
        let mut after = Announcer::new(me, "eu", 1000, Timestamp(0), 2);
        let stale = after.handle_timeout(after.poll_timeout(), &Holdings::default()).unwrap();
        assert!(stale.seq < dir.node(&me).unwrap().seq, "from 0 it would be ignored");
        after.start_seq_at(2_000_000);
        let h = Holdings { complete: vec![new_root], ..Holdings::default() };
        let a = after.handle_timeout(after.poll_timeout(), &h).unwrap();
        dir.handle_announcement(me, &a, Timestamp(1)).unwrap();
        assert_eq!(dir.node(&me).unwrap().seq, a.seq);
        assert_eq!(dir.holders(&new_root).len(), 1);
    }

    #[test]
    fn stale_and_forged_announcements_are_ignored() {
        // A lower sequence number does not overwrite; a message claiming another node is
        // refused; a failed publish is retried within a second.
        let (me, other) = (peer(1), peer(2));
        let root = Cid::raw(b"r");
        let mut a = Announcer::new(me, "eu", 5000, Timestamp(0), 1);
        let h = Holdings { complete: vec![root], ..Holdings::default() };
        let t = a.poll_timeout();
        let first = a.handle_timeout(t, &h).unwrap();
        let later = a.handle_timeout(a.poll_timeout(), &Holdings::default()).unwrap();
        let mut dir = Directory::new(60_000);
        dir.handle_announcement(me, &later, t).unwrap();
        dir.handle_announcement(me, &first, t).unwrap();
        assert_eq!(dir.node(&me).unwrap().seq, later.seq);
        assert!(dir.handle_announcement(other, &first, t).is_err());
        a.handle_publish_failed(Timestamp(100_000));
        assert!(a.poll_timeout() <= Timestamp(101_000));
    }
}
