#!/usr/bin/env bash
# Pins at scale on a 3-manager cluster on loopback (data in $BENCH_DIR, on disk).
#
# 1. $SMALL (100,000) pins in one `POST /v1/pins:batch` to the leader (the daemon proposes them
#    as entries of 10,000): seconds until the answer (applied on the leader), and until all
#    three managers show them. Goal (issue): <= 10 s.
# 2. A fresh cluster gets $BIG (1,000,000) pins in $BIG/10,000 requests of 10,000 (one client,
#    one connection, in a row): total seconds, per-request p50/max, seconds until all managers
#    show them; then each manager's VmHWM/VmRSS and raft.redb size.
# 3. Restart from the log: SIGTERM all managers, start them again, seconds until they agree on a
#    leader and all show $BIG pins (no snapshot exists yet: snapshots come every 10,000 entries
#    or at a configuration change, and $BIG pins are only $BIG/10,000 entries).
# 4. Snapshot and restore through the quorum: a 4th manager joins; the configuration change
#    (learner) makes every manager snapshot the $BIG-pin state (a mycel object; the log is
#    compacted) and the newcomer restores it through the exchange. Seconds from the newcomer's
#    `run` until it shows $BIG pins, and until it is a voter; raft.redb sizes after compaction.
# 5. Restart from the snapshot: all 4 managers again, seconds until all show $BIG pins.
# 6. The snapshot offline (`mycel-quorum-bench snapshot`): state bytes, encode, cut into an
#    object, decode, for $BIG pins applied as the quorum applies them.
# Goals (issue): snapshot and restore <= 10 s. Report on stdout and in bench/results/pins.txt.
source "$(dirname "$0")/lib.sh"
SMALL="${SMALL:-100000}"
BIG="${BIG:-1000000}"
PORT0="${PORT0:-47011}"        # managers: PORT0..PORT0+3 (UDP)
READY_S="${READY_S:-60}"
WAIT_S="${WAIT_S:-600}"        # limit for each "until all show N pins"
QB_BIN="$ROOT/target/release/mycel-quorum-bench"
RESULTS="$ROOT/bench/results/pins.txt"

W=""; PIDS=()
trap cleanup_work EXIT
trap 'exit 130' INT TERM

mycel() { local d=$1; shift; MYCEL_DATA_DIR="$d" "$M" "$@"; }

write_client() {
    cat > "$W/qb.py" <<'PY'
import http.client, json, math, socket, sys, time

class UnixConn(http.client.HTTPConnection):
    def __init__(self, path, timeout=120):
        super().__init__("localhost", timeout=timeout); self.unix_path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(self.timeout)
        s.connect(self.unix_path); self.sock = s

def view(sock):
    try:
        c = UnixConn(sock, timeout=5); c.request("GET", "/v1/cluster")
        r = c.getresponse(); d = json.loads(r.read()); c.close(); return d
    except Exception:
        return None

def pct(xs, p): xs = sorted(xs); return xs[max(0, math.ceil(p * len(xs)) - 1)]

cmd = sys.argv[1]
if cmd in ("post", "try"):  # post SOCK FILE...: one connection, files in a row (try: errors as JSON)
    conn = UnixConn(sys.argv[2]); times = []; pinned = 0; t0 = time.perf_counter()
    for path in sys.argv[3:]:
        body = open(path, "rb").read(); t = time.perf_counter()
        try:
            conn.request("POST", "/v1/pins:batch", body, {"content-type": "application/json"})
            r = conn.getresponse(); data = r.read(); status = r.status
        except OSError as e:
            # The daemon may answer and close while the body is still going out: read the answer.
            status, data = None, repr(e).encode()
            try:
                r = http.client.HTTPResponse(conn.sock); r.begin(); status, data = r.status, r.read()
            except Exception:
                pass
        times.append(time.perf_counter() - t)
        if status != 200:
            why = f"{len(body)}-byte body: HTTP {status} {data[:200].decode(errors='replace').strip()}"
            if cmd == "try":
                print(json.dumps({"error": why, "s": round(times[-1], 3)})); sys.exit(0)
            sys.exit(f"{path}: {why}")
        pinned += json.loads(data)["pinned"]
    total = time.perf_counter() - t0
    print(json.dumps({"pinned": pinned, "requests": len(times), "total_s": round(total, 3),
                      "p50_s": round(pct(times, .5), 3), "max_s": round(max(times), 3)}))
elif cmd == "wait":  # wait N LIMIT_S T0 SOCK...: until every SOCK shows >= N pins and one leader
    n, limit, t0 = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    while True:
        vs = [view(s) for s in sys.argv[5:]]
        now = time.time() - t0
        if all(v and v.get("pins", 0) >= n and v.get("leader") for v in vs) and len({v["leader"] for v in vs}) == 1:
            print(round(now, 3)); break
        if now > limit:
            print(f"timeout after {limit} s: pins {[v and v.get('pins') for v in vs]}", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.05)
elif cmd == "voter":  # voter LIMIT_S T0 SOCK PEER: until SOCK sees PEER as a connected voter
    limit, t0, sock, peer = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
    while True:
        v = view(sock); now = time.time() - t0
        if v and any(m["peer_id"] == peer and m["raft"] in ("voter", "leader") for m in v["members"]):
            print(round(now, 3)); break
        if now > limit: sys.exit(f"not a voter after {limit} s")
        time.sleep(0.05)
elif cmd == "leader":  # leader SOCK: the leader's peer id
    v = view(sys.argv[2]); print([m["peer_id"] for m in v["members"] if m["raft_id"] == v["leader"]][0])
PY
}
qb() { python3 "$W/qb.py" "$@"; }

MD=(); MPID=(); MSOCK=()
wait_ready() {
    local d=$1 pid=$2 i addrs
    for ((i = 0; i < READY_S * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || { echo "daemon $d exited" >&2; return 1; }
        addrs=$(mycel "$d" id --json 2>/dev/null | json '.get("listen_addrs") or ""' 2>/dev/null || true)
        [ -n "$addrs" ] && return 0
        sleep 0.1
    done
    echo "daemon $d not ready after $READY_S s" >&2; return 1
}
mycel_start() { # mycel_start I (no wait)
    local d=${MD[$1]}
    MYCEL_DATA_DIR="$d" "$M" run >>"$d.log" 2>&1 &
    MPID[$1]=$!; PIDS+=("$!")
}
mycel_stop() { kill -TERM "${MPID[$1]}" 2>/dev/null || true; wait "${MPID[$1]}" 2>/dev/null || true; }
peer_of() { mycel "${MD[$1]}" id --json | json '["peer_id"]'; }
leader_index() {
    local p i
    p=$(qb leader "${MSOCK[0]}")
    for i in "${!MD[@]}"; do [ "$(peer_of "$i")" = "$p" ] && { echo "$i"; return 0; }; done
    return 1
}
# new_cluster TAG: 3 fresh managers in $W/TAG-0..2, settled.
new_cluster() {
    local tag=$1 i tok
    MD=(); MPID=(); MSOCK=()
    for i in 0 1 2; do MD[$i]="$W/$tag-$i"; MSOCK[$i]="$W/$tag-$i/mycel.sock"; done
    mycel "${MD[0]}" init --listen "/ip4/127.0.0.1/udp/$PORT0/quic-v1" >/dev/null
    mycel_start 0; wait_ready "${MD[0]}" "${MPID[0]}"
    mycel "${MD[0]}" cluster init --json >/dev/null
    tok=$(mycel "${MD[0]}" cluster token create --role manager --uses 2 --json | json '["token"]')
    for i in 1 2; do
        mycel "${MD[$i]}" init --listen "/ip4/127.0.0.1/udp/$((PORT0 + i))/quic-v1" --join "$tok" >/dev/null
        mycel_start "$i"; wait_ready "${MD[$i]}" "${MPID[$i]}"
    done
    qb wait 0 "$READY_S" "$(date +%s.%N)" "${MSOCK[@]}" >/dev/null
    for i in 1 2; do qb voter "$READY_S" "$(date +%s.%N)" "${MSOCK[0]}" "$(peer_of "$i")" >/dev/null; done
}
status_kib() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }
mib() { python3 -c "print(f'{$1 / 1024:.0f}')"; }
redb_mib() { echo "$(du -m --apparent-size "$1/raft.redb" | cut -f1)/$(du -m "$1/raft.redb" | cut -f1)"; }
du_mib() { du -sm "$1" | cut -f1; }
mem_line() { # mem_line LABEL: VmHWM/VmRSS MiB of each running manager
    local i out=""
    for i in "${!MD[@]}"; do
        kill -0 "${MPID[$i]}" 2>/dev/null || continue
        out+=" m$i $(mib "$(status_kib "${MPID[$i]}" VmHWM)")/$(mib "$(status_kib "${MPID[$i]}" VmRSS)")"
    done
    echo "$out"
}
redb_line() { local i out=""; for i in "${!MD[@]}"; do out+=" m$i $(redb_mib "${MD[$i]}")"; done; echo "$out"; }

build
[ -x "$QB_BIN" ] || { echo "missing $QB_BIN" >&2; exit 1; }
mkdir -p "$BENCH_DIR" "$(dirname "$RESULTS")"
W=$(mktemp -d "$BENCH_DIR/pins.XXXXXX")
write_client
echo "writing pin bodies: $SMALL in one file, $BIG in files of 10,000" >&2
"$QB_BIN" cids --count "$SMALL" --per-file "$SMALL" --start 0 --out "$W/one" >/dev/null
nsmall=$("$QB_BIN" cids --count "$SMALL" --per-file 10000 --start 50000000 --out "$W/small")
SMALL_FILES=(); for ((f = 0; f < nsmall; f++)); do SMALL_FILES+=("$W/small.$f.json"); done
nbig=$("$QB_BIN" cids --count "$BIG" --per-file 10000 --start 100000000 --out "$W/big")
BIG_FILES=(); for ((f = 0; f < nbig; f++)); do BIG_FILES+=("$W/big.$f.json"); done

# 1. 100k in one request (if the daemon takes a body that size), then in requests of 10,000.
echo "1. $SMALL pins in one request, then $SMALL others in $nsmall requests of 10,000" >&2
new_cluster s
li=$(leader_index)
S_ONE=$(qb try "${MSOCK[$li]}" "$W/one.0.json")
echo "   one request: $S_ONE" >&2
have=$(echo "$S_ONE" | json '.get("pinned", 0)')
t0=$(date +%s.%N)
S_POST=$(qb post "${MSOCK[$li]}" "${SMALL_FILES[@]}")
S_ALL=$(qb wait "$((have + SMALL))" "$WAIT_S" "$t0" "${MSOCK[@]}")
S_MEM=$(mem_line)
echo "   $S_POST; all managers after $S_ALL s; VmHWM/VmRSS MiB:$S_MEM" >&2
for i in 0 1 2; do mycel_stop "$i"; done

# 2. 1M in 100 requests.
echo "2. $BIG pins in $nbig requests of 10,000" >&2
new_cluster b
li=$(leader_index)
t0=$(date +%s.%N)
B_POST=$(qb post "${MSOCK[$li]}" "${BIG_FILES[@]}")
B_ALL=$(qb wait "$BIG" "$WAIT_S" "$t0" "${MSOCK[@]}")
B_MEM=$(mem_line); B_REDB=$(redb_line)
echo "   $B_POST; all managers after $B_ALL s; VmHWM/VmRSS MiB:$B_MEM; raft.redb MiB:$B_REDB" >&2

# 3. Restart from the log.
echo "3. restart of all managers (log replay)" >&2
t0=$(date +%s.%N); for i in 0 1 2; do mycel_stop "$i"; done; R1_STOP=$(elapsed "$t0" "$(date +%s.%N)")
t0=$(date +%s.%N); for i in 0 1 2; do mycel_start "$i"; done
R1=$(qb wait "$BIG" "$WAIT_S" "$t0" "${MSOCK[@]}")
R1_MEM=$(mem_line)
echo "   stop $R1_STOP s; all back with $BIG pins after $R1 s; VmHWM/VmRSS MiB:$R1_MEM" >&2

# 4. A 4th manager: snapshot at the configuration change, restore on the newcomer.
echo "4. a 4th manager joins (snapshot + restore)" >&2
li=$(leader_index)
tok=$(mycel "${MD[$li]}" cluster token create --role manager --uses 1 --json | json '["token"]')
MD[3]="$W/b-3"; MSOCK[3]="$W/b-3/mycel.sock"
mycel "${MD[3]}" init --listen "/ip4/127.0.0.1/udp/$((PORT0 + 3))/quic-v1" --join "$tok" >/dev/null
t0=$(date +%s.%N); mycel_start 3
J_PINS=$(qb wait "$BIG" "$WAIT_S" "$t0" "${MSOCK[3]}")
J_VOTER=$(qb voter "$WAIT_S" "$t0" "${MSOCK[$li]}" "$(peer_of 3)")
sleep 2
J_MEM=$(mem_line); J_REDB=$(redb_line); J_DU=$(du_mib "${MD[3]}")
echo "   newcomer shows $BIG pins after $J_PINS s, voter after $J_VOTER s; VmHWM/VmRSS MiB:$J_MEM; raft.redb MiB:$J_REDB; newcomer data dir $J_DU MiB" >&2

# 5. Restart from the snapshot.
echo "5. restart of all 4 managers (from the snapshot)" >&2
t0=$(date +%s.%N); for i in 0 1 2 3; do mycel_stop "$i"; done; R2_STOP=$(elapsed "$t0" "$(date +%s.%N)")
t0=$(date +%s.%N); for i in 0 1 2 3; do mycel_start "$i"; done
R2=$(qb wait "$BIG" "$WAIT_S" "$t0" "${MSOCK[@]}")
R2_MEM=$(mem_line)
echo "   stop $R2_STOP s; all back with $BIG pins after $R2 s; VmHWM/VmRSS MiB:$R2_MEM" >&2
for i in 0 1 2 3; do mycel_stop "$i"; done

# 6. The snapshot offline.
echo "6. snapshot of $BIG pins offline" >&2
SNAP=$("$QB_BIN" snapshot --pins "$BIG")
echo "   $SNAP" >&2

f() { echo "$1" | json "[\"$2\"]"; }
{
    echo "# $(machine); $(date -u +%FT%TZ)"
    echo "# 3 managers on loopback (tick_ms=100, election_ticks=10), data in $BENCH_DIR; one client on the leader's admin socket"
    printf '%-62s %s\n' "figure" "result"
    printf '%-62s %s\n' "$SMALL pins, 1 request: answered (s) [goal <= 10]" "$(echo "$S_ONE" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("total_s") or "refused: " + d["error"])')"
    printf '%-62s %s\n' "$SMALL pins, $nsmall requests of 10,000: answered (s) [goal <= 10]" "$(f "$S_POST" total_s)"
    printf '%-62s %s\n' "  per request p50 / max (s)" "$(f "$S_POST" p50_s) / $(f "$S_POST" max_s)"
    printf '%-62s %s\n' "$SMALL pins ($nsmall requests): all 3 managers show them (s)" "$S_ALL"
    printf '%-62s %s\n' "  VmHWM/VmRSS per manager (MiB)" "$S_MEM"
    printf '%-62s %s\n' "$BIG pins, $nbig requests of 10,000: total (s)" "$(f "$B_POST" total_s)"
    printf '%-62s %s\n' "  per request p50 / max (s)" "$(f "$B_POST" p50_s) / $(f "$B_POST" max_s)"
    printf '%-62s %s\n' "$BIG pins: all 3 managers show them (s)" "$B_ALL"
    printf '%-62s %s\n' "  VmHWM/VmRSS per manager (MiB)" "$B_MEM"
    printf '%-62s %s\n' "  raft.redb per manager, size/allocated (MiB), log only" "$B_REDB"
    printf '%-62s %s\n' "restart all 3 from the log: stop (s)" "$R1_STOP"
    printf '%-62s %s\n' "restart all 3 from the log: leader + $BIG pins on all (s)" "$R1"
    printf '%-62s %s\n' "  VmHWM/VmRSS per manager after restart (MiB)" "$R1_MEM"
    printf '%-62s %s\n' "4th manager joins: shows $BIG pins (s) [snapshot+restore]" "$J_PINS"
    printf '%-62s %s\n' "4th manager joins: voter (s)" "$J_VOTER"
    printf '%-62s %s\n' "  VmHWM/VmRSS per manager after the join (MiB)" "$J_MEM"
    printf '%-62s %s\n' "  raft.redb per manager after the snapshot, size/allocated (MiB)" "$J_REDB"
    printf '%-62s %s\n' "  newcomer's data directory, allocated (MiB)" "$J_DU"
    printf '%-62s %s\n' "restart all 4 from the snapshot: stop (s)" "$R2_STOP"
    printf '%-62s %s\n' "restart all 4 from the snapshot: leader + $BIG pins on all (s)" "$R2"
    printf '%-62s %s\n' "  VmHWM/VmRSS per manager after restart (MiB)" "$R2_MEM"
    printf '%-62s %s\n' "offline: state of $BIG pins (MB)" "$(python3 -c "print(f'{$(f "$SNAP" state_bytes) / 1e6:.1f}')")"
    printf '%-62s %s\n' "offline: encode / cut into object / decode (s)" "$(python3 -c "print(f'{$(f "$SNAP" encode_s):.3f} / {$(f "$SNAP" object_s):.3f} / {$(f "$SNAP" decode_s):.3f}')")"
    printf '%-62s %s\n' "offline: object blocks; peak RSS of the tool (MiB)" "$(f "$SNAP" object_blocks); $(mib "$(f "$SNAP" vm_hwm_kib)")"
    echo "# raw: small, one request $S_ONE"
    echo "# raw: small $S_POST"
    echo "# raw: big $B_POST"
    echo "# raw: snapshot $SNAP"
} | tee "$RESULTS"
