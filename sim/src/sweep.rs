//! Many seeds of one scenario, on a few threads; each seed is one independent run.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::report::Report;
use crate::scenario::Scenario;
use crate::world::{Options, run};

/// Runs `seeds` of `scenario` on `jobs` threads, calling `progress` after each run (from the
/// thread that ran it). Reports come back in seed order.
pub fn sweep(
    scenario: &Scenario,
    seeds: std::ops::Range<u64>,
    jobs: usize,
    bugs: u32,
    progress: &(dyn Fn(&Report) + Sync),
) -> Vec<Report> {
    sweep_until(scenario, seeds, jobs, bugs, &|r| {
        progress(r);
        false
    })
}

/// [`sweep`] that stops starting seeds once `stop` returns true for a report (seeds already
/// running finish).
pub fn sweep_until(
    scenario: &Scenario,
    seeds: std::ops::Range<u64>,
    jobs: usize,
    bugs: u32,
    stop: &(dyn Fn(&Report) -> bool + Sync),
) -> Vec<Report> {
    let next = AtomicU64::new(seeds.start);
    let stopped = AtomicBool::new(false);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end || stopped.load(Ordering::Relaxed) {
                        return;
                    }
                    let r = run(Options { seed, scenario: scenario.clone(), trace: None, bugs });
                    if stop(&r) {
                        stopped.store(true, Ordering::Relaxed);
                    }
                    out.lock().expect("sweep results").push(r);
                }
            });
        }
    });
    let mut v = out.into_inner().expect("sweep results");
    v.sort_by_key(|r| r.seed);
    v
}
