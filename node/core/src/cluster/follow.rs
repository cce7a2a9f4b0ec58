//! Following the configuration: how members that are not managers keep the committed
//! cluster state, and how a manager answers them.
//!
//! A follower asks every connected manager (or, knowing none yet, its bootstrap peers)
//! `Follow { since }` each [`Config::period_ms`]. A manager answers with the log entries
//! applied after `since` when its log still holds them (`Entries`, at most
//! [`Config::entries_bytes_max`] of them; the follower asks again for the rest), else with
//! the whole state (`State`). The follower applies entries in order to its own copy, exactly
//! as the managers applied them, so it reaches their state by deltas.
//!
//! What a follower accepts: answers only from a peer it asked within
//! [`Config::answer_window_ms`], and once it knows the managers only from a manager; entries
//! only if they continue its applied index without a gap; a whole state only if it is newer
//! than its own. Anything else is refused with a [`FollowError`] and changes nothing.

use std::collections::BTreeMap;

use mycel_base::{PeerId, Timestamp};
use mycel_consensus::Core;
use mycel_consensus::command::Role;
use mycel_consensus::log::LogBackend;
use mycel_consensus::state::ClusterState;

use super::wire::ClusterFrame;

/// Timings and bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// How often the follower asks.
    pub period_ms: u64,
    /// How long after asking a peer its answers are accepted.
    pub answer_window_ms: u64,
    /// Most bytes of entries in one answer.
    pub entries_bytes_max: u64,
    /// Targets asked per round, the next ones each round (the daemon asks every connected
    /// manager, so a dead one whose connection has not timed out cannot stall it).
    pub fanout: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            period_ms: 500,
            answer_window_ms: 5_000,
            entries_bytes_max: 8 << 20,
            fanout: usize::MAX,
        }
    }
}

/// Why an answer was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// Nobody asked this peer (recently), or it is not a manager.
    #[error("configuration from a peer that was not asked or is not a manager")]
    NotAsked,
    /// Entries that do not continue the applied index.
    #[error("entries from index {got} do not continue applied index {applied}")]
    Gap {
        /// This follower's applied index.
        applied: u64,
        /// The first index offered.
        got: u64,
    },
    /// Entries out of order.
    #[error("entries out of order")]
    OutOfOrder,
    /// A state that does not decode.
    #[error("malformed state: {0}")]
    Malformed(String),
}

/// A follower of the committed configuration.
#[derive(Debug)]
pub struct Follower {
    config: Config,
    state: ClusterState,
    /// Peers asked, with when.
    asked: BTreeMap<PeerId, Timestamp>,
    next_at: Timestamp,
    /// Where the next round's targets start.
    rotate: usize,
}

impl Follower {
    /// A follower starting from `state` (what it saved last time, or the default).
    pub fn new(state: ClusterState, config: Config) -> Follower {
        assert!(config.period_ms > 0, "period_ms must be positive");
        assert!(config.fanout > 0, "fanout must be positive");
        Follower { config, state, asked: BTreeMap::new(), next_at: Timestamp(0), rotate: 0 }
    }

    /// The configuration as followed.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// When [`Follower::poll_requests`] next has something to send.
    pub fn poll_timeout(&self) -> Timestamp {
        self.next_at
    }

    /// The follow requests due at `now`, to [`Config::fanout`] of `targets` (the connected
    /// managers, or the bootstrap peers while no manager is known), the next ones each round.
    pub fn poll_requests(
        &mut self,
        now: Timestamp,
        targets: &[PeerId],
    ) -> Vec<(PeerId, ClusterFrame)> {
        if now < self.next_at {
            return Vec::new();
        }
        self.next_at = now.plus_ms(self.config.period_ms);
        let window = self.config.answer_window_ms;
        self.asked.retain(|_, at| now.since(*at) <= window);
        let since = self.state.applied_index;
        let n = targets.len();
        let take = self.config.fanout.min(n);
        let start = if n == 0 { 0 } else { self.rotate % n };
        self.rotate = self.rotate.wrapping_add(take);
        (0..take)
            .map(|k| {
                let p = targets[(start + k) % n];
                self.asked.insert(p, now);
                (p, ClusterFrame::Follow { since })
            })
            .collect()
    }

    /// Whether an answer from `from` may be taken.
    fn check_sender(&self, from: &PeerId) -> Result<(), FollowError> {
        if !self.asked.contains_key(from) {
            return Err(FollowError::NotAsked);
        }
        let knows_managers = self.state.members.values().any(|m| m.role == Role::Manager);
        let is_manager =
            self.state.members.get(from.as_bytes()).is_some_and(|m| m.role == Role::Manager);
        if knows_managers && !is_manager {
            return Err(FollowError::NotAsked);
        }
        Ok(())
    }

    /// `Entries` from `from`: applied in order. `Ok(true)` if the state changed.
    ///
    /// # Errors
    /// [`FollowError`]; the state is unchanged then.
    pub fn handle_entries(
        &mut self,
        from: &PeerId,
        entries: &[(u64, Vec<u8>)],
    ) -> Result<bool, FollowError> {
        self.check_sender(from)?;
        let Some(first) = entries.first() else { return Ok(false) };
        let applied = self.state.applied_index;
        if first.0 <= applied {
            // Already applied (an answer to an older request): skip what we have.
            let fresh: Vec<(u64, Vec<u8>)> =
                entries.iter().filter(|e| e.0 > applied).cloned().collect();
            if fresh.is_empty() {
                return Ok(false);
            }
            return self.handle_entries(from, &fresh);
        }
        if first.0 != applied + 1 {
            return Err(FollowError::Gap { applied, got: first.0 });
        }
        if entries.windows(2).any(|w| w[1].0 != w[0].0 + 1) {
            return Err(FollowError::OutOfOrder);
        }
        for (k, (index, data)) in entries.iter().enumerate() {
            #[cfg(feature = "sim-bugs")]
            if k == 1 && crate::bugs::on(crate::bugs::FOLLOW_SKIPS_ENTRY) {
                // Planted: the second entry of an answer counts as applied, unapplied.
                self.state.apply(*index, &[]);
                continue;
            }
            let _ = k;
            self.state.apply(*index, data);
        }
        Ok(true)
    }

    /// `State` from `from`: taken whole if newer. `Ok(true)` if the state changed.
    ///
    /// # Errors
    /// [`FollowError`]; the state is unchanged then.
    pub fn handle_state(
        &mut self,
        from: &PeerId,
        applied: u64,
        bytes: &[u8],
    ) -> Result<bool, FollowError> {
        self.check_sender(from)?;
        if bytes.is_empty() || applied <= self.state.applied_index {
            return Ok(false);
        }
        let s = ClusterState::decode(bytes).map_err(|e| FollowError::Malformed(e.to_string()))?;
        if s.applied_index <= self.state.applied_index {
            return Ok(false);
        }
        self.state = s;
        Ok(true)
    }
}

/// A manager's (or any holder's) answer to `Follow { since }`: the entries applied after
/// `since` from `core`'s log when it holds them, else the whole of `state` when it is newer,
/// else an empty `State` (nothing newer).
pub fn answer<B: LogBackend>(
    core: Option<&Core<B>>,
    state: &ClusterState,
    since: u64,
    config: &Config,
) -> ClusterFrame {
    let deltas = core
        .filter(|_| since > 0)
        .and_then(|c| c.applied_entries_since(since, config.entries_bytes_max))
        .filter(|e| !e.is_empty());
    if let Some(entries) = deltas {
        ClusterFrame::Entries { entries }
    } else if state.applied_index > since && state.cluster_id.is_some() {
        ClusterFrame::State { applied: state.applied_index, state: state.encode() }
    } else {
        ClusterFrame::State { applied: state.applied_index, state: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mycel_consensus::command::{Command, Member, Proposal};

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[0, 36, 8, 1, 18, 32, n]).expect("short")
    }

    fn member(p: PeerId, role: Role) -> Member {
        Member {
            peer: p.as_bytes().to_vec(),
            raft_id: 0,
            role,
            zone: "z".into(),
            tags: vec![],
            capacity_bytes: 0,
            addrs: vec![],
        }
    }

    fn entry(seq: u64, commands: Vec<Command>) -> Vec<u8> {
        Proposal { from: peer(1).as_bytes().to_vec(), seq, commands }.encode()
    }

    /// The log a manager applied: init with a manager and an edge, then one more edge.
    fn log() -> Vec<(u64, Vec<u8>)> {
        let (m, e1, e2) = (peer(1), peer(2), peer(3));
        vec![
            (1, Vec::new()),
            (
                2,
                entry(
                    1,
                    vec![
                        Command::InitCluster { cluster_id: [7; 16] },
                        Command::AddMember(member(m, Role::Manager)),
                        Command::AddMember(member(e1, Role::Edge)),
                    ],
                ),
            ),
            (3, entry(2, vec![Command::AddMember(member(e2, Role::Edge))])),
        ]
    }

    fn managers_state(upto: usize) -> ClusterState {
        let mut s = ClusterState::default();
        for (i, d) in log().iter().take(upto) {
            s.apply(*i, d);
        }
        s
    }

    /// Deltas in order reach the manager's state; a gap, disorder, an unasked peer and,
    /// once managers are known, a non-manager are refused, changing nothing.
    #[test]
    fn follows_by_deltas_and_refuses_what_does_not_fit() {
        let (m, e1) = (peer(1), peer(2));
        let mut f = Follower::new(ClusterState::default(), Config::default());
        let log = log();
        assert_eq!(f.handle_entries(&m, &log[..1]), Err(FollowError::NotAsked));
        let reqs = f.poll_requests(Timestamp(0), &[m, e1]);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].1, ClusterFrame::Follow { since: 0 });
        assert!(f.poll_requests(Timestamp(100), &[m]).is_empty(), "not due yet");
        assert_eq!(f.handle_entries(&m, &log[1..2]), Err(FollowError::Gap { applied: 0, got: 2 }));
        let disorder = vec![log[0].clone(), log[2].clone()];
        assert_eq!(f.handle_entries(&m, &disorder), Err(FollowError::OutOfOrder));
        assert_eq!(f.state().applied_index, 0);
        assert_eq!(f.handle_entries(&m, &log[..2]), Ok(true));
        assert_eq!(f.state(), &managers_state(2));
        // Managers are known now: the edge that was asked may no longer answer.
        assert_eq!(f.handle_entries(&e1, &log[2..]), Err(FollowError::NotAsked));
        // An answer overlapping what is applied takes only the new part.
        assert_eq!(f.handle_entries(&m, &log), Ok(true));
        assert_eq!(f.state(), &managers_state(3));
        assert_eq!(f.handle_entries(&m, &log), Ok(false));
    }

    /// With a fanout of one, each round asks the next target.
    #[test]
    fn rounds_rotate_over_targets() {
        let (a, b) = (peer(1), peer(2));
        let config = Config { period_ms: 100, fanout: 1, ..Config::default() };
        let mut f = Follower::new(ClusterState::default(), config);
        let first = f.poll_requests(Timestamp(0), &[a, b]);
        let second = f.poll_requests(Timestamp(100), &[a, b]);
        assert_eq!((first.len(), second.len()), (1, 1));
        assert_ne!(first[0].0, second[0].0);
        assert!(f.poll_requests(Timestamp(200), &[]).is_empty());
    }

    /// A whole state is taken only when newer and well-formed; the manager's answer is
    /// deltas when it has the log, else the whole state, else nothing.
    #[test]
    fn whole_states_and_answers() {
        let m = peer(1);
        let mut f = Follower::new(ClusterState::default(), Config::default());
        f.poll_requests(Timestamp(0), &[m]);
        let full = managers_state(3);
        assert!(matches!(f.handle_state(&m, 3, b"junk"), Err(FollowError::Malformed(_))));
        assert_eq!(f.handle_state(&m, 3, &full.encode()), Ok(true));
        assert_eq!(f.handle_state(&m, 3, &full.encode()), Ok(false), "not newer");
        let none: Option<&Core<mycel_consensus::log::MemBackend>> = None;
        let config = Config::default();
        assert_eq!(
            answer(none, &full, 1, &config),
            ClusterFrame::State { applied: 3, state: full.encode() }
        );
        assert_eq!(
            answer(none, &full, 3, &config),
            ClusterFrame::State { applied: 3, state: vec![] }
        );
        // After the answer window, answers from the peer are no longer taken.
        f.poll_requests(Timestamp(10_000), &[]);
        assert_eq!(f.handle_state(&m, 9, &full.encode()), Err(FollowError::NotAsked));
    }
}
