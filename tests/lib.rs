//! Harness for the integration tests: finds the built `mycel` binary and runs it against
//! throwaway data directories.
//!
//! The binary lives in another package, so `CARGO_BIN_EXE_mycel` is not available here:
//! `.ci/run` builds it first, and [`mycel_bin`] finds it beside the test executable (or
//! through `MYCEL_BIN`).

#![allow(clippy::disallowed_methods)] // a test harness: it spawns processes and threads

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The `mycel` binary under test.
///
/// # Panics
/// If it has not been built: run `cargo build -p mycel-node` (or `.ci/run`) first.
pub fn mycel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MYCEL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> -> target/<profile>/mycel
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile directory");
    let bin = profile_dir.join("mycel");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build -p mycel-node` (or run .ci/run)",
        bin.display()
    );
    bin
}

/// A node's data directory with helpers to run commands against it.
#[derive(Debug)]
pub struct Node {
    /// The data directory.
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// One finished command.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Stdout parsed as JSON.
    ///
    /// # Errors
    /// If stdout is not JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.stdout).with_context(|| {
            format!("stdout is not JSON: {}", String::from_utf8_lossy(&self.stdout))
        })
    }

    /// Stdout as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: o.stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Node {
    /// A fresh, initialised node in a temporary directory.
    ///
    /// # Errors
    /// If `mycel init` fails.
    pub fn new() -> Result<Node> {
        let tmp = tempfile::tempdir()?;
        let mut node = Node { dir: tmp.path().join("node"), _tmp: None };
        node._tmp = Some(tmp);
        node.ok(&["init"])?;
        Ok(node)
    }

    /// A fresh, initialised node at `dir` (kept after the test).
    ///
    /// # Errors
    /// If `mycel init` fails.
    pub fn at(dir: PathBuf) -> Result<Node> {
        let node = Node { dir, _tmp: None };
        node.ok(&["init"])?;
        Ok(node)
    }

    /// Runs `mycel ARGS` against this node.
    ///
    /// # Errors
    /// If the process cannot be started.
    pub fn run(&self, args: &[&str]) -> Result<Run> {
        self.run_with_stdin(args, None)
    }

    /// Runs with bytes on stdin.
    ///
    /// # Errors
    /// If the process cannot be started.
    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Run> {
        use std::io::Write;
        let mut cmd = Command::new(mycel_bin());
        cmd.args(args)
            .env("MYCEL_DATA_DIR", &self.dir)
            .env_remove("RUST_LOG")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning mycel")?;
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(bytes)?;
        }
        Ok(child.wait_with_output()?.into())
    }

    /// Runs and requires exit code 0.
    ///
    /// # Errors
    /// If the command fails, with its stderr.
    pub fn ok(&self, args: &[&str]) -> Result<Run> {
        let run = self.run(args)?;
        if run.code != 0 {
            bail!("mycel {args:?} exited {}: {}", run.code, run.stderr);
        }
        Ok(run)
    }

    /// `mycel add --json PATH [extra]`, returning the report.
    ///
    /// # Errors
    /// If the add fails.
    pub fn add(&self, path: &Path, extra: &[&str]) -> Result<serde_json::Value> {
        let p = path.to_str().context("utf-8 path")?;
        let mut args = vec!["add", "--json", p];
        args.extend_from_slice(extra);
        self.ok(&args)?.json()
    }
}

impl Node {
    /// A fresh node for a mesh test: listens on 127.0.0.1 (UDP port chosen by the OS),
    /// announces every 500 ms, with the given extra `init` arguments.
    ///
    /// # Errors
    /// If `mycel init` fails.
    pub fn mesh(extra: &[&str]) -> Result<(Node, String)> {
        let tmp = tempfile::tempdir()?;
        let (mut node, peer) = Node::mesh_in(tmp.path().join("node"), extra)?;
        node._tmp = Some(tmp);
        Ok((node, peer))
    }

    /// [`Node::mesh`] in `dir`, which outlives the node (for keeping logs of failed tests).
    ///
    /// # Errors
    /// If `mycel init` fails.
    pub fn mesh_in(dir: PathBuf, extra: &[&str]) -> Result<(Node, String)> {
        Node::mesh_listening(dir, "/ip4/127.0.0.1/udp/0/quic-v1", extra)
    }

    /// [`Node::mesh_in`] listening on `listen` (a host in a [`Netns`] listens on its own
    /// address).
    ///
    /// # Errors
    /// If `mycel init` fails.
    pub fn mesh_listening(dir: PathBuf, listen: &str, extra: &[&str]) -> Result<(Node, String)> {
        let node = Node { dir, _tmp: None };
        let mut args = vec!["init", "--json", "--listen", listen];
        args.extend_from_slice(extra);
        let out = node.ok(&args)?.json()?;
        let peer = out["peer_id"].as_str().context("peer_id")?.to_string();
        node.set_config("announce_period_ms", "500")?;
        node.set_config("request_timeout_ms", "3000")?;
        Ok((node, peer))
    }

    /// Sets `key = value` (the first line defining `key`) in config.toml.
    ///
    /// # Errors
    /// If the key is not in the file.
    pub fn set_config(&self, key: &str, value: &str) -> Result<()> {
        let path = self.dir.join("config.toml");
        let text = std::fs::read_to_string(&path)?;
        let mut done = false;
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                if !done && l.trim_start().starts_with(&format!("{key} =")) {
                    done = true;
                    format!("{key} = {value}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        anyhow::ensure!(done, "{key} not in {}", path.display());
        std::fs::write(&path, lines.join("\n") + "\n")?;
        Ok(())
    }

    /// Sets `[cluster] members`.
    ///
    /// # Errors
    /// As [`Node::set_config`].
    pub fn set_members(&self, peers: &[&str]) -> Result<()> {
        let list: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
        self.set_config("members", &format!("[{}]", list.join(", ")))
    }

    /// Sets `[node] bootstrap`.
    ///
    /// # Errors
    /// As [`Node::set_config`].
    pub fn set_bootstrap(&self, addrs: &[&str]) -> Result<()> {
        let list: Vec<String> = addrs.iter().map(|p| format!("\"{p}\"")).collect();
        self.set_config("bootstrap", &format!("[{}]", list.join(", ")))
    }

    /// Starts `mycel run ARGS` and waits (up to 30 s) until it listens.
    ///
    /// # Errors
    /// If it exits or never becomes ready.
    pub fn start(&self, extra: &[&str]) -> Result<Running> {
        self.start_in(None, extra)
    }

    /// [`Node::start`] inside the network namespace `netns` when given (`ip netns exec`
    /// execs the daemon, so the process is still the daemon; the CLI reaches it through the
    /// socket in its data directory from any namespace).
    ///
    /// # Errors
    /// As [`Node::start`].
    pub fn start_in(&self, netns: Option<&str>, extra: &[&str]) -> Result<Running> {
        let log = std::fs::File::create(self.dir.join("daemon.log"))?;
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(mycel_bin());
                c
            }
            None => Command::new(mycel_bin()),
        };
        let child = cmd
            .args(&args)
            .env("MYCEL_DATA_DIR", &self.dir)
            .env("RUST_LOG", "info,mycel_node=debug,libp2p_gossipsub=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning mycel run")?;
        let mut running = Running { child: Some(child), addr: String::new() };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = running.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
                bail!("daemon exited with {status}: {log}");
            }
            if let Ok(r) = self.run(&["id", "--json"])
                && r.code == 0
                && let Ok(v) = r.json()
                && let Some(a) =
                    v["listen_addrs"].as_array().and_then(|a| a.first()).and_then(|a| a.as_str())
            {
                running.addr = a.to_string();
                return Ok(running);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "daemon not ready within 30 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }
}

/// Runs `scenario` on a directory of node data directories; if it fails, copies each node's
/// `daemon.log` to `$TMPDIR/mycel-NAME-logs/NODE.log` for the post-mortem (the data
/// directories go with the test).
///
/// # Errors
/// The scenario's error.
pub fn keeping_logs(name: &str, scenario: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let root = tempfile::tempdir()?;
    let result = scenario(root.path());
    if result.is_err() {
        let dir = std::env::temp_dir().join(format!("mycel-{name}-logs"));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        for entry in std::fs::read_dir(root.path())?.flatten() {
            let to = dir.join(format!("{}.log", entry.file_name().to_string_lossy()));
            let _ = std::fs::copy(entry.path().join("daemon.log"), to);
        }
        eprintln!("daemon logs kept in {}", dir.display());
    }
    result
}

/// A running daemon; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Running {
    child: Option<std::process::Child>,
    /// Its first listen address, ending in /p2p/PEER_ID.
    pub addr: String,
}

impl Running {
    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns its exit code.
    ///
    /// # Errors
    /// If it does not exit within 20 s.
    pub fn stop(&mut self) -> Result<Option<i32>> {
        let Some(mut c) = self.child.take() else { return Ok(None) };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s.code());
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                bail!("daemon ignored SIGTERM for 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `check` every 100 ms until it returns `Some` or `secs` pass.
///
/// # Errors
/// On timeout, naming `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// BLAKE3 of a file, hex.
///
/// # Errors
/// If the file cannot be read.
pub fn file_hash(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Hosts in network namespaces of their own, each with `eth0` on one bridge (which lives in a
/// namespace too, so nothing touches the host's network); torn down when dropped. Needs root
/// and iproute2.
#[derive(Debug)]
pub struct Netns {
    prefix: String,
    hosts: Vec<String>,
}

impl Netns {
    /// The bridge namespace `PREFIX-br`; `prefix` gains the process id, so a run never meets
    /// another's leftovers.
    ///
    /// # Errors
    /// If namespaces cannot be made (not root, no iproute2), saying so.
    pub fn new(prefix: &str) -> Result<Netns> {
        let net = Netns { prefix: format!("{prefix}{}", std::process::id()), hosts: Vec::new() };
        let br = net.bridge();
        ip(&["netns", "add", &br]).context(
            "this test makes network namespaces: run it as root on a machine with iproute2",
        )?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        Ok(net)
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// The namespace of host `name`.
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Host `name` with `addr` (e.g. 10.213.0.2) on a /24, its `eth0` up on the bridge.
    ///
    /// # Errors
    /// If an `ip` command fails.
    pub fn host(&mut self, name: &str, addr: &str) -> Result<()> {
        let ns = self.ns(name);
        ip(&["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        let veth = format!("v-{name}");
        ip(&[
            "-n",
            &self.bridge(),
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ])?;
        ip(&["-n", &self.bridge(), "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])
    }

    /// `ip link set eth0 up|down` in host `name`'s namespace: cuts it off or heals it.
    ///
    /// # Errors
    /// If `ip` fails.
    pub fn link(&self, name: &str, up: bool) -> Result<()> {
        ip(&["-n", &self.ns(name), "link", "set", "eth0", if up { "up" } else { "down" }])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside (ours: daemons whose `Running` outlived this) go first, or
        // the namespace lingers while they hold it.
        for ns in self.hosts.iter().chain(std::iter::once(&self.bridge())) {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
