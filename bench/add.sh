#!/usr/bin/env bash
# `mycel add` of a 2 GiB random file from /dev/shm into a store on disk, side by side in one
# run with FastCDC+BLAKE3 alone (both cores), dd conv=fdatasync to the same filesystem, and
# borg create -C none, restic backup, casync make with their repositories on that filesystem.
# Medians of $RUNS runs. Installs the reference tools from Debian if missing.
source "$(dirname "$0")/lib.sh"
SIZE_MIB="${SIZE_MIB:-2048}"
need=()
command -v borg >/dev/null || need+=(borgbackup)
command -v restic >/dev/null || need+=(restic)
command -v casync >/dev/null || need+=(casync)
if [ ${#need[@]} -gt 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >&2
fi
build
mkdir -p "$BENCH_DIR" "$SHM"
IN="$SHM/rand.bin"
[ -f "$IN" ] && [ "$(stat -c %s "$IN")" = $((SIZE_MIB << 20)) ] || head -c $((SIZE_MIB << 20)) /dev/urandom > "$IN"
BYTES=$(stat -c %s "$IN")
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes RESTIC_PASSWORD=bench
declare -A T
run() { # name, setup, command
    local name=$1 setup=$2 cmd=$3 t0 t1
    rm -rf "$BENCH_DIR/w"; mkdir -p "$BENCH_DIR/w"; eval "$setup" >/dev/null 2>&1; sync
    t0=$(now); eval "$cmd" >/dev/null 2>&1; t1=$(now)
    T[$name]="${T[$name]:-} $(elapsed "$t0" "$t1")"
}
CDC=()
for i in $(seq "$RUNS"); do
    CDC+=("$("$MB" cdc "$IN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["cut_and_hash_two_cores_mb_s"])')")
    run mycel "MYCEL_DATA_DIR=$BENCH_DIR/w/node $M init" "MYCEL_DATA_DIR=$BENCH_DIR/w/node $M add -q $IN"
    run dd ":" "dd if=$IN of=$BENCH_DIR/w/dd.out bs=8M conv=fdatasync"
    run borg "borg init -e none $BENCH_DIR/w/borg" "borg create -C none $BENCH_DIR/w/borg::a $IN"
    run restic "restic init --repo $BENCH_DIR/w/restic" "restic backup --compression off --repo $BENCH_DIR/w/restic $IN"
    run casync ":" "casync make --store=$BENCH_DIR/w/store.castr $BENCH_DIR/w/blob.caibx $IN"
done
rm -rf "$BENCH_DIR/w"
echo "# mycel add, $((BYTES >> 20)) MiB random from /dev/shm, store in $BENCH_DIR; $(machine); medians of $RUNS"
printf '%-22s %10s %10s\n' tool seconds MB/s
cdc=$(median "${CDC[@]}")
printf '%-22s %10s %10s\n' "fastcdc+blake3 (2 cores)" "-" "${cdc%.*}"
for name in mycel dd borg restic casync; do
    # shellcheck disable=SC2086
    s=$(median ${T[$name]})
    printf '%-22s %10s %10s\n' "$name" "$s" "$(mbps "$BYTES" "$s")"
done
