//! Planted bugs (feature `sim-bugs`): each one, switched on, is caught by the checkers
//! within 200 seeds of the CI swarm, so we know the checkers can fail.
//! Run with `cargo test -p mycel-sim --features sim-bugs --test bugs`.

#![cfg(feature = "sim-bugs")]

use std::path::Path;

use mycel_sim::scenario::Scenario;
use mycel_sim::sweep::sweep_until;
use mycel_sim::{Options, bugs, run};

fn first_caught(bug: u32) -> Option<(u64, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/sim/ci.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let sc = Scenario::from_toml("ci.toml", &text).unwrap();
    let reports = sweep_until(&sc, 0..200, 2, bug, &|r| !r.passed());
    reports
        .iter()
        .find(|r| !r.passed())
        .map(|r| (r.seed, format!("{}: {}", r.violations[0].check, r.violations[0].detail)))
}

#[test]
fn every_planted_bug_is_caught_within_200_seeds() {
    // Each switch alone: some seed below 200 reports a violation of the expected kind.
    for (name, bug) in bugs::ALL {
        let caught = first_caught(bug);
        let (seed, what) =
            caught.unwrap_or_else(|| panic!("planted bug {name} was not caught in 200 seeds"));
        eprintln!("{name}: caught at seed {seed}: {what}");
        let expected = match name {
            "skip-cid-check" => "store-matches-cid",
            "ack-before-fsync" => "safety:",
            "vote-twice" => "one-",
            "serve-without-grant" => "read-grant",
            "router-applies-staged" => "topology-uncommitted",
            "ignore-prepositions" => "preposition-deadline",
            "serve-outside-tree" => "read-grant",
            // A proposal settled early is never applied; when it is the cluster's init, the
            // cluster never forms.
            "ack-before-apply" => "acknowledged-lost|liveness:configuration",
            // A follower without a pin entry also misses pre-positioning it.
            "follow-skips-entry" => "state-agreement|preposition-deadline",
            _ => unreachable!(),
        };
        assert!(
            expected.split('|').any(|e| what.contains(e)),
            "{name} caught by an unexpected check: {what}"
        );
    }
}

#[test]
fn a_clean_build_switch_set_to_zero_passes() {
    // With the feature built but no switch on, the same seeds pass (the hooks are inert).
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/sim/ci.toml");
    let sc = Scenario::from_toml("ci.toml", &std::fs::read_to_string(&path).unwrap()).unwrap();
    for seed in 0..10 {
        let r = run(Options { seed, scenario: sc.clone(), trace: None, bugs: 0 });
        assert!(r.passed(), "{}", r.summary());
    }
}
