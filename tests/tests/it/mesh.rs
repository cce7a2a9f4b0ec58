//! The mesh with real daemons over QUIC on 127.0.0.1: fan-in from several holders, failover
//! after kill -9, resume after a restart, a corrupting peer, the membership gate, and late
//! discovery. Tests here run one at a time (they share the two cores) with generous
//! deadlines.

use std::fs;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context, Result};
use mycel_tests::{Node, Running, file_hash, mycel_bin, random_bytes, wait_for};

pub static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Nodes that all list each other as members.
fn mesh(n: usize) -> Result<Vec<(Node, String)>> {
    let nodes: Vec<(Node, String)> = (0..n).map(|_| Node::mesh(&[])).collect::<Result<_>>()?;
    let peers: Vec<&str> = nodes.iter().map(|(_, p)| p.as_str()).collect();
    for (node, _) in &nodes {
        node.set_members(&peers)?;
    }
    Ok(nodes)
}

fn add(node: &Node, path: &std::path::Path) -> Result<String> {
    let r = node.add(path, &[])?;
    Ok(r["root"].as_str().context("root")?.to_string())
}

fn get_json(node: &Node, root: &str, out: &std::path::Path) -> Result<serde_json::Value> {
    let r = node.run(&["get", "--json", "--timeout", "60", root, out.to_str().unwrap()])?;
    anyhow::ensure!(r.code == 0, "get exited {}: {}\n{}", r.code, r.stderr, node.log());
    r.json()
}

fn fetching_done(node: &Node) -> Option<(u64, u64)> {
    let s = node.run(&["status", "--json"]).ok()?.json().ok()?;
    let f = s["fetches"].as_array()?.first()?.clone();
    Some((f["done_bytes"].as_u64()?, f["total_bytes"].as_u64()?))
}

fn spawn_get(node: &Node, root: &str, out: &std::path::Path) -> Result<std::process::Child> {
    Ok(Command::new(mycel_bin())
        .args(["get", "--json", "--timeout", "60", root, out.to_str().unwrap()])
        .env("MYCEL_DATA_DIR", &node.dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

#[test]
fn fan_in_takes_a_share_from_every_holder() -> Result<()> {
    // A 64 MiB object on A and B, each uploading at most 10 MB/s: C's get takes at least
    // 25% of the bytes from each, and the result is byte-identical. (Sizes stay small: CI
    // machines may have little free disk, and every node keeps its own copy.)
    let _s = serial();
    let nodes = mesh(3)?;
    let (a, b, c) = (&nodes[0].0, &nodes[1].0, &nodes[2].0);
    for n in [a, b] {
        n.set_config("upload_bytes_per_sec", "10000000")?;
    }
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    fs::write(&src, random_bytes(31, 64 << 20))?;
    let ra = a.start(&[])?;
    b.set_bootstrap(&[&ra.addr])?;
    let rb = b.start(&[])?;
    c.set_bootstrap(&[&ra.addr, &rb.addr])?;
    let _rc = c.start(&[])?;
    let root = add(a, &src)?;
    assert_eq!(add(b, &src)?, root);
    let out = tmp.path().join("out.bin");
    let report = get_json(c, &root, &out)?;
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    let by_peer = report["by_peer"].as_object().context("by_peer")?;
    let total: u64 = by_peer.values().filter_map(serde_json::Value::as_u64).sum();
    assert!(total >= 64 << 20, "received {total}");
    for (peer, name) in [(&nodes[0].1, "A"), (&nodes[1].1, "B")] {
        let got = by_peer.get(peer).and_then(serde_json::Value::as_u64).unwrap_or(0);
        assert!(got * 4 >= total, "{name} sent {got} of {total}: {report}");
    }
    drop((ra, rb));
    Ok(())
}

#[test]
fn failover_after_kill_and_resume_after_restart() -> Result<()> {
    // C fetches 64 MiB from A and B (each capped at 5 MB/s). At 30-60% A is killed with
    // -9: C finishes from B with the right bytes, re-requesting at most what was in flight.
    // Then D fetches from B, is killed at about 50% and restarted: its second get receives
    // at most the remaining bytes plus one window.
    let _s = serial();
    let nodes = mesh(4)?;
    let (a, b, c, d) = (&nodes[0].0, &nodes[1].0, &nodes[2].0, &nodes[3].0);
    for n in [a, b] {
        n.set_config("upload_bytes_per_sec", "5000000")?;
    }
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    let size: u64 = 64 << 20;
    fs::write(&src, random_bytes(32, size as usize))?;
    let mut ra = a.start(&[])?;
    b.set_bootstrap(&[&ra.addr])?;
    let rb = b.start(&[])?;
    c.set_bootstrap(&[&ra.addr, &rb.addr])?;
    d.set_bootstrap(&[&rb.addr])?;
    let _rc = c.start(&[])?;
    let root = add(a, &src)?;
    add(b, &src)?;

    let out = tmp.path().join("c.bin");
    let getter = spawn_get(c, &root, &out)?;
    let at = wait_for(120, "C at 30% of the transfer", || {
        fetching_done(c).filter(|(done, total)| *total > 0 && done * 10 >= total * 3)
    })?;
    assert!(at.0 * 10 <= at.1 * 6, "killed late: {at:?}");
    ra.kill9();
    let result = getter.wait_with_output()?;
    assert_eq!(result.status.code(), Some(0), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    // The daemon wrote the output while fetching, and left no temporary file behind.
    assert_eq!(temp_files(tmp.path())?, Vec::<String>::new());
    let report: serde_json::Value = serde_json::from_slice(&result.stdout)?;
    let window_blocks = 256u64; // the daemon's fetch window_max
    assert!(report["rerequested"].as_u64().unwrap_or(u64::MAX) <= 2 * window_blocks, "{report}");
    assert!(
        report["fetched_bytes"].as_u64().unwrap() <= size + window_blocks * (256 << 10),
        "{report}"
    );

    // Resume: D restarts halfway.
    let mut rd = d.start(&[])?;
    let out_d = tmp.path().join("d.bin");
    let getter = spawn_get(d, &root, &out_d)?;
    let half = wait_for(120, "D at 50%", || {
        fetching_done(d).filter(|(done, total)| *total > 0 && done * 2 >= *total)
    })?;
    rd.kill9();
    let _ = getter.wait_with_output()?;
    let _rd = d.start(&[])?;
    let report = get_json(d, &root, &out_d)?;
    assert_eq!(file_hash(&out_d)?, file_hash(&src)?);
    let fetched = report["fetched_bytes"].as_u64().unwrap();
    // Blocks written but not yet committed when killed are fetched again: at most one
    // commit group (32 MiB) plus one window of 64 chunks.
    let allowance = (32 << 20) + window_blocks * (256 << 10);
    assert!(fetched <= size - half.0 + allowance, "second get fetched {fetched} after {half:?}");
    assert!(fetched < size, "the restart fetched everything again");
    // Only the daemon killed with -9 leaves its temporary output behind.
    assert!(temp_files(tmp.path())?.len() <= 1, "{:?}", temp_files(tmp.path())?);
    Ok(())
}

/// Temporary outputs (`.NAME.mycel-tmp...`) in `dir`.
fn temp_files(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.contains("mycel-tmp") {
            out.push(name);
        }
    }
    Ok(out)
}

#[test]
fn a_corrupting_peer_is_detected_penalised_and_worked_around() -> Result<()> {
    // A serves corrupt chunks (a test-only flag), B is honest: C's get is byte-identical,
    // C counts corrupt blocks and disconnects A.
    let _s = serial();
    let nodes = mesh(3)?;
    let (a, b, c) = (&nodes[0].0, &nodes[1].0, &nodes[2].0);
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    fs::write(&src, random_bytes(33, 32 << 20))?;
    let ra = a.start(&["--test-corrupt-serve"])?;
    b.set_bootstrap(&[&ra.addr])?;
    let rb = b.start(&[])?;
    c.set_bootstrap(&[&ra.addr, &rb.addr])?;
    let _rc = c.start(&[])?;
    let root = add(a, &src)?;
    add(b, &src)?;
    let out = tmp.path().join("out.bin");
    get_json(c, &root, &out)?;
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    let metrics = metrics_of(c)?;
    assert!(metric(&metrics, "mycel_corrupt_blocks_total") >= 1.0, "{metrics}");
    assert!(metric(&metrics, "mycel_peers_disconnected_total") >= 1.0, "{metrics}");
    c.ok(&["verify"])?;
    drop((ra, rb));
    Ok(())
}

fn metrics_of(node: &Node) -> Result<String> {
    let sock = node.dir.join("mycel.sock");
    let out = Command::new("curl")
        .args(["-s", "--unix-socket", sock.to_str().unwrap(), "http://x/metrics"])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn non_members_get_nothing_until_admitted() -> Result<()> {
    // D is not in A's members: its get fails having received nothing. Once A lists D and
    // reloads, the same get succeeds (the positive control).
    let _s = serial();
    let (a, pa) = Node::mesh(&[])?;
    let (d, pd) = Node::mesh(&[])?;
    a.set_members(&[&pa])?;
    d.set_members(&[&pa, &pd])?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    fs::write(&src, random_bytes(34, 4 << 20))?;
    let ra = a.start(&[])?;
    d.set_bootstrap(&[&ra.addr])?;
    let _rd = d.start(&[])?;
    let root = add(&a, &src)?;
    let out = tmp.path().join("out.bin");
    let r = d.run(&["get", "--json", "--timeout", "5", &root, out.to_str().unwrap()])?;
    assert_eq!(r.code, 3, "{} {}", r.stderr, r.text());
    assert!(!out.exists());
    assert!(d.run(&["ls", "--json"])?.json()?.as_array().unwrap().is_empty());
    a.set_members(&[&pa, &pd])?;
    a.ok(&["config", "reload"])?;
    let report = wait_for(60, "D's get after admission", || {
        let r = d.run(&["get", "--json", "--timeout", "10", &root, out.to_str().unwrap()]).ok()?;
        (r.code == 0).then(|| r.json().ok()).flatten()
    })?;
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    assert!(report["by_peer"].get(&pa).is_some(), "{report}");
    drop(ra);
    Ok(())
}

#[test]
fn a_node_started_after_the_add_finds_the_content() -> Result<()> {
    // B starts after A added the object and knows only A's address: its get succeeds.
    // Then the daemon stops cleanly on SIGTERM and removes its socket.
    let _s = serial();
    let nodes = mesh(2)?;
    let (a, b) = (&nodes[0].0, &nodes[1].0);
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    fs::write(&src, random_bytes(35, 8 << 20))?;
    let ra = a.start(&[])?;
    let root = add(a, &src)?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    b.set_bootstrap(&[&ra.addr])?;
    let mut rb: Running = b.start(&[])?;
    let out = tmp.path().join("out.bin");
    get_json(b, &root, &out)?;
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    // B now holds it and announces it.
    let listed = b.run(&["ls", "--json"])?.json()?;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(rb.stop()?, Some(0));
    assert!(!b.dir.join("mycel.sock").exists());
    drop(ra);
    Ok(())
}

#[test]
fn mdns_finds_members_without_bootstrap_addresses() -> Result<()> {
    // A and B know no address of each other: with mDNS on they find each other and B fetches
    // A's object; C, a non-member that also runs mDNS, is discovered but gets nothing.
    let _s = serial();
    let nodes = mesh(2)?;
    let (a, b) = (&nodes[0].0, &nodes[1].0);
    let (c, _) = Node::mesh(&[])?;
    for n in [a, b, &c] {
        n.set_config("mdns", "true")?;
        // mDNS runs on the machine's multicast interfaces, so listen on them too.
        n.set_config("listen", "[\"/ip4/0.0.0.0/udp/0/quic-v1\"]")?;
    }
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    fs::write(&src, random_bytes(36, 2 << 20))?;
    let _ra = a.start(&[])?;
    let root = add(a, &src)?;
    let _rb = b.start(&[])?;
    let _rc = c.start(&[])?;
    wait_for(60, "B to discover A by mDNS", || {
        let peers = b.run(&["peers", "--json"]).ok()?.text();
        peers.contains(&nodes[0].1).then_some(())
    })?;
    let out = tmp.path().join("out.bin");
    get_json(b, &root, &out)?;
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    let denied =
        c.run(&["get", "--timeout", "5", &root, tmp.path().join("c.bin").to_str().unwrap()])?;
    assert_ne!(denied.code, 0, "a non-member found by mDNS gets nothing");
    Ok(())
}

fn peers_of(node: &Node) -> Vec<String> {
    node.run(&["peers", "--json"])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| {
            v.as_array().map(|a| {
                a.iter().filter_map(|p| p["peer_id"].as_str().map(str::to_string)).collect()
            })
        })
        .unwrap_or_default()
}

#[test]
fn losing_the_only_bootstrap_node_mid_transfer_does_not_cut_the_mesh() -> Result<()> {
    // Three nodes with static members, each given only A's address. A 256 MiB object on A
    // and B (each uploading at most 20 MB/s, so the transfer is under way when A dies). A is
    // killed with -9 once C's get has started: C completes from B, byte-identical, because
    // it learned B's address (from B's announcements) without being told it. Then C is
    // restarted while A is still down: it reconnects to B from the addresses it kept.
    let _s = serial();
    let nodes = mesh(3)?;
    let ((a, _), (b, pb), (c, _)) = (&nodes[0], &nodes[1], &nodes[2]);
    for n in [a, b] {
        n.set_config("upload_bytes_per_sec", "20000000")?;
    }
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("obj.bin");
    fs::write(&src, random_bytes(35, 256 << 20))?;
    let mut ra = a.start(&[])?;
    b.set_bootstrap(&[&ra.addr])?;
    c.set_bootstrap(&[&ra.addr])?;
    let rb = b.start(&[])?;
    let mut rc = c.start(&[])?;
    let root = add(a, &src)?;
    assert_eq!(add(b, &src)?, root);
    let out = tmp.path().join("out.bin");
    let get = spawn_get(c, &root, &out)?;
    wait_for(60, "C's get under way", || fetching_done(c).filter(|(d, _)| *d > 0))?;
    ra.kill9();
    let result = get.wait_with_output()?;
    anyhow::ensure!(
        result.status.success(),
        "get failed after A died: {}\n{}",
        String::from_utf8_lossy(&result.stderr),
        c.log()
    );
    assert_eq!(file_hash(&out)?, file_hash(&src)?);
    rc.stop()?;
    let _rc = c.start(&[])?;
    wait_for(60, "C reconnected to B", || peers_of(c).contains(pb).then_some(()))
        .with_context(|| c.log())?;
    drop(rb);
    Ok(())
}
