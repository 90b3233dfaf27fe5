"""A sampler whose position goes into the checkpoint, so that a resumed run sees the same data order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices, reproducible per epoch, that resume mid-epoch.

    The order of epoch ``e`` is a permutation drawn from a generator seeded from ``(seed, e)``,
    independent of any global RNG. The sampler counts the indices it has handed out; its
    ``state_dict()`` (``epoch``, ``seed``, ``offset``) saved in a checkpoint makes a resumed
    sampler continue from the next index. Call :meth:`set_epoch` (or let the iterator run out,
    which advances the epoch) at each epoch start.

    With a ``DataLoader`` of ``num_workers > 0``, workers prefetch: the sampler runs ahead of the
    batches the model has seen. Record progress from the training loop instead with
    ``sampler.set_offset(batches_done * batch_size)`` before saving.
    """

    def __init__(self, data: Sized | int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.size = data if isinstance(data, int) else len(data)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.offset = 0

    def __len__(self) -> int:
        return self.size - self.offset

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``."""
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator()
        # torch's CPU generator keeps only 32 bits of a seed: mix (seed, epoch) into them
        digest = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=4).digest()
        g.manual_seed(int.from_bytes(digest, "little"))
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.offset < self.size:
            i = order[self.offset]
            self.offset += 1
            yield i
        self.epoch += 1
        self.offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.offset = epoch, 0

    def set_offset(self, offset: int) -> None:
        """Declare how many indices of the current epoch the model has consumed."""
        if not 0 <= offset <= self.size:
            raise ValueError(f"offset {offset} is outside the epoch's {self.size} indices")
        self.offset = offset

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "seed", "offset", "size", "shuffle"}``: plain values for the checkpoint."""
        return {"epoch": self.epoch, "seed": self.seed, "offset": self.offset, "size": self.size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved sampler stopped; refuses a state for a dataset of another size."""
        if int(state["size"]) != self.size:
            raise ValueError(f"sampler state is for {state['size']} samples, this dataset has {self.size}")
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.set_offset(int(state["offset"]))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
