#!/usr/bin/env bash
# The mycel demo on embedded defaults: builds the binary, makes a throwaway node, and shows
# content addressing at work on generated data: dedup, an incremental change, a sparse disk
# image, a topology file in three formats, verify, and byte-exact restores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p mycel-node --bin mycel
M="$PWD/target/release/mycel"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mycel-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export MYCEL_DATA_DIR="$WORK/node"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
root() { python3 -c 'import json,sys; print(json.load(sys.stdin)["root"])'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }

say "init a node in $MYCEL_DATA_DIR"
"$M" init

say "add 256 MiB of generated data"
head -c $((256 << 20)) /dev/urandom > "$WORK/release-v1.bin"
V1=$("$M" add --json "$WORK/release-v1.bin" | tee "$WORK/v1.json" | root)
echo "root $V1, stored $(field stored_bytes < "$WORK/v1.json") bytes"

say "add it again: nothing new is stored"
"$M" add "$WORK/release-v1.bin"

say "overwrite 4 regions of 640 KiB (1%) and add the new version"
cp "$WORK/release-v1.bin" "$WORK/release-v2.bin"
for at in 10 90 150 230; do
    head -c $((640 << 10)) /dev/urandom | dd of="$WORK/release-v2.bin" bs=1M seek="$at" conv=notrunc status=none
done
V2=$("$M" add --json "$WORK/release-v2.bin" | tee "$WORK/v2.json" | root)
echo "root $V2, stored $(field stored_bytes < "$WORK/v2.json") new bytes of $((256 << 20))"

say "what changed between the versions"
"$M" diff "$V1" "$V2"

say "a 1 GiB sparse disk image with 24 MiB of data"
truncate -s 1G "$WORK/vm.img"
head -c $((16 << 20)) /dev/urandom | dd of="$WORK/vm.img" bs=1M seek=0 conv=notrunc status=none
head -c $((8 << 20)) /dev/urandom | dd of="$WORK/vm.img" bs=1M seek=700 conv=notrunc status=none
IMG=$("$M" add --json "$WORK/vm.img" | tee "$WORK/img.json" | root)
echo "root $IMG: $(field hole_bytes < "$WORK/img.json") bytes of holes, $(field stored_bytes < "$WORK/img.json") stored"

say "the same topology as YAML and as JSON: one CID"
cat > "$WORK/lab.yaml" <<'YAML'
# a small lab
name: lab
nodes:
  - {id: r1, asn: 65001}
  - {id: r2, asn: 65002}
links: [[r1, r2]]
YAML
echo '{"links":[["r1","r2"]],"name":"lab","nodes":[{"asn":65001,"id":"r1"},{"asn":65002,"id":"r2"}]}' > "$WORK/lab.json"
"$M" add "$WORK/lab.yaml"
"$M" add "$WORK/lab.json"
TOPO=$("$M" add --json "$WORK/lab.yaml" | root)
echo "as TOML:"
"$M" get --format toml "$TOPO" -

say "restore everything and compare"
"$M" get "$V2" "$WORK/restored-v2.bin"
cmp "$WORK/release-v2.bin" "$WORK/restored-v2.bin" && echo "release-v2: identical"
"$M" get "$IMG" "$WORK/restored.img"
cmp "$WORK/vm.img" "$WORK/restored.img" && echo "vm.img: identical, $(du -h "$WORK/restored.img" | cut -f1) allocated of 1.0G"

say "update the v1 file in place to v2: only changed chunks are written"
"$M" get --in-place "$V2" "$WORK/release-v1.bin"
cmp "$WORK/release-v2.bin" "$WORK/release-v1.bin" && echo "in-place result identical"

say "verify every block"
"$M" verify
"$M" ls
