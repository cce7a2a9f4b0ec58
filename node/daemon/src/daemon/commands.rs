//! Requests from the admin API to the loop, answered from the loop's state.

use super::*;

impl Daemon {
    pub(super) fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Pins(only, reply) => {
                let _ = reply.send(self.pins_json(only));
            }
            Command::Topology(request) => self.on_topology_request(request),
            Command::Id(reply) => {
                let _ = reply.send(self.id_info());
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Peers(reply) => {
                let peers: Vec<serde_json::Value> = self
                    .connected
                    .iter()
                    .map(|(p, info)| {
                        let zone = self.directory.node(&net::core_peer(p)).map(|n| n.zone.clone());
                        serde_json::json!({"peer_id": p.to_string(), "addrs": info.addrs,
                            "rtt_ms": info.rtt_ms, "agent": info.agent, "zone": zone,
                            "member": self.is_member(p)})
                    })
                    .collect();
                let _ = reply.send(serde_json::json!(peers));
            }
            Command::Announce => self.announcer.announce_soon(self.ts()),
            Command::ReloadMembers(reply) => {
                let _ = reply.send(self.reload_members());
            }
            Command::Fetch { root, updates, out } => {
                self.start_fetch(root, Some(updates));
                if let Some(out) = out {
                    self.stream_output(root, &out);
                }
            }
            Command::ClusterInit(reply) => self.cluster_init(reply),
            Command::Propose(commands, reply) => self.propose(commands, reply),
            Command::ClusterView(reply) => {
                // On a manager the view is a linearizable read (ReadIndex): it reflects every
                // change committed before the request, whichever manager answers.
                match self.core.as_mut() {
                    Some(core) if core.is_leader() => {
                        self.next_read += 1;
                        let ctx = self.next_read.to_le_bytes().to_vec();
                        core.read_index(ctx.clone());
                        self.reads.insert(ctx, (u64::MAX, Instant::now(), reply));
                    }
                    _ => {
                        let _ = reply.send(self.cluster_view());
                    }
                }
            }
            Command::TokenCreate { role, zone, ttl_s, uses, reply } => {
                self.token_create(role, zone, ttl_s, uses, reply);
            }
            Command::TokenRevoke(prefix, reply) => {
                let matches: Vec<[u8; 32]> = self
                    .cluster_state()
                    .tokens
                    .keys()
                    .filter(|h| {
                        h.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<String>()
                            .starts_with(&prefix)
                    })
                    .copied()
                    .collect();
                if matches.len() == 1 && !prefix.is_empty() {
                    self.propose(vec![CCommand::RevokeToken { hash: matches[0] }], reply);
                } else {
                    let _ = reply.send(Err(format!("{} tokens match {prefix:?}", matches.len())));
                }
            }
            Command::LeaderTransfer(to, reply) => {
                let r = match self.core.as_mut() {
                    Some(core) if core.is_leader() => {
                        let (voters, _) = core.conf();
                        let target = if to != 0 {
                            to
                        } else {
                            voters.iter().copied().find(|v| *v != core.id()).unwrap_or(0)
                        };
                        if target == 0 || !voters.contains(&target) {
                            Err(format!("{target} is not a voter"))
                        } else {
                            core.transfer_leader(target);
                            Ok(target)
                        }
                    }
                    Some(core) => Err(format!("not the leader; the leader is {}", core.leader())),
                    None => Err("this node is not a manager".into()),
                };
                let _ = reply.send(r);
            }
        }
    }

    pub(super) fn id_info(&self) -> IdInfo {
        IdInfo {
            peer_id: self.me.to_string(),
            listen_addrs: self
                .listen_addrs
                .iter()
                .map(|a| format!("{a}/p2p/{}", self.me))
                .collect(),
            zone: self.config.node.zone.clone(),
        }
    }

    pub(super) fn status(&self) -> serde_json::Value {
        let fetches: Vec<serde_json::Value> = self
            .jobs
            .iter()
            .map(|(root, job)| {
                let p = job.fetch.progress();
                serde_json::json!({"root": root.to_string(), "total_bytes": p.total_bytes,
                    "done_bytes": p.done_bytes, "peers": job.fetch.peers().count()})
            })
            .collect();
        let roots = self.store.roots().map(|r| r.len()).unwrap_or(0);
        serde_json::json!({
            "peer_id": self.me.to_string(),
            "zone": self.config.node.zone,
            "listen_addrs": self.id_info().listen_addrs,
            "peers_connected": self.connected.len(),
            "members": self.members.read().expect("members lock").len(),
            "roots": roots,
            "fetches": fetches,
            "sent_bytes": self.metrics.bytes_sent.get(),
            "received_bytes": self.metrics.bytes_received.get(),
            "refused_requests": self.metrics.refused_requests.get(),
            "evictions": self.metrics.evictions.get(),
            "free_bytes": self.free_bytes,
            "uptime_s": self.started.elapsed().as_secs(),
        })
    }
}
