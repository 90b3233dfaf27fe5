"""ResumableSampler: reproducible per-epoch order that resumes mid-epoch from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from ckptfmt.torch import ResumableSampler, load_checkpoint, save_checkpoint  # noqa: E402


def take(sampler: ResumableSampler, n: int) -> list[int]:
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_order_is_a_deterministic_permutation_per_epoch() -> None:
    a, b = ResumableSampler(50, seed=7), ResumableSampler(range(50), seed=7)
    assert len(a) == len(b) == 50
    first = list(a)
    assert sorted(first) == list(range(50))
    assert first == list(b) == a.order(0) == ResumableSampler(50, seed=7).order(0)
    assert first != list(range(50))
    assert ResumableSampler(50, seed=8).order(0) != first


def test_epochs_differ_and_exhausting_an_epoch_advances_it() -> None:
    s = ResumableSampler(40, seed=1)
    e0 = list(s)
    assert (s.epoch, s.offset) == (1, 0)
    e1 = list(s)
    assert (s.epoch, s.offset) == (2, 0)
    assert e0 != e1 and sorted(e0) == sorted(e1) == list(range(40))
    assert e0 == s.order(0) and e1 == s.order(1)


def test_order_ignores_the_global_rng() -> None:
    torch.manual_seed(0)
    a = ResumableSampler(30, seed=5).order(2)
    torch.manual_seed(123)
    torch.rand(10)
    assert ResumableSampler(30, seed=5).order(2) == a


def test_unshuffled_order() -> None:
    s = ResumableSampler(6, shuffle=False)
    assert list(s) == list(range(6)) and list(s) == list(range(6))


@pytest.mark.parametrize("consumed", [0, 1, 13, 29, 30])
def test_resume_mid_epoch_in_a_new_sampler(consumed: int) -> None:
    s = ResumableSampler(30, seed=3)
    s.set_epoch(4)
    seen = take(s, consumed)
    state = s.state_dict()
    assert state == {"epoch": 4, "seed": 3, "offset": consumed, "size": 30, "shuffle": True}
    assert len(s) == 30 - consumed
    rest_uninterrupted = list(s)  # the same iterator protocol: a fresh pass continues at the offset

    new = ResumableSampler(30, seed=999)
    new.load_state_dict(state)
    assert (new.epoch, new.seed, new.offset) == (4, 3, consumed)
    rest = list(new)
    assert rest == rest_uninterrupted == s.order(4)[consumed:]
    assert seen + rest == s.order(4)
    assert list(new) == s.order(5)  # and the next epoch follows


def test_resume_at_an_epoch_boundary_continues_the_same_stream() -> None:
    """Saved after the last index of an epoch but before the iterator ran out: both streams go on alike."""
    s = ResumableSampler(8, seed=2)
    it = iter(s)
    assert [next(it) for _ in range(8)] == s.order(0)
    state = s.state_dict()
    uninterrupted = list(it) + list(iter(s))
    new = ResumableSampler(8)
    new.load_state_dict(state)
    resumed = list(iter(new)) + list(iter(new))
    assert uninterrupted == resumed == s.order(1)


def test_set_epoch_restarts_an_epoch() -> None:
    s = ResumableSampler(12, seed=0)
    take(s, 5)
    s.set_epoch(3)
    assert (s.epoch, s.offset) == (3, 0) and len(s) == 12
    assert list(s) == s.order(3)


def test_set_offset() -> None:
    s = ResumableSampler(10, seed=0)
    s.set_offset(4)
    assert list(s) == s.order(0)[4:]
    s.set_offset(10)
    assert len(s) == 0
    s.set_offset(0)
    for bad in (-1, 11):
        with pytest.raises(ValueError, match="outside"):
            s.set_offset(bad)
    assert s.offset == 0


def test_state_for_another_dataset_size_is_refused() -> None:
    state = ResumableSampler(10).state_dict()
    s = ResumableSampler(11, seed=4)
    with pytest.raises(ValueError, match="10 samples"):
        s.load_state_dict(state)
    assert (s.epoch, s.seed, s.offset) == (0, 4, 0)


def test_state_dict_survives_a_checkpoint(tmp_path: Path) -> None:
    s = ResumableSampler(20, seed=9, shuffle=False)
    take(s, 7)
    save_checkpoint(tmp_path / "s.ckpt", {}, extra={"sampler": s.state_dict()}, rng=False)
    state = load_checkpoint(tmp_path / "s.ckpt").extra["sampler"]
    assert state == s.state_dict() and type(state["offset"]) is int and type(state["shuffle"]) is bool
    new = ResumableSampler(20, shuffle=True)
    new.load_state_dict(state)
    assert new.shuffle is False and list(new) == list(range(7, 20))


@pytest.mark.parametrize("drop_last", [False, True])
def test_dataloader_gives_the_same_batches_after_resume(tmp_path: Path, drop_last: bool) -> None:
    data = TensorDataset(torch.arange(23) * 10)

    def loader(sampler: ResumableSampler) -> DataLoader:
        return DataLoader(data, batch_size=4, sampler=sampler, drop_last=drop_last, num_workers=0)

    def stream(dl: DataLoader, epochs: int) -> list[list[int]]:
        return [batch[0].tolist() for _ in range(epochs) for batch in dl]

    straight = stream(loader(ResumableSampler(data, seed=11)), 3)

    sampler = ResumableSampler(data, seed=11)
    dl = loader(sampler)
    got = stream(dl, 1)
    it = iter(dl)
    got += [next(it)[0].tolist() for _ in range(2)]  # two batches into the second epoch, then "crash"
    save_checkpoint(tmp_path / "d.ckpt", {}, extra={"sampler": sampler.state_dict()}, rng=False)
    assert sampler.state_dict()["offset"] == 8 and sampler.state_dict()["epoch"] == 1
    del it, dl, sampler

    resumed = ResumableSampler(data, seed=0)
    resumed.load_state_dict(load_checkpoint(tmp_path / "d.ckpt").extra["sampler"])
    got += stream(loader(resumed), 2)
    assert got == straight
    per_epoch = 23 // 4 if drop_last else -(-23 // 4)
    assert len(straight) == 3 * per_epoch
