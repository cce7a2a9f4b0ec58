#!/usr/bin/env bash
# Incremental and sparse figures:
#  1. 256 MiB file, 4 regions of 640 KiB overwritten (1%): stored_bytes of the second add.
#  2. 4 GiB file, 100 bytes inserted in the middle: stored_bytes (chunks + manifest nodes).
#  3. 8 GiB sparse image with 192 MiB of data: add time, stored_bytes, allocated size of the
#     restored image.
source "$(dirname "$0")/lib.sh"
build
mkdir -p "$BENCH_DIR" "$SHM"
W="$BENCH_DIR/inc"; rm -rf "$W"; mkdir -p "$W"
export MYCEL_DATA_DIR="$W/node"
"$M" init >/dev/null
field() { python3 -c "import json,sys; print(json.load(sys.stdin)[\"$1\"])"; }
echo "# incremental and sparse figures; $(machine)"

head -c $((256 << 20)) /dev/urandom > "$SHM/a.bin"
"$M" add -q --json "$SHM/a.bin" >/dev/null
cp "$SHM/a.bin" "$SHM/b.bin"
for at in 10 90 150 230; do
    head -c $((640 << 10)) /dev/urandom | dd of="$SHM/b.bin" bs=1M seek="$at" conv=notrunc status=none
done
s=$("$M" add -q --json "$SHM/b.bin" | field stored_bytes)
echo "256 MiB, 4 x 640 KiB overwritten: stored_bytes=$s ($(python3 -c "print(f'{100*$s/(256<<20):.2f}')")% of the file; goal <= 2%)"
rm -f "$SHM/a.bin" "$SHM/b.bin"

head -c $((4 << 30)) /dev/urandom > "$SHM/big.bin"
"$M" add -q --json "$SHM/big.bin" >/dev/null
python3 - "$SHM/big.bin" "$SHM/big2.bin" <<'PY'
import sys, os
src, dst = sys.argv[1], sys.argv[2]
size = os.path.getsize(src); mid = size // 2
with open(src, 'rb') as f, open(dst, 'wb') as g:
    remaining = mid
    while remaining:
        b = f.read(min(remaining, 64 << 20)); g.write(b); remaining -= len(b)
    g.write(os.urandom(100))
    while True:
        b = f.read(64 << 20)
        if not b: break
        g.write(b)
PY
r=$("$M" add -q --json "$SHM/big2.bin")
s=$(echo "$r" | field stored_bytes)
echo "4 GiB, 100 bytes inserted in the middle: stored_bytes=$s ($(python3 -c "print(f'{$s/1048576:.2f}')") MiB incl. manifest nodes; goal <= 2 MiB)"
rm -f "$SHM/big.bin" "$SHM/big2.bin"

IMG="$BENCH_DIR/sparse.img"
rm -f "$IMG"; truncate -s 8G "$IMG"
for i in $(seq 0 11); do   # 12 x 16 MiB = 192 MiB of data spread over the image
    head -c $((16 << 20)) /dev/urandom | dd of="$IMG" bs=1M seek=$((i * 680)) conv=notrunc status=none
done
sync
t0=$(now); r=$("$M" add -q --json "$IMG"); t1=$(now)
echo "8 GiB sparse image, 192 MiB data: add $(elapsed "$t0" "$t1") s, stored_bytes=$(echo "$r" | field stored_bytes), hole_bytes=$(echo "$r" | field hole_bytes)"
root=$(echo "$r" | field root)
t0=$(now); "$M" get -q --json "$root" "$W/restored.img" >/dev/null; t1=$(now)
echo "  restore $(elapsed "$t0" "$t1") s; restored allocated $(du -B1 "$W/restored.img" | cut -f1) bytes of $(stat -c %s "$W/restored.img"); identical: $(cmp -s "$IMG" "$W/restored.img" && echo yes || echo NO)"
rm -rf "$W" "$IMG"
