//! Every file in `configs/` is parsed and checked by the binary that will read it, and a
//! broken config is refused (so a check that accepted anything would fail here).

use std::fs;
use std::path::Path;

use anyhow::Result;
use mycel_tests::Node;

#[test]
fn every_shipped_config_parses() -> Result<()> {
    // Runs `mycel config check` on each node config in configs/.
    let node = Node::new()?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut checked = 0;
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            node.ok(&["config", "check", path.to_str().unwrap()])?;
            checked += 1;
        }
    }
    assert!(checked >= 2, "found {checked} configs in {}", dir.display());
    Ok(())
}

#[test]
fn broken_configs_are_refused_with_the_reason() -> Result<()> {
    // An unknown key, an invalid chunker identity and a bad topology watch are errors naming
    // the problem.
    let node = Node::new()?;
    let tmp = tempfile::tempdir()?;
    let typo = tmp.path().join("typo.toml");
    fs::write(&typo, "[chunker]\navg_byte = 1\n")?;
    let r = node.run(&["config", "check", typo.to_str().unwrap()])?;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("avg_byte"), "{}", r.stderr);
    let sizes = tmp.path().join("sizes.toml");
    fs::write(
        &sizes,
        "[chunker]\nmin_bytes = 65536\navg_bytes = 1024\nmax_bytes = 2048\nnormalization = 1\nzero_run_bytes = 65536\nfanout_bits = 8\n",
    )?;
    let r = node.run(&["config", "check", sizes.to_str().unwrap()])?;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("chunk sizes"), "{}", r.stderr);
    // A topology watch with a name routers could not use.
    let watch = tmp.path().join("watch.toml");
    fs::write(&watch, "[[topology.watch]]\nname = \"Core Graph\"\nout = \"/tmp/g.json\"\n")?;
    let r = node.run(&["config", "check", watch.to_str().unwrap()])?;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("bad topology name"), "{}", r.stderr);
    Ok(())
}
