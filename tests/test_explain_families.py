"""Explain, prompt arithmetic and batched eval for SD 2.x, SDXL and the refiner (tiny random models)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clip_tokenizer, randomize
from PIL import Image
from typer import Typer
from typer.testing import CliRunner

from opensd.checkpoints import LoadedModel
from opensd.explain import attention_for_image, denoising_path, explain, forward_noising, save_explanation
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.prompts import arithmetic as A
from opensd.tokenizers.clip_bpe import CLIPTokenizer

SIZE = 16
PROMPT = "a red circle above a xylophonist"  # "xylophonist" is 4 CLIP tokens
FAMILIES = [ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.SDXL_REFINER]
KW = dict(steps=2, sampler="euler", cfg_scale=3.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pipe(family: ModelFamily, seed: int = 3) -> StableDiffusionPipeline:
    """A tiny random model of ``family`` (16 px) with CLIP's vocabulary and the family's padding."""
    sd2_style = family in (ModelFamily.SD2, ModelFamily.SDXL_REFINER)  # OpenCLIP alone: pads with "!" (id 0)
    tok = CLIPTokenizer.from_open_clip(pad_token="!") if sd2_style else clip_tokenizer()
    cfg = SDConfig.tiny(family)

    def real_vocab(text):
        return dataclasses.replace(text, vocab_size=tok.vocab_size, max_length=tok.context_length)

    cfg = cfg.replace(image_size=SIZE, text=real_vocab(cfg.text), **({"text_2": real_vocab(cfg.text_2)} if cfg.text_2 else {}))
    torch.manual_seed(seed)
    model = randomize(StableDiffusion(cfg), seed, scale=0.2).eval()  # larger weights: images and maps that differ
    return StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0" * 10))


@pytest.fixture(scope="module")
def pipes() -> dict[ModelFamily, StableDiffusionPipeline]:
    return {f: tiny_pipe(f) for f in FAMILIES + [ModelFamily.SD1]}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class UNetCalls:
    """Records the keyword arguments (the conditioning) of every U-Net call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.unet = unet

    def __enter__(self) -> UNetCalls:
        self.handle = self.unet.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def _record(self, module, args, kwargs) -> None:
        named = {**dict(zip(("x", "t", "context", "y"), args, strict=False)), **kwargs}  # forward(x, t, context, y=None)
        self.calls.append({k: v.clone() for k, v in named.items() if v is not None})

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------- explain


@pytest.mark.parametrize("family", FAMILIES)
def test_explain_reads_every_word_of_every_family(pipes, family, tmp_path: Path) -> None:
    pipe = pipes[family]
    with UNetCalls(pipe.model.unet) as rec:
        ex = explain(pipe, PROMPT, seed=1, noise_steps=2, **KW)
    # the U-Net saw the family's conditioning: SDXL's context is both encoders' widths, and y
    assert {c["context"].shape[-1] for c in rec.calls} == {pipe.cfg.context_dim}
    assert all(("y" in c) == (family is not ModelFamily.SD2) for c in rec.calls)
    a = ex.attention
    assert a.words == ["a", "red", "circle", "above", "a", "xylophonist"]
    assert a.per_token_maps.shape == (77, SIZE // 2, SIZE // 2) and a.maps.shape == (6, SIZE, SIZE)
    torch.testing.assert_close(a.per_token_maps.sum(0), torch.ones(SIZE // 2, SIZE // 2), rtol=0, atol=1e-5)
    assert a.tokens[:3] == ["<bos>", "a", "red"] and a.tokens[10:12] == ["<eos>", "<pad>"]
    # explain's image is the pipeline's for the same request (up to explicit-attention rounding)
    plain = pipe.generate(pipe.request(PROMPT, seed=1, **KW)).images[0]
    assert np.abs(pixels(plain) - pixels(a.image)).max() <= 1
    assert len(ex.path.steps) == 2 and ex.path.latents.shape == (2, 4, SIZE // 2, SIZE // 2)
    assert len(ex.noising.images) == 3
    paths = save_explanation(ex, tmp_path / "ex")
    assert all(p.is_file() for p in paths.values())


def test_word_positions_are_the_same_tokens_in_every_family(pipes) -> None:
    """SDXL concatenates its encoders on the width, not the length: a word's context
    positions are its tokens' positions, as in SD 1.x."""
    got = {f: explain(p, PROMPT, seed=0, noise_steps=1, **KW).attention for f, p in pipes.items()}
    reference = got[ModelFamily.SD1].token_words
    assert reference[:11].tolist() == [-1, 0, 1, 2, 3, 4, 5, 5, 5, 5, -1]
    for family, res in got.items():
        assert torch.equal(res.token_words, reference), family
        # the word map is its tokens' maps summed (at latent size, before upsampling)
        torch.testing.assert_close(res.per_token_maps[6:10].sum(0).sum(), res.maps[5].sum() / 4, rtol=1e-4, atol=1e-6)
    # the maps are read from the model, not made up: different families' random models look elsewhere
    assert not torch.allclose(got[ModelFamily.SDXL].per_token_maps, got[ModelFamily.SD2].per_token_maps)


def test_denoising_path_and_attention_on_an_image_for_sdxl(pipes) -> None:
    pipe = pipes[ModelFamily.SDXL]
    path = denoising_path(pipe, PROMPT, at=[1, 2], seed=2, **KW)
    assert np.array_equal(pixels(path.image), pixels(pipe.txt2img(PROMPT, seed=2, **KW)[0]))
    noising = forward_noising(pipe, path.image, 2, seed=0)
    assert noising.latents.shape == (3, 4, SIZE // 2, SIZE // 2)
    with UNetCalls(pipe.model.unet) as rec:
        res = attention_for_image(pipe, path.image, PROMPT, timesteps=[100, 700])
    assert len(rec.calls) == 2 and all(c["y"].shape == (1, pipe.cfg.adm_channels) for c in rec.calls)
    cond, _ = pipe.conditioner.for_request(pipe.request(PROMPT, cfg_scale=1.0))
    assert all(torch.equal(c["y"], cond["y"]) and torch.equal(c["context"], cond["context"]) for c in rec.calls)
    assert res.maps.shape == (6, SIZE, SIZE)


def test_cli_explain_and_interpolate_load_an_sdxl_folder(pipes, tmp_path: Path) -> None:
    from opensd.checkpoints.opensd_format import save_opensd
    from opensd.cli.explain import register

    pipe = pipes[ModelFamily.SDXL]
    app = Typer()
    register(app)
    model_dir = save_opensd(pipe.model, pipe.tokenizer, tmp_path / "m")
    runner = CliRunner()
    res = runner.invoke(app, ["explain", "a (red:1.2) circle", "-m", str(model_dir), "--steps", "2", "--sampler", "euler",
                              "--noise-steps", "2", "--quiet", "-o", str(tmp_path / "ex")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ex" / "attention.png").is_file() and (tmp_path / "ex" / "path.gif").is_file()
    res = runner.invoke(app, ["interpolate", "a red circle", "--to", '"a blue square" + 0.5 * "red"', "--frames", "2",
                              "--steps", "1", "--sampler", "euler", "--quiet", "-m", str(model_dir), "-o", str(tmp_path / "ip")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ip" / "frame-001.png").is_file()


# ----------------------------------------------------------------------------- prompt arithmetic


def test_sdxl_arithmetic_sums_the_context_and_the_pooled_embedding(pipes) -> None:
    pipe = pipes[ModelFamily.SDXL]
    got = A.combine(pipe, '"a red circle" - "red" + 0.5 * "blue"')
    assert set(got) == {"context", "pooled"}
    e = {p: pipe.conditioner.encode([p]) for p in ("a red circle", "red", "blue")}
    torch.testing.assert_close(got["context"], e["a red circle"].context - e["red"].context + 0.5 * e["blue"].context)
    torch.testing.assert_close(got["pooled"], e["a red circle"].pooled - e["red"].pooled + 0.5 * e["blue"].pooled)
    assert got["context"].shape == (1, 77, pipe.cfg.context_dim) and got["pooled"].shape == (1, pipe.cfg.pooled_dim)
    # one term is the prompt itself: the same image as txt2img
    one = A.generate_expression(pipe, '"a red circle"', seed=5, **KW)[0]
    assert np.array_equal(pixels(one), pixels(pipe.txt2img("a red circle", seed=5, **KW)[0]))
    # the pooled part takes part: changing only it changes the image
    swapped = {"context": got["context"], "pooled": e["blue"].pooled}
    a = A.txt2img_embeds(pipe, got, seed=5, **KW)[0]
    b = A.txt2img_embeds(pipe, swapped, seed=5, **KW)[0]
    assert np.abs(pixels(a) - pixels(b)).max() > 0
    # a long term: the contexts are padded with empty-prompt chunks, the pooled vectors are not
    long = A.combine(pipe, [(1.0, "red " * 80), (1.0, "blue")])
    assert long["context"].shape[1] == 154 and long["pooled"].shape == (1, pipe.cfg.pooled_dim)
    torch.testing.assert_close(long["context"][:, 77:], pipe.conditioner.encode(["red " * 80]).context[:, 77:]
                               + pipe.conditioner.encode([""]).context)


@pytest.mark.parametrize("family", [ModelFamily.SD2, ModelFamily.SDXL_REFINER])
def test_arithmetic_gives_what_the_family_conditions_on(pipes, family) -> None:
    pipe = pipes[family]
    mix = A.blend(pipe, ["red", "blue"], [1.0, 3.0])
    red, blue = pipe.conditioner.encode(["red"]), pipe.conditioner.encode(["blue"])
    if family is ModelFamily.SD2:
        assert isinstance(mix, torch.Tensor)  # SD 2.x conditions on the context alone
        torch.testing.assert_close(mix, 0.25 * red.context + 0.75 * blue.context)
    else:
        torch.testing.assert_close(mix["pooled"], 0.25 * red.pooled + 0.75 * blue.pooled)
    assert A.generate_expression(pipe, '"red" + "blue"', normalize=True, seed=0, **KW)[0].size == (SIZE, SIZE)


def test_sdxl_prompt_interpolation_lerps_both_parts_from_one_prompt_to_the_other(pipes) -> None:
    pipe = pipes[ModelFamily.SDXL]
    frames = A.interpolate(pipe, "a red circle", "a blue square", seed=7, frames=3, **KW)
    first, last = (pipe.txt2img(p, seed=7, **KW)[0] for p in ("a red circle", "a blue square"))
    assert np.array_equal(pixels(frames[0]), pixels(first))
    assert np.abs(pixels(frames[-1]) - pixels(last)).max() <= 1  # a + (b - a) * 1 is b up to float rounding
    assert np.abs(pixels(frames[1]) - pixels(first)).max() > 0 and np.abs(pixels(frames[1]) - pixels(last)).max() > 0
    a, b = A.combine(pipe, "a red circle"), A.combine(pipe, "a blue square")
    mid = A.lerp(a, b, 0.25)
    torch.testing.assert_close(mid["pooled"], 0.75 * a["pooled"] + 0.25 * b["pooled"])
    with pytest.raises(A.OpenSDError, match="same parts"):
        A.lerp(a, a["context"], 0.5)


# ----------------------------------------------------------------------------- eval


def test_sdxl_prompts_sharing_an_eval_batch_give_the_images_each_gets_alone(pipes) -> None:
    from opensd.shapes.run import EvalConfig, _generate, _text_embeds, select_prompts

    pipe = pipes[ModelFamily.SDXL]
    assert set(_text_embeds(pipe, "a red circle")) == {"context", "pooled"}
    for negative in ("", "a green triangle"):
        cfg = EvalConfig(per_category=1, images_per_prompt=2, steps=2, sampler="euler", cfg_scale=3.0, batch_size=8,
                         negative_prompt=negative)
        chunk = list(enumerate(select_prompts(cfg)[:3]))
        together = _generate(pipe, cfg, chunk)
        alone = [_generate(pipe, cfg, [item])[0] for item in chunk]
        assert [len(x) for x in together] == [2, 2, 2]
        for a, b in zip(together, alone, strict=True):
            for x, y in zip(a, b, strict=True):
                assert np.abs(pixels(x) - pixels(y)).max() <= 1  # equal up to float rounding in batched kernels
        assert np.abs(pixels(together[0][0]) - pixels(together[1][0])).max() > 0  # each prompt its own image
