# Network-namespace helpers for the multi-host benchmarks (sourced after lib.sh). The caller
# sets PFX (prefix of every namespace it creates), W (work directory with one data directory
# per node), READY_S, an addr NODE function, and the array PIDS.

ns() { echo "$PFX-$1"; }
# nx NODE CMD...: runs CMD in NODE's namespace with NODE's data directory.
nx() { local node=$1; shift; MYCEL_DATA_DIR="$W/$node" ip netns exec "$(ns "$node")" "$@"; }
kill_pids() {
    local pid
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
# Removes this script's namespaces (and so their veths and the bridge); processes still inside
# them (only ours: from an interrupted run of this script) are ended first, by PID.
teardown_net() {
    local n pids
    for n in $(ip netns list | awk -v p="^$PFX-" '$1 ~ p {print $1}'); do
        pids=$(ip netns pids "$n" 2>/dev/null || true)
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true; sleep 1
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$n"
    done
}
# reachable FROM TO: a TCP connect to a closed port comes back refused when TO answers at all
# (no ping needed).
reachable() {
    ip netns exec "$(ns "$1")" python3 -c '
import socket, sys
s = socket.create_connection
try:
    s((sys.argv[1], 9), timeout=2)
except ConnectionRefusedError:
    pass' "$(addr "$2")" 2>/dev/null
}
# start NODE: `mycel run` in NODE's namespace; waits until `mycel id --json` shows addresses.
# (A simple command, not the nx function, so that $! is the daemon: ip netns exec execs it.)
start() {
    local node=$1 pid i addrs
    MYCEL_DATA_DIR="$W/$node" ip netns exec "$(ns "$node")" "$M" run >"$W/$node.log" 2>&1 &
    pid=$!; PIDS+=("$pid")
    for ((i = 0; i < READY_S * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { echo "$node exited; log:" >&2; tail -20 "$W/$node.log" >&2; return 1; }
        addrs=$(nx "$node" "$M" id --json 2>/dev/null | json '.get("listen_addrs") or ""' 2>/dev/null || true)
        [ -n "$addrs" ] && return 0
        sleep 0.1
    done
    echo "$node not ready after $READY_S s; log:" >&2; tail -20 "$W/$node.log" >&2
    return 1
}
# net_bridge: the namespace $PFX-br with the bridge br0 every node's veth attaches to.
net_bridge() {
    ip netns add "$PFX-br"
    ip -n "$PFX-br" link add br0 type bridge
    ip -n "$PFX-br" link set br0 up
    ip -n "$PFX-br" link set lo up
}
# net_node NODE RATE: NODE's namespace, eth0 with $(addr NODE)/24 on the bridge; a non-empty
# RATE caps its uplink (egress of its own eth0) with `tc tbf rate RATE burst 256kb latency 50ms`.
net_node() {
    local node=$1 rate=$2 n
    n=$(ns "$node")
    ip netns add "$n"
    ip -n "$PFX-br" link add "veth-$node" type veth peer name eth0 netns "$n"
    ip -n "$PFX-br" link set "veth-$node" master br0 up
    ip -n "$n" link set lo up
    ip -n "$n" addr add "$(addr "$node")/24" dev eth0
    ip -n "$n" link set eth0 up
    if [ -n "$rate" ]; then
        ip netns exec "$n" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 50ms
    fi
}
