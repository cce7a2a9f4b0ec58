//! libp2p's events in the daemon: connections, identify, ping, mDNS and the gossip
//! announcements, each translated into the cores' inputs; and the per-peer request links.

use super::*;

impl Daemon {
    pub(super) fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        use libp2p::metrics::Recorder;
        self.p2p_metrics.record(&ev);
        match &ev {
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(found))) => {
                for (peer, addr) in found.iter().cloned() {
                    if peer != self.me && !self.connected.contains_key(&peer) {
                        tracing::debug!(%peer, %addr, "mDNS: discovered");
                        self.swarm.add_peer_address(peer, addr.clone());
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.p2p_metrics.record(e),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(e)) => self.p2p_metrics.record(e),
            _ => {}
        }
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}/p2p/{}", self.me);
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::info!(peer = %peer_id, "connected via {}", endpoint.get_remote_address());
                // An address we dialled works; an inbound one is the peer's source port.
                let dialled =
                    endpoint.is_dialer().then(|| dial::addr_text(endpoint.get_remote_address()));
                if self.book.connected(net::core_peer(&peer_id), dialled.as_deref()) {
                    self.book_dirty = true;
                }
                self.connected.entry(peer_id).or_default().addrs =
                    vec![endpoint.get_remote_address().to_string()];
                self.metrics.peers_connected.set(self.connected.len() as i64);
                // Ask the newcomer about everything we are fetching.
                let roots: Vec<Cid> = self.jobs.keys().copied().collect();
                for root in roots {
                    self.send_who_has(peer_id, root);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                tracing::info!(peer = %peer_id, "disconnected");
                self.book.disconnected(net::core_peer(&peer_id), self.ts());
                self.connected.remove(&peer_id);
                self.links.remove(&peer_id);
                self.metrics.peers_connected.set(self.connected.len() as i64);
                let cp = net::core_peer(&peer_id);
                self.directory.peer_gone(&cp);
                for job in self.jobs.values_mut() {
                    job.fetch.peer_gone(&cp);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                ..
            })) => self.on_announcement(message),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in &info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr.clone());
                    if self.is_member(&peer_id) {
                        self.learn_addr(peer_id, addr, mycel_core::addrs::Source::Reported);
                    }
                }
                self.connected.entry(peer_id).or_default().agent = Some(info.agent_version);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Some(p) = self.connected.get_mut(&peer) {
                    p.rtt_ms = Some(rtt.as_secs_f64() * 1000.0);
                }
                // Round trips feed the leader's decisions (reachability, leader preference).
                let now = mycel_consensus::Timestamp(self.ts().0);
                let raft_id = self.cluster_state().members.get(&peer.to_bytes()).map(|m| m.raft_id);
                if let (Some(id), Some(core)) = (raft_id, self.core.as_mut()) {
                    core.handle_rtt(id, rtt.as_millis() as u64, now);
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection refused: {error}");
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "dial failed: {error}");
                if let Some(p) = peer_id {
                    self.book.dial_failed(net::core_peer(&p), self.ts());
                }
            }
            _ => {}
        }
    }

    pub(super) fn on_announcement(&mut self, message: gossipsub::Message) {
        let Some(source) = message.source else { return };
        if !self.is_member(&source) || source == self.me {
            return;
        }
        let ann = match Announcement::decode(&message.data) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(peer = %source, "bad announcement: {e}");
                return;
            }
        };
        let now = self.ts();
        if let Err(e) = self.directory.handle_announcement(net::core_peer(&source), &ann, now) {
            tracing::debug!(peer = %source, "announcement refused: {e}");
            return;
        }
        // Where the member listens, in its own signed words: how nodes that were introduced
        // through one bootstrap peer find each other once it is gone.
        for a in &ann.addrs {
            if let Ok(ma) = a.parse::<Multiaddr>() {
                self.learn_addr(source, &ma, mycel_core::addrs::Source::Reported);
            }
        }
        let same_zone = ann.zone == self.config.node.zone;
        let mut wanted = false;
        for job in self.jobs.values_mut() {
            let root = job.fetch.root().to_bytes();
            if ann.roots.contains(&root) || ann.partial.iter().any(|p| p.root == root) {
                job.fetch.add_peer(net::core_peer(&source), same_zone);
                wanted = true;
            }
        }
        // A holder heard through the gossip mesh but not connected yet: dial it (its
        // addresses come from identify or the committed member list).
        if wanted && !self.connected.contains_key(&source) {
            self.dial_member(source);
        }
    }

    pub(super) fn link(&mut self, peer: PeerId) -> PeerLink {
        if let Some(l) = self.links.get(&peer) {
            return l.clone();
        }
        let l = exchange::spawn_link(
            self.control.clone(),
            peer,
            self.net_tx.clone(),
            self.download.clone(),
            self.metrics.clone(),
        );
        self.links.insert(peer, l.clone());
        l
    }

    pub(super) fn send_who_has(&mut self, peer: PeerId, root: Cid) {
        if !self.is_member(&peer) || peer == self.me {
            return;
        }
        let req = self.next_req;
        self.next_req += 1;
        self.who_has.insert(req, root);
        if self.who_has.len() > 10_000 {
            let oldest = *self.who_has.keys().next().expect("non-empty");
            self.who_has.remove(&oldest);
        }
        let link = self.link(peer);
        if !link.send(Frame::WhoHas { req, root: root.to_bytes() }) {
            self.links.remove(&peer);
        }
    }
}
