#!/usr/bin/env bash
# mycel-sim A/B: two commits' simulators run alternately (A B A B ...), each on one core
# (taskset), on the 1,000-node flaky-WAN fleet for ten simulated minutes, seed 1: the figure
# a change to the simulator's hot paths must report (median after <= 1.05x median before).
# Usage: bench/sim-ab.sh BEFORE_COMMIT [AFTER_COMMIT=HEAD] [RUNS=3]; NODES=, CORE= override.
# Builds each commit's mycel-sim in a worktree sharing this checkout's target directory (only
# the workspace's crates rebuild). Writes bench/results/sim-ab.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BEFORE=${1:?usage: bench/sim-ab.sh BEFORE_COMMIT [AFTER_COMMIT] [RUNS]}
AFTER=${2:-HEAD}
RUNS=${3:-3}
NODES=${NODES:-1000}
CORE=${CORE:-1}
SCENARIO=configs/sim/edge-fleet-flaky-wan.toml
OUT=bench/results/sim-ab.txt
work=$(mktemp -d)
trap 'git -C "$ROOT" worktree remove --force "$work/tree" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
build() { # commit -> binary path
    local commit=$1 dest=$2
    git -C "$ROOT" worktree add --detach "$work/tree" "$commit" >/dev/null 2>&1
    (cd "$work/tree" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release -p mycel-sim >&2)
    cp "$ROOT/target/release/mycel-sim" "$dest"
    git -C "$ROOT" worktree remove --force "$work/tree"
}
build "$BEFORE" "$work/before"
build "$AFTER" "$work/after"
run() { # binary -> "cpu_s wall_s events result"
    local bin=$1 log json
    log=$(mktemp); json=$(mktemp)
    /usr/bin/time -v taskset -c "$CORE" "$bin" run --seed 1 --scenario "$SCENARIO" \
        --nodes "$NODES" --duration 10m --json > "$json" 2> "$log" || true
    python3 - "$json" "$log" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1])); log = open(sys.argv[2]).read()
cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([0-9.]+)", log))
wall = log.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split()[0].split(":")
wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
ok = "ok" if not r["violations"] else r["violations"][0]["check"]
print(f"{cpu:.1f} {wall:.1f} {r['events']} {ok}")
PY
    rm -f "$log" "$json"
}
{
    echo "# mycel-sim A/B: $(date -u +%Y-%m-%dT%H:%MZ), before $(git rev-parse --short "$BEFORE"), after $(git rev-parse --short "$AFTER")"
    echo "# $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)); one core used (taskset -c $CORE); $NODES nodes, seed 1, $SCENARIO, 10 simulated minutes"
    echo "# run which cpu_s wall_s events result"
} > "$OUT"
for i in $(seq 1 "$RUNS"); do
    for which in before after; do
        echo "$i $which $(run "$work/$which")" | tee -a "$OUT" >&2
    done
done
python3 - "$OUT" >> "$OUT" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l[0].isdigit()]
med = {w: statistics.median(float(r[2]) for r in rows if r[1] == w) for w in ("before", "after")}
print(f"# median cpu_s: before {med['before']:.1f}, after {med['after']:.1f}, ratio {med['after'] / med['before']:.3f} (goal <= 1.05)")
PY
cat "$OUT"
