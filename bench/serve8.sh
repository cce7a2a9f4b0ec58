#!/usr/bin/env bash
# Memory of a daemon serving 8 concurrent fetchers of a 256 MiB object on loopback (release build).
set -e
M=${M:-/work/main/target/release/mycel}; T=/work/benchtmp/m8; pkill -f "mycel run" || true; sleep 0.5; rm -rf $T; mkdir -p $T
MYCEL_DATA_DIR=$T/a $M init --listen /ip4/127.0.0.1/udp/47600/quic-v1 --json > $T/a.json
PA=$(python3 -c "import json;print(json.load(open('$T/a.json'))['peer_id'])")
PEERS="\"$PA\""
for i in 1 2 3 4 5 6 7 8; do MYCEL_DATA_DIR=$T/f$i $M init --listen /ip4/127.0.0.1/udp/$((47600+i))/quic-v1 --bootstrap /ip4/127.0.0.1/udp/47600/quic-v1/p2p/$PA --json > $T/f$i.json; P=$(python3 -c "import json;print(json.load(open('$T/f$i.json'))['peer_id'])"); PEERS="$PEERS, \"$P\""; done
for d in a f1 f2 f3 f4 f5 f6 f7 f8; do sed -i "s|^members = \[\]|members = [$PEERS]|" $T/$d/config.toml; done
MYCEL_DATA_DIR=$T/a $M run > $T/a.log 2>&1 &
APID=$!
sleep 1
[ -f /dev/shm/r256 ] || head -c 256M /dev/urandom > /dev/shm/r256
R=$(MYCEL_DATA_DIR=$T/a $M add --json /dev/shm/r256 | python3 -c "import json,sys;print(json.load(sys.stdin)['root'])")
for i in 1 2 3 4 5 6 7 8; do MYCEL_DATA_DIR=$T/f$i $M run > $T/f$i.log 2>&1 & done
sleep 2
grep VmRSS /proc/$APID/status
t0=$(date +%s.%N)
for i in 1 2 3 4 5 6 7 8; do (MYCEL_DATA_DIR=$T/f$i $M get --json $R $T/out$i.bin > $T/get$i.json 2>&1) & done
wait_gets() { while pgrep -f "mycel get" >/dev/null; do grep VmRSS /proc/$APID/status | awk '{print $2}' >> $T/rss.txt; sleep 0.2; done; }
wait_gets
t1=$(date +%s.%N)
echo "8 concurrent fetchers of 256 MiB: $(python3 -c "print(round($t1-$t0,1))") s; serving daemon peak RSS $(sort -n $T/rss.txt | tail -1) KiB; VmHWM $(grep VmHWM /proc/$APID/status | awk '{print $2}') KiB"
for i in 1 2 3 4 5 6 7 8; do cmp -s /dev/shm/r256 $T/out$i.bin && echo -n "ok " || echo -n "BAD "; done; echo
pkill -f "mycel run"; rm -rf $T
