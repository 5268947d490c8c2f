"""AutoencoderKL: numerical parity with diffusers, SD 1.5 key layout, posterior, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opensd.checkpoints.keymap_vae import (
    LDM_VAE_PREFIX,
    diffusers_to_ldm_vae,
    from_diffusers_vae_config,
    ldm_to_diffusers_vae,
    needs_reshape,
    to_diffusers_vae_config,
    vae_key_map,
)
from opensd.config import ConfigError, from_dict, to_dict
from opensd.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

TOL = 1e-4
CONFIGS = {
    "tiny": VAEConfig.tiny(),
    # 3 levels, 2 res blocks; widths 16, 32, 32 cover blocks with and without nin_shortcut.
    "three_levels": VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=2, norm_groups=8),
}


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter (norm affine included) off its init, deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def diffusers_vae(cfg: VAEConfig, seed: int) -> DiffusersAutoencoderKL:
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(**to_diffusers_vae_config(cfg, sample_size=32)).eval()
    perturb_(model, seed)
    return model


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1e-2, "reference output is degenerate; the comparison would mean nothing"
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


def compare(ours: AutoencoderKL, ref: DiffusersAutoencoderKL, cfg: VAEConfig) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, cfg.in_channels, 16, 24, generator=g) * 2 - 1  # H != W catches transposes
    f = cfg.downsample_factor
    z = torch.randn(2, cfg.embed_dim, 16 // f, 24 // f, generator=g)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        assert_close(post.mean, ref_post.mean)
        assert_close(post.logvar, ref_post.logvar)
        assert_close(ours.decode(z), ref.decode(z).sample)
        # Full forward with a sampled posterior: same seed, same noise, same image.
        recon, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        ref_recon = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
        assert_close(recon, ref_recon)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_diffusers_to_ours(name: str) -> None:
    cfg = CONFIGS[name]
    ref = diffusers_vae(cfg, seed=0)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_to_ldm_vae(ref.state_dict(), cfg), strict=True)
    compare(ours, ref, cfg)


def test_parity_ours_to_diffusers() -> None:
    cfg = CONFIGS["three_levels"]
    torch.manual_seed(3)
    ours = AutoencoderKL(cfg).eval()
    perturb_(ours, seed=3)
    ref = DiffusersAutoencoderKL(**to_diffusers_vae_config(cfg, sample_size=32)).eval()
    ref.load_state_dict(ldm_to_diffusers_vae(ours.state_dict(), cfg), strict=True)
    compare(ours, ref, cfg)


def test_state_dict_round_trip_is_identity() -> None:
    cfg = CONFIGS["three_levels"]
    sd = AutoencoderKL(cfg).state_dict()
    back = diffusers_to_ldm_vae(ldm_to_diffusers_vae(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_sd15_key_layout_matches_diffusers_single_file_conversion() -> None:
    cfg = VAEConfig.sd15()
    dcfg = to_diffusers_vae_config(cfg)
    assert dcfg["block_out_channels"] == [128, 256, 512, 512]
    assert dcfg["layers_per_block"] == 2 and dcfg["latent_channels"] == 4
    assert dcfg["down_block_types"] == ["DownEncoderBlock2D"] * 4
    assert dcfg["up_block_types"] == ["UpDecoderBlock2D"] * 4
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
        ref = DiffusersAutoencoderKL(**dcfg)
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    sd = {LDM_VAE_PREFIX + k: v for k, v in ours.state_dict().items()}
    assert len(sd) == 248

    converted = convert_ldm_vae_checkpoint(sd, dcfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes

    # Our key map is that conversion: each diffusers tensor is the very tensor (or, for
    # the reshaped attention projections, a view of it) behind the original key, so
    # every input key is used exactly once.
    key_map = vae_key_map(cfg)
    assert len(key_map) == 248 and set(key_map.values()) == set(converted)
    for orig, dkey in key_map.items():
        src, out = sd[LDM_VAE_PREFIX + orig], converted[dkey]
        if needs_reshape(orig):
            assert out._base is src and src.shape[2:] == (1, 1) and out.ndim == 2, orig
        else:
            assert out is src, orig
    assert sum(needs_reshape(k) for k in key_map) == 8


def test_diffusers_config_round_trip() -> None:
    for cfg in (VAEConfig.sd15(), VAEConfig.small(), *CONFIGS.values()):
        d = {"_class_name": "AutoencoderKL", "force_upcast": True, **to_diffusers_vae_config(cfg)}
        assert from_diffusers_vae_config(d) == cfg
        assert from_dict(VAEConfig, to_dict(cfg)) == cfg


def test_presets() -> None:
    assert VAEConfig.sd15().downsample_factor == 8
    small = VAEConfig.small()
    assert small.downsample_factor == 4 and small.block_channels == (32, 64, 128)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoencoderKL(small).parameters())
    assert 2.5e6 < n < 2.9e6
    model = AutoencoderKL(VAEConfig.tiny())
    recon, post = model(torch.zeros(1, 3, 8, 8))
    assert recon.shape == (1, 3, 8, 8) and post.mean.shape == (1, 4, 4, 4)
    lat = torch.randn(1, 4, 2, 2)
    assert torch.allclose(model.from_latent(model.to_latent(lat)), lat)


def test_diagonal_gaussian() -> None:
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 3, 5)
    post = DiagonalGaussian(moments)
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    c = post.sample(torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(post.mode(), moments[:, :4])

    zero = DiagonalGaussian(torch.zeros(2, 8, 3, 5))
    assert torch.equal(zero.kl(), torch.zeros(2))

    ref = torch.distributions.Normal(post.mean, post.std)
    std_normal = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.mean))
    kl_ref = torch.distributions.kl_divergence(ref, std_normal).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), kl_ref, atol=1e-4)
    assert torch.allclose(post.nll(a), -ref.log_prob(a).sum(dim=(1, 2, 3)), atol=1e-4)
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), -100.0)).logvar.min() == -30.0


def test_bad_configs_and_inputs() -> None:
    with pytest.raises(ValueError, match="norm_groups"):
        VAEConfig(ch=20, norm_groups=8)
    with pytest.raises(ValueError, match="ch_mult"):
        VAEConfig(ch_mult=())
    with pytest.raises(ValueError, match="scale_factor"):
        VAEConfig(scale_factor=0.0)
    with pytest.raises(ValueError, match="num_res_blocks"):
        VAEConfig(num_res_blocks=0)
    with pytest.raises(ConfigError, match="ch_mult"):
        to_diffusers_vae_config(dataclasses.replace(VAEConfig.tiny(), ch_mult=(2, 4)))
    bad = {**to_diffusers_vae_config(VAEConfig.tiny()), "down_block_types": ["AttnDownEncoderBlock2D"] * 2}
    with pytest.raises(ConfigError, match="down_block_types"):
        from_diffusers_vae_config(bad)
    with pytest.raises(ConfigError, match="unknown"):
        from_diffusers_vae_config({"block_out_channels": [32], "norm_type": "spatial"})
    with pytest.raises(ValueError, match="even"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))
    model = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match="expected"):
        model.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match="expected"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="missing"):
        ldm_to_diffusers_vae({}, VAEConfig.tiny())
