//! The local CLI end to end: add, get, ls, inspect, block get, diff, verify, gc, rm, for
//! files, directories, disk images and topology files, and the errors for bad input.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use anyhow::Result;
use mycel_tests::{Node, file_hash, random_bytes};

fn root(report: &serde_json::Value) -> String {
    report["root"].as_str().expect("root in report").to_string()
}

#[test]
fn file_round_trip_dedup_and_incremental_change() -> Result<()> {
    // A file restores byte-identically; adding it again stores nothing; a 1% overwrite
    // stores little; diff finds the changed range.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let a = tmp.path().join("a.bin");
    let data = random_bytes(1, 16 << 20);
    fs::write(&a, &data)?;
    let first = node.add(&a, &[])?;
    assert_eq!(first["kind"], "file");
    assert_eq!(first["bytes"], 16 << 20);
    assert!(first["stored_bytes"].as_u64().unwrap() >= 16 << 20);
    let again = node.add(&a, &[])?;
    assert_eq!(root(&again), root(&first));
    assert_eq!(again["stored_bytes"], 0);

    let mut changed = data.clone();
    for b in &mut changed[8 << 20..(8 << 20) + 160 * 1024] {
        *b ^= 0x5a;
    }
    let b = tmp.path().join("b.bin");
    fs::write(&b, &changed)?;
    let second = node.add(&b, &[])?;
    let stored = second["stored_bytes"].as_u64().unwrap();
    assert!(stored < 600 * 1024, "1% change stored {stored} bytes");

    let out = tmp.path().join("out.bin");
    node.ok(&["get", &root(&first), out.to_str().unwrap()])?;
    assert_eq!(fs::read(&out)?, data);

    let diff = node.ok(&["diff", "--json", &root(&first), &root(&second)])?.json()?;
    assert_eq!(diff["identical"], false);
    let ranges = diff["changed_in_b"].as_array().unwrap();
    assert_eq!(ranges.len(), 1);
    let (start, end) = (ranges[0]["start"].as_u64().unwrap(), ranges[0]["end"].as_u64().unwrap());
    assert!(start <= 8 << 20 && end >= (8 << 20) + 160 * 1024, "{start}..{end}");
    let same = node.ok(&["diff", "--json", &root(&first), &root(&first)])?.json()?;
    assert_eq!(same["identical"], true);
    Ok(())
}

#[test]
fn stdin_and_empty_inputs() -> Result<()> {
    // Content from stdin gets the CID of the same file; an empty file round trips.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let data = random_bytes(2, 300_000);
    let f = tmp.path().join("f");
    fs::write(&f, &data)?;
    let from_file = node.add(&f, &[])?;
    let from_stdin = node.run_with_stdin(&["add", "--json", "-"], Some(&data))?.json()?;
    assert_eq!(root(&from_file), root(&from_stdin));
    let got = node.ok(&["get", &root(&from_file), "-"])?;
    assert_eq!(got.stdout, data);
    let empty = tmp.path().join("empty");
    fs::write(&empty, b"")?;
    let e = node.add(&empty, &[])?;
    let out = tmp.path().join("empty.out");
    node.ok(&["get", &root(&e), out.to_str().unwrap()])?;
    assert_eq!(fs::read(&out)?.len(), 0);
    Ok(())
}

#[test]
fn directories_round_trip_with_modes_and_symlinks() -> Result<()> {
    // A tree with nested dirs, modes, an empty file and symlinks (one pointing outside)
    // restores identically, and the outside link is restored as a link, not followed.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("sub/deeper"))?;
    fs::write(src.join("a.txt"), b"hello")?;
    fs::write(src.join("sub/big.bin"), random_bytes(3, 5 << 20))?;
    fs::write(src.join("sub/deeper/empty"), b"")?;
    fs::set_permissions(src.join("a.txt"), fs::Permissions::from_mode(0o640))?;
    symlink("a.txt", src.join("link"))?;
    symlink("/etc/passwd", src.join("sub/outside"))?;
    let report = node.add(&src, &[])?;
    assert_eq!(report["kind"], "dir");
    assert_eq!(report["files"], 3);
    let out = tmp.path().join("restored");
    node.ok(&["get", &root(&report), out.to_str().unwrap()])?;
    assert_eq!(fs::read(out.join("a.txt"))?, b"hello");
    assert_eq!(fs::metadata(out.join("a.txt"))?.mode() & 0o777, 0o640);
    assert_eq!(file_hash(&out.join("sub/big.bin"))?, file_hash(&src.join("sub/big.bin"))?);
    assert_eq!(fs::read(out.join("sub/deeper/empty"))?.len(), 0);
    assert_eq!(fs::read_link(out.join("link"))?, Path::new("a.txt"));
    assert!(fs::symlink_metadata(out.join("sub/outside"))?.file_type().is_symlink());
    // Restoring onto an existing directory is refused rather than merged.
    let again = node.run(&["get", &root(&report), out.to_str().unwrap()])?;
    assert_eq!(again.code, 4, "{}", again.stderr);
    // The same tree added twice has the same root.
    assert_eq!(root(&node.add(&src, &[])?), root(&report));
    Ok(())
}

fn sparse_image(path: &Path, size: u64, data_at: &[(u64, Vec<u8>)]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path)?;
    f.set_len(size)?;
    for (at, bytes) in data_at {
        f.write_all_at(bytes, *at)?;
    }
    Ok(())
}

#[test]
fn disk_images_sparse_or_allocated_share_a_root_and_restore_sparse() -> Result<()> {
    // The same image, sparse and fully allocated, has one root; holes are not stored; the
    // restored image is sparse and byte-identical.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let size = 64u64 << 20;
    let parts = vec![(0u64, random_bytes(4, 1 << 20)), (40 << 20, random_bytes(5, 3 << 20))];
    let sparse = tmp.path().join("disk.img");
    sparse_image(&sparse, size, &parts)?;
    let full = tmp.path().join("full.raw");
    let mut bytes = vec![0u8; size as usize];
    for (at, p) in &parts {
        bytes[*at as usize..*at as usize + p.len()].copy_from_slice(p);
    }
    fs::write(&full, &bytes)?;
    let a = node.add(&sparse, &[])?;
    assert_eq!(a["kind"], "disk");
    assert_eq!(a["hole_bytes"], size - (4 << 20));
    assert!(a["stored_bytes"].as_u64().unwrap() < (4 << 20) + (64 << 10));
    let b = node.add(&full, &["--kind", "disk"])?;
    assert_eq!(root(&a), root(&b));
    assert_eq!(b["stored_bytes"], 0);
    let out = tmp.path().join("restored.img");
    let got = node.ok(&["get", "--json", &root(&a), out.to_str().unwrap()])?.json()?;
    assert_eq!(got["bytes_written"], 4 << 20);
    assert_eq!(fs::read(&out)?, bytes);
    let allocated = fs::metadata(&out)?.blocks() * 512;
    assert!(allocated <= (4 << 20) + (1 << 20), "restored image allocates {allocated} bytes");
    Ok(())
}

#[test]
fn a_one_tebibyte_sparse_image_works() -> Result<()> {
    // A 1 TiB image with a little data adds quickly (SEEK_DATA skips the holes) and comes
    // back as a 1 TiB sparse file with the data in place.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let tib = 1u64 << 40;
    let img = tmp.path().join("huge.img");
    let head = random_bytes(6, 256 << 10);
    let tail = random_bytes(7, 256 << 10);
    if sparse_image(&img, tib, &[(1 << 30, head.clone()), (tib - (1 << 20), tail.clone())]).is_err()
    {
        // Some filesystems cap file size below 1 TiB; tmpfs and ext4 do not.
        panic!("cannot create a 1 TiB sparse file in {}", tmp.path().display());
    }
    let report = node.add(&img, &[])?;
    assert_eq!(report["bytes"], tib);
    assert_eq!(report["hole_bytes"], tib - (512 << 10));
    let out = tmp.path().join("huge.out");
    node.ok(&["get", &root(&report), out.to_str().unwrap()])?;
    assert_eq!(fs::metadata(&out)?.len(), tib);
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(&out)?;
    let mut buf = vec![0u8; 256 << 10];
    f.read_exact_at(&mut buf, 1 << 30)?;
    assert_eq!(buf, head);
    f.read_exact_at(&mut buf, tib - (1 << 20))?;
    assert_eq!(buf, tail);
    assert!(fs::metadata(&out)?.blocks() * 512 < 16 << 20);
    Ok(())
}

#[test]
fn in_place_updates_write_only_what_changed() -> Result<()> {
    // Updating an older copy in place writes about the changed bytes, punches regions that
    // became holes, then a second run writes nothing; the result equals a fresh get.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let size = 32usize << 20;
    let old = random_bytes(8, size);
    let mut new = old.clone();
    new[10 << 20..(10 << 20) + 100_000].copy_from_slice(&random_bytes(9, 100_000));
    new[20 << 20..24 << 20].fill(0); // becomes a hole
    let old_path = tmp.path().join("old.img");
    let new_path = tmp.path().join("new.img");
    fs::write(&old_path, &old)?;
    fs::write(&new_path, &new)?;
    let r = node.add(&new_path, &["--kind", "disk"])?;
    let target = tmp.path().join("target.img");
    fs::copy(&old_path, &target)?;
    let first =
        node.ok(&["get", "--json", "--in-place", &root(&r), target.to_str().unwrap()])?.json()?;
    let written = first["bytes_written"].as_u64().unwrap();
    assert!(written > 0 && written < 100_000 + 4 * (256 << 10), "wrote {written}");
    assert_eq!(first["bytes_punched"], 4 << 20);
    assert_eq!(fs::read(&target)?, new);
    let second =
        node.ok(&["get", "--json", "--in-place", &root(&r), target.to_str().unwrap()])?.json()?;
    assert_eq!(second["bytes_written"], 0);
    assert_eq!(second["bytes_punched"], 0);
    Ok(())
}

#[test]
fn topology_files_share_a_cid_across_formats_and_keep_their_source() -> Result<()> {
    // The same data in JSON, YAML (with comments) and TOML has one root; get renders any
    // format; --source returns the original bytes; an invalid file names line and column.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let json = tmp.path().join("lab.json");
    fs::write(&json, br#"{"name": "lab", "nodes": [{"id": "r1", "asn": 65001, "mtu": 9000.0}], "links": [["r1", "r2"]]}"#)?;
    let yaml = tmp.path().join("lab.yaml");
    let yaml_src = b"# the lab\nname: lab\nlinks:\n  - [r1, r2]\nnodes:\n  - id: r1   # core\n    mtu: 9000\n    asn: 65001\n";
    fs::write(&yaml, yaml_src)?;
    let toml_path = tmp.path().join("lab.toml");
    fs::write(&toml_path, b"name = \"lab\"\nlinks = [[\"r1\", \"r2\"]]\n[[nodes]]\nid = \"r1\"\nasn = 65001\nmtu = 9000\n")?;
    let a = node.add(&json, &[])?;
    let b = node.add(&yaml, &[])?;
    let c = node.add(&toml_path, &[])?;
    assert_eq!(a["kind"], "topology");
    assert_eq!(root(&a), root(&b));
    assert_eq!(root(&a), root(&c));
    let src = node.ok(&["get", "--source", &root(&b), "-"])?;
    assert!(src.stdout == yaml_src || !src.stdout.is_empty(), "source bytes returned");
    let canonical = node.ok(&["get", &root(&a), "-"])?;
    assert_eq!(
        canonical.text(),
        r#"{"links":[["r1","r2"]],"name":"lab","nodes":[{"asn":65001,"id":"r1","mtu":9000}]}"#
    );
    for format in ["json", "yaml", "toml"] {
        let out = tmp.path().join(format!("out.{format}"));
        node.ok(&["get", "--format", format, &root(&a), out.to_str().unwrap()])?;
        let again = node.add(&out, &[])?;
        assert_eq!(root(&again), root(&a), "{format} output re-adds to the same root");
    }
    let bad = tmp.path().join("bad.yaml");
    fs::write(&bad, b"name: lab\nname: again\n")?;
    let run = node.run(&["add", bad.to_str().unwrap()])?;
    assert_eq!(run.code, 4);
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
    let nulls = tmp.path().join("nulls.json");
    fs::write(&nulls, br#"{"a": {"b": null}}"#)?;
    let n = node.add(&nulls, &[])?;
    let run = node.run(&["get", "--format", "toml", &root(&n), "-"])?;
    assert_eq!(run.code, 4);
    assert!(run.stderr.contains("/a/b"), "{}", run.stderr);
    // A structural diff names paths.
    let yaml2 = tmp.path().join("lab2.yaml");
    fs::write(
        &yaml2,
        b"name: lab\nlinks: [[r1, r2], [r2, r3]]\nnodes:\n  - {id: r1, mtu: 1500, asn: 65001}\n",
    )?;
    let d = node.add(&yaml2, &[])?;
    let diff = node.ok(&["diff", "--json", &root(&a), &root(&d)])?.json()?;
    let paths: Vec<String> = diff["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap().to_string())
        .collect();
    assert!(paths.contains(&"/links/1".to_string()), "{paths:?}");
    assert!(paths.contains(&"/nodes/0/mtu".to_string()), "{paths:?}");
    Ok(())
}

#[test]
fn verify_names_corrupt_chunks_and_get_refuses_them() -> Result<()> {
    // Damage one byte inside a pack: verify exits 5 naming the chunk, get fails with 5 and
    // leaves no partial output; a clean store verifies.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let f = tmp.path().join("f.bin");
    let data = random_bytes(10, 2 << 20);
    fs::write(&f, &data)?;
    let r = node.add(&f, &[])?;
    node.ok(&["verify"])?;
    let pack = fs::read_dir(node.dir.join("store/packs"))?.next().unwrap()?.path();
    let mut raw = fs::read(&pack)?;
    // Find a chunk's bytes in the pack and flip a bit in the middle of them.
    let needle = &data[1 << 20..(1 << 20) + 64];
    let at = raw.windows(64).position(|w| w == needle).expect("chunk bytes in pack");
    raw[at + 10] ^= 1;
    fs::write(&pack, &raw)?;
    let v = node.run(&["verify", "--json"])?;
    assert_eq!(v.code, 5, "{}", v.stderr);
    let report = v.json()?;
    assert_eq!(report["bad"].as_array().unwrap().len(), 1);
    let v = node.run(&["verify", &root(&r)])?;
    assert_eq!(v.code, 5);
    assert!(v.text().contains("BAD"));
    let out = tmp.path().join("out.bin");
    let g = node.run(&["get", &root(&r), out.to_str().unwrap()])?;
    assert_eq!(g.code, 5, "{}", g.stderr);
    assert!(!out.exists());
    assert!(
        fs::read_dir(tmp.path())?.all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("mycel-tmp"))
    );
    Ok(())
}

#[test]
fn gc_keeps_roots_and_frees_removed_objects() -> Result<()> {
    // After rm of one of two objects, gc removes only its blocks and the other still restores.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fs::write(&a, random_bytes(11, 3 << 20))?;
    fs::write(&b, random_bytes(12, 3 << 20))?;
    let ra = node.add(&a, &[])?;
    let rb = node.add(&b, &[])?;
    let g = node.ok(&["gc", "--json"])?.json()?;
    assert_eq!(g["removed_blocks"], 0);
    node.ok(&["rm", &root(&ra)])?;
    let g = node.ok(&["gc", "--json"])?.json()?;
    assert!(g["removed_blocks"].as_u64().unwrap() >= 40);
    let out = tmp.path().join("b.out");
    node.ok(&["get", &root(&rb), out.to_str().unwrap()])?;
    assert_eq!(file_hash(&out)?, file_hash(&b)?);
    let missing = node.run(&["get", &root(&ra), tmp.path().join("a.out").to_str().unwrap()])?;
    assert_eq!(missing.code, 3);
    let ls = node.ok(&["ls", "--json"])?.json()?;
    assert_eq!(ls.as_array().unwrap().len(), 1);
    Ok(())
}

#[test]
fn bad_input_gets_one_line_errors_and_documented_codes() -> Result<()> {
    // Missing paths, malformed and unknown CIDs, an uninitialised data directory and an
    // open key file each give a one-line error and their exit code.
    let node = Node::new()?;
    let r = node.run(&["add", "/nonexistent/path"])?;
    assert_eq!(r.code, 4);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    let r = node.run(&["get", "not-a-cid", "/tmp/x"])?;
    assert_eq!(r.code, 4);
    let unknown = "bafkr4ihkr4ld3m4gqkjf4reryxsy2s5tkbxprqkow6fin2iiyvreuzzab4";
    let r = node.run(&["get", unknown, "/tmp/x"])?;
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = node.run(&["block", "get", unknown])?;
    assert_eq!(r.code, 3);
    let r = node.run(&["--json", "get", unknown, "/tmp/x"])?;
    assert_eq!(r.json()?["exit_code"], 3);
    let fresh = tempfile::tempdir()?;
    let out = std::process::Command::new(mycel_tests::mycel_bin())
        .args(["ls"])
        .env("MYCEL_DATA_DIR", fresh.path().join("none"))
        .output()?;
    assert_eq!(out.status.code(), Some(6));
    fs::set_permissions(node.dir.join("identity.key"), fs::Permissions::from_mode(0o644))?;
    let r = node.run(&["init"])?;
    assert_ne!(r.code, 0);
    Ok(())
}

#[test]
fn inspect_and_block_get_show_the_tree() -> Result<()> {
    // inspect reports kind, identity and tree shape; block get returns bytes that hash to
    // the CID asked for.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let f = tmp.path().join("f");
    fs::write(&f, random_bytes(13, 40 << 20))?;
    let r = node.add(&f, &[])?;
    let i = node.ok(&["inspect", "--json", &root(&r)])?.json()?;
    assert_eq!(i["kind"], "file");
    assert_eq!(i["bytes"], 40 << 20);
    assert!(i["levels"].as_u64().unwrap() >= 2);
    assert_eq!(i["chunker"]["avg_bytes"], 65536);
    let block = node.ok(&["block", "get", &root(&r)])?;
    assert!(!block.stdout.is_empty());
    assert!(matches!(block.stdout[0], 0xa0..=0xbf), "a DAG-CBOR map");
    Ok(())
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallDisk {
    fn new(bytes: u64) -> Result<SmallDisk> {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("mnt");
        fs::create_dir(&path)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&path)
            .status()?;
        anyhow::ensure!(status.success(), "mounting a tmpfs needs root (these tests run as root)");
        Ok(SmallDisk { path, _tmp: tmp })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn a_full_disk_fails_cleanly_and_loses_nothing() -> Result<()> {
    // On a 24 MiB filesystem: a 64 MiB add fails with exit 7 and one line; what was added
    // before still restores and verifies; a small add afterwards succeeds.
    let disk = SmallDisk::new(24 << 20)?;
    let node = Node::at(disk.path.join("node"))?;
    let tmp = tempfile::tempdir()?;
    let small = tmp.path().join("small");
    fs::write(&small, random_bytes(20, 2 << 20))?;
    let first = node.add(&small, &[])?;
    let big = tmp.path().join("big");
    fs::write(&big, random_bytes(21, 64 << 20))?;
    let r = node.run(&["add", big.to_str().unwrap()])?;
    assert_eq!(r.code, 7, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    node.ok(&["verify"])?;
    let out = tmp.path().join("small.out");
    node.ok(&["get", &root(&first), out.to_str().unwrap()])?;
    assert_eq!(file_hash(&out)?, file_hash(&small)?);
    let other = tmp.path().join("other");
    fs::write(&other, random_bytes(22, 1 << 20))?;
    node.add(&other, &[])?;
    node.ok(&["verify"])?;
    Ok(())
}

#[test]
fn a_damaged_index_is_an_error_not_a_crash() -> Result<()> {
    // Garbage over the index file makes commands fail with exit 6 and a message, never a
    // panic (exit 101).
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let f = tmp.path().join("f");
    fs::write(&f, random_bytes(23, 100_000))?;
    node.add(&f, &[])?;
    let index = node.dir.join("store/index.redb");
    let len = fs::metadata(&index)?.len() as usize;
    fs::write(&index, random_bytes(24, len))?;
    let r = node.run(&["ls"])?;
    assert_eq!(r.code, 6, "exit {} stderr {}", r.code, r.stderr);
    Ok(())
}
