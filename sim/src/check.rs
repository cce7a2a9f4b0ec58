//! The safety checkers: properties that must hold after every step of every run, fed by
//! the driver as events happen, so each costs little per step.
//!
//! - at most one leader per term, and at most one vote granted per voter and term (read
//!   from the Raft messages themselves, so a node that forgets its vote is caught);
//! - every node that applied index `i` applied the same proposal there (committed prefixes
//!   agree), and equal applied indexes give equal state digests;
//! - every acknowledged proposal is in the final state;
//! - no node stores or serves a block that does not match its CID;
//! - no content reaches a node without a `read` grant, nor a non-member;
//! - no acknowledged pin becomes unrecoverable (checked at the end by the world).

use std::collections::{BTreeMap, BTreeSet};

use mycel_consensus::state::Outcome;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use crate::report::Violation;

/// Most violations kept per run (the first ones tell the story).
pub const VIOLATIONS_MAX: usize = 32;

/// What a node reported applied at one index: (proposer, sequence, outcome).
pub type Record = (Vec<u8>, u64, Outcome);

/// The running checkers of one run.
#[derive(Debug, Default)]
pub struct Checker {
    /// The leader of each term (node index).
    leaders: BTreeMap<u64, usize>,
    /// The candidate each voter granted its vote to, per term.
    votes: BTreeMap<(u64, u64), u64>,
    /// What was applied at each index, as first reported.
    committed: BTreeMap<u64, Record>,
    /// Proposals acknowledged to their proposer as applied.
    pub acked: BTreeSet<(Vec<u8>, u64)>,
    /// Every violation so far (bounded).
    pub violations: Vec<Violation>,
    /// Violations not kept past the bound.
    pub dropped: u64,
}

impl Checker {
    /// Records a violation.
    pub fn fail(&mut self, at_ms: u64, check: &str, detail: String) {
        if self.violations.len() >= VIOLATIONS_MAX {
            self.dropped += 1;
            return;
        }
        self.violations.push(Violation { at_ms, check: check.into(), detail });
    }

    /// A node became leader of `term`.
    pub fn on_leader(&mut self, at_ms: u64, term: u64, node: usize) {
        match self.leaders.get(&term) {
            Some(&other) if other != node => self.fail(
                at_ms,
                "safety:one-leader-per-term",
                format!("nodes {other} and {node} both led term {term}"),
            ),
            Some(_) => {}
            None => {
                self.leaders.insert(term, node);
            }
        }
    }

    /// A Raft message was sent: a granted vote is recorded. Returns whether it grants a
    /// vote.
    pub fn on_raft_send(&mut self, at_ms: u64, msg: &[u8]) -> bool {
        let Ok(m) = Message::parse_from_bytes(msg) else {
            self.fail(at_ms, "safety:raft-encoding", "a core sent an unparsable message".into());
            return false;
        };
        if m.get_msg_type() != MessageType::MsgRequestVoteResponse || m.reject {
            return false;
        }
        let key = (m.from, m.term);
        match self.votes.get(&key) {
            Some(&c) if c != m.to => self.fail(
                at_ms,
                "safety:one-vote-per-term",
                format!("raft id {} voted for {c} and {} in term {}", m.from, m.to, m.term),
            ),
            Some(_) => {}
            None => {
                self.votes.insert(key, m.to);
            }
        }
        true
    }

    /// Node `node` applied `record` at `index`.
    pub fn on_applied(&mut self, at_ms: u64, node: usize, index: u64, record: Record) {
        match self.committed.get(&index) {
            Some(first) if *first != record => {
                let detail = format!(
                    "node {node} applied ({:?}, {}, {:?}) at index {index}, another node ({:?}, {}, {:?})",
                    String::from_utf8_lossy(&record.0),
                    record.1,
                    record.2,
                    String::from_utf8_lossy(&first.0),
                    first.1,
                    first.2
                );
                self.fail(at_ms, "safety:committed-prefix", detail);
            }
            Some(_) => {}
            None => {
                self.committed.insert(index, record);
            }
        }
    }

    /// The proposals that were applied somewhere, as (proposer, sequence).
    pub fn applied_proposals(&self) -> BTreeSet<(Vec<u8>, u64)> {
        self.committed.values().map(|(f, s, _)| (f.clone(), *s)).collect()
    }
}
