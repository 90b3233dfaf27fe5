"""Resume proof: a run SIGKILLed after a checkpoint, resumed in a new process, matches an uninterrupted run bitwise.

Uses the reference trainer ``ckptfmt.torch.example`` (a tiny transformer LM on CPU) through its command
line (``python -m ckptfmt.torch.example``). For each precision (fp32; bf16 with autocast and a GradScaler;
fp16 with fp32 master weights when ``ckptfmt.torch.amp`` is there), in separate processes: one trains 16
steps straight; one trains with ``--stop-at 7 --kill`` and dies by SIGKILL right after its step-7
checkpoint; a new one resumes that directory. The resumed losses of steps 8..16 and the final parameter
digest must equal the straight run's exactly.

Starting torch costs seconds per process (the trainer's ``use_deterministic_algorithms`` imports
inductor), so the runs are forked from a *zygote*: a process that has imported torch and ckptfmt and
done nothing else. Each run is its own process, with its own pid and exit status, that runs the module as
``python -m`` would and shares no state with the others. To show that forking hides nothing, the bf16
resume is also done in a completely fresh interpreter, which must agree bit for bit.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"):
    pytest.skip("needs fork and SIGKILL (POSIX)", allow_module_level=True)

from ckptfmt._atomic import is_temp_name  # noqa: E402
from ckptfmt.torch import CheckpointManager, load_checkpoint  # noqa: E402

STEPS, STOP, EVERY, BATCH = 16, 7, 4, 8
PRECISIONS = ["fp32", "bf16", "fp16-master"]
TIMEOUT = 240

#: Forks one process per "run" command; each runs ``python -m ckptfmt.torch.example ARGV`` with its stdout
#: and stderr in files. "wait" reports a run's exit status (negative: killed by that signal).
ZYGOTE = textwrap.dedent("""
    import json, os, runpy, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import torch._dynamo, torch._inductor  # what every run would import (deterministic mode, optimizers)
    import ckptfmt.torch
    try:
        import ckptfmt.torch.amp
    except ImportError:
        pass
    pids = {}
    print("ready", flush=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["op"] == "run":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    out, err = open(cmd["out"], "w"), open(cmd["err"], "w")
                    os.dup2(out.fileno(), 1)
                    os.dup2(err.fileno(), 2)
                    sys.stdout, sys.stderr = out, err
                    sys.argv = ["ckptfmt.torch.example", *cmd["argv"]]
                    try:
                        runpy.run_module("ckptfmt.torch.example", run_name="__main__", alter_sys=True)
                        code = 0
                    except SystemExit as e:
                        code = e.code if isinstance(e.code, int) else int(e.code is not None)
                except BaseException:
                    import traceback
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids[cmd["name"]] = pid
        elif cmd["op"] == "wait":
            pid = pids.pop(cmd["name"])
            deadline = time.monotonic() + cmd["timeout"]
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    rc = "timeout"
                    break
                time.sleep(0.02)
            print(json.dumps({"name": cmd["name"], "rc": rc}), flush=True)
    for pid in pids.values():  # the test went away early: take our children with us
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os._exit(0)
""")


def amp_available() -> bool:
    try:
        from ckptfmt.torch.amp import MasterWeightOptimizer  # noqa: F401
    except ImportError:
        return False
    return True


def example_args(directory: Path, precision: str, *extra: str) -> list[str]:
    return ["--dir", os.fspath(directory), "--steps", str(STEPS), "--precision", precision, *extra]


class Zygote:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.stderr = open(root / "zygote.err", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env, cwd=root)
        assert self._readline() == "ready"

    def _readline(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT + 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError("the zygote went away:\n" + (self.root / "zygote.err").read_text()[-4000:])
        return line.strip()

    def _send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def run(self, name: str, argv: list[str]) -> None:
        self._send(op="run", name=name, argv=argv, out=os.fspath(self.root / f"{name}.out"),
                   err=os.fspath(self.root / f"{name}.err"))

    def wait(self, name: str) -> tuple[int, str]:
        """(exit status, stdout) of a run; a failure other than SIGKILL fails the test with its stderr."""
        self._send(op="wait", name=name, timeout=TIMEOUT)
        rc = json.loads(self._readline())["rc"]
        if rc not in (0, -signal.SIGKILL):
            raise AssertionError(f"run {name} ended with {rc}:\n" + (self.root / f"{name}.err").read_text()[-4000:])
        return rc, (self.root / f"{name}.out").read_text()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()


def snapshot(directory: Path) -> dict[str, Any]:
    """What the killed run left behind, read before the resume changes it."""
    return {
        "files": sorted(os.listdir(directory)),
        "steps": [e["step"] for e in CheckpointManager(directory).list()],
        "latest": CheckpointManager(directory).latest(),
        "ckpt": load_checkpoint(directory / f"step-{STOP:08d}.ckpt"),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    precisions = [p for p in PRECISIONS if p != "fp16-master" or amp_available()]
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out: dict[str, dict[str, Any]] = {p: {} for p in precisions}
    fresh: subprocess.Popen[str] | None = None
    zygote = Zygote(root, env)
    try:
        for p in precisions:
            zygote.run(f"straight-{p}", example_args(root / "straight" / p, p))
            zygote.run(f"killed-{p}", example_args(root / "killed" / p, p, "--stop-at", str(STOP), "--kill"))
        for p in precisions:  # resume each in a new process as soon as its killed run is gone
            out[p]["kill_rc"], out[p]["kill_stdout"] = zygote.wait(f"killed-{p}")
            out[p]["left"] = snapshot(root / "killed" / p)
            if p == "bf16":
                shutil.copytree(root / "killed" / p, root / "fresh")
                fresh = subprocess.Popen([sys.executable, "-m", "ckptfmt.torch.example",
                                          *example_args(root / "fresh", p)], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env, cwd=root)
            zygote.run(f"resumed-{p}", example_args(root / "killed" / p, p))
        for p in precisions:
            for kind in ("straight", "resumed"):
                rc, text = zygote.wait(f"{kind}-{p}")
                assert rc == 0
                out[p][kind] = json.loads(text)
            out[p]["final_steps"] = [e["step"] for e in CheckpointManager(root / "killed" / p).list()]
        if fresh is not None:
            stdout, stderr = fresh.communicate(timeout=TIMEOUT)
            assert fresh.returncode == 0, stderr[-4000:]
            out["bf16"]["fresh"] = json.loads(stdout)
        return out
    finally:
        zygote.close()
        if fresh is not None and fresh.poll() is None:
            fresh.kill()
            fresh.communicate()


def result(runs: dict[str, dict[str, Any]], precision: str) -> dict[str, Any]:
    if precision not in runs:
        pytest.skip("ckptfmt.torch.amp (MasterWeightOptimizer) is not importable")
    return runs[precision]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_interrupted_run_died_by_sigkill(runs: dict[str, dict[str, Any]], precision: str) -> None:
    r = result(runs, precision)
    assert r["kill_rc"] == -signal.SIGKILL
    assert r["kill_stdout"] == ""  # killed before it could report anything


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_killed_run_left_its_checkpoint_at_the_stop(runs: dict[str, dict[str, Any]], precision: str) -> None:
    r = result(runs, precision)
    left = r["left"]
    assert left["steps"] == [EVERY, STOP] and left["latest"] == STOP  # keep_last=2
    assert left["files"] == ["index.json", f"step-{EVERY:08d}.ckpt", f"step-{STOP:08d}.ckpt"]
    assert not [n for n in left["files"] if is_temp_name(n)]
    ckpt = left["ckpt"]
    assert (ckpt.step, ckpt.epoch) == (STOP, 0)
    assert ckpt.loss == r["straight"]["losses"][str(STOP)]  # up to the kill, it was the straight run
    assert ckpt.config["precision"] == precision and ckpt.vocab[:2] == ["tok0", "tok1"]
    assert ckpt.extra["sampler"]["offset"] == STOP * BATCH
    assert ckpt.scheduler_state is not None and ckpt.rng_state is not None
    assert (ckpt.scaler_state is not None) == (precision == "bf16")
    if precision == "bf16":
        assert ckpt.scaler_state["scale"] > 0 and "_growth_tracker" in ckpt.scaler_state
    if precision == "fp16-master":
        assert ckpt.model_state["tok.weight"].dtype == torch.float16
        assert "master_weights" in ckpt.optimizer_state
    else:
        assert ckpt.model_state["tok.weight"].dtype == torch.float32


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resumed_run_matches_the_straight_run_exactly(runs: dict[str, dict[str, Any]], precision: str) -> None:
    r = result(runs, precision)
    straight, resumed = r["straight"], r["resumed"]
    assert straight["first"] == 1 and list(straight["losses"]) == [str(s) for s in range(1, STEPS + 1)]
    assert resumed["first"] == STOP + 1  # the step count continues from the checkpoint
    assert list(resumed["losses"]) == [str(s) for s in range(STOP + 1, STEPS + 1)]
    expected = {k: v for k, v in straight["losses"].items() if int(k) > STOP}
    assert resumed["losses"] == expected  # bitwise: JSON floats round-trip exactly
    assert resumed["params"] == straight["params"]
    assert r["final_steps"] == [STEPS - EVERY, STEPS]


def test_a_fresh_interpreter_resumes_to_the_same_bits(runs: dict[str, dict[str, Any]]) -> None:
    """The bf16 resume, run by ``python -m ckptfmt.torch.example`` in a brand-new interpreter, agrees too."""
    r = result(runs, "bf16")
    assert r["fresh"] == r["resumed"]
    assert r["fresh"]["params"] == r["straight"]["params"]


def test_precisions_really_differ(runs: dict[str, dict[str, Any]]) -> None:
    """Guards the comparison above: the precision flag changes the numbers, so equal numbers mean something."""
    digests = {p: r["straight"]["params"] for p, r in runs.items()}
    assert len(set(digests.values())) == len(digests)
    assert runs["fp32"]["straight"]["losses"] != runs["bf16"]["straight"]["losses"]
