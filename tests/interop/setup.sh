#!/usr/bin/env bash
# Creates (once) the virtualenv that tests/interop/walk.py runs in and prints its python.
#
# Usage: tests/interop/setup.sh [WORKSPACE_ROOT]
#
# The venv lives at WORKSPACE_ROOT/target/interop-venv (WORKSPACE_ROOT defaults to two
# levels above this script). A stamp file holds the SHA-256 of requirements.txt and the
# Python version; when both match, this is a no-op. Everything but the final path goes to
# stderr, so callers can read the interpreter path from stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${1:-$here/../..}" && pwd)"
req="$here/requirements.txt"
venv="$root/target/interop-venv"
py="$venv/bin/python"
stamp="$venv/.requirements.stamp"

want="$(sha256sum "$req" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"

if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$py"
    exit 0
fi

mkdir -p "$root/target"
# Two test processes may ask at once: one installs, the other waits and then finds the stamp.
exec 9>"$root/target/interop-venv.lock"
if command -v flock >/dev/null; then
    flock 9
fi
if [[ -x "$py" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$py"
    exit 0
fi

echo "interop: creating $venv" >&2
rm -rf "$venv"
if ! python3 -m venv "$venv" >&2; then
    echo "interop: python3 -m venv failed (is the python3-venv package installed?)" >&2
    exit 1
fi
"$py" -m pip install --disable-pip-version-check --quiet -r "$req" >&2
# Fail here, not in the middle of a walk, if the pins do not hang together.
"$py" -m pip check >&2
"$py" -c 'import blake3, dag_cbor, multiformats' >&2
echo "$want" > "$stamp"
echo "$py"
