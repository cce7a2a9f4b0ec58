//! Fetching through the exchange: answers from peers into the fetch cores, the fetch cores'
//! actions out to peers and the store, and the store thread that commits fetched blocks in
//! groups.

use super::*;

impl Daemon {
    pub(super) fn on_net(&mut self, ev: NetEvent) {
        let now = self.ts();
        match ev {
            NetEvent::Closed { peer, reason } => {
                tracing::debug!(%peer, "request stream closed: {reason}");
                self.links.remove(&peer);
                let cp = net::core_peer(&peer);
                for job in self.jobs.values_mut() {
                    job.fetch.peer_gone(&cp);
                }
            }
            NetEvent::Inbound { peer, frame } => {
                let cp = net::core_peer(&peer);
                match frame {
                    Frame::Block { req, cid, bytes } => {
                        let (Some(root), Some(cid)) =
                            (self.answered(req), exchange::frame_cid(&cid))
                        else {
                            return;
                        };
                        // The fetch core checks the block against its CID (a mismatch comes
                        // back as a penalty, counted there).
                        if let Some(job) = self.jobs.get_mut(&root) {
                            job.fetch.handle_block(cp, cid, bytes, now);
                        }
                    }
                    Frame::DontHave { req, cid } => {
                        if let Some(root) = self.who_has.remove(&req) {
                            let _ = root; // the peer does not hold it: nothing to record
                            return;
                        }
                        let (Some(root), Some(cid)) =
                            (self.answered(req), exchange::frame_cid(&cid))
                        else {
                            return;
                        };
                        if let Some(job) = self.jobs.get_mut(&root) {
                            job.fetch.handle_dont_have(cp, cid);
                        }
                    }
                    Frame::Holding { req, root, complete } => {
                        let (Some(asked), Some(root)) =
                            (self.who_has.remove(&req), exchange::frame_cid(&root))
                        else {
                            return;
                        };
                        if asked != root {
                            return;
                        }
                        self.directory.handle_holding(cp, root, complete, now);
                        let same_zone = self
                            .directory
                            .node(&cp)
                            .is_some_and(|n| n.zone == self.config.node.zone);
                        if let Some(job) = self.jobs.get_mut(&root) {
                            job.fetch.add_peer(cp, same_zone);
                        }
                    }
                    Frame::Namespace { req, root, namespace } => {
                        let Some(root) = exchange::frame_cid(&root) else { return };
                        self.on_namespace(peer, req, root, namespace);
                    }
                    Frame::Refused { req, reason } => {
                        tracing::warn!(%peer, "refused: {reason}");
                        let root = self
                            .reqs
                            .remove(&req)
                            .map(|r| r.0)
                            .or_else(|| self.who_has.remove(&req));
                        if let Some(root) = root
                            && let Some(job) = self.jobs.get_mut(&root)
                        {
                            job.fetch.handle_refused(cp);
                            // Every holder refused a requester's fetch: say why, store nothing.
                            if job.fetch.peers().count() == 0 && !job.keep {
                                let job = self.jobs.remove(&root).expect("present");
                                let why = format!("refused by {peer}: {reason}");
                                let update = self.update_of(&job, "failed", Some(why));
                                for w in &job.waiters {
                                    let _ = w.try_send(update.clone());
                                }
                            }
                        }
                    }
                    other => {
                        tracing::debug!(%peer, "unexpected frame on a request stream: {other:?}")
                    }
                }
            }
        }
    }

    /// The fetch a request belongs to; forgets the request once every answer is in.
    /// A holder serves `root` (asked for in `req`) under `namespace`: unless a committed pin
    /// names one, this node's copy is served under it too. Recorded through the store queue,
    /// so it commits no later than the blocks that follow it. A stricter namespace than
    /// `default` is all a peer can impose this way.
    pub(super) fn on_namespace(&mut self, peer: PeerId, req: u64, root: Cid, namespace: String) {
        if self.reqs.get(&req).map(|r| r.0) != Some(root) {
            return;
        }
        if let Err(e) = mycel_policy::access::validate_namespace(&namespace) {
            tracing::debug!(%peer, "bad namespace for {root}: {e}");
            return;
        }
        let pinned = self.cluster_state().pins.contains_key(root.to_bytes().as_slice());
        let Some(job) = self.jobs.get_mut(&root) else { return };
        if pinned || namespace == mycel_policy::access::DEFAULT_NAMESPACE || job.namespace.is_some()
        {
            return;
        }
        job.namespace = Some(namespace.clone());
        let tx = self.store_tx.clone();
        tokio::task::block_in_place(|| {
            let _ = tx.send(StoreJob::Namespace { root, namespace });
        });
    }

    pub(super) fn answered(&mut self, req: u64) -> Option<Cid> {
        let entry = self.reqs.get_mut(&req)?;
        let root = entry.0;
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            self.reqs.remove(&req);
        }
        Some(root)
    }

    /// Starts (or joins) a fetch of `root`: for a requester streaming `updates`, or, with
    /// `None`, as replication work that runs until the plan cancels it.
    pub(super) fn start_fetch(&mut self, root: Cid, updates: Option<mpsc::Sender<FetchUpdate>>) {
        let keep = updates.is_none();
        if let Ok(Some(_)) = self.store.root(&root) {
            let Some(updates) = updates else { return };
            let _ = updates.try_send(FetchUpdate {
                total_bytes: 0,
                done_bytes: 0,
                by_peer: BTreeMap::new(),
                peers: 0,
                rerequested: 0,
                state: "complete".into(),
                error: None,
                output: None,
            });
            return;
        }
        if let Some(job) = self.jobs.get_mut(&root) {
            job.waiters.extend(updates);
            job.keep |= keep;
            return;
        }
        let config = fetch::Config {
            timeout_ms: self.config.node.request_timeout_ms,
            want_batch: 32,
            window_max: 256,
            seed: node_seed(&self.me),
            ..fetch::Config::default()
        };
        let mut f = Fetch::new(root, config, self.ts());
        let cp_zone = self.config.node.zone.clone();
        for h in self.directory.holders(&root) {
            if let Some(p) = net::libp2p_peer(&h.peer)
                && self.connected.contains_key(&p)
            {
                f.add_peer(h.peer, h.zone.as_deref() == Some(cp_zone.as_str()));
            }
        }
        let waiters = updates.into_iter().collect();
        let job = Job { fetch: f, waiters, storing: false, keep, namespace: None, output: None };
        self.jobs.insert(root, job);
        self.metrics.fetches_active.set(self.jobs.len() as i64);
        let peers: Vec<PeerId> = self.connected.keys().copied().collect();
        for p in peers {
            self.send_who_has(p, root);
        }
    }

    /// A requester asked for `root` at `out`: unless this fetch writes an output already,
    /// write it while it arrives (whatever passed before is written by the final pass).
    pub(super) fn stream_output(&mut self, root: Cid, out: &std::path::Path) {
        let Some(job) = self.jobs.get_mut(&root) else { return };
        if job.output.is_some() {
            return;
        }
        match LiveOutput::create(root, out) {
            Ok(o) => job.output = Some(o),
            // The restore after the fetch reports it, as it would without a daemon.
            Err(e) => tracing::debug!(%root, "not streaming the output: {e}"),
        }
    }

    pub(super) fn update_of(&self, job: &Job, state: &str, error: Option<String>) -> FetchUpdate {
        let p = job.fetch.progress();
        FetchUpdate {
            total_bytes: p.total_bytes,
            done_bytes: p.done_bytes,
            by_peer: p
                .by_peer
                .iter()
                .filter_map(|(peer, b)| net::libp2p_peer(peer).map(|p| (p.to_string(), *b)))
                .collect(),
            peers: job.fetch.peers().count(),
            rerequested: p.rerequested,
            state: state.into(),
            error,
            output: None,
        }
    }

    pub(super) fn on_store_done(&mut self, done: StoreDone) {
        match done {
            StoreDone::Complete(root) if self.awaiting_state == Some(root) => {
                self.awaiting_state = None;
                self.jobs.remove(&root);
                let bytes = crate::restore::read_object(&self.store, &root);
                match (bytes, self.core.as_mut()) {
                    (Ok(b), Some(core)) => {
                        if let Err(e) = core.handle_snapshot_state(root, &b) {
                            self.fatal(&e.to_string());
                        }
                    }
                    (Err(e), _) => tracing::warn!("reading snapshot state {root}: {e}"),
                    _ => {}
                }
            }
            StoreDone::Complete(root) => {
                if let Some(mut job) = self.jobs.remove(&root) {
                    let mut update = self.update_of(&job, "complete", None);
                    match job.output.take() {
                        None => {
                            for w in &job.waiters {
                                let _ = w.try_send(update.clone());
                            }
                        }
                        // The rest of the output is written off the loop; the requesters
                        // hear of completion once it is in place.
                        Some(output) => {
                            let store = self.store.clone();
                            let waiters = job.waiters;
                            tokio::task::spawn_blocking(move || {
                                update.output = output.finish(&store).unwrap_or_else(|e| {
                                    tracing::warn!(%root, "writing the output: {e}");
                                    None
                                });
                                for w in &waiters {
                                    let _ = w.blocking_send(update.clone());
                                }
                            });
                        }
                    }
                }
                self.announcer.announce_soon(self.ts());
            }
            StoreDone::Failed(root, e) => {
                if let Some(job) = self.jobs.remove(&root) {
                    let update = self.update_of(&job, "failed", Some(e));
                    for w in &job.waiters {
                        let _ = w.try_send(update.clone());
                    }
                }
            }
            StoreDone::Error(e) => tracing::error!("store: {e}"),
        }
        self.metrics.fetches_active.set(self.jobs.len() as i64);
    }

    /// Runs every fetch core until it has nothing more to do right now.
    pub(super) fn drive(&mut self) {
        self.drive_cluster();
        let now = self.ts();
        let roots: Vec<Cid> = self.jobs.keys().copied().collect();
        for root in roots {
            while let Some(action) = self.jobs.get_mut(&root).and_then(|j| j.fetch.poll_action(now))
            {
                self.execute(root, action);
            }
            // The full check walks every pending block: run it now and then, not per event.
            self.drives += 1;
            if self.drives.is_multiple_of(4096)
                && let Some(job) = self.jobs.get(&root)
            {
                job.fetch.check_invariants();
            }
        }
    }

    pub(super) fn execute(&mut self, root: Cid, action: Action) {
        match action {
            Action::Lookup { cid, need_bytes } => {
                let local = if need_bytes {
                    match self.store.get(&cid) {
                        Ok(Some(b)) => {
                            if let Some(o) =
                                self.jobs.get_mut(&root).and_then(|j| j.output.as_mut())
                            {
                                o.on_block(&cid, &b);
                            }
                            Local::Bytes(b)
                        }
                        _ => Local::Absent,
                    }
                } else {
                    match self.store.has(&cid) {
                        Ok(true) => Local::Present,
                        _ => Local::Absent,
                    }
                };
                if let Some(job) = self.jobs.get_mut(&root) {
                    job.fetch.handle_local(cid, local);
                }
            }
            Action::Request { peer, root, cids, .. } => {
                let Some(p) = net::libp2p_peer(&peer) else { return };
                let req = self.next_req;
                self.next_req += 1;
                self.reqs.insert(req, (root, cids.len()));
                let link = self.link(p);
                let frame = Frame::Want {
                    req,
                    root: root.to_bytes(),
                    cids: cids.iter().map(Cid::to_bytes).collect(),
                };
                if !link.send(frame) {
                    self.links.remove(&p);
                    if let Some(job) = self.jobs.get_mut(&root) {
                        job.fetch.peer_gone(&peer);
                    }
                }
            }
            Action::Store { cid, bytes, .. } => {
                let output = self.jobs.get_mut(&root).and_then(|j| j.output.as_mut());
                let place = output.and_then(|o| o.on_block(&cid, &bytes));
                let job = StoreJob::Block { cid, bytes, place };
                // Backpressure: the store thread is the one place blocks become durable.
                if let Err(std_mpsc::TrySendError::Full(job)) = self.store_tx.try_send(job) {
                    let tx = self.store_tx.clone();
                    tokio::task::block_in_place(|| {
                        let _ = tx.send(job);
                    });
                }
            }
            Action::Penalize { peer, reason, disconnect } => {
                tracing::warn!(peer = ?net::libp2p_peer(&peer), ?reason, disconnect, "peer penalised");
                if reason == fetch::Penalty::Corrupt {
                    self.metrics.corrupt_blocks.inc();
                }
                if disconnect && let Some(p) = net::libp2p_peer(&peer) {
                    self.metrics.peers_disconnected.inc();
                    let _ = self.swarm.disconnect_peer_id(p);
                    self.links.remove(&p);
                }
            }
            Action::WhoHas { root } => {
                let peers: Vec<PeerId> = self.connected.keys().copied().collect();
                for p in peers {
                    self.send_who_has(p, root);
                }
            }
            Action::Complete { root, kind, len } => {
                if let Some(job) = self.jobs.get_mut(&root) {
                    job.storing = true;
                }
                let record = RootRecord {
                    kind: kind.to_string(),
                    len,
                    chunks: 0,
                    hole_bytes: 0,
                    added_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    name: "fetched".into(),
                    source: None,
                };
                let tx = self.store_tx.clone();
                tokio::task::block_in_place(|| {
                    let _ = tx.send(StoreJob::Root { root, record });
                });
            }
            Action::Failed { root, reason } => {
                if let Some(job) = self.jobs.remove(&root) {
                    let update = self.update_of(&job, "failed", Some(reason));
                    for w in &job.waiters {
                        let _ = w.try_send(update.clone());
                    }
                }
            }
        }
    }
}

/// The store thread: appends fetched blocks and commits them in groups (by size, or as soon
/// as the queue runs dry), so the writer is free for adds in between.
pub(super) fn store_worker(
    store: &Store,
    rx: &std_mpsc::Receiver<StoreJob>,
    done: &mpsc::Sender<StoreDone>,
) {
    const GROUP_BYTES: u64 = 32 << 20;
    loop {
        let Ok(first) = rx.recv() else { return };
        let mut w = match store.writer() {
            Ok(w) => w,
            Err(e) => {
                let _ = done.blocking_send(StoreDone::Error(e.to_string()));
                continue;
            }
        };
        let mut job = Some(first);
        let mut bytes = 0u64;
        let mut finished: Vec<Cid> = Vec::new();
        while let Some(j) = job.take() {
            match j {
                StoreJob::Block { cid, bytes: b, place } => {
                    bytes += b.len() as u64;
                    if let Err(e) = w.put(cid, &b) {
                        let _ = done.blocking_send(StoreDone::Error(e.to_string()));
                    }
                    if let Some(place) = place {
                        place.write(cid, &b);
                    }
                }
                StoreJob::Root { root, record } => {
                    w.add_root(root, record);
                    finished.push(root);
                }
                StoreJob::Namespace { root, namespace } => w.set_namespace(root, &namespace),
            }
            if bytes >= GROUP_BYTES || !finished.is_empty() {
                break;
            }
            job = rx.recv_timeout(Duration::from_millis(20)).ok();
        }
        match w.commit() {
            Ok(()) => {
                for root in finished {
                    let _ = done.blocking_send(StoreDone::Complete(root));
                }
            }
            Err(e) => {
                for root in finished {
                    let _ = done.blocking_send(StoreDone::Failed(root, e.to_string()));
                }
                let _ = done.blocking_send(StoreDone::Error(e.to_string()));
            }
        }
    }
}
