//! Benchmarks that need the library rather than the CLI (run by `bench/*.sh`):
//!
//! - `cdc FILE`: FastCDC + BLAKE3 alone on a file already in memory: one core cutting,
//!   one core hashing, in parallel (the reference for `mycel add`), plus each alone.
//! - `fill DIR --chunks N`: writes N small distinct blocks into a store in group commits of
//!   `--batch` blocks, printing progress (a script kills it with SIGKILL mid-way).
//! - `open DIR`: times opening a store (after a kill) and counts its blocks.
//! - `raftlog DIR`: the Raft log's durable append, as redb transactions (what the node uses)
//!   against a dedicated append-only file with one fdatasync per batch: p50/p99 of 1,000
//!   single-entry batches each.

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // a driver: clock and threads

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use mycel_chunker::Cid;
use mycel_chunker::cdc::Cutter;
use mycel_node::store::Store;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("cdc") => cdc(&PathBuf::from(args.get(1).context("cdc FILE")?)),
        Some("fill") => {
            let dir = PathBuf::from(args.get(1).context("fill DIR")?);
            let chunks = flag(&args, "--chunks").unwrap_or(10_000_000);
            let batch = flag(&args, "--batch").unwrap_or(100_000);
            fill(&dir, chunks, batch)
        }
        Some("open") => open(&PathBuf::from(args.get(1).context("open DIR")?)),
        Some("raftlog") => raftlog(&PathBuf::from(args.get(1).context("raftlog DIR")?)),
        _ => bail!("usage: mycel-bench cdc FILE | fill DIR [--chunks N] [--batch N] | open DIR"),
    }
}

fn flag(args: &[String], name: &str) -> Option<u64> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn cdc(path: &Path) -> Result<()> {
    let data = std::fs::read(path)?;
    let config = mycel_chunker::Config::default();
    let cutter = Cutter::new(&config);
    let mb = data.len() as f64 / 1e6;

    let t = Instant::now();
    let lengths = cutter.lengths(&data);
    let cut_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut at = 0;
    let mut sink = 0u8;
    for len in &lengths {
        sink ^= Cid::raw(&data[at..at + len]).digest()[0];
        at += len;
    }
    let hash_s = t.elapsed().as_secs_f64();

    // Both cores: one thread cuts and sends lengths, the other hashes them as they come.
    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, usize)>(1024);
    let hashed = std::thread::scope(|s| {
        let data = &data;
        let h = s.spawn(move || {
            let mut x = 0u8;
            for (at, len) in rx {
                x ^= Cid::raw(&data[at..at + len]).digest()[0];
            }
            x
        });
        let mut at = 0;
        while let Some(len) = cutter.cut(&data[at..], true) {
            tx.send((at, len)).expect("hasher alive");
            at += len;
        }
        drop(tx);
        h.join().expect("hasher")
    });
    let both_s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bytes": data.len(), "chunks": lengths.len(),
            "cut_mb_s": mb / cut_s, "hash_mb_s": mb / hash_s,
            "cut_and_hash_two_cores_mb_s": mb / both_s,
            "check": sink ^ hashed,
        })
    );
    Ok(())
}

fn fill(dir: &Path, chunks: u64, batch: u64) -> Result<()> {
    let store = Store::open(dir)?;
    let start = store.stats()?.blocks;
    let t = Instant::now();
    let mut n = start;
    while n < chunks {
        let mut w = store.writer()?;
        let end = (n + batch).min(chunks);
        for i in n..end {
            let bytes = i.to_le_bytes().repeat(8);
            w.put(Cid::raw(&bytes), &bytes)?;
        }
        w.commit()?;
        n = end;
        println!(
            "{}",
            serde_json::json!({"blocks": n, "elapsed_s": t.elapsed().as_secs_f64(), "rss_kib": rss_kib()})
        );
    }
    Ok(())
}

fn open(dir: &Path) -> Result<()> {
    let t = Instant::now();
    let store = Store::open(dir)?;
    let open_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let probe = 7u64.to_le_bytes().repeat(8);
    let found = store.get(&Cid::raw(&probe))?.is_some();
    let get_s = t.elapsed().as_secs_f64();
    let blocks = store.stats()?.blocks;
    println!(
        "{}",
        serde_json::json!({"open_s": open_s, "first_get_s": get_s, "probe_found": found,
                           "blocks": blocks, "rss_kib": rss_kib()})
    );
    Ok(())
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

fn raftlog(dir: &Path) -> Result<()> {
    use mycel_consensus::log::LogBackend;
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let n = 1000u64;
    let mut entry = raft::eraftpb::Entry { term: 1, ..Default::default() };
    entry.data = vec![7u8; 200].into();
    // redb: one transaction per Ready batch (entry + hard state).
    let path = dir.join("bench-raft.redb");
    let _ = std::fs::remove_file(&path);
    let mut log = mycel_node::cluster::raftlog::RedbLog::open(&path).map_err(anyhow::Error::msg)?;
    let mut redb_ms = Vec::new();
    for i in 1..=n {
        entry.index = i;
        let hs = raft::eraftpb::HardState { term: 1, vote: 1, commit: i, ..Default::default() };
        let t = Instant::now();
        log.append(std::slice::from_ref(&entry));
        log.set_hard_state(&hs);
        log.sync().map_err(anyhow::Error::msg)?;
        redb_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // A dedicated append-only file: the same bytes, one write and one fdatasync per batch.
    let apath = dir.join("bench-raft.log");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(&apath)?;
    let mut append_ms = Vec::new();
    for i in 1..=n {
        entry.index = i;
        let bytes = mycel_consensus::log::encode_entry(&entry);
        let t = Instant::now();
        f.write_all(&(bytes.len() as u32).to_le_bytes())?;
        f.write_all(&bytes)?;
        f.write_all(&[0u8; 24])?; // the hard state record
        f.sync_data()?;
        append_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (rp50, rp99) = percentiles(redb_ms);
    let (ap50, ap99) = percentiles(append_ms);
    println!(
        "{}",
        serde_json::json!({"batches": n, "redb_p50_ms": rp50, "redb_p99_ms": rp99,
            "append_only_p50_ms": ap50, "append_only_p99_ms": ap99})
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&apath);
    Ok(())
}
