"""tensorstore's OCDBT key-value store (Orbax's default layout), read without tensorstore.

The format (tensorstore docs, kvstore/ocdbt "Storage format"): ``manifest.ocdbt`` holds the database
configuration, a data file table and the version tree; the latest version names the root B+tree node,
stored with the other nodes and the large values in log-structured data files (``d/<hex>``, or any
relative path). Each encoded manifest, version tree node and B+tree node has an outer header (magic
``uint32be``, total length ``uint64le``, version and compression varints), a body (raw or zstd) and a
``crc32c`` footer. Only the latest version is read; the B+tree is walked to list every key with where
its value lies: inline bytes or ``(data file, offset, length)``.

Everything is hostile: each length and count is checked against the bytes left before it is used,
nodes are decoded to at most ``max_decoded_node_bytes`` (and :data:`MAX_NODE`), the tree's height
and total node count are capped, checksums are verified, and every data file path must be a relative
path whose real path stays inside the checkpoint directory.
"""

from __future__ import annotations

import os
import struct

from ._errors import CorruptSourceError, UnsupportedSourceError
from ._zarr import Value, crc32c, inflate, inside_root

__all__ = ["MANIFEST", "read_ocdbt"]

MANIFEST = "manifest.ocdbt"
_MANIFEST_MAGIC, _VERSION_MAGIC, _BTREE_MAGIC = 0x0CDB3A2A, 0x0CDB1234, 0x0CDB20DE
#: cap of an encoded or decoded manifest or node
MAX_NODE = 64 << 20
_MAX_HEIGHT = 32
_MAX_NODES = 1 << 20
_MAX_PATH = 65535
_MAX_KEY = 1 << 16


class _Buf:
    """A cursor over decoded bytes; every read is checked against what is left."""

    def __init__(self, data: bytes, cited: str, what: str) -> None:
        self.data, self.pos, self.cited, self.what = data, 0, cited, what

    def fail(self, msg: str) -> CorruptSourceError:
        return CorruptSourceError(self.cited, f"OCDBT {self.what}: {msg} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise self.fail(f"{n} bytes wanted, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise self.fail("a varint longer than 64 bits")

    def count(self, n: int, each: int = 1) -> int:
        """``n`` as an element count: each element takes at least ``each`` bytes of what is left."""
        if n * each > len(self.data) - self.pos:
            raise self.fail(f"a count of {n} cannot fit in the {len(self.data) - self.pos} bytes left")
        return n

    def varints(self, n: int) -> list[int]:
        return [self.varint() for _ in range(n)]


def _decode(raw: bytes, magic: int, cited: str, what: str, limit: int) -> _Buf:
    """The body of an encoded manifest or node (header and crc32c checked, zstd undone)."""
    if len(raw) < 18:
        raise CorruptSourceError(cited, f"OCDBT {what}: {len(raw)} bytes is too short")
    (got_magic,) = struct.unpack_from(">I", raw)
    if got_magic != magic:
        raise CorruptSourceError(cited, f"OCDBT {what}: magic 0x{got_magic:08x}, expected 0x{magic:08x}")
    (length,) = struct.unpack_from("<Q", raw, 4)
    if length != len(raw):
        raise CorruptSourceError(cited, f"OCDBT {what}: says it has {length} bytes, {len(raw)} were stored")
    if crc32c(raw[:-4]) != struct.unpack_from("<I", raw, len(raw) - 4)[0]:
        raise CorruptSourceError(cited, f"OCDBT {what}: crc32c checksum mismatch")
    head = _Buf(raw[:-4], cited, what)
    head.pos = 12
    version, compression = head.varint(), head.varint()
    if version != 0:
        raise UnsupportedSourceError(cited, f"OCDBT {what}: format version {version} (ckptfmt reads 0)")
    body = raw[head.pos : -4]
    if compression == 1:
        body = inflate(body, "zstd", limit, cited)
    elif compression != 0:
        raise UnsupportedSourceError(cited, f"OCDBT {what}: compression format {compression}")
    return _Buf(body, cited, what)


def _file_table(b: _Buf) -> list[tuple[bytes, bytes]]:
    """[(base_path, relative_path), ...] of a data file table (prefix-compressed)."""
    n = b.count(b.varint())
    prefix = b.varints(n - 1) if n else []
    suffix = b.varints(n)
    base = b.varints(n)
    out: list[tuple[bytes, bytes]] = []
    prev = b""
    total = 0
    for i in range(n):
        keep = prefix[i - 1] if i else 0
        if keep > len(prev):
            raise b.fail("a data file path prefix longer than the previous path")
        path = prev[:keep] + b.take(suffix[i])
        if len(path) > _MAX_PATH or base[i] > len(path):
            raise b.fail("a data file path too long, or its base longer than itself")
        total += len(path)
        if total > _expansion(b):
            raise b.fail("data file paths whose shared prefixes expand far beyond the node")
        out.append((path[: base[i]], path[base[i] :]))
        prev = path
    return out


def _expansion(b: _Buf) -> int:
    """How many bytes of keys or paths prefix compression may expand a decoded node or manifest to."""
    return 16 * len(b.data) + (1 << 20)


class _Db:
    def __init__(self, root: str, directory: str) -> None:
        self.root, self.directory = root, directory
        self.nodes = 0
        self.max_node = MAX_NODE
        #: bytes of B+tree nodes decoded so far, and the sizes of the data files they came from
        self.decoded = 0
        self.sizes: dict[str, int] = {}
        self.seen: set[tuple[str, int, int]] = set()

    def path(self, transitive: bytes, entry: tuple[bytes, bytes], cited: str) -> tuple[str, bytes]:
        """(real path of a data file, transitive path for what it holds)."""
        base, rel = entry
        try:
            name = (transitive + base + rel).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptSourceError(cited, "OCDBT: a data file path that is not UTF-8") from None
        return inside_root(self.root, name, cited=cited, what="OCDBT data file"), transitive + base

    def read(self, file: str, offset: int, length: int, cited: str) -> bytes:
        if length > self.max_node:
            raise CorruptSourceError(cited, f"OCDBT: a node of {length} bytes (cap {self.max_node})")
        try:
            size = os.path.getsize(file)
            if offset + length > size:
                raise CorruptSourceError(file, f"OCDBT: bytes [{offset}, {offset + length}) of a {size}-byte data file")
            with open(file, "rb") as f:
                f.seek(offset)
                return f.read(length)
        except OSError as e:
            raise CorruptSourceError(cited, f"OCDBT: data file {file} cannot be read ({e})") from None

    def walk(self, file: str, offset: int, length: int, transitive: bytes, prefix: bytes, height: int,
             out: dict[str, Value]) -> None:
        """Add the keys of the B+tree node at ``(file, offset, length)`` to ``out``."""
        if (file, offset, length) in self.seen:
            raise UnsupportedSourceError(file, f"OCDBT: the B+tree node at [{offset}, {offset + length}) is reached "
                                               "by two paths (a shared subtree, which ckptfmt does not read)")
        self.seen.add((file, offset, length))
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise CorruptSourceError(self.directory, f"OCDBT: more than {_MAX_NODES} B+tree nodes")
        b = _decode(self.read(file, offset, length, self.directory), _BTREE_MAGIC, file, "B+tree node",
                    self.max_node)
        self.sizes.setdefault(file, os.path.getsize(file))
        self.decoded += len(b.data)
        if self.decoded > 8 * sum(self.sizes.values()) + (64 << 20):  # nodes reached by many paths (a DAG)
            raise CorruptSourceError(self.directory, f"OCDBT: the B+tree decodes to over {self.decoded} bytes, far "
                                                     "more than its data files hold")
        if b.u8() != height:
            raise b.fail(f"a node of another height than its parent says ({height})")
        table = _file_table(b)
        n = b.count(b.varint())
        keep = b.varints(n - 1) if n else []
        suffix = b.varints(n)
        common = b.varints(n) if height else []
        keys: list[bytes] = []
        prev = b""
        total = 0
        for i in range(n):
            k = keep[i - 1] if i else 0
            if k > len(prev):
                raise b.fail("a key prefix longer than the previous key")
            prev = prev[:k] + b.take(suffix[i])
            total += len(prev) + len(prefix)
            if len(prev) + len(prefix) > _MAX_KEY or total > _expansion(b):
                raise b.fail("keys whose shared prefixes expand too long")
            keys.append(prev)

        def file_of(i: int) -> tuple[str, bytes]:
            if i >= len(table):
                raise b.fail(f"data file id {i} of a table of {len(table)}")
            return self.path(transitive, table[i], file)

        if height:
            ids, offsets, lengths = b.varints(n), b.varints(n), b.varints(n)
            b.varints(3 * n)  # statistics: num_keys, num_tree_bytes, num_indirect_value_bytes
            for i in range(n):
                if common[i] > len(keys[i]):
                    raise b.fail("a subtree common prefix longer than its key")
                child, child_transitive = file_of(ids[i])
                self.walk(child, offsets[i], lengths[i], child_transitive, prefix + keys[i][: common[i]],
                          height - 1, out)
            return
        lengths = b.varints(n)
        kinds = b.varints(n)
        if any(k not in (0, 1) for k in kinds):
            raise b.fail("a value kind other than inline (0) or out-of-line (1)")
        indirect = [i for i in range(n) if kinds[i] == 1]
        ids, offsets = b.varints(len(indirect)), b.varints(len(indirect))
        where: dict[int, Value] = {}
        for j, i in enumerate(indirect):
            data_file, _ = file_of(ids[j])
            where[i] = (data_file, offsets[j], lengths[i])
        for i in range(n):
            if kinds[i] == 0:
                where[i] = b.take(lengths[i])
        for i in range(n):
            try:
                key = (prefix + keys[i]).decode("utf-8")
            except UnicodeDecodeError:
                raise b.fail("a key that is not UTF-8") from None
            if key in out:
                raise b.fail(f"the key {key!r:.80} twice")
            out[key] = where[i]


def read_ocdbt(directory: str) -> dict[str, Value]:
    """``{key: value location}`` of the latest version of the OCDBT database in ``directory``."""
    root = os.path.realpath(directory)
    manifest = os.path.join(directory, MANIFEST)
    size = os.path.getsize(manifest)
    if size > MAX_NODE:
        raise UnsupportedSourceError(manifest, f"OCDBT manifest of {size} bytes (cap {MAX_NODE})")
    with open(manifest, "rb") as f:
        b = _decode(f.read(MAX_NODE + 1), _MANIFEST_MAGIC, manifest, "manifest", MAX_NODE)
    b.take(16)  # uuid
    kind = b.varint()  # manifest kind: 0 single manifest.ocdbt, 1 numbered manifests (coordinated writers)
    if kind != 0:
        raise UnsupportedSourceError(manifest, f"OCDBT manifest kind {kind} (numbered manifests); ckptfmt reads "
                                               "the single-manifest databases Orbax writes")
    b.varint()  # max_inline_value_bytes
    max_node = b.varint()
    b.u8()  # version_tree_arity_log2
    if b.varint() != 0:  # compression method: zstd, with its level
        b.take(4)
    db = _Db(root, directory)
    db.max_node = min(MAX_NODE, max(max_node, 1 << 10))
    table = _file_table(b)
    n = b.count(b.varint())
    if n == 0:
        return {}
    b.varints(n)  # generation numbers
    heights = list(b.take(n))
    ids, offsets, lengths = b.varints(n), b.varints(n), b.varints(n)
    height = heights[-1]  # the latest version
    if height > _MAX_HEIGHT:
        raise b.fail(f"a B+tree of height {height}")
    out: dict[str, Value] = {}
    if lengths[-1] == 0:  # an empty tree has no root node
        return out
    if ids[-1] >= len(table):
        raise b.fail(f"data file id {ids[-1]} of a table of {len(table)}")
    file, transitive = db.path(b"", table[ids[-1]], manifest)
    db.walk(file, offsets[-1], lengths[-1], transitive, b"", height, out)
    return out
