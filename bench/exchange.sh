#!/usr/bin/env bash
# One-peer exchange on loopback: node A adds a 2 GiB random file from /dev/shm, node B
# (bootstrapped to A, both in each other's [cluster] members) runs `mycel get` of its root into
# /dev/shm (timed, then compared by hash with the input); in the same run, quinn-bulk sends the
# same number of bytes over plain quinn with libp2p-quic's windows and cipher order into the same
# sink (a file in /dev/shm, as the get writes), its server sending one reused buffer of random
# bytes; twice more sending the input file's own bytes (the same bytes node A serves from its
# store; "the same bytes" of the issue's reference; the output compared by hash too): read into
# memory before the clock starts (the goal's reference), and read from /dev/shm as they are
# sent; once with AES-128-GCM first; once discarding the bytes (for comparison with earlier
# runs, which used that); and once with its server in a process of its own (two processes, as
# the two nodes are). Reports MB/s of each, the ratio mycel/quinn (goal >= 70%) against each,
# and the peak resident memory (VmHWM) of both daemons after the get.
# Medians of $RUNS runs; each run uses two fresh nodes. Data directories live in $BENCH_DIR.
# The get starts $SETTLE_S s after B is ready (quinn-bulk does not time its handshake either).
source "$(dirname "$0")/lib.sh"
SIZE_MIB="${SIZE_MIB:-2048}"
QB="$ROOT/target/release/quinn-bulk"
READY_S="${READY_S:-60}"
SETTLE_S="${SETTLE_S:-1}"   # after B is ready, so that the get does not time the dial

W=""; IN=""; OUT=""; OWN_IN=0; PIDS=()
# This script's own files, then lib.sh's cleanup_work (daemon logs on failure, the daemons,
# $W) with the script's exit status.
cleanup() {
    local status=$?
    if [ -n "$OUT" ]; then rm -f "$OUT"; fi
    if [ "$OWN_IN" = 1 ]; then rm -f "$IN"; fi
    cleanup_work "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mycel() { local d=$1; shift; MYCEL_DATA_DIR="$d" "$M" "$@"; }
peer_id() { mycel "$1" id --json | json '["peer_id"]'; }
free_udp_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# wait_ready DIR PID: until `mycel id --json` shows listen addresses; fails if the daemon dies.
wait_ready() {
    local d=$1 pid=$2 i addrs
    for ((i = 0; i < READY_S * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { echo "daemon $d exited; log:" >&2; tail -20 "$d.log" >&2; return 1; }
        addrs=$(mycel "$d" id --json 2>/dev/null | json '.get("listen_addrs") or ""' 2>/dev/null || true)
        [ -n "$addrs" ] && return 0
        sleep 0.1
    done
    echo "daemon $d not ready after $READY_S s; log:" >&2; tail -20 "$d.log" >&2
    return 1
}
vm_hwm_kib() {
    awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null && return 0
    echo "daemon $1 is gone after the get" >&2
    return 1
}
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

build
mkdir -p "$BENCH_DIR" "$SHM"
W=$(mktemp -d "$BENCH_DIR/exchange.XXXXXX")
# add.sh's input when it has the size; otherwise a file of our own, removed on exit.
IN="$SHM/rand.bin"; OUT="$SHM/out"
if ! { [ -f "$IN" ] && [ "$(stat -c %s "$IN")" = $((SIZE_MIB << 20)) ]; }; then
    IN="$SHM/exchange-$SIZE_MIB.bin"; OWN_IN=1
    head -c $((SIZE_MIB << 20)) /dev/urandom > "$IN"
fi
BYTES=$(stat -c %s "$IN")
SUM_IN=$(sha256sum "$IN" | cut -d' ' -f1)

MYCEL=(); QUINN=(); QUINN_IN=(); QUINN_MEM=(); QUINN_AES=(); QUINN_NULL=(); QUINN_SEP=(); HWM_A=(); HWM_B=(); SPLIT=""
for run in $(seq "$RUNS"); do
    A="$W/a$run"; B="$W/b$run"
    port=$(free_udp_port)
    mycel "$A" init --listen "/ip4/127.0.0.1/udp/$port/quic-v1" >/dev/null
    id_a=$(peer_id "$A")
    mycel "$B" init --listen /ip4/127.0.0.1/udp/0/quic-v1 \
        --bootstrap "/ip4/127.0.0.1/udp/$port/quic-v1/p2p/$id_a" >/dev/null
    id_b=$(peer_id "$B")
    set_members "$A" "$id_a" "$id_b"
    set_members "$B" "$id_a" "$id_b"

    MYCEL_DATA_DIR="$A" "$M" run >"$A.log" 2>&1 & pid_a=$!; PIDS+=("$pid_a")
    wait_ready "$A" "$pid_a"
    root=$(mycel "$A" add -q --json "$IN" | json '["root"]')
    MYCEL_DATA_DIR="$B" "$M" run >"$B.log" 2>&1 & pid_b=$!; PIDS+=("$pid_b")
    wait_ready "$B" "$pid_b"
    sync; sleep "$SETTLE_S"

    rm -f "$OUT"
    t0=$(now)
    got=$(mycel "$B" get -q --json "$root" "$OUT")
    t1=$(now)
    s=$(elapsed "$t0" "$t1")
    n=$(echo "$got" | json '["bytes"]')
    [ "$n" = "$BYTES" ] || { echo "run $run: get returned $n bytes, expected $BYTES: $got" >&2; exit 1; }
    [ "$(sha256sum "$OUT" | cut -d' ' -f1)" = "$SUM_IN" ] || { echo "run $run: output differs from input" >&2; exit 1; }
    SPLIT=$(echo "$got" | json '["by_peer"]')
    MYCEL+=("$s")
    HWM_A+=("$(vm_hwm_kib "$pid_a")"); HWM_B+=("$(vm_hwm_kib "$pid_b")")
    stop "$pid_b"; stop "$pid_a"; PIDS=()
    rm -rf "$A" "$B" "$A.log" "$B.log" "$OUT"

    # The reference writes what it receives to the same kind of file the get writes.
    QUINN+=("$("$QB" --bytes "$BYTES" --out "$OUT" | json '["seconds"]')"); rm -f "$OUT"
    # The same bytes the get moved: the input file's, loaded before the clock starts, then read
    # from /dev/shm as they are sent; each output compared with the input.
    for mode in --preload ""; do
        # shellcheck disable=SC2086 # an empty mode is no argument
        t=$("$QB" --bytes "$BYTES" --in "$IN" $mode --out "$OUT" | json '["seconds"]')
        [ "$(sha256sum "$OUT" | cut -d' ' -f1)" = "$SUM_IN" ] || { echo "run $run: quinn-bulk --in $mode output differs from input" >&2; exit 1; }
        rm -f "$OUT"
        if [ -n "$mode" ]; then QUINN_MEM+=("$t"); else QUINN_IN+=("$t"); fi
    done
    QUINN_AES+=("$("$QB" --bytes "$BYTES" --cipher aes128 --out "$OUT" | json '["seconds"]')"); rm -f "$OUT"
    QUINN_NULL+=("$("$QB" --bytes "$BYTES" | json '["seconds"]')")
    # The same, the server in a process of its own (as node A is).
    QUINN_SEP+=("$("$QB" --bytes "$BYTES" --separate --out "$OUT" | json '["seconds"]')"); rm -f "$OUT"
done

echo "# mycel exchange, one peer on loopback, $((BYTES >> 20)) MiB random from /dev/shm to /dev/shm, stores in $BENCH_DIR; $(machine); medians of $RUNS"
printf '%-36s %10s %10s\n' transfer seconds MB/s
m=$(median "${MYCEL[@]}"); q=$(median "${QUINN[@]}"); qi=$(median "${QUINN_IN[@]}")
qm=$(median "${QUINN_MEM[@]}")
qa=$(median "${QUINN_AES[@]}")
qn=$(median "${QUINN_NULL[@]}"); qs=$(median "${QUINN_SEP[@]}")
printf '%-36s %10s %10s\n' "mycel get (1 holder)" "$m" "$(mbps "$BYTES" "$m")"
printf '%-36s %10s %10s\n' "quinn-bulk (same bytes, in memory)" "$qm" "$(mbps "$BYTES" "$qm")"
printf '%-36s %10s %10s\n' "quinn-bulk (same bytes, read as sent)" "$qi" "$(mbps "$BYTES" "$qi")"
printf '%-36s %10s %10s\n' "quinn-bulk (libp2p windows, chacha)" "$q" "$(mbps "$BYTES" "$q")"
printf '%-36s %10s %10s\n' "quinn-bulk (libp2p windows, aes128)" "$qa" "$(mbps "$BYTES" "$qa")"
printf '%-36s %10s %10s\n' "quinn-bulk (chacha, bytes discarded)" "$qn" "$(mbps "$BYTES" "$qn")"
printf '%-36s %10s %10s\n' "quinn-bulk (chacha, two processes)" "$qs" "$(mbps "$BYTES" "$qs")"
pct() { python3 -c "print(f'{100 * $1 / $m:.0f}')"; }
echo "mycel / quinn-bulk sending the same bytes from memory (same windows, cipher and sink): $(pct "$qm")% (goal >= 70%); against the same bytes read from the file as sent: $(pct "$qi")%; against one reused buffer: $(pct "$q")%; against discarding: $(pct "$qn")%; against two processes: $(pct "$qs")%; by_peer of the last run: $SPLIT"
echo "VmHWM after the get: node A (sender) $(median "${HWM_A[@]}" | cut -d. -f1) KiB, node B (fetcher) $(median "${HWM_B[@]}" | cut -d. -f1) KiB"
