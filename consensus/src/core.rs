//! The consensus core: raft-rs's `RawNode` with the Ready loop written once, deterministic
//! election timeouts, the state machine, snapshots and membership reconciliation.
//!
//! Inputs: [`Core::handle_timeout`] (ticks), [`Core::step`] (messages from peers),
//! [`Core::propose`], [`Core::read_index`], [`Core::handle_rtt`] (measured round trips to
//! members, which also prove them reachable) and [`Core::handle_rtt_report`] (a follower's
//! mean, on the leader). Outputs: [`Output`]s the driver carries out (messages to send,
//! applied proposals, reads that may be served, blocks to store, proposals the core decided
//! on, round-trip reports to the leader).
//!
//! Once per election timeout the leader evaluates self-healing and leader preference
//! ([`crate::heal`] holds the decisions and their rationale): a manager voter silent past
//! [`Config::grace_ms`] is replaced through an [`Output::Propose`], and leadership moves to a
//! manager with a clearly lower mean round-trip time to the other members.

use std::collections::{BTreeMap, VecDeque};

use mycel_chunker::Cid;
use mycel_chunker::manifest::{Kind, NodeEntry, Root, TreeBuilder};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, StateRole, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::command::{Command, Role};
use crate::heal;
use crate::log::{LogBackend, LogStore};
use crate::state::{ClusterState, Outcome};

/// Tuning of the core.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's Raft id.
    pub id: u64,
    /// Milliseconds per tick.
    pub tick_ms: u64,
    /// Ticks without a leader before an election (randomised in [n, 2n)).
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Seed of the core's own RNG (election timeouts).
    pub seed: u64,
    /// Applied entries between snapshots.
    pub snapshot_entries: u64,
    /// How long a voter may go unheard (no Raft message, no round trip) before the leader
    /// replaces it with an eligible member.
    pub grace_ms: u64,
    /// Leader preference: a candidate's mean round-trip time must be at least this many
    /// percent lower than the leader's...
    pub leader_rtt_better_pct: u64,
    /// ...and at least this many milliseconds lower...
    pub leader_rtt_better_ms: u64,
    /// ...in this many consecutive evaluations (one per election timeout).
    pub leader_rtt_evaluations: u32,
    /// Election timeouts a leader waits, after gaining leadership or transferring it, before
    /// it transfers leadership for a better round-trip time.
    pub leader_transfer_gap_elections: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            id: 1,
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            seed: 1,
            snapshot_entries: 10_000,
            grace_ms: 30_000,
            leader_rtt_better_pct: 30,
            leader_rtt_better_ms: 5,
            leader_rtt_evaluations: 5,
            leader_transfer_gap_elections: 20,
        }
    }
}

impl Config {
    /// One base election timeout in milliseconds.
    fn election_ms(&self) -> u64 {
        self.tick_ms * self.election_ticks as u64
    }
}

/// Timestamps are milliseconds on the driver's clock.
pub use mycel_base::Timestamp;

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send a Raft message (protobuf bytes) to the node with this Raft id.
    Send {
        /// Destination Raft id.
        to: u64,
        /// The encoded message.
        msg: Vec<u8>,
    },
    /// A proposal was applied (or rejected) at `index`.
    Applied {
        /// Log index.
        index: u64,
        /// Proposer PeerId bytes.
        from: Vec<u8>,
        /// Proposer sequence.
        seq: u64,
        /// What happened.
        outcome: Outcome,
    },
    /// A linearizable read may be served once the state has applied `index`.
    ReadReady {
        /// The context given to [`Core::read_index`].
        ctx: Vec<u8>,
        /// The commit index at the time of the read.
        index: u64,
    },
    /// Term, role or leader changed.
    RoleChanged {
        /// Current term.
        term: u64,
        /// Current leader's Raft id (0: none).
        leader: u64,
        /// Whether this node leads.
        leading: bool,
    },
    /// Store these blocks (a snapshot's state as a mycel object) and keep them.
    StoreBlocks(Vec<(Cid, Vec<u8>)>),
    /// A snapshot arrived naming this state object: fetch it and call
    /// [`Core::handle_snapshot_state`].
    NeedState(Cid),
    /// The leader decided on these commands (a lost voter's replacement): propose them as one
    /// [`crate::command::Proposal`] under the driver's own PeerId and next sequence number.
    /// The core asks again after a few election timeouts while the decision still stands;
    /// the commands are idempotent, so a duplicate that commits does no harm.
    Propose(Vec<Command>),
    /// Tell the leader this node's mean round-trip time to the other members; the leader's
    /// driver hands it to [`Core::handle_rtt_report`].
    ReportRtt {
        /// The leader's Raft id.
        to: u64,
        /// The mean, in milliseconds.
        mean_rtt_ms: u64,
    },
}

/// Why a proposal was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// Only the leader proposes; forward to it (0: none known).
    #[error("not the leader (leader is {0})")]
    NotLeader(u64),
    /// raft-rs refused it (e.g. a leader transfer is in progress).
    #[error("proposal dropped: {0}")]
    Dropped(String),
}

/// Fatal conditions: the node must stop.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FatalError {
    /// The log could not be made durable.
    #[error("log sync failed: {0}")]
    Sync(String),
    /// raft-rs reported an invariant failure.
    #[error("raft: {0}")]
    Raft(String),
}

/// The consensus core of one node.
pub struct Core<B: LogBackend> {
    raw: RawNode<LogStore>,
    backend: B,
    state: ClusterState,
    config: Config,
    rng: ChaCha8Rng,
    soft: (u64, StateRole, u64),
    outputs: VecDeque<Output>,
    /// A Ready whose new entries and hard state are written to the backend but not synced:
    /// its early messages (a leader's appends) are in `outputs`, and the sync runs once the
    /// driver has taken them ([`Core::poll_output`]), so they travel while this node's disk
    /// syncs (raft-rs counts the leader's own entries only after the sync). Every input
    /// settles it first.
    unsynced: Option<raft::Ready>,
    /// The first fatal error: from then on every call fails with it (fail-stop). A failed
    /// sync may have lost what raft-rs now believes durable; carrying on would break Raft.
    failed: Option<FatalError>,
    next_tick: Timestamp,
    applied_since_snapshot: u64,
    /// A snapshot was installed whose state is not here yet: entries wait.
    awaiting_state: Option<(Cid, u64)>,
    held_entries: Vec<Entry>,
    /// A conf change was applied: snapshot now, so a new member gets the configuration.
    snapshot_now: bool,
    /// Peers a snapshot message went to (reported to raft-rs once sent).
    snapshot_sent: Vec<u64>,
    /// The latest time the driver gave (messages are stamped with it).
    clock: Timestamp,
    /// Ticks so far (evaluations run once per election timeout).
    ticks: u64,
    /// When each Raft id was last heard from: on the leader, Raft messages from nodes in the
    /// configuration; everywhere, round trips the driver measured. Keys are members or in
    /// the configuration (pruned at every evaluation).
    heard: BTreeMap<u64, Timestamp>,
    /// Smoothed round-trip time to each member, and when it was last measured.
    rtt: BTreeMap<u64, (u64, Timestamp)>,
    /// On the leader: each follower's reported mean round-trip time, and when it came.
    rtt_reports: BTreeMap<u64, (u64, Timestamp)>,
    /// When this node last gained leadership (None: not leading).
    led_since: Option<Timestamp>,
    /// When this node last transferred leadership for a better round-trip time.
    last_transfer: Option<Timestamp>,
    /// The candidate that won the last consecutive evaluations, and how many.
    streak: Option<(u64, u32)>,
    /// The replacement last asked for, and when.
    heal_proposed: Option<(heal::Replacement, Timestamp)>,
}

impl<B: LogBackend> std::fmt::Debug for Core<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("id", &self.config.id).field("soft", &self.soft).finish()
    }
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// The snapshot payload: the state object's root CID and the index it holds.
fn snapshot_data(cid: &Cid) -> Vec<u8> {
    let mut v = vec![1u8];
    v.extend_from_slice(&cid.to_bytes());
    v
}

fn parse_snapshot_data(data: &[u8]) -> Option<Cid> {
    match data.split_first() {
        Some((1, rest)) => Cid::from_bytes(rest).ok(),
        _ => None,
    }
}

/// Cuts a state image into a mycel object (file kind), returning its root and blocks.
pub fn state_object(bytes: &[u8]) -> (Cid, Vec<(Cid, Vec<u8>)>) {
    let config = mycel_chunker::Config::default();
    let cutter = mycel_chunker::cdc::Cutter::new(&config);
    let mut blocks = Vec::new();
    let mut tree = TreeBuilder::new(&config, true);
    let mut at = 0;
    for len in cutter.lengths(bytes) {
        let chunk = &bytes[at..at + len];
        at += len;
        let cid = Cid::raw(chunk);
        blocks.push((cid, chunk.to_vec()));
        tree.push(NodeEntry::Chunk { len: len as u64, cid });
    }
    let (t, len) = tree.finish();
    blocks.extend(tree.take_blocks().into_iter().map(|b| (b.cid, b.bytes)));
    let root = Root { kind: Kind::File, config, len, tree: t }.encode();
    blocks.push((root.cid, root.bytes));
    (root.cid, blocks)
}

impl<B: LogBackend> Core<B> {
    /// A core on `backend`, resuming from what it persisted (an empty backend and
    /// `bootstrap_voters` start a new cluster; an empty backend without them waits to be
    /// added by a leader).
    ///
    /// # Errors
    /// [`FatalError`] if the persisted log is unusable.
    pub fn new(
        config: Config,
        backend: B,
        bootstrap_voters: Vec<u64>,
        now: Timestamp,
    ) -> Result<Core<B>, FatalError> {
        let persisted = backend.load().map_err(FatalError::Sync)?;
        let fresh = persisted.hard_state == Default::default()
            && persisted.entries.is_empty()
            && persisted.snapshot.is_none();
        let mut store = if fresh && !bootstrap_voters.is_empty() {
            LogStore::bootstrap(bootstrap_voters.clone())
        } else {
            LogStore::from_persisted(&persisted)
        };
        let mut state = ClusterState::default();
        let mut applied = 0;
        if let Some((index, bytes)) = &persisted.state {
            state = ClusterState::decode(bytes).map_err(FatalError::Sync)?;
            assert_eq!(state.applied_index, *index, "state saved with its applied index");
            applied = *index;
        }
        // Entries between the saved state and the commit index are replayed by raft-rs
        // (Config::applied tells it where we are).
        // A snapshot newer than the saved state (a crash between receiving the snapshot and
        // fetching its state object): fetch the state again before applying anything.
        let mut awaiting = None;
        if applied < store.snapshot_index() {
            let snap = store.snapshot(0, 0).map_err(|e| FatalError::Raft(e.to_string()))?;
            if let Some(cid) = parse_snapshot_data(&snap.data) {
                awaiting = Some((cid, snap.get_metadata().index));
            }
            applied = store.snapshot_index();
            state = ClusterState::default();
        }
        if store.hard_state().commit < applied {
            let mut hs = store.hard_state().clone();
            hs.commit = applied;
            store.set_hard_state(hs);
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        raft_config.validate().map_err(|e| FatalError::Raft(e.to_string()))?;
        let raw = RawNode::new(&raft_config, store, &logger())
            .map_err(|e| FatalError::Raft(e.to_string()))?;
        let mut core = Core {
            raw,
            backend,
            state,
            rng: ChaCha8Rng::seed_from_u64(
                config.seed ^ config.id.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            soft: (0, StateRole::Follower, 0),
            outputs: VecDeque::new(),
            unsynced: None,
            failed: None,
            next_tick: now,
            applied_since_snapshot: 0,
            awaiting_state: awaiting,
            held_entries: Vec::new(),
            snapshot_now: false,
            snapshot_sent: Vec::new(),
            clock: now,
            ticks: 0,
            heard: BTreeMap::new(),
            rtt: BTreeMap::new(),
            rtt_reports: BTreeMap::new(),
            led_since: None,
            last_transfer: None,
            streak: None,
            heal_proposed: None,
            config,
        };
        if let Some((cid, _)) = awaiting {
            core.outputs.push_back(Output::NeedState(cid));
        }
        if fresh && !bootstrap_voters.is_empty() {
            // Persist the bootstrap configuration before anything depends on it.
            let cs = core.raw.store().conf_state().clone();
            core.backend.set_conf_state(&cs);
            core.backend.sync().map_err(FatalError::Sync)?;
        }
        core.randomize_timeout();
        core.soft = core.soft_now();
        Ok(core)
    }

    fn soft_now(&self) -> (u64, StateRole, u64) {
        (self.raw.raft.term, self.raw.raft.state, self.raw.raft.leader_id)
    }

    fn randomize_timeout(&mut self) {
        let n = self.config.election_ticks;
        let t = self.rng.gen_range(n..2 * n);
        self.raw.raft.set_randomized_election_timeout(t);
    }

    /// After anything that may change term, role or leader: redraw the timeout from our
    /// own RNG (raft-rs drew it from thread_rng) and report the change.
    fn after_input(&mut self) {
        let now = self.soft_now();
        if now != self.soft {
            let leading = now.1 == StateRole::Leader;
            if leading && (self.soft.1 != StateRole::Leader || self.soft.0 != now.0) {
                // Leadership gained: every node in the configuration gets the full grace
                // period from now (a follower never heard the other followers).
                let cs = self.raw.store().conf_state();
                for id in cs.voters.iter().chain(cs.learners.iter()) {
                    self.heard.insert(*id, self.clock);
                }
                self.led_since = Some(self.clock);
                self.streak = None;
                self.heal_proposed = None;
            } else if !leading {
                self.led_since = None;
                self.streak = None;
            }
            self.soft = now;
            self.randomize_timeout();
            self.outputs.push_back(Output::RoleChanged {
                term: now.0,
                leader: now.2,
                leading: now.1 == StateRole::Leader,
            });
        }
    }

    /// This node's Raft id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The applied state.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Current leader (0: none known).
    pub fn leader(&self) -> u64 {
        self.raw.raft.leader_id
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// Voters and learners.
    pub fn conf(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.raw.store().conf_state();
        (cs.voters.clone(), cs.learners.clone())
    }

    /// Commit index.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// When [`Core::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Timestamp {
        self.next_tick
    }

    /// Ticks the clock up to `now`.
    ///
    /// # Errors
    /// [`FatalError`]: the node must stop.
    pub fn handle_timeout(&mut self, now: Timestamp) -> Result<(), FatalError> {
        self.settle()?;
        self.clock = self.clock.max(now);
        let mut evaluate = false;
        while self.next_tick <= now {
            self.next_tick = Timestamp(self.next_tick.0 + self.config.tick_ms);
            self.ticks += 1;
            evaluate |= self.ticks.is_multiple_of(self.config.election_ticks as u64);
            self.raw.tick();
            self.after_input();
        }
        self.process()?;
        if evaluate {
            self.evaluate();
        }
        Ok(())
    }

    /// A round trip to the member with Raft id `peer` took `rtt_ms` (the driver's pings).
    /// It also proves the member reachable. Ids that are not members are ignored.
    pub fn handle_rtt(&mut self, peer: u64, rtt_ms: u64, now: Timestamp) {
        self.clock = self.clock.max(now);
        if peer == self.config.id || self.state.member_by_raft_id(peer).is_none() {
            return;
        }
        self.heard.insert(peer, now);
        let smoothed = match self.rtt.get(&peer) {
            // An exponentially weighted mean (weight 1/8, as TCP's SRTT).
            Some((srtt, _)) => (7 * srtt + rtt_ms) / 8,
            None => rtt_ms,
        };
        self.rtt.insert(peer, (smoothed, now));
    }

    /// On the leader: a follower's [`Output::ReportRtt`]. Ignored elsewhere, and from nodes
    /// that are not members.
    pub fn handle_rtt_report(&mut self, from: u64, mean_rtt_ms: u64, now: Timestamp) {
        self.clock = self.clock.max(now);
        if !self.is_leader()
            || from == self.config.id
            || self.state.member_by_raft_id(from).is_none()
        {
            return;
        }
        self.rtt_reports.insert(from, (mean_rtt_ms, now));
    }

    /// This node's mean smoothed round-trip time to the members it measured within the
    /// grace period (None: no measurement).
    pub fn mean_rtt_ms(&self) -> Option<u64> {
        let fresh: Vec<u64> =
            self.rtt.values().filter(|(_, at)| self.fresh(*at)).map(|(rtt, _)| *rtt).collect();
        if fresh.is_empty() {
            return None;
        }
        Some(fresh.iter().sum::<u64>() / fresh.len() as u64)
    }

    /// On the leader: the mean round-trip time of each manager it can compare, by Raft id
    /// (its own and the fresh reports of followers); empty elsewhere.
    pub fn rtt_scores(&self) -> BTreeMap<u64, u64> {
        let mut scores = BTreeMap::new();
        if !self.is_leader() {
            return scores;
        }
        for (id, (mean, at)) in &self.rtt_reports {
            if self.fresh(*at) {
                scores.insert(*id, *mean);
            }
        }
        if let Some(mine) = self.mean_rtt_ms() {
            scores.insert(self.config.id, mine);
        }
        scores
    }

    fn fresh(&self, at: Timestamp) -> bool {
        self.clock.0.saturating_sub(at.0) <= self.config.grace_ms
    }

    /// A message from a peer (protobuf bytes). Malformed messages are dropped.
    ///
    /// # Errors
    /// [`FatalError`]: the node must stop.
    pub fn step(&mut self, bytes: &[u8]) -> Result<(), FatalError> {
        self.settle()?;
        let Ok(msg) = Message::parse_from_bytes(bytes) else { return Ok(()) };
        if msg.to != self.config.id {
            return Ok(());
        }
        if self.is_leader() && self.raw.raft.prs().get(msg.from).is_some() {
            self.heard.insert(msg.from, self.clock);
        }
        // Errors here are for messages from unknown or stale peers: drop them.
        let _ = self.raw.step(msg);
        self.after_input();
        self.process()
    }

    /// Proposes an encoded [`crate::command::Proposal`].
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`]: forward it to the leader.
    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), ProposeError> {
        if let Err(e) = self.settle() {
            return Err(ProposeError::Dropped(format!("the node stopped: {e}")));
        }
        if !self.is_leader() {
            return Err(ProposeError::NotLeader(self.leader()));
        }
        self.raw.propose(Vec::new(), data).map_err(|e| ProposeError::Dropped(e.to_string()))?;
        // A fatal error here is kept in `failed()` (the driver checks it) and returned by
        // every later call.
        let _ = self.process();
        Ok(())
    }

    /// Starts a linearizable read; [`Output::ReadReady`] says when it may be served.
    pub fn read_index(&mut self, ctx: Vec<u8>) {
        if self.settle().is_err() {
            return;
        }
        self.raw.read_index(ctx);
        let _ = self.process();
    }

    /// Hands leadership to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        if self.settle().is_err() {
            return;
        }
        self.raw.transfer_leader(to);
        self.after_input();
        let _ = self.process();
    }

    /// Starts an election now (tests; `cluster recover`).
    pub fn campaign(&mut self) {
        if self.settle().is_err() {
            return;
        }
        let _ = self.raw.campaign();
        self.after_input();
        let _ = self.process();
    }

    /// Reports a peer unreachable (the driver's send failed).
    pub fn report_unreachable(&mut self, id: u64) {
        if self.settle().is_err() {
            return;
        }
        self.raw.report_unreachable(id);
    }

    /// The state object a snapshot named has been fetched.
    ///
    /// # Errors
    /// [`FatalError`]: the node must stop.
    pub fn handle_snapshot_state(&mut self, cid: Cid, bytes: &[u8]) -> Result<(), FatalError> {
        self.settle()?;
        let Some((want, index)) = self.awaiting_state else { return Ok(()) };
        if want != cid {
            return Ok(());
        }
        let Ok(state) = ClusterState::decode(bytes) else { return Ok(()) };
        if state.applied_index != index {
            return Ok(());
        }
        self.state = state;
        self.awaiting_state = None;
        self.backend.save_state(index, bytes);
        if let Err(e) = self.backend.sync() {
            let e = FatalError::Sync(e);
            self.failed = Some(e.clone());
            return Err(e);
        }
        let held = std::mem::take(&mut self.held_entries);
        self.apply_entries(held)?;
        self.process()
    }

    /// The entries applied after `since`, as `(index, data)` in order (configuration changes
    /// with empty data), so a member can follow the configuration by deltas and reach exactly
    /// this state with [`ClusterState::apply`]. At most about `max_bytes` (at least one
    /// entry); `None` when the log no longer holds `since + 1` (compacted): send the state.
    pub fn applied_entries_since(&self, since: u64, max_bytes: u64) -> Option<Vec<(u64, Vec<u8>)>> {
        let applied = self.state.applied_index;
        if since >= applied {
            return Some(Vec::new());
        }
        let store = self.raw.store();
        let first = store.first_index().ok()?;
        if since + 1 < first {
            return None;
        }
        let entries = store
            .entries(since + 1, applied + 1, max_bytes, raft::GetEntriesContext::empty(false))
            .ok()?;
        Some(
            entries
                .into_iter()
                .map(|e| match e.get_entry_type() {
                    EntryType::EntryNormal => (e.index, e.data.to_vec()),
                    _ => (e.index, Vec::new()),
                })
                .collect(),
        )
    }

    /// The next output. Once the outputs queued before a pending sync are taken, this runs
    /// the sync and the rest of the Ready loop (a failed sync is then in [`Core::failed`]).
    pub fn poll_output(&mut self) -> Option<Output> {
        if self.outputs.is_empty() && self.unsynced.is_some() {
            let _ = self.process();
        }
        self.outputs.pop_front()
    }

    /// Completes a Ready left unsynced (and the loop after it) before an input is handled.
    fn settle(&mut self) -> Result<(), FatalError> {
        if self.unsynced.is_some() { self.process() } else { self.check_failed() }
    }

    /// Runs the Ready loop, then snapshots and membership decisions, until raft-rs has
    /// nothing more ready.
    fn process(&mut self) -> Result<(), FatalError> {
        self.check_failed()?;
        let result = self.process_inner();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// The fatal error this core stopped on, if any: the driver must stop the node.
    pub fn failed(&self) -> Option<&FatalError> {
        self.failed.as_ref()
    }

    fn check_failed(&self) -> Result<(), FatalError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn process_inner(&mut self) -> Result<(), FatalError> {
        if let Some(ready) = self.unsynced.take() {
            self.finish_ready(ready)?;
        }
        loop {
            self.ready_loop()?;
            if self.unsynced.is_some() {
                return Ok(());
            }
            self.maybe_snapshot()?;
            // The leader's membership decisions may propose a conf change: run the same loop
            // again for it.
            self.reconcile();
            if !self.raw.has_ready() {
                return Ok(());
            }
        }
    }

    /// The one Ready loop, in raft-rs's documented order: messages a leader may send early,
    /// snapshot, committed entries, then new entries and hard state with one sync, then the
    /// messages that depend on them, then the light ready. When there are early messages the
    /// loop stops before the sync (`unsynced`): the driver sends them first.
    fn ready_loop(&mut self) -> Result<(), FatalError> {
        while self.unsynced.is_none() && self.raw.has_ready() {
            let mut ready = self.raw.ready();
            // 1. Messages a leader may send before persisting.
            let early = ready.take_messages();
            let sent_early = !early.is_empty();
            self.send(early);
            // 2. A snapshot from the leader.
            if !ready.snapshot().is_empty() {
                let snap: Snapshot = ready.snapshot().clone();
                self.raw.mut_store().apply_snapshot(&snap);
                self.backend.set_snapshot(snap.get_metadata(), &snap.data);
                let index = snap.get_metadata().index;
                match parse_snapshot_data(&snap.data) {
                    Some(cid) if index > self.state.applied_index => {
                        self.awaiting_state = Some((cid, index));
                        self.outputs.push_back(Output::NeedState(cid));
                    }
                    _ => {}
                }
            }
            // 3. Committed entries, in order.
            self.apply_entries(ready.take_committed_entries())?;
            // 4. New entries and 5. the hard state, then one sync for the batch.
            if !ready.entries().is_empty() {
                self.raw.mut_store().append(ready.entries());
                self.backend.append(ready.entries());
            }
            if let Some(hs) = ready.hs() {
                self.raw.mut_store().set_hard_state(hs.clone());
                self.backend.set_hard_state(hs);
            }
            if sent_early && ready.must_sync() {
                self.unsynced = Some(ready);
                return Ok(());
            }
            self.finish_ready(ready)?;
        }
        Ok(())
    }

    /// The rest of one Ready: the sync, the messages that depend on it, read states, then
    /// the light ready.
    fn finish_ready(&mut self, mut ready: raft::Ready) -> Result<(), FatalError> {
        // Only new entries, a new term or vote, or a snapshot must be durable before the
        // messages that depend on them; a moved commit index alone can wait for the next
        // sync (raft re-learns it after a restart), which halves the syncs per commit.
        if ready.must_sync() {
            self.backend.sync().map_err(FatalError::Sync)?;
        }
        // 6. Messages that depend on what was just persisted.
        self.send(ready.take_persisted_messages());
        for rs in ready.take_read_states() {
            self.outputs.push_back(Output::ReadReady { ctx: rs.request_ctx, index: rs.index });
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
            let hs = self.raw.store().hard_state().clone();
            self.backend.set_hard_state(&hs);
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        for to in std::mem::take(&mut self.snapshot_sent) {
            self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
        }
        self.after_input();
        Ok(())
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                // The snapshot is a CID: once the message is handed over it is "sent";
                // without this report the leader would wait for it forever if it is lost.
                self.snapshot_sent.push(to);
            }
            let msg = m.write_to_bytes().expect("raft messages encode");
            self.outputs.push_back(Output::Send { to, msg });
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), FatalError> {
        if self.awaiting_state.is_some() {
            self.held_entries.extend(entries);
            return Ok(());
        }
        for e in entries {
            if e.index <= self.state.applied_index {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if let Some((from, seq, outcome)) = self.state.apply(e.index, &e.data) {
                        self.outputs.push_back(Output::Applied {
                            index: e.index,
                            from,
                            seq,
                            outcome,
                        });
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    self.state.apply(e.index, &[]);
                    if let Ok(cc) = ConfChangeV2::parse_from_bytes(&e.data)
                        && let Ok(cs) = self.raw.apply_conf_change(&cc)
                    {
                        self.raw.mut_store().set_conf_state(cs.clone());
                        self.backend.set_conf_state(&cs);
                        self.snapshot_now = true;
                        self.applied_since_snapshot += 1;
                        // Compact at once: a member added here must get a snapshot carrying
                        // the whole configuration, never the bare log from index 1.
                        self.maybe_snapshot()?;
                        continue;
                    }
                }
                EntryType::EntryConfChange => {
                    self.state.apply(e.index, &[]);
                    if let Ok(cc) = raft::eraftpb::ConfChange::parse_from_bytes(&e.data)
                        && let Ok(cs) = self.raw.apply_conf_change(&cc)
                    {
                        self.raw.mut_store().set_conf_state(cs.clone());
                        self.backend.set_conf_state(&cs);
                    }
                }
            }
            self.applied_since_snapshot += 1;
        }
        Ok(())
    }

    /// Past the threshold: the state becomes a mycel object, the log is compacted, and the
    /// snapshot names the object's CID (the state itself moves through the exchange).
    fn maybe_snapshot(&mut self) -> Result<(), FatalError> {
        if (self.applied_since_snapshot < self.config.snapshot_entries && !self.snapshot_now)
            || self.awaiting_state.is_some()
        {
            return Ok(());
        }
        self.snapshot_now = false;
        let index = self.state.applied_index;
        if index <= self.raw.store().snapshot_index() {
            return Ok(());
        }
        let term = self.raw.store().term(index).map_err(|e| FatalError::Raft(e.to_string()))?;
        let bytes = self.state.encode();
        let (cid, blocks) = state_object(&bytes);
        self.outputs.push_back(Output::StoreBlocks(blocks));
        let mut meta = raft::eraftpb::SnapshotMetadata { index, term, ..Default::default() };
        meta.set_conf_state(self.raw.store().conf_state().clone());
        let data = snapshot_data(&cid);
        self.backend.save_state(index, &bytes);
        self.backend.set_snapshot(&meta, &data);
        self.backend.sync().map_err(FatalError::Sync)?;
        self.raw.mut_store().compact_to(meta, data);
        self.applied_since_snapshot = 0;
        Ok(())
    }

    /// The leader's membership decisions, one change at a time: committed managers missing
    /// from the configuration join as learners, caught-up learners become voters, and voters
    /// no longer managers leave (not while a reachable manager learner is still catching up,
    /// so a replaced voter leaves only after its replacement votes).
    fn reconcile(&mut self) {
        if !self.is_leader() {
            return;
        }
        if self.raw.raft.has_pending_conf() {
            return;
        }
        let cs = self.raw.store().conf_state().clone();
        let managers: Vec<u64> = self
            .state
            .members
            .values()
            .filter(|m| m.role == Role::Manager)
            .map(|m| m.raft_id)
            .collect();
        let member_ids: Vec<u64> = self.state.members.values().map(|m| m.raft_id).collect();
        // A manager on its way to voting is still catching up: a voter leaving now (a lost one
        // being replaced) would shrink the fault tolerance first, so removals wait until the
        // newcomer votes, or until it has been silent past the grace period.
        let newcomer_catching_up = cs
            .learners
            .iter()
            .any(|id| managers.contains(id) && self.heard.get(id).is_some_and(|t| self.fresh(*t)));
        let change = if let Some(id) =
            managers.iter().find(|id| !cs.voters.contains(id) && !cs.learners.contains(id))
        {
            Some((ConfChangeType::AddLearnerNode, *id))
        } else if let Some(id) = cs.learners.iter().find(|id| {
            managers.contains(id)
                && self.raw.raft.prs().get(**id).is_some_and(|p| {
                    p.recent_active
                        && p.matched > 0
                        && p.matched + 16 >= self.raw.raft.raft_log.committed
                })
        }) {
            Some((ConfChangeType::AddNode, *id))
        } else if newcomer_catching_up {
            None
        } else {
            cs.voters
                .iter()
                .chain(cs.learners.iter())
                .find(|id| {
                    !managers.contains(id)
                        && (member_ids.contains(id) || self.state.cluster_id.is_some())
                        && **id != self.config.id
                })
                .map(|id| (ConfChangeType::RemoveNode, *id))
        };
        let Some((kind, id)) = change else { return };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(kind);
        single.node_id = id;
        let mut cc = ConfChangeV2::default();
        cc.set_changes(vec![single].into());
        let _ = self.raw.propose_conf_change(Vec::new(), cc);
    }

    /// Once per election timeout: forgets what concerns nodes that are gone, then the leader
    /// decides on replacements and leader preference, and a follower voter reports its mean
    /// round-trip time to the leader.
    fn evaluate(&mut self) {
        if self.awaiting_state.is_some() {
            return;
        }
        let cs = self.raw.store().conf_state().clone();
        let members: Vec<u64> = self.state.members.values().map(|m| m.raft_id).collect();
        let keep = |id: &u64| members.contains(id);
        self.heard.retain(|id, _| keep(id) || cs.voters.contains(id) || cs.learners.contains(id));
        self.rtt.retain(|id, _| keep(id));
        self.rtt_reports.retain(|id, _| keep(id));
        if self.is_leader() {
            self.maybe_replace(&cs.voters, &cs.learners);
            self.maybe_move_leadership(&cs.voters);
        } else if cs.voters.contains(&self.config.id)
            && self.leader() != 0
            && let Some(mean_rtt_ms) = self.mean_rtt_ms()
        {
            self.outputs.push_back(Output::ReportRtt { to: self.leader(), mean_rtt_ms });
        }
    }

    fn maybe_replace(&mut self, voters: &[u64], learners: &[u64]) {
        if self.raw.raft.has_pending_conf() {
            return;
        }
        let view = heal::View {
            members: &self.state.members,
            voters,
            learners,
            heard: &self.heard,
            me: self.config.id,
            now: self.clock,
            grace_ms: self.config.grace_ms,
        };
        let Some(r) = heal::replacement(&view) else {
            self.heal_proposed = None;
            return;
        };
        if let Some((prev, at)) = &self.heal_proposed
            && *prev == r
            && self.clock.0 < at.0 + 5 * self.config.election_ms()
        {
            return;
        }
        self.outputs.push_back(Output::Propose(r.commands()));
        self.heal_proposed = Some((r, self.clock));
    }

    fn maybe_move_leadership(&mut self, voters: &[u64]) {
        let gap_ms = self.config.leader_transfer_gap_elections * self.config.election_ms();
        let since = self.led_since.max(self.last_transfer).unwrap_or(self.clock);
        if self.clock.0 < since.0 + gap_ms
            || self.raw.raft.has_pending_conf()
            || self.raw.raft.lead_transferee.is_some()
        {
            self.streak = None;
            return;
        }
        // Candidates: manager voters heard within the grace period whose progress is recent.
        let mut scores = self.rtt_scores();
        scores.retain(|id, _| {
            *id == self.config.id
                || (voters.contains(id)
                    && self.state.member_by_raft_id(*id).is_some_and(|m| m.role == Role::Manager)
                    && self.heard.get(id).is_some_and(|t| self.fresh(*t))
                    && self.raw.raft.prs().get(*id).is_some_and(|p| p.recent_active))
        });
        let margin = heal::Margin {
            better_pct: self.config.leader_rtt_better_pct,
            better_ms: self.config.leader_rtt_better_ms,
        };
        let Some(best) = heal::preferred_leader(self.config.id, &scores, margin) else {
            self.streak = None;
            return;
        };
        let count = match self.streak {
            Some((id, n)) if id == best => n + 1,
            _ => 1,
        };
        if count < self.config.leader_rtt_evaluations {
            self.streak = Some((best, count));
            return;
        }
        self.streak = None;
        self.last_transfer = Some(self.clock);
        self.transfer_leader(best);
    }

    /// Checks the core's invariants.
    ///
    /// # Panics
    /// On a broken invariant: a bug.
    pub fn check_invariants(&self) {
        self.state.check_invariants();
        assert!(
            self.state.applied_index <= self.commit_index() || self.awaiting_state.is_some(),
            "applied {} past commit {}",
            self.state.applied_index,
            self.commit_index()
        );
        if let Some((_, n)) = self.streak {
            assert!(n < self.config.leader_rtt_evaluations.max(1), "streak {n} not acted on");
            assert!(self.is_leader(), "a streak on a node that does not lead");
        }
        assert!(self.led_since.is_some() == self.is_leader(), "led_since tracks leadership");
    }
}

/// A state image as blocks of a mycel object (CID, bytes), root block last.
pub type StateBlocks = Vec<(Cid, Vec<u8>)>;

/// `cluster recover --force-new-cluster`: after losing a majority of managers for good,
/// rewrites this (stopped) manager's log so it is the only voter. The state is the last one
/// it knows committed (`load_object` reads a snapshot's state object from the store); the
/// returned blocks are that state as an object, to store so others can fetch it. Changes
/// the lost majority committed that this node never learned are gone: that is the price of
/// forcing.
///
/// # Errors
/// A message if the log or the state cannot be read.
pub fn force_new_cluster<B: LogBackend>(
    backend: &mut B,
    my_id: u64,
    load_object: &dyn Fn(&Cid) -> Option<Vec<u8>>,
) -> Result<(ClusterState, StateBlocks), String> {
    let p = backend.load()?;
    let snapshot_index = p.snapshot.as_ref().map_or(0, |(m, _)| m.index);
    let mut state = match &p.state {
        Some((index, bytes)) if *index >= snapshot_index => ClusterState::decode(bytes)?,
        _ => match &p.snapshot {
            Some((_, data)) => {
                let cid = parse_snapshot_data(data).ok_or("the snapshot names no state object")?;
                let bytes = load_object(&cid).ok_or_else(|| {
                    format!("the snapshot's state object {cid} is not in the store")
                })?;
                ClusterState::decode(&bytes)?
            }
            None => ClusterState::default(),
        },
    };
    let commit = p.hard_state.commit;
    let from = state.applied_index;
    for e in p.entries.iter().filter(|e| e.index > from && e.index <= commit) {
        match e.get_entry_type() {
            EntryType::EntryNormal => {
                state.apply(e.index, &e.data);
            }
            _ => {
                state.apply(e.index, &[]);
            }
        }
    }
    let index = state.applied_index;
    let term = p
        .entries
        .iter()
        .find(|e| e.index == index)
        .map(|e| e.term)
        .or_else(|| p.snapshot.as_ref().filter(|(m, _)| m.index == index).map(|(m, _)| m.term))
        .unwrap_or(p.hard_state.term);
    let bytes = state.encode();
    let (cid, blocks) = state_object(&bytes);
    let conf = raft::eraftpb::ConfState { voters: vec![my_id], ..Default::default() };
    let mut meta = raft::eraftpb::SnapshotMetadata { index, term, ..Default::default() };
    meta.set_conf_state(conf.clone());
    let mut hs = p.hard_state.clone();
    hs.commit = index;
    hs.vote = 0;
    backend.set_snapshot(&meta, &snapshot_data(&cid));
    backend.save_state(index, &bytes);
    backend.set_conf_state(&conf);
    backend.set_hard_state(&hs);
    backend.sync()?;
    Ok((state, blocks))
}
