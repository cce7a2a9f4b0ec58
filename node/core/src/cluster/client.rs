//! The cluster client: how any node's proposals reach the quorum, and how a manager answers
//! the proposals others send it.
//!
//! A proposal is `(PeerId, seq, commands)`. The node proposes to its own consensus core when
//! it leads; otherwise it forwards the proposal to the leader it knows, else to a connected
//! manager (rotating, so a dead one that has not timed out yet does not swallow them all),
//! else to a connected bootstrap peer. A manager that does not lead answers `NotLeader`
//! naming the leader, and the proposal goes there at once; anything unanswered is sent again
//! after [`Config::retry_ms`] (the state machine deduplicates by `(PeerId, seq)`, so a
//! retry never applies twice). The answer (`Proposed`) comes once the proposal is applied or
//! rejected, and is accepted only from the peer the proposal was last sent to.
//!
//! On a manager, a proposal from a peer is accepted only if the peer is a member (or it is a
//! lone `Join`) and the proposal names the peer itself as its author; the manager's core
//! takes it if it leads, and the proposer is answered when it applies.

use std::collections::{BTreeMap, VecDeque};

use mycel_base::{PeerId, Timestamp};
use mycel_consensus::command::{Command, Proposal};
use mycel_consensus::log::LogBackend;
use mycel_consensus::state::{ClusterState, Outcome};
use mycel_consensus::{Core, ProposeError};

use super::wire::ClusterFrame;

/// Timings and bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// An unanswered proposal is sent again after this long.
    pub retry_ms: u64,
    /// Proposals of this node in flight at most (more are refused at once).
    pub pending_max: usize,
    /// Other nodes' proposals awaiting their apply on this leader at most.
    pub remote_max: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config { retry_ms: 1_500, pending_max: 4_096, remote_max: 65_536 }
    }
}

/// Why a proposal of this node failed before reaching the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProposalError {
    /// This node's consensus core refused it (a leader transfer in progress, say).
    #[error("{0}")]
    Refused(String),
    /// Too many proposals of this node are in flight.
    #[error("too many proposals in flight ({0})")]
    Busy(usize),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send `frame` to `to` on the cluster protocol.
    Send {
        /// The peer.
        to: PeerId,
        /// The frame.
        frame: ClusterFrame,
    },
    /// A proposal of this node is settled: applied or rejected at a log index, or failed.
    Resolved {
        /// Its sequence number, as [`Client::propose`] returned it.
        seq: u64,
        /// The log index and outcome, or why it never reached the log.
        result: Result<(u64, Outcome), ProposalError>,
    },
}

/// Whom proposals can go to, as the driver sees its connections now.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    /// The leader, when known and not this node.
    pub leader: Option<PeerId>,
    /// Connected managers (other than this node).
    pub managers: Vec<PeerId>,
    /// Connected bootstrap peers (a joining node knows no manager yet).
    pub bootstrap: Vec<PeerId>,
}

impl Targets {
    /// Whom to ask: the leader if known, else a connected manager (the next one each time:
    /// `rotate` is the caller's counter), else a connected bootstrap peer; never `me`.
    pub fn pick(&self, me: &PeerId, rotate: &mut usize) -> Option<PeerId> {
        if let Some(l) = self.leader.filter(|l| l != me) {
            return Some(l);
        }
        let managers: Vec<&PeerId> = self.managers.iter().filter(|p| *p != me).collect();
        if !managers.is_empty() {
            *rotate = rotate.wrapping_add(1);
            return Some(*managers[*rotate % managers.len()]);
        }
        self.bootstrap.iter().find(|p| *p != me).copied()
    }

    /// The leader's PeerId in `state` for the Raft id `leader` (0: unknown), unless it is
    /// `me`.
    pub fn leader_in(state: &ClusterState, leader: u64, me: &PeerId) -> Option<PeerId> {
        let m = state.member_by_raft_id(leader)?;
        PeerId::from_bytes(&m.peer).filter(|p| p != me)
    }
}

#[derive(Clone, Debug)]
struct Pending {
    bytes: Vec<u8>,
    /// The request id of its last forward, and to whom.
    sent: Option<(u64, PeerId)>,
    retry_at: Timestamp,
}

/// The cluster client of one node.
#[derive(Debug)]
pub struct Client {
    me: PeerId,
    config: Config,
    last_seq: u64,
    next_req: u64,
    rotate: usize,
    /// This node's unsettled proposals by sequence.
    pending: BTreeMap<u64, Pending>,
    /// Forwarded request id -> sequence.
    reqs: BTreeMap<u64, u64>,
    /// Others' proposals this node's core took: (author, seq) -> (peer, req) to answer.
    remote: BTreeMap<(Vec<u8>, u64), (PeerId, u64)>,
    out: VecDeque<Output>,
}

impl Client {
    /// A client whose sequence numbers start above `seq_floor` (the daemon passes its start
    /// time in ms times 1,024, so a restarted node never reuses a sequence number).
    pub fn new(me: PeerId, config: Config, seq_floor: u64) -> Client {
        assert!(config.retry_ms > 0, "retry_ms must be positive");
        Client {
            me,
            config,
            last_seq: seq_floor,
            next_req: 1,
            rotate: 0,
            pending: BTreeMap::new(),
            reqs: BTreeMap::new(),
            remote: BTreeMap::new(),
            out: VecDeque::new(),
        }
    }

    /// Proposes `commands`: to `core` if this node leads, else forwarded. Returns the
    /// proposal's sequence number; the outcome comes as [`Output::Resolved`].
    pub fn propose<B: LogBackend>(
        &mut self,
        commands: Vec<Command>,
        core: Option<&mut Core<B>>,
        targets: &Targets,
        now: Timestamp,
    ) -> u64 {
        self.last_seq += 1;
        let seq = self.last_seq;
        if self.pending.len() >= self.config.pending_max {
            let result = Err(ProposalError::Busy(self.pending.len()));
            self.out.push_back(Output::Resolved { seq, result });
            return seq;
        }
        let bytes = Proposal { from: self.me.as_bytes().to_vec(), seq, commands }.encode();
        self.pending.insert(seq, Pending { bytes, sent: None, retry_at: now });
        self.send(seq, core, targets, now);
        seq
    }

    /// The last sequence number handed out (a restarted node's client starts above it).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Proposals still unsettled.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Tries `seq` again: locally if this node leads, else to the best target.
    fn send<B: LogBackend>(
        &mut self,
        seq: u64,
        core: Option<&mut Core<B>>,
        targets: &Targets,
        now: Timestamp,
    ) {
        let Some(p) = self.pending.get_mut(&seq) else { return };
        p.retry_at = now.plus_ms(self.config.retry_ms);
        if let Some((req, _)) = p.sent.take() {
            self.reqs.remove(&req);
        }
        if let Some(core) = core {
            match core.propose(p.bytes.clone()) {
                // Answered when it applies (Output::Applied through `handle_applied`).
                Ok(()) => return,
                Err(ProposeError::NotLeader(_)) => {}
                // raft-rs dropped it (a leader transfer under way): the retry tries again.
                Err(ProposeError::Dropped(_)) => return,
                Err(e) => {
                    self.pending.remove(&seq);
                    let result = Err(ProposalError::Refused(e.to_string()));
                    self.out.push_back(Output::Resolved { seq, result });
                    return;
                }
            }
        }
        let Some(to) = targets.pick(&self.me, &mut self.rotate) else { return };
        let req = self.next_req;
        self.next_req += 1;
        let p = self.pending.get_mut(&seq).expect("present above");
        p.sent = Some((req, to));
        self.reqs.insert(req, seq);
        let frame = ClusterFrame::Propose { req, proposal: p.bytes.clone() };
        self.out.push_back(Output::Send { to, frame });
    }

    /// When [`Client::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.pending.values().map(|p| p.retry_at).min()
    }

    /// Sends again what is due.
    pub fn handle_timeout<B: LogBackend>(
        &mut self,
        mut core: Option<&mut Core<B>>,
        targets: &Targets,
        now: Timestamp,
    ) {
        let due: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.retry_at <= now).map(|(s, _)| *s).collect();
        for seq in due {
            self.send(seq, core.as_deref_mut(), targets, now);
        }
    }

    /// This node's consensus core applied (or rejected) the proposal `(from, seq)` at
    /// `index`: settle it if it is ours, answer its proposer if it is another node's.
    pub fn handle_applied(&mut self, index: u64, from: &[u8], seq: u64, outcome: &Outcome) {
        if from == self.me.as_bytes() && self.pending.remove(&seq).is_some() {
            self.reqs.retain(|_, s| *s != seq);
            self.out.push_back(Output::Resolved { seq, result: Ok((index, outcome.clone())) });
        }
        if let Some((to, req)) = self.remote.remove(&(from.to_vec(), seq)) {
            let (applied, reason) = match outcome {
                Outcome::Applied => (true, String::new()),
                Outcome::Rejected(r) => (false, r.clone()),
            };
            let frame = ClusterFrame::Proposed { req, index, applied, reason };
            self.out.push_back(Output::Send { to, frame });
        }
    }

    /// A `Proposed` answer from `from`: settles the proposal it answers if `from` is the
    /// peer that proposal was last sent to.
    pub fn handle_proposed(
        &mut self,
        from: PeerId,
        req: u64,
        index: u64,
        applied: bool,
        reason: String,
    ) {
        let Some(seq) = self.answered(from, req) else { return };
        self.pending.remove(&seq);
        let outcome = if applied { Outcome::Applied } else { Outcome::Rejected(reason) };
        self.out.push_back(Output::Resolved { seq, result: Ok((index, outcome)) });
    }

    /// A `NotLeader` answer from `from` naming `leader`: the proposal goes there now.
    pub fn handle_not_leader(&mut self, from: PeerId, req: u64, leader: &[u8]) {
        let Some(seq) = self.answered(from, req) else { return };
        #[cfg(feature = "sim-bugs")]
        if crate::bugs::on(crate::bugs::ACK_BEFORE_APPLY) {
            self.pending.remove(&seq);
            self.out.push_back(Output::Resolved { seq, result: Ok((0, Outcome::Applied)) });
            return;
        }
        let leader = PeerId::from_bytes(leader).filter(|l| *l != from && *l != self.me);
        let Some(to) = leader else {
            // No leader known there: the retry timer tries again.
            return;
        };
        let p = self.pending.get_mut(&seq).expect("answered checks it");
        p.sent = Some((req, to));
        self.reqs.insert(req, seq);
        let frame = ClusterFrame::Propose { req, proposal: p.bytes.clone() };
        self.out.push_back(Output::Send { to, frame });
    }

    /// The sequence `req` belongs to, if it was last sent to `from` (answers from anyone
    /// else are ignored); forgets the request.
    fn answered(&mut self, from: PeerId, req: u64) -> Option<u64> {
        let seq = *self.reqs.get(&req)?;
        let p = self.pending.get(&seq)?;
        if p.sent.map(|(_, to)| to) != Some(from) {
            return None;
        }
        self.reqs.remove(&req);
        self.pending.get_mut(&seq).expect("present").sent = None;
        Some(seq)
    }

    /// A `Propose` from `peer` (`member`: whether it is a member here): refused, taken by
    /// this node's core if it leads (the answer follows the apply), or answered `NotLeader`.
    pub fn handle_propose<B: LogBackend>(
        &mut self,
        peer: PeerId,
        member: bool,
        req: u64,
        proposal: Vec<u8>,
        core: Option<&mut Core<B>>,
    ) {
        let refuse = |reason: &str| ClusterFrame::Proposed {
            req,
            index: 0,
            applied: false,
            reason: reason.into(),
        };
        let Ok(p) = Proposal::decode(&proposal) else {
            self.out.push_back(Output::Send { to: peer, frame: refuse("malformed proposal") });
            return;
        };
        let join_only = p.commands.len() == 1 && matches!(p.commands[0], Command::Join { .. });
        let refusal = if !member && !join_only {
            Some("not a member")
        } else if p.from != peer.as_bytes() {
            Some("proposal signed for another node")
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.out.push_back(Output::Send { to: peer, frame: refuse(reason) });
            return;
        }
        let leader: Vec<u8> = match core {
            Some(core) => match core.propose(proposal) {
                Ok(()) => {
                    if self.remote.len() >= self.config.remote_max {
                        // The proposal is in the log; only the answer is lost (the
                        // proposer's retry is answered by the deduplicated apply).
                        let oldest = self.remote.keys().next().cloned().expect("non-empty");
                        self.remote.remove(&oldest);
                    }
                    self.remote.insert((p.from, p.seq), (peer, req));
                    return;
                }
                Err(_) => core
                    .state()
                    .member_by_raft_id(core.leader())
                    .map(|m| m.peer.clone())
                    .unwrap_or_default(),
            },
            None => Vec::new(),
        };
        self.out
            .push_back(Output::Send { to: peer, frame: ClusterFrame::NotLeader { req, leader } });
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Checks the invariants (tests and the simulator call it).
    pub fn check_invariants(&self) {
        assert!(self.pending.len() <= self.config.pending_max, "pending {}", self.pending.len());
        assert!(self.remote.len() <= self.config.remote_max, "remote {}", self.remote.len());
        for (req, seq) in &self.reqs {
            let p = self.pending.get(seq).expect("a request belongs to a pending proposal");
            assert_eq!(p.sent.map(|(r, _)| r), Some(*req), "req={req} seq={seq}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycel_consensus::log::MemBackend;
    use mycel_consensus::{Config as CoreConfig, Output as COutput};

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[0, 36, 8, 1, 18, 32, n]).expect("short")
    }

    const NO_CORE: Option<&mut Core<MemBackend>> = None;

    fn drain(c: &mut Client) -> Vec<Output> {
        std::iter::from_fn(|| c.poll_output()).collect()
    }

    fn sent(out: &[Output]) -> Vec<(PeerId, ClusterFrame)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send { to, frame } => Some((*to, frame.clone())),
                Output::Resolved { .. } => None,
            })
            .collect()
    }

    fn req_of(f: &ClusterFrame) -> u64 {
        match f {
            ClusterFrame::Propose { req, .. } => *req,
            other => panic!("not a proposal: {other:?}"),
        }
    }

    /// A non-manager forwards to the leader; a `NotLeader` answer redirects at once; the
    /// `Proposed` answer settles it, but only from the peer it was last sent to.
    #[test]
    fn forwards_redirects_and_accepts_answers_only_from_the_asked_peer() {
        let (me, m1, m2, liar) = (peer(1), peer(2), peer(3), peer(9));
        let mut c = Client::new(me, Config::default(), 100);
        let targets = Targets { leader: None, managers: vec![m1], bootstrap: vec![] };
        let seq = c.propose(vec![], NO_CORE, &targets, Timestamp(0));
        assert_eq!(seq, 101);
        let out = sent(&drain(&mut c));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, m1);
        let req = req_of(&out[0].1);
        // A stranger cannot redirect or settle it.
        c.handle_not_leader(liar, req, m2.as_bytes());
        c.handle_proposed(liar, req, 5, true, String::new());
        assert!(drain(&mut c).is_empty());
        c.handle_not_leader(m1, req, m2.as_bytes());
        let out = sent(&drain(&mut c));
        assert_eq!(out[0].0, m2, "redirected to the named leader");
        // The old target's late answer no longer counts.
        c.handle_proposed(m1, req, 5, true, String::new());
        assert!(drain(&mut c).is_empty());
        c.handle_proposed(m2, req_of(&out[0].1), 7, true, String::new());
        assert_eq!(
            drain(&mut c),
            vec![Output::Resolved { seq, result: Ok((7, Outcome::Applied)) }]
        );
        assert_eq!(c.pending(), 0);
        c.check_invariants();
    }

    /// Unanswered proposals are sent again after the retry delay, to the next manager; with
    /// nobody to send to they wait for the next retry.
    #[test]
    fn retries_rotate_over_managers() {
        let (me, m1, m2) = (peer(1), peer(2), peer(3));
        let mut c = Client::new(me, Config { retry_ms: 100, ..Config::default() }, 0);
        let none = Targets::default();
        let seq = c.propose(vec![], NO_CORE, &none, Timestamp(0));
        assert!(drain(&mut c).is_empty(), "no target yet");
        assert_eq!(c.poll_timeout(), Some(Timestamp(100)));
        let targets = Targets { leader: None, managers: vec![m1, m2], bootstrap: vec![] };
        c.handle_timeout(NO_CORE, &targets, Timestamp(100));
        let first = sent(&drain(&mut c))[0].0;
        c.handle_timeout(NO_CORE, &targets, Timestamp(150));
        assert!(drain(&mut c).is_empty(), "not due yet");
        c.handle_timeout(NO_CORE, &targets, Timestamp(200));
        let second = sent(&drain(&mut c))[0].0;
        assert_ne!(first, second, "a silent manager is not asked twice in a row");
        assert_eq!(c.pending(), 1);
        let _ = seq;
        c.check_invariants();
    }

    /// A manager refuses proposals from non-members and proposals signed for another node,
    /// answers `NotLeader` when it does not lead, and, leading, answers once it applies.
    #[test]
    fn a_manager_checks_the_author_and_answers_after_the_apply() {
        let (me, edge, other) = (peer(1), peer(2), peer(3));
        let mut c = Client::new(me, Config::default(), 0);
        let mine = Proposal { from: edge.as_bytes().to_vec(), seq: 4, commands: vec![] }.encode();
        let forged =
            Proposal { from: other.as_bytes().to_vec(), seq: 4, commands: vec![] }.encode();
        c.handle_propose(edge, false, 1, mine.clone(), NO_CORE);
        c.handle_propose(edge, true, 2, forged, NO_CORE);
        c.handle_propose(edge, true, 3, b"junk".to_vec(), NO_CORE);
        c.handle_propose(edge, true, 4, mine.clone(), NO_CORE);
        let out = sent(&drain(&mut c));
        let kinds: Vec<String> = out
            .iter()
            .map(|(_, f)| match f {
                ClusterFrame::Proposed { reason, .. } => reason.clone(),
                ClusterFrame::NotLeader { .. } => "not leader".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "not a member",
                "proposal signed for another node",
                "malformed proposal",
                "not leader"
            ]
        );
        // A leading core: the proposal enters the log and the answer follows the apply.
        let config = CoreConfig { id: 1, tick_ms: 10, ..CoreConfig::default() };
        let mut core = Core::new(config, MemBackend::new(), vec![1], Timestamp(0)).unwrap();
        let mut now = Timestamp(0);
        while !core.is_leader() {
            now = now.plus_ms(10);
            core.handle_timeout(now).unwrap();
            while core.poll_output().is_some() {}
        }
        c.handle_propose(edge, true, 5, mine, Some(&mut core));
        assert!(drain(&mut c).is_empty(), "answered after the apply");
        let mut applied = None;
        for _ in 0..100 {
            now = now.plus_ms(10);
            core.handle_timeout(now).unwrap();
            while let Some(o) = core.poll_output() {
                if let COutput::Applied { index, from, seq, outcome } = o {
                    applied = Some((index, from, seq, outcome));
                }
            }
            if applied.is_some() {
                break;
            }
        }
        let (index, from, seq, outcome) = applied.expect("the proposal applies");
        c.handle_applied(index, &from, seq, &outcome);
        let out = sent(&drain(&mut c));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, edge);
        assert!(matches!(out[0].1, ClusterFrame::Proposed { req: 5, .. }), "{:?}", out[0].1);
        c.check_invariants();
    }
}
