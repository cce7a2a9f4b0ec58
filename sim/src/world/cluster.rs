//! The cluster protocol in the simulated world: proposals through the node core's cluster
//! client and configuration following through its follower, as the daemon's frames.

use super::*;

impl World {
    /// Managers as node indexes, from `i`'s view (the bootstrap managers before it has one).
    pub(super) fn manager_nodes(&self, i: usize) -> Vec<usize> {
        let v = self.nodes[i].view();
        let mut out: Vec<usize> = if v.members.is_empty() {
            (0..self.sc.managers as usize).collect()
        } else {
            v.members
                .values()
                .filter(|m| m.role == Role::Manager)
                .map(|m| m.raft_id as usize - 1)
                .filter(|&j| j < self.members)
                .collect()
        };
        out.retain(|&j| j != i);
        out.sort_unstable();
        out
    }

    pub(super) fn pump(&mut self, i: usize) {
        if self.nodes[i].outstanding.is_some() {
            return;
        }
        let Some((commands, pins)) = self.nodes[i].proposals.pop_front() else { return };
        let init = matches!(commands.first(), Some(Command::InitCluster { .. }));
        let targets = self.targets(i);
        let n = &mut self.nodes[i];
        let local = n.local(self.now);
        let seq = n.client.propose(commands, n.core.as_mut(), &targets, Timestamp(local));
        n.outstanding = Some(Outstanding { seq, pins, init });
        self.record("propose", i as u64, seq);
        self.drain_client(i);
    }

    /// Whom node `i`'s proposals can go to: the leader its core knows, else the managers of
    /// its view (simulated nodes reach every member; partitions drop what cannot arrive).
    pub(super) fn targets(&self, i: usize) -> Targets {
        let n = &self.nodes[i];
        let leader =
            n.core.as_ref().and_then(|c| Targets::leader_in(n.view(), c.leader(), &n.peer));
        let managers = self.manager_nodes(i).into_iter().map(|j| self.nodes[j].peer).collect();
        Targets { leader, managers, bootstrap: Vec::new() }
    }

    /// Carries out node `i`'s cluster client outputs: frames through the real codec, and
    /// settled proposals.
    pub(super) fn drain_client(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].client.poll_output() {
            match out {
                ClientOutput::Send { to, frame } => {
                    if let Some(&j) = self.by_peer.get(&to) {
                        self.send(i, j, Msg::Cluster(frame.encode()));
                    }
                }
                ClientOutput::Resolved { seq, result } => {
                    let applied = matches!(result, Ok((_, Outcome::Applied)));
                    self.on_ack(i, seq, applied);
                }
            }
        }
    }

    /// A cluster frame from node `from` arrives at node `to`.
    pub(super) fn on_cluster_frame(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let frame = match bytes.get(..4).map(|p| p.try_into().expect("4 bytes")) {
            Some(prefix) if ClusterFrame::check_len(prefix).is_ok() => {
                ClusterFrame::decode(&bytes[4..])
            }
            _ => return,
        };
        let Ok(frame) = frame else { return };
        let peer = self.nodes[from].peer;
        // Membership as the daemon's gate knows it: the committed members, and before the
        // cluster exists, the bootstrap managers (the daemon's `[cluster] members`).
        let bootstrapping = self.nodes[to].view().members.is_empty()
            && from < self.sc.managers as usize
            && to < self.sc.managers as usize;
        let member = bootstrapping || self.is_member(to, from);
        let n = &mut self.nodes[to];
        match frame {
            ClusterFrame::Propose { req, proposal } => {
                n.client.handle_propose(peer, member, req, proposal, n.core.as_mut());
            }
            ClusterFrame::Proposed { req, index, applied, reason } => {
                n.client.handle_proposed(peer, req, index, applied, reason);
            }
            ClusterFrame::NotLeader { req, leader } => {
                n.client.handle_not_leader(peer, req, &leader);
            }
            ClusterFrame::Follow { since } => {
                if !member {
                    return;
                }
                let frame = follow::answer(n.core.as_ref(), n.view(), since, &FOLLOW);
                self.send(to, from, Msg::Cluster(frame.encode()));
                return;
            }
            ClusterFrame::Entries { entries } => {
                // Refusals (an answer nobody asked for, a gap) change nothing.
                let _ = n.follower.handle_entries(&peer, &entries);
                return;
            }
            ClusterFrame::State { applied, state } => {
                let _ = n.follower.handle_state(&peer, applied, &state);
                return;
            }
            // The simulator carries Raft messages and reports as messages of their own (yet).
            _ => {}
        }
        self.drain_client(to);
    }

    pub(super) fn on_ack(&mut self, i: usize, seq: u64, applied: bool) {
        let Some(o) = &self.nodes[i].outstanding else { return };
        if o.seq != seq {
            return;
        }
        let o = self.nodes[i].outstanding.take().expect("checked");
        self.record("ack", i as u64, seq);
        if i == 0 && o.init {
            // Applied, or rejected as already initialised: either way the cluster exists.
            self.initialised = true;
        }
        if applied {
            self.checker.acked.insert((self.nodes[i].peer.as_bytes().to_vec(), seq));
            for p in o.pins {
                self.acked_pins.insert(p);
            }
        }
        self.pump(i);
    }
}
