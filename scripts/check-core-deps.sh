#!/usr/bin/env bash
# The cores (base, chunker, policy, consensus, proto, and the node core) must not depend on
# async runtimes, networking or HTTP stacks: they are deterministic state machines driven by
# the daemon (mycel-node) and the simulator (mycel-sim).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
for core in mycel-base mycel-chunker mycel-policy mycel-consensus mycel-proto mycel-core; do
    if ! cargo metadata --format-version 1 --no-deps | grep -q "\"name\":\"$core\""; then
        continue
    fi
    bad=$(cargo tree -p "$core" -e normal --prefix none | grep -E '^(tokio|libp2p|quinn|axum|hyper|mio) ' || true)
    if [ -n "$bad" ]; then
        echo "core $core depends on IO crates:"; echo "$bad"; status=1
    else
        echo "core $core: no IO dependencies"
    fi
done
exit $status
