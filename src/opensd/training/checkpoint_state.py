"""What a training checkpoint holds, and putting a run back as a checkpoint left it.

A checkpoint (written and verified by :mod:`opensd.training.checkpoint_store`) is one
``torch.save`` of plain containers and tensors, loadable with ``weights_only=True``::

    step, stage, config, world       the finished steps, the stage's name, its config, the ranks
    data                             {"step", "position"}: where the batch stream is
    modules, optimizers, ema         by group: the module state, AdamW state, EMA state
    rng                              per rank: the python / numpy / torch (/ CUDA) RNG states

:func:`save_checkpoint` gathers every rank's RNG state and has rank 0 write it;
:func:`restore_training_state` loads one into a freshly built run, each mismatch a one-line
:class:`ResumeError` naming the file. :func:`list_checkpoints` and :func:`load_checkpoint`
read a run folder's checkpoints.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from opensd.config import to_dict
from opensd.training import checkpoint_store as store
from opensd.training.checkpoint_store import CHECKPOINTS, ResumeError, list_checkpoints, load_checkpoint

if TYPE_CHECKING:
    from opensd.training.stage import RunContext, Stage

__all__ = ["CHECKPOINTS", "ResumeError", "list_checkpoints", "load_checkpoint", "rng_state", "set_rng_state",
           "save_checkpoint", "restore_training_state"]


# RNG states as plain containers of ints, floats and tensors (loadable with weights_only=True).


def rng_state(device: torch.device) -> dict[str, Any]:
    version, py_state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
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
            "modules": {k: m.state_dict() for k, m in ctx.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "ema": {k: e.state_dict() for k, e in ctx.emas.items()},
            "rng": rngs,
        }
        store.write_checkpoint(state, ctx.run_dir, step, ctx.cfg.keep_checkpoints)
    ctx.barrier()


def restore_training_state(state: dict[str, Any], path: Path, stage: Stage, ctx: RunContext,
                           optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    """Load checkpoint ``state`` (read from ``path``) into the run just built: its modules,
    optimisers, EMAs and this rank's RNG states; a mismatch is one line naming it."""
    modules, emas = ctx.modules, ctx.emas
    store.check_structure(state, path, stage.name, list(modules), list(emas))
    for k, m in modules.items():
        store.restore(f"{k} module", path, lambda: m.load_state_dict(state["modules"][k]))
    for k, opt in optimizers.items():
        store.restore(f"{k} optimiser", path, lambda: opt.load_state_dict(state["optimizers"][k]))
    for k, ema in emas.items():
        store.restore(f"{k} EMA", path, lambda: ema.load_state_dict(state["ema"][k]))
    rngs = state["rng"]
    if ctx.rank < len(rngs):
        store.restore("RNG states", path, lambda: set_rng_state(rngs[ctx.rank], ctx.device))
