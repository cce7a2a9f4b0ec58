//! Topology files with real daemons: 3 managers and 5 routers on 127.0.0.1, the documents in
//! `configs/topologies/`. Checks that a proposal becomes active and every router's file is
//! byte for byte what `mycel get CID --format F` gives; that unauthorised and schema-invalid
//! proposals exit with their codes and pass once granted or fixed; that of two proposals on
//! one base exactly one stages and the other exits "stale base" (and stages with --force);
//! that a rollback restores the earlier bytes everywhere; that a failing hook restores the
//! previous file; that a canary whose hook fails is rolled back; and that a router stopped,
//! or frozen (SIGSTOP), during an activation is on the active version within seconds of
//! coming back. A second, smaller fleet in network namespaces has a router's link cut
//! (`ip link set eth0 down`) during an activation and healed.
//! Runs serially with the other fleet tests (two cores), with 100 ms Raft ticks and
//! generous deadlines.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use mycel_tests::{Netns, Node, Running, file_hash, mycel_bin};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    crate::mesh::SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `mycel_tests::wait_for`, polling every 500 ms: most checks here start a `mycel` process,
/// and the daemons need the two cores more.
fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn fast(node: &Node) -> Result<()> {
    node.set_config("tick_ms", "100")?;
    node.set_config("election_ticks", "20")?;
    // Every gossip message costs each receiver a signature check, slow in a debug build:
    // announcing every 2 s rather than 0.5 s leaves the cores to the quorum.
    node.set_config("announce_period_ms", "2000")?;
    node.set_config("node_lost_ms", "6000")
}

fn token(node: &Node, args: &[&str]) -> Result<String> {
    let mut a = vec!["cluster", "token", "create", "--json"];
    a.extend_from_slice(args);
    Ok(node.ok(&a)?.json()?["token"].as_str().context("token")?.to_string())
}

fn members(node: &Node) -> Option<serde_json::Value> {
    let r = node.run(&["cluster", "members", "--json"]).ok()?;
    (r.code == 0).then(|| r.json().ok()).flatten()
}

fn voters(node: &Node) -> usize {
    members(node)
        .and_then(|v| v["members"].as_array().cloned())
        .map_or(0, |m| m.iter().filter(|x| x["raft"] == "leader" || x["raft"] == "voter").count())
}

/// Members subscribed to `name` (tag `topology:NAME`), by the committed state.
fn subscribed(node: &Node, name: &str) -> usize {
    let tag = format!("topology:{name}");
    members(node).and_then(|v| v["members"].as_array().cloned()).map_or(0, |m| {
        m.iter()
            .filter(|x| x["tags"].as_array().is_some_and(|t| t.iter().any(|t| t == tag.as_str())))
            .count()
    })
}

fn history(node: &Node, name: &str) -> Option<serde_json::Value> {
    let r = node.run(&["topology", "history", name, "--json"]).ok()?;
    (r.code == 0).then(|| r.json().ok()).flatten()
}

fn active(node: &Node, name: &str) -> Option<u64> {
    history(node, name)?["active"].as_u64()
}

fn version_state(node: &Node, name: &str, version: u64) -> Option<String> {
    let h = history(node, name)?;
    let v = h["versions"].as_array()?.iter().find(|v| v["version"] == version)?.clone();
    v["state"].as_str().map(str::to_string)
}

struct Router {
    node: Node,
    peer: String,
    running: Option<Running>,
}

impl Router {
    fn out(&self, name: &str, ext: &str) -> PathBuf {
        self.node.dir.join(format!("{name}.{ext}"))
    }

    fn fail_marker(&self) -> PathBuf {
        self.node.dir.join("fail-hooks")
    }

    fn hash(&self, name: &str, ext: &str) -> Option<String> {
        file_hash(&self.out(name, ext)).ok()
    }
}

/// The bytes `mycel get CID --format F` gives for `name` version `version`, hashed.
fn expected_hash(m: &Node, tmp: &Path, name: &str, version: u64, format: &str) -> Result<String> {
    let h = history(m, name).context("history")?;
    let cid = h["versions"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["version"] == version))
        .and_then(|v| v["cid"].as_str())
        .with_context(|| format!("{name} version {version} in {h}"))?
        .to_string();
    let out = tmp.join(format!("{name}-{version}.{format}"));
    let _ = std::fs::remove_file(&out);
    m.ok(&["get", &cid, out.to_str().context("utf-8")?, "--format", format])?;
    file_hash(&out)
}

/// Waits until every router in `which` holds `hash` at its output for `name`.
fn wait_files(
    routers: &[Router],
    which: &[usize],
    name: &str,
    ext: &str,
    hash: &str,
    secs: u64,
) -> Result<()> {
    wait_for(secs, &format!("{name} {hash:.8} on routers {which:?}"), || {
        which.iter().all(|&i| routers[i].hash(name, ext).as_deref() == Some(hash)).then_some(())
    })
}

/// Whether a command failed only because no quorum answered in time (two shared cores
/// sometimes leave the managers without a leader for a while).
fn no_quorum(r: &mycel_tests::Run) -> bool {
    r.code == 1 && r.stderr.contains("no quorum answered")
}

/// Runs a quorum command, again while no quorum answers.
fn quorum(node: &Node, args: &[&str]) -> Result<mycel_tests::Run> {
    for _ in 0..6 {
        let r = node.run(args)?;
        if !no_quorum(&r) {
            return Ok(r);
        }
        eprintln!("no quorum for {args:?}; again");
    }
    bail!("no quorum answered {args:?} six times")
}

fn quorum_ok(node: &Node, args: &[&str]) -> Result<mycel_tests::Run> {
    let r = quorum(node, args)?;
    anyhow::ensure!(r.code == 0, "mycel {args:?} exited {}: {}", r.code, r.stderr);
    Ok(r)
}

/// Proposes; a proposal that timed out and committed later makes the retry fail as
/// "already has this root", which counts as staged. Returns the exit code and the version
/// (for exit 0).
fn propose(
    node: &Node,
    name: &str,
    file: &Path,
    extra: &[&str],
) -> Result<(i32, Option<u64>, String)> {
    let mut args = vec!["topology", "propose", name, file.to_str().context("utf-8")?, "--json"];
    args.extend_from_slice(extra);
    let mut timed_out = false;
    for _ in 0..6 {
        let r = node.run(&args)?;
        if no_quorum(&r) {
            timed_out = true;
            eprintln!("no quorum for {args:?}; again");
            continue;
        }
        if r.code == 0 {
            return Ok((0, r.json()?["version"].as_u64(), r.stderr));
        }
        if timed_out {
            // The timed-out attempt may have been staged after all: then the retry is
            // refused (stale base, or the same root as the latest), and history shows it.
            let root = node.add(file, &["--kind", "topology"])?["root"]
                .as_str()
                .context("root")?
                .to_string();
            let staged = history(node, name).and_then(|h| {
                h["versions"]
                    .as_array()?
                    .iter()
                    .find(|v| v["cid"] == root.as_str())
                    .and_then(|v| v["version"].as_u64())
            });
            if staged.is_some() {
                return Ok((0, staged, r.stderr));
            }
        }
        return Ok((r.code, None, r.stderr));
    }
    bail!("no quorum answered {args:?} six times")
}

/// A copy of backbone.json with one link metric changed (a new version of the same graph).
fn backbone_variant(tmp: &Path, metric: u32) -> Result<PathBuf> {
    let text = std::fs::read_to_string(configs().join("backbone.json"))?;
    let changed = text.replacen("\"metric\": 10,", &format!("\"metric\": {metric},"), 1);
    anyhow::ensure!(changed != text || metric == 10, "backbone.json has no metric 10");
    let path = tmp.join(format!("backbone-{metric}.json"));
    std::fs::write(&path, changed)?;
    Ok(path)
}

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/topologies")
}

#[test]
fn topology_files_stage_activate_apply_and_roll_back() -> Result<()> {
    let _serial = serial();
    let started = std::time::Instant::now();
    let result = mycel_tests::keeping_logs("topology", scenario);
    eprintln!("topology scenario took {:.0} s", started.elapsed().as_secs_f64());
    result
}

#[allow(clippy::too_many_lines)] // one fleet, one story: building it is the slow part
fn scenario(root: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tmp = tmp.path();
    // Three managers.
    let (m1, _) = Node::mesh_in(root.join("m1"), &["--zone", "a"])?;
    fast(&m1)?;
    let _r1 = m1.start(&[])?;
    m1.ok(&["cluster", "init"])?;
    let mtok = token(&m1, &["--role", "manager", "--uses", "2", "--zone", "a"])?;
    let mut managers = Vec::new();
    for i in 2..=3 {
        let (n, _) = Node::mesh_in(root.join(format!("m{i}")), &["--zone", "a", "--join", &mtok])?;
        fast(&n)?;
        let r = n.start(&[])?;
        managers.push((n, r));
    }
    wait_for(240, "three voters", || (voters(&m1) == 3).then_some(()))?;
    // Five routers watching three names from their config files; router 0 is the canary.
    // Each hook fails while the router's marker file exists.
    let rtok = token(&m1, &["--role", "router", "--uses", "5", "--zone", "b"])?;
    let mut routers: Vec<Router> = Vec::new();
    for i in 0..5 {
        let dir = root.join(format!("r{i}"));
        let (node, peer) = Node::mesh_in(dir.clone(), &["--zone", "b", "--join", &rtok])?;
        fast(&node)?;
        if i == 0 {
            node.set_config("tags", "[\"canary\"]")?;
        }
        let fail = dir.join("fail-hooks");
        let mut config = std::fs::read_to_string(dir.join("config.toml"))?;
        for (name, ext) in [("backbone", "json"), ("lab", "yaml"), ("policy", "toml")] {
            config += &format!(
                "\n[[topology.watch]]\nname = \"{name}\"\nout = \"{}\"\nexec = \"test ! -e {} && echo applied $MYCEL_TOPOLOGY_NAME $MYCEL_TOPOLOGY_VERSION\"\nhook_timeout_ms = 10000\n",
                dir.join(format!("{name}.{ext}")).display(),
                fail.display()
            );
        }
        std::fs::write(dir.join("config.toml"), config)?;
        let running = Some(node.start(&[])?);
        routers.push(Router { node, peer, running });
    }
    wait_for(300, "five routers subscribed to three names", || {
        ["backbone", "lab", "policy"].iter().all(|n| subscribed(&m1, n) == 5).then_some(())
    })?;
    let all: Vec<usize> = (0..5).collect();

    // 1. A proposal from a manager becomes active; every router's file is what `get
    //    --format` gives, in each router's format. Three realistic documents.
    let backbone = configs().join("backbone.json");
    let (code, version, err) = propose(&m1, "backbone", &backbone, &[])?;
    anyhow::ensure!(code == 0 && version == Some(1), "propose backbone: {code} {version:?} {err}");
    for (name, file) in [("lab", "lab.yaml"), ("policy", "routing-policy.toml")] {
        let (code, _, err) = propose(&m1, name, &configs().join(file), &[])?;
        anyhow::ensure!(code == 0, "propose {name}: {code} {err}");
    }
    wait_for(120, "backbone, lab and policy active", || {
        ["backbone", "lab", "policy"].iter().all(|n| active(&m1, n) == Some(1)).then_some(())
    })?;
    let b1 = expected_hash(&m1, tmp, "backbone", 1, "json")?;
    wait_files(&routers, &all, "backbone", "json", &b1, 60)?;
    let lab = expected_hash(&m1, tmp, "lab", 1, "yaml")?;
    wait_files(&routers, &all, "lab", "yaml", &lab, 60)?;
    let pol = expected_hash(&m1, tmp, "policy", 1, "toml")?;
    wait_files(&routers, &all, "policy", "toml", &pol, 60)?;
    // show --format gives the same bytes; show --source gives the file as written.
    let shown = m1.ok(&["topology", "show", "lab", "--format", "yaml"])?.stdout;
    anyhow::ensure!(blake3::hash(&shown).to_hex().to_string() == lab, "show --format yaml");
    let source = m1.ok(&["topology", "show", "lab", "--source"])?.stdout;
    anyhow::ensure!(source == std::fs::read(configs().join("lab.yaml"))?, "show --source");
    // A router holds only the canonical form: it fetches the source from the proposer.
    let source = routers[3].node.ok(&["topology", "show", "lab", "--source"])?.stdout;
    anyhow::ensure!(source == std::fs::read(configs().join("lab.yaml"))?, "router show --source");
    // Status on a manager: every router in sync on version 1.
    wait_for(30, "status: five routers in sync", || {
        let v = m1.run(&["topology", "status", "backbone", "--json"]).ok()?.json().ok()?;
        let routers = v["routers"].as_array()?;
        (routers.len() == 5
            && routers.iter().all(|r| r["applied_version"] == 1 && r["drift"] == "in sync"))
        .then_some(())
    })?;

    // 2. Unauthorised: a router without publish is refused (11); granted, the same passes.
    let v2 = backbone_variant(tmp, 11)?;
    let (code, _, err) = propose(&routers[1].node, "backbone", &v2, &[])?;
    anyhow::ensure!(code == 11, "unauthorised: exit {code} {err}");
    quorum_ok(
        &m1,
        &["grant", "add", &format!("member:{}", routers[1].peer), "publish", "topology"],
    )?;
    let (code, _, err) = wait_for(120, "the granted proposal", || {
        let r = propose(&routers[1].node, "backbone", &v2, &[]).ok()?;
        (r.0 != 11).then_some(r)
    })?;
    anyhow::ensure!(code == 0, "granted: exit {code} {err}");
    wait_for(120, "backbone 2 active", || (active(&m1, "backbone") == Some(2)).then_some(()))?;
    let b2 = expected_hash(&m1, tmp, "backbone", 2, "json")?;
    wait_files(&routers, &all, "backbone", "json", &b2, 60)?;
    let d = m1.ok(&["topology", "diff", "backbone", "1", "2", "--json"])?.json()?;
    anyhow::ensure!(
        d["paths"].as_array().is_some_and(|p| p.len() == 1 && p[0]["path"] == "/links/0/metric"),
        "diff 1 2: {d}"
    );

    // 3. Schema: a document with a string ASN is refused (12) naming the path; fixed, it
    //    passes.
    let schema = configs().join("backbone.schema.json");
    quorum_ok(&m1, &["topology", "schema", "set", "backbone", schema.to_str().context("utf-8")?])?;
    let text = std::fs::read_to_string(configs().join("backbone.json"))?;
    let broken = tmp.join("broken.json");
    std::fs::write(
        &broken,
        text.replacen("\"asn\": 64512", "\"asn\": \"64512\"", 1).replacen(
            "\"metric\": 10,",
            "\"metric\": 12,",
            1,
        ),
    )?;
    let (code, _, err) = propose(&m1, "backbone", &broken, &[])?;
    anyhow::ensure!(code == 12 && err.contains("/routers/0/asn"), "schema: exit {code} {err}");
    let fixed = backbone_variant(tmp, 12)?;
    let (code, _, err) = propose(&m1, "backbone", &fixed, &[])?;
    anyhow::ensure!(code == 0, "fixed: exit {code} {err}");
    wait_for(120, "backbone 3 active", || (active(&m1, "backbone") == Some(3)).then_some(()))?;

    // 4. Two proposals on base 3 at once: exactly one becomes 4, the other exits 10; forced,
    //    it becomes 5.
    let a = backbone_variant(tmp, 13)?;
    let b = backbone_variant(tmp, 14)?;
    let spawn = |node: &Node, file: &Path| -> Result<std::process::Child> {
        Ok(Command::new(mycel_bin())
            .args([
                "topology",
                "propose",
                "backbone",
                file.to_str().context("utf-8")?,
                "--base",
                "3",
                "--json",
            ])
            .env("MYCEL_DATA_DIR", &node.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    };
    let ca = spawn(&m1, &a)?;
    let cb = spawn(&routers[1].node, &b)?;
    let (oa, ob) = (ca.wait_with_output()?, cb.wait_with_output()?);
    let codes = (oa.status.code(), ob.status.code());
    let timed_out = |o: &std::process::Output| {
        o.status.code() == Some(1)
            && String::from_utf8_lossy(&o.stderr).contains("no quorum answered")
    };
    let (loser_node, loser_file) = match codes {
        (Some(0), Some(10)) => (&routers[1].node, &b),
        (Some(10), Some(0)) => (&m1, &a),
        // No quorum for a while: the log decides which one was staged as 4.
        _ if timed_out(&oa) || timed_out(&ob) => {
            let root = |f: &Path| -> Result<String> {
                let v = m1.add(f, &["--kind", "topology"])?;
                Ok(v["root"].as_str().context("root")?.to_string())
            };
            let (ra, rb) = (root(&a)?, root(&b)?);
            let fourth = wait_for(120, "version 4", || {
                let h = history(&m1, "backbone")?;
                h["versions"].as_array()?.iter().find(|v| v["version"] == 4)?["cid"]
                    .as_str()
                    .map(str::to_string)
            })?;
            anyhow::ensure!(fourth == ra || fourth == rb, "version 4 is neither proposal");
            if fourth == ra { (&routers[1].node, &b) } else { (&m1, &a) }
        }
        other => bail!(
            "concurrent proposals exited {other:?}: {} / {}",
            String::from_utf8_lossy(&oa.stderr),
            String::from_utf8_lossy(&ob.stderr)
        ),
    };
    let (code, version, err) =
        propose(loser_node, "backbone", loser_file, &["--base", "3", "--force"])?;
    anyhow::ensure!(code == 0 && version == Some(5), "forced: exit {code} {version:?} {err}");
    wait_for(120, "backbone 5 active", || (active(&m1, "backbone") == Some(5)).then_some(()))?;
    let b5 = expected_hash(&m1, tmp, "backbone", 5, "json")?;
    wait_files(&routers, &all, "backbone", "json", &b5, 60)?;

    // 5. Rollback: version 1 is active again and every router holds its bytes.
    quorum_ok(&m1, &["topology", "activate", "backbone", "--version", "1"])?;
    wait_files(&routers, &all, "backbone", "json", &b1, 60)?;
    anyhow::ensure!(version_state(&m1, "backbone", 5).as_deref() == Some("superseded"));

    // 6. A failing hook restores the previous file: router 2 keeps version 1's bytes while
    //    the others move to 6; its status says the hook failed.
    std::fs::write(routers[2].fail_marker(), b"")?;
    let v6 = backbone_variant(tmp, 16)?;
    let (code, _, err) = propose(&m1, "backbone", &v6, &[])?;
    anyhow::ensure!(code == 0, "propose 6: exit {code} {err}");
    wait_for(120, "backbone 6 active", || (active(&m1, "backbone") == Some(6)).then_some(()))?;
    let b6 = expected_hash(&m1, tmp, "backbone", 6, "json")?;
    wait_files(&routers, &[0, 1, 3, 4], "backbone", "json", &b6, 60)?;
    wait_for(30, "router 2's hook failure reported", || {
        let v = m1.run(&["topology", "status", "backbone", "--json"]).ok()?.json().ok()?;
        v["routers"]
            .as_array()?
            .iter()
            .any(|r| r["peer_id"] == routers[2].peer.as_str() && r["status"] == "hook failed")
            .then_some(())
    })?;
    anyhow::ensure!(
        routers[2].hash("backbone", "json").as_deref() == Some(b1.as_str()),
        "router 2 restored"
    );
    std::fs::remove_file(routers[2].fail_marker())?;

    // 7. Canary: router 0 (tag canary) takes version 7 first; its hook fails, so the leader
    //    rolls it back: 7 is rejected and every router holds version 6's bytes (router 2,
    //    whose last hook failed, still holds 1's).
    quorum_ok(
        &m1,
        &["topology", "canary", "backbone", "--subject", "tag:canary", "--fail-pct-max", "0"],
    )?;
    std::fs::write(routers[0].fail_marker(), b"")?;
    let v7 = backbone_variant(tmp, 17)?;
    let (code, _, err) = propose(&m1, "backbone", &v7, &[])?;
    anyhow::ensure!(code == 0, "propose 7: exit {code} {err}");
    wait_for(120, "version 7 rolled back", || {
        (version_state(&m1, "backbone", 7).as_deref() == Some("rejected")).then_some(())
    })?;
    anyhow::ensure!(active(&m1, "backbone") == Some(6), "6 stays active");
    wait_files(&routers, &[0, 1, 3, 4], "backbone", "json", &b6, 60)?;
    std::fs::remove_file(routers[0].fail_marker())?;
    // A canary whose hook succeeds is promoted everywhere.
    let v8 = backbone_variant(tmp, 18)?;
    let (code, _, err) = propose(&m1, "backbone", &v8, &[])?;
    anyhow::ensure!(code == 0, "propose 8: exit {code} {err}");
    wait_for(120, "backbone 8 active", || (active(&m1, "backbone") == Some(8)).then_some(()))?;
    let b8 = expected_hash(&m1, tmp, "backbone", 8, "json")?;
    wait_files(&routers, &all, "backbone", "json", &b8, 60)?;
    quorum_ok(&m1, &["topology", "canary", "backbone"])?;

    // 8. A router stopped during an activation: the others take version 9 (it does not
    //    count against the share while it is away); once it is back it is on version 9
    //    within seconds.
    routers[4].running.take().context("router 4 running")?.stop()?;
    let v9 = backbone_variant(tmp, 19)?;
    let (code, _, err) = propose(&m1, "backbone", &v9, &[])?;
    anyhow::ensure!(code == 0, "propose 9: exit {code} {err}");
    wait_for(120, "backbone 9 active", || (active(&m1, "backbone") == Some(9)).then_some(()))?;
    let b9 = expected_hash(&m1, tmp, "backbone", 9, "json")?;
    wait_files(&routers, &[0, 1, 2, 3], "backbone", "json", &b9, 60)?;
    anyhow::ensure!(
        routers[4].hash("backbone", "json").as_deref() == Some(b8.as_str()),
        "router 4 was away"
    );
    let back = std::time::Instant::now();
    routers[4].running = Some(routers[4].node.start(&[])?);
    wait_files(&routers, &[4], "backbone", "json", &b9, 60)?;
    eprintln!(
        "router 4 on the active version {:.1} s after its restart",
        back.elapsed().as_secs_f64()
    );

    // 8b. A router frozen (SIGSTOP: its connections go silent, as when its link is cut)
    //    while version 10 is staged and activated: once it runs again it catches up.
    let pid = routers[3].running.as_ref().and_then(Running::pid).context("router 3 pid")?;
    let signal = |sig: &str| -> Result<()> {
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status()?.success();
        anyhow::ensure!(ok, "kill {sig} {pid}");
        Ok(())
    };
    signal("-STOP")?;
    let v10 = backbone_variant(tmp, 20)?;
    let staged = propose(&m1, "backbone", &v10, &[]);
    let staged = match staged {
        Ok(s) => s,
        Err(e) => {
            signal("-CONT")?;
            return Err(e);
        }
    };
    let activated =
        wait_for(120, "backbone 10 active", || (active(&m1, "backbone") == Some(10)).then_some(()));
    if activated.is_err() {
        eprintln!("history: {:?}", history(&m1, "backbone"));
        let st = m1.run(&["topology", "status", "backbone", "--json"]).map(|r| r.text());
        eprintln!("status: {st:?}");
    }
    let b10 = expected_hash(&m1, tmp, "backbone", 10, "json");
    let thawed = std::time::Instant::now();
    signal("-CONT")?;
    anyhow::ensure!(staged.0 == 0, "propose 10: exit {} {}", staged.0, staged.2);
    activated?;
    let b10 = b10?;
    wait_files(&routers, &[0, 1, 2, 3, 4], "backbone", "json", &b10, 60)?;
    eprintln!(
        "router 3 on the active version {:.1} s after it ran again",
        thawed.elapsed().as_secs_f64()
    );

    // 9. The activation share is a policy: set, and refused when malformed.
    quorum_ok(&m1, &["topology", "policy", "backbone", "--share", "80%"])?;
    let r = m1.run(&["topology", "policy", "--share", "1.5"])?;
    anyhow::ensure!(r.code == 4, "bad share: exit {}", r.code);

    // 10. `topology watch --detach` on a manager subscribes it and writes the active lab
    //    version as JSON; `unwatch` ends the subscription.
    let m3 = &managers[1].0;
    let out = m3.dir.join("lab.json");
    quorum_ok(
        m3,
        &["topology", "watch", "lab", "--out", out.to_str().context("utf-8")?, "--detach"],
    )?;
    let lab_json = expected_hash(&m1, tmp, "lab", 1, "json")?;
    wait_for(60, "the watched lab file on m3", || {
        (file_hash(&out).ok().as_deref() == Some(lab_json.as_str())).then_some(())
    })?;
    wait_for(60, "m3 subscribed", || (subscribed(&m1, "lab") == 6).then_some(()))?;
    quorum_ok(m3, &["topology", "unwatch", "lab"])?;
    wait_for(60, "m3 unsubscribed", || (subscribed(&m1, "lab") == 5).then_some(()))?;
    drop(managers);
    Ok(())
}

/// A watch of `backbone` (written as JSON to `backbone.json` in the data directory) in
/// `node`'s config file.
fn watch_backbone(node: &Node) -> Result<()> {
    let path = node.dir.join("config.toml");
    let mut config = std::fs::read_to_string(&path)?;
    config += &format!(
        "\n[[topology.watch]]\nname = \"backbone\"\nout = \"{}\"\n",
        node.dir.join("backbone.json").display()
    );
    std::fs::write(path, config)?;
    Ok(())
}

#[test]
fn a_router_cut_off_during_an_activation_catches_up_once_its_link_is_up() -> Result<()> {
    let _serial = serial();
    mycel_tests::keeping_logs("topology-netns", cut_off)
}

/// One manager and two routers, each in a network namespace of its own on one bridge.
fn cut_off(root: &Path) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tmp = tmp.path();
    let mut net = Netns::new("mt")?;
    let quic = |a: &str| format!("/ip4/{a}/udp/0/quic-v1");
    net.host("m1", "10.213.0.1")?;
    let (m1, _) = Node::mesh_listening(root.join("m1"), &quic("10.213.0.1"), &["--zone", "a"])?;
    fast(&m1)?;
    let _r1 = m1.start_in(Some(&net.ns("m1")), &[])?;
    m1.ok(&["cluster", "init"])?;
    let rtok = token(&m1, &["--role", "router", "--uses", "2", "--zone", "b"])?;
    let mut routers = Vec::new();
    for i in 0..2 {
        let (host, addr) = (format!("r{i}"), format!("10.213.0.{}", 10 + i));
        net.host(&host, &addr)?;
        let (node, peer) = Node::mesh_listening(
            root.join(&host),
            &quic(&addr),
            &["--zone", "b", "--join", &rtok],
        )?;
        fast(&node)?;
        watch_backbone(&node)?;
        let running = Some(node.start_in(Some(&net.ns(&host)), &[])?);
        routers.push(Router { node, peer, running });
    }
    wait_for(120, "two routers subscribed", || (subscribed(&m1, "backbone") == 2).then_some(()))?;
    let (code, _, err) = propose(&m1, "backbone", &configs().join("backbone.json"), &[])?;
    anyhow::ensure!(code == 0, "propose 1: exit {code} {err}");
    wait_for(120, "backbone 1 active", || (active(&m1, "backbone") == Some(1)).then_some(()))?;
    let b1 = expected_hash(&m1, tmp, "backbone", 1, "json")?;
    wait_files(&routers, &[0, 1], "backbone", "json", &b1, 60)?;

    // Router 1's link goes down; version 2 is staged and activated without it.
    net.link("r1", false)?;
    let (code, _, err) = propose(&m1, "backbone", &backbone_variant(tmp, 21)?, &[])?;
    anyhow::ensure!(code == 0, "propose 2: exit {code} {err}");
    wait_for(120, "backbone 2 active", || (active(&m1, "backbone") == Some(2)).then_some(()))?;
    let b2 = expected_hash(&m1, tmp, "backbone", 2, "json")?;
    wait_files(&routers, &[0], "backbone", "json", &b2, 60)?;
    anyhow::ensure!(
        routers[1].hash("backbone", "json").as_deref() == Some(b1.as_str()),
        "router 1 was cut off, yet changed its file"
    );
    // Healed: it is on version 2 within seconds.
    let healed = std::time::Instant::now();
    net.link("r1", true)?;
    wait_files(&routers, &[1], "backbone", "json", &b2, 60)?;
    eprintln!(
        "router 1 on the active version {:.1} s after its link came up",
        healed.elapsed().as_secs_f64()
    );
    drop(routers);
    drop(net);
    Ok(())
}
