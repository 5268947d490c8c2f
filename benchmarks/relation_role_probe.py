"""Does a model's text context say which noun a relation places where? A linear probe.

For "a red circle above a blue square" the U-Net must draw the circle on top: the context
vector at "circle" has to differ from the one in "a blue square above a red circle". This
reads the text encoder's output (the ``context`` the U-Net's cross-attention sees) at each
shape noun of two-object relation prompts and fits a logistic regression that predicts
whether that noun's object is the upper/left one ("above", "left of", ...) or the lower/right
one; it is scored on prompts drawn with another seed. Chance is 0.5; a high score means the
information is in the context and a U-Net that misplaces the objects is not reading it.

Prompts: the shapes world's colours, shapes and every relation phrase
(:data:`opensd.shapes.captions.RELATION_PHRASES`), "a C1 S1 REL a C2 S2" with two different
shapes. Each model folder is probed with its own text encoder and tokenizer.

    PYTHONPATH=src python benchmarks/relation_role_probe.py models/opensd-shapes runs/rich-cpu/unet_minilm-13000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

UPPER_FIRST = {"left of": True, "above": True, "right of": False, "below": False}


def prompts(n: int, seed: int) -> list[tuple[str, str, str, bool]]:
    """(text, first shape, second shape, whether the first object is the upper/left one)."""
    from opensd.shapes.captions import RELATION_PHRASES
    from opensd.shapes.world import PALETTE, SHAPES

    rng, out = random.Random(seed), []
    for _ in range(n):
        c1, c2 = rng.sample(sorted(PALETTE), 2)
        s1, s2 = rng.sample(SHAPES, 2)
        relation = rng.choice(sorted(RELATION_PHRASES))
        phrase = rng.choice(RELATION_PHRASES[relation])
        out.append((f"a {c1} {s1} {phrase} a {c2} {s2}", s1, s2, UPPER_FIRST[relation]))
    return out


def noun_features(folder: str, rows: list[tuple[str, str, str, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(2N, D) context vectors at each prompt's two shape nouns (first piece), and (2N,) labels."""
    from opensd.checkpoints import load_model
    from opensd.training.text_encoding import encode_ids

    loaded = load_model(folder)
    model, tok = loaded.model.eval(), loaded.tokenizer
    xs, ys = [], []
    with torch.no_grad():
        for text, s1, s2, first_upper in rows:
            ids = tok([text])
            context = encode_ids(model, tok, ids)["context"][0]  # (L, D)
            framed = [int(i) for i in ids[0]]
            for shape, upper in ((s1, first_upper), (s2, not first_upper)):
                xs.append(context[framed.index(tok.encode(shape)[0])])
                ys.append(float(upper))
    return torch.stack(xs), torch.tensor(ys)


def probe(folder: str, n_train: int, n_test: int) -> float:
    """Held-out accuracy of a logistic regression (L2 1e-3, LBFGS) on standardized features."""
    x, y = noun_features(folder, prompts(n_train, seed=0))
    xt, yt = noun_features(folder, prompts(n_test, seed=1))
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b > 0).float() == yt).float().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="opensd model folders")
    p.add_argument("--train", type=int, default=1500, help="training prompts (two nouns each)")
    p.add_argument("--test", type=int, default=400, help="held-out prompts, another seed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    results = {m: probe(m, args.train, args.test) for m in args.models}
    for m, acc in results.items():
        print(f"{m}: {acc:.3f} of held-out nouns placed right (chance 0.5)")
    if args.json is not None:
        import datetime

        record = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                  "train": args.train, "test": args.test, "accuracy": results}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
