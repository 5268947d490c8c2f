"""What a training checkpoint holds, and putting a run back as a checkpoint left it.

A checkpoint (written and verified by :mod:`opensd.training.checkpoint_store`) is one
``torch.save`` of plain containers and tensors, loadable with ``weights_only=True``::

    step, stage, config, world       the finished steps, the stage's name, its config, the ranks
    data                             {"step", "position"}: where the batch stream is
    modules, optimizers, ema         by group: the module's trained parameters and kept state (only
                                     those: see Stage.trainable), its AdamW state, its EMA
    rng                              per rank: the python / numpy / torch (/ CUDA) RNG states

:func:`save_checkpoint` gathers every rank's RNG state and has rank 0 write it;
:func:`restore_training_state` loads one into a freshly built run, each mismatch a one-line
:class:`ResumeError` naming the file. :func:`list_checkpoints` and :func:`load_checkpoint`
read a run folder's checkpoints.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from opensd.config import to_dict
from opensd.training import checkpoint_store as store
from opensd.training.checkpoint_store import CHECKPOINTS, ResumeError, list_checkpoints, load_checkpoint
from opensd.training.stage import Trainable

if TYPE_CHECKING:
    from opensd.training.ema import EMA
    from opensd.training.stage import RunContext, Stage

__all__ = ["CHECKPOINTS", "ResumeError", "list_checkpoints", "load_checkpoint", "rng_state", "set_rng_state",
           "held_state", "load_held_state", "save_checkpoint", "restore_training_state"]


# RNG states as plain containers of ints, floats and tensors (loadable with weights_only=True).


def rng_state(device: torch.device) -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()  # legacy=True, the default: a tuple (the global generator is MT19937)
    assert isinstance(np_state, tuple)
    _, keys, pos, has_gauss, cached = np_state
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)



def held_state(module: nn.Module, trainable: Trainable) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``module``: its ``state_dict`` entries that ``trainable``
    names (:meth:`Trainable.held`), in the ``state_dict``'s order (all of it, the very dict,
    when it names everything)."""
    state = module.state_dict()
    held = set(trainable.held())
    if held.issuperset(state):
        return state
    out = OrderedDict((k, v) for k, v in state.items() if k in held)
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # the modules' versions
    return out


def load_held_state(module: nn.Module, trainable: Trainable, state: Any, what: str, path: Path) -> None:
    """Load a checkpoint's :func:`held_state` of ``module``; a checkpoint holding other names,
    or tensors that do not fit, is a one-line :class:`ResumeError` naming ``path``."""
    held = trainable.held()
    names = set(state) if isinstance(state, Mapping) else set()
    lacking, extra = [k for k in held if k not in names], sorted(names - set(held))
    if lacking or extra:
        told = [f"it lacks {', '.join(lacking[:3])}" if lacking else "", f"it holds {', '.join(extra[:3])}, which this "
                "run does not train" if extra else ""]
        raise ResumeError(f"{path} does not fit this run's {what}: {'; '.join(t for t in told if t)}")
    everything = set(held).issuperset(module.state_dict())
    store.restore(what, path, lambda: module.load_state_dict(state, strict=everything))


def _gathered_rng_states(ctx: RunContext) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (collective: every rank calls it)."""
    rng = rng_state(ctx.device)
    if ctx.world == 1:
        return [rng]
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in rng.items()})
    return gathered


def save_checkpoint(stage: Stage, ctx: RunContext, optimizers: Mapping[str, torch.optim.Optimizer], step: int) -> None:
    """Write step ``step``'s checkpoint of the run (rank 0 writes; every rank calls it), keeping
    the newest ``train.keep_checkpoints``."""
    rngs = _gathered_rng_states(ctx)
    if ctx.is_main:
        state = {
            "step": step,
            "stage": stage.name,
            "config": to_dict(stage.cfg),
            "world": ctx.world,
            "data": {"step": step, "position": step * ctx.cfg.batch_size},
            "modules": {k: held_state(m, ctx.trainable[k]) for k, m in ctx.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "ema": {k: e.state_dict() for k, e in ctx.emas.items()},
            "rng": rngs,
        }
        store.write_checkpoint(state, ctx.run_dir, step, ctx.cfg.keep_checkpoints)
    ctx.barrier()


def _loader(target: torch.optim.Optimizer | EMA, state: Mapping[str, Any], part: str, name: str) -> Callable[[], None]:
    """``target.load_state_dict(state[part][name])``, run when called (inside ``store.restore``)."""
    return lambda: target.load_state_dict(state[part][name])


def restore_training_state(state: dict[str, Any], path: Path, stage: Stage, ctx: RunContext,
                           optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    """Load checkpoint ``state`` (read from ``path``) into the run just built: its modules,
    optimisers, EMAs and this rank's RNG states; a mismatch is one line naming it."""
    modules, emas = ctx.modules, ctx.emas
    store.check_structure(state, path, stage.name, list(modules), list(emas))
    for k, m in modules.items():
        load_held_state(m, ctx.trainable[k], state["modules"][k], f"{k} module", path)
    for k, opt in optimizers.items():
        store.restore(f"{k} optimiser", path, _loader(opt, state, "optimizers", k))
    for k, ema in emas.items():
        store.restore(f"{k} EMA", path, _loader(ema, state, "ema", k))
    rngs = state["rng"]
    if ctx.rank < len(rngs):
        store.restore("RNG states", path, lambda: set_rng_state(rngs[ctx.rank], ctx.device))
