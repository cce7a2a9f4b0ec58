#!/usr/bin/env bash
# Fan-in: one fetcher pulls a 256 MiB random file from 1, 2 and 4 holders, each node in its own
# network namespace. Topology (only namespaces and links this script creates, all named
# mycelfan-*): a bridge in namespace mycelfan-br; per node a veth pair, eth0 in the node's
# namespace with 10.77.0.N/24, the other end on the bridge. Each holder's uplink (egress of its
# eth0) is capped with `tc tbf rate 100mbit burst 256kb latency 50ms`; the fetcher is uncapped.
# Per trial every node is fresh: the holders add the same file (same bytes, same root) and run
# `mycel run` on 10.77.0.N:4001; the fetcher bootstraps to all of them, and after $SETTLE_S s
# its `mycel get --json` is timed; all nodes list each other in [cluster] members.
# Reports MB/s for 1, 2 and 4 holders, the by_peer split, and the ratio 4-holder/1-holder
# (goal >= 3.5). Medians of $RUNS runs. Must run as root; removes its namespaces, processes and
# data on exit and on start (re-runnable after an interrupted run).
# `fanin.sh --net-only` builds the network, measures each holder's capped uplink (alone, then
# all at once) with 3 s TCP streams to the fetcher, and tears it down (no mycel needed).
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/netns.sh"
SIZE_MIB="${SIZE_MIB:-256}"
HOLDERS="${HOLDERS:-1 2 4}"
RATE="${RATE:-100mbit}"
SETTLE_S="${SETTLE_S:-2}"
READY_S="${READY_S:-60}"
PORT=4001
NET=10.77.0
PFX=mycelfan
FETCHER=f
ALL_NODES=(f h1 h2 h3 h4)

if [ "$(id -u)" != 0 ]; then
    echo "fanin.sh must run as root (it creates network namespaces and tc qdiscs)" >&2
    exit 1
fi
for tool in ip tc; do command -v "$tool" >/dev/null || { echo "fanin.sh needs $tool (iproute2)" >&2; exit 1; }; done

addr() { case $1 in f) echo "$NET.10" ;; h*) echo "$NET.$((10 + ${1#h}))" ;; esac; }

W=""; IN="$SHM/fanin.bin"; OUT="$SHM/fanin.out"; PIDS=()
cleanup() {
    kill_pids "${PIDS[@]}"
    teardown_net
    if [ -n "$W" ]; then rm -rf "$W"; fi
    rm -f "$IN" "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

setup_net() {
    local node
    net_bridge
    for node in "${ALL_NODES[@]}"; do
        # The holders' uplinks are capped; the fetcher's is not.
        if [ "$node" = "$FETCHER" ]; then net_node "$node" ""; else net_node "$node" "$RATE"; fi
    done
    for node in "${ALL_NODES[@]}"; do
        [ "$node" = "$FETCHER" ] && continue
        reachable "$FETCHER" "$node" || { echo "no route from the fetcher to $node ($(addr "$node"))" >&2; exit 1; }
    done
}
# net_check: each holder alone, then all holders at once, send to the fetcher over TCP for 3 s;
# prints the rates the fetcher sees (each should be the cap; together, the caps' sum).
net_check() {
    local holders=() node
    for node in "${ALL_NODES[@]}"; do [ "$node" = "$FETCHER" ] || holders+=("$node"); done
    for node in "${holders[@]}"; do net_send "$node"; done
    net_send "${holders[@]}"
}
net_send() {
    local node
    ip netns exec "$(ns "$FETCHER")" python3 -c '
import socket, sys, threading, time
srv = socket.create_server((sys.argv[1], 5201)); srv.settimeout(10); names = sys.argv[2:]
got = {}  # ip -> (bytes, first byte, end)
def sink(c, ip):
    n, buf, t0 = 0, bytearray(1 << 20), None
    while (k := c.recv_into(buf)):
        t0 = t0 or time.monotonic(); n += k
    got[ip] = (n, t0, time.monotonic())
threads = []
for _ in names:
    c, (ip, _) = srv.accept()
    th = threading.Thread(target=sink, args=(c, ip)); th.start(); threads.append(th)
for th in threads:
    th.join()
rate = lambda n, s: f"{n * 8 / 1e6 / s:.1f}"
line = ", ".join(f"{ip}: {rate(n, t1 - t0)}" for ip, (n, t0, t1) in sorted(got.items()))
if len(got) > 1:
    line += f"; sum {sum(n * 8 / 1e6 / (t1 - t0) for n, t0, t1 in got.values()):.1f}"
print(line + " Mbit/s")
' "$(addr "$FETCHER")" "$@" &
    local rx=$!
    sleep 0.5
    for node in "$@"; do
        ip netns exec "$(ns "$node")" python3 -c '
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5201)); buf = b"x" * (1 << 16); end = time.monotonic() + 3
while time.monotonic() < end:
    s.sendall(buf)
s.close()' "$(addr "$FETCHER")" &
    done
    wait "$rx"
    wait
}

# trial K: fresh fetcher and K holders; sets TRIAL_S (seconds of the get) and TRIAL_SPLIT
# (by_peer in percent, holders by name).
trial() {
    local k=$1 node ids=() boot=() names="{}" t0 t1 got i
    rm -rf "${W:?}"/[fh]*
    for ((i = 1; i <= k; i++)); do
        nx "h$i" "$M" init --listen "/ip4/$(addr "h$i")/udp/$PORT/quic-v1" >/dev/null
        ids+=("$(nx "h$i" "$M" id --json | json '["peer_id"]')")
        boot+=(--bootstrap "/ip4/$(addr "h$i")/udp/$PORT/quic-v1/p2p/${ids[$((i - 1))]}")
        names=$(echo "$names" | json "| {'${ids[$((i - 1))]}': 'h$i'}")
    done
    nx "$FETCHER" "$M" init --listen "/ip4/$(addr "$FETCHER")/udp/$PORT/quic-v1" "${boot[@]}" >/dev/null
    ids+=("$(nx "$FETCHER" "$M" id --json | json '["peer_id"]')")
    for node in "$FETCHER" $(seq -f 'h%g' 1 "$k"); do set_members "$W/$node" "${ids[@]}"; done

    for ((i = 1; i <= k; i++)); do
        start "h$i"
        nx "h$i" "$M" add -q --json "$IN" | json '["root"]' >"$W/root.h$i"
    done
    for ((i = 2; i <= k; i++)); do
        cmp -s "$W/root.h1" "$W/root.h$i" || { echo "holders disagree on the root" >&2; exit 1; }
    done
    start "$FETCHER"
    sleep "$SETTLE_S"

    rm -f "$OUT"
    t0=$(now)
    got=$(nx "$FETCHER" "$M" get -q --json "$(cat "$W/root.h1")" "$OUT")
    t1=$(now)
    [ "$(echo "$got" | json '["bytes"]')" = "$BYTES" ] || { echo "get with $k holders: $got" >&2; exit 1; }
    cmp -s "$IN" "$OUT" || { echo "get with $k holders: output differs from input" >&2; exit 1; }
    kill_pids "${PIDS[@]}"; PIDS=()
    rm -f "$OUT"
    TRIAL_S=$(elapsed "$t0" "$t1")
    TRIAL_SPLIT=$(echo "$got" | python3 -c "
import json, sys
names = json.loads(sys.argv[1]); by = json.load(sys.stdin)['by_peer']; total = sum(by.values()) or 1
print(','.join(f'{names.get(p, p[-6:])}={100 * b / total:.0f}%' for p, b in sorted(by.items(), key=lambda x: names.get(x[0], x[0]))))
" "$names")
}

mkdir -p "$BENCH_DIR" "$SHM"
teardown_net
setup_net
if [ "${1:-}" = --net-only ]; then
    echo "# fan-in network only: holders capped at $RATE (tbf), fetcher uncapped; $(machine)"
    net_check
    exit 0
fi
build
W=$(mktemp -d "$BENCH_DIR/fanin.XXXXXX")
head -c $((SIZE_MIB << 20)) /dev/urandom >"$IN"
BYTES=$(stat -c %s "$IN")

declare -A T SPLIT
for run in $(seq "$RUNS"); do
    for k in $HOLDERS; do
        trial "$k"
        T[$k]="${T[$k]:-} $TRIAL_S"; SPLIT[$k]=$TRIAL_SPLIT
    done
done

echo "# mycel fan-in, $((BYTES >> 20)) MiB random, holders capped at $RATE each (tbf), fetcher uncapped, one netns per node; $(machine); medians of $RUNS"
printf '%-8s %10s %10s   %s\n' holders seconds MB/s "by_peer (last run)"
for k in $HOLDERS; do
    # shellcheck disable=SC2086
    s=$(median ${T[$k]})
    printf '%-8s %10s %10s   %s\n' "$k" "$s" "$(mbps "$BYTES" "$s")" "${SPLIT[$k]}"
done
if [[ " $HOLDERS " == *" 1 "* && " $HOLDERS " == *" 4 "* ]]; then
    # shellcheck disable=SC2086
    echo "4 holders / 1 holder: $(python3 -c "print(f'{$(median ${T[1]}) / $(median ${T[4]}):.2f}')") (goal >= 3.5)"
fi
