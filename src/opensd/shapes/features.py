"""An in-house feature network for distribution metrics on the shapes world.

FID (Heusel et al. 2017) and precision/recall (Kynkäänniemi et al. 2019) compare
images in the feature space of a pretrained classifier (Inception-v3 on ImageNet).
Nothing can be downloaded here, and ImageNet features are a poor judge of flat
coloured shapes anyway, so this module trains its own judge on the shapes world
(:mod:`opensd.shapes.world`): :class:`ShapesFeatureNet`, a small CNN trained as a
multi-label classifier of each image's scene graph:

* ``presence``: which of the 21 colour-shape pairs appear (sigmoid per pair);
* ``colors``: which of the 7 colours appear (sigmoid per colour; an easy target
  that speeds up learning colour detectors);
* ``sizes``: which of the 6 shape-size pairs appear (sigmoid per pair);
* ``counts``: how many circles, squares, triangles (0..4 each, softmax per shape);
* ``background``: white, black or gray (softmax).

Its penultimate layer (``FEATURE_DIM`` = 128: global average and global max
pooling of a 64-channel map) is the feature space, so distances there measure
what matters in this world: colours, shapes, counts, sizes, background. The same
architecture with random weights (:func:`load_feature_net` ``kind="random"``) is
the cross-check: random convolutional features also separate image
distributions, only less sharply (they barely see shapes; docs/shapes.md).

Input convention: RGB in **[0, 1]**, ``FEATURE_SIZE`` = 64 px square;
:func:`to_input` converts PIL images, uint8 arrays and float tensors and resizes
other sizes (bilinear, antialiased). Diffusion outputs in [-1, 1] map with
``(x + 1) / 2``.

The committed weights (``weights/shapes_features.safetensors``, float16) come from::

    python -m opensd.shapes.features --out src/opensd/shapes/weights/shapes_features.safetensors --steps 600

which trains on the CPU (2 threads) on fresh samples of ``ShapesDataset(seed=TRAIN_SEED,
holdout=None)`` (the whole world, held-out combinations included, so that a
generator's compositional samples are measured too) and stores its accuracy on
1000 ``EVAL_SEED`` samples in the file's metadata (:func:`read_weights_info`): all
21 colour-shape labels right on 89.9% of images (99.4% of single labels), all
shape counts right 99.7%, sizes 99.8%, background 100%, the same at 32 px.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from opensd.config import from_dict, to_dict
from opensd.errors import OpenSDError
from opensd.models.layers import group_norm
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.world import BACKGROUNDS, MAX_COUNT, PALETTE, SHAPES, SIZES, Scene


class FeatureError(OpenSDError):
    """Bad input to the feature network (unknown kind, bad image shape or range, bad file)."""


FEATURE_SIZE = 64  # the side the net sees; other sizes are resized by to_input
FEATURE_DIM = 128
WEIGHTS_PATH = Path(__file__).parent / "weights" / "shapes_features.safetensors"
TRAIN_SEED = 4242  # ShapesDataset seed of the feature net's training stream
EVAL_SEED = 4343  # ShapesDataset seed of the accuracy check stored with the weights
KINDS: tuple[str, ...] = ("shapes", "random")

# the targets, in logit order
COLOR_SHAPES: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in PALETTE)  # 21
COLORS: tuple[str, ...] = tuple(PALETTE)  # 7
SHAPE_SIZES: tuple[tuple[str, str], ...] = tuple((s, z) for s in SHAPES for z in SIZES)  # 6
COUNT_CLASSES = MAX_COUNT + 1  # 0..4 of each shape
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
N_LOGITS = len(COLOR_SHAPES) + len(COLORS) + len(SHAPE_SIZES) + len(SHAPES) * COUNT_CLASSES + len(BACKGROUND_NAMES)


# ----------------------------------------------------------------------------- inputs and targets

def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), bilinear with antialiasing when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def to_input(images: Sequence[Image.Image] | torch.Tensor | np.ndarray, size: int = FEATURE_SIZE) -> torch.Tensor:
    """Images as the net's input: float32 (B, 3, size, size) in [0, 1].

    Accepts a list of PIL images (converted to RGB; any size, each resized), a
    uint8 array or tensor ``(B, H, W, 3)`` / ``(B, 3, H, W)``, or a float tensor
    ``(B, 3, H, W)`` in [0, 1]. Non-square images are resized to a square.
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise FeatureError(f"numpy images must be uint8 (B, H, W, 3), got dtype {images.dtype}")
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor):
        x = images
        if x.ndim != 4:
            raise FeatureError(f"image tensors must be 4-D (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            if x.shape[1] != 3 and x.shape[-1] == 3:
                x = x.permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
            x = x.float() / 255.0
        elif x.is_floating_point():
            x = x.float()
            if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
                raise FeatureError(
                    f"float images must be in [0, 1], got values in [{x.min():.3f}, {x.max():.3f}]; "
                    "map [-1, 1] outputs with (x + 1) / 2"
                )
            x = x.clamp(0, 1)
        else:
            raise FeatureError(f"image tensors must be uint8 or float, got {x.dtype}")
        if x.shape[1] != 3:
            raise FeatureError(f"images must have 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
        return _resize(x, size)
    if isinstance(images, Image.Image):
        raise FeatureError("pass a list of PIL images, not a single image")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise FeatureError(f"image {i} is a {type(im).__name__}, expected a PIL image")
        a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3)
        out.append(_resize(a.permute(2, 0, 1)[None].float() / 255.0, size))
    if not out:
        raise FeatureError("no images given")
    return torch.cat(out)


def scene_targets(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Classification targets from scene graphs.

    Returns ``presence`` (B, 21), ``colors`` (B, 7) and ``sizes`` (B, 6) as 0/1
    floats in the order of ``COLOR_SHAPES`` / ``COLORS`` / ``SHAPE_SIZES``, ``counts`` (B, 3) long in 0..4 per shape of
    ``SHAPES``, and ``background`` (B,) long indexing ``BACKGROUND_NAMES``.
    """
    b = len(scenes)
    presence, sizes = torch.zeros(b, len(COLOR_SHAPES)), torch.zeros(b, len(SHAPE_SIZES))
    colors = torch.zeros(b, len(COLORS))
    counts = torch.zeros(b, len(SHAPES), dtype=torch.long)
    background = torch.zeros(b, dtype=torch.long)
    for i, sc in enumerate(scenes):
        for o in sc.objects:
            presence[i, COLOR_SHAPES.index((o.color, o.shape))] = 1
            colors[i, COLORS.index(o.color)] = 1
            sizes[i, SHAPE_SIZES.index((o.shape, o.size))] = 1
            counts[i, SHAPES.index(o.shape)] += 1
        background[i] = BACKGROUND_NAMES.index(sc.background)
    return {"presence": presence, "colors": colors, "sizes": sizes, "counts": counts, "background": background}


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, N_LOGITS) -> presence (B, 21), colors (B, 7), sizes (B, 6), counts (B, 3, 5), background (B, 3)."""
    sizes = {"presence": len(COLOR_SHAPES), "colors": len(COLORS), "sizes": len(SHAPE_SIZES),
             "counts": len(SHAPES) * COUNT_CLASSES, "background": len(BACKGROUND_NAMES)}
    out, i = {}, 0
    for name, n in sizes.items():
        out[name], i = logits[:, i : i + n], i + n
    out["counts"] = out["counts"].reshape(-1, len(SHAPES), COUNT_CLASSES)  # (B, 15) -> (B, 3, 5)
    return out


# ----------------------------------------------------------------------------- the network

@dataclass(frozen=True)
class FeatureNetConfig:
    """Widths of the three stages (at 32, 16 and 8 px for a 64 px input), feature size, GroupNorm groups.

    ``feature_dim`` is even: half average-pooled, half max-pooled channels.
    """

    widths: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = FEATURE_DIM
    groups: int = 4


def _conv_block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), group_norm(c_out, groups, 1e-5), nn.SiLU())


class ShapesFeatureNet(nn.Module):
    """A small CNN: three stages of two 3x3 conv blocks (the first strided), then pooling.

    ``features(x)``: x (B, 3, 64, 64) in [0, 1] -> (B, feature_dim), the global
    average and the global maximum of a 1x1 projection of the last stage (the
    penultimate layer; max pooling makes presence and counts quick to learn).
    ``forward(x)``: the classifier's logits (B, N_LOGITS); see :func:`split_logits`.
    """

    def __init__(self, config: FeatureNetConfig = FeatureNetConfig()) -> None:
        super().__init__()
        if len(config.widths) != 3 or any(w % config.groups for w in config.widths):
            raise FeatureError(f"widths must be 3 multiples of groups={config.groups}, got {config.widths}")
        if config.feature_dim < 2 or config.feature_dim % 2:
            raise FeatureError(f"feature_dim must be even and >= 2, got {config.feature_dim}")
        self.config = config
        w1, w2, w3 = config.widths
        g = config.groups
        self.stages = nn.Sequential(
            _conv_block(3, w1, 2, g), _conv_block(w1, w1, 1, g),  # 64 -> 32 px
            _conv_block(w1, w2, 2, g), _conv_block(w2, w2, 1, g),  # 32 -> 16 px
            _conv_block(w2, w3, 2, g), _conv_block(w3, w3, 1, g),  # 16 -> 8 px
        )
        self.project = nn.Conv2d(w3, config.feature_dim // 2, 1)
        self.head = nn.Linear(config.feature_dim, N_LOGITS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(x * 2 - 1)  # [0, 1] -> [-1, 1] inside; (B, 3, 64, 64) -> (B, w3, 8, 8)
        h = F.silu(self.project(h))  # (B, D/2, 8, 8)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- loading and extraction

def save_feature_net(net: ShapesFeatureNet, path: str | Path, metadata: dict | None = None) -> None:
    """Write ``net`` as float16 safetensors with its config (and ``metadata``) as JSON metadata."""
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    meta = {"config": json.dumps(to_dict(net.config)), "format": "opensd-shapes-features"}
    if metadata:
        meta["info"] = json.dumps(metadata)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_weights_info(path: str | Path = WEIGHTS_PATH) -> dict:
    """The training info stored with a weights file (steps, seed, accuracies)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("info", "{}"))


def load_feature_net(kind: str = "shapes", seed: int = 0, path: str | Path | None = None) -> ShapesFeatureNet:
    """A feature net in eval mode, float32.

    ``kind="shapes"``: the trained net from ``path`` (default the committed
    ``WEIGHTS_PATH``). ``kind="random"``: the same architecture with PyTorch's
    default initialisation drawn from ``seed`` (the global RNG is left untouched).
    """
    if kind not in KINDS:
        raise FeatureError(f"unknown feature net kind {kind!r}; allowed: {', '.join(KINDS)}")
    if kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ShapesFeatureNet()
        return net.eval()
    path = Path(path or WEIGHTS_PATH)
    if not path.is_file():
        raise FeatureError(f"no feature weights at {path}; train them with `python -m opensd.shapes.features --out {path}`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise FeatureError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != "opensd-shapes-features":
        raise FeatureError(f"{path} is not a shapes feature-net file (metadata format {meta.get('format')!r})")
    net = ShapesFeatureNet(from_dict(FeatureNetConfig, json.loads(meta["config"])))
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise FeatureError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    return net.eval()


@torch.no_grad()
def extract_features(
    net: ShapesFeatureNet,
    images: Sequence[Image.Image] | torch.Tensor | np.ndarray,
    batch_size: int = 256,
) -> np.ndarray:
    """Penultimate features of ``images`` (see :func:`to_input`) as float32 ``(N, D)``."""
    if batch_size < 1:
        raise FeatureError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if n == 0:
        raise FeatureError("no images given")
    was_training = net.training
    net.eval()
    out = [net.features(to_input(images[i : i + batch_size])) for i in range(0, n, batch_size)]
    net.train(was_training)
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- training and evaluation

def loss_parts(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head losses: BCE for presence, colors and sizes, cross-entropy for counts and background."""
    p = split_logits(logits)
    return {
        "presence": F.binary_cross_entropy_with_logits(p["presence"], targets["presence"]),
        "colors": F.binary_cross_entropy_with_logits(p["colors"], targets["colors"]),
        "sizes": F.binary_cross_entropy_with_logits(p["sizes"], targets["sizes"]),
        "counts": F.cross_entropy(p["counts"].flatten(0, 1), targets["counts"].flatten()),  # (B*3, 5) vs (B*3,)
        "background": F.cross_entropy(p["background"], targets["background"]),
    }


def loss_fn(logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss: the sum of :func:`loss_parts`."""
    return cast(torch.Tensor, sum(loss_parts(logits, targets).values()))  # of tensors: never the start 0


@torch.no_grad()
def evaluate(net: ShapesFeatureNet, images: Sequence[Image.Image] | torch.Tensor, scenes: Sequence[Scene]) -> dict:
    """Classification accuracy on ``images`` against their ``scenes``.

    Returns ``presence_label`` (per colour-shape label), ``presence_exact`` (all 21
    labels right), ``sizes_exact``, ``counts_exact`` (all three shape counts right),
    ``background`` and ``all_exact`` (everything right for the image), each a fraction.
    """
    if len(images) != len(scenes):
        raise FeatureError(f"{len(images)} images but {len(scenes)} scenes")
    net.eval()
    logits = torch.cat([net(to_input(images[i : i + 256])) for i in range(0, len(images), 256)])
    p, t = split_logits(logits), scene_targets(scenes)
    pres = (p["presence"] > 0).float() == t["presence"]
    sizes = ((p["sizes"] > 0).float() == t["sizes"]).all(1)
    counts = (p["counts"].argmax(-1) == t["counts"]).all(1)
    bg = p["background"].argmax(-1) == t["background"]
    return {
        "presence_label": pres.float().mean().item(),
        "presence_exact": pres.all(1).float().mean().item(),
        "sizes_exact": sizes.float().mean().item(),
        "counts_exact": counts.float().mean().item(),
        "background": bg.float().mean().item(),
        "all_exact": (pres.all(1) & sizes & counts & bg).float().mean().item(),
    }


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Horizontal flips (every target is mirror-invariant) and, for a quarter, a 32 px round trip."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    small = torch.rand(x.shape[0], generator=g) < 0.25
    if small.any():
        x[small] = _resize(_resize(x[small], 32), FEATURE_SIZE)
    return x


def train(
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 2,
    log_every: int = 50,
) -> ShapesFeatureNet:
    """Train a ShapesFeatureNet on fresh samples of ``ShapesDataset(TRAIN_SEED, 64 px, holdout=None)``.

    AdamW with a linear warm-up over 5% of the steps and cosine decay; each step
    draws ``batch_size`` new samples, so nothing is seen twice.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ShapesFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    ds = ShapesDataset(seed=TRAIN_SEED, image_size=FEATURE_SIZE, holdout=None)
    t0 = time.time()
    run: dict[str, float] = {}
    for step in range(steps):
        samples = ds.take(batch_size, start=step * batch_size)
        x = _augment(to_input([s.image for s in samples]), g)
        parts = loss_parts(net(x), scene_targets([s.scene for s in samples]))
        loss = cast(torch.Tensor, sum(parts.values()))  # of tensors
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        now = {k: v.item() for k, v in parts.items()}
        run = now if step == 0 else {k: 0.9 * run[k] + 0.1 * v for k, v in now.items()}  # smoothed
        if log_every and (step % log_every == 0 or step == steps - 1):
            heads = "  ".join(f"{k} {v:.3f}" for k, v in run.items())
            print(f"step {step:5d}  loss {sum(run.values()):.3f}  ({heads})  {time.time() - t0:6.1f} s", flush=True)
    return net.eval()


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m opensd.shapes.features --out PATH --steps N``: train, evaluate, save."""
    ap = argparse.ArgumentParser(description="Train the shapes-world feature net (CPU, a few minutes).")
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=1000)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_n < 1:
        ap.error("--steps, --batch-size and --eval-n must be >= 1")
    t0 = time.time()
    net = train(args.steps, args.batch_size, args.lr, args.seed, args.threads)
    train_s = time.time() - t0
    info: dict = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "train_seed": TRAIN_SEED, "train_seconds": round(train_s, 1), "threads": args.threads,
                  "eval_seed": EVAL_SEED, "eval_n": args.eval_n}
    save_feature_net(net, args.out)  # evaluate the float16-rounded weights that are shipped
    net = load_feature_net("shapes", path=args.out)
    for size in (64, 32):
        samples = ShapesDataset(seed=EVAL_SEED, image_size=size, holdout=None).take(args.eval_n)
        acc = evaluate(net, [s.image for s in samples], [s.scene for s in samples])
        info[f"accuracy_{size}px"] = {k: round(v, 4) for k, v in acc.items()}
        print(f"accuracy at {size} px on {args.eval_n} fresh samples: " + json.dumps(info[f"accuracy_{size}px"]))
    save_feature_net(net, args.out, info)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) after {train_s:.0f} s of training")


if __name__ == "__main__":
    main()
