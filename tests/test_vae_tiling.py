"""Tiled VAE decoding and encoding: exact blending on local decoders, closeness on a real (tiny,
random) AutoencoderKL, argument checks, and the pipeline / CLI option."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomize, tiny_word_bundle
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from opensd.checkpoints import LoadedModel
from opensd.checkpoints.opensd_format import save_opensd
from opensd.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig
from opensd.pipelines.request import RequestError
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.pipelines.vae_tiling import TilingError, decode_tiled, encode_tiled, should_tile, tile_starts


class PointwiseVAE(nn.Module):
    """A perfectly local decoder: 1x1 conv, then nearest upsampling by f. Tiling it is exact."""

    def __init__(self, c: int = 4, f: int = 4):
        super().__init__()
        self.cfg = SimpleNamespace(embed_dim=c, downsample_factor=f)
        self.proj = nn.Conv2d(c, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.proj(z), scale_factor=self.cfg.downsample_factor, mode="nearest")


class PointwiseEncoderVAE(PointwiseVAE):
    """A perfectly local encoder: average-pool by f, then a 1x1 conv to the moments. Tiling it is exact."""

    def __init__(self, c: int = 4, f: int = 4):
        super().__init__(c, f)
        self.enc = nn.Conv2d(3, 2 * c, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.enc(F.avg_pool2d(x, self.cfg.downsample_factor)))


class TileMeanVAE(PointwiseVAE):
    """Decodes each input to its spatial mean colour: as non-local as GroupNorm statistics,
    so neighbouring tiles disagree and only the blend can hide the seam."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.cfg.downsample_factor
        m = self.proj(z).mean(dim=(2, 3), keepdim=True)  # (B, 3, 1, 1)
        return m.expand(-1, -1, z.shape[2] * f, z.shape[3] * f)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return randomize(AutoencoderKL(VAEConfig.tiny()), 0).eval()


def test_tile_starts_cover_and_end_at_the_border() -> None:
    assert tile_starts(10, 16, 4) == [0]
    assert tile_starts(16, 16, 4) == [0]
    assert tile_starts(24, 16, 8) == [0, 8]
    assert tile_starts(30, 12, 4) == [0, 8, 16, 18]  # last moved back to end at 30
    assert tile_starts(24, 12, 0) == [0, 12]


@pytest.mark.parametrize("h, w, tile, overlap", [(24, 24, 12, 4), (17, 30, 8, 3), (9, 40, 9, 0), (20, 13, 5, 4), (6, 25, 1, 0)])
def test_blending_is_exact_for_a_local_decoder(h: int, w: int, tile: int, overlap: int) -> None:
    torch.manual_seed(1)
    fake = PointwiseVAE()
    z = torch.randn(2, 4, h, w)
    with torch.no_grad():
        torch.testing.assert_close(decode_tiled(fake, z, tile, overlap), fake.decode(z), rtol=0, atol=1e-6)
        const = torch.full((1, 4, h, w), 0.3)
        out = decode_tiled(fake, const, tile, overlap)
    colour = out[:, :, :1, :1]
    assert out.shape == (1, 3, h * 4, w * 4)
    assert (out - colour).abs().max() < 1e-6  # a constant latent stays exactly constant


def test_seams_between_disagreeing_tiles_are_linear_ramps() -> None:
    torch.manual_seed(2)
    fake, f, tile, overlap = TileMeanVAE(f=2), 2, 8, 4
    # A latent that brightens to the right plus noise: starts [0, 4, 8, 12] along w give
    # four tiles of four different colours.
    z = torch.arange(20.0).expand(1, 4, 8, 20) * 0.5 + torch.randn(1, 4, 8, 20)
    with torch.no_grad():
        fake.proj.weight.fill_(0.25)  # colour = the channel mean: the tiles' means differ by ~2
        out = decode_tiled(fake, z, tile, overlap)
        colours = torch.stack([fake.decode(z[:, :, :, s : s + tile])[0, :, 0, 0] for s in tile_starts(20, tile, overlap)])
    biggest = (colours[1:] - colours[:-1]).abs().max()
    assert biggest > 0.5  # the tiles really disagree
    jump = (out[..., 1:] - out[..., :-1]).abs().max()
    # Each seam fades over overlap * f = 8 px: no step larger than the largest tile
    # difference spread over the ramp (without blending it would be `biggest` itself).
    assert jump <= biggest / (overlap * f) + 1e-5
    assert (out[..., 1:, :] - out[..., :-1, :]).abs().max() < 1e-6  # one tile row: nothing varies down


def test_one_tile_equals_the_full_decode_exactly(vae: AutoencoderKL) -> None:
    z = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(decode_tiled(vae, z, tile=12, overlap=4), vae.decode(z))
        assert torch.equal(decode_tiled(vae, z), vae.decode(z))  # default 64-cell tiles


def test_2x2_tiles_are_close_to_the_full_decode(vae: AutoencoderKL) -> None:
    g = torch.Generator().manual_seed(4)
    z, other = torch.randn(2, 4, 24, 24, generator=g), torch.randn(2, 4, 24, 24, generator=g)
    with torch.no_grad():
        full, wrong = vae.decode(z), vae.decode(other)
        tiled = decode_tiled(vae, z, tile=16, overlap=8)  # starts [0, 8] on each axis: 2 x 2 tiles
        butted = decode_tiled(vae, z, tile=12, overlap=0)  # 2 x 2 tiles that only touch
        faded = decode_tiled(vae, z, tile=12, overlap=6)  # 3 x 3 tiles, 6-cell overlaps
    err, scale = (tiled - full).abs(), (wrong - full).abs()
    # A random VAE's per-tile GroupNorm/attention statistics differ from the full image's
    # (a trained VAE differs less); measured 0.13 of the mean and 0.22 of the max
    # difference to a decode of another latent. Bounds with some margin, far below 1.
    assert err.mean() < 0.2 * scale.mean()
    assert err.max() < 0.3 * scale.max()
    # The overlap is what keeps the error down: touching tiles are much worse at the seams.
    assert (faded - full).abs().max() < 0.5 * (butted - full).abs().max()
    assert (faded - full).abs().mean() < (butted - full).abs().mean()


@pytest.mark.parametrize("h, w, tile, overlap", [(24, 24, 12, 4), (17, 30, 8, 3), (6, 25, 1, 0)])
def test_encode_blending_is_exact_for_a_local_encoder(h: int, w: int, tile: int, overlap: int) -> None:
    torch.manual_seed(5)
    fake = PointwiseEncoderVAE()
    x = torch.rand(2, 3, h * 4, w * 4) * 2 - 1
    with torch.no_grad():
        tiled, full = encode_tiled(fake, x, tile, overlap), fake.encode(x)
    assert isinstance(tiled, DiagonalGaussian) and tiled.mean.shape == (2, 4, h, w)
    torch.testing.assert_close(tiled.moments, full.moments, rtol=0, atol=1e-6)


def test_encode_one_tile_equals_the_full_encode_exactly(vae: AutoencoderKL) -> None:
    f = vae.cfg.downsample_factor
    x = torch.rand(2, 3, 12 * f, 10 * f, generator=torch.Generator().manual_seed(6)) * 2 - 1  # 12 x 10 cells
    with torch.no_grad():
        assert torch.equal(encode_tiled(vae, x, tile=12, overlap=4).moments, vae.encode(x).moments)
        assert torch.equal(encode_tiled(vae, x).moments, vae.encode(x).moments)


def test_encode_tiles_are_close_to_the_full_encode_on_the_default_vae() -> None:
    """A trained VAE (the default model's, 4x, trained at 32 px) on a 128 px mosaic of 16
    shapes-world scenes (32 x 32 latent cells). Measured 2026-11-26: decoding the tiled
    posterior's mean differs from decoding the full one's by 0.71/255 on average (16-cell
    tiles, overlap 8), 1.65/255 (8-cell tiles, overlap 4) and 2.63/255 (8-cell tiles that
    only touch); the round trip's error is 10.7/255 either way."""
    from opensd.checkpoints import load_model
    from opensd.defaults import default_model_path
    from opensd.shapes.dataset import ShapesDataset

    vae = load_model(default_model_path()).model.vae
    ds = ShapesDataset(5, 32)
    scenes = [torch.from_numpy(np.array(ds[i].image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1 for i in range(16)]
    x = torch.cat([torch.cat(scenes[r * 4 : r * 4 + 4], dim=2) for r in range(4)], dim=1)[None]  # (1, 3, 128, 128)
    with torch.no_grad():
        full = vae.decode(vae.encode(x).mean)
        err = {(t, o): float((vae.decode(encode_tiled(vae, x, t, o).mean) - full).abs().mean()) * 127.5
               for t, o in ((16, 8), (8, 4), (8, 0))}
    assert err[16, 8] < 2.0  # of 255
    assert err[8, 4] < 4.0
    assert err[16, 8] < err[8, 4] < err[8, 0]  # larger tiles, and overlap, bring it closer


def test_encode_bad_input_raises(vae: AutoencoderKL) -> None:
    with pytest.raises(TilingError, match=r"x must be a \(B, C, H, W\) image with H and W multiples of 2"):
        encode_tiled(vae, torch.zeros(1, 3, 31, 32))
    with pytest.raises(TilingError, match=r"x must be a \(B, C, H, W\) image"):
        encode_tiled(vae, "image")
    with pytest.raises(TilingError, match=r"encode_tiled: overlap must be in"):
        encode_tiled(vae, torch.zeros(1, 3, 32, 32), tile=4, overlap=4)


@pytest.mark.parametrize("kw, message", [
    ({"tile": 0}, "tile must be >= 1"),
    ({"tile": 8, "overlap": 8}, "overlap must be in [0, tile)"),
    ({"tile": 8, "overlap": -1}, "overlap must be in [0, tile)"),
    ({"tile": 8.0}, "tile must be an integer"),
    ({"overlap": True}, "overlap must be an integer"),
])
def test_bad_arguments_raise(vae: AutoencoderKL, kw: dict, message: str) -> None:
    with pytest.raises(TilingError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        decode_tiled(vae, torch.zeros(1, 4, 8, 8), **kw)


@pytest.mark.parametrize("z", [torch.zeros(1, 3, 8, 8), torch.zeros(4, 8, 8), "latent"])
def test_bad_latent_raises(vae: AutoencoderKL, z) -> None:
    with pytest.raises(TilingError, match=r"z must be a \(B, 4, h, w\) latent"):
        decode_tiled(vae, z)
    assert issubclass(TilingError, ValueError)


def test_automatic_rule() -> None:
    assert not should_tile(96, 96, None) and should_tile(97, 10, None) and should_tile(10, 97, None)
    assert should_tile(8, 8, True) and not should_tile(200, 200, False)


# ---------------------------------------------------------------- pipeline and CLI


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    model, tok = tiny_word_bundle(seed=3)
    return StableDiffusionPipeline(LoadedModel(model, tok, "tiny", Path("."), "opensd", "0" * 10))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def test_pipeline_option_same_image_when_one_tile(pipe: StableDiffusionPipeline) -> None:
    kw = dict(steps=2, seed=5, cfg_scale=1.0, batch_size=2)
    plain = _pixels(pipe.txt2img("a red circle", **kw))
    forced = _pixels(pipe.txt2img("a red circle", tiled_vae=True, **kw))  # 16x16 latent: one tile
    auto = _pixels(pipe.txt2img("a red circle", tiled_vae=None, **kw))
    assert np.array_equal(plain, forced) and np.array_equal(plain, auto)
    image = pipe.img2img(pipe.txt2img("x", steps=1, seed=1)[0], "a red circle", strength=0.5, steps=2, seed=2, tiled_vae=True)
    assert image[0].size == (32, 32)


def test_pipeline_option_tiles_a_multi_tile_size(pipe: StableDiffusionPipeline) -> None:
    kw = dict(steps=1, seed=6, cfg_scale=1.0, width=144, height=32)  # latent 16 x 72: two 64-cell tiles
    tiled = _pixels(pipe.txt2img("a red circle", tiled_vae=True, **kw))
    plain = _pixels(pipe.txt2img("a red circle", tiled_vae=False, **kw))
    assert tiled.shape == plain.shape == (1, 32, 144, 3)
    assert not np.array_equal(tiled, plain)  # really tiled: per-tile statistics change a little
    assert np.abs(tiled - plain).mean() < 3  # of 255 (measured 0.7; another seed: 66): the same picture


def test_img2img_encodes_in_tiles_when_asked(pipe: StableDiffusionPipeline) -> None:
    init = pipe.txt2img("a red circle", steps=1, seed=8, width=144, height=32)[0]  # latent 16 x 72: two tiles
    kw = dict(strength=0.6, steps=2, seed=9, cfg_scale=1.0)
    tiled = _pixels(pipe.img2img(init, "a red circle", tiled_vae=True, **kw))
    plain = _pixels(pipe.img2img(init, "a red circle", tiled_vae=False, **kw))
    assert tiled.shape == plain.shape == (1, 32, 144, 3)
    assert not np.array_equal(tiled, plain)
    assert np.abs(tiled - plain).mean() < 5  # of 255: the same picture
    seen = []
    real = pipe.model.vae.encode
    pipe.model.vae.encode = lambda x: (seen.append(tuple(x.shape)), real(x))[1]
    try:
        pipe.img2img(init, "a red circle", tiled_vae=True, **kw)
        pipe.inpaint(init, Image.new("L", init.size, 255), "a red circle", tiled_vae=True, **kw)
    finally:
        del pipe.model.vae.encode
    f = pipe.model.vae.cfg.downsample_factor
    assert seen and all(shape[2:] == (16 * f, 64 * f) for shape in seen)  # every encode saw one 16 x 64-cell tile


def test_pipeline_rejects_a_bad_option(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(RequestError, match="tiled_vae must be true, false or None"):
        pipe.txt2img("a red circle", steps=1, tiled_vae="yes")


def test_cli_flags(tmp_path: Path) -> None:
    from opensd.cli.main import app

    model, tok = tiny_word_bundle(seed=3)
    model_dir = save_opensd(model, tok, tmp_path / "tiny")
    runner = CliRunner()
    outs = []
    for flag in ("--tiled-vae", "--no-tiled-vae"):
        out = tmp_path / f"{flag}.png"
        res = runner.invoke(app, ["generate", "a red circle", "-m", str(model_dir), "--steps", "1", "--seed", "7", "-o", str(out), "-q", flag])
        assert res.exit_code == 0, res.output
        outs.append(_pixels([Image.open(out).convert("RGB")]))
    assert np.array_equal(*outs)  # 32 px: one tile either way
