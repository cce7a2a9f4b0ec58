//! Self-healing and leader-preference decisions, as pure functions of what the leader knows.
//!
//! The core ([`crate::core::Core`]) gathers the inputs (the committed members, the Raft
//! configuration, when each node was last heard from, measured round-trip times) and acts on
//! the answers; nothing here reads a clock or keeps state.
//!
//! - [`replacement`]: a manager voter not heard from for longer than the grace period is
//!   replaced by a reachable member tagged [`ELIGIBLE_TAG`], preferring a zone without a
//!   healthy manager (ties by Raft id). The answer is one committed proposal,
//!   [`Replacement::commands`], setting the replacement's role to manager and the lost one's
//!   to edge; the core's reconciliation then turns that into Raft configuration changes in a
//!   safe order, one at a time: the replacement joins as a learner, becomes a voter once
//!   caught up, and only then is the lost voter removed. Adding one reachable voter and then
//!   removing an unreachable one never leaves the reachable voters short of a quorum, and
//!   nothing is decided while any change is still in flight, so at most one voter is being
//!   replaced at any time. A voter heard from again within the grace period is not replaced.
//! - [`preferred_leader`]: managers are compared by their mean round-trip time to the other
//!   members. Each manager measures its own (the driver feeds pings to
//!   [`crate::core::Core::handle_rtt`]) and followers report their mean to the leader
//!   ([`crate::core::Output::ReportRtt`], [`crate::core::Core::handle_rtt_report`]). A
//!   candidate is clearly better only when its mean is lower than the leader's by at least
//!   a percentage *and* a number of milliseconds; the core adds the rest of the hysteresis
//!   (the same candidate must win several consecutive evaluations, and leadership moves at
//!   most once per gap, counted from the last transfer or from gaining leadership).

use std::collections::BTreeMap;

use crate::command::{Command, Member, Role};
use crate::core::Timestamp;

/// The tag that makes a member a candidate to replace a lost manager.
pub const ELIGIBLE_TAG: &str = "manager-eligible";

/// A decision to replace a lost voter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// The lost voter's PeerId bytes.
    pub lost: Vec<u8>,
    /// Its Raft id.
    pub lost_raft_id: u64,
    /// The replacement's PeerId bytes.
    pub with: Vec<u8>,
    /// Its Raft id.
    pub with_raft_id: u64,
}

impl Replacement {
    /// The commands to commit, in one proposal: the replacement becomes a manager and the lost
    /// voter an edge (reconciliation adds the first before it removes the second).
    pub fn commands(&self) -> Vec<Command> {
        vec![
            Command::SetRole { peer: self.with.clone(), role: Role::Manager },
            Command::SetRole { peer: self.lost.clone(), role: Role::Edge },
        ]
    }
}

/// What the leader knows when deciding on a replacement.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// Committed members by PeerId bytes.
    pub members: &'a BTreeMap<Vec<u8>, Member>,
    /// Current Raft voters.
    pub voters: &'a [u64],
    /// Current Raft learners.
    pub learners: &'a [u64],
    /// When each Raft id was last heard from (Raft messages, pings).
    pub heard: &'a BTreeMap<u64, Timestamp>,
    /// The deciding leader's Raft id (always healthy).
    pub me: u64,
    /// Now, on the driver's clock.
    pub now: Timestamp,
    /// How long a node may stay silent before it counts as lost.
    pub grace_ms: u64,
}

impl View<'_> {
    /// Whether `id` was heard from within the grace period (the leader always is).
    pub fn healthy(&self, id: u64) -> bool {
        id == self.me
            || self.heard.get(&id).is_some_and(|t| self.now.0.saturating_sub(t.0) <= self.grace_ms)
    }
}

/// The replacement to make now, if any.
///
/// Nothing is decided while a membership change is in flight (a manager not yet a voter, a
/// learner, or a voter that is no longer a manager), or when the healthy voters are not a
/// quorum (the proposal could not commit, and a later leader decides afresh).
pub fn replacement(view: &View<'_>) -> Option<Replacement> {
    if !view.learners.is_empty() {
        return None;
    }
    let manager_ids: Vec<u64> =
        view.members.values().filter(|m| m.role == Role::Manager).map(|m| m.raft_id).collect();
    let settled = manager_ids.iter().all(|id| view.voters.contains(id))
        && view.voters.iter().all(|id| manager_ids.contains(id));
    if !settled {
        return None;
    }
    let healthy = view.voters.iter().filter(|id| view.healthy(**id)).count();
    if healthy < view.voters.len() / 2 + 1 {
        return None;
    }
    let mut voters = view.voters.to_vec();
    voters.sort_unstable();
    let lost_id = voters.into_iter().find(|id| !view.healthy(*id))?;
    let lost = view.members.values().find(|m| m.raft_id == lost_id)?;
    let zone_has_manager = |zone: &str| {
        view.members.values().any(|m| {
            m.role == Role::Manager
                && m.raft_id != lost_id
                && m.zone == zone
                && view.healthy(m.raft_id)
        })
    };
    let with = view
        .members
        .values()
        .filter(|m| {
            m.role != Role::Manager
                && m.raft_id != 0
                && m.tags.iter().any(|t| t == ELIGIBLE_TAG)
                && view.healthy(m.raft_id)
        })
        .min_by_key(|m| (zone_has_manager(&m.zone), m.raft_id))?;
    Some(Replacement {
        lost: lost.peer.clone(),
        lost_raft_id: lost_id,
        with: with.peer.clone(),
        with_raft_id: with.raft_id,
    })
}

/// How much better a candidate's mean round-trip time must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Margin {
    /// At least this many percent lower than the leader's.
    pub better_pct: u64,
    /// And at least this many milliseconds lower.
    pub better_ms: u64,
}

/// The manager that should lead instead of `me`, if one is clearly better: the lowest mean
/// round-trip time among `scores` (ties by Raft id), when it beats `me`'s own by the margin.
/// `scores` holds the mean round-trip time, in milliseconds, of every candidate and of `me`.
pub fn preferred_leader(me: u64, scores: &BTreeMap<u64, u64>, margin: Margin) -> Option<u64> {
    let mine = *scores.get(&me)?;
    let (best, score) = scores
        .iter()
        .filter(|(id, _)| **id != me)
        .min_by_key(|(id, score)| (**score, **id))
        .map(|(id, score)| (*id, *score))?;
    let gain = mine.checked_sub(score)?;
    let clearly = gain >= margin.better_ms && gain * 100 >= mine * margin.better_pct;
    clearly.then_some(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, role: Role, zone: &str, eligible: bool) -> (Vec<u8>, Member) {
        let peer = format!("p{id}").into_bytes();
        let tags = if eligible { vec![ELIGIBLE_TAG.to_string()] } else { vec![] };
        let m = Member {
            peer: peer.clone(),
            raft_id: id,
            role,
            zone: zone.into(),
            tags,
            capacity_bytes: 0,
            addrs: vec![],
        };
        (peer, m)
    }

    /// Managers 1 (zone a), 2 (zone a), 3 (zone b); eligible edges 4 (zone a), 5 (zone c);
    /// an ineligible edge 6 (zone d). Everyone was heard at `heard_ms` except those listed.
    fn fixture(silent: &[u64]) -> (BTreeMap<Vec<u8>, Member>, BTreeMap<u64, Timestamp>) {
        let members: BTreeMap<Vec<u8>, Member> = [
            member(1, Role::Manager, "a", false),
            member(2, Role::Manager, "a", false),
            member(3, Role::Manager, "b", false),
            member(4, Role::Edge, "a", true),
            member(5, Role::Router, "c", true),
            member(6, Role::Edge, "d", false),
        ]
        .into_iter()
        .collect();
        let heard = (1..=6)
            .map(|id| (id, Timestamp(if silent.contains(&id) { 1_000 } else { 50_000 })))
            .collect();
        (members, heard)
    }

    fn view<'a>(
        members: &'a BTreeMap<Vec<u8>, Member>,
        voters: &'a [u64],
        learners: &'a [u64],
        heard: &'a BTreeMap<u64, Timestamp>,
    ) -> View<'a> {
        View { members, voters, learners, heard, me: 1, now: Timestamp(60_000), grace_ms: 30_000 }
    }

    #[test]
    fn zone_without_a_manager_is_preferred() {
        // Voter 3, the only manager in zone b, has been silent past the grace period. Eligible
        // edge 4 has the lower Raft id but sits in zone a with two healthy managers; eligible
        // router 5 sits in zone c, which has none: 5 is chosen. If 5 is silent too, 4 is the
        // fallback; the commands promote the replacement and demote the lost voter together.
        let (members, heard) = fixture(&[3]);
        let voters = [1, 2, 3];
        let r = replacement(&view(&members, &voters, &[], &heard)).expect("a replacement");
        assert_eq!((r.lost_raft_id, r.with_raft_id), (3, 5));
        assert_eq!(
            r.commands(),
            vec![
                Command::SetRole { peer: b"p5".to_vec(), role: Role::Manager },
                Command::SetRole { peer: b"p3".to_vec(), role: Role::Edge },
            ]
        );
        let (members, heard) = fixture(&[3, 5]);
        let r = replacement(&view(&members, &voters, &[], &heard)).expect("a replacement");
        assert_eq!((r.lost_raft_id, r.with_raft_id), (3, 4), "the reachable one in a manned zone");
        // Among candidates in equally unmanned zones the lower Raft id wins.
        let (mut members, heard) = fixture(&[3]);
        members.get_mut(b"p4".as_slice()).expect("4").zone = "e".into();
        let r = replacement(&view(&members, &voters, &[], &heard)).expect("a replacement");
        assert_eq!(r.with_raft_id, 4);
    }

    #[test]
    fn no_replacement_within_grace_mid_change_or_without_quorum() {
        // A voter silent for exactly the grace period is kept (the boundary belongs to the
        // voter); nothing is decided while a change is in flight (a learner, a manager not yet
        // a voter, a voter no longer a manager), when the healthy voters are short of a quorum,
        // or when no eligible member is reachable. Node 1, the deciding leader, never counts
        // as lost even without an entry of its own.
        let (members, mut heard) = fixture(&[]);
        heard.insert(3, Timestamp(30_000));
        heard.remove(&1);
        let voters = [1, 2, 3];
        assert_eq!(replacement(&view(&members, &voters, &[], &heard)), None, "within grace");
        heard.insert(3, Timestamp(29_999));
        assert!(replacement(&view(&members, &voters, &[], &heard)).is_some(), "just past it");
        assert_eq!(replacement(&view(&members, &voters, &[4], &heard)), None, "a learner");
        assert_eq!(replacement(&view(&members, &[1, 2], &[], &heard)), None, "3 not a voter");
        assert_eq!(replacement(&view(&members, &[1, 2, 3, 6], &[], &heard)), None, "6 leaving");
        let (members, heard) = fixture(&[2, 3]);
        assert_eq!(replacement(&view(&members, &voters, &[], &heard)), None, "no quorum");
        let (members, heard) = fixture(&[3, 4, 5]);
        assert_eq!(replacement(&view(&members, &voters, &[], &heard)), None, "none reachable");
    }

    #[test]
    fn a_leader_moves_only_for_a_clear_gain() {
        // With a margin of 30% and 5 ms: 40 ms -> 27 ms (32%, 13 ms) is clear; 40 -> 30 (25%)
        // is not; 10 -> 6 (40% but 4 ms) is not; the best candidate is the one compared (ties
        // by id); without the leader's own score nothing moves.
        let margin = Margin { better_pct: 30, better_ms: 5 };
        let s = |v: &[(u64, u64)]| v.iter().copied().collect::<BTreeMap<u64, u64>>();
        assert_eq!(preferred_leader(1, &s(&[(1, 40), (2, 27), (3, 35)]), margin), Some(2));
        assert_eq!(preferred_leader(1, &s(&[(1, 40), (2, 30), (3, 35)]), margin), None);
        assert_eq!(preferred_leader(1, &s(&[(1, 10), (2, 6)]), margin), None);
        assert_eq!(preferred_leader(1, &s(&[(1, 40), (3, 20), (2, 20)]), margin), Some(2));
        assert_eq!(preferred_leader(1, &s(&[(2, 1)]), margin), None);
        assert_eq!(preferred_leader(1, &s(&[(1, 5), (2, 9)]), margin), None);
    }
}
