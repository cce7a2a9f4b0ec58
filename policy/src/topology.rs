//! Topology activation and canary decisions, as pure functions of what the leader observed.
//!
//! - [`activation`]: a staged version becomes active once the routers holding it reach a
//!   [`Share`] of the live subscribed routers (by default all of them; the cluster policy
//!   [`ACTIVATE_SHARE_POLICY`], or `topology.activate_share.NAME` for one name, lowers it).
//! - [`canary`]: during a canary phase, more than `fail_pct_max` percent of the canary
//!   routers' hooks failing rolls the version back; every canary router reporting a good
//!   hook promotes it; anything else waits.
//! - [`canary_matches`]: which members are canary routers (`tag:T`, `zone:Z`,
//!   `member:PEER`).
//!
//! Integer arithmetic only (shares in per-mille), so every node computes the same answer.
//! The caller (the consensus core's topology decider) gathers the sets; nothing here reads a
//! clock or keeps state.

use std::collections::{BTreeMap, BTreeSet};

use crate::access::Subject;

/// The cluster policy key holding the default activation share (`1`, `0.8`, `75%`).
pub const ACTIVATE_SHARE_POLICY: &str = "topology.activate_share";

/// A share of routers, in per-mille (0..=1000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Share(u32);

impl Share {
    /// Every router.
    pub const ALL: Share = Share(1000);

    /// A share from per-mille.
    ///
    /// # Panics
    /// Above 1000: a bug in the caller.
    pub fn from_permille(permille: u32) -> Share {
        assert!(permille <= 1000, "permille={permille}");
        Share(permille)
    }

    /// The share in per-mille.
    pub fn permille(self) -> u32 {
        self.0
    }

    /// Parses `0` to `1` with up to three decimals (`0.75`), or a percentage (`75%`,
    /// `62.5%`).
    ///
    /// # Errors
    /// A message naming the accepted forms.
    pub fn parse(s: &str) -> Result<Share, String> {
        let bad = || format!("bad share {s:?}: a number from 0 to 1 (0.75) or a percentage (75%)");
        let t = s.trim();
        let (number, scale) = match t.strip_suffix('%') {
            Some(p) => (p.trim_end(), 10u64),
            None => (t, 1000u64),
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || int.len() > 4 || !digits(int) || !digits(frac) {
            return Err(bad());
        }
        // Fraction digits below the per-mille resolution must be zero.
        let places = if scale == 1000 { 3 } else { 1 };
        let (kept, rest) = frac.split_at(frac.len().min(places));
        if rest.bytes().any(|b| b != b'0') {
            return Err(bad());
        }
        let int: u64 = int.parse().map_err(|_| bad())?;
        let mut kept_value: u64 = 0;
        for (i, b) in kept.bytes().enumerate() {
            kept_value += u64::from(b - b'0') * 10u64.pow((places - 1 - i) as u32);
        }
        let permille = int * scale + kept_value;
        if permille > 1000 {
            return Err(bad());
        }
        Ok(Share(permille as u32))
    }

    /// How many of `n` routers this share needs: the ceiling of share × n, and at least one
    /// unless the share is zero.
    pub fn needed(self, n: u64) -> u64 {
        let needed = (u64::from(self.0) * n).div_ceil(1000);
        if self.0 > 0 { needed.max(1) } else { 0 }
    }
}

/// Whether to activate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Enough routers hold the version.
    Activate,
    /// Not yet.
    Wait {
        /// Live subscribed routers holding it.
        holding: u64,
        /// How many must.
        needed: u64,
    },
}

/// Whether enough of the live subscribed routers `among` hold the version: `holders` outside
/// `among` do not count. With no live subscribed router, only a zero share activates.
pub fn activation(
    among: &BTreeSet<Vec<u8>>,
    holders: &BTreeSet<Vec<u8>>,
    share: Share,
) -> Activation {
    let holding = among.intersection(holders).count() as u64;
    let needed = share.needed(among.len() as u64);
    if holding >= needed { Activation::Activate } else { Activation::Wait { holding, needed } }
}

/// What to do with a version in its canary phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CanaryDecision {
    /// Every canary router applied it: activate everywhere.
    Promote,
    /// Too many canary hooks failed: roll back.
    RollBack {
        /// Failed hooks among the canaries.
        failed: u64,
        /// Canary routers.
        canaries: u64,
    },
    /// Waiting for more results.
    Wait {
        /// Canary routers that reported.
        reported: u64,
        /// Canary routers.
        canaries: u64,
    },
}

/// The canary decision from the hook results (`true`: applied) of the live canary routers
/// `canaries`: roll back as soon as failures exceed `fail_pct_max` percent of them (more
/// results cannot undo that), promote once every one reported success, else wait. Results
/// from routers outside `canaries` do not count. An empty canary set promotes: a canary
/// configuration that matches no live router does not hold the rollout back.
pub fn canary(
    canaries: &BTreeSet<Vec<u8>>,
    hooks: &BTreeMap<Vec<u8>, bool>,
    fail_pct_max: u32,
) -> CanaryDecision {
    let n = canaries.len() as u64;
    let results: Vec<bool> = canaries.iter().filter_map(|p| hooks.get(p).copied()).collect();
    let failed = results.iter().filter(|ok| !**ok).count() as u64;
    let reported = results.len() as u64;
    if failed * 100 > u64::from(fail_pct_max.min(100)) * n {
        return CanaryDecision::RollBack { failed, canaries: n };
    }
    if reported == n {
        // Every canary reported and the failures, if any, are within the tolerance.
        return CanaryDecision::Promote;
    }
    CanaryDecision::Wait { reported, canaries: n }
}

/// Checks a canary subject: `tag:T`, `zone:Z` or `member:PEER`.
///
/// # Errors
/// A message naming the accepted forms.
pub fn validate_canary_subject(s: &str) -> Result<(), String> {
    let ok = ["tag:", "zone:", "member:"]
        .iter()
        .any(|p| s.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
        && s.len() <= 128;
    if ok {
        Ok(())
    } else {
        Err(format!("bad canary subject {s:?}: use tag:T, zone:Z or member:PEER"))
    }
}

/// Whether `who` matches any of the canary `subjects`.
pub fn canary_matches(subjects: &[String], who: &Subject) -> bool {
    subjects.iter().any(|s| match s.split_once(':') {
        Some(("tag", t)) => who.tags.iter().any(|x| x == t),
        Some(("zone", z)) => who.zone == z,
        Some(("member", p)) => who.peer == p,
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &str) -> BTreeSet<Vec<u8>> {
        ids.split_whitespace().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn shares_parse_exactly() {
        // Table: input -> per-mille, or an error. Sub-per-mille precision, values above 1,
        // signs and junk are refused rather than rounded.
        let table: &[(&str, Option<u32>)] = &[
            ("1", Some(1000)),
            ("1.0", Some(1000)),
            ("0", Some(0)),
            ("0.8", Some(800)),
            ("0.75", Some(750)),
            ("0.125", Some(125)),
            ("0.1250", Some(125)),
            ("75%", Some(750)),
            ("62.5%", Some(625)),
            ("100%", Some(1000)),
            (" 0.5 ", Some(500)),
            ("0.1255", None),
            ("62.55%", None),
            ("1.001", None),
            ("101%", None),
            ("-0.5", None),
            ("", None),
            (".5", None),
            ("half", None),
            ("1e0", None),
            ("99999999999999999999", None),
        ];
        for (input, want) in table {
            assert_eq!(Share::parse(input).ok().map(Share::permille), *want, "input {input:?}");
        }
    }

    #[test]
    fn activation_table() {
        // Table: live subscribed routers, holders, share -> decision. Holders outside the
        // live set do not count; the needed count is a ceiling and at least one.
        let table: &[(&str, &str, u32, Activation)] = &[
            ("a b c", "a b c", 1000, Activation::Activate),
            ("a b c", "a b", 1000, Activation::Wait { holding: 2, needed: 3 }),
            ("a b c", "a b", 666, Activation::Activate),
            ("a b c", "a b", 667, Activation::Wait { holding: 2, needed: 3 }),
            ("a b c", "a b", 700, Activation::Wait { holding: 2, needed: 3 }),
            ("a b c d", "a b", 500, Activation::Activate),
            ("a b c d", "a x y", 500, Activation::Wait { holding: 1, needed: 2 }),
            ("a", "", 1, Activation::Wait { holding: 0, needed: 1 }),
            ("", "x", 1000, Activation::Wait { holding: 0, needed: 1 }),
            ("", "", 0, Activation::Activate),
            ("a b", "", 0, Activation::Activate),
        ];
        for (live, holders, permille, want) in table {
            let got = activation(&set(live), &set(holders), Share::from_permille(*permille));
            assert_eq!(got, *want, "live={live:?} holders={holders:?} share={permille}");
        }
    }

    #[test]
    fn canary_table() {
        // Table: canary routers, hook results ("a+" applied, "b-" failed), tolerated failure
        // percentage -> decision.
        let hooks = |s: &str| -> BTreeMap<Vec<u8>, bool> {
            s.split_whitespace()
                .map(|h| (h.as_bytes()[..h.len() - 1].to_vec(), h.ends_with('+')))
                .collect()
        };
        let table: &[(&str, &str, u32, CanaryDecision)] = &[
            ("a b", "a+ b+", 0, CanaryDecision::Promote),
            ("a b", "a+", 0, CanaryDecision::Wait { reported: 1, canaries: 2 }),
            ("a b", "a-", 0, CanaryDecision::RollBack { failed: 1, canaries: 2 }),
            ("a b", "a-", 50, CanaryDecision::Wait { reported: 1, canaries: 2 }),
            ("a b", "a- b+", 50, CanaryDecision::Promote),
            ("a b", "a- b-", 50, CanaryDecision::RollBack { failed: 2, canaries: 2 }),
            ("a b c", "a- b+ c+", 33, CanaryDecision::RollBack { failed: 1, canaries: 3 }),
            ("a b c", "a- b+ c+", 34, CanaryDecision::Promote),
            ("a b", "x- y- a+ b+", 0, CanaryDecision::Promote),
            ("", "x-", 0, CanaryDecision::Promote),
            ("a", "a-", 100, CanaryDecision::Promote),
        ];
        for (canaries, results, pct, want) in table {
            let got = canary(&set(canaries), &hooks(results), *pct);
            assert_eq!(got, *want, "canaries={canaries:?} results={results:?} pct={pct}");
        }
    }

    #[test]
    fn canary_subjects() {
        // Subjects match by tag, zone or base58 PeerId; malformed ones are refused.
        let who = Subject::new(b"peer", "router", "lab", &["canary".to_string()]);
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(canary_matches(&s(&["tag:canary"]), &who));
        assert!(canary_matches(&s(&["zone:x", "zone:lab"]), &who));
        assert!(canary_matches(&s(&[&format!("member:{}", who.peer)]), &who));
        assert!(!canary_matches(&s(&["tag:other", "zone:x", "role:router"]), &who));
        assert!(validate_canary_subject("tag:canary").is_ok());
        assert!(validate_canary_subject("tag:").is_err());
        assert!(validate_canary_subject("role:router").is_err());
    }
}
