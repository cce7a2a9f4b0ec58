//! The exchange in the simulated world: frames between simulated nodes, serving through the
//! node core's access rules, the fetch cores' actions against the simulated disk, and the
//! checks on what is served and stored.

use super::*;

impl World {
    /// Stores a block at node `i`: the checker sees every write.
    pub(super) fn store(&mut self, i: usize, cid: Cid, bytes: &[u8]) {
        let valid = cid.matches(bytes);
        if !valid {
            let now = self.now;
            self.checker.fail(
                now,
                "safety:store-matches-cid",
                format!("node {i} stored a block that does not match {cid}"),
            );
        }
        let b = self.pool.intern(cid, bytes, valid);
        self.nodes[i].store.insert(cid, b);
    }

    /// Reads a block back, verifying it (a corrupt copy is dropped, as the store does).
    pub(super) fn read_block(&mut self, i: usize, cid: &Cid) -> Option<Rc<[u8]>> {
        let b = self.nodes[i].store.get(cid)?.clone();
        if cid.matches(&b) {
            return Some(b);
        }
        self.record("corrupt-dropped", i as u64, 0);
        self.nodes[i].store.remove(cid);
        let holders: Vec<Cid> = self.nodes[i].complete.iter().copied().collect();
        // The roots that used this block are no longer complete here.
        for r in holders {
            if content::object_blocks(&self.nodes[i].store, &r).is_none() {
                self.nodes[i].complete.remove(&r);
            }
        }
        None
    }

    pub(super) fn on_fetch_action(&mut self, i: usize, root: Cid, a: Action) {
        match a {
            Action::Lookup { cid, need_bytes } => {
                let local = match self.read_block(i, &cid) {
                    None => Local::Absent,
                    Some(b) if need_bytes => Local::Bytes(b.to_vec()),
                    Some(_) => Local::Present,
                };
                if let Some((f, _)) = self.nodes[i].fetches.get_mut(&root) {
                    f.handle_local(cid, local);
                }
            }
            Action::Request { peer, req, root: r, cids } => {
                let Some(&to) = self.by_peer.get(&peer) else { return };
                let frame = Frame::Want {
                    req,
                    root: r.to_bytes(),
                    cids: cids.iter().map(Cid::to_bytes).collect(),
                };
                self.send(i, to, Msg::Frame { root, bytes: frame.encode() });
            }
            Action::Store { cid, bytes, from } => {
                let _ = from;
                self.store_fetched(i, root, cid, &bytes);
            }
            Action::Penalize { peer, reason, disconnect } => {
                self.record("penalize", i as u64, reason as u64);
                if disconnect {
                    self.disconnect(i, peer);
                }
            }
            Action::WhoHas { root: r } => {
                let mut cands: Vec<usize> = self.nodes[i]
                    .view()
                    .members
                    .values()
                    .map(|m| m.raft_id as usize - 1)
                    .filter(|&j| j != i && j < self.members)
                    .collect();
                cands.shuffle(&mut self.rng);
                for j in cands.into_iter().take(8) {
                    let frame = Frame::WhoHas { req: 0, root: r.to_bytes() };
                    self.send(i, j, Msg::Frame { root, bytes: frame.encode() });
                }
            }
            Action::Complete { root: r, .. } => {
                let purpose = self.nodes[i].fetches.remove(&r).map(|(_, p)| p);
                self.record("complete", i as u64, 0);
                // The store syncs before the node claims anything it fetched.
                self.sync_store(i);
                match purpose {
                    Some(Purpose::State) => {
                        if let Some(bytes) = content::read_file(&self.nodes[i].store, &r) {
                            self.nodes[i].complete.insert(r);
                            let res = self.nodes[i]
                                .core
                                .as_mut()
                                .map_or(Ok(()), |c| c.handle_snapshot_state(r, &bytes));
                            self.fatal(i, res);
                        }
                    }
                    Some(p @ (Purpose::Replica | Purpose::Curious(_) | Purpose::Topology))
                        if content::object_blocks(&self.nodes[i].store, &r).is_some() =>
                    {
                        if matches!(p, Purpose::Curious(_)) {
                            self.granted_reads += 1;
                        }
                        self.nodes[i].complete.insert(r);
                        let local = self.nodes[i].local(self.now);
                        self.nodes[i].announcer.announce_soon(Timestamp(local));
                    }
                    _ => {
                        // The fetch ended without the object (a block's write failed): the
                        // plan's inputs may be back to what they were when it asked for the
                        // fetch, so it must run again rather than be skipped as unchanged.
                        self.nodes[i].last_plan = None;
                    }
                }
            }
            Action::Failed { root: r, reason } => {
                let now = self.now;
                self.nodes[i].fetches.remove(&r);
                self.checker.fail(
                    now,
                    "safety:manifest",
                    format!("node {i} could not read the manifest of {r}: {reason}"),
                );
            }
        }
    }

    pub(super) fn disconnect(&mut self, i: usize, peer: PeerId) {
        let until = self.nodes[i].local(self.now) + BAN_MS;
        self.nodes[i].banned.insert(peer, until);
        for (f, _) in self.nodes[i].fetches.values_mut() {
            f.peer_gone(&peer);
        }
    }

    pub(super) fn on_frame(&mut self, from: usize, to: usize, root: Cid, bytes: &[u8], local: u64) {
        let peer = self.nodes[from].peer;
        let reset = |w: &mut World| {
            // A bad frame resets the stream: the sender is dropped from this node's fetches.
            w.record("reset", from as u64, to as u64);
            w.disconnect(to, peer);
        };
        if bytes.len() < 4 {
            return reset(self);
        }
        let prefix: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        if Frame::check_len(prefix).is_err() {
            return reset(self);
        }
        let Ok(frame) = Frame::decode(&bytes[4..]) else {
            return reset(self);
        };
        if std::env::var("MYCEL_SIM_DEBUG")
            .is_ok_and(|d| d == from.to_string() || d == to.to_string())
        {
            let desc = match &frame {
                Frame::Want { cids, .. } => format!("want {}", cids.len()),
                Frame::Block { cid, .. } => format!(
                    "block {:?}",
                    mycel_proto::wire::cid(cid).map(|c| c.to_string()[50..].to_string())
                ),
                Frame::DontHave { cid, .. } => format!(
                    "donthave {:?}",
                    mycel_proto::wire::cid(cid).map(|c| c.to_string()[50..].to_string())
                ),
                Frame::Refused { reason, .. } => format!("refused {reason}"),
                Frame::WhoHas { .. } => "whohas".into(),
                Frame::Holding { complete, .. } => format!("holding {complete}"),
                Frame::Namespace { namespace, .. } => format!("namespace {namespace}"),
            };
            eprintln!("{} {from}->{to} {} {desc}", self.now, &root.to_string()[50..]);
        }
        match frame {
            Frame::Want { req, root: r, cids } => self.serve(from, to, root, req, r, cids),
            Frame::WhoHas { req, root: r } => {
                if !self.is_member(to, from) {
                    return;
                }
                let Ok(rc) = mycel_proto::wire::cid(&r) else { return };
                self.check_claims(to);
                let complete = self.nodes[to].complete.contains(&rc);
                if complete || self.nodes[to].fetches.contains_key(&rc) {
                    let f = Frame::Holding { req, root: r, complete };
                    self.send(to, from, Msg::Frame { root, bytes: f.encode() });
                }
            }
            Frame::Holding { root: r, complete, .. } => {
                let Ok(rc) = mycel_proto::wire::cid(&r) else { return };
                self.nodes[to].directory.handle_holding(peer, rc, complete, Timestamp(local));
                let same = self.nodes[from].zone == self.nodes[to].zone;
                let banned = self.nodes[to].banned.contains_key(&peer);
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&rc)
                    && !banned
                {
                    // Workaround for a fetch-core limitation (regression test
                    // `fetch_forgets_dont_have_of_a_complete_holder`): a `DontHave` is remembered
                    // for the whole fetch, so a complete holder that once failed a read would
                    // never be asked again. Re-adding the peer clears what it lacked.
                    if complete && f.peers().any(|p| *p == peer) {
                        f.peer_gone(&peer);
                    }
                    f.add_peer(peer, same);
                }
            }
            Frame::Block { cid, bytes: b, .. } => {
                if self.nodes[to].kind == Kind::Outsider {
                    let now = self.now;
                    self.checker.fail(
                        now,
                        "safety:non-member-content",
                        format!("outsider {to} received a block from node {from}"),
                    );
                    return;
                }
                let Ok(c) = mycel_proto::wire::cid(&cid) else { return reset(self) };
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&root) {
                    f.handle_block(peer, c, b, Timestamp(local));
                }
            }
            Frame::DontHave { cid, .. } => {
                let Ok(c) = mycel_proto::wire::cid(&cid) else { return reset(self) };
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&root) {
                    f.handle_dont_have(peer, c);
                }
            }
            Frame::Refused { .. } => {
                self.record("refused", from as u64, to as u64);
                if let Some((f, _)) = self.nodes[to].fetches.get_mut(&root) {
                    f.handle_refused(peer);
                }
            }
            // Simulated content is namespaced by its committed pins only (no unpinned
            // `add --namespace`), so no simulated holder sends this.
            Frame::Namespace { .. } => {}
        }
    }

    /// The serving side of the exchange at node `s` for requester `f`.
    pub(super) fn serve(
        &mut self,
        f: usize,
        s: usize,
        stream: Cid,
        req: u64,
        root: [u8; 36],
        cids: Vec<[u8; 36]>,
    ) {
        let refuse = |w: &mut World, reason: &str| {
            let fr = Frame::Refused { req, reason: reason.into() };
            w.send(s, f, Msg::Frame { root: stream, bytes: fr.encode() });
        };
        let fpeer = self.nodes[f].peer;
        if !self.is_member(s, f) {
            return refuse(self, &Refusal::NotMember.to_string());
        }
        let Ok(root_cid) = mycel_proto::wire::cid(&root) else { return refuse(self, "bad root") };
        // The same check the daemon's exchange makes (no local namespaces here: simulated
        // content is namespaced by its committed pins only).
        let verdict = core_access::check_read(self.nodes[s].view(), &fpeer, &root_cid, None);
        let allowed_here = verdict.is_ok();
        let skip_grant =
            cfg!(feature = "sim-bugs") && self.bugs & crate::bugs::SERVE_WITHOUT_GRANT != 0;
        if let Err(refusal) = verdict
            && !skip_grant
        {
            return refuse(self, &refusal.to_string());
        }
        let hostility = self.nodes[s].hostility;
        if hostility == Hostility::Oversized {
            let mut junk = ((FRAME_BYTES_MAX as u32) + 1).to_le_bytes().to_vec();
            junk.extend_from_slice(&[0; 16]);
            self.send(s, f, Msg::Frame { root: stream, bytes: junk });
            return;
        }
        let read_error = if self.healed_at.is_none() { self.mix.read_error } else { 0.0 };
        for c in cids {
            let Ok(cid) = mycel_proto::wire::cid(&c) else { continue };
            let in_tree = {
                let n = &self.nodes[s];
                n.trees.contains(&DiskBlocks(&n.store), &root_cid, &cid)
            };
            let skip_tree =
                cfg!(feature = "sim-bugs") && self.bugs & crate::bugs::SERVE_OUTSIDE_TREE != 0;
            if !in_tree && !skip_tree {
                let refusal = Refusal::NotInTree { cid, root: root_cid };
                return refuse(self, &refusal.to_string());
            }
            let block = if read_error > 0.0 && self.rng.gen_bool(read_error) {
                self.fault("read-error", s as u64);
                None
            } else {
                self.read_block(s, &cid)
            };
            let frame = match block {
                None => Frame::DontHave { req, cid: c },
                Some(b) => {
                    let mut bytes = b.to_vec();
                    if hostility == Hostility::Corrupt
                        && cid.codec() == mycel_chunker::Codec::Raw
                        && !bytes.is_empty()
                    {
                        bytes[0] ^= 0x5a;
                    }
                    // The root manifest of a pin the requester may not read, served under
                    // another root: what the tree check exists to stop.
                    if cid != root_cid {
                        self.check_pin_root_served(s, f, &cid, &root_cid);
                    }
                    // An honest node serves only what `read_block` verified against the CID.
                    if !allowed_here {
                        let latest_ok = self.latest().is_some_and(|st| {
                            core_access::check_read(st, &fpeer, &root_cid, None).is_ok()
                        });
                        let ns = core_access::namespace(self.nodes[s].view(), &root_cid, None)
                            .to_string();
                        if self.served_after_revocation(f, &ns) {
                            let now = self.now;
                            self.checker.fail(
                                now,
                                "safety:served-after-revocation",
                                format!("node {s} served {root_cid} of {ns} to node {f} after the revocation of its grant committed there"),
                            );
                        } else if !latest_ok {
                            let now = self.now;
                            self.checker.fail(
                                now,
                                "safety:read-grant",
                                format!("node {s} served {root_cid} to node {f}, which holds no read grant for it"),
                            );
                        }
                    }
                    Frame::Block { req, cid: c, bytes }
                }
            };
            self.send(s, f, Msg::Frame { root: stream, bytes: frame.encode() });
        }
    }

    /// Checks a block `s` serves to `f` under `root`: if it is the root of a pin in a namespace
    /// `f` may not read (in the newest committed state), it must not leave `s`.
    pub(super) fn check_pin_root_served(&mut self, s: usize, f: usize, cid: &Cid, root: &Cid) {
        let Some(latest) = self.latest() else { return };
        let Some(pin) = latest.pins.get(cid.to_bytes().as_slice()) else { return };
        let ns = pin.namespace.clone();
        if core_access::may_read_namespace(latest, &self.nodes[f].peer, &ns)
            || self.served_after_revocation(f, &ns)
        {
            return;
        }
        let now = self.now;
        self.checker.fail(
            now,
            "safety:read-grant",
            format!("node {s} served the manifest of {cid} (namespace {ns}) to node {f} under {root}, which node {f} may read"),
        );
    }
}
