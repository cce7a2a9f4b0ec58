#!/usr/bin/env bash
# The mycel demo on embedded defaults: builds the binary, makes a throwaway node, and shows
# content addressing at work on generated data: dedup, an incremental change, a sparse disk
# image, a topology file in three formats, verify, and byte-exact restores; then a local mesh:
# managers, edges and routers on loopback, pins, replication surviving a killed edge, a
# pre-position, a topology change activated and rolled back, a killed Raft leader, and a
# killed edge that finds its peers again from the addresses it kept.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p mycel-node --bin mycel
M="$PWD/target/release/mycel"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mycel-demo.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
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

# ---------------------------------------------------------------------------------------
say "a local mesh: 3 managers and 3 edges on loopback, admitted with join tokens"
start() { # name [init args...]
    local n=$1; shift
    MYCEL_DATA_DIR="$WORK/$n" "$M" init --listen /ip4/127.0.0.1/udp/0/quic-v1 "$@" >/dev/null
    sed -i 's/^tick_ms = 100/tick_ms = 50/; s/^announce_period_ms = 5000/announce_period_ms = 1000/; s/^node_lost_ms = 15000/node_lost_ms = 3000/' "$WORK/$n/config.toml"
    MYCEL_DATA_DIR="$WORK/$n" "$M" run > "$WORK/$n.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$n=$!"
    for _ in $(seq 100); do MYCEL_DATA_DIR="$WORK/$n" "$M" id --json 2>/dev/null | grep -q quic && return; sleep 0.1; done
    echo "$n did not start"; exit 1
}
on() { local n=$1; shift; MYCEL_DATA_DIR="$WORK/$n" "$M" "$@"; }
start m1
on m1 cluster init
MTOK=$(on m1 cluster token create --role manager --uses 2)
start m2 --join "$MTOK"; start m3 --join "$MTOK"
voters() { on m1 cluster members --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(sum(m["raft"] in ("leader","voter") for m in v["members"]), len(v["members"]))'; }
for _ in $(seq 100); do [ "$(voters)" = "3 3" ] && break; sleep 0.2; done
# A token made now names all three managers.
ETOK=$(on m1 cluster token create --role edge --uses 2 --zone eu)
start e1 --join "$ETOK" --zone eu; start e2 --join "$ETOK" --zone eu
UTOK=$(on m1 cluster token create --role edge --uses 1 --zone us)
start e3 --join "$UTOK" --zone us
for _ in $(seq 100); do [ "$(voters)" = "3 6" ] && break; sleep 0.2; done
on m1 cluster members

say "publish 64 MiB on two nodes; a third fetches it from the holders it finds, verified chunk by chunk"
head -c $((64 << 20)) /dev/urandom > "$WORK/model.bin"
ROOT=$(on e1 add --json "$WORK/model.bin" | root)
on m2 add --json "$WORK/model.bin" >/dev/null
on e2 get --json "$ROOT" "$WORK/model-e2.bin" | python3 -c 'import json,sys; r=json.load(sys.stdin); [print(f"  {b:>10} bytes from {p}") for p,b in r["by_peer"].items()]'
cmp "$WORK/model.bin" "$WORK/model-e2.bin" && echo "  identical"

say "pin it with 2 replicas: the fleet places them on edges (rendezvous-ranked, zones spread when seen)"
on m1 pin add "$ROOT" --replicas 2 --name model
replicas() { on m1 pin status "$1" --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(" ".join(sorted(n["peer_id"][-6:] for n in v["nodes"] if n["state"]=="held" and n["alive"] and n["role"]=="edge")))'; }
for _ in $(seq 300); do [ "$(replicas "$ROOT" | wc -w)" = 2 ] && break; sleep 0.2; done
on m1 pin status "$ROOT"

say "kill -9 an edge holding a replica: after node_lost_ms (3 s here) another edge copies it"
BEFORE=$(replicas "$ROOT")
for n in e1 e2 e3; do
    case " $BEFORE " in *" $(on $n id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"][-6:])') "*) VICTIM=$n; break ;; esac
done
eval "kill -9 \$PID_$VICTIM; wait \$PID_$VICTIM 2>/dev/null || true"; echo "  killed $VICTIM (replicas were on: $BEFORE)"
for _ in $(seq 600); do R=$(replicas "$ROOT"); [ "$(echo "$R" | wc -w)" = 2 ] && [ "$R" != "$BEFORE" ] && break; sleep 0.2; done
echo "  replicas now on: $(replicas "$ROOT")"

say "pre-position a second object to every live edge in zone eu, due in 10 minutes"
head -c $((8 << 20)) /dev/urandom > "$WORK/maps.bin"
MAPS=$(on m1 add --json "$WORK/maps.bin" | root)
on m1 pin add "$MAPS" --preposition eu --by +10m --name maps
for _ in $(seq 300); do [ "$(on m1 pin status "$MAPS" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["deadline"])')" = met ] && break; sleep 0.2; done
on m1 pin ls

say "two routers watch topology 'backbone'; a proposal is staged, activated by the quorum once both hold it, and written by each"
RTOK=$(on m1 cluster token create --role router --uses 2 --zone eu)
start r1 --join "$RTOK" --zone eu; start r2 --join "$RTOK" --zone eu
on r1 topology watch backbone --out "$WORK/r1-backbone.yaml" --format yaml --detach
on r2 topology watch backbone --out "$WORK/r2-backbone.json" --detach
on m1 topology propose backbone configs/topologies/backbone.json
active() { on m1 topology history backbone --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("active"))'; }
for _ in $(seq 300); do [ "$(active)" = 1 ] && [ -s "$WORK/r2-backbone.json" ] && break; sleep 0.2; done
echo "  r1 wrote $(wc -l < "$WORK/r1-backbone.yaml") lines of YAML, r2 $(wc -c < "$WORK/r2-backbone.json") bytes of JSON"
sed 's/"metric": 10,/"metric": 25,/' configs/topologies/backbone.json > "$WORK/backbone-v2.json"
on m1 topology propose backbone "$WORK/backbone-v2.json"
for _ in $(seq 300); do [ "$(active)" = 2 ] && grep -q '"metric": 25' "$WORK/r2-backbone.json" && break; sleep 0.2; done
on m1 topology diff backbone 1 2
applied() { on m1 topology status backbone --json | python3 -c 'import json,sys; print(" ".join(str(r.get("applied_version")) for r in json.load(sys.stdin)["routers"]))'; }
for _ in $(seq 100); do [ "$(applied)" = "2 2" ] && break; sleep 0.2; done
on m1 topology status backbone
say "roll back: version 1 is made active again through the same commit"
on m1 topology activate backbone --version 1
for _ in $(seq 300); do [ "$(active)" = 1 ] && ! grep -q '"metric": 25' "$WORK/r2-backbone.json" && break; sleep 0.2; done
for _ in $(seq 100); do [ "$(applied)" = "1 1" ] && break; sleep 0.2; done
on m1 topology history backbone

say "kill -9 the Raft leader: the others elect a new one and keep committing"
LEADER=$(on m1 cluster members --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print([m["peer_id"] for m in v["members"] if m["raft"]=="leader"][0])')
for n in m1 m2 m3; do [ "$(on $n id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])')" = "$LEADER" ] && DEAD=$n; done
eval "kill -9 \$PID_$DEAD; wait \$PID_$DEAD 2>/dev/null || true"; echo "  killed $DEAD"
ALIVE=m1; [ "$DEAD" = m1 ] && ALIVE=m2
for _ in $(seq 100); do
    NEW=$(on $ALIVE cluster members --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(([m["peer_id"] for m in v["members"] if m["raft"]=="leader"] or [""])[0])')
    [ -n "$NEW" ] && [ "$NEW" != "$LEADER" ] && break; sleep 0.1
done
echo "  new leader $NEW"
on $ALIVE cluster token create --role edge >/dev/null && echo "  a new change committed"
on e2 cluster members

say "restart the edge killed earlier: it reconnects from the addresses it kept, edges it was never introduced to included"
MYCEL_DATA_DIR="$WORK/$VICTIM" "$M" run > "$WORK/$VICTIM-again.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do on "$VICTIM" id --json 2>/dev/null | grep -q quic && break; sleep 0.1; done
names() { for n in m1 m2 m3 e1 e2 e3; do echo "$(on $n id --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["peer_id"])') $n"; done; }
NAMES=$(names 2>/dev/null)
connected_edges() { on "$VICTIM" peers --json | python3 -c '
import json, sys
names = dict(l.split() for l in sys.argv[1].splitlines() if len(l.split()) == 2)
print(" ".join(sorted(names[p["peer_id"]] for p in json.load(sys.stdin) if names.get(p["peer_id"], "m").startswith("e"))))' "$NAMES"; }
for _ in $(seq 150); do [ -n "$(connected_edges)" ] && break; sleep 0.2; done
echo "  $VICTIM kept $(stat -c %s "$WORK/$VICTIM/peers" 2>/dev/null || echo 0) bytes of addresses; connected again to edges: $(connected_edges)"
