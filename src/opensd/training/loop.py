"""The training loop every stage shares.

A :class:`Stage` (the VAE, CLIP and U-Net stages) supplies networks, batches and
losses; :func:`run_stage` does everything else:

- **devices and ranks**: ``train.device = auto`` picks CUDA when present; under
  ``torchrun`` the trainable modules are wrapped in ``DistributedDataParallel``
  (NCCL on GPUs, gloo on CPUs), each rank reads its share of the global batch, and
  only rank 0 writes files or shows progress;
- **the update**: AdamW per parameter group, linear warmup then constant or cosine
  learning rate, optional bf16 autocast, gradient-norm clipping, EMA;
- **safety**: a non-finite loss or gradient norm stops the run at once with
  :class:`NonFiniteLossError` naming the step; nothing is written after it, so the
  last checkpoint stays the last good one;
- **records**: a tqdm bar (loss, speed), ``log.jsonl`` (one JSON object per log or
  eval step), ``loss.png``, sample grids from the stage's ``evaluate``;
- **checkpoints and exact resume**: ``checkpoints/step_XXXXXXXX.pt`` written to a
  temporary file, its SHA-256 recorded beside it, then renamed (atomic; see
  :mod:`opensd.training.checkpoint_store`: a checkpoint that fails its check is set
  aside and resume falls back to the one before), holding the networks, optimisers, EMA, the
  python / numpy / torch RNG states of every rank and the data position (the step).
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
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from opensd import devices
from opensd.config import ConfigError, to_dict
from opensd.errors import OpenSDError
from opensd.training import checkpoint_store as store
from opensd.training.checkpoint_store import CHECKPOINTS, ResumeError, list_checkpoints, load_checkpoint  # noqa: F401
from opensd.training.config import TrainConfig, config_differences
from opensd.training.ema import EMA
from opensd.training.evaluation import FROM_DATA


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped."""


LOG = "log.jsonl"
PLOT = "loss.png"
SAMPLES = "samples"


# ----------------------------------------------------------------------------- helpers


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu`` (see :mod:`opensd.devices`)."""
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")  # training picks CUDA or the CPU, never MPS on its own
    try:
        return devices.resolve_device(spec, local_rank)
    except devices.DeviceError as e:
        raise ConfigError(f"train.device: {e}") from None


def step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on its arguments."""
    digest = hashlib.sha256(f"opensd-train:{seed}:{step}:{rank}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def save_grid(images: Sequence[Image.Image], path: Path, cols: int, min_tile: int = 64) -> Path:
    """Paste equally sized images into a grid of ``cols`` columns; written atomically as PNG.

    Tiles smaller than ``min_tile`` px are enlarged by an integer factor (nearest
    neighbour, so every pixel stays visible as it is)."""
    if not images:
        raise OpenSDError("save_grid needs at least one image")
    w, h = images[0].size
    k = max(1, min_tile // max(w, h))
    if k > 1:
        images = [im.resize((im.size[0] * k, im.size[1] * k), Image.Resampling.NEAREST) for im in images]
        w, h = w * k, h * k
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` (a torn last line from a killed run is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_log(log_path: Path, png_path: Path) -> Path | None:
    """Plot training losses (log scale) and eval metrics (fractions, then the rest) against step."""
    records = read_log(log_path)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in rows
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]

    loss_keys = sorted({k for r in train for k in r if "loss" in k})
    eval_keys = sorted({k for r in evals for k in r if k not in ("step", "kind", "time", "eval_seconds")
                        and isinstance(r[k], (int, float))})
    fractions = [k for k in eval_keys if all(0 <= v <= 1 for _, v in series(evals, k))]
    others = [k for k in eval_keys if k not in fractions]
    panels = [("training loss", train, loss_keys, "-")]
    panels += [("evaluation (fractions)", evals, fractions, "o-")] if fractions else []
    panels += [("evaluation", evals, others, "o-")] if others else []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, rows, keys, style) in zip(axes[0], panels):
        for k in keys:
            pts = series(rows, k)
            if pts:
                ax.plot(*zip(*pts), style, label=k, markersize=3)
        if title == "training loss" and all(v > 0 for k in keys for _, v in series(rows, k)):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path


# RNG states as plain containers of ints, floats and tensors (loadable with weights_only=True).


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].cpu().numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ----------------------------------------------------------------------------- the stage contract


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
    emas: dict[str, EMA] = field(default_factory=dict)

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
        self.ctx: RunContext | None = None
        self.evaluator = resolve_evaluator(evaluator, self.name, cfg)

    def build(self, ctx: RunContext) -> dict[str, nn.Module]:
        raise NotImplementedError

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
        diffs = [d for d in config_differences(state["config"], to_dict(self.stage.cfg))
                 if d not in type(self.stage.cfg).RESUMABLE]
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
        changed = [d for d in config_differences(state["config"], new) if d not in quiet]
        if changed and self.ctx.is_main:
            print(f"note: resuming {path} with changed {', '.join(changed)}", file=sys.stderr)

            def value(cfg: dict[str, Any], key: str) -> Any:
                for part in key.split("."):
                    cfg = cfg.get(part) if isinstance(cfg, dict) else None
                return cfg

            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log({"step": step, "kind": "resume",
                       "changed": {k: [value(state["config"], k), value(new, k)] for k in changed}})
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
            choice = [None if found is None else (found[0], str(found[1])), None if error is None else str(error)]
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
        self.params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in modules.items()}
        self.base_lrs = {k: self.stage.base_lr(k) for k in modules}
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step for all parameters
        self.optimizers = {
            k: torch.optim.AdamW(self.params[k], lr=self.base_lrs[k], betas=(cfg.beta1, cfg.beta2),
                                 weight_decay=cfg.weight_decay, **fused)
            for k in modules
        }
        if cfg.ema_decay > 0:
            ctx.emas = {k: EMA(modules[k], cfg.ema_decay) for k in self.stage.ema_groups if k in modules}
        if state is not None:
            self._restore(state, modules)
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

    def _restore(self, state: dict[str, Any], modules: dict[str, nn.Module]) -> None:
        """Load a checkpoint's modules, optimisers, EMAs and RNG states; a mismatch is one line naming it."""
        path, emas = self.resumed_from, self.ctx.emas
        store.check_structure(state, path, self.stage.name, list(modules), list(emas))
        for k, m in modules.items():
            store.restore(f"{k} module", path, lambda: m.load_state_dict(state["modules"][k]))
        for k, opt in self.optimizers.items():
            store.restore(f"{k} optimiser", path, lambda: opt.load_state_dict(state["optimizers"][k]))
        for k, ema in emas.items():
            store.restore(f"{k} EMA", path, lambda: ema.load_state_dict(state["ema"][k]))
        rngs = state["rng"]
        if self.ctx.rank < len(rngs):
            store.restore("RNG states", path, lambda: _set_rng_state(rngs[self.ctx.rank], self.device))

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

    def _save(self, step: int) -> None:
        ctx = self.ctx
        rng = _rng_state(self.device)
        if ctx.world > 1:
            gathered: list[Any] = [None] * ctx.world
            dist.all_gather_object(gathered, {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                                              for k, v in rng.items()})
            rngs = gathered
        else:
            rngs = [rng]
        if ctx.is_main:
            state = {
                "step": step,
                "stage": self.stage.name,
                "config": to_dict(self.stage.cfg),
                "world": ctx.world,
                "data": {"step": step, "position": step * self.cfg.batch_size},
                "modules": {k: m.state_dict() for k, m in ctx.modules.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "ema": {k: e.state_dict() for k, e in ctx.emas.items()},
                "rng": rngs,
            }
            store.write_checkpoint(state, self.run_dir, step, self.cfg.keep_checkpoints)
        ctx.barrier()

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _reduce_metrics(self, acc: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        keys = sorted(acc)
        if not keys:
            return {}
        means = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in acc[k]]).mean()
                             for k in keys])
        if self.ctx.world > 1:
            means = means.to(self.device)
            dist.all_reduce(means)
            means = means.cpu() / self.ctx.world
        return {k: float(v) for k, v in zip(keys, means)}

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
        acc: dict[str, list[torch.Tensor]] = {}
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
                        ctx.emas[upd.group].update(ctx.modules[upd.group])
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
                    self._save(done)
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
