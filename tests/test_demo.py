"""``ckptfmt demo``'s training run: SIGKILLed at a seeded random moment, in a step or inside a save, resumed exactly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from ckptfmt._cli import main
from ckptfmt._demo import SEED_ENV, _train, _training_demo, kill_plan, kill_seed

pytest.importorskip("torch")

STEPS, EVERY = 12, 4


def test_the_plan_is_seeded_and_covers_steps_and_saves() -> None:
    plans = [kill_plan(seed, 24, 4) for seed in range(200)]
    assert plans == [kill_plan(seed, 24, 4) for seed in range(200)]  # a seed replays its moment
    in_save = [(s, f) for s, f in plans if f is not None]
    mid_step = [s for s, f in plans if f is None]
    assert 60 < len(in_save) < 140 and all(s % 4 == 0 and 0 <= f < 1 for s, f in in_save)
    assert len(set(mid_step)) > 10 and all(2 <= s < 24 for s in mid_step)


def test_seed_from_the_option_the_environment_or_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SEED_ENV, "77")
    assert kill_seed(5) == 5 and kill_seed() == 77
    monkeypatch.delenv(SEED_ENV)
    assert len({kill_seed() for _ in range(8)}) > 1


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run, shared by every seed."""
    d = tmp_path_factory.mktemp("straight")
    code, out = _train(["--dir", str(d / "run"), "--steps", str(STEPS), "--every", str(EVERY)], str(d))
    assert code == 0 and out
    return out


# 9: inside the save of step 8 (resume from 4); 0: mid-step 8, before its save (resume from 4);
# 1: inside the save of step 4, the first checkpoint (no good checkpoint: a fresh start)
@pytest.mark.parametrize(("seed", "plan", "first"), [(9, (8, 0.254), 5), (0, (8, None), 5), (1, (4, 0.242), 1)])
def test_killed_and_resumed_bit_for_bit(tmp_path: Path, straight: dict[str, Any], capsys: pytest.CaptureFixture[str],
                                        seed: int, plan: tuple[int, float | None], first: int) -> None:
    assert kill_plan(seed, STEPS, EVERY) == plan
    assert _training_demo(str(tmp_path), main, seed=seed, steps=STEPS, every=EVERY, straight=straight)
    out = capsys.readouterr().out
    assert f"kill seed {seed}" in out and "process ended with SIGKILL" in out and "match bit for bit" in out
    assert f"resumed at step {first}" in out
    if plan[1] is not None:
        assert f"during the checkpoint save of step {plan[0]}" in out
        assert "left behind by the killed save" in out  # the interrupted temporary, never renamed into place
    resumed = tmp_path / "resumed"
    assert sorted(p.name for p in resumed.glob("*.ckpt"))[-1] == f"step-{STEPS:08d}.ckpt"
    shutil.rmtree(resumed)


def test_cli_seed_option_is_parsed() -> None:
    from ckptfmt._cli import build_parser

    assert build_parser().parse_args(["demo", "--seed", "12"]).seed == 12
