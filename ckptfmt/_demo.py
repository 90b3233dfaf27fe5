"""``ckptfmt demo``: an end-to-end tour on an embedded default state, in a temporary directory.

Save, inspect, verify, partial load, resume (load and compare bit for bit), and corruption detection.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _api


def default_state(seed: int = 0) -> dict[str, object]:
    """A small GPT-style training state: weights, Adam moments, counters, config."""
    rng = np.random.default_rng(seed)
    d, vocab, layers = 64, 512, 2
    model: dict[str, np.ndarray] = {"wte": rng.standard_normal((vocab, d), dtype=np.float32)}
    for i in range(layers):
        model[f"h.{i}.attn.c_attn.weight"] = rng.standard_normal((d, 3 * d), dtype=np.float32)
        model[f"h.{i}.mlp.c_fc.weight"] = rng.standard_normal((d, 4 * d), dtype=np.float32)
        model[f"h.{i}.ln_1.weight"] = np.ones(d, dtype=np.float16)
    optim = {name: {"exp_avg": w * 0.1, "exp_avg_sq": (w * w).astype(w.dtype), "step": 100}
             for name, w in model.items()}
    return {
        "model": model,
        "optimizer": {"state": optim, "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8}]},
        "step": 100,
        "epoch": 1,
        "loss": 2.4837,
        "config": {"d_model": d, "vocab": vocab, "layers": layers, "name": "tiny-gpt"},
        "rng": np.random.default_rng(seed).bit_generator.state["state"]["state"].to_bytes(16, "little"),
    }


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def run(directory: str | None = None, *, cli: Callable[[list[str]], int]) -> int:
    """Run the tour; return 0 when every step behaved as it should.

    ``cli`` is the command-line entry point the tour drives (passed in: the CLI imports this module).
    """
    workdir = directory or tempfile.mkdtemp(prefix="ckptfmt-demo-")
    path = os.path.join(workdir, "step100.ckpt")
    state = default_state()
    ok = True
    try:
        print(f"== save  -> {path}")
        t0 = time.perf_counter()
        _api.save(path, state, metadata={"run": "demo", "note": "embedded default state"})
        print(f"   {os.path.getsize(path)} bytes in {1e3 * (time.perf_counter() - t0):.1f} ms (atomic, fsynced)")

        print("== inspect")
        cli(["inspect", path])

        print("== verify")
        ok &= cli(["verify", path]) == 0

        print("== partial load: one tensor, lazily")
        with _api.open(path) as ckpt:
            info = ckpt.info("model/wte")
            wte = ckpt.get("model/wte")
            print(f"   model/wte {info.dtype} {info.shape} at offset {info.offset}: mean {float(wte.mean()):+.5f}")

        print("== resume: load everything back and compare bit for bit")
        restored = _api.load(path)
        same = _same(state, restored)
        print(f"   restored step={restored['step']} epoch={restored['epoch']} loss={restored['loss']}: "
              f"{'identical' if same else 'DIFFERENT'}")
        ok &= same

        print("== corruption is caught")
        bad = os.path.join(workdir, "corrupt.ckpt")
        shutil.copyfile(path, bad)
        with open(bad, "r+b") as f:
            f.seek(info.offset + 10)
            byte = f.read(1)
            f.seek(info.offset + 10)
            f.write(bytes([byte[0] ^ 0xFF]))
        caught = cli(["verify", bad]) == 1
        print(f"   flipped one byte of model/wte: {'detected' if caught else 'NOT DETECTED'}")
        ok &= caught

        print("== diff against a later step")
        later = dict(state, step=101)
        _api.save(os.path.join(workdir, "step101.ckpt"), later)
        cli(["diff", path, os.path.join(workdir, "step101.ckpt")])
        if importlib.util.find_spec("torch") is not None:
            ok &= _training_demo(os.path.join(workdir, "training"), cli)
        else:
            print("== training resume demo skipped: torch is not installed (pip install 'ckptfmt[torch]')")
    finally:
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("demo:", "all steps OK" if ok else "SOME STEPS FAILED")
    return 0 if ok else 1


def _train(args: list[str]) -> tuple[int, dict[str, Any]]:
    """Run the example trainer in a new process; return its exit status and the JSON it printed."""
    done = subprocess.run([sys.executable, "-m", "ckptfmt.torch.example", *args], capture_output=True, text=True,
                          check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode not in (0, -9) or (done.returncode == 0 and not lines):
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode, json.loads(lines[-1]) if lines else {}


def _training_demo(workdir: str, cli: Callable[[list[str]], int], steps: int = 24, stop_at: int = 10) -> bool:
    """Train a tiny transformer straight through, and again killed at ``stop_at`` and resumed: same losses?"""
    straight, broken = os.path.join(workdir, "straight"), os.path.join(workdir, "resumed")
    print(f"== training: a tiny transformer LM (bf16 autocast, AdamW, warm-up, dropout, shuffled data), {steps} steps")
    _, full = _train(["--dir", straight, "--steps", str(steps)])
    print(f"== training again, killed with SIGKILL right after the checkpoint of step {stop_at} ...")
    code, _ = _train(["--dir", broken, "--steps", str(steps), "--stop-at", str(stop_at), "--kill"])
    print(f"   process ended with {'SIGKILL' if code == -9 else f'status {code}'}")
    print("== ... and resumed in a new process from the latest checkpoint")
    _, rest = _train(["--dir", broken, "--steps", str(steps)])
    if not full or not rest:
        print("   training failed")
        return False
    print(f"   {'step':>4}  {'straight':>12}  {'resumed':>12}")
    same = True
    for step in range(int(rest["first"]), steps + 1):
        a, b = full["losses"][str(step)], rest["losses"][str(step)]
        same &= a == b
        print(f"   {step:>4}  {a:>12.8f}  {b:>12.8f}  {'==' if a == b else '!='}")
    same &= full["params"] == rest["params"]
    print(f"   losses and final parameters {'match bit for bit' if same else 'DIFFER'} "
          f"(parameter digest {rest['params']})")
    latest = os.path.join(broken, sorted(n for n in os.listdir(broken) if n.endswith(".ckpt"))[-1])
    print("== ckptfmt ls / inspect / verify on the run's checkpoints")
    cli(["ls", broken])
    cli(["inspect", latest])
    return same and cli(["verify", latest]) == 0
