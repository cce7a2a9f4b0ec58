//! Dialling members and keeping their addresses: the daemon's side of the node core's
//! address book ([`mycel_core::addrs`]). The book decides whom to dial and when; this file
//! feeds it what libp2p reports (connections, failed dials, identify, announcements, the
//! committed member list), carries out its dials, and saves it in the data directory so a
//! restarted node finds its peers while its bootstrap node is down.

use std::time::{Duration, Instant};

use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use mycel_core::addrs::{Dial, Source};

use super::Daemon;
use crate::net;

/// Largest saved book read back (a corrupt or planted file cannot make start-up allocate
/// more).
const BOOK_BYTES_MAX: u64 = 4 << 20;
/// Saved at most this often while it changes (a node killed soon after it learned its
/// peers should still find them).
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// An address as the book keeps it: without the `/p2p/PEER` suffix.
pub(super) fn addr_text(addr: &Multiaddr) -> String {
    let mut a = addr.clone();
    if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
        a.pop();
    }
    a.to_string()
}

impl Daemon {
    /// Loads the addresses saved by an earlier run (a damaged file is reported and ignored:
    /// it only costs the node the addresses it held).
    pub(super) fn load_book(&mut self) {
        let path = self.dir.peers_path();
        let bytes = match std::fs::File::open(&path) {
            Ok(f) => {
                let mut buf = Vec::new();
                if let Err(e) = std::io::Read::read_to_end(
                    &mut std::io::Read::take(f, BOOK_BYTES_MAX),
                    &mut buf,
                ) {
                    tracing::warn!("reading {}: {e}", path.display());
                    return;
                }
                buf
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!("reading {}: {e}", path.display());
                return;
            }
        };
        match self.book.load(&bytes) {
            Ok(n) => tracing::info!(peers = n, "addresses kept from the last run loaded"),
            Err(e) => tracing::warn!("ignoring {}: {e}", path.display()),
        }
    }

    /// Saves the book if it changed (at most every few seconds unless `now` is forced).
    pub(super) fn save_book(&mut self, force: bool) {
        if !self.book_dirty || (!force && self.book_saved.elapsed() < SAVE_EVERY) {
            return;
        }
        self.book_dirty = false;
        self.book_saved = Instant::now();
        let path = self.dir.peers_path();
        let tmp = path.with_extension("tmp");
        let result =
            std::fs::write(&tmp, self.book.encode()).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            tracing::warn!("saving {}: {e}", path.display());
        }
    }

    /// Puts the configured bootstrap peers (and a join token's managers) in the book.
    pub(super) fn learn_bootstrap(&mut self) {
        for (peer, addr) in self.bootstrap.clone() {
            self.learn_addr(peer, &addr, Source::Config);
        }
    }

    /// Learns one address of a peer (never our own).
    pub(super) fn learn_addr(&mut self, peer: PeerId, addr: &Multiaddr, source: Source) {
        if peer == self.me {
            return;
        }
        if self.book.learn(net::core_peer(&peer), &addr_text(addr), source) {
            self.book_dirty = true;
        }
    }

    /// Carries out the dials the book says are due.
    pub(super) fn dial_due(&mut self) {
        let now = self.ts();
        let members = self.members.read().expect("members lock").clone();
        let me = net::core_peer(&self.me);
        let dials = self.book.poll_dials(now, |p| {
            *p != me && net::libp2p_peer(p).is_some_and(|p| members.contains(&p))
        });
        for d in dials {
            self.dial(d);
        }
    }

    /// Dials a member now at every address known for it (a holder a fetch needs), unless
    /// connected or a dial is under way.
    pub(super) fn dial_member(&mut self, peer: PeerId) {
        match self.book.dial_now(&net::core_peer(&peer)) {
            Some(d) => self.dial(d),
            None => tracing::debug!(%peer, "no address known to dial"),
        }
    }

    fn dial(&mut self, d: Dial) {
        let Some(peer) = net::libp2p_peer(&d.peer) else { return };
        let addrs: Vec<Multiaddr> = d.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let opts = DialOpts::peer_id(peer)
            .addresses(addrs)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        match self.swarm.dial(opts) {
            Ok(()) => tracing::debug!(%peer, "dialling"),
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {
                // Already dialling: the swarm's event answers the book.
                if self.swarm.is_connected(&peer) {
                    let _ = self.book.connected(d.peer, None);
                }
            }
            Err(e) => {
                tracing::debug!(%peer, "dial: {e}");
                self.book.dial_failed(d.peer, self.ts());
            }
        }
    }
}
