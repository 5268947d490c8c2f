"""Configs shared by the training stages, and reading a stage config from TOML.

Every stage (``vae``, ``clip``, ``unet``) has one frozen dataclass config (defined
in its own module) holding a :class:`TrainConfig` (the loop: steps, batch, optimiser,
intervals, output folder), a :class:`DataConfig` (where images and captions come
from), a ``model_preset`` plus ``model`` (the network's config) and its own loss
settings.

:func:`load_stage_config` builds one from, in order of precedence:

1. ``--set key=value`` overrides (dotted keys: ``train.lr=1e-4``, ``model.ch=64``;
   the value is read as a TOML value, else taken as a string);
2. a TOML file (read with :mod:`tomllib`);
3. ``model_preset``'s network config (``tiny``, ``small``, ``sd15``), which the
   ``[model]`` table overrides key by key;
4. the stage's defaults.

Tables merge key by key, so ``[train] steps = 100`` keeps the stage's other train
defaults. Unknown keys anywhere are an error naming the allowed keys
(:func:`opensd.config.from_dict`).
"""

from __future__ import annotations

import copy
import enum
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from opensd.config import ConfigError, from_dict, to_dict

T = TypeVar("T")


class LRSchedule(enum.Enum):
    """Learning rate after warmup: ``constant``, or ``cosine`` decay to ``min_lr_ratio * lr``."""

    CONSTANT = "constant"
    COSINE = "cosine"


class DataSource(enum.Enum):
    """``shapes``: the shapes-world generator itself; ``folder``: an image-caption folder."""

    SHAPES = "shapes"
    FOLDER = "folder"


class ShapesWorld(enum.StrEnum):
    """Which shapes world ``source = "shapes"`` draws: ``classic`` (the default model's) or
    ``rich`` (three groups, counts beside other groups, more sentence forms; docs/shapes.md).
    The names of :class:`opensd.shapes.world.World`, which training does not import."""

    CLASSIC = "classic"
    RICH = "rich"


def _check_int(where: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{where} must be an integer >= {low}, got {value!r}")


def _check_float(where: str, value: object, low: float, high: float | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value >= low
    if ok and high is not None:
        ok = value <= high  # type: ignore[operator]  # value is a number here (checked above)
    if not ok:
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{where} must be a number {span}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where training images and captions come from.

    ``source = "shapes"`` draws scenes from :class:`opensd.shapes.dataset.ShapesDataset`
    (``seed``, ``image_size``, ``holdout``, ``world``: ``"classic"`` or ``"rich"``, see
    :class:`ShapesWorld`): with ``pool_size = 0`` every step sees new
    scenes (index = position in the stream); with ``pool_size = N`` training cycles
    over scenes ``0 .. N-1`` in a fresh shuffle each epoch, and ``workers > 0`` renders
    the pool (and the U-Net stage's latent cache) up front in that many processes.
    ``workers`` changes speed only, never what is drawn. ``source = "folder"``
    reads ``path`` (``metadata.jsonl`` or ``.txt`` captions, see
    :mod:`opensd.data.imagefolder`), centre-crops and resizes to ``image_size`` and
    cycles over it the same way. Batch contents depend only on (``train.seed``,
    step, rank), so a resumed run sees exactly the batches an uninterrupted one does.
    """

    source: DataSource = DataSource.SHAPES
    path: str = ""
    image_size: int = 32
    seed: int = 0
    holdout: bool = True
    pool_size: int = 0
    workers: int = 0
    world: ShapesWorld = ShapesWorld.CLASSIC

    def __post_init__(self) -> None:
        if not isinstance(self.source, DataSource):
            raise ConfigError(f"data.source must be 'shapes' or 'folder', got {self.source!r}")
        if not isinstance(self.world, ShapesWorld):
            raise ConfigError(f"data.world must be one of {', '.join(repr(w.value) for w in ShapesWorld)}, "
                              f"got {self.world!r}")
        if self.world is not ShapesWorld.CLASSIC and self.source is not DataSource.SHAPES:
            raise ConfigError(f"data.world = {self.world.value!r} is a shapes world: it needs data.source = 'shapes'")
        if self.source is DataSource.FOLDER and not self.path:
            raise ConfigError("data.source = 'folder' needs data.path (an image-caption folder)")
        _check_int("data.image_size", self.image_size, 16)
        if self.image_size % 8:
            raise ConfigError(f"data.image_size must be a multiple of 8, got {self.image_size}")
        _check_int("data.seed", self.seed, 0)
        _check_int("data.pool_size", self.pool_size, 0)
        _check_int("data.workers", self.workers, 0)


@dataclass(frozen=True)
class TrainConfig:
    """The shared loop's settings (see :mod:`opensd.training.loop`).

    ``batch_size`` is the global batch, split evenly over data-parallel ranks.
    ``steps`` counts optimiser steps. Intervals count steps; a checkpoint and a sample
    are also made at the last step, and 0 turns the periodic ones off. ``ema_decay``
    0 keeps no EMA. ``grad_clip`` 0 turns clipping off (the norm is still logged).
    ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    ``deterministic`` asks torch for deterministic kernels (needed for bit-exact
    resume on a GPU; CPU runs are exact without it). ``time_limit`` (seconds, 0 = none)
    ends the run early, as if ``steps`` had been reached (last checkpoint, evaluation
    and export), once that much time has passed since the loop started; the run's
    log says how many steps it made, and ``--steps`` that number reproduces it.
    """

    out_dir: str = "runs/train"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    ema_decay: float = 0.0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"
    deterministic: bool = False
    progress: bool = True
    time_limit: float = 0.0

    def __post_init__(self) -> None:
        if not self.out_dir:
            raise ConfigError("train.out_dir must name a folder")
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("seed", 0), ("log_every", 1),
                          ("sample_every", 0), ("checkpoint_every", 0), ("keep_checkpoints", 1)):
            _check_int(f"train.{name}", getattr(self, name), low)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"train.lr must be a number > 0, got {self.lr!r}")
        for name in ("beta1", "beta2", "ema_decay"):
            _check_float(f"train.{name}", getattr(self, name), 0.0, 0.999999)
        _check_float("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_float("train.weight_decay", self.weight_decay, 0.0)
        _check_float("train.grad_clip", self.grad_clip, 0.0)
        _check_float("train.time_limit", self.time_limit, 0.0)
        if not isinstance(self.lr_schedule, LRSchedule):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ConfigError(f"train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate for the update made at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule is LRSchedule.CONSTANT:
            return 1.0
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- reading configs


class StageConfig:
    """What every stage config offers the loader (a mixin for the frozen dataclasses).

    ``PRESETS`` maps a ``model_preset`` name to a function returning the network config.
    ``RESUMABLE`` lists the dotted keys that may change between a run and its resume:
    lengths, intervals, evaluation, and the learning rate / clipping / bf16 (changing
    those is reported, since the resumed run then differs from an unbroken one).
    """

    PRESETS: ClassVar[dict[str, Callable[[], Any]]] = {}
    RESUMABLE: ClassVar[frozenset[str]] = frozenset(
        {"train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every",
         "train.keep_checkpoints", "train.progress", "train.device", "train.out_dir", "eval_per_category",
         "train.time_limit", "data.workers",
         # the remedies for a run stopped by a non-finite loss (the resumed run then differs, as asked)
         "train.lr", "train.grad_clip", "train.bf16"}
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file at ``path`` as a dict; a missing or malformed file is a ConfigError."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"config path is not a file: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 0.0001). The value is read as TOML
    (numbers, booleans, ``"strings"``, ``[lists]``); anything else is a plain string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {item!r}: bad key {key!r}; use dotted names such as train.lr")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``key=value`` override set (tables created as needed)."""
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a table")
            node = nxt
        node[parts[-1]] = value
    return out


def merge_tables(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys set over it; tables merge key by key (neither input changes)."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_tables(out[k], v)
        else:
            out[k] = v
    return out


def stage_config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build stage config ``cls`` from a (partial) dict: defaults, then preset, then ``data``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a table, got {type(data).__name__}")
    base = to_dict(cls())
    presets: dict[str, Callable[[], Any]] = getattr(cls, "PRESETS", {})
    preset = data.get("model_preset", base.get("model_preset"))
    if presets and "model_preset" in base:
        if preset not in presets:
            raise ConfigError(
                f"{cls.__name__}.model_preset: unknown preset {preset!r}; choose one of {', '.join(presets)}"
            )
        base["model"] = to_dict(presets[preset]())
    return from_dict(cls, merge_tables(base, data))


def load_stage_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Stage config ``cls`` from an optional TOML file plus ``key=value`` overrides."""
    data = read_toml(path) if path is not None else {}
    return stage_config_from_dict(cls, apply_overrides(data, overrides))


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = sorted(set(old) | set(new))
    diffs: list[str] = []
    for k in keys:
        a, b, name = old.get(k), new.get(k), f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, name + ".")
        elif a != b:
            diffs.append(name)
    return diffs
