"""TAESD: parity with diffusers' AutoencoderTiny on random weights, the key map, and loading
every layout strictly (original .pth / .safetensors halves, a folder of them, a diffusers folder)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import randomize
from safetensors.torch import save_file

from opensd.checkpoints.io import CheckpointError
from opensd.checkpoints.keymap_taesd import (
    diffusers_to_taesd,
    from_diffusers_tiny_config,
    taesd_to_diffusers,
    to_diffusers_tiny_config,
)
from opensd.checkpoints.taesd import (
    TinyAutoencoderError,
    load_tiny_autoencoder,
    part_config,
    save_tiny_autoencoder,
    tiny_autoencoder_beside,
)
from opensd.config import ConfigError
from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderTiny  # noqa: E402

CONFIGS = {
    "sd": TinyAutoencoderConfig.sd(),  # TAESD / TAESDXL: x8, width 64, 3 blocks
    "shapes": TinyAutoencoderConfig.shapes(),  # the default model's: x4, width 32
    "narrow": TinyAutoencoderConfig(latent_channels=16, stages=2, width=16, blocks=2),  # SD3/FLUX-like channels
}


def pair(cfg: TinyAutoencoderConfig, seed: int = 0) -> tuple[TinyAutoencoder, AutoencoderTiny]:
    torch.manual_seed(seed)
    ours = randomize(TinyAutoencoder(cfg), seed, scale=0.02).eval()
    ref = AutoencoderTiny(**to_diffusers_tiny_config(cfg)).eval()
    ref.load_state_dict(taesd_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 1e-2, "degenerate reference"
    assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_and_forward_match_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    ours, ref = pair(cfg)
    f = cfg.downsample_factor
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 2 * f, 3 * f, generator=g) * 2 - 1  # H != W catches transposes
    z = torch.randn(2, cfg.latent_channels, 2, 3, generator=g) * 2
    with torch.no_grad():
        assert_close(ours.encode(x), ref.encode(x).latents)
        assert_close(ours.decode(z), ref.decode(z).sample)
        assert_close(ours(x), ref(x).sample)  # the 8-bit latent round trip
        assert_close(ours.scale_latents(z), ref.scale_latents(z))
        assert_close(ours.unscale_latents(ours.scale_latents(z)), ref.unscale_latents(ref.scale_latents(z)))


def test_latent_conventions_are_diffusers_pipelines() -> None:
    """What a diffusers pipeline hands AutoencoderTiny.decode: ``latents / scaling_factor +
    shift_factor`` (SD3/FLUX pipelines; SD's and SDXL's TAESD have 1 and 0, so the
    diffusion latent as it is). ``from_latent`` must compute exactly that from the config."""
    for scale, shift in ((1.0, 0.0), (1.5305, 0.0609)):
        cfg = dataclasses.replace(CONFIGS["narrow"], scaling_factor=scale, shift_factor=shift)
        ours, ref = pair(cfg, seed=2)
        assert ref.config.scaling_factor == scale and ref.config.shift_factor == shift
        latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = ref.decode(latent / ref.config.scaling_factor + ref.config.shift_factor).sample
            assert_close(ours.decode(ours.from_latent(latent)), want)
            assert torch.allclose(ours.to_latent(ours.from_latent(latent)), latent, atol=1e-6)
    assert TinyAutoencoderConfig.sd().scaling_factor == 1.0 == TinyAutoencoderConfig.sdxl().scaling_factor


def test_key_map_round_trips_and_shifts_only_the_decoder() -> None:
    ours, ref = pair(CONFIGS["sd"])
    own = ours.state_dict()
    mapped = taesd_to_diffusers(own)
    assert set(mapped) == set(ref.state_dict())
    assert "decoder.layers.0.weight" in mapped and "decoder.1.weight" in ours.state_dict()  # the clamp is index 0
    assert "encoder.layers.0.weight" in mapped and "encoder.0.weight" in ours.state_dict()
    back = diffusers_to_taesd(mapped)
    assert set(back) == set(own) and all(back[k] is v for k, v in own.items())
    assert from_diffusers_tiny_config(dict(ref.config)) == dataclasses.replace(CONFIGS["sd"])
    assert sum(p.numel() for p in ours.decoder.parameters()) == 1_222_531  # TAESD's published size


def _halves(tiny: TinyAutoencoder, folder: Path, suffix: str, stem: str = "taesd") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("encoder", "decoder"):
        state = getattr(tiny, part).state_dict()
        path = folder / f"{stem}_{part}{suffix}"
        torch.save(state, path) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, path)


def _same(a: TinyAutoencoder, b: TinyAutoencoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_files_load_strictly_alone_and_as_a_folder(tmp_path: Path, suffix: str) -> None:
    ours, _ = pair(CONFIGS["shapes"])
    _halves(ours, tmp_path, suffix)
    both = load_tiny_autoencoder(tmp_path)
    assert both.cfg == CONFIGS["shapes"]
    _same(both, ours)
    dec = load_tiny_autoencoder(tmp_path / f"taesd_decoder{suffix}")
    assert dec.encoder is None and dec.cfg.decoder and dec.cfg.stages == 2 and dec.cfg.width == 32
    enc = load_tiny_autoencoder(tmp_path / f"taesd_encoder{suffix}")
    assert enc.decoder is None and enc.cfg.encoder
    with pytest.raises(ValueError, match="no encoder"):
        dec.encode(torch.zeros(1, 3, 8, 8))


def test_sd_sized_file_is_recognised_from_its_keys(tmp_path: Path) -> None:
    ours, _ = pair(CONFIGS["sd"])
    torch.save(ours.decoder.state_dict(), tmp_path / "x.pth")  # a name that says nothing
    part, cfg = part_config(torch.load(tmp_path / "x.pth", weights_only=True), "x")
    assert part == "decoder" and (cfg.stages, cfg.width, cfg.blocks, cfg.latent_channels) == (3, 64, 3, 4)
    loaded = load_tiny_autoencoder(tmp_path / "x.pth")
    assert loaded.encoder is None
    assert all(torch.equal(loaded.decoder.state_dict()[k], v) for k, v in ours.decoder.state_dict().items())


def test_diffusers_folder_loads_with_its_scale_and_shift(tmp_path: Path) -> None:
    cfg = dataclasses.replace(CONFIGS["narrow"], scaling_factor=1.5305, shift_factor=0.0609)
    ours, ref = pair(cfg)
    ref.save_pretrained(tmp_path / "tiny")
    loaded = load_tiny_autoencoder(tmp_path / "tiny")
    assert loaded.cfg == cfg
    _same(loaded, ours)
    # a whole diffusers state dict in one file loads too (its scale and shift are not in it)
    save_file(ref.state_dict(), tmp_path / "whole.safetensors")
    _same(load_tiny_autoencoder(tmp_path / "whole.safetensors"), ours)


def test_save_writes_the_original_layout_and_the_model_folder_finds_it(tmp_path: Path) -> None:
    ours, _ = pair(CONFIGS["shapes"])
    files = save_tiny_autoencoder(ours, tmp_path, dtype=torch.float16)
    assert [p.name for p in files] == ["taesd_encoder.safetensors", "taesd_decoder.safetensors"]
    found = tiny_autoencoder_beside(tmp_path)
    assert found is not None and found.cfg == CONFIGS["shapes"]
    assert next(found.parameters()).dtype == torch.float32
    assert torch.allclose(found.decoder[1].weight, ours.decoder[1].weight, atol=1e-3)
    assert tiny_autoencoder_beside(tmp_path / "nothing") is None
    with pytest.raises(TinyAutoencoderError, match="scale or shift"):
        save_tiny_autoencoder(TinyAutoencoder(dataclasses.replace(CONFIGS["shapes"], scaling_factor=2.0)), tmp_path)


def test_wrong_files_are_one_line_errors(tmp_path: Path) -> None:
    from opensd.models.vae import AutoencoderKL, VAEConfig

    shapes, _ = pair(CONFIGS["shapes"])
    save_file(AutoencoderKL(VAEConfig.tiny()).state_dict(), tmp_path / "vae.safetensors")
    save_file({"0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "short.safetensors")
    broken = dict(shapes.decoder.state_dict())
    broken.pop("3.conv.2.weight")
    torch.save(broken, tmp_path / "broken_decoder.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    mixed = tmp_path / "mixed"
    _halves(shapes, mixed, ".safetensors")
    other, _ = pair(CONFIGS["sd"])
    save_file(other.encoder.state_dict(), mixed / "taesd_encoder.safetensors")
    two = tmp_path / "two"
    _halves(shapes, two, ".pth")
    _halves(shapes, two, ".pth", stem="taesdxl")
    bad_cfg = tmp_path / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "act_fn": "silu"}))
    cases = {
        tmp_path / "missing.pth": "not found",
        tmp_path / "vae.safetensors": "not a TAESD layer",
        tmp_path / "short.safetensors": "TAESD's pattern",
        tmp_path / "broken_decoder.pth": "TAESD's pattern|missing key",
        tmp_path / "empty": "holds no tiny autoencoder",
        tmp_path / "notes.txt": "not a TAESD file",
        mixed: "do not fit together",
        two: "several TAESD",
        bad_cfg: "act_fn",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_tiny_autoencoder(path)
        assert "\n" not in str(info.value), path


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="stages"):
        TinyAutoencoderConfig(stages=0)
    with pytest.raises(ConfigError, match="both off"):
        TinyAutoencoderConfig(encoder=False, decoder=False)
    with pytest.raises(ConfigError, match="scaling_factor"):
        TinyAutoencoderConfig(scaling_factor=0.0)
    tiny = TinyAutoencoder(CONFIGS["shapes"])
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny.encode(torch.zeros(1, 3, 6, 8))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        tiny.decode(torch.zeros(1, 3, 2, 2))
