"""The tiny decoder in use: txt2img with ``decoder="tiny"`` against diffusers'
StableDiffusionPipeline with an AutoencoderTiny as its VAE (identical random weights), the
TAESD live preview, the server's A1111 options and the CLI's ``--decoder`` / ``--tiny-vae``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import decode_png, randomize, tiny_clip_bundle, tiny_word_bundle
from PIL import Image
from typer.testing import CliRunner

import opensd
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.opensd_format import save_opensd
from opensd.checkpoints.taesd import TinyAutoencoderError, save_tiny_autoencoder
from opensd.cli.main import app as cli
from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from opensd.pipelines import RequestError
from opensd.pipelines.decoders import DecoderError, decode_tiny
from opensd.pipelines.images import to_pil
from opensd.pipelines.infotext import parse_infotext, read_png_parameters
from opensd.pipelines.preview import preview_image
from opensd.serving import create_app

SIZE = 32
TINY = TinyAutoencoderConfig.tiny()  # x2, as SDConfig.tiny()'s VAE


def tiny_autoencoder(seed: int = 0) -> TinyAutoencoder:
    torch.manual_seed(seed)
    return randomize(TinyAutoencoder(TINY), seed, scale=0.05).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An opensd model folder with a tiny autoencoder beside its weights."""
    model, tok = tiny_word_bundle(seed=5)
    path = save_opensd(model, tok, tmp_path_factory.mktemp("m") / "with-taesd")
    save_tiny_autoencoder(tiny_autoencoder(1), path)
    return path


def _np(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def test_tiny_decode_matches_diffusers_pipeline_with_autoencoder_tiny(tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny, DDIMScheduler, StableDiffusionPipeline

    from opensd.checkpoints.keymap_taesd import taesd_to_diffusers, to_diffusers_tiny_config

    model, tok = tiny_clip_bundle(seed=3)
    save_diffusers(model, tok, tmp_path / "d")
    tiny = tiny_autoencoder(2)
    ref = StableDiffusionPipeline.from_pretrained(tmp_path / "d", local_files_only=True)
    ref.vae = AutoencoderTiny(**to_diffusers_tiny_config(TINY)).eval()
    ref.vae.load_state_dict(taesd_to_diffusers(tiny.state_dict()))
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = opensd.load(tmp_path / "d", tiny_vae=tiny)
    lat = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))
    want = ref("a red circle", num_inference_steps=4, guidance_scale=7.5, height=SIZE, width=SIZE,
               latents=lat.clone(), output_type="np").images
    got = ours.txt2img("a red circle", steps=4, sampler="ddim", cfg_scale=7.5, latents=lat, decoder="tiny")
    full = ours.txt2img("a red circle", steps=4, sampler="ddim", cfg_scale=7.5, latents=lat)
    assert np.abs(_np(got) - want).max() <= 1e-3 + 0.5 / 255
    assert np.abs(_np(full) - want).max() > 0.05  # the full VAE draws something else: the tiny one really ran
    assert parse_infotext(got[0].info["parameters"])["VAE Decoder"] == "TAESD"  # A1111's field
    assert "VAE Decoder" not in parse_infotext(full[0].info["parameters"])


def test_the_model_folders_tiny_autoencoder_is_found_and_checked(folder: Path) -> None:
    pipe = opensd.load(folder)
    assert pipe.tiny_vae is not None and pipe.tiny_vae.cfg.stages == 1
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pipe.tiny_vae.decode(lat)
    assert torch.equal(pipe.decode_latents(lat, decoder="tiny"), want)
    assert torch.equal(decode_tiny(pipe.tiny_vae, lat), want)
    # A1111's label picks it too; a bad choice is a RequestError naming what is allowed
    assert "VAE Decoder: TAESD" in pipe.txt2img("a red circle", steps=1, seed=1, decoder="TAESD")[0].info["parameters"]
    with pytest.raises(RequestError, match="decoder must be 'full' or 'tiny'"):
        pipe.txt2img("a red circle", steps=1, decoder="small")
    # a tiny autoencoder of another downsampling does not fit this model
    with pytest.raises(TinyAutoencoderError, match="does not fit this model"):
        opensd.load(folder, tiny_vae=TinyAutoencoder(TinyAutoencoderConfig.shapes()))


def test_no_tiny_autoencoder_is_a_one_line_error_before_any_work() -> None:
    from opensd.checkpoints import LoadedModel
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    model, tok = tiny_word_bundle(seed=6)
    pipe = StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("nowhere"), "opensd", "0" * 10))
    assert pipe.tiny_vae is None
    calls = []
    with pytest.raises(DecoderError, match="needs a tiny autoencoder") as info:
        pipe.txt2img("a red circle", steps=2, decoder="tiny", callback=calls.append)
    assert "\n" not in str(info.value) and not calls


def test_taesd_preview_uses_the_tiny_decoder_and_falls_back_to_the_vae(folder: Path) -> None:
    pipe = opensd.load(folder)
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tiny = np.asarray(to_pil(pipe.tiny_vae.decode(lat))[0])
        full = np.asarray(to_pil(pipe.model.vae.decode(pipe.model.vae.from_latent(lat)))[0])
    assert np.array_equal(np.asarray(preview_image(pipe, lat, "TAESD")), tiny)
    assert np.array_equal(np.asarray(preview_image(pipe, lat, "Full")), full)
    bare = opensd.load(folder)
    bare.tiny_vae = None
    assert np.array_equal(np.asarray(preview_image(bare, lat, "TAESD")), full)


def test_server_options_decode_method_and_preview_format(folder: Path) -> None:
    from opensd.serving.queue import Job

    with TestClient(create_app(folder)) as client:
        options = client.get("/sdapi/v1/options").json()
        assert (options["show_progress_type"], options["sd_vae_decode_method"], options["live_previews_image_format"]) \
            == ("TAESD", "Full", "png")
        body = {"prompt": "a red circle", "steps": 2, "seed": 3}
        full = client.post("/sdapi/v1/txt2img", json=body).json()
        tiny = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_vae_decode_method": "TAESD"}}).json()
        assert "VAE Decoder: TAESD" in tiny["info"] and "VAE Decoder" not in full["info"]
        assert not np.array_equal(np.asarray(decode_png(full["images"][0])), np.asarray(decode_png(tiny["images"][0])))
        for key, value in (("sd_vae_decode_method", "Tiny"), ("live_previews_image_format", "gif")):
            r = client.post("/sdapi/v1/options", json={key: value})
            assert r.status_code == 422 and key in r.json()["detail"]
        assert client.post("/sdapi/v1/options", json={"sd_vae_decode_method": "TAESD"}).status_code == 200
        assert "VAE Decoder: TAESD" in client.post("/sdapi/v1/txt2img", json=body).json()["info"]
    job = Job("txt2img", pipeline=opensd.load(folder))
    job.denoised, job.step = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 1
    assert decode_png(job.preview_png("TAESD", "jpeg")).format == "JPEG"
    assert decode_png(job.preview_png("TAESD", "webp")).format == "WEBP"


def test_cli_decoder_and_tiny_vae(folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "tiny.png"
    res = runner.invoke(cli, ["generate", "a red circle", "-m", str(folder), "--steps", "2", "--seed", "1",
                              "--decoder", "tiny", "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert parse_infotext(read_png_parameters(out))["VAE Decoder"] == "TAESD"
    model, tok = tiny_word_bundle(seed=5)
    bare = save_opensd(model, tok, tmp_path / "bare")
    res = runner.invoke(cli, ["generate", "a red circle", "-m", str(bare), "--steps", "2", "--seed", "1", "--decoder", "tiny",
                              "-q", "-o", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "needs a tiny autoencoder" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, ["generate", "a red circle", "-m", str(bare), "--steps", "2", "--seed", "1", "--decoder", "tiny",
                              "-q", "--tiny-vae", str(folder), "-o", str(tmp_path / "y.png")])  # the folder's TAESD files
    assert res.exit_code == 0, res.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "y.png")))


class _PixelVAE(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself; ``tiny`` decodes it through ``colour``."""

    def __init__(self, colour: torch.Tensor | None = None) -> None:
        super().__init__()
        self.colour = torch.nn.Parameter(torch.eye(3) if colour is None else colour, requires_grad=False)
        self.cfg = SimpleNamespace(downsample_factor=1)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(mean=x)

    def to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.colour, z)


def test_eval_decoder_choice_reaches_the_ceiling_and_the_config() -> None:
    from opensd.shapes.ceiling import autoencoder_ceiling
    from opensd.shapes.run import EvalConfig, Suite

    pipe = SimpleNamespace(model=SimpleNamespace(vae=_PixelVAE(), cfg=SimpleNamespace(latent_size=32)),
                           cfg=SimpleNamespace(image_size=32), tiny_vae=_PixelVAE(torch.eye(3)[[2, 1, 0]]))  # the "tiny" one swaps red and blue
    cfg = dict(suite=Suite.CONCEPT, concept="purple-triangle", per_category=5)
    full = autoencoder_ceiling(pipe, EvalConfig(**cfg))
    tiny = autoencoder_ceiling(pipe, EvalConfig(**cfg, decoder="tiny"))
    assert full["overall"] == 1.0 and full["decoder"] == "full"
    assert tiny["accuracy"]["colors"] == 0.0 and tiny["decoder"] == "tiny"
    pipe.tiny_vae = None
    with pytest.raises(DecoderError, match="needs a tiny autoencoder"):
        autoencoder_ceiling(pipe, EvalConfig(**cfg, decoder="tiny"))
    with pytest.raises(DecoderError, match="decoder must be"):
        EvalConfig(decoder="small")


def test_the_default_models_tiny_decoder_keeps_95_percent_of_scenes() -> None:
    """Ground-truth benchmark renders (32 px) through the default model's VAE encoder and its
    tiny decoder (``decoder="tiny"``'s path): the scorer still judges >= 95% correct (the model
    card gives the measurement on all 1,000 scenes of both suites)."""
    from opensd.defaults import default_model_path
    from opensd.shapes.scorer import score_images
    from opensd.shapes.suites import benchmark_suite, ground_truth_images
    from opensd.training.data import pil_to_tensor, tensor_to_pil

    path = default_model_path()
    if path is None or not (Path(path) / "taesd_decoder.safetensors").is_file():
        pytest.skip("needs the default model with its tiny decoder (models/opensd-shapes)")
    pipe = opensd.load(path)
    prompts = benchmark_suite(per_category=25)
    x = torch.stack([pil_to_tensor(im) for im in ground_truth_images(prompts, size=pipe.cfg.image_size, seed=1)])
    vae = pipe.model.vae
    with torch.no_grad():
        latents = vae.to_latent(vae.encode(x).mode())
        rec = pipe.decode_latents(latents, decoder="tiny").clamp(-1, 1)
        assert not torch.allclose(rec, pipe.decode_latents(latents).clamp(-1, 1), atol=1e-3)  # not the VAE's decode
    scored = score_images([(im, p.spec) for im, p in zip(tensor_to_pil(rec), prompts, strict=True)])
    kept = sum(r["correct"] for r in scored["items"]) / len(scored["items"])
    assert kept >= 0.95, scored["accuracy"]
