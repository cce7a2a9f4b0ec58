//! The address book: every address this node has learned for each member, and when to dial
//! which member again.
//!
//! libp2p keeps no addresses for a peer it has not met, so a node that was given one
//! bootstrap address must learn the others' or lose the mesh with that one node. Addresses
//! come from the configuration (bootstrap), the committed member list, identify, the
//! connections the node makes or accepts, and members' own announcements; the driver saves
//! [`Book::encode`] and loads it at start, so a restarted node finds its peers while the
//! bootstrap node is down.
//!
//! Which members to keep connected: every bootstrap peer, and while fewer than
//! [`Config::peers_min`] members are connected, more of the members whose addresses are
//! known (so losing the bootstrap node does not cut a node off from the rest). A member that
//! should be connected and is not is dialled again with exponential backoff per peer (from
//! [`Config::backoff_min_ms`] to [`Config::backoff_max_ms`]), at every address known for
//! it, newest first.
//!
//! Addresses are opaque text here (multiaddrs without the `/p2p/` suffix); the driver parses
//! them and drops what it cannot use. Everything is bounded: addresses per peer, peers, and
//! the size of one address.

use std::collections::BTreeMap;

use mycel_base::{PeerId, Timestamp};

/// Longest address kept, in bytes (as long as an announcement may carry).
pub use mycel_proto::wire::ADDR_BYTES_MAX;
/// Format version of [`Book::encode`].
const FORMAT_VERSION: u8 = 1;

/// Bounds and timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Addresses kept per peer (the newest).
    pub addrs_per_peer_max: usize,
    /// Peers kept (members first; strangers are never kept).
    pub peers_max: usize,
    /// Members kept connected beyond the bootstrap peers, when their addresses are known.
    pub peers_min: usize,
    /// First redial delay after a disconnection or a failed dial.
    pub backoff_min_ms: u64,
    /// Longest redial delay.
    pub backoff_max_ms: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            addrs_per_peer_max: 8,
            peers_max: 16_384,
            peers_min: 4,
            backoff_min_ms: 250,
            backoff_max_ms: 30_000,
        }
    }
}

/// Where an address was learned (the newest source wins; addresses a peer reported about
/// itself or that we connected to are tried before configured ones that may be stale).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The node's configuration (`[node] bootstrap`).
    Config,
    /// The committed member list.
    Committed,
    /// Saved by an earlier run.
    Kept,
    /// The peer's own announcement or identify report.
    Reported,
    /// A connection was established at it.
    Connected,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// Newest first.
    addrs: Vec<String>,
    connected: bool,
    /// Dials since the last connection (sets the backoff).
    failures: u32,
    /// When the next dial is due (if disconnected).
    next_dial: Timestamp,
    /// A dial was handed out and has not been answered.
    dialling: bool,
    /// Named in the configuration: always kept connected.
    bootstrap: bool,
}

/// A dial the driver should make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dial {
    /// The member.
    pub peer: PeerId,
    /// Its known addresses, newest first.
    pub addrs: Vec<String>,
}

/// The address book.
#[derive(Clone, Debug, Default)]
pub struct Book {
    config: Config,
    peers: BTreeMap<PeerId, Entry>,
}

/// Why saved addresses could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// An unknown format version.
    #[error("address book format {0} is not supported (this version reads {FORMAT_VERSION})")]
    Version(u8),
    /// Truncated or malformed.
    #[error("address book is malformed at byte {0}")]
    Malformed(usize),
}

impl Book {
    /// An empty book.
    pub fn new(config: Config) -> Book {
        assert!(config.backoff_min_ms > 0, "backoff_min_ms must be positive");
        assert!(config.backoff_min_ms <= config.backoff_max_ms, "backoff_min_ms > backoff_max_ms");
        Book { config, peers: BTreeMap::new() }
    }

    /// Learns `addr` for `peer`; whether the book changed (what to save). Too long or empty
    /// addresses are ignored, as are new peers past [`Config::peers_max`].
    pub fn learn(&mut self, peer: PeerId, addr: &str, source: Source) -> bool {
        if addr.is_empty() || addr.len() > ADDR_BYTES_MAX {
            return false;
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.config.peers_max {
            return false;
        }
        let max = self.config.addrs_per_peer_max;
        let e = self.peers.entry(peer).or_default();
        e.bootstrap |= source == Source::Config;
        if let Some(at) = e.addrs.iter().position(|a| a == addr) {
            // Configured and committed addresses do not displace what was seen working.
            if source < Source::Reported || at == 0 {
                return false;
            }
            e.addrs.remove(at);
        }
        if source < Source::Reported {
            e.addrs.push(addr.to_owned());
        } else {
            e.addrs.insert(0, addr.to_owned());
        }
        e.addrs.truncate(max);
        // (A configured address pushed past the bound is dropped again: no change then.)
        e.addrs.iter().any(|a| a == addr)
    }

    /// A connection to `peer` is up (at `addr`, when we dialled it): no redials while it
    /// lasts, and the backoff starts over. Whether the addresses changed.
    pub fn connected(&mut self, peer: PeerId, addr: Option<&str>) -> bool {
        let changed = addr.is_some_and(|a| self.learn(peer, a, Source::Connected));
        if !self.peers.contains_key(&peer) && self.peers.len() < self.config.peers_max {
            self.peers.insert(peer, Entry::default());
        }
        if let Some(e) = self.peers.get_mut(&peer) {
            e.connected = true;
            e.failures = 0;
            e.dialling = false;
        }
        changed
    }

    /// Every connection to `peer` closed: a redial is due after the shortest backoff.
    pub fn disconnected(&mut self, peer: PeerId, now: Timestamp) {
        let min = self.config.backoff_min_ms;
        if let Some(e) = self.peers.get_mut(&peer) {
            e.connected = false;
            e.dialling = false;
            e.next_dial = now.plus_ms(min);
        }
    }

    /// A dial to `peer` failed: the next waits twice as long as the last, up to the maximum.
    pub fn dial_failed(&mut self, peer: PeerId, now: Timestamp) {
        let (min, max) = (self.config.backoff_min_ms, self.config.backoff_max_ms);
        if let Some(e) = self.peers.get_mut(&peer)
            && !e.connected
        {
            e.failures = e.failures.saturating_add(1);
            e.dialling = false;
            let delay = min.saturating_mul(1u64 << e.failures.min(20)).min(max);
            e.next_dial = now.plus_ms(delay);
        }
    }

    /// The dials due at `now`: bootstrap peers that are not connected, and while fewer
    /// than [`Config::peers_min`] members are connected or being dialled, other members
    /// (those `is_member` accepts) to make up the number. Each is handed out once until it
    /// is answered by [`Book::connected`] or [`Book::dial_failed`].
    pub fn poll_dials(&mut self, now: Timestamp, is_member: impl Fn(&PeerId) -> bool) -> Vec<Dial> {
        let busy = self.peers.values().filter(|e| e.connected || e.dialling).count();
        let mut room = self.config.peers_min.saturating_sub(busy);
        let mut out = Vec::new();
        for (peer, e) in &mut self.peers {
            if e.connected
                || e.dialling
                || e.addrs.is_empty()
                || e.next_dial > now
                || !(e.bootstrap || room > 0)
                || !is_member(peer)
            {
                continue;
            }
            if !e.bootstrap {
                room -= 1;
            }
            e.dialling = true;
            out.push(Dial { peer: *peer, addrs: e.addrs.clone() });
        }
        out
    }

    /// Members connected now.
    pub fn connected_count(&self) -> usize {
        self.peers.values().filter(|e| e.connected).count()
    }

    /// A dial to `peer` now, whatever its backoff (a holder we need), if it is not connected
    /// and addresses are known.
    pub fn dial_now(&mut self, peer: &PeerId) -> Option<Dial> {
        let e = self.peers.get_mut(peer)?;
        if e.connected || e.addrs.is_empty() {
            return None;
        }
        e.dialling = true;
        Some(Dial { peer: *peer, addrs: e.addrs.clone() })
    }

    /// When the next dial falls due.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.peers
            .values()
            .filter(|e| !e.connected && !e.dialling && !e.addrs.is_empty())
            .map(|e| e.next_dial)
            .min()
    }

    /// The addresses known for `peer`, newest first.
    pub fn addrs(&self, peer: &PeerId) -> &[String] {
        self.peers.get(peer).map_or(&[], |e| e.addrs.as_slice())
    }

    /// Forgets peers that `keep` rejects (removed members).
    pub fn retain(&mut self, keep: impl Fn(&PeerId) -> bool) {
        self.peers.retain(|p, _| keep(p));
    }

    /// The saved form: a version byte, then per peer its id and addresses, each
    /// length-prefixed.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        for (peer, e) in &self.peers {
            if e.addrs.is_empty() {
                continue;
            }
            let id = peer.as_bytes();
            out.push(id.len() as u8);
            out.extend_from_slice(id);
            out.push(e.addrs.len() as u8);
            for a in &e.addrs {
                out.extend_from_slice(&(a.len() as u16).to_le_bytes());
                out.extend_from_slice(a.as_bytes());
            }
        }
        out
    }

    /// Learns every address of a saved book (as [`Source::Kept`]), within this book's
    /// bounds.
    ///
    /// # Errors
    /// [`DecodeError`] for another version or malformed bytes; nothing is learned then.
    pub fn load(&mut self, bytes: &[u8]) -> Result<usize, DecodeError> {
        let parsed = parse(bytes)?;
        let n = parsed.len();
        for (peer, addrs) in parsed {
            // Saved newest first; kept addresses go after what this run learned, in order.
            for a in &addrs {
                self.learn(peer, a, Source::Kept);
            }
        }
        Ok(n)
    }

    /// Checks the invariants (the simulator and tests call it).
    pub fn check_invariants(&self) {
        assert!(self.peers.len() <= self.config.peers_max, "peers {}", self.peers.len());
        for (p, e) in &self.peers {
            assert!(e.addrs.len() <= self.config.addrs_per_peer_max, "peer {p:?}");
            assert!(!(e.connected && e.dialling), "peer {p:?} connected and dialling");
        }
    }
}

/// A cursor over saved bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Malformed(self.at))?;
        let s = self.bytes.get(self.at..end).ok_or(DecodeError::Malformed(self.at))?;
        self.at = end;
        Ok(s)
    }
}

fn parse(bytes: &[u8]) -> Result<Vec<(PeerId, Vec<String>)>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    let version = r.take(1)?[0];
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    let mut out = Vec::new();
    while r.at < bytes.len() {
        let start = r.at;
        let id_len = r.take(1)?[0] as usize;
        let peer = PeerId::from_bytes(r.take(id_len)?).ok_or(DecodeError::Malformed(start))?;
        let count = r.take(1)?[0] as usize;
        let mut addrs = Vec::new();
        for _ in 0..count {
            let pos = r.at;
            let len = u16::from_le_bytes(r.take(2)?.try_into().expect("2 bytes")) as usize;
            let text =
                std::str::from_utf8(r.take(len)?).map_err(|_| DecodeError::Malformed(pos))?;
            addrs.push(text.to_owned());
        }
        out.push((peer, addrs));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[0, 36, 8, 1, 18, 32, n]).expect("short")
    }

    /// A lost peer is redialled with doubling delays up to the maximum, at every address
    /// known for it (newest first), and not while a dial is out or it is connected.
    #[test]
    fn redials_back_off_and_reset_on_connection() {
        let mut b =
            Book::new(Config { backoff_min_ms: 100, backoff_max_ms: 1_000, ..Config::default() });
        let (a, c) = (peer(1), peer(2));
        b.learn(a, "/ip4/10.0.0.1/udp/1/quic-v1", Source::Config);
        b.learn(a, "/ip4/10.0.0.2/udp/1/quic-v1", Source::Reported);
        b.learn(c, "/ip4/10.0.0.3/udp/1/quic-v1", Source::Kept);
        let all = |_: &PeerId| true;
        let first = b.poll_dials(Timestamp(0), all);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].addrs[0], "/ip4/10.0.0.2/udp/1/quic-v1", "reported before configured");
        assert!(b.poll_dials(Timestamp(0), all).is_empty(), "one dial out per peer");
        b.connected(c, None);
        let mut at = Timestamp(0);
        let mut delays = Vec::new();
        for _ in 0..6 {
            b.dial_failed(a, at);
            let due = b.poll_timeout().expect("a is due again");
            delays.push(due.since(at));
            assert!(b.poll_dials(Timestamp(due.0 - 1), all).is_empty(), "not before it is due");
            at = due;
            assert_eq!(b.poll_dials(at, all).len(), 1);
        }
        assert_eq!(delays, vec![200, 400, 800, 1_000, 1_000, 1_000]);
        b.connected(a, Some("/ip4/10.0.0.9/udp/1/quic-v1"));
        assert_eq!(b.addrs(&a)[0], "/ip4/10.0.0.9/udp/1/quic-v1");
        assert_eq!(b.poll_timeout(), None, "everyone connected");
        b.disconnected(a, Timestamp(5_000));
        assert_eq!(b.poll_timeout(), Some(Timestamp(5_100)), "backoff starts over");
        b.check_invariants();
    }

    /// Bootstrap peers are always kept connected; other members only up to `peers_min`,
    /// and never a peer that is not a member.
    #[test]
    fn keeps_bootstrap_peers_and_a_minimum_of_members() {
        let mut b = Book::new(Config { peers_min: 2, ..Config::default() });
        for i in 1..=5 {
            b.learn(peer(i), &format!("/ip4/10.0.0.{i}/udp/1/quic-v1"), Source::Kept);
        }
        b.learn(peer(9), "/ip4/10.0.0.9/udp/1/quic-v1", Source::Config);
        let not_five = |p: &PeerId| *p != peer(5);
        let first: Vec<PeerId> =
            b.poll_dials(Timestamp(0), not_five).into_iter().map(|d| d.peer).collect();
        assert_eq!(first, vec![peer(1), peer(2), peer(9)], "two members plus the bootstrap peer");
        b.connected(peer(1), None);
        b.connected(peer(2), None);
        b.connected(peer(9), None);
        assert!(b.poll_dials(Timestamp(0), not_five).is_empty());
        // The bootstrap peer dies and one member with it: one more member is dialled, and
        // the bootstrap peer again after its backoff.
        b.disconnected(peer(9), Timestamp(10));
        b.disconnected(peer(2), Timestamp(10));
        let next: Vec<PeerId> =
            b.poll_dials(Timestamp(1_000), not_five).into_iter().map(|d| d.peer).collect();
        assert_eq!(next, vec![peer(2), peer(9)]);
        assert_eq!(b.connected_count(), 1);
        b.check_invariants();
    }

    /// Only members are dialled; removed members are forgotten; bounds hold.
    #[test]
    fn wanted_filter_and_bounds() {
        let mut b = Book::new(Config { addrs_per_peer_max: 2, peers_max: 2, ..Config::default() });
        for i in 0..5 {
            b.learn(peer(1), &format!("/ip4/10.0.0.{i}/udp/1/quic-v1"), Source::Reported);
        }
        b.learn(peer(2), "/ip4/10.0.1.1/udp/1/quic-v1", Source::Reported);
        b.learn(peer(3), "/ip4/10.0.1.2/udp/1/quic-v1", Source::Reported);
        b.learn(peer(2), &"x".repeat(ADDR_BYTES_MAX + 1), Source::Reported);
        assert_eq!(b.addrs(&peer(1)).len(), 2);
        assert_eq!(b.addrs(&peer(1))[0], "/ip4/10.0.0.4/udp/1/quic-v1");
        assert!(b.addrs(&peer(3)).is_empty(), "past peers_max");
        let dials = b.poll_dials(Timestamp(0), |p| *p == peer(2));
        assert_eq!(dials.len(), 1);
        assert_eq!(dials[0].peer, peer(2));
        b.retain(|p| *p != peer(1));
        assert!(b.addrs(&peer(1)).is_empty());
        b.check_invariants();
    }

    /// What is saved loads back in the same order; other versions and garbage are refused.
    #[test]
    fn saved_book_round_trips() {
        let mut b = Book::new(Config::default());
        assert!(b.learn(peer(1), "/ip4/10.0.0.1/udp/1/quic-v1", Source::Config));
        assert!(!b.learn(peer(1), "/ip4/10.0.0.1/udp/1/quic-v1", Source::Committed), "known");
        assert!(b.learn(peer(1), "/ip4/10.0.0.2/udp/1/quic-v1", Source::Connected));
        assert!(!b.learn(peer(1), "/ip4/10.0.0.2/udp/1/quic-v1", Source::Reported), "first");
        b.learn(peer(2), "/dns4/b.example/udp/4001/quic-v1", Source::Reported);
        let mut back = Book::new(Config::default());
        assert_eq!(back.load(&b.encode()), Ok(2));
        assert_eq!(back.addrs(&peer(1)), b.addrs(&peer(1)));
        assert_eq!(back.addrs(&peer(2)), b.addrs(&peer(2)));
        assert_eq!(back.load(&[9]), Err(DecodeError::Version(9)));
        assert!(back.load(&[]).is_err());
    }

    proptest! {
        /// Any bytes load or fail cleanly, and never break the bounds.
        #[test]
        fn loading_arbitrary_bytes_is_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = Book::new(Config { addrs_per_peer_max: 3, peers_max: 4, ..Config::default() });
            let _ = b.load(&bytes);
            let mut with_version = vec![FORMAT_VERSION];
            with_version.extend_from_slice(&bytes);
            let _ = b.load(&with_version);
            b.check_invariants();
        }
    }
}
