//! The management quorum with real daemons on 127.0.0.1: token joins, leader failure with
//! no acknowledged change lost, a full restart, edges following commits, and removal.
//! Runs serially with the mesh tests (they share the two cores), with 50 ms Raft ticks and
//! generous deadlines.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mycel_tests::{Node, Running, wait_for};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    crate::mesh::SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fast(node: &Node) -> Result<()> {
    node.set_config("tick_ms", "50")?;
    node.set_config("election_ticks", "10")?;
    node.set_config("grace_ms", "5000")
}

fn view(node: &Node) -> Option<serde_json::Value> {
    let r = node.run(&["cluster", "members", "--json"]).ok()?;
    (r.code == 0).then(|| r.json().ok()).flatten()
}

fn count(v: &serde_json::Value, raft: &str) -> usize {
    v["members"].as_array().map_or(0, |m| m.iter().filter(|x| x["raft"] == raft).count())
}

fn leader_peer(v: &serde_json::Value) -> Option<String> {
    v["members"].as_array()?.iter().find(|x| x["raft"] == "leader")?["peer_id"]
        .as_str()
        .map(str::to_string)
}

fn token(node: &Node, role: &str, uses: &str) -> Result<String> {
    let r = node.ok(&["cluster", "token", "create", "--role", role, "--uses", uses, "--json"])?;
    Ok(r.json()?["token"].as_str().context("token")?.to_string())
}

fn token_ids(node: &Node) -> Vec<String> {
    node.run(&["cluster", "token", "ls", "--json"])
        .ok()
        .and_then(|r| r.json().ok())
        .and_then(|v| v.as_array().cloned())
        .map(|a| a.iter().filter_map(|t| t["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

struct Fleet {
    nodes: Vec<(Node, String)>,
    running: Vec<Option<Running>>,
}

/// One manager inits the cluster; two more join with a manager token, two edges with an
/// edge token; returns once there are three voters.
fn fleet() -> Result<Fleet> {
    let (m1, p1) = Node::mesh(&[])?;
    fast(&m1)?;
    let r1 = m1.start(&[])?;
    m1.ok(&["cluster", "init", "--json"])?;
    let mtok = token(&m1, "manager", "2")?;
    let mut nodes = vec![(m1, p1)];
    let mut running = vec![Some(r1)];
    for _ in 0..2 {
        let (n, p) = Node::mesh(&["--join", &mtok])?;
        fast(&n)?;
        running.push(Some(n.start(&[])?));
        nodes.push((n, p));
    }
    wait_for(60, "three voters", || {
        view(&nodes[0].0).filter(|v| count(v, "leader") + count(v, "voter") == 3)
    })?;
    // An edge token made now names all three managers.
    let etok = token(&nodes[0].0, "edge", "2")?;
    for _ in 0..2 {
        let (n, p) = Node::mesh(&["--join", &etok])?;
        fast(&n)?;
        n.set_config("tags", "[\"manager-eligible\"]")?;
        running.push(Some(n.start(&[])?));
        nodes.push((n, p));
    }
    wait_for(60, "three voters and two edges", || {
        view(&nodes[0].0)
            .filter(|v| count(v, "leader") + count(v, "voter") == 3 && count(v, "none") == 2)
    })?;
    Ok(Fleet { nodes, running })
}

#[test]
fn leader_loss_loses_no_acknowledged_change_and_restarts_keep_state() -> Result<()> {
    // 3 managers + 2 edges: a change acknowledged before the leader is killed (-9) is in
    // the state the new leader serves; a new change commits; edges apply each commit
    // (p99 under 10 s); after stopping and restarting every node the state is intact.
    let _s = serial();
    let mut f = fleet()?;
    // Proposed on a follower (forwarded to the leader) and acknowledged once applied.
    let r = f.nodes[1].0.ok(&["cluster", "token", "create", "--role", "edge", "--json"])?.json()?;
    let before = r["id"].as_str().context("id")?.to_string();
    let acked = token_ids(&f.nodes[0].0);
    assert!(acked.contains(&before), "{acked:?}");
    let leader = leader_peer(&view(&f.nodes[0].0).context("view")?).context("a leader")?;
    let li = f.nodes.iter().position(|(_, p)| *p == leader).context("leader is a node")?;
    f.running[li].as_mut().context("running")?.kill9();
    let survivor = if li == 0 { 1 } else { 0 };
    let t0 = Instant::now();
    let new_leader = wait_for(30, "a new leader", || {
        view(&f.nodes[survivor].0).and_then(|v| leader_peer(&v)).filter(|l| *l != leader)
    })
    .map_err(|e| {
        let logs: Vec<String> = f.nodes.iter().map(|(n, _)| n.log()).collect();
        anyhow::anyhow!("{e}\n{}", logs.join("\n=====\n"))
    })?;
    eprintln!("new leader {new_leader} after {:?}", t0.elapsed());
    assert_eq!(token_ids(&f.nodes[survivor].0), acked, "acknowledged tokens survive");
    let _after = token(&f.nodes[survivor].0, "edge", "1")?;
    assert!(!before.is_empty());

    // Edges follow: time from commit to visible on an edge, 20 times.
    let edge = &f.nodes[3].0;
    let mut lags = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        token(&f.nodes[survivor].0, "router", "1")?;
        let want = token_ids(&f.nodes[survivor].0).len();
        wait_for(10, "the edge to apply the commit", || {
            (token_ids(edge).len() >= want).then_some(())
        })
        .map_err(|e| {
            let edge_view =
                edge.run(&["cluster", "members", "--json"]).map(|r| r.text()).unwrap_or_default();
            anyhow::anyhow!(
                "{e}: edge {:?} survivor {:?}\nEDGE VIEW {edge_view}\nEDGE LOG\n{}\nM1 LOG\n{}",
                token_ids(edge),
                token_ids(&f.nodes[survivor].0),
                edge.log(),
                f.nodes[0].0.log()
            )
        })?;
        lags.push(t.elapsed());
    }
    lags.sort();
    let p99 = lags[lags.len() - 1];
    eprintln!("edge apply lag p50 {:?} p99 {:?}", lags[lags.len() / 2], p99);
    assert!(p99 < Duration::from_secs(10));

    // Restart everything: the state is intact and a leader is elected again.
    let expected = token_ids(&f.nodes[survivor].0);
    // Operators run nodes on fixed ports: pin each node to the port it has now, so the
    // addresses the cluster committed stay valid across the restart.
    for ((n, _), r) in f.nodes.iter().zip(&f.running) {
        if let Some(r) = r {
            let addr = r.addr.split("/p2p/").next().unwrap_or_default().to_string();
            n.set_config("listen", &format!("[\"{addr}\"]"))?;
        }
    }
    for r in f.running.iter_mut().flatten() {
        r.stop()?;
    }
    let mut restarted = Vec::new();
    for (n, _) in &f.nodes {
        restarted.push(n.start(&[])?);
    }
    let v = wait_for(60, "a leader after the restart", || {
        view(&f.nodes[1].0).filter(|v| count(v, "leader") == 1)
    })?;
    assert_eq!(v["members"].as_array().map(Vec::len), Some(5));
    assert_eq!(token_ids(&f.nodes[1].0), expected);
    wait_for(20, "edges back on the latest state", || {
        (token_ids(&f.nodes[4].0) == expected).then_some(())
    })?;
    Ok(())
}

#[test]
fn a_removed_node_is_refused_and_a_fresh_join_is_admitted() -> Result<()> {
    // An edge removed from the cluster is disconnected and cannot reconnect; the same
    // machine with a new identity and a fresh token joins (the positive control).
    let _s = serial();
    let (m1, _) = Node::mesh(&[])?;
    fast(&m1)?;
    let _r1 = m1.start(&[])?;
    m1.ok(&["cluster", "init", "--json"])?;
    let tok = token(&m1, "edge", "1")?;
    let (e1, pe1) = Node::mesh(&["--join", &tok])?;
    let mut re1 = e1.start(&[])?;
    let connected = |n: &Node, p: &str| -> bool {
        n.run(&["peers", "--json"])
            .ok()
            .and_then(|r| r.json().ok())
            .is_some_and(|v| v.as_array().is_some_and(|a| a.iter().any(|x| x["peer_id"] == p)))
    };
    wait_for(30, "the edge to join", || {
        view(&m1).filter(|v| v["members"].as_array().is_some_and(|m| m.len() == 2))
    })?;
    m1.ok(&["cluster", "remove", &pe1])?;
    wait_for(15, "the removed edge to be disconnected", || (!connected(&m1, &pe1)).then_some(()))?;
    // It keeps trying (its bootstrap is the manager): it must stay out.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!connected(&m1, &pe1), "a removed node reconnected");
    re1.kill9();
    let fresh_tok = token(&m1, "edge", "1")?;
    let (e2, pe2) = Node::mesh(&["--join", &fresh_tok])?;
    let _re2 = e2.start(&[])?;
    wait_for(30, "the fresh node to join", || {
        view(&m1).filter(|v| {
            v["members"].as_array().is_some_and(|m| m.iter().any(|x| x["peer_id"] == pe2.as_str()))
        })
    })?;
    wait_for(15, "the fresh node to be connected", || connected(&m1, &pe2).then_some(()))?;
    Ok(())
}

#[test]
fn a_lost_manager_is_replaced_by_an_eligible_edge() -> Result<()> {
    // Grace 5 s: a manager killed for good stops being a voter within 30 s, a
    // manager-eligible edge becomes a voter, there are 3 voters again, and a change commits.
    let _s = serial();
    let mut f = fleet()?;
    let v = view(&f.nodes[0].0).context("view")?;
    let leader = leader_peer(&v).context("leader")?;
    // Kill a manager that is not the leader.
    let victim = (0..3).find(|i| f.nodes[*i].1 != leader).context("a follower manager")?;
    let lost = f.nodes[victim].1.clone();
    f.running[victim].as_mut().context("running")?.kill9();
    let survivor = (0..3).find(|i| *i != victim).context("survivor")?;
    let t0 = Instant::now();
    let healed = wait_for(30, "3 voters without the lost manager", || {
        view(&f.nodes[survivor].0).filter(|v| {
            let voters: Vec<&serde_json::Value> = v["members"]
                .as_array()
                .map(|m| {
                    m.iter().filter(|x| x["raft"] == "leader" || x["raft"] == "voter").collect()
                })
                .unwrap_or_default();
            voters.len() == 3 && voters.iter().all(|x| x["peer_id"] != lost.as_str())
        })
    })
    .map_err(|e| {
        let logs: Vec<String> = f.nodes.iter().map(|(n, _)| n.log()).collect();
        anyhow::anyhow!("{e}\n{}", logs.join("\n=====\n"))
    })?;
    eprintln!("healed after {:?}", t0.elapsed());
    let replaced_by_edge = healed["members"].as_array().is_some_and(|m| {
        m.iter().any(|x| {
            x["raft"] != "none"
                && (x["peer_id"] == f.nodes[3].1.as_str() || x["peer_id"] == f.nodes[4].1.as_str())
        })
    });
    assert!(replaced_by_edge, "{healed}");
    token(&f.nodes[survivor].0, "edge", "1")?;
    Ok(())
}

#[test]
fn recover_after_losing_a_majority() -> Result<()> {
    // 3 managers; two are killed for good. The survivor cannot commit (no quorum); after
    // `cluster recover --force-new-cluster` on the stopped survivor it leads alone, keeps the
    // committed state, and commits again.
    let _s = serial();
    let (m1, p1) = Node::mesh(&[])?;
    fast(&m1)?;
    let mut r1 = m1.start(&[])?;
    m1.ok(&["cluster", "init", "--json"])?;
    let mtok = token(&m1, "manager", "2")?;
    let mut others = Vec::new();
    for _ in 0..2 {
        let (n, _) = Node::mesh(&["--join", &mtok])?;
        fast(&n)?;
        let r = n.start(&[])?;
        others.push((n, r));
    }
    wait_for(60, "three voters", || {
        view(&m1).filter(|v| count(v, "leader") + count(v, "voter") == 3)
    })?;
    let kept = m1.ok(&["cluster", "token", "create", "--role", "edge", "--json"])?.json()?;
    let kept_id = kept["id"].as_str().context("id")?.to_string();
    for (_, r) in &mut others {
        r.kill9();
    }
    eprintln!("killed two managers");
    let refused = m1.run(&["cluster", "recover", "--force-new-cluster"])?;
    assert_ne!(refused.code, 0, "recover refuses while the daemon runs");
    eprintln!("stopping the survivor");
    r1.stop()?;
    eprintln!("recovering");
    let report = m1.ok(&["cluster", "recover", "--force-new-cluster", "--json"])?.json()?;
    assert_eq!(report["voters"], serde_json::json!([1]));
    let _r1 = m1.start(&[])?;
    eprintln!("restarted");
    wait_for(30, "the survivor to lead", || {
        view(&m1).and_then(|v| leader_peer(&v)).filter(|l| *l == p1)
    })?;
    assert!(token_ids(&m1).contains(&kept_id), "committed state kept");
    token(&m1, "edge", "1")?;
    Ok(())
}
