#!/usr/bin/env bash
# Re-replication after losing a node: one manager and $EDGES edges on 127.0.0.1 (release
# build), a $SIZE_MIB MiB object pinned with replicas 2; once two edges hold it, one of them is
# killed with -9, and the time until a third edge holds a complete copy is measured: detection
# (the lost node's silence reaching `node_lost_ms`, set to $LOST_MS) plus the copy itself.
# Reports both, and the copy time per GiB. Medians of $RUNS runs (fresh nodes each run).
source "$(dirname "$0")/lib.sh"
SIZE_MIB="${SIZE_MIB:-1024}"
EDGES="${EDGES:-3}"
LOST_MS="${LOST_MS:-5000}"
READY_S="${READY_S:-60}"

W=""; PIDS=(); IN="$SHM/replicas.bin"
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
    if [ -n "$W" ]; then rm -rf "$W"; fi
    W=""
}
cleanup() { stop_all; rm -f "$IN"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
mycel() { local d=$1; shift; MYCEL_DATA_DIR="$W/$d" "$M" "$@"; }
# start NODE: runs the daemon, sets PID_OF[NODE], waits until it answers.
declare -A PID_OF
start() {
    local i
    MYCEL_DATA_DIR="$W/$1" "$M" run >"$W/$1.log" 2>&1 &
    PID_OF[$1]=$!; PIDS+=("$!")
    for ((i = 0; i < READY_S * 10; i++)); do
        mycel "$1" id --json 2>/dev/null | grep -q listen_addrs && return 0
        sleep 0.1
    done
    echo "$1 not ready; log:" >&2; tail -20 "$W/$1.log" >&2; return 1
}
init() { # init NODE [args]
    local node=$1; shift
    mycel "$node" init --listen /ip4/127.0.0.1/udp/0/quic-v1 --zone z "$@" >/dev/null
    sed -i "s/^node_lost_ms = .*/node_lost_ms = $LOST_MS/; s/^announce_period_ms = .*/announce_period_ms = 1000/" "$W/$node/config.toml"
}
holders() { mycel m pin status "$1" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
print(" ".join(sorted(n["peer_id"] for n in v["nodes"] if n["state"] == "held" and n["alive"] and n["role"] == "edge")))'; }

build
mkdir -p "$BENCH_DIR" "$SHM"
python3 -c "import os,sys; sys.stdout.buffer.write(os.urandom($SIZE_MIB << 20))" >"$IN"
detect=(); copy=(); total=()
for ((run = 0; run < RUNS; run++)); do
    W=$(mktemp -d "$BENCH_DIR/replicas.XXXXXX"); PIDS=()
    init m; start m; mycel m cluster init >/dev/null
    token=$(mycel m cluster token create --role edge --zone z --uses "$EDGES" --json | json '["token"]')
    declare -A PEER=()
    for ((i = 1; i <= EDGES; i++)); do
        init "e$i" --join "$token"; start "e$i"
        PEER[e$i]=$(mycel "e$i" id --json | json '["peer_id"]')
    done
    root=$(mycel m add "$IN" --json | json '["root"]')
    mycel m pin add "$root" --replicas 2 >/dev/null
    until [ "$(holders "$root" | wc -w)" = 2 ]; do sleep 0.5; done
    before=$(holders "$root")
    victim=""
    for e in "${!PEER[@]}"; do case " $before " in *" ${PEER[$e]} "*) victim=$e; break ;; esac; done
    t0=$(now)
    kill -KILL "${PID_OF[$victim]}"
    # Detected: the planner counts the victim lost and a third edge starts copying.
    until mycel m pin status "$root" --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if any(n["state"] in ("fetching", "queued") for n in v["nodes"] if n["alive"]) else 1)'; do sleep 0.1; done
    t1=$(now)
    until [ "$(holders "$root" | wc -w)" = 2 ]; do sleep 0.1; done
    t2=$(now)
    detect+=("$(elapsed "$t0" "$t1")"); copy+=("$(elapsed "$t1" "$t2")"); total+=("$(elapsed "$t0" "$t2")")
    stop_all
done
per_gib=$(python3 -c "print(f'{$(median "${copy[@]}") * 1024 / $SIZE_MIB:.1f}')")
echo "# re-replication: $SIZE_MIB MiB, replicas 2 of $EDGES edges, node_lost_ms $LOST_MS, loopback, release; $(machine); median of $RUNS"
echo "kill to detection $(median "${detect[@]}") s; detection to a complete third copy $(median "${copy[@]}") s ($per_gib s per GiB); total $(median "${total[@]}") s"
