"""``ckptfmt demo``: an end-to-end tour on an embedded default state, in a temporary directory.

Save, inspect, verify, partial load, resume (load and compare bit for bit), corruption detection,
and a training run SIGKILLed at a random moment (sometimes inside a checkpoint save), resumed from
its latest good checkpoint. The moment is drawn from a seed that is printed; ``--seed`` or
``CKPTFMT_DEMO_SEED`` replays it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
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


#: replays a demo's kill moment when set (as ``ckptfmt demo --seed``)
SEED_ENV = "CKPTFMT_DEMO_SEED"


def kill_seed(seed: int | None = None) -> int:
    """``seed``, else ``CKPTFMT_DEMO_SEED``, else 32 fresh bits from the OS."""
    if seed is not None:
        return int(seed)
    env = os.environ.get(SEED_ENV)
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


def kill_plan(seed: int, steps: int, every: int) -> tuple[int, float | None]:
    """Where the seeded crash lands: (step, None) mid-step, or (step, fraction) inside that step's save.

    Half the seeds land in a checkpoint save (a step that saves, at a fraction of its tensor bytes),
    half in the middle of a training step.
    """
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return rng.choice(range(every, steps, every)), round(rng.uniform(0.0, 0.95), 3)
    return rng.randint(2, steps - 1), None


def run(directory: str | None = None, *, cli: Callable[[list[str]], int], seed: int | None = None) -> int:
    """Run the tour; return 0 when every step behaved as it should.

    ``cli`` is the command-line entry point the tour drives (passed in: the CLI imports this module).
    ``seed`` picks the moment the training run is killed (default: :func:`kill_seed`).
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
            ok &= _training_demo(os.path.join(workdir, "training"), cli, seed=kill_seed(seed))
        else:
            print("== training resume demo skipped: torch is not installed (pip install 'ckptfmt[torch]')")
    finally:
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("demo:", "all steps OK" if ok else "SOME STEPS FAILED")
    return 0 if ok else 1


def _train(args: list[str], cwd: str) -> tuple[int, dict[str, Any]]:
    """Run the example trainer in a new process (in ``cwd``); return its exit status and the JSON it printed."""
    os.makedirs(cwd, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "ckptfmt.torch.example", *args], capture_output=True, text=True,
                          check=False, cwd=cwd)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode not in (0, -9) or (done.returncode == 0 and not lines):
        print(done.stderr[-2000:], file=sys.stderr)
    return done.returncode, json.loads(lines[-1]) if lines else {}


def _training_demo(workdir: str, cli: Callable[[list[str]], int], *, seed: int, steps: int = 24, every: int = 4,
                   straight: dict[str, Any] | None = None) -> bool:
    """Train a tiny transformer straight through, and again SIGKILLed at a seeded random moment and resumed.

    Passes when the resumed run's losses and final parameters equal the straight run's bit for bit
    from the resume point on. ``straight``: that run's result, when already known (tests reuse it).
    """
    step, fraction = kill_plan(seed, steps, every)
    workdir = os.path.abspath(workdir)
    broken = os.path.join(workdir, "resumed")
    print(f"== training: a tiny transformer LM (bf16 autocast, AdamW, warm-up, dropout, shuffled data), {steps} steps,"
          f" a checkpoint every {every}")
    full = straight if straight is not None else _train(["--dir", os.path.join(workdir, "straight"),
                                                           "--steps", str(steps), "--every", str(every)], workdir)[1]
    where = f"during the checkpoint save of step {step}, {fraction:.0%} of the way through its tensor bytes" \
        if fraction is not None else f"in the middle of step {step}, before its checkpoint"
    print(f"== training again, killed with SIGKILL {where}")
    print(f"   (kill seed {seed}: replay with `ckptfmt demo --seed {seed}` or {SEED_ENV}={seed})")
    args = ["--dir", broken, "--steps", str(steps), "--every", str(every), "--kill-at", str(step)]
    code, _ = _train(args + (["--kill-in-save", str(fraction)] if fraction is not None else []), workdir)
    print(f"   process ended with {'SIGKILL' if code == -9 else f'status {code}'}")
    killed = code == -9
    left = sorted(n for n in os.listdir(broken) if "ckptfmt-tmp" in n)
    for name in left:
        print(f"   left behind by the killed save: {name} ({os.path.getsize(os.path.join(broken, name))} bytes)")
    print("== ... and resumed in a new process from the latest good checkpoint")
    _, rest = _train(["--dir", broken, "--steps", str(steps), "--every", str(every)], workdir)
    if not full or not rest:
        print("   training failed")
        return False
    first = int(rest["first"])
    print(f"   resumed at step {first}" + (" (no checkpoint had been completed: a fresh start)" if first == 1 else
                                          f" from the checkpoint of step {first - 1}"))
    print(f"   {'step':>4}  {'straight':>12}  {'resumed':>12}")
    same = killed and first <= step  # the killed step's work, and its interrupted save, were lost
    for s in range(first, steps + 1):
        a, b = full["losses"][str(s)], rest["losses"][str(s)]
        same &= a == b
        print(f"   {s:>4}  {a:>12.8f}  {b:>12.8f}  {'==' if a == b else '!='}")
    same &= full["params"] == rest["params"]
    print(f"   losses and final parameters {'match bit for bit' if same else 'DIFFER'} "
          f"(parameter digest {rest['params']})")
    latest = os.path.join(broken, sorted(n for n in os.listdir(broken) if n.endswith(".ckpt"))[-1])
    print("== ckptfmt ls / inspect / verify on the run's checkpoints")
    cli(["ls", broken])
    cli(["inspect", latest])
    return same and cli(["verify", latest]) == 0
