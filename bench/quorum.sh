#!/usr/bin/env bash
# The management quorum against etcd, on one machine in one run.
#
# 1. Commit latency of single changes: 3 mycel managers on loopback, one client (a Python loop
#    keeping one connection to the admin socket) posting `POST /v1/pins:batch` with one pin per
#    request, $N requests in a row, each answered once the change is committed and applied
#    (after 10 unmeasured warm-up requests). Sent once to the leader and once to a follower
#    (which forwards the proposal). Then the same against a 3-member etcd (Debian etcd-server,
#    installed if missing): `POST /v3/kv/put` of one key through etcd's HTTP/JSON gateway, one
#    kept-alive connection, to the leader and to a follower. Both keep their data in
#    $BENCH_DIR (disk, not tmpfs); only one of the two clusters runs at a time.
# 2. Failover: `kill -9` of the leader, then every 20 ms each surviving member is asked who leads
#    ($FAILOVERS times; the killed member is restarted and rejoins between rounds). "first" is
#    the time until one survivor names a new leader, "all" until both name the same one.
#    mycel's Raft timing is tick_ms=$TICK_MS x election_ticks=$ELECTION_TICKS (defaults 100 x 10,
#    the shipped config); etcd runs with its defaults (heartbeat 100 ms, election 1000 ms).
#
# Goal (issue): mycel p50 and p99 at or below etcd's. Report on stdout and in
# bench/results/quorum.txt.
source "$(dirname "$0")/lib.sh"
N="${N:-300}"
FAILOVERS="${FAILOVERS:-3}"
TICK_MS="${TICK_MS:-100}"
ELECTION_TICKS="${ELECTION_TICKS:-10}"
PORT0="${PORT0:-47001}"        # mycel managers: PORT0, PORT0+1, PORT0+2 (UDP)
ETCD_PORT0="${ETCD_PORT0:-47101}" # etcd: clients 47101..47103, peers 47111..47113
READY_S="${READY_S:-60}"
RESULTS="$ROOT/bench/results/quorum.txt"

W=""; PIDS=()
trap cleanup_work EXIT
trap 'exit 130' INT TERM

mycel() { local d=$1; shift; MYCEL_DATA_DIR="$d" "$M" "$@"; }
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# The client: latency loops and failover polls for both systems, standard library only.
write_client() {
    cat > "$W/qb.py" <<'PY'
import base64, hashlib, http.client, json, math, os, signal, socket, statistics, sys, time

class UnixConn(http.client.HTTPConnection):
    def __init__(self, path, timeout=35):
        super().__init__("localhost", timeout=timeout); self.unix_path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(self.timeout)
        s.connect(self.unix_path); self.sock = s

def cid(i, salt):
    d = hashlib.sha256(salt.encode() + i.to_bytes(8, "little")).digest()
    return "b" + base64.b32encode(bytes([1, 0x55, 0x1e, 0x20]) + d).decode().lower().rstrip("=")

def call(conn, method, path, body=None, headers={}):
    conn.request(method, path, body, headers); r = conn.getresponse(); data = r.read()
    if r.status != 200: raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")
    return data

def pct(xs, p): return xs[max(0, math.ceil(p * len(xs)) - 1)]

def summary(lat):
    lat = sorted(lat)
    return {"n": len(lat), "p50_ms": round(pct(lat, .5), 2), "p90_ms": round(pct(lat, .9), 2),
            "p99_ms": round(pct(lat, .99), 2), "max_ms": round(lat[-1], 2),
            "mean_ms": round(statistics.mean(lat), 2)}

def latency(kind, target, n, salt, warmup=10):
    if kind == "mycel":
        conn = UnixConn(target)
        def one(i):
            body = json.dumps([{"root": cid(i, salt), "replicas_min": 1, "replicas_max": 3}])
            d = json.loads(call(conn, "POST", "/v1/pins:batch", body, {"content-type": "application/json"}))
            assert d.get("pinned") == 1, d
    else:
        host, port = target.split(":"); conn = http.client.HTTPConnection(host, int(port), timeout=35)
        def one(i):
            body = json.dumps({"key": base64.b64encode(f"bench/{salt}/{i}".encode()).decode(),
                               "value": base64.b64encode(b"x" * 64).decode()})
            d = json.loads(call(conn, "POST", "/v3/kv/put", body, {"content-type": "application/json"}))
            assert "header" in d, d
    lat = []
    for i in range(n + warmup):
        t = time.perf_counter(); one(i); dt = (time.perf_counter() - t) * 1000
        if i >= warmup: lat.append(dt)
    return summary(lat)

def leader_of(kind, target):
    """The leader a member names (mycel raft id / etcd member id), or None."""
    try:
        if kind == "mycel":
            c = UnixConn(target, timeout=2); d = json.loads(call(c, "GET", "/v1/cluster")); c.close()
            return d.get("leader") or None
        host, port = target.split(":"); c = http.client.HTTPConnection(host, int(port), timeout=2)
        d = json.loads(call(c, "POST", "/v3/maintenance/status", "{}")); c.close()
        return d.get("leader") or None
    except Exception:
        return None

def failover(kind, pid, old, targets):
    old = str(old); t0 = time.perf_counter(); os.kill(pid, signal.SIGKILL); first = None
    slowest = 0.0
    while True:
        seen = []
        for t in targets:
            a = time.perf_counter(); seen.append(leader_of(kind, t)); slowest = max(slowest, time.perf_counter() - a)
        now = time.perf_counter() - t0
        new = [l for l in seen if l is not None and str(l) != old]
        if first is None and new: first = now
        if len(new) == len(seen) and len(set(map(str, new))) == 1:
            return {"first_s": round(first, 3), "all_s": round(now, 3), "new_leader": str(new[0]),
                    "slowest_poll_ms": round(slowest * 1000, 1)}
        if now > 60: return {"first_s": first, "all_s": None, "seen": seen}
        time.sleep(0.02)

cmd = sys.argv[1]
if cmd == "latency":
    print(json.dumps(latency(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])))
elif cmd == "failover":
    print(json.dumps(failover(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])))
elif cmd == "leader":
    print(leader_of(sys.argv[2], sys.argv[3]) or "")
PY
}
qb() { python3 "$W/qb.py" "$@"; }

# ---- mycel -------------------------------------------------------------------------------
MD=(); MPID=(); MSOCK=()
# wait_ready DIR PID
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
mycel_start() { # mycel_start I
    local i=$1 d=${MD[$1]}
    MYCEL_DATA_DIR="$d" "$M" run >>"$d.log" 2>&1 &
    MPID[$i]=$!; PIDS+=("$!")
    wait_ready "$d" "${MPID[$i]}"
}
# mycel_settled: every running manager names the same leader, and it sees 3 connected voters.
mycel_settled() {
    local i t
    for ((t = 0; t < READY_S * 10; t++)); do
        if python3 - "${MSOCK[@]}" <<'PY'
import sys, json, socket, http.client
class U(http.client.HTTPConnection):
    def __init__(s, p): super().__init__("x", timeout=2); s.p = p
    def connect(s): s.sock = socket.socket(socket.AF_UNIX); s.sock.settimeout(2); s.sock.connect(s.p)
views = []
for p in sys.argv[1:]:
    try:
        c = U(p); c.request("GET", "/v1/cluster"); views.append(json.loads(c.getresponse().read()))
    except Exception: sys.exit(1)
leaders = {v.get("leader") for v in views}
if len(leaders) != 1 or None in leaders or 0 in leaders: sys.exit(1)
v = views[0]
ok = sum(1 for m in v["members"] if m["role"] == "manager" and m["raft"] in ("leader", "voter") and m["connected"])
sys.exit(0 if ok == 3 else 1)
PY
        then return 0; fi
        sleep 0.1
    done
    echo "mycel cluster did not settle in $READY_S s" >&2; return 1
}
# mycel_leader_index: which of MD is the leader.
mycel_leader_index() {
    local v lid i pid
    v=$(mycel "${MD[0]}" cluster members --json 2>/dev/null || mycel "${MD[1]}" cluster members --json)
    lid=$(echo "$v" | json '["leader"]')
    pid=$(echo "$v" | python3 -c "import json,sys; print([m['peer_id'] for m in json.load(sys.stdin)['members'] if m['raft_id']==$lid][0])")
    for i in 0 1 2; do
        [ "$(mycel "${MD[$i]}" id --json | json '["peer_id"]')" = "$pid" ] && { echo "$i $lid"; return 0; }
    done
    return 1
}
mycel_cluster() {
    local i tok
    for i in 0 1 2; do MD[$i]="$W/m$i"; MSOCK[$i]="$W/m$i/mycel.sock"; done
    mycel "${MD[0]}" init --listen "/ip4/127.0.0.1/udp/$PORT0/quic-v1" >/dev/null
    sed -i "s/^tick_ms = .*/tick_ms = $TICK_MS/; s/^election_ticks = .*/election_ticks = $ELECTION_TICKS/" "${MD[0]}/config.toml"
    mycel_start 0
    mycel "${MD[0]}" cluster init --json >/dev/null
    tok=$(mycel "${MD[0]}" cluster token create --role manager --uses 2 --json | json '["token"]')
    for i in 1 2; do
        mycel "${MD[$i]}" init --listen "/ip4/127.0.0.1/udp/$((PORT0 + i))/quic-v1" --join "$tok" >/dev/null
        sed -i "s/^tick_ms = .*/tick_ms = $TICK_MS/; s/^election_ticks = .*/election_ticks = $ELECTION_TICKS/" "${MD[$i]}/config.toml"
        mycel_start "$i"
    done
    mycel_settled
}

# ---- etcd --------------------------------------------------------------------------------
ED=(); EPID=(); ECLI=()
etcd_start() { # etcd_start I
    local i=$1 init="" j t
    for j in 0 1 2; do init+="e$j=http://127.0.0.1:$((ETCD_PORT0 + 10 + j)),"; done
    etcd --name "e$i" --data-dir "${ED[$i]}" \
        --listen-client-urls "http://${ECLI[$i]}" --advertise-client-urls "http://${ECLI[$i]}" \
        --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT0 + 10 + i))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT0 + 10 + i))" \
        --initial-cluster "${init%,}" --initial-cluster-state new --initial-cluster-token mycel-bench \
        >>"${ED[$i]}.log" 2>&1 &
    EPID[$i]=$!; PIDS+=("$!")
}
etcd_settled() {
    local t i l ok
    for ((t = 0; t < READY_S * 10; t++)); do
        ok=1; l=""
        for i in 0 1 2; do
            x=$(qb leader etcd "${ECLI[$i]}")
            if [ -z "$x" ] || { [ -n "$l" ] && [ "$x" != "$l" ]; }; then ok=0; break; fi
            l=$x
        done
        [ "$ok" = 1 ] && return 0
        sleep 0.1
    done
    echo "etcd cluster did not settle in $READY_S s" >&2; return 1
}
etcd_leader_index() { # prints "I LEADER_ID"
    local i lid id
    lid=$(qb leader etcd "${ECLI[0]}")
    [ -n "$lid" ] || lid=$(qb leader etcd "${ECLI[1]}")
    for i in 0 1 2; do
        id=$(curl -s -X POST "http://${ECLI[$i]}/v3/maintenance/status" -d '{}' | json '["header"]["member_id"]' 2>/dev/null || true)
        [ "$id" = "$lid" ] && { echo "$i $lid"; return 0; }
    done
    return 1
}
etcd_cluster() {
    local i
    for i in 0 1 2; do ED[$i]="$W/e$i"; ECLI[$i]="127.0.0.1:$((ETCD_PORT0 + i))"; done
    for i in 0 1 2; do etcd_start "$i"; done
    etcd_settled
}

# ---- run ---------------------------------------------------------------------------------
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
    echo "installing etcd-server and etcd-client (apt)" >&2
    apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server etcd-client >&2
fi
ETCD_VERSION=$(etcd --version | awk '/etcd Version/{print $3}')
build
mkdir -p "$BENCH_DIR" "$(dirname "$RESULTS")"
W=$(mktemp -d "$BENCH_DIR/quorum.XXXXXX")
write_client
SALT=$(date +%s%N)

# mycel: latency via leader and follower, then failovers.
echo "mycel: starting 3 managers (tick_ms=$TICK_MS election_ticks=$ELECTION_TICKS)" >&2
mycel_cluster
read -r li lid < <(mycel_leader_index)
fi_=$(((li + 1) % 3))
echo "mycel: latency, $N single pins via the leader (m$li) and via a follower (m$fi_)" >&2
M_LEAD=$(qb latency mycel "${MSOCK[$li]}" "$N" "$SALT-l")
M_FOLL=$(qb latency mycel "${MSOCK[$fi_]}" "$N" "$SALT-f")
echo "  leader:   $M_LEAD" >&2
echo "  follower: $M_FOLL" >&2
M_FAIL=()
for r in $(seq "$FAILOVERS"); do
    read -r li lid < <(mycel_leader_index)
    others=()
    for i in 0 1 2; do [ "$i" != "$li" ] && others+=("${MSOCK[$i]}"); done
    out=$(qb failover mycel "${MPID[$li]}" "$lid" "${others[@]}")
    wait "${MPID[$li]}" 2>/dev/null || true
    echo "mycel failover $r: killed m$li (raft id $lid): $out" >&2
    M_FAIL+=("$out")
    mycel_start "$li"; mycel_settled; sleep 1
done
for i in 0 1 2; do stop "${MPID[$i]}"; done

echo "etcd $ETCD_VERSION: starting 3 members" >&2
etcd_cluster
read -r li lid < <(etcd_leader_index)
fi_=$(((li + 1) % 3))
echo "etcd: latency, $N single puts via the leader (e$li) and via a follower (e$fi_)" >&2
E_LEAD=$(qb latency etcd "${ECLI[$li]}" "$N" "$SALT-l")
E_FOLL=$(qb latency etcd "${ECLI[$fi_]}" "$N" "$SALT-f")
echo "  leader:   $E_LEAD" >&2
echo "  follower: $E_FOLL" >&2
E_FAIL=()
for r in $(seq "$FAILOVERS"); do
    read -r li lid < <(etcd_leader_index)
    others=()
    for i in 0 1 2; do [ "$i" != "$li" ] && others+=("${ECLI[$i]}"); done
    out=$(qb failover etcd "${EPID[$li]}" "$lid" "${others[@]}")
    wait "${EPID[$li]}" 2>/dev/null || true
    echo "etcd failover $r: killed e$li: $out" >&2
    E_FAIL+=("$out")
    etcd_start "$li"; etcd_settled; sleep 1
done
for i in 0 1 2; do stop "${EPID[$i]}"; done

# ---- report ------------------------------------------------------------------------------
dev=$(df --output=source "$BENCH_DIR" | tail -1)
DISK="$dev $(lsblk -dno SIZE,ROTA "$dev" 2>/dev/null | awk '{printf "%s, rotational=%s (as the kernel reports it)", $1, $2}' || true)"
FSYNC=$(python3 - "$W/fsync.probe" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600); lat = []
for i in range(200):
    t = time.perf_counter(); os.pwrite(fd, b"x" * 4096, i * 4096); os.fdatasync(fd); lat.append((time.perf_counter() - t) * 1000)
lat.sort(); print(f"p50 {lat[99]:.2f} ms, p99 {lat[197]:.2f} ms")
PY
)
f() { echo "$1" | json "[\"$2\"]"; }
fails() { local k=$1; shift; local xs=() x; for x in "$@"; do xs+=("$(echo "$x" | json "[\"$k\"]")"); done; median "${xs[@]}"; }
fail_list() { local k=$1; shift; local xs=() x; for x in "$@"; do xs+=("$(echo "$x" | json "[\"$k\"]")"); done; echo "${xs[*]}"; }
verdict() { python3 -c "print('yes' if $1 <= $2 else 'no')"; }
{
    echo "# $(machine); $(date -u +%FT%TZ)"
    echo "# disk: $DISK; 4 KiB write+fdatasync in $BENCH_DIR: $FSYNC"
    echo "# 3 mycel managers (tick_ms=$TICK_MS, election_ticks=$ELECTION_TICKS) vs 3-member etcd $ETCD_VERSION (defaults: heartbeat 100 ms, election 1000 ms), loopback, data in $BENCH_DIR"
    echo "# commit latency: $N sequential single changes (after 10 warm-up), 1 client, 1 kept-alive connection"
    echo "#   mycel: POST /v1/pins:batch with 1 pin (answers once applied); etcd: POST /v3/kv/put (JSON gateway)"
    echo "# failover: kill -9 of the leader, survivors polled every 20 ms; median of $FAILOVERS"
    printf '%-44s %10s %10s  %s\n' "figure" "mycel" "etcd" "goal mycel <= etcd"
    printf '%-44s %10s %10s  %s\n' "commit p50 via leader (ms)" "$(f "$M_LEAD" p50_ms)" "$(f "$E_LEAD" p50_ms)" "$(verdict "$(f "$M_LEAD" p50_ms)" "$(f "$E_LEAD" p50_ms)")"
    printf '%-44s %10s %10s  %s\n' "commit p99 via leader (ms)" "$(f "$M_LEAD" p99_ms)" "$(f "$E_LEAD" p99_ms)" "$(verdict "$(f "$M_LEAD" p99_ms)" "$(f "$E_LEAD" p99_ms)")"
    printf '%-44s %10s %10s\n' "commit max via leader (ms)" "$(f "$M_LEAD" max_ms)" "$(f "$E_LEAD" max_ms)"
    printf '%-44s %10s %10s  %s\n' "commit p50 via follower (ms)" "$(f "$M_FOLL" p50_ms)" "$(f "$E_FOLL" p50_ms)" "$(verdict "$(f "$M_FOLL" p50_ms)" "$(f "$E_FOLL" p50_ms)")"
    printf '%-44s %10s %10s  %s\n' "commit p99 via follower (ms)" "$(f "$M_FOLL" p99_ms)" "$(f "$E_FOLL" p99_ms)" "$(verdict "$(f "$M_FOLL" p99_ms)" "$(f "$E_FOLL" p99_ms)")"
    printf '%-44s %10s %10s\n' "commit max via follower (ms)" "$(f "$M_FOLL" max_ms)" "$(f "$E_FOLL" max_ms)"
    printf '%-44s %10s %10s\n' "failover, first survivor names leader (s)" "$(fails first_s "${M_FAIL[@]}")" "$(fails first_s "${E_FAIL[@]}")"
    printf '%-44s %10s %10s\n' "failover, both survivors agree (s)" "$(fails all_s "${M_FAIL[@]}")" "$(fails all_s "${E_FAIL[@]}")"
    echo "# failover runs (all_s): mycel $(fail_list all_s "${M_FAIL[@]}"); etcd $(fail_list all_s "${E_FAIL[@]}")"
    echo "# raw: mycel leader $M_LEAD"
    echo "# raw: mycel follower $M_FOLL"
    echo "# raw: etcd leader $E_LEAD"
    echo "# raw: etcd follower $E_FOLL"
} | tee "$RESULTS"
