#!/usr/bin/env bash
# The store at 10 million blocks: fill it (group commits of 100,000), then kill -9 a further
# fill in the middle of a batch and time the reopen; report resident memory of both.
source "$(dirname "$0")/lib.sh"
N="${N:-10000000}"
build
D="$BENCH_DIR/store10m"
rm -rf "$D"; mkdir -p "$D"
echo "# store with $N blocks; $(machine)"
t0=$(now)
"$MB" fill "$D" --chunks "$N" --batch 100000 | tail -1
t1=$(now)
echo "fill: $(elapsed "$t0" "$t1") s; index $(du -sh "$D/index.redb" | cut -f1), packs $(du -sh "$D/packs" | cut -f1)"
"$MB" fill "$D" --chunks $((N + 2000000)) --batch 1000000 > "$D/fill2.log" &
pid=$!
sleep "${KILL_AFTER:-4}"
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "killed a fill of 1,000,000-block batches after ${KILL_AFTER:-4} s (batches committed: $(wc -l < "$D/fill2.log"))"
"$MB" open "$D"
"$MB" open "$D"
rm -rf "$D"
