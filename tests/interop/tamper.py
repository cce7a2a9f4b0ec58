#!/usr/bin/env python3
"""A stand-in for `mycel` that flips one bit of one block: the negative control for walk.py.

Runs the real binary (`$TAMPER_REAL_BIN`) with the same arguments and passes its output
through, except for `block get CID` where CID starts with `$TAMPER_PREFIX` ("bafkr" for raw
chunks, "bafyr" for DAG-CBOR blocks): the first `$TAMPER_SKIP` such requests pass unchanged,
the next one gets one bit flipped in its middle byte, and its CID is written to
`$TAMPER_STATE/tampered`. The request count lives in `$TAMPER_STATE/count`, because walk.py
starts one process per block. With `TAMPER_PREFIX` unset nothing is changed, which is the
control showing that a failure comes from the flipped bit and not from the wrapper.
"""

import os
import subprocess
import sys

args = sys.argv[1:]
run = subprocess.run([os.environ["TAMPER_REAL_BIN"], *args], capture_output=True)
data = run.stdout
prefix = os.environ.get("TAMPER_PREFIX")
if prefix and run.returncode == 0 and args[:2] == ["block", "get"] and args[2].startswith(prefix):
    state = os.environ["TAMPER_STATE"]
    count_path = os.path.join(state, "count")
    count = int(open(count_path).read()) if os.path.exists(count_path) else 0
    with open(count_path, "w") as f:
        f.write(str(count + 1))
    if count == int(os.environ.get("TAMPER_SKIP", "0")):
        assert data, f"block {args[2]} is empty: nothing to flip"
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        data = bytes(flipped)
        with open(os.path.join(state, "tampered"), "w") as f:
            f.write(args[2])
sys.stdout.buffer.write(data)
sys.stderr.buffer.write(run.stderr)
sys.exit(run.returncode)
