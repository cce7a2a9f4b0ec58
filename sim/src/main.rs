//! `mycel-sim`: run one seed, or sweep many, of a simulated mycel fleet.
//!
//! Exit codes: 0 every check passed; 1 a violation was found; 2 bad usage or scenario.

#![allow(clippy::disallowed_types, clippy::disallowed_methods, reason = "a driver binary")]

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mycel_sim::scenario::{Millis, Scenario};
use mycel_sim::{Options, Report, bugs, run, sweep::sweep};

#[derive(Parser, Debug)]
#[command(name = "mycel-sim", version, about = "Deterministic simulator of a mycel fleet")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// Scenario file (TOML, see configs/sim/).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Nodes (overrides the scenario).
    #[arg(long)]
    nodes: Option<u32>,
    /// Managers (overrides the scenario).
    #[arg(long)]
    managers: Option<u32>,
    /// Faulty phase, e.g. 2m (overrides the scenario; scripted faults after it are dropped);
    /// the healed phase follows.
    #[arg(long)]
    duration: Option<String>,
    /// Planted bugs to switch on, comma separated (builds with the sim-bugs feature).
    #[arg(long, default_value = "")]
    bugs: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs one seed.
    Run {
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Writes every event as a JSON line to this file.
        #[arg(long)]
        trace: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Runs many seeds.
    Sweep {
        /// Seeds as A..B (B excluded).
        #[arg(long)]
        seeds: String,
        /// Threads.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        #[command(flatten)]
        common: Common,
    },
}

fn scenario(c: &Common) -> Result<(Scenario, String)> {
    let mut s = match &c.scenario {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Scenario::from_toml(&p.display().to_string(), &text)?
        }
        None => Scenario::default(),
    };
    let mut arg = String::new();
    if let Some(p) = &c.scenario {
        arg += &format!(" --scenario {}", p.display());
    }
    if let Some(n) = c.nodes {
        s.nodes = n;
        arg += &format!(" --nodes {n}");
    }
    if let Some(m) = c.managers {
        s.managers = m;
        s.eligible = s.eligible.min(s.nodes.saturating_sub(m));
        arg += &format!(" --managers {m}");
    }
    if let Some(d) = &c.duration {
        s.duration = Millis::parse(d).map_err(anyhow::Error::msg)?;
        // Scripted faults after a shortened faulty phase are dropped.
        let end = s.duration;
        s.faults.timeline.retain(|step| step.at <= end);
        arg += &format!(" --duration {d}");
    }
    if !c.bugs.is_empty() {
        arg += &format!(" --bugs {}", c.bugs);
    }
    s.validate()?;
    Ok((s, arg))
}

fn main() {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("mycel-sim: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main(cli: Cli) -> Result<bool> {
    match cli.command {
        Cmd::Run { seed, trace, common } => {
            let (sc, arg) = scenario(&common)?;
            let bugs = bugs::parse(&common.bugs).map_err(anyhow::Error::msg)?;
            if bugs != 0 && !bugs::ENABLED {
                bail!("planted bugs need a build with --features sim-bugs");
            }
            let trace: Option<Box<dyn Write>> = match trace {
                Some(p) => Some(Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&p)
                        .with_context(|| format!("creating {}", p.display()))?,
                ))),
                None => None,
            };
            let r = run(Options { seed, scenario: sc, trace, bugs });
            if common.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.summary());
                if !r.passed() {
                    println!("reproduce: {}", r.reproduce(&arg));
                }
            }
            Ok(r.passed())
        }
        Cmd::Sweep { seeds, jobs, common } => {
            let (sc, arg) = scenario(&common)?;
            let bugs = bugs::parse(&common.bugs).map_err(anyhow::Error::msg)?;
            if bugs != 0 && !bugs::ENABLED {
                bail!("planted bugs need a build with --features sim-bugs");
            }
            let (a, b) = seeds.split_once("..").context("--seeds takes A..B")?;
            let (a, b): (u64, u64) =
                (a.parse().context("seed range start")?, b.parse().context("seed range end")?);
            if a >= b {
                bail!("--seeds A..B needs A < B");
            }
            let total = b - a;
            let done = AtomicU64::new(0);
            let failed = AtomicU64::new(0);
            let progress = |r: &Report| {
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if !r.passed() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "\rseed {} FAILED: {}",
                        r.seed,
                        r.violations.first().map_or("", |v| v.check.as_str())
                    );
                }
                let f = failed.load(Ordering::Relaxed);
                eprint!("\r[{n}/{total}] {f} failed   ");
            };
            let started = std::time::Instant::now();
            let reports = sweep(&sc, a..b, jobs, bugs, &progress);
            eprintln!();
            let bad: Vec<&Report> = reports.iter().filter(|r| !r.passed()).collect();
            if common.json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                println!(
                    "{:>8} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9}  result",
                    "seed", "nodes", "sim s", "events", "leader", "config", "replicas"
                );
                for r in &reports {
                    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v}"));
                    println!(
                        "{:>8} {:>6} {:>10.1} {:>10} {:>9} {:>9} {:>9}  {}",
                        r.seed,
                        r.nodes,
                        r.simulated_ms as f64 / 1000.0,
                        r.events,
                        ms(r.convergence.leader_ms),
                        ms(r.convergence.config_ms),
                        ms(r.convergence.replicas_ms),
                        if r.passed() { "ok".to_string() } else { r.violations[0].check.clone() }
                    );
                }
                let events: u64 = reports.iter().map(|r| r.events).sum();
                println!(
                    "{} seeds, {} failed, {} events in {:.1} s wall",
                    reports.len(),
                    bad.len(),
                    events,
                    started.elapsed().as_secs_f64()
                );
                for r in &bad {
                    println!("FAILED seed {}: {}", r.seed, r.violations[0].detail);
                    println!("  reproduce: {}", r.reproduce(&arg));
                }
            }
            Ok(bad.is_empty())
        }
    }
}
