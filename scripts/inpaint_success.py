"""How often inpainting draws the requested object in the mask and leaves the rest alone.

    python scripts/inpaint_success.py [-m MODEL] [--n 50] [--steps 20] [--cfg-scale 7.5] [--mask-blur 0]
                                      [--only-masked] [--only-masked-padding 32]

The README's example, ``opensd inpaint in.png mask.png "a green triangle"``, scored
exactly: for seed i, a shapes-world scene (one or two objects, the model's size), a
square mask half the image's side centred on one of its objects, and the prompt "a
COLOUR SHAPE" naming a different shape (a colour the training data shows on it). An
inpainting succeeds when the scorer (:func:`opensd.shapes.scorer.parse`) finds an object
of that shape and colour whose centre lies in the mask, and no pixel outside the reach
of the (blurred) mask moved by more than 1 of 255. One row per masked-content mode.
``--only-masked`` inpaints only the mask's region plus ``--only-masked-padding`` pixels
(A1111's "Inpaint area: Only masked"; see :mod:`opensd.pipelines.inpaint`).

A pipeline whose ``inpaint`` has no ``masked_content`` (opensd before it had one) is
measured as it is, in one row "(no choice)": the README's "before" number, taken with
this script on the sources of commit 587ae1e::

    mkdir /tmp/before && git archive 587ae1e src | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/src python scripts/inpaint_success.py -m models/opensd-shapes
"""

from __future__ import annotations

import argparse
import inspect
import random

import numpy as np
import torch
from PIL import Image, ImageFilter

import opensd
from opensd.defaults import resolve_model
from opensd.shapes.captions import noun_phrase
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.scorer import parse
from opensd.shapes.world import DEFAULT_HOLDOUT, SHAPES, ObjectSpec


def cases(n: int, size: int) -> list[tuple[Image.Image, np.ndarray, str, str, str]]:
    """``(image, mask uint8 (size, size), prompt, shape, colour)`` for seeds 0..n-1."""
    ds = ShapesDataset(seed=123, image_size=size, kinds={"single": 1, "pair": 1})
    out = []
    for i in range(n):
        sample = ds[i]
        rng = random.Random(f"inpaint:{i}")
        obj = rng.choice(sample.scene.objects)
        shape = rng.choice([s for s in SHAPES if s != obj.shape])
        color = rng.choice(DEFAULT_HOLDOUT.allowed_colors(shape))
        side = size // 2
        x0 = int(round(min(max(obj.cx * size - side / 2, 0), size - side)))
        y0 = int(round(min(max(obj.cy * size - side / 2, 0), size - side)))
        mask = np.zeros((size, size), np.uint8)
        mask[y0 : y0 + side, x0 : x0 + side] = 255
        out.append((sample.image, mask, noun_phrase(ObjectSpec(shape, color)), shape, color))
    return out


def judge(out: Image.Image, image: Image.Image, mask: np.ndarray, blur: int, shape: str, color: str) -> tuple[bool, bool]:
    """(the object is in the mask, the rest is unchanged)."""
    found = any(
        d.shape == shape and d.color == color and mask[min(int(d.center[1]), mask.shape[0] - 1), min(int(d.center[0]), mask.shape[1] - 1)]
        for d in parse(out).objects
    )
    reach = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(blur)) if blur else Image.fromarray(mask)) > 0
    diff = np.abs(np.asarray(out, np.int16) - np.asarray(image.convert("RGB"), np.int16)).max(axis=2)
    return found, bool((diff[~reach] <= 1).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=7.5)
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--mask-blur", type=int, default=0)
    ap.add_argument("--only-masked", action="store_true", help="inpaint only the mask's region (default: the whole picture)")
    ap.add_argument("--only-masked-padding", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    pipe = opensd.load(resolve_model(args.model))
    size = pipe.cfg.image_size
    has_choice = "masked_content" in inspect.signature(pipe.inpaint).parameters
    if has_choice:
        from opensd.pipelines.inpaint import MaskedContent

        modes: list = list(MaskedContent)
    else:
        modes = [None]
    todo = cases(args.n, size)
    print(f"{args.n} inpaintings per row, {size} px, {args.steps} steps of DPM++ 2M, CFG {args.cfg_scale}, "
          f"strength {args.strength}, mask blur {args.mask_blur}, "
          + (f"only masked, padding {args.only_masked_padding}" if args.only_masked else "whole picture"))
    print("| masked content | success | object in the mask | rest unchanged |")
    print("|---|---|---|---|")
    for mode in modes:
        extra = {"masked_content": mode, "mask_blur": args.mask_blur} if mode is not None else {}
        if args.only_masked:
            extra.update(only_masked=True, only_masked_padding=args.only_masked_padding)
        hits = kept = both = 0
        for i, (image, mask, prompt, shape, color) in enumerate(todo):
            out = pipe.inpaint(image, Image.fromarray(mask), prompt, steps=args.steps, cfg_scale=args.cfg_scale,
                               strength=args.strength, seed=i, **extra)[0]
            found, same = judge(out, image, mask, args.mask_blur, shape, color)
            hits, kept, both = hits + found, kept + same, both + (found and same)
        name = mode.value if mode is not None else "(no choice)"
        n = len(todo)
        print(f"| {name} | {both / n:.2f} | {hits / n:.2f} | {kept / n:.2f} |", flush=True)


if __name__ == "__main__":
    main()
