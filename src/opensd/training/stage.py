"""The stage contract: what the author of a new training stage reads.

A stage is a :class:`Stage` subclass; :func:`opensd.training.loop.run_stage` trains it.
The stage supplies networks, batches and losses; the trainer does devices and ranks,
the optimiser steps, EMA, records, checkpoints and exact resume (see
:mod:`opensd.training.loop`). What passes between them:

- :meth:`Stage.build` returns the trainable modules by *group* name (each group gets its
  own AdamW; a module's ``forward`` should compute the loss, so that data-parallel
  training works through ``ctx.wrapped[group](...)``);
- :meth:`Stage.trainable` says, per group, what trains (:class:`Trainable`): those
  parameters and nothing else are stepped by the group's optimiser, averaged by its EMA
  and written to checkpoints, with the state the stage names beside them. A frozen model
  a module uses is never written, however the module holds it;
- :meth:`Stage.updates` yields the :class:`Update` s of one step, in order;
- :class:`RunContext` is what a stage sees of the run (its folder, device, rank, the
  modules, their EMAs, per-step random generators);
- a :data:`Hook` is called after each finished step;
- :func:`step_seed`: every draw inside a step comes from a generator seeded by
  (seed, step, rank, stream), which is what makes a resumed run exact.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opensd.config import to_dict
from opensd.errors import OpenSDError
from opensd.training.config import TrainConfig
from opensd.training.ema import EMA
from opensd.training.evaluation import FROM_DATA


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on its arguments."""
    digest = hashlib.sha256(f"opensd-train:{seed}:{step}:{rank}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StageContractError(OpenSDError):
    """A stage broke the contract (:meth:`Stage.trainable` names what its module does not hold)."""


@dataclass(frozen=True)
class Trainable:
    """What one group trains, by name in the group's module.

    ``parameters``: the trained parameters, as ``module.named_parameters()`` names them; the
    group's optimiser steps exactly these (in this order) and its EMA averages exactly these.
    ``state``: further names of ``module.state_dict()`` that a checkpoint holds because the
    run needs them to resume exactly: persistent buffers, or state the stage moves itself
    outside the optimiser (the LCM stage's target network). A checkpoint holds of the module
    these two and nothing else."""

    parameters: Mapping[str, nn.Parameter]
    state: tuple[str, ...] = ()

    def held(self) -> tuple[str, ...]:
        """The names of the module's state a checkpoint holds."""
        return (*self.parameters, *self.state)

    @staticmethod
    def of(module: nn.Module, prefix: str = "") -> Trainable:
        """Every parameter of ``module`` that requires a gradient (named under ``prefix``, the
        module's path in the group's module, "" for the group's module itself) and every
        persistent buffer of it."""
        params = {f"{prefix}{n}": p for n, p in module.named_parameters() if p.requires_grad}
        names = {f"{prefix}{n}" for n, _ in module.named_parameters()}
        state = tuple(f"{prefix}{k}" for k in module.state_dict() if f"{prefix}{k}" not in names)
        return Trainable(params, state)


def check_trainable(trainable: Mapping[str, Trainable], modules: Mapping[str, nn.Module], stage: str) -> None:
    """A :class:`StageContractError` naming the first thing ``trainable`` gets wrong about
    ``modules``: a group missing or unknown, a parameter that is not the module's own under that
    name, a state name the module's ``state_dict`` lacks, or a name given twice."""
    if set(trainable) != set(modules):
        raise StageContractError(f"stage {stage!r}: trainable() gives groups {sorted(trainable)}, "
                                 f"build() returned {sorted(modules)}")
    for group, t in trainable.items():
        params = dict(modules[group].named_parameters())
        for name, p in t.parameters.items():
            if params.get(name) is not p:
                raise StageContractError(f"stage {stage!r}: trainable() names {name!r} in group {group!r}, "
                                         f"which is not a parameter of its module under that name")
        keys = set(modules[group].state_dict())
        lacking = [k for k in t.state if k not in keys]
        if lacking:
            raise StageContractError(f"stage {stage!r}: trainable() keeps {lacking[0]!r} of group {group!r}, "
                                     f"which its module's state_dict does not hold")
        if len(set(t.held())) != len(t.held()):
            raise StageContractError(f"stage {stage!r}: trainable() names a part of group {group!r} twice")


@dataclass
class Update:
    """One optimiser step of parameter group ``group`` on ``loss``; ``metrics`` are logged."""

    group: str
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class RunContext:
    """What a stage sees of the run: where, which rank, the wrapped modules, EMA, RNG."""

    run_dir: Path
    device: torch.device
    rank: int
    world: int
    cfg: TrainConfig
    resuming: bool
    modules: dict[str, nn.Module] = field(default_factory=dict)  # raw trainable modules
    wrapped: dict[str, nn.Module] = field(default_factory=dict)  # DDP-wrapped when world > 1
    emas: dict[str, EMA] = field(default_factory=dict)  # of the trained parameters of the ``ema_groups``
    trainable: dict[str, Trainable] = field(default_factory=dict)  # what each group trains (Stage.trainable)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """A CPU generator for ``step``'s draws on this rank (draw on CPU, then move: same on any device)."""
        return torch.Generator("cpu").manual_seed(step_seed(self.cfg.seed, step, self.rank, stream))

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Move a CPU tensor to the run's device. On a GPU the copy goes through pinned memory
        without blocking, so the host keeps queueing work instead of waiting for the GPU."""
        if self.device.type != "cuda":
            return tensor.to(self.device, dtype)
        if dtype is not None:
            tensor = tensor.to(dtype)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``train.bf16``, else a no-op."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def averaged(self, name: str) -> nn.Module:
        """A copy of module ``name`` holding its EMA weights (the module itself if no EMA), in eval mode."""
        module = self.modules[name]
        if name not in self.emas:
            return module
        return self.emas[name].copy_to(copy.deepcopy(module)).eval()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


Hook = Callable[[int, RunContext], None]  # called as hook(finished steps, ctx) after each step


class Stage:
    """Base class of a training stage. Subclasses set ``name`` and implement the methods.

    ``build(ctx)`` creates the networks and data and returns the trainable modules by
    group name (each gets its own AdamW and, if listed in ``ema_groups`` and
    ``train.ema_decay > 0``, an EMA); a module's ``forward`` should compute the loss,
    so that data-parallel training works through ``ctx.wrapped[name](...)``.
    ``trainable()`` (after ``build``) says what of each module trains and what a
    checkpoint holds (:class:`Trainable`; by default every parameter that requires a
    gradient and the persistent buffers).
    ``updates(batch, step)`` yields the :class:`Update` s of one step in order (a
    GAN yields the generator's, then the discriminator's). ``evaluate`` and ``export``
    run on rank 0 only. ``evaluator`` (see :mod:`opensd.training.evaluation`): what
    ``evaluate`` hands the networks to for metrics; by default the data source's
    (``FROM_DATA``), ``None`` for none.
    """

    name = "stage"
    ema_groups: tuple[str, ...] = ()

    def __init__(self, cfg: Any, *, evaluator: Any = FROM_DATA) -> None:
        from opensd.training.sources import resolve_evaluator

        self.cfg = cfg
        self._ctx: RunContext | None = None
        self.evaluator = resolve_evaluator(evaluator, self.name, cfg)

    @property
    def ctx(self) -> RunContext:
        """The run this stage is built in: ``build(ctx)`` sets it (the trainer passes it)."""
        if self._ctx is None:
            raise RuntimeError(f"stage {self.name!r} has no run context: build(ctx) sets it")
        return self._ctx

    @ctx.setter
    def ctx(self, ctx: RunContext) -> None:
        self._ctx = ctx

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        raise NotImplementedError

    def trainable(self) -> dict[str, Trainable]:
        """Per group of ``ctx.modules``, what trains and what a checkpoint holds (see
        :class:`Trainable`); by default :meth:`Trainable.of` each whole module. A stage whose
        module uses a frozen model names its trained part here."""
        return {group: Trainable.of(module) for group, module in self.ctx.modules.items()}

    def base_lr(self, group: str) -> float:
        return self.cfg.train.lr

    def batch(self, step: int) -> Any:
        raise NotImplementedError

    def updates(self, batch: Any, step: int) -> Iterator[Update]:
        raise NotImplementedError

    def after_update(self, group: str) -> None:
        """Called after each optimiser step of ``group`` (before its EMA update)."""

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def export(self) -> Path | None:
        return None

    def resolved_config(self) -> dict[str, Any]:
        """What the run folder's ``config.json`` records (after ``build``): the config itself,
        unless the stage resolves parts of it elsewhere (a model it starts from, say)."""
        return to_dict(self.cfg)
