#!/usr/bin/env bash
# Swarm distribution: one origin pre-positions a $SIZE_MIB MiB object to $EDGES edges, each node
# in its own network namespace with its uplink capped at $RATE (`tc tbf`, egress of its eth0;
# downloads uncapped). The origin is the cluster's only manager (zone z); the edges join with
# one token and are all in zone z, so `pin add ROOT --preposition z` makes every edge fetch it,
# from the origin and from each other (partial holders serve what they have).
#
# Reports: total time from the pin's commit until every edge holds the object, against the
# swarm lower bound max(F/u_origin, F/d_min, N·F/(u_origin + Σu_edges)) (d_min: downloads are
# uncapped, so that term is ~0), the ratio (goal <= 1.5), the origin's upload bytes as a
# multiple of the object (goal <= 2), and the machine's CPU use during the run (the bound only
# counts while CPU stays below 70 %). Must run as root; removes its namespaces, processes and
# data on exit and on start (re-runnable after an interrupted run).
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/netns.sh"
SIZE_MIB="${SIZE_MIB:-256}"
EDGES="${EDGES:-16}"
RATE="${RATE:-25mbit}"
RATE_BPS="${RATE_BPS:-25000000}"   # $RATE in bit/s, for the bound
READY_S="${READY_S:-60}"
DEADLINE_S="${DEADLINE_S:-900}"
PORT=4001
NET=10.78.0
PFX=myceldist

if [ "$(id -u)" != 0 ]; then
    echo "distribute.sh must run as root (it creates network namespaces and tc qdiscs)" >&2
    exit 1
fi
addr() { case $1 in o) echo "$NET.10" ;; e*) echo "$NET.$((10 + ${1#e}))" ;; esac; }
NODES=(o); for ((i = 1; i <= EDGES; i++)); do NODES+=("e$i"); done

W=""; IN="$SHM/distribute.bin"; PIDS=()
cleanup() {
    kill_pids "${PIDS[@]}"
    teardown_net
    if [ -n "$W" ]; then rm -rf "$W"; fi
    rm -f "$IN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cpu_ticks() { awk '/^cpu /{busy = $2 + $3 + $4 + $7 + $8; print busy, busy + $5 + $6}' /proc/stat; }

build
teardown_net
mkdir -p "$BENCH_DIR" "$SHM"
W=$(mktemp -d "$BENCH_DIR/distribute.XXXXXX")
net_bridge
for node in "${NODES[@]}"; do net_node "$node" "$RATE"; done
for node in "${NODES[@]:1}"; do
    reachable o "$node" || { echo "no route from the origin to $node" >&2; exit 1; }
done
python3 -c "import os,sys; sys.stdout.buffer.write(os.urandom($SIZE_MIB << 20))" >"$IN"

# The origin: the only manager.
nx o "$M" init --listen "/ip4/$(addr o)/udp/$PORT/quic-v1" --zone z >/dev/null
start o
nx o "$M" cluster init >/dev/null
token=$(nx o "$M" cluster token create --role edge --zone z --uses "$EDGES" --json | json '["token"]')
for node in "${NODES[@]:1}"; do
    nx "$node" "$M" init --listen "/ip4/$(addr "$node")/udp/$PORT/quic-v1" --zone z --join "$token" >/dev/null
    start "$node"
done
for ((i = 0; i < READY_S; i++)); do
    n=$(nx o "$M" cluster members --json | json '["members"].__len__()')
    [ "$n" = "$((EDGES + 1))" ] && break
    sleep 1
done
[ "$n" = "$((EDGES + 1))" ] || { echo "only $n of $((EDGES + 1)) members after $READY_S s" >&2; exit 1; }
root=$(nx o "$M" add "$IN" --json | json '["root"]')
sleep 3   # a few announcement rounds: every edge has heard of every other

sent0=$(nx o "$M" status --json | json '["sent_bytes"]')
read -r busy0 total0 < <(cpu_ticks)
t0=$(now)
nx o "$M" pin add "$root" --preposition z --json >/dev/null
held=0
while :; do
    held=$(nx o "$M" pin status "$root" --json | json '["preposition_held"]')
    [ "$held" = "$EDGES" ] && break
    if [ "$(elapsed "$t0" "$(now)" | cut -d. -f1)" -ge "$DEADLINE_S" ]; then
        echo "only $held of $EDGES edges hold it after $DEADLINE_S s" >&2; exit 1
    fi
    sleep 0.5
done
t1=$(now)
read -r busy1 total1 < <(cpu_ticks)
sent1=$(nx o "$M" status --json | json '["sent_bytes"]')

secs=$(elapsed "$t0" "$t1")
python3 - "$SIZE_MIB" "$EDGES" "$RATE_BPS" "$secs" "$sent0" "$sent1" "$busy0" "$total0" "$busy1" "$total1" "$(machine)" "$RATE" <<'PY'
import sys
size_mib, n, rate, secs, s0, s1, b0, t0, b1, t1 = (float(x) for x in sys.argv[1:11])
machine, rate_text = sys.argv[11], sys.argv[12]
f = size_mib * (1 << 20) * 8  # bits
u = rate
bound = max(f / u, n * f / (u + n * u))
cpu = 100 * (b1 - b0) / max(1, t1 - t0)
upload = (s1 - s0) / (size_mib * (1 << 20))
print(f"# distribute: {size_mib:.0f} MiB from one origin to {n:.0f} edges, every uplink {rate_text} (tbf); {machine}")
print(f"total {secs:.1f} s; swarm lower bound {bound:.1f} s; ratio {secs / bound:.2f} (goal <= 1.5)")
print(f"origin upload {upload:.2f}x the object (goal <= 2)")
print(f"machine CPU {cpu:.0f} % during the run (the bound counts while below 70 %)")
PY
