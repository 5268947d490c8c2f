"""Textual inversion against diffusers: the same random embedding, written in A1111's and
diffusers' formats, named in the prompt and the negative prompt, gives the same images
as diffusers' ``load_textual_inversion`` on the same tiny random SD 1.x and SDXL models
(real CLIP vocabulary, <= 1e-3 on pixels plus 8-bit rounding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_clip_bundle, tiny_family_model
from PIL import Image
from safetensors.torch import save_file

import opensd
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines.embedding_library import EmbeddingLibrary

NAME = "xqzemb"  # no CLIP token: diffusers refuses a token already in the vocabulary
PROMPT = f"a photo of {NAME} above a blue square"
NEGATIVE = f"blurry, {NAME}"
SIZE = 32
TOL = 1e-3 + 0.5 / 255  # ours are 8-bit PNGs, diffusers' floats in [0, 1]


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


def _np(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def _latents(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


def _euler(pipe) -> None:
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)


def _write(fmt: str, folder: Path, vec: torch.Tensor) -> Path:
    """``vec`` (n, D) as one of the formats a user finds: A1111's .pt and .safetensors, diffusers' learned_embeds."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "a1111.pt":
        path = folder / f"{NAME}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": NAME, "step": 10,
                    "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    elif fmt == "a1111.safetensors":
        path = folder / f"{NAME}.safetensors"
        save_file({"emb_params": vec}, str(path))
    elif fmt == "diffusers.safetensors":
        path = folder / f"{NAME}.safetensors"
        save_file({NAME: vec}, str(path))
    else:
        assert fmt == "diffusers.bin" and vec.shape[0] == 1
        path = folder / f"{NAME}.bin"
        torch.save({NAME: vec[0]}, path)  # diffusers' learned_embeds.bin of one vector: (D,)
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    model, tok = tiny_clip_bundle(seed=7)
    path = save_diffusers(model, tok, tmp_path_factory.mktemp("sd1") / "diffusers")
    ref = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None)
    _euler(ref)
    return opensd.load(path), ref


@pytest.mark.parametrize("fmt, n", [("a1111.pt", 3), ("a1111.safetensors", 2), ("diffusers.safetensors", 4),
                                    ("diffusers.bin", 1)])
def test_sd1_embedding_matches_diffusers(sd1, tmp_path: Path, fmt: str, n: int) -> None:
    ours, ref = sd1
    width = ours.model.text_encoder.cfg.width
    vec = torch.randn(n, width, generator=torch.Generator().manual_seed(n))
    path = _write(fmt, tmp_path / "embeddings", vec)
    lat = _latents(n)
    kw = dict(steps=6, sampler="euler", cfg_scale=7.5, width=SIZE, height=SIZE, latents=lat)
    networks = EmbeddingLibrary(path.parent).networks_for_prompts(ours.model, PROMPT, NEGATIVE)
    assert list(networks.embeddings) == [NAME] and networks.embeddings[NAME].count == n
    got = ours.txt2img(PROMPT, NEGATIVE, networks=networks, **kw)
    ref.load_textual_inversion(str(path), token=NAME)
    try:
        want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=SIZE,
                   width=SIZE, latents=lat.clone(), output_type="np").images
    finally:
        ref.unload_textual_inversion()  # every token it added (the multi-vector ones too)
    assert np.abs(_np(got) - want).max() <= TOL
    plain = ours.txt2img(PROMPT, NEGATIVE, **kw)  # the name read as words
    assert np.abs(_np(plain) - _np(got)).max() > 4 / 255  # the embedding did change the image


def test_sdxl_embedding_matches_diffusers_with_both_encoders(tmp_path: Path) -> None:
    """An SDXL file (clip_l, clip_g): diffusers loads each half into its encoder and tokenizer."""
    from diffusers import StableDiffusionXLPipeline

    model, tok = tiny_family_model(ModelFamily.SDXL, seed=11)
    folder = save_diffusers(model, tok, tmp_path / "xl")
    ours = opensd.load(folder)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
    _euler(ref)
    w_l, w_g = (e.cfg.width for e in ours.model.text_encoders)
    g = torch.Generator().manual_seed(3)
    state = {"clip_l": torch.randn(2, w_l, generator=g), "clip_g": torch.randn(2, w_g, generator=g)}
    (tmp_path / "embeddings").mkdir()
    save_file(state, str(tmp_path / "embeddings" / f"{NAME}.safetensors"))
    lat = _latents(5)
    kw = dict(steps=6, sampler="euler", cfg_scale=6.0, width=SIZE, height=SIZE, latents=lat)
    networks = EmbeddingLibrary(tmp_path / "embeddings").networks_for_prompts(ours.model, PROMPT, NEGATIVE)
    got = ours.txt2img(PROMPT, NEGATIVE, networks=networks, **kw)
    ref.load_textual_inversion(state["clip_l"], token=NAME, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token=NAME, text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=6.0, height=SIZE, width=SIZE,
               latents=lat.clone(), output_type="np").images
    assert np.abs(_np(got) - want).max() <= TOL
    plain = ours.txt2img(PROMPT, NEGATIVE, **kw)
    assert np.abs(_np(plain) - _np(got)).max() > 4 / 255
