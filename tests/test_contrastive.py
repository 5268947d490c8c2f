"""CLIP-style contrastive training: image encoder, loss, hard negatives, retrieval, a tiny training run."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from opensd.config import ConfigError, from_dict, to_dict
from opensd.models.clip import CLIPTextModel
from opensd.models.contrastive import ContrastiveConfig, ContrastiveModel
from opensd.models.image_encoder import ImageEncoder, ImageEncoderConfig, Pool
from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.negatives import (
    NEGATIVE_KINDS,
    RICH_NEGATIVE_KINDS,
    SWAP_KINDS,
    find_wording,
    hard_negative_captions,
    hard_negatives,
    negative_specs,
)
from opensd.shapes.retrieval import retrieval_metrics
from opensd.shapes.world import Scene, check_true, realize
from opensd.tokenizers.word import WordTokenizer
from opensd.training.contrastive_loss import contrastive_loss, info_nce

EOS = 1  # WordTokenizer's <eos>


def to_images(samples) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] from shapes samples."""
    arr = np.stack([np.asarray(s.image, np.float32) for s in samples]) / 127.5 - 1.0  # (N, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def random_ids(batch: int, length: int = 12, vocab: int = 99, seed: int = 0, shape: tuple = ()) -> torch.Tensor:
    """Token ids in 4..vocab with an eos at a random position per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, *shape, length), generator=g)
    eos_at = torch.randint(2, length, (batch, *shape, 1), generator=g)
    return ids.scatter(-1, eos_at, EOS)


def ordered_for(neg, scene: Scene) -> Scene:
    """``scene`` with the object matching ``neg``'s group A first.

    check_true reads a relation between ``scene.objects[0]`` and ``[1]`` in scene
    order, so a negative that swaps the objects must be judged on the scene listed in
    its own order (the order of objects in a scene carries no meaning).
    """
    if neg.relation is None:
        return scene
    first = [o for o in scene.objects if neg.objects[0].matches(o.shape, o.color, o.size)]
    rest = [o for o in scene.objects if o not in first]
    return dataclasses.replace(scene, objects=tuple(first + rest))


# ---- image encoder ---------------------------------------------------------------------


@pytest.mark.parametrize("pool", list(Pool))
def test_image_encoder_shapes_and_resolution(pool: Pool) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(ImageEncoderConfig.tiny(), pool=pool)
    enc = ImageEncoder(cfg)
    for size in (32, 64):
        out = enc(torch.rand(2, 3, size, size) * 2 - 1)
        assert out.shape == (2, cfg.width) and torch.isfinite(out).all()
    small = ImageEncoder(ImageEncoderConfig.small())
    assert small(torch.zeros(1, 3, 64, 64)).shape == (1, ImageEncoderConfig.small().width)


def test_image_encoder_bad_input_and_config() -> None:
    enc = ImageEncoder(ImageEncoderConfig.tiny())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="downsample factor"):
        enc(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ConfigError, match="groups of >= 4"):
        ImageEncoderConfig(channels=(16, 32), norm_groups=8)
    with pytest.raises(ConfigError, match="heads"):
        ImageEncoderConfig(channels=(32, 64), norm_groups=8, heads=5)
    with pytest.raises(ConfigError, match="stem_stride"):
        ImageEncoderConfig(stem_stride=3)
    with pytest.raises(ConfigError, match="Pool"):
        ImageEncoderConfig(pool="max")


def test_config_round_trip_and_errors() -> None:
    for cfg in (ContrastiveConfig.tiny(), ContrastiveConfig.small(vocab_size=300, max_length=24)):
        assert from_dict(ContrastiveConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ContrastiveConfig, {"embed": 3})
    with pytest.raises(ConfigError, match="init_temperature"):
        ContrastiveConfig(init_temperature=0.001)
    with pytest.raises(ConfigError, match="hard_negative_weight"):
        ContrastiveConfig(hard_negative_weight=-1.0)
    with pytest.raises(ConfigError, match="CLIPTextConfig"):
        ContrastiveConfig(text=ImageEncoderConfig.tiny())


# ---- model and loss --------------------------------------------------------------------


def test_encoders_are_normalized_and_every_parameter_learns() -> None:
    torch.manual_seed(0)
    model = ContrastiveModel(ContrastiveConfig.tiny())
    images, ids = torch.rand(4, 3, 32, 32) * 2 - 1, random_ids(4)
    img, txt = model.encode_image(images), model.encode_text(ids, EOS)
    assert img.shape == txt.shape == (4, model.cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    # the text embedding is the projected hidden state at the first eos
    hidden = model.text(ids)
    ref = torch.nn.functional.normalize(model.text_projection(CLIPTextModel.pooled(hidden, ids, EOS)), dim=-1)
    torch.testing.assert_close(txt, ref)

    loss, metrics = contrastive_loss(model, images, ids, EOS, random_ids(4, seed=1, shape=(2,)))
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not dead
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"parameters without gradient: {zero}"
    assert set(metrics) == {
        "loss", "loss_i2t", "loss_t2i", "acc_i2t", "acc_t2i", "temperature", "logit_scale", "hard_negative_acc",
    }  # fmt: skip
    assert metrics["temperature"] == pytest.approx(0.07, rel=1e-5)


def _hand_info_nce(img: list, txt: list, scale: float, negs: list | None = None, w: float = 1.0) -> float:
    """Symmetric InfoNCE with explicit loops over python floats."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    b = len(img)
    i2t = t2i = 0.0
    for i in range(b):
        row = [scale * dot(img[i], txt[j]) for j in range(b)]
        extra = [scale * dot(img[i], n) for n in negs[i]] if negs else []
        denom = sum(math.exp(x) for x in row) + w * sum(math.exp(x) for x in extra)
        i2t -= math.log(math.exp(row[i]) / denom)
        col = [scale * dot(img[j], txt[i]) for j in range(b)]
        t2i -= math.log(math.exp(col[i]) / sum(math.exp(x) for x in col))
    return (i2t / b + t2i / b) / 2


def test_info_nce_matches_hand_computation() -> None:
    s = 1 / math.sqrt(2)
    img = [[1.0, 0.0], [0.0, 1.0], [s, s]]
    txt = [[0.6, 0.8], [0.0, 1.0], [-s, s]]
    negs = [[[0.8, 0.6], [1.0, 0.0]], [[0.0, -1.0], [s, s]], [[s, -s], [0.6, -0.8]]]
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    got = info_nce(t(img), t(txt), 10.0)["loss"].item()
    assert got == pytest.approx(_hand_info_nce(img, txt, 10.0), rel=1e-12)
    for w in (1.0, 2.5):
        got = info_nce(t(img), t(txt), 10.0, t(negs), w)["loss"].item()
        assert got == pytest.approx(_hand_info_nce(img, txt, 10.0, negs, w), rel=1e-12)
    # weight 0: the negatives drop out of the loss
    assert info_nce(t(img), t(txt), 10.0, t(negs), 0.0)["loss"].item() == pytest.approx(_hand_info_nce(img, txt, 10.0))
    with pytest.raises(ValueError, match="hard negative embeddings"):
        info_nce(t(img), t(txt), 10.0, t(negs)[:2])


def test_info_nce_is_symmetric_and_permutation_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1)
    ab, ba = info_nce(a, b, 7.0), info_nce(b, a, 7.0)
    torch.testing.assert_close(ab["loss"], ba["loss"])
    torch.testing.assert_close(ab["loss_i2t"], ba["loss_t2i"])
    torch.testing.assert_close(ab["loss_t2i"], ba["loss_i2t"])
    assert not torch.isclose(ab["loss_i2t"], ab["loss_t2i"])  # the two directions do differ
    perm = torch.randperm(6, generator=g)
    torch.testing.assert_close(info_nce(a[perm], b[perm], 7.0)["loss"], ab["loss"])


def test_logit_scale_is_clamped_at_100() -> None:
    torch.manual_seed(0)
    model = ContrastiveModel(ContrastiveConfig.tiny())
    assert model.scale().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)
    images, ids = torch.rand(3, 3, 32, 32) * 2 - 1, random_ids(3)
    loss, metrics = contrastive_loss(model, images, ids, EOS)
    assert metrics["logit_scale"] == pytest.approx(100.0) and metrics["temperature"] == pytest.approx(0.01)
    ref = info_nce(model.encode_image(images), model.encode_text(ids, EOS), 100.0)["loss"]
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no push beyond 100
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_contrastive_loss_bad_input() -> None:
    model = ContrastiveModel(ContrastiveConfig.tiny())
    images, ids = torch.zeros(2, 3, 32, 32), random_ids(2)
    with pytest.raises(ValueError, match="same B"):
        contrastive_loss(model, images[:1], ids, EOS)
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_loss(model, images[:1], ids[:1], EOS)
    with pytest.raises(ValueError, match=r"hard_negative_ids must be \(B=2, K, L=12\)"):
        contrastive_loss(model, images, ids, EOS, random_ids(2, length=10, shape=(3,)))


# ---- hard negatives --------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """The words of a caption with "an" read as "a" (the article follows the next word)."""
    return ["a" if w == "an" else w for w in re.findall(r"[a-z]+|,", text)]


def _word_diff(a: str, b: str) -> int:
    wa, wb = _words(a), _words(b)
    return sum(x != y for x, y in zip(wa, wb, strict=False)) + abs(len(wa) - len(wb))


def test_hard_negatives_are_false_and_worded_like_the_caption() -> None:
    samples = ShapesDataset(seed=3, image_size=32).take(300)
    seen: Counter = Counter()
    for n, s in enumerate(samples):
        assert find_wording(s.spec, s.caption) is not None  # every dataset caption replays
        scenes = [s.scene] + [realize(s.spec, random.Random(j), 32) for j in range(2)]
        for kind, specs in negative_specs(s.spec).items():
            for neg in specs:
                for scene in scenes:
                    assert check_true(neg, ordered_for(neg, scene)), (kind, neg, s.caption)
        for h in hard_negatives(s.spec, random.Random(n), k=None, like=s.caption):
            seen[h.kind] += 1
            assert h.text != s.caption and find_wording(h.spec, h.text) is not None
            # the same words in the same frame: a swap reorders words, an edit changes at most 3
            if h.kind in ("color_swap", "relation_swap"):
                assert Counter(_words(h.text)) == Counter(_words(s.caption)), (s.caption, h.text)
            elif h.kind == "relation_flip":
                assert _word_diff(h.text, s.caption) == 1, (s.caption, h.text)
            else:
                assert 1 <= _word_diff(h.text, s.caption) <= 3, (s.caption, h.text)
    assert set(seen) == set(NEGATIVE_KINDS) - set(RICH_NEGATIVE_KINDS), seen  # the classic world's kinds


def test_hard_negative_captions_examples() -> None:
    from opensd.shapes.world import ObjectSpec, PromptSpec

    spec = PromptSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")
    text = "a photo of a red circle to the left of a blue square"
    negs = hard_negatives(spec, random.Random(0), k=3, like=text)
    assert {h.kind for h in negs} == set(SWAP_KINDS) - {"count_swap"}  # the swaps come first
    assert {h.text for h in negs} == {
        "a photo of a blue circle to the left of a red square",
        "a photo of a blue square to the left of a red circle",
        "a photo of a red circle to the right of a blue square",
    }
    texts = hard_negative_captions(spec, random.Random(0), k=5, like=text)
    assert len(texts) == len(set(texts)) == 5
    # a spec with few negatives repeats them to fill k
    few = PromptSpec((ObjectSpec("circle", count=4),))
    assert len(hard_negative_captions(few, random.Random(0), k=6)) == 6
    with pytest.raises(ValueError, match="k must be"):
        hard_negative_captions(spec, random.Random(0), k=0)


# ---- retrieval metrics -----------------------------------------------------------------


def test_retrieval_metrics_counts_by_hand() -> None:
    samples = ShapesDataset(seed=4, image_size=32).take(24)
    captions, specs = [s.caption for s in samples], [s.spec for s in samples]
    tok = WordTokenizer.train(captions, vocab_size=99, context_length=24)
    torch.manual_seed(0)
    model = ContrastiveModel(ContrastiveConfig.tiny(vocab_size=99, max_length=24))
    images = to_images(samples)
    m = retrieval_metrics(model, images, captions, specs, tok)
    with torch.no_grad():
        sim = model.encode_image(images) @ model.encode_text(tok(captions), tok.eos_id).T
    best = sim.argmax(dim=1).tolist()
    assert m["i2t_top1"] == pytest.approx(np.mean([specs[j] == specs[i] for i, j in enumerate(best)]))
    assert m["count"] == 24 and 0 <= m["i2t_top1"] <= m["i2t_top5"] <= 1 and m["t2i_top1"] <= m["t2i_top5"]
    kinds = [k.split("/")[1] for k in m if k.startswith("hard_negative_accuracy/")]
    assert kinds and set(kinds) <= set(NEGATIVE_KINDS)
    assert sum(m[f"hard_negative_count/{k}"] for k in kinds) == sum(len(negative_specs(s)) for s in specs)
    assert m == retrieval_metrics(model, [s.image for s in samples], captions, specs, tok)  # PIL input
    with pytest.raises(ValueError, match="as many captions"):
        retrieval_metrics(model, images, captions[:3], specs, tok)


# ---- a tiny training run ---------------------------------------------------------------

STEPS, BATCH, K = 150, 32, 3


def _held_out_batches(model, images, ids, neg_ids) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        parts = [
            contrastive_loss(model, images[b : b + BATCH], ids[b : b + BATCH], EOS, neg_ids[b : b + BATCH])[1]
            for b in range(0, len(images), BATCH)
        ]
    model.train()
    return {k: float(np.mean([p[k] for p in parts])) for k in ("acc_i2t", "acc_t2i", "hard_negative_acc")}


def test_tiny_model_learns_shapes_world(one_thread) -> None:
    """150 steps, batch 32, 32 px, CPU, one thread (about 25 s wall on a shared 2-core box).

    Measured on 256 held-out pairs (torch 2.13 CPU), untrained -> trained:
    in-batch top-1 i2t 0.027 -> 0.281, t2i 0.035 -> 0.289 (chance 1/32 = 0.031);
    hard-negative accuracy (caption beats all 3 negatives) 0.105 -> 0.383 (chance 0.25);
    retrieval among 256: i2t top-5 0.258, t2i top-5 0.305; per kind vs one negative
    (chance 0.5): count 0.78, colour 0.72, size 0.73, shape 0.64, background 1.0, while
    the swaps stay near chance (colour swap 0.44, relation swap 0.52, flip 0.57).
    Seeds 1-3 of the same run gave top-1 0.34-0.43 / 0.39-0.45, hard-negative
    0.36-0.39, count 0.71-0.83, colour 0.79-0.91, background >= 0.98: the thresholds
    below sit under the worst of the four seeds.
    """
    train, test = ShapesDataset(seed=0, image_size=32).take(1024), ShapesDataset(seed=1, image_size=32).take(256)
    rng = random.Random(0)
    train_negs = [hard_negative_captions(s.spec, rng, K, like=s.caption) for s in train]
    test_negs = [hard_negative_captions(s.spec, rng, K, like=s.caption) for s in test]
    tok = WordTokenizer.train([s.caption for s in train] + sum(train_negs, []), vocab_size=128, context_length=24)
    assert tok.eos_id == EOS
    images, ids = to_images(train), tok([s.caption for s in train])
    neg_ids = torch.stack([tok(n) for n in train_negs])  # (N, K, L)
    t_images, t_ids = to_images(test), tok([s.caption for s in test])
    t_neg_ids = torch.stack([tok(n) for n in test_negs])

    torch.manual_seed(0)
    model = ContrastiveModel(ContrastiveConfig.tiny(vocab_size=tok.vocab_size, max_length=24))
    before = _held_out_batches(model, t_images, t_ids, t_neg_ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        idx = torch.randint(0, len(train), (BATCH,), generator=g)
        loss, _ = contrastive_loss(model, images[idx], ids[idx], EOS, neg_ids[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.clamp_logit_scale_()
    after = _held_out_batches(model, t_images, t_ids, t_neg_ids)
    retrieval = retrieval_metrics(model, t_images, [s.caption for s in test], [s.spec for s in test], tok)
    print(f"\nbefore {before}\nafter {after}\nretrieval {retrieval}")

    assert after["acc_i2t"] >= 0.2 and after["acc_t2i"] >= 0.2  # chance 0.031
    assert after["hard_negative_acc"] >= 0.31  # chance 0.25
    assert after["hard_negative_acc"] >= before["hard_negative_acc"] + 0.15
    assert retrieval["i2t_top5"] >= 0.15 and retrieval["t2i_top5"] >= 0.15  # chance about 5/256
    assert retrieval["hard_negative_accuracy/count"] >= 0.65  # chance 0.5
    assert retrieval["hard_negative_accuracy/color"] >= 0.62
    assert retrieval["hard_negative_accuracy/background"] >= 0.9


# ---- the text tower drops into Stable Diffusion ----------------------------------------


def test_text_tower_loads_strictly_into_clip_and_stable_diffusion() -> None:
    torch.manual_seed(0)
    cfg = ContrastiveConfig.tiny(vocab_size=60, max_length=24)
    model = ContrastiveModel(cfg)
    state = model.text.state_dict()
    clip = CLIPTextModel(cfg.text)
    assert set(clip.state_dict()) == set(state)
    clip.load_state_dict(state, strict=True)

    base = SDConfig.tiny()
    sd = StableDiffusion(base.replace(text=cfg.text, unet=dataclasses.replace(base.unet, context_dim=cfg.text.width)))
    sd.cond_stage_model.transformer.load_state_dict(state, strict=True)
    ids = random_ids(2, length=24, vocab=60)
    torch.testing.assert_close(sd.text_encoder(ids), model.text(ids))
    prefixed = {f"cond_stage_model.transformer.{k}" for k in state}
    assert prefixed <= set(sd.state_dict())
