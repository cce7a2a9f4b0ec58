//! Interop: readers that share no code with mycel decode every block it writes.
//!
//! `tests/interop/setup.sh` builds a virtualenv under `target/interop-venv` with Python's
//! `dag-cbor`, `multiformats` and `blake3` at the versions pinned in
//! `tests/interop/requirements.txt`; `tests/interop/walk.py` then fetches blocks with
//! `mycel block get`, decodes and re-encodes every DAG-CBOR block byte for byte, recomputes
//! every CID and follows every link. These tests touch temporary data directories, the venv
//! under `target/`, and PyPI the first time the venv is built.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use mycel_tests::{Node, Run, mycel_bin, random_bytes};
use serde_json::Value;

/// The workspace root: this crate lives in `<root>/tests`.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Runs `setup.sh` (a no-op once the venv matches the pins) and returns the venv's python.
fn venv_python() -> Result<PathBuf> {
    let root = workspace_root();
    let out = Command::new("bash")
        .arg(root.join("tests/interop/setup.sh"))
        .arg(&root)
        .output()
        .context("running bash tests/interop/setup.sh")?;
    let run = Run::from(out);
    ensure!(run.code == 0, "setup.sh exited {}: {}", run.code, run.stderr);
    let py = PathBuf::from(run.text().trim());
    ensure!(py.is_file(), "setup.sh printed {py:?}, which is not a file: {}", run.stderr);
    Ok(py)
}

/// Runs `walk.py ARGS` with `bin` as the mycel binary, against `node`.
fn walk(py: &Path, bin: &Path, node: &Node, args: &[&str], envs: &[(&str, &str)]) -> Result<Run> {
    let out = Command::new(py)
        .arg(workspace_root().join("tests/interop/walk.py"))
        .args(args)
        .env("MYCEL_BIN", bin)
        .env("MYCEL_DATA_DIR", &node.dir)
        .envs(envs.iter().copied())
        .output()
        .context("running walk.py")?;
    Ok(out.into())
}

/// Runs `walk.py` over `roots` with the real binary, requires success, returns the summary.
fn walk_ok(py: &Path, node: &Node, roots: &[&str]) -> Result<Value> {
    let run = walk(py, &mycel_bin(), node, roots, &[])?;
    if run.code != 0 {
        bail!("walk.py {roots:?} exited {}:\n{}", run.code, run.stderr);
    }
    run.json()
}

/// A node whose chunker cuts tiny chunks and tiny index nodes, so a small file gets a tree of
/// several levels. Fails if `config.toml` no longer has a key it rewrites.
fn small_chunk_node() -> Result<Node> {
    let node = Node::new()?;
    let path = node.dir.join("config.toml");
    let config = std::fs::read_to_string(&path)?;
    let wanted = [("min_bytes", 64), ("avg_bytes", 256), ("max_bytes", 1024), ("fanout_bits", 1)];
    let mut rewritten = String::new();
    let mut found = 0;
    let mut section = "";
    for line in config.lines() {
        if line.starts_with('[') {
            section = line.trim();
        }
        let key = line.split('=').next().unwrap_or("").trim();
        match wanted.iter().find(|(k, _)| *k == key && section == "[chunker]") {
            Some((k, v)) => {
                rewritten.push_str(&format!("{k} = {v}\n"));
                found += 1;
            }
            None => {
                rewritten.push_str(line);
                rewritten.push('\n');
            }
        }
    }
    ensure!(found == wanted.len(), "[chunker] in config.toml lacks some of {wanted:?}:\n{config}");
    std::fs::write(&path, rewritten)?;
    Ok(node)
}

fn root_of(report: &Value) -> Result<String> {
    report["root"].as_str().map(str::to_owned).with_context(|| format!("no root in {report}"))
}

fn count(summary: &Value, path: &[&str]) -> u64 {
    path.iter().fold(summary, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

#[test]
fn ipld_decoders_read_every_block() -> Result<()> {
    // Adds a file, a directory, a sparse disk image, a topology file (and its source bytes) and,
    // on a small-chunk node, a file with a tree of at least three levels; walk.py must decode,
    // re-encode and re-hash every block, and its summary must show each of those shapes.
    let py = venv_python()?;
    let tmp = tempfile::tempdir()?;
    let node = Node::new()?;

    let file = tmp.path().join("file.bin");
    std::fs::write(&file, random_bytes(1, 1 << 20))?;
    let file_root = root_of(&node.add(&file, &["--kind", "file"])?)?;

    let dir = tmp.path().join("tree");
    std::fs::create_dir_all(dir.join("sub/nested"))?;
    std::fs::write(dir.join("sub/nested/big.bin"), random_bytes(2, 300_000))?;
    std::fs::write(dir.join("sub/small.txt"), b"hello, mycel\n")?;
    std::fs::write(dir.join("empty"), b"")?;
    std::os::unix::fs::symlink("sub/nested/big.bin", dir.join("link"))?;
    let dir_root = root_of(&node.add(&dir, &["--kind", "dir"])?)?;

    // 4 MiB of zeros with data at two places: the zero runs between them become holes.
    let disk = tmp.path().join("disk.img");
    let mut image = vec![0u8; 4 << 20];
    image[64 << 10..(64 << 10) + 100_000].copy_from_slice(&random_bytes(3, 100_000));
    image[3 << 20..(3 << 20) + 50_000].copy_from_slice(&random_bytes(4, 50_000));
    std::fs::write(&disk, &image)?;
    let disk_report = node.add(&disk, &["--kind", "disk"])?;
    ensure!(count(&disk_report, &["hole_bytes"]) > 0, "no holes in {disk_report}");
    let disk_root = root_of(&disk_report)?;

    let topo = tmp.path().join("lab.yaml");
    std::fs::write(
        &topo,
        "name: lab\nnodes:\n  - id: r1\n    kind: router\n  - id: r2\n    kind: switch\n\
         links:\n  - [r1, r2]\n",
    )?;
    let topo_report = node.add(&topo, &["--kind", "topology"])?;
    let topo_root = root_of(&topo_report)?;
    let topo_source = topo_report["source_root"]
        .as_str()
        .with_context(|| format!("no source_root in {topo_report}"))?;

    let roots = [file_root.as_str(), &dir_root, &disk_root, &topo_root, topo_source];
    let summary = walk_ok(&py, &node, &roots)?;
    ensure!(count(&summary, &["roots"]) == 5, "{summary}");
    ensure!(count(&summary, &["blocks", "raw"]) >= 20, "too few raw chunks: {summary}");
    ensure!(count(&summary, &["blocks", "dag-cbor"]) >= 5, "too few dag-cbor blocks: {summary}");
    ensure!(count(&summary, &["holes", "disk"]) >= 1, "disk image without holes: {summary}");
    for (what, n) in [("file", 3), ("dir", 2), ("symlink", 1)] {
        ensure!(count(&summary, &["dir_entries", what]) >= n, "{what} entries: {summary}");
    }
    let kinds = &summary["kinds"];
    for kind in ["file", "dir", "disk", "topology"] {
        ensure!(kinds.as_array().is_some_and(|k| k.contains(&kind.into())), "{kind}: {summary}");
    }
    // The lengths the walker added up from the blocks match the inputs.
    let objects = summary["objects"].as_array().context("objects")?;
    ensure!(count(&objects[0], &["len"]) == 1 << 20, "file length: {summary}");
    ensure!(count(&objects[1], &["len"]) == 300_000 + 13, "directory length: {summary}");
    ensure!(count(&objects[2], &["len"]) == 4 << 20, "disk length: {summary}");

    let deep = small_chunk_node()?;
    let deep_file = tmp.path().join("deep.bin");
    std::fs::write(&deep_file, random_bytes(5, 200_000))?;
    let deep_root = root_of(&deep.add(&deep_file, &["--kind", "file"])?)?;
    let summary = walk_ok(&py, &deep, &[&deep_root])?;
    let level = &summary["objects"][0]["tree_level"];
    ensure!(level.as_u64().is_some_and(|l| l >= 2), "tree under 3 levels: {summary}");
    ensure!(count(&summary, &["max_level"]) >= 2, "{summary}");
    ensure!(count(&summary, &["blocks", "raw"]) >= 100, "too few small chunks: {summary}");
    Ok(())
}

#[test]
fn ipld_walk_rejects_tampered_blocks() -> Result<()> {
    // The checker can fail: walk.py's self-test feeds it flipped bits and non-canonical
    // DAG-CBOR; then, through a stand-in `mycel` that flips one bit of one block on its way out
    // of `block get`, a walk over a real multi-level tree must fail and name that block, while
    // the same stand-in with nothing to flip lets the walk pass.
    let py = venv_python()?;
    let run = Command::new(&py)
        .arg(workspace_root().join("tests/interop/walk.py"))
        .arg("--self-test")
        .output()?;
    let run = Run::from(run);
    ensure!(run.code == 0, "walk.py --self-test exited {}: {}", run.code, run.stderr);
    ensure!(run.json()?["self_test"] == "ok", "{}", run.text());

    let node = small_chunk_node()?;
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("file.bin");
    std::fs::write(&file, random_bytes(6, 16_000))?;
    let root = root_of(&node.add(&file, &["--kind", "file"])?)?;

    // A shell wrapper, so no interpreter path has to fit in a `#!` line.
    let wrapper = tmp.path().join("mycel-tamper");
    let tamper = workspace_root().join("tests/interop/tamper.py");
    for p in [&py, &tamper] {
        ensure!(!p.to_string_lossy().contains('\''), "quote in {p:?}");
    }
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{}' '{}' \"$@\"\n", py.display(), tamper.display()),
    )?;
    set_executable(&wrapper)?;
    let real = mycel_bin();
    let real = real.to_str().context("utf-8 binary path")?;

    let control = walk(&py, &wrapper, &node, &[&root], &[("TAMPER_REAL_BIN", real)])?;
    ensure!(control.code == 0, "untampered walk through the wrapper failed: {}", control.stderr);
    let summary = control.json()?;
    ensure!(count(&summary, &["max_level"]) >= 1, "tree too shallow to tamper inside: {summary}");

    // An inner index node (the root is the first dag-cbor request) and a chunk deep in the file.
    for (prefix, skip) in [("bafyr", "2"), ("bafkr", "5")] {
        let state = tempfile::tempdir()?;
        let state_dir = state.path().to_str().context("utf-8 temp path")?;
        let envs = [
            ("TAMPER_REAL_BIN", real),
            ("TAMPER_PREFIX", prefix),
            ("TAMPER_SKIP", skip),
            ("TAMPER_STATE", state_dir),
        ];
        let run = walk(&py, &wrapper, &node, &[&root], &envs)?;
        let tampered = std::fs::read_to_string(state.path().join("tampered"))
            .with_context(|| format!("{prefix}: the wrapper flipped nothing: {}", run.stderr))?;
        ensure!(run.code == 1, "{prefix}: walk over a flipped bit exited {}", run.code);
        ensure!(
            run.stderr.contains(&format!("FAIL {tampered}: CID mismatch")),
            "{prefix}: failure does not name the tampered block {tampered}: {}",
            run.stderr
        );
    }
    Ok(())
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}
