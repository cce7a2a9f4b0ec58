//! Pins, replication, pre-positioning, access control and the storage budget with real
//! daemons: 3 managers and 6 edges in two zones on 127.0.0.1.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use mycel_tests::{Node, Running, file_hash, mycel_bin, random_bytes, wait_for};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    crate::mesh::SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fast(node: &Node) -> Result<()> {
    // Nine daemons share two cores here: a 2 s election timeout rides out scheduling stalls.
    node.set_config("tick_ms", "100")?;
    node.set_config("election_ticks", "20")?;
    node.set_config("replication_interval_ms", "500")?;
    node.set_config("node_lost_ms", "4000")
}

fn token(node: &Node, args: &[&str]) -> Result<String> {
    let mut a = vec!["cluster", "token", "create", "--json"];
    a.extend_from_slice(args);
    Ok(node.ok(&a)?.json()?["token"].as_str().context("token")?.to_string())
}

fn voters(node: &Node) -> usize {
    node.run(&["cluster", "members", "--json"])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| v["members"].as_array().cloned())
        .map_or(0, |m| m.iter().filter(|x| x["raft"] == "leader" || x["raft"] == "voter").count())
}

fn members(node: &Node) -> usize {
    node.run(&["cluster", "members", "--json"])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| v["members"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn status(node: &Node, cid: &str) -> Option<serde_json::Value> {
    let r = node.run(&["pin", "status", cid, "--json"]).ok()?;
    (r.code == 0).then(|| r.json().ok()).flatten()
}

/// PeerIds of live edges holding `cid`, by the status JSON.
fn edge_holders(v: &serde_json::Value) -> BTreeSet<String> {
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["role"] == "edge" && n["state"] == "held" && n["alive"] == true)
        .filter_map(|n| n["peer_id"].as_str().map(str::to_string))
        .collect()
}

fn stat(node: &Node, key: &str) -> u64 {
    node.run(&["status", "--json"])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| v[key].as_u64())
        .unwrap_or(0)
}

struct Edge {
    node: Node,
    peer: String,
    zone: &'static str,
    running: Option<Running>,
}

#[test]
fn pins_replicate_preposition_obey_grants_and_budgets() -> Result<()> {
    let _serial = serial();
    mycel_tests::keeping_logs("pins", scenario)
}

#[allow(clippy::too_many_lines)] // one fleet, one story: building it is the slow part
fn scenario(root: &std::path::Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    // Managers; m1 serves slowly (2 MiB/s) so a transfer can be revoked mid-way.
    let (m1, _) = Node::mesh_in(root.join("m1"), &["--zone", "a"])?;
    fast(&m1)?;
    m1.set_config("upload_bytes_per_sec", "2097152")?;
    let _r1 = m1.start(&[])?;
    m1.ok(&["cluster", "init"])?;
    let mtok = token(&m1, &["--role", "manager", "--uses", "2", "--zone", "a"])?;
    let mut managers = Vec::new();
    for _ in 0..2 {
        let name = format!("m{}", managers.len() + 2);
        let (n, _) = Node::mesh_in(root.join(name), &["--zone", "a", "--join", &mtok])?;
        fast(&n)?;
        let r = n.start(&[])?;
        managers.push((n, r));
    }
    wait_for(60, "three voters", || (voters(&m1) == 3).then_some(()))?;
    // Six edges, three per zone. Edge a1 has a small budget and the tag `small`.
    let mut edges: Vec<Edge> = Vec::new();
    for zone in ["a", "b"] {
        let tok = token(&m1, &["--role", "edge", "--uses", "3", "--zone", zone])?;
        for i in 0..3 {
            let (node, peer) =
                Node::mesh_in(root.join(format!("e{zone}{i}")), &["--zone", zone, "--join", &tok])?;
            fast(&node)?;
            if zone == "a" && i == 0 {
                node.set_config("tags", "[\"small\"]")?;
                node.set_config("capacity_bytes", "16777216")?;
                node.set_config("high_watermark_pct", "60")?;
                node.set_config("low_watermark_pct", "40")?;
            }
            let running = Some(node.start(&[])?);
            edges.push(Edge { node, peer, zone, running });
        }
    }
    wait_for(90, "nine members", || (members(&m1) == 9).then_some(()))?;

    // 1. replicas 3: exactly three edges hold it, in both zones.
    let f1 = tmp.path().join("f1");
    std::fs::write(&f1, random_bytes(1, 4 << 20))?;
    let c1 =
        m1.add(&f1, &["--pin", "--replicas", "3"])?["root"].as_str().context("root")?.to_string();
    let held = wait_for(90, "three replicas", || {
        let v = status(&m1, &c1)?;
        let h = edge_holders(&v);
        (h.len() == 3 && v["replicas"] == 3).then_some(h)
    })?;
    let zones: BTreeSet<&str> =
        edges.iter().filter(|e| held.contains(&e.peer)).map(|e| e.zone).collect();
    assert_eq!(zones.len(), 2, "replicas span both zones");
    std::thread::sleep(Duration::from_secs(3));
    let v = status(&m1, &c1).context("status")?;
    assert_eq!(edge_holders(&v), held, "no extra copies: {v}");

    // 2. kill -9 a holder: a third copy is back on another live edge.
    // Not edge a1: it has a part to play in the budget check below.
    let victim = edges.iter().skip(1).position(|e| held.contains(&e.peer)).context("a holder")? + 1;
    // Taken out of `running`, so the steps below count it as down.
    edges[victim].running.take().context("running")?.kill9();
    let lost = edges[victim].peer.clone();
    let again = wait_for(90, "a third replica after the loss", || {
        let v = status(&m1, &c1)?;
        let h = edge_holders(&v);
        (h.len() == 3 && !h.contains(&lost)).then_some(h)
    })?;
    assert_eq!(again.difference(&held).count(), 1, "one new copy, the others kept");

    // 3. pre-position to zone b by a deadline: every live zone-b edge holds it, and it is met.
    let f2 = tmp.path().join("f2");
    std::fs::write(&f2, random_bytes(2, 1 << 20))?;
    let c2 = m1.add(&f2, &[])?["root"].as_str().context("root")?.to_string();
    m1.ok(&["pin", "add", &c2, "--preposition", "b", "--by", "+10m"])?;
    let live_b: BTreeSet<String> = edges
        .iter()
        .filter(|e| e.zone == "b" && e.running.is_some())
        .map(|e| e.peer.clone())
        .collect();
    wait_for(90, "pre-position to zone b", || {
        let v = status(&m1, &c2)?;
        (live_b.is_subset(&edge_holders(&v)) && v["deadline"] == "met").then_some(())
    })?;

    // 4. access: an object in namespace `secret`, readable by zone a only.
    m1.ok(&["grant", "add", "zone:a", "read", "secret"])?;
    let f3 = tmp.path().join("f3");
    std::fs::write(&f3, random_bytes(3, 2 << 20))?;
    let c3 = m1.add(&f3, &["--pin", "--namespace", "secret", "--replicas", "1"])?["root"]
        .as_str()
        .context("root")?
        .to_string();
    let outsider = edges.iter().find(|e| e.zone == "b" && e.running.is_some()).context("b edge")?;
    // Added under `secret` with no pin at all: the namespace governs reads from m1 at once
    // (it would otherwise be in `default`, readable by every member, until a pin commits).
    let f3a = tmp.path().join("f3a");
    std::fs::write(&f3a, random_bytes(33, 1 << 20))?;
    let c3a =
        m1.add(&f3a, &["--namespace", "secret"])?["root"].as_str().context("root")?.to_string();
    let out3a = tmp.path().join("out3a");
    let r =
        outsider.node.run(&["get", &c3a, out3a.to_str().context("utf-8")?, "--timeout", "20"])?;
    assert_ne!(r.code, 0, "an unpinned object added under secret is not readable");
    assert!(r.stderr.contains("no read grant on namespace secret"), "why: {}", r.stderr);
    assert!(!out3a.exists(), "nothing written");
    let out = tmp.path().join("out3");
    let before = stat(&outsider.node, "received_bytes");
    let r = outsider.node.run(&["get", &c3, out.to_str().context("utf-8")?, "--timeout", "20"])?;
    assert_ne!(r.code, 0, "read without a grant must fail");
    assert!(r.stderr.contains("no read grant"), "the refusal says why: {}", r.stderr);
    assert!(!out.exists(), "nothing written");
    assert_eq!(stat(&outsider.node, "received_bytes"), before, "0 bytes received");
    // Positive control: granted, the same request succeeds.
    m1.ok(&["grant", "add", &format!("member:{}", outsider.peer), "read", "secret"])?;
    wait_for(30, "the granted read", || {
        let r = outsider.node.run(&["get", &c3, out.to_str()?, "--timeout", "20"]).ok()?;
        (r.code == 0).then_some(())
    })?;
    assert_eq!(file_hash(&out)?, file_hash(&f3)?);
    // Granted, the unpinned one reads too (positive control).
    outsider.node.ok(&["get", &c3a, out3a.to_str().context("utf-8")?, "--timeout", "20"])?;
    assert_eq!(file_hash(&out3a)?, file_hash(&f3a)?);
    // The outsider's copy is served under `secret` too (m1 told it): another ungranted
    // zone-b edge gets it from neither holder.
    let third = edges
        .iter()
        .find(|e| e.zone == "b" && e.running.is_some() && e.peer != outsider.peer)
        .context("a second b edge")?;
    let out3b = tmp.path().join("out3b");
    let r = third.node.run(&["get", &c3a, out3b.to_str().context("utf-8")?, "--timeout", "20"])?;
    assert_ne!(r.code, 0, "a copy fetched by a granted member is not served as default");
    assert!(r.stderr.contains("no read grant on namespace secret"), "why: {}", r.stderr);

    // 5. a revocation stops a transfer under way (m1 uploads at 2 MiB/s: 24 MiB takes ~12 s).
    let f4 = tmp.path().join("f4");
    std::fs::write(&f4, random_bytes(4, 24 << 20))?;
    let c4 = m1.add(&f4, &[])?["root"].as_str().context("root")?.to_string();
    m1.ok(&["pin", "add", &c4, "--namespace", "secret", "--replicas", "1", "--zone", "zz"])?;
    let out4 = tmp.path().join("out4");
    let before = stat(&outsider.node, "received_bytes");
    let mut get = Command::new(mycel_bin())
        .args(["get", &c4, out4.to_str().context("utf-8")?, "--timeout", "60"])
        .env("MYCEL_DATA_DIR", &outsider.node.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_for(30, "the transfer to start", || {
        (stat(&outsider.node, "received_bytes") > before + (3 << 20)).then_some(())
    })?;
    m1.ok(&["grant", "rm", &format!("member:{}", outsider.peer), "read", "secret"])?;
    std::thread::sleep(Duration::from_secs(5));
    let at_5s = stat(&outsider.node, "received_bytes");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(stat(&outsider.node, "received_bytes"), at_5s, "no bytes 5 s after revocation");
    let status4 = get.wait()?;
    assert!(!status4.success(), "the revoked get fails");
    assert!(at_5s < before + (24 << 20), "the transfer did not finish");
    assert!(!out4.exists());

    // 6. budget: edge a1 (16 MiB, high 60 %) holds the `small` pin; cached fetches past the
    // high watermark are evicted, the pinned object never.
    let small = &edges[0];
    let f5 = tmp.path().join("f5");
    std::fs::write(&f5, random_bytes(5, 2 << 20))?;
    let c5 =
        m1.add(&f5, &["--pin", "--tag", "small"])?["root"].as_str().context("root")?.to_string();
    wait_for(60, "the small pin on a1", || {
        edge_holders(&status(&m1, &c5)?).contains(&small.peer).then_some(())
    })?;
    for seed in 10..13 {
        let f = tmp.path().join(format!("cache{seed}"));
        std::fs::write(&f, random_bytes(seed, 4 << 20))?;
        let c = m1.add(&f, &[])?["root"].as_str().context("root")?.to_string();
        let o = tmp.path().join(format!("cache{seed}.out"));
        small.node.ok(&["get", &c, o.to_str().context("utf-8")?, "--timeout", "60"])?;
    }
    wait_for(60, "an eviction on a1", || (stat(&small.node, "evictions") > 0).then_some(()))?;
    let ls = small.node.ok(&["ls", "--json"])?.text();
    assert!(ls.contains(&c5), "the pinned object stays: {ls}");
    let out5 = tmp.path().join("out5");
    small.node.ok(&["get", &c5, out5.to_str().context("utf-8")?])?;
    assert_eq!(file_hash(&out5)?, file_hash(&f5)?);
    drop(managers);
    Ok(())
}
