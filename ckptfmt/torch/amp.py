"""Mixed-precision training with fp32 master weights and a dynamic loss scaler, checkpointable by ckptfmt.

The model keeps its parameters in fp16 or bf16 (the *training weights*, used by forward and backward);
:class:`MasterWeightOptimizer` keeps an fp32 copy of each (the *master weights*), runs a base optimizer
(AdamW unless told otherwise) on the masters and writes the result back into the model's parameters::

    model = Net().to(torch.bfloat16)
    opt = MasterWeightOptimizer(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 100))
    for x, y in data:
        opt.zero_grad()
        opt.scale_loss(loss_fn(model(x), y)).backward()
        opt.step()        # False when the gradients overflowed and the step was skipped
        sched.step()
    ckptfmt.torch.save("ckpt", {"model": model.state_dict(), "optim": opt.state_dict(),
                                "sched": sched.state_dict()})

The class is a :class:`torch.optim.Optimizer` (LR schedulers insist on one) whose ``param_groups``,
``state`` and ``defaults`` are those of the base optimizer, so a scheduler adjusts the learning rate
the base optimizer uses. Note that ``param_groups[i]["params"]`` therefore holds the fp32 *master*
tensors, not the model's parameters. A scheduler advances on skipped steps too (as with
:class:`torch.amp.GradScaler`); look at the value :meth:`MasterWeightOptimizer.step` returns to
skip ``sched.step()`` if you want the schedule to count applied steps only.

Gradient clipping: call :meth:`MasterWeightOptimizer.unscale_` (it puts the unscaled fp32 gradients
on the masters), clip ``opt.master_params()``, then call ``step()``.

:meth:`MasterWeightOptimizer.state_dict` holds only tensors and plain values (no pickle needed); the
master weights stay fp32 in it, bit for bit. The training weights are the model's parameters and
are saved with the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..errors import CheckpointError, UnsupportedVersionError

__all__ = [
    "STATE_VERSION",
    "AmpOptions",
    "InvalidOptimizerStateError",
    "LossScalerState",
    "MasterWeightOptimizer",
]

#: The version of :meth:`MasterWeightOptimizer.state_dict`; :meth:`~MasterWeightOptimizer.load_state_dict`
#: reads this version only.
STATE_VERSION = 1

_TRAINING_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STATE_KEYS = ("version", "options", "optimizer_class", "base", "master_weights", "training_weights_dtype",
               "scaler", "step_count", "skipped_steps", "fallback")


class InvalidOptimizerStateError(CheckpointError, ValueError):
    """A state given to :meth:`MasterWeightOptimizer.load_state_dict` does not fit the optimizer or is malformed."""


def _check_fields(cls: Any, data: Mapping[str, Any], what: str) -> None:
    """:class:`ValueError` unless ``data`` has exactly the fields of dataclass ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    missing, unknown = sorted(fields - set(data)), sorted(set(data) - fields)
    if missing or unknown:
        raise ValueError(f"{what}: missing {missing}, unknown {unknown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AmpOptions:
    """The loss-scaling options of a :class:`MasterWeightOptimizer` (validated on creation).

    ``dynamic=False`` turns loss scaling off (scale 1; typical for bf16); steps whose gradients are
    not finite are still skipped. ``max_consecutive_overflows=N`` falls back to fp32 training
    weights after N overflows in a row; ``None`` never falls back.
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_consecutive_overflows: int | None = None
    dynamic: bool = True

    def __post_init__(self) -> None:
        for name in ("init_scale", "growth_factor", "backoff_factor", "min_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor!r}")
        if self.backoff_factor >= 1.0:
            raise ValueError(f"backoff_factor must be < 1, got {self.backoff_factor!r}")
        if self.min_scale > self.init_scale:
            raise ValueError(f"min_scale ({self.min_scale}) must not exceed init_scale ({self.init_scale})")
        if not _is_int(self.growth_interval) or self.growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {self.growth_interval!r}")
        n = self.max_consecutive_overflows
        if n is not None and (not _is_int(n) or n < 1):
            raise ValueError(f"max_consecutive_overflows must be None or an int >= 1, got {n!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"dynamic must be a bool, got {self.dynamic!r}")

    def to_dict(self) -> dict[str, Any]:
        """The options as a dict of plain values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AmpOptions:
        """Options from :meth:`to_dict`'s output; :class:`ValueError` on missing, unknown or bad fields."""
        _check_fields(cls, data, "options")
        return cls(**data)


@dataclass
class LossScalerState:
    """The dynamic loss scaler: the scale and its overflow counters."""

    scale: float
    steps_since_overflow: int = 0
    consecutive_overflows: int = 0
    total_overflows: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The state as a dict of plain values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossScalerState:
        """State from :meth:`to_dict`'s output; :class:`ValueError` on missing, unknown or bad fields."""
        _check_fields(cls, data, "scaler")
        scale = data["scale"]
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scaler: scale must be a finite number > 0, got {scale!r}")
        counts = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name != "scale"}
        bad = sorted(k for k, v in counts.items() if not _is_int(v) or v < 0)
        if bad:
            raise ValueError(f"scaler: {', '.join(f'{k}={counts[k]!r}' for k in bad)}: must be ints >= 0")
        return cls(scale=float(scale), **counts)


class MasterWeightOptimizer(torch.optim.Optimizer):
    """An optimizer for fp16/bf16 parameters that keeps fp32 master weights and scales the loss dynamically.

    ``params`` are the model's parameters (fp16, bf16 or fp32) or param groups (dicts with "params"
    and per-group options, as for any torch optimizer). ``optimizer_cls(master_groups,
    **optimizer_kwargs)`` builds the base optimizer over fp32 copies of them, with the same groups.

    Each iteration: :meth:`zero_grad`, ``scale_loss(loss).backward()``, :meth:`step`. A step whose
    gradients hold an inf or a NaN (an overflow) is skipped and the scale multiplied by
    ``backoff_factor`` (not below ``min_scale``); after every ``growth_interval`` good steps in a row
    the scale is multiplied by ``growth_factor``. After ``max_consecutive_overflows`` overflows in a
    row the optimizer *falls back*: the model's parameters become fp32 (in place: same Parameter
    objects, new data) and the loss is no longer scaled.

    It subclasses :class:`torch.optim.Optimizer` without running its constructor (the way wrappers
    such as accelerate's do): ``param_groups``, ``state`` and ``defaults`` are the base optimizer's,
    and hooks registered here are registered on the base optimizer (they see it, and its state).
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                 optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW, *,
                 init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0, max_consecutive_overflows: int | None = None,
                 dynamic: bool = True, **optimizer_kwargs: Any) -> None:
        # Optimizer.__init__ is not called on purpose: the param groups and state live in the base optimizer.
        self._options = AmpOptions(init_scale, growth_factor, backoff_factor, growth_interval, min_scale,
                                   max_consecutive_overflows, dynamic)
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of Tensors or of dicts, not a Tensor")
        groups = list(params)
        if not groups:
            raise ValueError("MasterWeightOptimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self._params: list[torch.Tensor] = []
        self._masters: list[torch.Tensor] = []
        self._train_dtypes: list[torch.dtype] = []
        master_groups = [self._add_masters(g) for g in groups]
        self.optimizer: torch.optim.Optimizer = optimizer_cls(master_groups, **optimizer_kwargs)
        self._scaler = LossScalerState(scale=self._options.init_scale if dynamic else 1.0)
        self._total_steps = 0
        self._skipped_steps = 0
        self._fallback = False
        self._unscaled: bool | None = None  # found_inf of an unscale_() not yet consumed by step()

    # ------------------------------------------------------------------ the torch.optim.Optimizer surface

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The base optimizer's param groups (their "params" are the fp32 master tensors)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The base optimizer's per-parameter state (keyed by master tensor)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The base optimizer's defaults."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("step", None)  # an LR scheduler's wrapper of the bound method (it refers to this object)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.optimizer).__name__}, {len(self._params)} params, "
                f"scale={self._scaler.scale}, fallback={self._fallback})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of model parameters (with per-group options), as ``torch.optim.Optimizer`` does."""
        n = len(self._params)
        master_group = self._add_masters(param_group)
        try:
            self.optimizer.add_param_group(master_group)
        except BaseException:
            del self._params[n:], self._masters[n:], self._train_dtypes[n:]
            raise

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook`` on the base optimizer: it runs before every applied (not skipped) step."""
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register ``hook`` on the base optimizer: it runs after every applied (not skipped) step."""
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        """Register ``hook`` on the base optimizer (it sees the "base" part of :meth:`state_dict`)."""
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        """Register ``hook`` on the base optimizer (it sees the "base" part of :meth:`state_dict`)."""
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        """Register ``hook`` on the base optimizer (it sees the "base" part of the loaded state)."""
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[..., Any], prepend: bool = False) -> RemovableHandle:
        """Register ``hook`` on the base optimizer (it sees the "base" part of the loaded state)."""
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    # ------------------------------------------------------------------ read-only state

    @property
    def options(self) -> AmpOptions:
        return self._options

    @property
    def loss_scale(self) -> float:
        """The factor :meth:`scale_loss` multiplies by (1.0 when not dynamic or after the fp32 fallback)."""
        return self._scaler.scale

    @property
    def scaler(self) -> LossScalerState:
        """A copy of the loss scaler's state."""
        return dataclasses.replace(self._scaler)

    @property
    def steps_since_overflow(self) -> int:
        return self._scaler.steps_since_overflow

    @property
    def consecutive_overflows(self) -> int:
        return self._scaler.consecutive_overflows

    @property
    def total_overflows(self) -> int:
        return self._scaler.total_overflows

    @property
    def step_count(self) -> int:
        """Calls of :meth:`step`, applied or skipped."""
        return self._total_steps

    @property
    def skipped_steps(self) -> int:
        """Calls of :meth:`step` that were skipped because a gradient was not finite."""
        return self._skipped_steps

    @property
    def fallback(self) -> bool:
        """Whether the optimizer fell back to fp32 training weights."""
        return self._fallback

    def master_params(self) -> Iterator[torch.Tensor]:
        """The fp32 master weights, in parameter order (after :meth:`unscale_` their ``.grad`` is set)."""
        return iter(self._masters)

    def model_params(self) -> Iterator[torch.Tensor]:
        """The model's parameters, in order."""
        return iter(self._params)

    # ------------------------------------------------------------------ training

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * loss_scale``: call ``backward()`` on this instead of on ``loss``.

        The product has ``loss``'s dtype: compute the loss in fp32 (as autocast does), since an fp16
        loss times a large scale overflows to inf (the step is then skipped and the scale backs off).
        """
        return loss * self._scaler.scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the model's parameters (and drop those of the masters)."""
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()
        for m in self._masters:
            m.grad = None
        self._unscaled = None

    @torch.no_grad()
    def unscale_(self) -> bool:
        """Put the model's gradients, divided by the loss scale, as fp32 ``.grad`` of the masters.

        Returns whether they are all finite. :meth:`step` does this itself; call it first only to
        look at or clip the unscaled gradients (``clip_grad_norm_(opt.master_params(), ...)``).
        """
        if self._unscaled is not None:
            raise RuntimeError("unscale_() was already called since the last step()")
        inv_scale = 1.0 / self._scaler.scale
        finite: dict[torch.device, list[torch.Tensor]] = {}
        for p, m in zip(self._params, self._masters, strict=True):
            if p.grad is None:
                m.grad = None
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MasterWeightOptimizer does not support sparse gradients")
            g = p.grad.detach().to(device=m.device, dtype=torch.float32, copy=True)
            if inv_scale != 1.0:
                g.mul_(inv_scale)
            m.grad = g
            finite.setdefault(g.device, []).append(torch.isfinite(g).all())
        ok = all(bool(torch.stack(flags).all()) for flags in finite.values())
        self._unscaled = not ok
        return ok

    @torch.no_grad()
    def step(self, closure: None = None) -> bool:  # type: ignore[override]
        """Apply one step to the masters and copy them into the model; False when skipped for an overflow."""
        if closure is not None:
            raise TypeError("MasterWeightOptimizer.step() takes no closure: call scale_loss(loss).backward() first")
        if self._unscaled is None:
            self.unscale_()
        found_inf, self._unscaled = self._unscaled, None
        self._total_steps += 1
        s, opts = self._scaler, self._options
        if found_inf:
            self._skipped_steps += 1
            s.total_overflows += 1
            s.consecutive_overflows += 1
            s.steps_since_overflow = 0
            for m in self._masters:
                m.grad = None
            if not self._fallback:
                if opts.dynamic:
                    s.scale = max(s.scale * opts.backoff_factor, opts.min_scale)
                limit = opts.max_consecutive_overflows
                if limit is not None and s.consecutive_overflows >= limit:
                    self._fallback = True
                    s.scale = 1.0
                    self._sync_model_params()
            return False
        self.optimizer.step()
        for m in self._masters:
            m.grad = None
        self._sync_model_params()
        s.consecutive_overflows = 0
        s.steps_since_overflow += 1
        if opts.dynamic and not self._fallback and s.steps_since_overflow % opts.growth_interval == 0:
            grown = s.scale * opts.growth_factor
            if math.isfinite(grown):
                s.scale = grown
        return True

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as tensors and plain values only (see the module docstring).

        Like ``torch.optim.Optimizer.state_dict``, tensors are the live ones, not copies: save or
        clone the result before training goes on.
        """
        return {
            "version": STATE_VERSION,
            "options": self._options.to_dict(),
            "optimizer_class": type(self.optimizer).__qualname__,
            "base": self.optimizer.state_dict(),
            "master_weights": [m.detach() for m in self._masters],
            "training_weights_dtype": [_dtype_name(d) for d in self._train_dtypes],
            "scaler": self._scaler.to_dict(),
            "step_count": self._total_steps,
            "skipped_steps": self._skipped_steps,
            "fallback": self._fallback,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, then rewrite the model's parameters from the loaded masters.

        Everything is checked before anything changes: an unknown version raises
        :class:`~ckptfmt.errors.UnsupportedVersionError`, any other mismatch (count, shapes or dtypes
        of the master weights, training dtypes, options, counters) :class:`InvalidOptimizerStateError`
        (a ``ValueError``) naming every problem. The options are restored from the state, as torch
        optimizers restore their hyperparameters.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, not {type(state_dict).__name__}")
        version = state_dict.get("version")
        if not _is_int(version):
            raise InvalidOptimizerStateError(f"MasterWeightOptimizer state has no integer 'version' (got {version!r})")
        if version != STATE_VERSION:
            raise UnsupportedVersionError(None, f"MasterWeightOptimizer state version {version} is not supported "
                                                f"(this ckptfmt reads version {STATE_VERSION})")
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise InvalidOptimizerStateError(f"MasterWeightOptimizer state lacks {', '.join(map(repr, missing))}")
        problems: list[str] = []
        options = scaler = None
        try:
            options = AmpOptions.from_dict(state_dict["options"])
        except (TypeError, ValueError) as e:
            problems.append(f"options: {e}")
        try:
            scaler = LossScalerState.from_dict(state_dict["scaler"])
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        cls_name = type(self.optimizer).__qualname__
        if state_dict["optimizer_class"] != cls_name:
            saved_cls = state_dict["optimizer_class"]
            problems.append(f"the state is of a {saved_cls!r} base optimizer, this one is a {cls_name}")
        problems += self._check_weights(state_dict["master_weights"], state_dict["training_weights_dtype"])
        for key in ("step_count", "skipped_steps"):
            if not _is_int(state_dict[key]) or state_dict[key] < 0:
                problems.append(f"{key} must be an int >= 0, got {state_dict[key]!r}")
        if not isinstance(state_dict["fallback"], bool):
            problems.append(f"fallback must be a bool, got {state_dict['fallback']!r}")
        if not isinstance(state_dict["base"], Mapping):
            problems.append(f"base must be a mapping, got {type(state_dict['base']).__name__}")
        if problems:
            raise InvalidOptimizerStateError("cannot load MasterWeightOptimizer state:\n  " + "\n  ".join(problems))
        assert options is not None and scaler is not None
        # torch checks the groups against ours (raising ValueError) before it changes anything
        self.optimizer.load_state_dict(dict(state_dict["base"]))
        with torch.no_grad():
            for m, saved in zip(self._masters, state_dict["master_weights"], strict=True):
                m.copy_(saved)
                m.grad = None
        self._options = options
        self._scaler = scaler
        self._total_steps = state_dict["step_count"]
        self._skipped_steps = state_dict["skipped_steps"]
        self._fallback = state_dict["fallback"]
        self._unscaled = None
        self._sync_model_params()

    # ------------------------------------------------------------------ internals

    def _add_masters(self, group: Any) -> dict[str, Any]:
        """Record a group's model parameters and fp32 copies of them; return the group over the copies."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("a param group's params must be an ordered collection (a list), not a set")
        params = list(params)
        seen = {id(p) for p in self._params}
        masters = []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters must be Tensors, got {type(p).__name__}")
            if p.dtype not in _TRAINING_DTYPES.values():
                raise TypeError(f"parameters must be float16, bfloat16 or float32, got {p.dtype}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if id(p) in seen:
                raise ValueError("a parameter appears more than once (in one group or in two)")
            seen.add(id(p))
            masters.append(p.detach().to(torch.float32, copy=True))
        self._params += params
        self._masters += masters
        self._train_dtypes += [p.dtype for p in params]
        return {**{k: v for k, v in group.items() if k != "params"}, "params": masters}

    def _check_weights(self, weights: Any, dtypes: Any) -> list[str]:
        """Why the saved master weights and training dtypes do not fit this optimizer's parameters."""
        n = len(self._params)
        if not isinstance(weights, (list, tuple)):
            return [f"master_weights must be a list, got {type(weights).__name__}"]
        if len(weights) != n:
            return [f"the state has {len(weights)} master weights, the optimizer has {n} parameters"]
        problems = []
        for i, (w, p) in enumerate(zip(weights, self._params, strict=True)):
            if not isinstance(w, torch.Tensor):
                problems.append(f"master_weights[{i}] is a {type(w).__name__}, not a Tensor")
            elif w.dtype != torch.float32:
                problems.append(f"master_weights[{i}] is {_dtype_name(w.dtype)}, master weights are float32")
            elif w.shape != p.shape:
                problems.append(f"master_weights[{i}] has shape {tuple(w.shape)}, the parameter {tuple(p.shape)}")
        if not isinstance(dtypes, (list, tuple)) or len(dtypes) != n:
            problems.append(f"training_weights_dtype must be a list of {n} dtype names, got {dtypes!r}")
            return problems
        for i, (name, want) in enumerate(zip(dtypes, self._train_dtypes, strict=True)):
            if not isinstance(name, str) or name not in _TRAINING_DTYPES:
                problems.append(f"training_weights_dtype[{i}] = {name!r} is not float16, bfloat16 or float32")
            elif _TRAINING_DTYPES[name] != want:
                problems.append(f"parameter {i} was trained in {name}, this one is {_dtype_name(want)}")
        return problems

    @torch.no_grad()
    def _sync_model_params(self) -> None:
        """Copy the masters into the model's parameters (fp32 after the fallback, else their training dtype)."""
        for p, m, dtype in zip(self._params, self._masters, self._train_dtypes, strict=True):
            target = torch.float32 if self._fallback else dtype
            if p.dtype == target:
                p.copy_(m)
            else:  # a change of dtype: the same Parameter object gets new data (old grads would not fit)
                p.grad = None
                p.data = m.detach().to(dtype=target, copy=True)
