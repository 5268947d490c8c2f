"""Host time of one CLIP-stage batch (shapes world, batch 256, 3 hard negatives each), by part.

    python scripts/clip_host_cost.py [--batch 256] [--negatives 3]
"""

from __future__ import annotations

import argparse
import random
import time

from opensd.shapes.negatives import hard_negative_captions
from opensd.tokenizers.word import WordTokenizer
from opensd.training.config import DataConfig
from opensd.training.data import load_batch
from opensd.training.sources import open_source


def timed(label: str, fn):
    t0 = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - t0:.3f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--negatives", type=int, default=3)
    args = ap.parse_args()
    source = open_source(DataConfig(pool_size=2 * args.batch, workers=2))
    tok = WordTokenizer.train(source.captions(5000), vocab_size=2048)
    load_batch(source, range(args.batch))  # warm
    b = timed("load_batch (pool in memory)", lambda: load_batch(source, range(args.batch)))
    timed("tokenize the captions", lambda: tok(b.captions))
    rng = random.Random(0)
    texts = timed("write the hard negatives", lambda: [t for spec, cap in zip(b.specs, b.captions, strict=False)
                                                       for t in hard_negative_captions(spec, rng, args.negatives, like=cap)])
    timed(f"tokenize the {len(texts)} hard negatives", lambda: tok(texts))


if __name__ == "__main__":
    main()
