"""Grounded cross-attention (TokenCompose's token loss): targets from shapes scenes, the loss, training with it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensd.config import ConfigError, to_dict
from opensd.models.capture import active_sink
from opensd.models.transformer import BasicTransformerBlock
from opensd.models.unet import UNetConfig, UNetModel
from opensd.shapes.captions import caption
from opensd.shapes.dataset import ShapesDataset
from opensd.shapes.grounding import grounding_targets
from opensd.shapes.world import ObjectSpec, PromptSpec, masks, realize
from opensd.tokenizers.word import WordTokenizer
from opensd.training.config import stage_config_from_dict
from opensd.training.grounding import AttentionCapture, PixelTarget, grounding_loss
from opensd.training.loop import read_log, run_stage
from opensd.training.unet import UNetStage, UNetStageConfig


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    captions = [s.caption for s in ShapesDataset(seed=0, image_size=32).take(400)]
    return WordTokenizer.train(captions, vocab_size=128, context_length=32)


def words_at(tokenizer: WordTokenizer, text: str, positions: torch.Tensor) -> list[str]:
    framed = tokenizer([text])[0]
    return [tokenizer.decode([int(framed[p])]) for p in positions if p >= 0]


# ----------------------------------------------------------------------------- targets


def test_targets_name_each_groups_words_and_masks(tokenizer) -> None:
    spec = PromptSpec((ObjectSpec("circle", "red", "small"), ObjectSpec("square", "blue")), relation="above")
    rng = random.Random(3)
    scene = realize(spec, rng, image_size=32)
    text = "a photo of a small red circle above a blue square"
    tokens, m = grounding_targets(text, spec, scene, tokenizer, (8, 8))
    assert tokens.shape == (2, 3) and m.shape == (2, 8, 8)
    assert words_at(tokenizer, text, tokens[0]) == ["small", "red", "circle"]
    assert words_at(tokenizer, text, tokens[1]) == ["blue", "square"]
    for g, obj_mask in enumerate(masks(scene, 32)):
        expected = F.avg_pool2d(torch.from_numpy(obj_mask.astype(np.float32))[None, None], 4)[0, 0]
        assert torch.allclose(m[g], expected)
        assert 0 < float(m[g].sum()) * 16 == pytest.approx(obj_mask.sum())


def test_targets_of_a_counted_group_cover_all_its_objects(tokenizer) -> None:
    spec = PromptSpec((ObjectSpec("triangle", "green", count=3),))
    scene = realize(spec, random.Random(1), image_size=32)
    for text in (caption(spec, random.Random(0)), "there are three green triangles on a white background"):
        tokens, m = grounding_targets(text, spec, scene, tokenizer, (8, 8))
        assert words_at(tokenizer, text, tokens[0]) == ["green", "triangles"]  # "three" is left free
        assert (tokens[1] == -1).all() and float(m[1].sum()) == 0
        union = np.logical_or.reduce(masks(scene, 32))
        assert float(m[0].sum()) * 16 == pytest.approx(union.sum())


def test_targets_find_the_one_wording_and_skip_foreign_captions(tokenizer) -> None:
    spec = PromptSpec((ObjectSpec("circle"),))
    scene = realize(spec, random.Random(2), image_size=32)
    tokens, _ = grounding_targets("one circle", spec, scene, tokenizer, (8, 8))
    assert words_at(tokenizer, "one circle", tokens[0]) == ["circle"]
    tokens, m = grounding_targets("a blue square", spec, scene, tokenizer, (8, 8))
    assert (tokens == -1).all() and float(m[0].sum()) > 0  # the mask is known, no word names it


def test_every_training_caption_grounds_each_group(tokenizer) -> None:
    for s in ShapesDataset(seed=5, image_size=32).take(200):
        tokens, _ = grounding_targets(s.caption, s.spec, s.scene, tokenizer, (8, 8))
        for g, group in enumerate(s.spec.objects):
            named = words_at(tokenizer, s.caption, tokens[g])
            assert named and named[-1] in (group.shape, group.shape + "s"), (s.caption, named)


# ----------------------------------------------------------------------------- the loss


def one_layer(probs_of_token: torch.Tensor, length: int = 5, token: int = 2) -> torch.Tensor:
    """(1, 1, N, L) probabilities: ``token`` gets ``probs_of_token`` (N,), the rest share what is left."""
    n = probs_of_token.numel()
    p = torch.zeros(1, 1, n, length)
    p[0, 0, :, token] = probs_of_token
    p[0, 0, :, 0] = 1 - probs_of_token
    return p


def test_token_loss_is_zero_inside_the_mask_and_the_area_share_when_flat() -> None:
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 0, :2, :2] = 1.0  # a quarter of the image
    tokens = torch.tensor([[[2, -1, -1], [-1, -1, -1]]])
    keep = torch.tensor([True])

    def token_loss(p, tok=tokens, k=keep):
        return float(grounding_loss([p], tok, mask, k)[0][0])

    inside = mask[0, 0].flatten() * 0.5
    assert token_loss(one_layer(inside)) == pytest.approx(0.0, abs=1e-7)
    flat = torch.full((16,), 0.3)
    assert token_loss(one_layer(flat)) == pytest.approx((1 - 0.25) ** 2)
    # a coarser layer (2x2) pools the mask: the token attends to the one cell it covers
    assert token_loss(one_layer(torch.tensor([0.9, 0.0, 0.0, 0.0]))) == pytest.approx(0.0, abs=1e-7)
    assert token_loss(one_layer(flat), k=torch.tensor([False])) == 0.0
    assert token_loss(one_layer(flat), tok=torch.full_like(tokens, -1)) == 0.0
    # the token loss cannot tell a little attention from a lot; the pixel loss can
    faint = one_layer(mask[0, 0].flatten() * 0.01)
    assert token_loss(faint) == pytest.approx(0.0, abs=1e-7)
    assert float(grounding_loss([faint], tokens, mask, keep)[1][0]) > float(
        grounding_loss([one_layer(inside)], tokens, mask, keep)[1][0])


def test_pixel_loss_is_the_cross_entropy_against_an_equal_share_of_the_mask() -> None:
    mask = torch.zeros(1, 2, 2, 2)
    mask[0, 0, 0, 0] = 1.0
    mask[0, 1, 1, 1] = 0.5  # half-covered cell: a soft target
    tokens = torch.tensor([[[1, 2, -1], [3, -1, -1]]])
    p = torch.zeros(1, 1, 4, 5)
    p[0, 0, :, 1] = torch.tensor([0.5, 0.1, 0.1, 0.1])  # group 0: words 1 and 2 share the mask
    p[0, 0, :, 2] = torch.tensor([0.3, 0.1, 0.1, 0.1])
    p[0, 0, :, 3] = torch.tensor([0.0, 0.2, 0.2, 0.6])  # group 1: word 3 alone
    p[0, 0, :, 0] = 1 - p[0, 0].sum(-1)
    _, pixel = grounding_loss([p], tokens, mask, torch.tensor([True]))
    half = mask[0, 0].flatten() / 2
    bce = [F.binary_cross_entropy(p[0, 0, :, 1], half), F.binary_cross_entropy(p[0, 0, :, 2], half),
           F.binary_cross_entropy(p[0, 0, :, 3].clamp(1e-6, 1 - 1e-6), mask[0, 1].flatten())]
    assert float(pixel[0]) == pytest.approx(float(sum(bce)) / 3, rel=1e-5)
    # the best a word of a two-word group can do is half of the object's attention
    best = p.clone()
    best[0, 0, :, 1] = best[0, 0, :, 2] = half
    worse = p.clone()
    worse[0, 0, :, 1], worse[0, 0, :, 2] = mask[0, 0].flatten(), 0.0
    assert float(grounding_loss([best], tokens, mask, torch.tensor([True]))[1][0]) < float(
        grounding_loss([worse], tokens, mask, torch.tensor([True]))[1][0])
    # "group": the words' summed attention against the whole mask, averaged over groups
    _, grouped = grounding_loss([p], tokens, mask, torch.tensor([True]), pixel_target=PixelTarget.GROUP)
    g0 = F.binary_cross_entropy(p[0, 0, :, 1] + p[0, 0, :, 2], mask[0, 0].flatten())
    g1 = F.binary_cross_entropy(p[0, 0, :, 3].clamp(1e-6, 1 - 1e-6), mask[0, 1].flatten())
    assert float(grouped[0]) == pytest.approx(float(g0 + g1) / 2, rel=1e-5)
    assert float(grounding_loss([worse], tokens, mask, torch.tensor([True]), pixel_target=PixelTarget.GROUP)[1][0]) \
        == pytest.approx(float(grounding_loss([best], tokens, mask, torch.tensor([True]),
                                              pixel_target=PixelTarget.GROUP)[1][0]), rel=1e-6)


def test_capture_gives_differentiable_maps_and_removes_its_hooks() -> None:
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig.tiny())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 6, unet.cfg.context_dim)
    plain = unet(x, t, context)
    with AttentionCapture(unet) as cap:
        out = unet(x, t, context)
    layers = [m.attn2 for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(cap.probs) == len(layers) and active_sink() is None
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)  # explicit attention = SDPA
    mask = torch.zeros(2, 2, 8, 8)
    mask[:, 0, 2:5, 2:5] = 1.0
    tokens = torch.tensor([[[3, -1, -1], [-1, -1, -1]]] * 2)
    token, pixel = grounding_loss(cap.probs, tokens, mask, torch.tensor([True, True]))
    (token + pixel).sum().backward()
    grads = [a.to_q.weight.grad for a in layers]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- training with it


def tiny_unet_cfg(out: Path, **extra) -> dict:
    t = {"out_dir": str(out), "steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 0, "ema_decay": 0.0,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False}
    return {"cache_size": 8, "cache_batch": 8, "train": t, "data": {"image_size": 16}, "eval_per_category": 0,
            "sample_steps": 2, "caption_dropout": 0.0, **extra}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An exported tiny opensd model (word tokenizer trained on shapes captions) to fine-tune."""
    import dataclasses

    from helpers import randomize

    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.models.stable_diffusion import SDConfig, StableDiffusion

    captions = [s.caption for s in ShapesDataset(seed=0, image_size=16).take(300)]
    tok = WordTokenizer.train(captions, vocab_size=96, context_length=24)
    cfg = SDConfig.tiny()
    cfg = cfg.replace(image_size=16,
                      text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, max_length=tok.context_length))
    torch.manual_seed(0)
    model = randomize(StableDiffusion(cfg), 0).eval()
    return save_opensd(model, tok, tmp_path_factory.mktemp("tiny") / "model")


def test_fine_tuning_starts_from_the_model_and_lowers_the_grounding_loss(tmp_path: Path, tiny_model: Path) -> None:
    import opensd

    torch.set_num_threads(1)
    cfg = tiny_unet_cfg(tmp_path / "run", init_from=str(tiny_model), grounding_weight=1.0, grounding_pixel_weight=0.1)
    stage = UNetStage(stage_config_from_dict(UNetStageConfig, cfg))
    start = {}

    def remember(step: int, ctx) -> None:
        if step == 1:
            start.update({k: v.clone() for k, v in ctx.modules["unet"].unet.state_dict().items()})

    result = run_stage(stage, hooks=[remember])
    assert stage.ground_tokens is not None and (stage.ground_tokens[:, 0, :] >= 0).any(dim=1).all()
    rows = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "train"]
    assert all("grounding" in r and "grounding_pixel" in r and "diffusion" in r for r in rows)
    first, last = np.mean([r["grounding"] for r in rows[:3]]), np.mean([r["grounding"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    source = opensd.load(tiny_model).model.unet.state_dict()
    moved = max(float((start[k] - source[k]).abs().max()) for k in source)
    assert moved < 0.05  # one step of lr 3e-3 from the model's weights, not a fresh init
    pipe = opensd.load(result.export)
    assert pipe.txt2img("a red circle", steps=2, seed=0)[0].size == (16, 16)
    # The run's config.json records the architecture it trained, the starting model's.
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert recorded["model"] == to_dict(pipe.model.cfg.unet) != to_dict(stage.cfg.model)
    assert recorded["schedule"] == to_dict(pipe.model.cfg.schedule)


def test_grounding_and_init_from_config_errors(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ConfigError, match="grounding_weight"):
        stage_config_from_dict(UNetStageConfig, tiny_unet_cfg(tmp_path, grounding_weight=-1))
    with pytest.raises(ConfigError, match="grounding_pixel_weight"):
        stage_config_from_dict(UNetStageConfig, tiny_unet_cfg(tmp_path, grounding_pixel_weight="a lot"))
    with pytest.raises(ConfigError, match="grounding_pixel_target"):
        stage_config_from_dict(UNetStageConfig, tiny_unet_cfg(tmp_path, grounding_pixel_target="object"))
    with pytest.raises(ConfigError, match="only data.source = 'shapes'"):
        stage_config_from_dict(UNetStageConfig, {**tiny_unet_cfg(tmp_path, grounding_weight=0.1),
                                                 "data": {"source": "folder", "path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="leave vae_dir and clip_dir empty"):
        stage_config_from_dict(UNetStageConfig, tiny_unet_cfg(tmp_path, init_from=str(tiny_model), vae_dir="x"))
    for bad in (tmp_path / "missing", tmp_path):
        stage = UNetStage(stage_config_from_dict(UNetStageConfig, tiny_unet_cfg(tmp_path / "r", init_from=str(bad))))
        with pytest.raises(ConfigError, match="init_from"):
            run_stage(stage)
    wrong_size = tiny_unet_cfg(tmp_path / "r2", init_from=str(tiny_model))
    wrong_size["data"] = {"image_size": 32}
    with pytest.raises(ConfigError, match="data.image_size = 16"):
        run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, wrong_size)))


def test_a_resume_that_changes_the_losses_is_logged(tmp_path: Path, tiny_model: Path) -> None:
    torch.set_num_threads(1)
    cfg = tiny_unet_cfg(tmp_path / "run", init_from=str(tiny_model), grounding_weight=0.5)
    cfg["train"].update(steps=2, checkpoint_every=2)
    run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, cfg)))
    cfg["train"]["steps"] = 3
    cfg.update(grounding_pixel_weight=0.1, grounding_pixel_target="group")
    result = run_stage(UNetStage(stage_config_from_dict(UNetStageConfig, cfg)), resume=True)
    resumes = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "resume"]
    assert resumes == [{"step": 2, "kind": "resume", "changed": {
        "grounding_pixel_target": ["word", "group"], "grounding_pixel_weight": [0.0, 0.1]}}]


def test_targets_ground_a_word_split_into_pieces_at_its_first_piece() -> None:
    from opensd.tokenizers.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

    words = ["a", "photo", "of", "circle", "above", "red", "square", "cy", "##an"]
    tok = WordPieceTokenizer({t: i for i, t in enumerate([*SPECIAL_TOKENS, *words])}, 16)
    spec = PromptSpec((ObjectSpec("circle", "cyan"), ObjectSpec("square", "red")), relation="above")
    scene = realize(spec, random.Random(4), image_size=32)
    text = "a photo of a cyan circle above a red square"
    assert len(tok.encode(text)) == len(text.split()) + 1  # "cyan" is two pieces
    tokens, _ = grounding_targets(text, spec, scene, tok, (8, 8))
    framed = tok([text])[0]
    pieces = [[tok.decode([int(framed[p])]) for p in row if p >= 0] for row in tokens]
    assert pieces == [["cy", "circle"], ["red", "square"]]  # positions after the split word stay right
