//! Quorum state micro-benchmarks for `bench/pins.sh`.
//!
//! `mycel-quorum-bench snapshot --pins N [--per-entry K]` builds a cluster state of N pins the
//! way the quorum does (entries of K `AddPin` commands applied in order, K = 10,000 as
//! `/v1/pins:batch` proposes), then times what a Raft snapshot and its restore do with it:
//! `ClusterState::encode`, cutting the bytes into a mycel object (`state_object`: FastCDC and
//! BLAKE3, the blocks the snapshot's CID names), and `ClusterState::decode`. Prints one JSON line.
//!
//! `mycel-quorum-bench cids --count N [--start S] [--per-file K] --out PREFIX` writes N distinct
//! pin bodies for `/v1/pins:batch` (JSON arrays of K pins each, files PREFIX.0.json, ...).
#![allow(clippy::print_stdout, clippy::disallowed_methods)] // a driver: it reads the clock

use std::io::Write as _;
use std::time::Instant;

use mycel_chunker::Cid;
use mycel_consensus::command::{Command, Pin, Proposal};
use mycel_consensus::state::ClusterState;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number: {v}")))
        .unwrap_or(default)
}

fn root(i: u64) -> Cid {
    Cid::raw(&i.to_le_bytes())
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn snapshot(args: &[String]) {
    let n = arg(args, "--pins", 1_000_000);
    let per = arg(args, "--per-entry", 10_000).max(1);
    let peer = libp2p::PeerId::random();
    let mut state = ClusterState::default();
    let t = Instant::now();
    let (mut i, mut index, mut seq) = (0u64, 1u64, 1u64);
    while i < n {
        let k = per.min(n - i);
        let commands = (i..i + k)
            .map(|j| {
                Command::AddPin(Pin {
                    root: root(j).to_bytes().to_vec(),
                    name: String::new(),
                    namespace: String::new(),
                    replicas_min: 1,
                    replicas_max: 3,
                    zones: vec![],
                    tags: vec![],
                    preposition: vec![],
                    deadline_ms: 0,
                })
            })
            .collect();
        let data = Proposal { from: peer.to_bytes(), seq, commands }.encode();
        state.apply(index, &data);
        i += k;
        index += 1;
        seq += 1;
    }
    let apply_s = t.elapsed().as_secs_f64();
    assert_eq!(state.pins.len() as u64, n);

    let t = Instant::now();
    let bytes = state.encode();
    let encode_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (cid, blocks) = mycel_consensus::core::state_object(&bytes);
    let object_s = t.elapsed().as_secs_f64();
    let block_bytes: usize = blocks.iter().map(|(_, b)| b.len()).sum();
    let t = Instant::now();
    let back = ClusterState::decode(&bytes).expect("decode");
    let decode_s = t.elapsed().as_secs_f64();
    assert_eq!(back.pins.len() as u64, n);
    println!(
        "{}",
        serde_json::json!({
            "pins": n,
            "entries": index - 1,
            "apply_s": apply_s,
            "state_bytes": bytes.len(),
            "encode_s": encode_s,
            "object_cid": cid.to_string(),
            "object_blocks": blocks.len(),
            "object_bytes": block_bytes,
            "object_s": object_s,
            "decode_s": decode_s,
            "vm_hwm_kib": vm_hwm_kib(),
        })
    );
}

fn cids(args: &[String]) {
    let n = arg(args, "--count", 100_000);
    let start = arg(args, "--start", 0);
    let per = arg(args, "--per-file", 10_000).max(1);
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .expect("--out PREFIX")
        .clone();
    let (mut i, mut f) = (0u64, 0u64);
    while i < n {
        let k = per.min(n - i);
        let path = format!("{out}.{f}.json");
        let mut w = std::io::BufWriter::new(std::fs::File::create(&path).expect(&path));
        w.write_all(b"[").expect("write");
        for j in 0..k {
            if j > 0 {
                w.write_all(b",").expect("write");
            }
            write!(w, r#"{{"root":"{}","replicas_min":1,"replicas_max":3}}"#, root(start + i + j))
                .expect("write");
        }
        w.write_all(b"]").expect("write");
        w.flush().expect("write");
        i += k;
        f += 1;
    }
    println!("{f}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("snapshot") => snapshot(&args[1..]),
        Some("cids") => cids(&args[1..]),
        _ => {
            eprintln!(
                "usage: mycel-quorum-bench snapshot [--pins N] [--per-entry K]\n       \
                 mycel-quorum-bench cids --count N [--start S] [--per-file K] --out PREFIX"
            );
            std::process::exit(2);
        }
    }
}
