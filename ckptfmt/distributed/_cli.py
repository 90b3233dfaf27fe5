"""The ``ckptfmt`` subcommands for sharded directories: inspect, verify, consolidate (torch-free)."""

from __future__ import annotations

import argparse
import json
import os

from ._consolidate import consolidate, inspect, verify
from ._read import is_sharded_dir


def is_sharded(path: str) -> bool:
    """True for a local sharded checkpoint directory (``ckptfmt inspect/verify`` dispatch on it)."""
    return os.path.isdir(path) and is_sharded_dir(path)


def cmd_inspect(args: argparse.Namespace) -> int:
    s = inspect(args.path)
    if args.json:
        print(json.dumps(s, indent=1, default=lambda b: {"type": "bytes", "len": len(b)}))
        return 0
    print(f"{s['path']}: sharded ckptfmt checkpoint {s['name']!r}, {s['world_size']} ranks, {len(s['files'])} files, "
          f"{s['tensor_count']} tensors ({s['tensor_bytes']} bytes), {s['value_count']} values, "
          f"block {s['block_size']}")
    print(f"written by {s['producer'].get('name', '?')} {s['producer'].get('version', '')} at {s['created']}")
    if s["metadata"]:
        print("metadata: " + json.dumps(s["metadata"], default=str))
    shown = s["tensors"] if args.all else s["tensors"][:40]
    for t in shown:
        print(f"  {t['key']}  {t['dtype']} {t['shape']}  {len(t['chunks'])} chunk(s)")
    for v in s["values"] if args.all else s["values"][:40]:
        print(f"  {v['key']}  value ({v['length']} bytes)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    r = verify(args.path[0] if isinstance(args.path, list) else args.path)
    if args.json:
        print(json.dumps(r.to_dict(), indent=1))
    elif r.ok:
        print(f"OK {r.path}: {r.tensors_checked} tensors (every chunk covered once), {r.values_checked} values, "
              f"{r.files_checked} files, {r.bytes_checked} bytes verified")
    else:
        print(f"FAILED {r.path}:")
        for e in r.errors:
            print(f"  {e}")
    return 0 if r.ok else 1


def cmd_consolidate(args: argparse.Namespace) -> int:
    consolidate(args.src, args.dst)
    print(f"{args.src} -> {args.dst}")
    return 0
