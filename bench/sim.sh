#!/usr/bin/env bash
# mycel-sim throughput: wall time, events per second and peak memory of one simulated run
# on one core (taskset), for the flaky-WAN edge fleet scenario at 100 and 1,000 nodes over
# ten simulated minutes of faults (then the healed phase until convergence).
# Goals: 100 nodes <= 10 s, 1,000 nodes <= 5 min. Writes bench/results/sim.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
SEED="${SEED:-1}"
CORE="${CORE:-0}"
OUT=bench/results/sim.txt
cargo build --release -p mycel-sim >&2
BIN=target/release/mycel-sim
SCENARIO=configs/sim/edge-fleet-flaky-wan.toml
{
    echo "# mycel-sim benchmark: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD)"
    echo "# $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)); one core used (taskset -c $CORE)"
    echo "# scenario $SCENARIO, seed $SEED, 10 simulated minutes of faults + healed phase"
    printf "%-7s %10s %10s %12s %12s %10s  %s\n" nodes wall_s sim_s events events_per_s peak_mib result
} > "$OUT"
for n in 100 1000; do
    log=$(mktemp)
    json=$(mktemp)
    /usr/bin/time -v taskset -c "$CORE" "$BIN" run --seed "$SEED" --scenario "$SCENARIO" \
        --nodes "$n" --duration 10m --json > "$json" 2> "$log" || true
    wall=$(grep "Elapsed (wall clock)" "$log" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
    rss_kib=$(grep "Maximum resident" "$log" | awk '{print $NF}')
    python3 - "$json" "$wall" "$rss_kib" "$n" >> "$OUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
wall, rss, n = float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ok = "ok" if not r["violations"] else r["violations"][0]["check"]
print(f"{n:<7} {wall:>10.1f} {r['simulated_ms']/1000:>10.1f} {r['events']:>12} {r['events']/wall:>12.0f} {rss/1024:>10.0f}  {ok}")
PY
    rm -f "$log" "$json"
done
cat "$OUT"
