#!/usr/bin/env bash
# The drivers (the daemon and the simulator) must not decide: every decision of a node lives
# in the node core (mycel-core), which both drive. This counts, per driver file, the places
# that still call a decision function of the cores directly or match on protocol frame
# variants, and compares them with scripts/driver-calls.allow, the list of what has not moved
# into the node core yet. It fails when a count grows or a new place appears (a new decision
# written in a driver), and asks for the list to be lowered when a count shrinks, so the list
# only ever gets shorter. `--update` rewrites the list from the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLOW=scripts/driver-calls.allow
# name|extended regex: each a decision function of a core, or a frame variant matched.
PATTERNS=(
  'policy-plan|mycel_policy::plan::plan|plan::plan(_namespaced)?\('
  'policy-access|access::allowed\(|mycel_policy::access::allowed'
  'fetch-core|\.(handle_block|handle_dont_have|handle_refused|add_peer|poll_action|peer_gone|handle_timeout\(Timestamp)\('
  'consensus-step|\.step\(&'
  'consensus-propose|core\.propose\(|c\.propose\('
  'state-apply|\.apply\([a-z_*]*index'
  'exchange-frame-match|Frame::(Want|WhoHas|Holding|Namespace|Refused|DontHave|Block) \{'
  'cluster-frame-match|ClusterFrame::(Raft|Follow|State|Entries|RttReport|TopologyReport) \{'
)
count() {
  for file in $(find node/daemon/src sim/src -name '*.rs' -not -path '*/bin/*' | sort); do
    for p in "${PATTERNS[@]}"; do
      name=${p%%|*}; re=${p#*|}
      # Tests at the bottom of a file are not the driver: count lines before `mod tests`.
      n=$(awk '/^#\[cfg\(test\)\]/{exit} {print}' "$file" | grep -cE "$re" || true)
      if [ "$n" -gt 0 ]; then echo "$file $name $n"; fi
    done
  done
}
if [ "${1:-}" = "--update" ]; then
  { echo "# file pattern count: direct decisions still in the drivers (shrink only; see scripts/check-driver-calls.sh)"; count; } > "$ALLOW"
  echo "wrote $ALLOW"; exit 0
fi
now=$(count)
status=0
while read -r file name n; do
  allowed=$(awk -v f="$file" -v p="$name" '$1==f && $2==p {print $3}' "$ALLOW")
  if [ -z "$allowed" ]; then
    echo "NEW: $file calls $name directly ($n places): move the decision into mycel-core"; status=1
  elif [ "$n" -gt "$allowed" ]; then
    echo "GREW: $file $name $allowed -> $n: move the decision into mycel-core"; status=1
  elif [ "$n" -lt "$allowed" ]; then
    echo "SHRANK: $file $name $allowed -> $n: run scripts/check-driver-calls.sh --update"; status=1
  fi
done <<< "$now"
while read -r file name n; do
  case "$file" in '#'*|'') continue ;; esac
  if ! grep -q "^$file $name " <<< "$now"; then
    echo "GONE: $file $name: run scripts/check-driver-calls.sh --update"; status=1
  fi
done < "$ALLOW"
total=$(awk '{s += $3} END {print s + 0}' <<< "$now")
echo "direct decisions left in the drivers: $total (in $(wc -l <<< "$now") file/pattern pairs)"
exit $status
