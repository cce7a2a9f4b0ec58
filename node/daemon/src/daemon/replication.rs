//! The replication worker's IO: the plan's fetches, keeps and evictions carried out, the
//! storage budget measured, and pins reported with their standing.

use super::*;

impl Daemon {
    /// Runs the replication plan and carries out this node's part of it.
    pub(super) fn replicate(&mut self) {
        let pins_now = self.cluster_state().pins.len();
        if !self.in_cluster() || pins_now == 0 {
            self.plan = mycel_policy::plan::Plan::default();
            return;
        }
        if pins_now > REPLICATION_PINS_MAX {
            // Planning is O(pins x members) on the event loop: past this size it would stall
            // the node (and a manager's Raft). Pins stay committed; placement waits.
            // (Planned at most every 1 + pins/10,000 intervals, so this warns rarely.)
            tracing::warn!(
                pins = pins_now,
                "replication planning skipped above {REPLICATION_PINS_MAX} pins"
            );
            self.plan = mycel_policy::plan::Plan::default();
            return;
        }
        let now = self.ts();
        // One store lookup per pinned root: whether it is held here, and its length.
        let held: BTreeMap<Cid, u64> = self
            .cluster_state()
            .pins
            .values()
            .filter_map(crate::replicate::pin_cid)
            .filter_map(|c| self.store.root(&c).ok().flatten().map(|r| (c, r.len)))
            .collect();
        let complete = |c: &Cid| held.contains_key(c);
        let fetching = self
            .jobs
            .iter()
            .map(|(r, j)| {
                let p = j.fetch.progress();
                (*r, (p.done_bytes, p.total_bytes))
            })
            .collect();
        let local = crate::replicate::Local {
            me: self.me,
            complete: &complete,
            fetching,
            free_bytes: self.free_bytes,
            load: self.jobs.len() as u32,
        };
        // Taken out while the committed state is borrowed; put back after planning.
        let mut scores = std::mem::take(&mut self.placement_scores);
        let state = self.cluster_state();
        let size_of = |c: &Cid| held.get(c).copied().unwrap_or(0);
        let pins = crate::replicate::pin_specs(state, &size_of);
        let nodes = crate::replicate::node_states(
            state,
            &self.directory,
            &local,
            now,
            self.config.node.node_lost_ms,
        );
        let settings = crate::replicate::settings(state);
        // Only nodes that may read a namespace hold its pins: plan each namespace with the
        // others marked as non-storage.
        let access = self.access.read().expect("access lock").clone();
        let namespace_of = |spec: &mycel_policy::plan::PinSpec| {
            state.pins.get(&spec.root).map_or("default", |p| p.namespace.as_str()).to_string()
        };
        let mut may_read = |id: &[u8], ns: &str| {
            mycel_proto::PeerId::from_bytes(id).is_some_and(|p| access.may_read_namespace(&p, ns))
        };
        let mut plan = mycel_policy::plan::plan_namespaced(
            &pins,
            &namespace_of,
            &mut may_read,
            &nodes,
            &settings,
            unix_ms(),
            &mut scores,
        );
        self.placement_scores = scores;
        // Reports in committed pin order, as `pins` is.
        let order: BTreeMap<&[u8], usize> =
            pins.iter().enumerate().map(|(i, p)| (p.root.as_slice(), i)).collect();
        plan.pins.sort_by_key(|r| order.get(r.root.as_slice()).copied());
        let me = self.me.to_bytes();
        let mine: Vec<mycel_policy::plan::Action> = plan.for_node(&me).cloned().collect();
        for action in mine {
            use mycel_policy::plan::Action as P;
            match action {
                P::Fetch { root, .. } => {
                    if let Ok(cid) = Cid::from_bytes(&root) {
                        if !self.jobs.contains_key(&cid) {
                            tracing::info!(%cid, "replication: fetching");
                        }
                        self.start_fetch(cid, None);
                    }
                }
                P::Cancel { root, .. } => {
                    if let Ok(cid) = Cid::from_bytes(&root)
                        && self.jobs.get(&cid).is_some_and(|j| j.keep && j.waiters.is_empty())
                    {
                        tracing::info!(%cid, "replication: copy work moved elsewhere");
                        self.jobs.remove(&cid);
                        self.reqs.retain(|_, (r, _)| *r != cid);
                    }
                }
                P::Release { root, .. } => {
                    if let Ok(cid) = Cid::from_bytes(&root) {
                        tracing::info!(%cid, "replication: replica released (now cache)");
                    }
                }
            }
        }
        let (mut under, mut risk, mut missed, mut unplaceable) = (0, 0, 0, 0);
        for (spec, r) in pins.iter().zip(&plan.pins) {
            debug_assert_eq!(spec.root, r.root);
            under += i64::from(r.replicas < spec.replicas_min);
            unplaceable += i64::from(r.unplaceable.is_some());
            match r.preposition.map(|p| p.2) {
                Some(mycel_policy::plan::Deadline::AtRisk) => risk += 1,
                Some(mycel_policy::plan::Deadline::Missed) => missed += 1,
                _ => {}
            }
        }
        self.metrics.pins_under_replicated.set(under);
        self.metrics.pins_unplaceable.set(unplaceable);
        self.metrics.prepositions_at_risk.set(risk);
        self.metrics.prepositions_missed.set(missed);
        self.metrics.fetches_active.set(self.jobs.len() as i64);
        self.plan = plan;
    }

    /// Roots this node must keep: replicas placed here, pre-positions here, copies of pins
    /// still under their minimum, and the cluster's state objects.
    pub(super) fn pinned_here(&self) -> BTreeSet<Vec<u8>> {
        let me = self.me.to_bytes();
        let released: BTreeSet<&[u8]> = self
            .plan
            .for_node(&me)
            .filter_map(|a| match a {
                mycel_policy::plan::Action::Release { root, .. } => Some(root.as_slice()),
                _ => None,
            })
            .collect();
        let state = self.cluster_state();
        let mut keep = BTreeSet::new();
        for r in &self.plan.pins {
            let under = state.pins.get(&r.root).is_some_and(|p| r.replicas < p.replicas_min);
            let placed = r.holders.contains(&me) && !released.contains(r.root.as_slice());
            if under || placed {
                keep.insert(r.root.clone());
            }
        }
        // Before the first plan, every pinned root is kept.
        if self.plan.pins.is_empty() {
            keep.extend(state.pins.keys().cloned());
        }
        // Topology files are small and routers may need them at any moment: the active and
        // the latest version of every name (and their source bytes) are never evicted.
        for t in state.topologies.values() {
            for n in t.active.into_iter().chain(std::iter::once(t.latest())) {
                if let Some(v) = t.version(n) {
                    keep.insert(v.root.clone());
                    keep.insert(v.source.clone());
                }
            }
        }
        keep
    }

    /// Refreshes free bytes and, above the high watermark, evicts cached objects no pin
    /// needs here, oldest first, on a blocking thread.
    pub(super) fn budget(&mut self) {
        let n = &self.config.node;
        let used = self.store.used_bytes().unwrap_or(0);
        self.free_bytes = if n.capacity_bytes > 0 {
            n.capacity_bytes.saturating_sub(used)
        } else {
            fs_free_bytes(&self.dir.path)
        };
        let marks = mycel_policy::budget::Watermarks {
            high: f64::from(n.high_watermark_pct) / 100.0,
            low: f64::from(n.low_watermark_pct) / 100.0,
        };
        if n.capacity_bytes == 0
            || (used as f64) <= marks.high * n.capacity_bytes as f64
            || self.evicting.load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let mut keep = self.pinned_here();
        keep.extend(self.jobs.keys().map(|c| c.to_bytes().to_vec()));
        let capacity = n.capacity_bytes;
        let store = self.store.clone();
        let flag = self.evicting.clone();
        let metrics = self.metrics.clone();
        flag.store(true, std::sync::atomic::Ordering::Release);
        tokio::task::spawn_blocking(move || {
            let result = evict(&store, &keep, used, capacity, marks, &metrics);
            if let Err(e) = result {
                tracing::warn!("eviction: {e}");
            }
            flag.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    pub(super) fn pins_json(&self, only: Option<Cid>) -> serde_json::Value {
        let state = self.cluster_state();
        let report = |root: &[u8]| self.plan.pins.iter().find(|r| r.root == root);
        let peer_text =
            |b: &[u8]| PeerId::from_bytes(b).map_or_else(|_| "?".into(), |p| p.to_string());
        let pin_json = |p: &mycel_consensus::command::Pin| {
            let r = report(&p.root);
            let cid = Cid::from_bytes(&p.root).map_or_else(|_| "?".into(), |c| c.to_string());
            let pre = r.and_then(|r| r.preposition);
            serde_json::json!({
                "cid": cid,
                "name": p.name,
                "namespace": p.namespace,
                "replicas_min": p.replicas_min,
                "replicas_max": p.replicas_max,
                "zones": p.zones,
                "tags": p.tags,
                "preposition": p.preposition,
                "deadline_ms": p.deadline_ms,
                "replicas": r.map(|r| r.replicas),
                "copying": r.map(|r| r.copying),
                "holders": r.map(|r| r.holders.iter().map(|h| peer_text(h)).collect::<Vec<_>>()),
                "unplaceable": r.and_then(|r| r.unplaceable.clone()),
                "preposition_held": pre.map(|p| p.0),
                "preposition_targets": pre.map(|p| p.1),
                "deadline": pre.map(|p| p.2.as_str()),
            })
        };
        let Some(root) = only else {
            let pins: Vec<serde_json::Value> = state.pins.values().map(pin_json).collect();
            let grants: Vec<serde_json::Value> = state
                .grants
                .iter()
                .map(|g| {
                    serde_json::json!({"subject": g.subject, "permission": g.permission,
                    "namespace": g.namespace})
                })
                .collect();
            return serde_json::json!({"pins": pins, "grants": grants});
        };
        let key = root.to_bytes().to_vec();
        let Some(pin) = state.pins.get(&key) else {
            return serde_json::json!({"error": format!("{root} is not pinned")});
        };
        let fetch_planned: BTreeSet<&[u8]> = self
            .plan
            .actions
            .iter()
            .filter_map(|a| match a {
                mycel_policy::plan::Action::Fetch { node, root } if *root == key => {
                    Some(node.as_slice())
                }
                _ => None,
            })
            .collect();
        let now = self.ts();
        let nodes: Vec<serde_json::Value> = state
            .members
            .values()
            .filter_map(|m| {
                let peer = PeerId::from_bytes(&m.peer).ok()?;
                let (held, alive) = if peer == self.me {
                    let held = if matches!(self.store.root(&root), Ok(Some(_))) {
                        Some((true, None))
                    } else {
                        self.jobs.get(&root).map(|j| {
                            let p = j.fetch.progress();
                            (false, Some((p.done_bytes, p.total_bytes)))
                        })
                    };
                    (held, true)
                } else {
                    let cp = net::core_peer(&peer);
                    let alive = self
                        .directory
                        .node(&cp)
                        .is_some_and(|i| now.since(i.seen) <= self.config.node.node_lost_ms);
                    (self.directory.holding(&root, &cp), alive)
                };
                let (state_name, percent) = match held {
                    Some((true, _)) => ("held", Some(100.0)),
                    Some((false, Some((done, total)))) if total > 0 => {
                        ("fetching", Some((done as f64 * 1000.0 / total as f64).round() / 10.0))
                    }
                    Some((false, _)) => ("fetching", None),
                    None if fetch_planned.contains(m.peer.as_slice()) => ("queued", None),
                    None => ("-", None),
                };
                Some(serde_json::json!({
                    "peer_id": peer.to_string(),
                    "role": m.role.as_str(),
                    "zone": m.zone,
                    "alive": alive,
                    "state": state_name,
                    "percent": percent,
                    "replica": report(&key).is_some_and(|r| r.holders.contains(&m.peer)),
                }))
            })
            .collect();
        let mut v = pin_json(pin);
        v["nodes"] = serde_json::Value::Array(nodes);
        v
    }
}

/// Most pins the replication worker plans for (see [`Daemon::replicate`]).
pub(super) const REPLICATION_PINS_MAX: usize = 100_000;

/// Objects younger than this are never evicted.
pub(super) const EVICT_MIN_AGE_MS: u64 = 10_000;

/// Evicts cached roots oldest first down to the low watermark, then collects garbage.
pub(super) fn evict(
    store: &Store,
    keep: &BTreeSet<Vec<u8>>,
    used: u64,
    capacity: u64,
    marks: mycel_policy::budget::Watermarks,
    metrics: &Metrics,
) -> Result<(), crate::store::StoreError> {
    let objects: Vec<mycel_policy::budget::Cached> = store
        .roots()?
        .into_iter()
        .map(|(cid, r)| mycel_policy::budget::Cached {
            root: cid.to_bytes().to_vec(),
            // Shared blocks make this an upper bound; the pass repeats until under the mark.
            bytes: r.len.saturating_sub(r.hole_bytes),
            last_used_ms: r.added_ms,
            // Just added or fetched (a reader may still be restoring it): kept a while.
            pinned: keep.contains(cid.to_bytes().as_slice())
                || r.name == "cluster-state"
                || unix_ms().saturating_sub(r.added_ms) < EVICT_MIN_AGE_MS,
        })
        .collect();
    let plan = mycel_policy::budget::evict(&objects, used, capacity, marks);
    if plan.full {
        tracing::warn!("store above its high watermark with pinned content alone");
    }
    if plan.evict.is_empty() {
        return Ok(());
    }
    for root in &plan.evict {
        if let Ok(cid) = Cid::from_bytes(root)
            && store.remove_root(&cid)?
        {
            tracing::info!(%cid, "evicted from cache (storage budget)");
            metrics.evictions.inc();
        }
    }
    let report = store.gc()?;
    tracing::info!(removed_blocks = report.removed_blocks, "eviction: garbage collected");
    Ok(())
}

/// Free bytes on the filesystem holding `path` (0 if unknown).
pub(super) fn fs_free_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return 0 };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by statvfs on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    st.f_bavail.saturating_mul(st.f_frsize)
}
