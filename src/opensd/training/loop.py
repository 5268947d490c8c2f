"""The trainer every stage shares.

A :class:`~opensd.training.stage.Stage` (the contract a stage's author reads, in
:mod:`opensd.training.stage`) supplies networks, batches and losses; :func:`run_stage`
does everything else:

- **devices and ranks**: ``train.device = auto`` picks CUDA when present; under
  ``torchrun`` the trainable modules are wrapped in ``DistributedDataParallel``
  (NCCL on GPUs, gloo on CPUs), each rank reads its share of the global batch, and
  only rank 0 writes files or shows progress;
- **the update**: AdamW per parameter group, linear warmup then constant or cosine
  learning rate, optional bf16 autocast, gradient-norm clipping, EMA;
- **safety**: a non-finite loss or gradient norm stops the run at once with
  :class:`NonFiniteLossError` naming the step; nothing is written after it, so the
  last checkpoint stays the last good one;
- **records** (:mod:`opensd.training.records`): a tqdm bar (loss, speed), ``log.jsonl``
  (one JSON object per log or eval step), ``loss.png``, sample grids from the stage's
  ``evaluate``;
- **checkpoints and exact resume**: ``checkpoints/step_XXXXXXXX.pt`` written to a
  temporary file, its SHA-256 recorded beside it, then renamed (atomic; see
  :mod:`opensd.training.checkpoint_store`: a checkpoint that fails its check is set
  aside and resume falls back to the one before), holding what the stage trains (its
  ``trainable()``), optimisers, EMA, the
  python / numpy / torch RNG states of every rank and the data position (the step; what a
  checkpoint holds is :mod:`opensd.training.checkpoint_state`).
  All randomness inside a step comes from generators seeded by (seed, step, rank)
  and batches depend only on (seed, step, rank), so a run killed at any moment and
  resumed with the same command ends with the same weights, bit for bit, as one
  that never stopped (on CPU; on GPU with ``train.deterministic``).

Run folder::

    out_dir/
      config.json             the resolved stage config
      log.jsonl               {"step", "kind": "train"|"eval", ...}
      loss.png
      samples/step_XXXXXXXX.png
      checkpoints/step_XXXXXXXX.pt           (+ .sha256, its hash; a bad one is set aside as .pt.corrupt)
      <the stage's export>    vae/, text_encoder/ or model/

The names a stage's module imported from here before the split (``Stage``, ``Update``,
``RunContext``, ``save_grid``, ``read_log``, ``list_checkpoints``, ``ResumeError``...) are
still offered here.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from opensd import devices
from opensd.config import ConfigError, to_dict
from opensd.training import checkpoint_store as store
from opensd.training.checkpoint_state import (  # noqa: F401 (re-exported: the names' old home)
    CHECKPOINTS,
    ResumeError,
    list_checkpoints,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from opensd.training.config import TrainConfig, config_differences
from opensd.training.ema import EMA
from opensd.training.records import LOG, PLOT, SAMPLES, plot_log, read_log, save_grid  # noqa: F401 (re-exported)
from opensd.training.stage import (  # noqa: F401 (re-exported: the names' old home)
    Hook,
    RunContext,
    Stage,
    Trainable,
    Update,
    check_trainable,
    step_seed,
)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped."""


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu`` (see :mod:`opensd.devices`)."""
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")  # training picks CUDA or the CPU, never MPS on its own
    try:
        return devices.resolve_device(spec, local_rank)
    except devices.DeviceError as e:
        raise ConfigError(f"train.device: {e}") from None


@dataclass
class RunResult:
    """How a run ended: the last step, its folder, the last logged metrics, the export."""

    step: int
    run_dir: Path
    metrics: dict[str, float]
    export: Path | None


# ----------------------------------------------------------------------------- the trainer


def _init_distributed(device_spec: str) -> tuple[int, int, int, bool]:
    """(rank, world, local_rank, initialised_here) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return rank, world, local, False
    device = resolve_device(device_spec, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, local, True


def _with_new_defaults(saved: dict[str, Any], cfg_cls: type) -> dict[str, Any]:
    """A checkpoint's config with the options it predates at their defaults: an option added
    to a stage since the checkpoint was written, and left at its default, is no change."""
    try:
        defaults = to_dict(cfg_cls())
    except (TypeError, ConfigError):  # a stage config without defaults for every field: nothing to fill
        return saved
    return {**{k: v for k, v in defaults.items() if k not in saved}, **saved}


class _Trainer:
    def __init__(self, stage: Stage, resume: bool, hooks: Sequence[Hook], rank: int, world: int,
                 local_rank: int) -> None:
        self.stage, self.resume, self.hooks = stage, resume, list(hooks)
        self.cfg: TrainConfig = stage.cfg.train
        if self.cfg.batch_size % world:
            raise ConfigError(f"train.batch_size {self.cfg.batch_size} must be divisible by the {world} ranks")
        self.run_dir = Path(self.cfg.out_dir)
        self.device = resolve_device(self.cfg.device, local_rank)
        self.ctx = RunContext(self.run_dir, self.device, rank, world, self.cfg, resuming=False)
        self.log_path = self.run_dir / LOG
        self._pending: tuple[torch.Tensor, list] | None = None  # queued finiteness checks (GPU)
        self.resumed_from: Path | None = None

    # -- setup -----------------------------------------------------------------------

    def _find_start(self) -> tuple[int, dict[str, Any] | None]:
        ckpts = list_checkpoints(self.run_dir)
        if ckpts and not self.resume:
            raise ResumeError(
                f"{self.run_dir} already holds checkpoints (last: step {ckpts[-1][0]}); pass --resume to continue "
                f"that run, or choose another out_dir"
            )
        found = self._find_resumable()
        if found is None:
            return 0, None
        step, path, state = found
        self.resumed_from = path
        store.check_structure(state, path, self.stage.name, [], [])
        saved = _with_new_defaults(state["config"], type(self.stage.cfg))
        diffs = [d for d in config_differences(saved, to_dict(self.stage.cfg)) if d not in type(self.stage.cfg).RESUMABLE]
        if diffs:
            raise ResumeError(
                f"cannot resume from {path}: the config differs from the checkpoint's in {', '.join(diffs)}; "
                f"only {', '.join(sorted(type(self.stage.cfg).RESUMABLE))} may change"
            )
        if step > self.cfg.steps:
            raise ResumeError(f"{path} is at step {step}, past train.steps = {self.cfg.steps}")
        # what changes the training itself (not its length, intervals or speed) is reported and logged
        quiet = {"train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every",
                 "train.keep_checkpoints", "train.progress", "train.device", "train.out_dir", "train.time_limit",
                 "data.workers", "eval_per_category"}
        new = to_dict(self.stage.cfg)
        changed = [d for d in config_differences(saved, new) if d not in quiet]
        if changed and self.ctx.is_main:
            print(f"note: resuming {path} with changed {', '.join(changed)}", file=sys.stderr)

            def value(cfg: Any, key: str) -> Any:
                for part in key.split("."):
                    cfg = cfg.get(part) if isinstance(cfg, dict) else None
                return cfg

            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log({"step": step, "kind": "resume",
                       "changed": {k: [value(saved, k), value(new, k)] for k in changed}})
        return step, state

    def _find_resumable(self) -> tuple[int, Path, dict[str, Any]] | None:
        """Rank 0 picks the newest checkpoint that verifies (setting bad ones aside) and tells the others."""
        ctx = self.ctx
        found, error = None, None
        if ctx.is_main:
            try:
                found = store.find_resumable(self.run_dir, self.device, lambda m: print(m, file=sys.stderr))
            except ResumeError as e:
                error = e
        if ctx.world > 1:
            choice: list[Any] = [None if found is None else (found[0], str(found[1])), None if error is None else str(error)]
            dist.broadcast_object_list(choice, src=0)
            if not ctx.is_main and choice[1] is not None:
                error = ResumeError(choice[1])
            elif not ctx.is_main and choice[0] is not None:
                step, path = choice[0][0], Path(choice[0][1])
                found = (step, path, store.load_checkpoint(path, self.device))
        if error is not None:
            raise error
        return found

    def _setup(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            # TF32 tensor cores for fp32 matmuls and convolutions (about 10 mantissa bits in the
            # products, fp32 accumulation), and cuDNN's autotuner for the fixed training shapes.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        start, state = self._find_start()
        ctx.resuming = state is not None
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        modules = self.stage.build(ctx)
        self.stage.ctx = ctx
        for m in modules.values():
            m.to(self.device).train()
        ctx.modules = modules
        ctx.trainable = self.stage.trainable()
        check_trainable(ctx.trainable, modules, self.stage.name)
        self.params = {k: list(ctx.trainable[k].parameters.values()) for k in modules}
        self.base_lrs = {k: self.stage.base_lr(k) for k in modules}
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step for all parameters
        self.optimizers = {
            k: torch.optim.AdamW(self.params[k], lr=self.base_lrs[k], betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay, **fused)
            for k in modules
        }
        if cfg.ema_decay > 0:
            ctx.emas = {k: EMA(ctx.trainable[k].parameters, cfg.ema_decay) for k in self.stage.ema_groups
                        if k in modules}
        if state is not None:
            assert self.resumed_from is not None  # set with the state (_find_start)
            restore_training_state(state, self.resumed_from, self.stage, ctx, self.optimizers)
        if ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            ctx.wrapped = {k: DDP(m, device_ids=ids, broadcast_buffers=False) for k, m in modules.items()}
        else:
            ctx.wrapped = dict(modules)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from opensd.checkpoints.io import write_json

            write_json(self.stage.resolved_config(), self.run_dir / "config.json")
            kept = [r for r in read_log(self.log_path) if r.get("step", 0) <= start] if start else []
            tmp = self.log_path.with_name(f".{LOG}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.log_path)
            store.remove_leftovers(self.run_dir)
        ctx.barrier()
        return start

    # -- pieces of a step ------------------------------------------------------------

    def _check_finite(self, value: torch.Tensor, step: int, group: str, what: str) -> None:
        """Stop on a non-finite ``value``. On a GPU the check is queued (no host sync per step)
        and settled by :meth:`_settle` before anything is logged, saved or evaluated."""
        if self.device.type == "cuda" and self.ctx.world == 1:
            bad = ~torch.isfinite(value.detach()).all()
            if self._pending is None:
                self._pending = (torch.full((), -1, dtype=torch.long, device=self.device), [])
            first, seen = self._pending
            first.masked_fill_(bad & (first < 0), len(seen))  # no host-device copy, so no sync
            seen.append((step, group, what, value.detach()))
            return
        ok = torch.isfinite(value.detach()).all().float().reshape(1)
        if self.ctx.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            self._raise_non_finite(value, step, group, what)

    def _settle(self) -> None:
        """Raise for the first queued non-finite value, if any (GPU runs); forget the queue."""
        if self._pending is None:
            return
        first, seen = self._pending
        self._pending = None
        k = int(first.item())
        if k >= 0:
            step, group, what, value = seen[k]
            self._raise_non_finite(value, step, group, what)

    def _raise_non_finite(self, value: torch.Tensor, step: int, group: str, what: str) -> None:
        last = store.last_good(self.run_dir) if self.ctx.is_main else "see rank 0's message for the last good checkpoint"
        if "the last good checkpoint is" in last:
            last += "; resume from it with --resume after lowering train.lr or turning train.bf16 off"
        local = value.detach().float().reshape(-1)
        if torch.isnan(local).any():
            shown = "NaN"
        elif not torch.isfinite(local).all():
            shown = "inf"
        else:
            shown = "finite here, not on another rank"
        raise NonFiniteLossError(
            f"non-finite {what} ({shown}) in group {group!r} at step {step + 1}: training stopped; {last}"
        )

    def _time_is_up(self, t_start: float) -> bool:
        """Whether ``train.time_limit`` has passed since the loop started (rank 0 decides for all)."""
        if not self.cfg.time_limit:
            return False
        up = time.perf_counter() - t_start >= self.cfg.time_limit
        if self.ctx.world > 1:
            flag = torch.tensor([float(up)], device=self.device)
            dist.broadcast(flag, src=0)
            up = bool(flag.item())
        return up

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _reduce_metrics(self, acc: dict[str, list[torch.Tensor | float]]) -> dict[str, float]:
        keys = sorted(acc)
        if not keys:
            return {}
        means = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in acc[k]]).mean()
                             for k in keys])
        if self.ctx.world > 1:
            means = means.to(self.device)
            dist.all_reduce(means)
            means = means.cpu() / self.ctx.world
        return {k: float(v) for k, v in zip(keys, means, strict=False)}

    def _evaluate(self, step: int) -> dict[str, float]:
        if not self.ctx.is_main:
            self.ctx.barrier()
            return {}
        py, npy = random.getstate(), np.random.get_state()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            t0 = time.perf_counter()
            metrics = self.stage.evaluate(step)
            metrics = {k: float(v) for k, v in metrics.items()}
        random.setstate(py)
        np.random.set_state(npy)
        for m in self.ctx.modules.values():
            m.train()
        self._log({"step": step, "kind": "eval", **metrics, "eval_seconds": round(time.perf_counter() - t0, 3)})
        plot_log(self.log_path, self.run_dir / PLOT)
        self.ctx.barrier()
        return metrics

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> RunResult:
        from tqdm import tqdm

        cfg, ctx = self.cfg, self.ctx
        start = self._setup()
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {self.stage.name}", unit="step", dynamic_ncols=True,
                   disable=not (ctx.is_main and cfg.progress))
        acc: dict[str, list[torch.Tensor | float]] = {}
        last: dict[str, float] = {}
        t_last, steps_since = time.perf_counter(), 0
        t_start = t_last
        done = start
        try:
            for step in range(start, cfg.steps):
                factor = cfg.lr_factor(step)
                for k, opt in self.optimizers.items():
                    for g in opt.param_groups:
                        g["lr"] = self.base_lrs[k] * factor
                batch = self.stage.batch(step)
                for upd in self.stage.updates(batch, step):
                    self._check_finite(upd.loss, step, upd.group, "loss")
                    opt = self.optimizers[upd.group]
                    opt.zero_grad(set_to_none=True)
                    upd.loss.backward()
                    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                    norm = torch.nn.utils.clip_grad_norm_(self.params[upd.group], max_norm)
                    self._check_finite(norm, step, upd.group, "gradient norm")
                    opt.step()
                    self.stage.after_update(upd.group)
                    if upd.group in ctx.emas:
                        ctx.emas[upd.group].update(ctx.trainable[upd.group].parameters)
                    for k, v in upd.metrics.items():
                        acc.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else v)
                    acc.setdefault(f"grad_norm_{upd.group}", []).append(norm.detach())
                done = step + 1
                steps_since += 1
                bar.update(1)
                final = done == cfg.steps or self._time_is_up(t_start)
                if done % cfg.log_every == 0 or final:
                    self._settle()
                    last = self._reduce_metrics(acc)
                    acc = {}
                    now = time.perf_counter()
                    rate = steps_since / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    if ctx.is_main:
                        record = {"step": done, "kind": "train", "lr": self.base_lrs[next(iter(self.base_lrs))]
                                  * factor, **last, "steps_per_s": round(rate, 4),
                                  "images_per_s": round(rate * cfg.batch_size, 2), "time": round(time.time(), 3)}
                        self._log(record)
                        shown = {k: f"{v:.4g}" for k, v in last.items() if "loss" in k}
                        bar.set_postfix(shown, refresh=False)
                t_pause = time.perf_counter()
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or final:
                    self._settle()
                    save_checkpoint(self.stage, ctx, self.optimizers, done)
                    if ctx.is_main:
                        plot_log(self.log_path, self.run_dir / PLOT)
                if (cfg.sample_every and done % cfg.sample_every == 0) or final:
                    self._settle()
                    last = {**last, **{f"eval_{k}": v for k, v in self._evaluate(done).items()}}
                t_last += time.perf_counter() - t_pause  # the speed counts training, not checkpoints or samples
                for hook in self.hooks:
                    hook(done, ctx)
                if final:
                    if done < cfg.steps and ctx.is_main:
                        print(f"train {self.stage.name}: train.time_limit of {cfg.time_limit:g} s reached after "
                              f"{done} steps", file=sys.stderr)
                    break
        finally:
            bar.close()
        export = None
        if ctx.is_main:
            export = self.stage.export()
            plot_log(self.log_path, self.run_dir / PLOT)
        ctx.barrier()
        return RunResult(done, self.run_dir, last, export)


def run_stage(stage: Stage, *, resume: bool = False, hooks: Sequence[Hook] = ()) -> RunResult:
    """Train ``stage`` to ``stage.cfg.train.steps``; with ``resume``, continue from its last checkpoint.

    Without ``resume`` a run folder that already holds checkpoints is an error (a
    :class:`ResumeError`); with it and no checkpoint the run starts fresh, so the
    same command both starts and resumes. ``hooks(step, ctx)`` are called with the
    number of finished steps after each step's logging, checkpoint and evaluation.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is set up here.
    """
    rank, world, local, initialised = _init_distributed(stage.cfg.train.device)
    try:
        return _Trainer(stage, resume, hooks, rank, world, local).run()
    finally:
        if initialised and dist.is_initialized():
            dist.destroy_process_group()
