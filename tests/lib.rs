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
