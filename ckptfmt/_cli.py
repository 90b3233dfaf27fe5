"""The ``ckptfmt`` command: inspect, verify, diff (each with ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import _api
from ._backend import get_backend
from .errors import CheckpointError, CheckpointNotFoundError, MissingDependencyError

#: leaves listed by ``inspect`` without ``--all`` (text, JSON): a tree of 10**7 leaves stays cheap
_SHOWN = 40
_SHOWN_JSON = 1000


def _print_leaf(leaf: dict[str, Any], width: int) -> None:
    if leaf["kind"] == "value":
        print(f"  {leaf['key']:<{width}}  {leaf['type']:<8} {leaf['value']!r}")
    else:
        shape = "x".join(map(str, leaf["shape"])) or "scalar"
        kind = " (view)" if leaf["kind"] == "view" else ""
        print(f"  {leaf['key']:<{width}}  {leaf['dtype']:<8} {shape:<16} {_human(leaf['nbytes'])}{kind}")


def _print_json_streaming(path: str, summary: dict[str, Any]) -> None:
    """The ``--json --all`` document, leaves written one at a time (memory O(1) per leaf)."""
    del summary["leaves"]
    head = json.dumps(summary, indent=1)
    out = sys.stdout
    out.write(head[:-2] + ',\n "leaves": [')
    with _api.open(path) as ckpt:
        for i, leaf in enumerate(_api.leaf_summaries(ckpt)):
            out.write(("\n  " if i == 0 else ",\n  ") + json.dumps(leaf))
    out.write("\n ]\n}\n")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _time_load(path: str, device: str) -> dict[str, Any]:
    """Load the whole checkpoint onto ``device`` and time it (torch if installed, else cupy or numpy)."""
    import importlib.util
    import time

    if importlib.util.find_spec("torch") is not None:
        backend = "torch"
    elif device != "cpu" and importlib.util.find_spec("cupy") is not None:
        backend = "cupy"
    elif device == "cpu":
        backend = "numpy"
    else:
        raise MissingDependencyError(f"loading onto {device!r} needs torch or cupy: pip install 'ckptfmt[torch]'")
    get_backend(backend)  # import the framework before the clock starts
    with _api.open(path) as ckpt:
        nbytes = int(ckpt.manifest.tensors.nbytes.sum()) if len(ckpt) else 0
        start = time.perf_counter()
        loaded = ckpt.load(backend=backend, device=device, mmap=backend != "cupy")
        if backend == "torch" and device != "cpu":
            import torch

            torch.cuda.synchronize(device)
        elif backend == "cupy":
            import cupy

            cupy.cuda.Device().synchronize()
        seconds = time.perf_counter() - start
    del loaded
    return {"device": device, "backend": backend, "bytes": nbytes, "seconds": seconds,
            "GBps": nbytes / seconds / 1e9 if seconds > 0 else None}


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .distributed import _cli as sharded

    if sharded.is_sharded(args.path):
        return sharded.cmd_inspect(args)
    limit = None if args.all else _SHOWN_JSON if args.json else _SHOWN
    summary = _api.inspect(args.path, max_leaves=0 if args.all else limit)
    if args.device:
        summary["device_load"] = _time_load(args.path, args.device)
    if args.json:
        if not args.all:
            summary["leaves_shown"] = len(summary["leaves"])
            print(json.dumps(summary, indent=1))
            return 0
        _print_json_streaming(args.path, summary)
        return 0
    print(f"{summary['path']}: ckptfmt {summary['format_version']}, {_human(summary['file_size'])}, "
          f"{summary['tensor_count']} tensors ({_human(summary['tensor_bytes'])}), alignment {summary['alignment']}, "
          f"checksums {'on' if summary['checksummed'] else 'off'}")
    print(f"written by {summary['producer'].get('name', '?')} {summary['producer'].get('version', '')} "
          f"at {summary['created'] or '?'}")
    if summary["dtype_bytes"]:
        print("dtypes: " + ", ".join(f"{k} {_human(v)}" for k, v in sorted(summary["dtype_bytes"].items())))
    if summary["metadata"]:
        print("metadata: " + json.dumps(summary["metadata"]))
    if args.all:
        with _api.open(args.path) as ckpt:
            for leaf in _api.leaf_summaries(ckpt):
                _print_leaf(leaf, 0)
    else:
        shown = summary["leaves"]
        width = max((len(leaf["key"]) for leaf in shown), default=0)
        for leaf in shown:
            _print_leaf(leaf, width)
        if len(shown) < summary["leaf_count"]:
            print(f"  ... and {summary['leaf_count'] - len(shown)} more leaves (--all shows them, --json --all "
                  "lists them)")
    if "device_load" in summary:
        t = summary["device_load"]
        print(f"load onto {t['device']} ({t['backend']}): {t['seconds']:.3f} s, "
              f"{(t['GBps'] or 0):.2f} GB/s")
    return 0


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from .distributed import _cli as sharded

    return sharded.cmd_consolidate(args)


def _cmd_verify(args: argparse.Namespace) -> int:
    import os

    from .distributed import _cli as sharded

    if len(args.path) == 1 and sharded.is_sharded(args.path[0]):
        return sharded.cmd_verify(args)
    if len(args.path) == 1 and not os.path.isdir(args.path[0]):
        report = _verify_with_progress(args.path[0], quiet=args.quiet or args.json)
        if args.json:
            print(json.dumps(report.to_dict(), indent=1))
        else:
            _print_report(report, ok_lines=True)
        return 0 if report.ok else 1
    return _verify_tree(args.path, as_json=args.json, quiet=args.quiet)


def _print_report(report: Any, *, ok_lines: bool) -> None:
    if report.ok:
        if ok_lines:
            note = "" if report.checksummed else " (file has no blob checksums: structure checked only)"
            print(f"OK {report.path}: {report.tensors_checked} tensors, {_human(report.bytes_checked)} verified{note}")
    else:
        print(f"FAILED {report.path}:")
        for err in report.errors:
            print(f"  {err}")


def _walk_checkpoints(roots: Sequence[str]) -> tuple[list[str], list[str]]:
    """Every ``.ckpt`` file under ``roots`` (recursively, symlinked directories not followed) and the temporaries."""
    import os

    from ._atomic import is_temp_name

    files: list[str] = []
    temps: list[str] = []
    for root in roots:
        if not os.path.isdir(root):
            if not os.path.exists(root):
                raise CheckpointNotFoundError(root)
            files.append(root)
            continue
        for d, subdirs, names in os.walk(root):
            subdirs.sort()
            for name in sorted(names):
                if name.endswith(".ckpt"):
                    files.append(os.path.join(d, name))
                elif is_temp_name(name):
                    temps.append(os.path.join(d, name))
    return files, temps


def _verify_tree(roots: Sequence[str], *, as_json: bool, quiet: bool) -> int:
    """``ckptfmt verify DIR...``: every ``.ckpt`` file below, one report each; exit 1 if any is damaged (for cron)."""
    import os

    from ._reader import VerifyReport

    files, temps = _walk_checkpoints(roots)
    sizes = []
    for f in files:
        try:
            sizes.append(os.path.getsize(f))
        except OSError:
            sizes.append(0)
    total = sum(sizes)
    bar: Any = None
    if not (quiet or as_json) and (sys.stderr.isatty() or total >= (256 << 20)):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", file=sys.stderr)
    reports = []
    try:
        for path, size in zip(files, sizes, strict=True):
            try:
                report = _verify_one(path, None if bar is None else bar.update)
            except OSError as e:  # vanished or unreadable while the tree was walked
                report = VerifyReport(path, ok=False, errors=[str(e)])
            if bar is not None:
                bar.update(max(0, size - report.bytes_checked))
            reports.append(report)
            if not as_json:
                if bar is not None and not report.ok:
                    bar.clear()
                _print_report(report, ok_lines=False)
    finally:
        if bar is not None:
            bar.close()
    damaged = [r for r in reports if not r.ok]
    if as_json:
        print(json.dumps({"roots": list(roots), "ok": not damaged, "files": len(reports), "damaged": len(damaged),
                          "bytes_checked": sum(r.bytes_checked for r in reports), "temporaries": temps,
                          "reports": [r.to_dict() for r in reports]}, indent=1))
    else:
        checked = sum(r.bytes_checked for r in reports)
        print(f"{len(reports)} checkpoint files, {_human(checked)} verified: "
              + (f"{len(damaged)} DAMAGED" if damaged else "all OK")
              + (f"; {len(temps)} temporaries of interrupted saves (remove_stale_temps clears them)" if temps else ""))
    return 1 if damaged else 0


def _verify_with_progress(path: str, *, quiet: bool) -> Any:
    """Verify one file, with a progress bar on stderr for large files."""
    import os

    size = os.path.getsize(path) if os.path.isfile(path) else 0
    if quiet or size < (256 << 20):
        return _verify_one(path, None)
    from tqdm import tqdm

    with tqdm(total=size, unit="B", unit_scale=True, desc="verify", file=sys.stderr) as bar:
        return _verify_one(path, bar.update)


def _verify_one(path: str, progress: Any) -> Any:
    from ._reader import Checkpoint, VerifyReport

    try:
        ckpt = Checkpoint(path)
    except (CheckpointError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        return VerifyReport(path, ok=False, errors=[str(e)])
    with ckpt:
        return ckpt.verify(progress=progress)


def _cmd_diff(args: argparse.Namespace) -> int:
    result = _api.diff(args.a, args.b)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for key in result["only_a"]:
            print(f"- {key}")
        for key in result["only_b"]:
            print(f"+ {key}")
        for key in result["changed"]:
            print(f"~ {key}")
        if not any(result.values()):
            print("no differences")
    return 1 if any(result.values()) else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ckptfmt`` command."""
    p = argparse.ArgumentParser(prog="ckptfmt", description="Inspect, verify and compare ckptfmt checkpoints.")
    p.add_argument("--version", action="version", version=f"ckptfmt {_api.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="show the tree, dtypes, shapes, sizes and metadata")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="print a JSON document instead")
    s.add_argument("--device", help="also time a full load onto this device (cpu, cuda, cuda:N)")
    s.add_argument("--all", action="store_true",
                   help=f"list every leaf (the default stops after {_SHOWN}, {_SHOWN_JSON} with --json)")
    s.set_defaults(func=_cmd_inspect)
    s = sub.add_parser("verify", help="check every checksum and padding byte of a file, or of every .ckpt file "
                                      "under a directory (exit 1 if any fails)")
    s.add_argument("path", nargs="+", help="checkpoint files and/or directories (searched recursively)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_verify)
    s = sub.add_parser("diff", help="list the keys that differ between two checkpoints (exit 1 if any)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true", help="print a JSON document instead")
    s.set_defaults(func=_cmd_diff)
    s = sub.add_parser("convert", help="convert torch.save, TorchScript, Lightning, safetensors, Hugging Face model "
                                       "directories, npy/npz, HDF5, DCP, GGUF or TensorFlow checkpoints to ckptfmt")
    s.add_argument("src", help="file or directory; its format is told by content")
    s.add_argument("dst")
    s.add_argument("--allow-pickle", action="store_true",
                   help="UNSAFE: unpickle content that needs more than torch's weights-only loader (runs code "
                        "named by the file; only for files you trust)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the conversion report as JSON")
    s.set_defaults(func=_cmd_convert)
    s = sub.add_parser("export", help="write a ckptfmt checkpoint as HDF5, safetensors (a file or a Hugging Face "
                                      "model directory) or a torch.save file")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", required=True, choices=["hdf5", "safetensors", "hf-safetensors", "torch"])
    s.add_argument("--flatten", help="safetensors only: 'drop' non-tensor leaves, 'copy' shared tensors, or both "
                                     "('drop,copy'); without it such objects are refused")
    s.add_argument("--shard-size", help="hf-safetensors only: most tensor bytes per shard (default 5GB; "
                                        "GB = 10^9, GiB = 2^30)")
    s.add_argument("--compression", choices=["gzip"], help="HDF5 only: compress datasets")
    s.add_argument("--compression-opts", type=int, help="HDF5 only: gzip level 0-9")
    s.add_argument("--chunks", action="store_true", help="HDF5 only: chunked datasets")
    s.set_defaults(func=_cmd_export)
    s = sub.add_parser("consolidate", help="write a sharded (distributed) checkpoint directory as one ckptfmt file")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(func=_cmd_consolidate)
    s = sub.add_parser("migrate", help="rewrite a checkpoint in format 1.0 or 1.1 (lossless, atomic)")
    s.add_argument("src")
    s.add_argument("dst", help="may be SRC itself: it is replaced atomically")
    s.add_argument("--to", required=True, choices=["1.0", "1.1"], help="1.0 decodes every blob; 1.1 compresses "
                                                                        "and packs small blobs")
    s.add_argument("--compression", choices=["none", "fast", "balanced", "maximum"],
                   help="1.1 only (default fast)")
    s.add_argument("--no-pack", action="store_true", help="1.1 only: keep every blob at the file's alignment")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_migrate)
    s = sub.add_parser("ls", help="list the checkpoints of a CheckpointManager directory (its index.json)")
    s.add_argument("directory")
    s.add_argument("--json", action="store_true", help="print the index as JSON")
    s.set_defaults(func=_cmd_ls)
    s = sub.add_parser("demo", help="run the end-to-end tour on an embedded default state")
    s.add_argument("--dir", help="keep the demo's files in this directory instead of a temporary one")
    s.add_argument("--seed", type=int, help="replay the kill moment of an earlier demo (default: "
                                            "$CKPTFMT_DEMO_SEED, else random from the OS; printed)")
    s.set_defaults(func=_cmd_demo)
    return p


def _cmd_migrate(args: argparse.Namespace) -> int:
    from ._migrate import migrate

    try:
        migrate(args.src, args.dst, to=args.to, compression=args.compression,
                pack=None if args.to == "1.0" else not args.no_pack, progress=not args.quiet)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        print(f"ckptfmt: error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from . import convert as conversion

    if args.quiet or args.json:
        report = conversion.convert(args.src, args.dst, allow_pickle=args.allow_pickle)
    else:
        from tqdm import tqdm

        with tqdm(unit="B", unit_scale=True, desc="convert", file=sys.stderr) as bar:
            report = conversion.convert(args.src, args.dst, allow_pickle=args.allow_pickle, progress=bar)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(f"{report.src} ({report.source_format}) -> {report.dst}: {report.tensors} tensors, "
              f"{_human(report.bytes)} in {report.seconds:.2f} s")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .convert._export import export

    options: dict[str, Any] = {}
    if args.to == "hdf5":
        options = {"compression": args.compression, "compression_opts": args.compression_opts,
                   "chunks": args.chunks}
    elif args.compression or args.compression_opts is not None or args.chunks:
        print("ckptfmt: error: --compression, --compression-opts and --chunks apply to --to hdf5 only",
              file=sys.stderr)
        return 2
    if args.shard_size is not None and args.to != "hf-safetensors":
        print("ckptfmt: error: --shard-size applies to --to hf-safetensors only", file=sys.stderr)
        return 2
    export(args.src, args.dst, to=args.to, flatten=args.flatten, shard_size=args.shard_size, **options)
    print(f"{args.src} -> {args.dst} ({args.to})")
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    import datetime as dt
    import os

    from ._index import read_index

    if not os.path.isdir(args.directory):
        raise CheckpointNotFoundError(args.directory)
    entries = [e for e in read_index(args.directory) if os.path.exists(os.path.join(args.directory, e["file"]))]
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0
    if not entries:
        print(f"{args.directory}: no checkpoints")
        return 0
    print(f"{'step':>10}  {'time (UTC)':<19}  {'size':>10}  file  metadata")
    for e in entries:
        when = dt.datetime.fromtimestamp(e["time"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        meta = {k: v for k, v in e.get("metadata", {}).items() if k not in ("kind", "step")}
        print(f"{e['step']:>10}  {when:<19}  {_human(e['size']):>10}  {e['file']}  {json.dumps(meta)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run

    return run(args.dir, cli=main, seed=args.seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptfmt`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CheckpointError as e:
        print(f"ckptfmt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
