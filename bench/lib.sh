# Shared helpers for the benchmark scripts (sourced).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-$ROOT/target/bench-work}"   # on the same filesystem as a real store
SHM="${SHM:-/dev/shm/mycel-bench}"
RUNS="${RUNS:-3}"
# MYCEL_BIN: run another build of mycel (a profiling build, say); nothing is built then.
M="${MYCEL_BIN:-$ROOT/target/release/mycel}"
MB="$ROOT/target/release/mycel-bench"

build() {
    if [ -n "${MYCEL_BIN:-}" ]; then return 0; fi
    (cd "$ROOT" && cargo build --release -p mycel-node --bins >&2)
}
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
median() { python3 -c 'import sys,statistics; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.3f}")' "$@"; }
mbps() { python3 -c "print(f'{$1 / 1e6 / $2:.0f}')"; }
machine() { echo "$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(df -h "$BENCH_DIR" | awk 'NR==2{print $1" "$2}')"; }
# json EXPR: prints json.load(stdin)EXPR (strings and numbers bare, anything else as JSON).
json() { python3 -c "import json,sys; v=json.load(sys.stdin)$1; print(v if isinstance(v, (str, int, float)) else json.dumps(v))"; }
# set_members DIR PEER_ID...: rewrites `members = ...` in [cluster] of DIR/config.toml.
set_members() {
    python3 - "$1/config.toml" "${@:2}" <<'PY'
import json, re, sys, tomllib
path, members = sys.argv[1], sys.argv[2:]
text = open(path).read()
lines, section, done = text.splitlines(keepends=True), None, False
for i, line in enumerate(lines):
    m = re.match(r'\s*\[([^\]]+)\]', line)
    if m:
        section = m.group(1).strip()
    elif section == 'cluster' and re.match(r'\s*members\s*=', line):
        lines[i] = 'members = ' + json.dumps(members) + '\n'
        done = True
        break
if not done:
    sys.exit(f'{path}: no `members = ...` line in [cluster]')
text = ''.join(lines)
assert tomllib.loads(text)['cluster']['members'] == members, path
open(path, 'w').write(text)
PY
}
# cleanup_work [STATUS]: on failure prints the tail of every log in $W; stops every daemon in
# PIDS and removes $W (for an EXIT trap: the exit status is the script's, or STATUS when a
# script's own cleanup calls it).
cleanup_work() {
    local status=${1:-$?} pid log
    if [ "$status" != 0 ] && [ -n "$W" ]; then
        for log in "$W"/*.log; do
            [ -f "$log" ] && { echo "== $log" >&2; tail -20 "$log" >&2; }
        done
    fi
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$W" ]; then rm -rf "$W"; fi
}
