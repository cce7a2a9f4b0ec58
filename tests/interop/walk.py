#!/usr/bin/env python3
"""Reads mycel manifests with independent IPLD libraries and checks every block.

Usage:
    walk.py ROOT_CID...      walk each object, print a JSON summary on stdout
    walk.py --self-test      check that the checker rejects tampered blocks

For every block reached from the given roots (fetched one at a time with
`$MYCEL_BIN block get CID` against `$MYCEL_DATA_DIR`), this script:

* recomputes the CID from the block's bytes (BLAKE3-256 through `multiformats`, cross-checked
  with the `blake3` package) and requires it to equal the link the block was reached by;
* for DAG-CBOR blocks, decodes with `dag_cbor.decode` (which is strict: it rejects
  non-canonical input) and requires `dag_cbor.encode` of the result to give the same bytes;
* checks the manifest shape described in `chunker/src/manifest.rs` (root map, index nodes,
  level-0 chunk, hole and directory entries, higher-level node links) and that every stored
  length adds up, then follows every link: `tree`, node entries, directory entries' `cid`.

Any mismatch prints `FAIL <cid>: <reason>` (with the path of links that led there) on stderr
and exits 1. Nothing here imports mycel code: the point is a second, unrelated reader.
"""

import json
import os
import subprocess
import sys

import blake3
import dag_cbor
from multiformats import CID, multihash

RAW = "raw"
DAG_CBOR = "dag-cbor"
FORMAT_VERSION = 1
DIGEST_BYTES = 32
KINDS = ("file", "dir", "disk", "topology")
DIR_ENTRY_KEYS = {"name", "mode", "type", "len", "cid", "target"}
ROOT_KEYS = {"v", "kind", "len", "chunker", "tree"}
NODE_KEYS = {"v", "len", "level", "entries"}


def text(cid):
    """A CID as mycel prints it: base32 (decoded links default to base58btc)."""
    return cid.encode("base32") if isinstance(cid, CID) else str(cid)


class CheckError(Exception):
    """A block or link that does not match what the format promises."""

    def __init__(self, cid, reason):
        super().__init__(f"FAIL {text(cid)}: {reason}")
        self.cid = text(cid)
        self.reason = reason


def cid_of(data, codec):
    """The CIDv1 (base32) of `data` under `codec`, hashed with BLAKE3-256."""
    mh = multihash.digest(data, "blake3", size=DIGEST_BYTES)
    # Two routes to the same digest: multiformats' registered hash and the blake3 package.
    direct = blake3.blake3(data).digest()
    assert multihash.unwrap(mh) == direct, "multiformats and blake3 disagree"
    return CID("base32", 1, codec, mh)


def check_link(cid):
    """The link's own form: CIDv1, raw or DAG-CBOR, BLAKE3 with a 32-byte digest."""
    if cid.version != 1:
        raise CheckError(cid, f"CID version {cid.version}, expected 1")
    if cid.codec.name not in (RAW, DAG_CBOR):
        raise CheckError(cid, f"codec {cid.codec.name}, expected raw or dag-cbor")
    if cid.hashfun.name != "blake3":
        raise CheckError(cid, f"hash {cid.hashfun.name}, expected blake3")
    if len(cid.raw_digest) != DIGEST_BYTES:
        raise CheckError(cid, f"digest of {len(cid.raw_digest)} bytes, expected {DIGEST_BYTES}")


def roundtrip(cid, data, decode=dag_cbor.decode, encode=dag_cbor.encode):
    """Decodes a DAG-CBOR block and requires the re-encoding to be byte-identical."""
    try:
        value = decode(data)
    except Exception as e:  # the decoder's own error classes vary; all mean "rejected"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = " | ".join(lines)[:400]
        raise CheckError(cid, f"dag-cbor decode rejected the block: {type(e).__name__}: {detail}")
    again = encode(value)
    if again != data:
        at = next((i for i, (a, b) in enumerate(zip(data, again)) if a != b), min(len(data), len(again)))
        raise CheckError(
            cid,
            f"re-encoding differs at byte {at} ({len(data)} bytes stored, {len(again)} re-encoded)",
        )
    return value


def check_block(cid, data):
    """Checks one block against the link that named it; returns the decoded value (or bytes)."""
    check_link(cid)
    codec = cid.codec.name
    recomputed = cid_of(data, codec)
    if bytes(recomputed) != bytes(cid):
        raise CheckError(cid, f"CID mismatch: the bytes hash to {recomputed}")
    if codec == RAW:
        return data
    return roundtrip(cid, data)


def expect(cond, cid, reason):
    if not cond:
        raise CheckError(cid, reason)


def is_uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Walker:
    """Walks objects from their roots, checking each distinct block once."""

    def __init__(self, bin_path):
        self.bin = bin_path
        self.seen = {}  # CID bytes -> (codec, subtree length, level or None)
        self.blocks = {RAW: 0, DAG_CBOR: 0}
        self.block_bytes = {RAW: 0, DAG_CBOR: 0}
        self.max_level = -1
        self.holes = {}
        self.dir_entries = {"file": 0, "dir": 0, "symlink": 0}
        self.path = []

    def fetch(self, cid):
        run = subprocess.run([self.bin, "block", "get", text(cid)], capture_output=True)
        if run.returncode != 0:
            raise CheckError(cid, f"`mycel block get` exited {run.returncode}: {run.stderr.decode(errors='replace').strip()}")
        return run.stdout

    def load(self, cid):
        """Fetches and checks one block; counts it the first time it is seen."""
        data = self.fetch(cid)
        value = check_block(cid, data)
        codec = cid.codec.name
        self.blocks[codec] += 1
        self.block_bytes[codec] += len(data)
        return value, len(data)

    def root(self, arg):
        try:
            cid = CID.decode(arg)
        except Exception as e:
            raise CheckError(arg, f"not a CID: {e}")
        expect(str(cid) == arg, arg, f"CID text does not round-trip: {cid}")
        expect(cid.codec.name == DAG_CBOR, arg, "a root must be a dag-cbor block")
        self.path = [arg]
        value, _ = self.load(cid)
        expect(isinstance(value, dict) and set(value) == ROOT_KEYS, cid, f"root keys {sorted(value) if isinstance(value, dict) else type(value).__name__}")
        expect(value["v"] == FORMAT_VERSION, cid, f"root version {value['v']}")
        kind = value["kind"]
        expect(kind in KINDS, cid, f"unknown kind {kind!r}")
        expect(is_uint(value["len"]), cid, "root len is not an unsigned integer")
        expect(isinstance(value["chunker"], dict), cid, "chunker is not a map")
        tree = value["tree"]
        level = None
        if tree is None:
            expect(value["len"] == 0, cid, f"null tree but len {value['len']}")
        else:
            expect(isinstance(tree, CID), cid, "tree is neither a link nor null")
            if kind == "dir":
                expect(tree.codec.name == DAG_CBOR, cid, "a directory tree must be an index node")
            length, level = self.subtree(tree, kind, None)
            expect(length == value["len"], cid, f"root len {value['len']} but tree holds {length}")
            level = None if level == -1 else level
        return {"root": arg, "kind": kind, "len": value["len"], "tree_level": level}

    def subtree(self, cid, kind, level_expected):
        """Checks the block at `cid` and everything under it; returns (length, level).

        A raw chunk has level -1, one below the level-0 nodes that list chunks.
        """
        key = bytes(cid)
        if key in self.seen:
            _, length, level = self.seen[key]
            if level_expected is not None:
                expect(level == level_expected, cid, f"reached again at level {level_expected}, is level {level}")
            return length, level
        # Left in place on failure, so the report shows how the bad block was reached.
        self.path.append(text(cid))
        value, size = self.load(cid)
        if cid.codec.name == RAW:
            expect(kind != "dir", cid, "a directory's entry tree cannot be a raw chunk")
            expect(level_expected in (None, -1), cid, f"raw chunk where a level-{level_expected} node belongs")
            result = (size, -1)
        else:
            result = self.node(cid, value, kind, level_expected)
        self.path.pop()
        self.seen[key] = (cid.codec.name, *result)
        return result

    def node(self, cid, value, kind, level_expected):
        expect(isinstance(value, dict) and set(value) == NODE_KEYS, cid, f"index node keys {sorted(value) if isinstance(value, dict) else type(value).__name__}")
        expect(value["v"] == FORMAT_VERSION, cid, f"node version {value['v']}")
        level = value["level"]
        expect(is_uint(level), cid, "level is not an unsigned integer")
        if level_expected is not None:
            expect(level == level_expected, cid, f"level {level}, parent expects {level_expected}")
        self.max_level = max(self.max_level, level)
        entries = value["entries"]
        expect(isinstance(entries, list) and entries, cid, "entries is not a non-empty list")
        total = 0
        for i, e in enumerate(entries):
            if level > 0:
                total += self.pair(cid, i, e, kind, level - 1, allow_hole=False)
            elif kind == "dir":
                total += self.dir_entry(cid, i, e)
            else:
                total += self.pair(cid, i, e, kind, -1, allow_hole=True)
        expect(total == value["len"], cid, f"node len {value['len']} but entries add up to {total}")
        return total, level

    def pair(self, cid, i, e, kind, child_level, allow_hole):
        expect(isinstance(e, list) and len(e) == 2 and is_uint(e[0]), cid, f"entry {i} is not [len, link|null]")
        length, link = e
        if link is None:
            expect(allow_hole, cid, f"entry {i}: null link above level 0")
            self.holes[kind] = self.holes.get(kind, 0) + 1
            return length
        expect(isinstance(link, CID), cid, f"entry {i}: link is not a CID")
        want = RAW if child_level == -1 else DAG_CBOR
        expect(link.codec.name == want, cid, f"entry {i}: link codec {link.codec.name}, expected {want}")
        got, _ = self.subtree(link, kind, child_level)
        expect(got == length, cid, f"entry {i}: says {length} bytes, block holds {got}")
        return length

    def dir_entry(self, cid, i, e):
        expect(isinstance(e, dict) and set(e) == DIR_ENTRY_KEYS, cid, f"directory entry {i} keys {sorted(e) if isinstance(e, dict) else type(e).__name__}")
        expect(isinstance(e["name"], bytes) and e["name"], cid, f"directory entry {i}: name is not non-empty bytes")
        expect(isinstance(e["target"], bytes), cid, f"directory entry {i}: target is not bytes")
        expect(is_uint(e["len"]) and is_uint(e["mode"]), cid, f"directory entry {i}: len or mode")
        kind = e["type"]
        expect(kind in self.dir_entries, cid, f"directory entry {i}: type {kind!r}")
        self.dir_entries[kind] += 1
        link = e["cid"]
        if link is None:
            expect(e["len"] == 0, cid, f"directory entry {i}: null cid but len {e['len']}")
            return 0
        expect(isinstance(link, CID), cid, f"directory entry {i}: cid is not a link")
        expect(kind != "symlink", cid, f"directory entry {i}: a symlink with a cid")
        length, _ = self.subtree(link, "dir" if kind == "dir" else "file", None)
        expect(length == e["len"], cid, f"directory entry {i} ({e['name']!r}): says {e['len']} bytes, tree holds {length}")
        return length


def walk(roots):
    bin_path = os.environ.get("MYCEL_BIN")
    if not bin_path:
        sys.exit("walk.py: set MYCEL_BIN to the mycel binary (and MYCEL_DATA_DIR to the node)")
    w = Walker(bin_path)
    objects = []
    try:
        for r in roots:
            objects.append(w.root(r))
    except CheckError as e:
        print(e, file=sys.stderr)
        print("  reached through: " + " -> ".join(w.path), file=sys.stderr)
        return 1
    summary = {
        "roots": len(objects),
        "blocks": w.blocks,
        "block_bytes": w.block_bytes,
        "max_level": w.max_level,
        "kinds": sorted({o["kind"] for o in objects}),
        "holes": w.holes,
        "dir_entries": w.dir_entries,
        "objects": objects,
        "versions": versions(),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


def versions():
    from importlib.metadata import version

    return {p: version(p) for p in ("dag-cbor", "multiformats", "blake3")}


def self_test():
    """Checks the checker: good blocks pass, each kind of tampering fails."""

    def must_fail(what, f):
        try:
            f()
        except CheckError as e:
            print(f"self-test: {what}: rejected ({e.reason})", file=sys.stderr)
            return
        raise AssertionError(f"self-test: {what} was accepted")

    chunk = bytes(range(256)) * 4
    chunk_cid = cid_of(chunk, RAW)
    node = {"v": 1, "len": len(chunk), "level": 0, "entries": [[len(chunk), chunk_cid], [4096, None]]}
    node_bytes = dag_cbor.encode(node)
    node_cid = cid_of(node_bytes, DAG_CBOR)

    # Known answer: BLAKE3("abc") with the multihash prefix 0x1e 0x20.
    abc = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert bytes(multihash.digest(b"abc", "blake3", size=32)).hex() == "1e20" + abc

    assert check_block(chunk_cid, chunk) == chunk
    assert check_block(node_cid, node_bytes) == node

    flipped = bytearray(chunk)
    flipped[100] ^= 1
    must_fail("raw chunk with one flipped bit", lambda: check_block(chunk_cid, bytes(flipped)))
    flipped = bytearray(node_bytes)
    flipped[-1] ^= 1
    must_fail("dag-cbor node with one flipped bit", lambda: check_block(node_cid, bytes(flipped)))
    must_fail("raw bytes under a dag-cbor link", lambda: check_block(CID("base32", 1, DAG_CBOR, chunk_cid.digest), chunk))
    sha = CID("base32", 1, RAW, multihash.digest(chunk, "sha2-256"))
    must_fail("a sha2-256 link", lambda: check_block(sha, chunk))

    # Non-canonical DAG-CBOR under a CID computed from those very bytes: only the codec
    # checks can catch it. Keys out of order, then an integer in more bytes than needed.
    for what, hexed in [("map keys out of canonical order", "a2616201616101"), ("non-minimal integer", "a161611801")]:
        bad = bytes.fromhex(hexed)
        must_fail(what, lambda bad=bad: check_block(cid_of(bad, DAG_CBOR), bad))
    # The byte comparison itself, with an encoder that disagrees with the stored bytes.
    must_fail("re-encoding that differs", lambda: roundtrip(node_cid, node_bytes, encode=lambda v: node_bytes[:-1] + b"\x00"))
    print(json.dumps({"self_test": "ok", "versions": versions()}))
    return 0


def main(argv):
    if argv == ["--self-test"]:
        return self_test()
    if not argv or any(a.startswith("-") for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    return walk(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
