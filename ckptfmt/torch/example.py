"""A small transformer language model trained on CPU, checkpointed, killed and resumed.

This is the reference for resume-exact training with ckptfmt, used by ``ckptfmt demo`` and by the
tests: everything that decides the next loss — weights, AdamW moments, the warm-up schedule, the
loss scaler or master weights, every RNG (dropout draws from torch's), and the position in the
shuffled data — goes into the checkpoint, so a run stopped at any step and resumed in a new process
produces the very same losses and parameters, bit for bit.

    python -m ckptfmt.torch.example --dir runs/demo --steps 30 [--stop-at 12] [--precision bf16]
    python -m ckptfmt.torch.example --dir runs/demo --steps 24 --kill-at 12 [--kill-in-save 0.4]

``--kill-at`` simulates a crash: SIGKILL in the middle of a step, or, with ``--kill-in-save``, in the
middle of that step's checkpoint save once the given fraction of its tensor bytes is written (through
the writer's ``progress`` callback), leaving a half-written temporary file as a real crash would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .manager import CheckpointManager


@dataclass(frozen=True)
class Config:
    """Model and run settings, stored in every checkpoint."""

    vocab: int = 64
    d_model: int = 32
    heads: int = 4
    context: int = 16
    dropout: float = 0.1
    batch: int = 8
    samples: int = 256
    lr: float = 3e-3
    warmup: int = 5
    seed: int = 1234
    precision: str = "bf16"  # "fp32", "bf16" (autocast), "fp16-master" (MasterWeightOptimizer)


class Block(nn.Module):
    """Pre-norm attention + MLP."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token + position embeddings, one block, an LM head tied to the token embedding."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        nn.init.normal_(self.tok.weight, std=0.02)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.block = Block(cfg)
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight
        self.mask: torch.Tensor
        self.register_buffer("mask", torch.triu(torch.full((cfg.context, cfg.context), float("-inf")), 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t)))
        return self.head(self.ln(self.block(x, self.mask[:t, :t].to(x.dtype))))


class Tokens(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A deterministic synthetic corpus: noisy arithmetic sequences over the vocabulary."""

    def __init__(self, cfg: Config) -> None:
        g = torch.Generator().manual_seed(cfg.seed)
        start = torch.randint(0, cfg.vocab, (cfg.samples, 1), generator=g)
        step = torch.randint(1, 5, (cfg.samples, 1), generator=g)
        seq = (start + step * torch.arange(cfg.context + 1)) % cfg.vocab
        noise = torch.rand(seq.shape, generator=g) < 0.05
        self.data = torch.where(noise, torch.randint(0, cfg.vocab, seq.shape, generator=g), seq)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, :-1], self.data[i, 1:]


@dataclass
class Trainer:
    """The objects of one run; :meth:`build` makes them from a config, fresh or about to be restored."""

    cfg: Config
    model: TinyLM
    optimizer: Any
    scheduler: Any
    scaler: Any
    sampler: Any
    loader: DataLoader[Any]

    @classmethod
    def build(cls, cfg: Config) -> Trainer:
        from .data import ResumableSampler

        torch.manual_seed(cfg.seed)
        model = TinyLM(cfg)
        scaler = None
        if cfg.precision == "fp16-master":
            from .amp import MasterWeightOptimizer

            model = model.half()
            optimizer: Any = MasterWeightOptimizer(model.parameters(), torch.optim.AdamW, lr=cfg.lr,
                                                   weight_decay=0.01, init_scale=2.0**10, growth_interval=8)
            base = optimizer.optimizer
        else:
            optimizer = base = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
            if cfg.precision == "bf16":
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=8)
        warmup = cfg.warmup
        scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda s: min(1.0, (s + 1) / warmup))
        data = Tokens(cfg)
        sampler = ResumableSampler(data, shuffle=True, seed=cfg.seed)
        # A DataLoader draws a seed from the global torch RNG each time it starts an iterator, which
        # a resumed run does at another step: give it a generator of its own.
        loader = DataLoader(data, batch_size=cfg.batch, sampler=sampler, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.seed))
        return cls(cfg, model, optimizer, scheduler, scaler, sampler, loader)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches forever, epoch after epoch, from wherever the sampler stands."""
        while True:
            yield from self.loader

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step; returns the loss."""
        self.model.train()
        cfg = self.cfg
        if cfg.precision == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.model(x)
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab), y.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif cfg.precision == "fp16-master":
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab), y.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.scale_loss(loss).backward()
            self.optimizer.step()
        else:
            loss = nn.functional.cross_entropy(self.model(x).reshape(-1, cfg.vocab), y.reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())


def _die() -> None:
    """SIGKILL this process: no cleanup, no flush of anything but what was printed."""
    sys.stdout.flush()
    os.kill(os.getpid(), 9)


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages in ``obj`` (nested dicts and lists): at most what a save writes."""
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _killer(fraction: float, trainer: Trainer) -> Any:
    """A save ``progress`` callback that SIGKILLs the process once ``fraction`` of the tensor bytes are written."""
    seen: set[int] = set()
    total = _tensor_bytes([trainer.model.state_dict(), trainer.optimizer.state_dict()], seen)
    at = int(fraction * total)  # an underestimate of the save's bytes: the kill always lands inside it
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if done >= at:
            _die()

    return progress


def run(directory: str, steps: int, *, cfg: Config | None = None, stop_at: int | None = None,
        every: int = 4, kill: bool = False, kill_at: int | None = None,
        kill_in_save: float | None = None) -> dict[str, Any]:
    """Train to ``steps`` (resuming from ``directory``'s latest checkpoint if there is one).

    Checkpoints every ``every`` steps and at ``stop_at``. With ``kill``, the process kills itself
    (SIGKILL: no cleanup, no flush) right after the checkpoint at ``stop_at``. With ``kill_at``, it
    kills itself during step ``kill_at``, after its optimisation step and before its checkpoint; with
    ``kill_in_save`` (a fraction in [0, 1)) as well, during that step's checkpoint save instead, once
    that fraction of the tensor bytes is written. Returns the losses of the steps this call ran and a
    digest of the final parameters.
    """
    torch.use_deterministic_algorithms(True)
    manager = CheckpointManager(directory, keep_last=2, keep_every=None)
    latest = manager.latest()
    if latest is not None:
        saved = manager.load(latest)
        cfg = Config(**saved.config)
    cfg = cfg or Config()
    trainer = Trainer.build(cfg)
    first = 1
    if latest is not None:
        from ._training import restore_checkpoint

        restore_checkpoint(saved, trainer.model, trainer.optimizer, scheduler=trainer.scheduler,
                           scaler=trainer.scaler)
        trainer.sampler.load_state_dict(saved.extra["sampler"])
        first = int(saved.step or 0) + 1
    losses: dict[int, float] = {}
    batches = trainer.batches()
    for step in range(first, steps + 1):
        x, y = next(batches)
        losses[step] = trainer.train_step(x, y)
        crash = step == kill_at
        if crash and kill_in_save is None:
            _die()
        if step % every == 0 or step in (stop_at, steps) or crash:
            manager.save(step, trainer.model, trainer.optimizer, scheduler=trainer.scheduler, scaler=trainer.scaler,
                         epoch=trainer.sampler.epoch, loss=losses[step], config=asdict(cfg),
                         vocab=[f"tok{i}" for i in range(cfg.vocab)], extra={"sampler": trainer.sampler.state_dict()},
                         progress=_killer(kill_in_save, trainer) if crash and kill_in_save is not None else None)
        if step == stop_at:
            if kill:
                _die()
            break
    return {"losses": losses, "params": param_digest(trainer.model), "first": first}


def param_digest(model: nn.Module) -> str:
    """xxh3 of every parameter's bytes, in order: equal digests mean bitwise-equal parameters."""
    from .._checksum import hasher

    h = hasher()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """Command line of this example; prints a JSON line with the losses and parameter digest."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--kill", action="store_true", help="SIGKILL this process right after the --stop-at checkpoint")
    ap.add_argument("--kill-at", type=int, metavar="STEP", help="SIGKILL this process during step STEP")
    ap.add_argument("--kill-in-save", type=float, metavar="FRACTION",
                    help="with --kill-at: during that step's checkpoint save, once FRACTION of its tensor bytes "
                         "are written")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16-master"])
    args = ap.parse_args(argv)
    if args.kill_in_save is not None and (args.kill_at is None or not 0 <= args.kill_in_save < 1):
        ap.error("--kill-in-save needs --kill-at and a fraction in [0, 1)")
    torch.set_num_threads(1)
    out = run(args.dir, args.steps, cfg=Config(precision=args.precision), stop_at=args.stop_at, every=args.every,
              kill=args.kill, kill_at=args.kill_at, kill_in_save=args.kill_in_save)
    print(json.dumps({"losses": {str(k): v for k, v in out["losses"].items()}, "params": out["params"],
                      "first": out["first"]}))
    return 0 if all(math.isfinite(v) for v in out["losses"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
