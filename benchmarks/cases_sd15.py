"""The SD 1.5 module cases of bench.py: one guided U-Net step, one VAE decode, one text-encoder pass.

Both sides hold the very same tensors: opensd's modules get random weights (PyTorch's
default init, seed 0), and diffusers'/transformers' reference modules are built on the
meta device and take opensd's tensors through opensd's key maps (``assign=True``).
"""

from __future__ import annotations

import torch
from harness import Row, Settings, build, efficiency, interleave, max_abs_diff, maybe_compile, recast, silence_reference_logs


def diffusers_unet_sharing(ours: torch.nn.Module, cfg, sample_size: int, copy: bool = False) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel holding ``ours``' weights (shared tensors unless ``copy``)."""
    from diffusers import UNet2DConditionModel

    from opensd.checkpoints.keymap_unet import to_diffusers_unet_config, unet_key_map

    state = ours.state_dict()
    mapped = {d: state[o] for o, d in unet_key_map(cfg).items()}
    with torch.device("meta"):
        ref = UNet2DConditionModel(**to_diffusers_unet_config(cfg, sample_size=sample_size))
    if copy:
        mapped = {k: v.clone() for k, v in mapped.items()}
    ref.load_state_dict(mapped, strict=True, assign=True)
    return ref.eval()


def diffusers_vae_sharing(ours: torch.nn.Module, cfg, sample_size: int, copy: bool = False) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    from opensd.checkpoints.keymap_vae import ldm_to_diffusers_vae, to_diffusers_vae_config

    mapped = ldm_to_diffusers_vae(ours.state_dict(), cfg)
    with torch.device("meta"):
        ref = AutoencoderKL(**to_diffusers_vae_config(cfg, sample_size=sample_size))
    if copy:
        mapped = {k: v.clone() for k, v in mapped.items()}
    ref.load_state_dict(mapped, strict=True, assign=True)
    return ref.eval()


def choose_kernels(ours: torch.nn.Module, s: Settings, run, where: str) -> str:
    """Route ``ours``' linear layers and convolutions as an opensd pipeline would (``--kernels``,
    measured on ``run()`` under auto); the selection's description, for the row."""
    from opensd.conv_kernels import Probe
    from opensd.kernels import select_kernels

    return select_kernels(ours, s.kernels, probe=Probe(run, where)).describe()


# ----------------------------------------------------------------------------- cases: SD 1.5 modules


def case_sd15_unet(s: Settings) -> list[Row]:
    silence_reference_logs()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from opensd.models.unet import UNetConfig, UNetModel

    cfg = UNetConfig.sd15()
    rs = s.reference()  # s itself, or under --dtype auto the reference side's fp32
    ours = build(lambda: UNetModel(cfg), rs)
    ref = diffusers_unet_sharing(ours, cfg, sample_size=64)
    ours = recast(ours, lambda: UNetModel(cfg), s.dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g).to(s.device, rs.dtype)
    context = torch.randn(2, 77, 768, generator=g).to(s.device, rs.dtype)
    t = torch.tensor([500.0, 500.0], device=s.device, dtype=rs.dtype)
    x_o, context_o = x.to(s.dtype), context.to(s.dtype)  # as the pipeline casts at the U-Net's input

    # FLOPs of one call, counted on the meta device (shapes only), attention as plain matmuls.
    with torch.device("meta"):
        shadow = UNetModel(cfg).to(s.dtype)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        shadow(x_o.to("meta"), t.to("meta"), context_o.to("meta"))
    flops = counter.get_total_flops()

    kernels = choose_kernels(ours, s, lambda: ours(x_o[..., :16, :16].contiguous(), t, context_o), "the U-Net at a 16x16 latent")
    ours_c, ref_c = maybe_compile(ours, s), maybe_compile(ref, s)
    row = Row("sd15_unet", s.label("SD1.5 U-Net, guided step 512² (batch 2)"), "it/s", 1.0)
    with torch.inference_mode():
        a, b = interleave(row, lambda: ours_c(x_o, t, context_o).to(rs.dtype),
                          lambda: ref_c(x, t, encoder_hidden_states=context).sample, s, True)
    row.max_abs_diff = max_abs_diff(a, b)
    row.extra = {
        **efficiency(flops, row, s),
        "diffusers_attention_processor": type(next(iter(ref.attn_processors.values()))).__name__,
        "opensd_kernels": kernels,
    }
    return [row]


def case_sd15_vae(s: Settings) -> list[Row]:
    silence_reference_logs()
    from opensd.models.vae import AutoencoderKL, VAEConfig

    cfg = VAEConfig.sd15()
    rs = s.reference()
    ours = build(lambda: AutoencoderKL(cfg), rs)
    ref = diffusers_vae_sharing(ours, cfg, sample_size=512)
    ours = recast(ours, lambda: AutoencoderKL(cfg), s.dtype)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(2)).to(s.device, rs.dtype)
    z_o = z.to(s.dtype)
    kernels = choose_kernels(ours, s, lambda: ours.decoder(ours.post_quant_conv(z_o[..., :16, :16].contiguous())),
                             "the VAE decoder at a 16x16 latent")
    ours_dec, ref_dec = maybe_compile(ours.decoder, s), maybe_compile(ref.decoder, s)
    row = Row("sd15_vae", s.label("SD1.5 VAE decode 64² -> 512²"), "decodes/s", 1.0)
    with torch.inference_mode():
        a, b = interleave(
            row,
            lambda: ours_dec(ours.post_quant_conv(z_o)).to(rs.dtype),
            lambda: ref_dec(ref.post_quant_conv(z)),
            s,
            True,
        )
    row.max_abs_diff = max_abs_diff(a, b)
    row.extra = {"opensd_kernels": kernels}
    return [row]


def case_sd15_text(s: Settings) -> list[Row]:
    silence_reference_logs()
    import transformers

    from opensd.checkpoints.keymap_clip import to_transformers_clip_config
    from opensd.models.clip import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig.sd15()
    rs = s.reference()
    ours = build(lambda: CLIPTextModel(cfg), rs)
    with torch.device(s.device):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**to_transformers_clip_config(cfg)))
    ref = ref.to(rs.dtype).eval().requires_grad_(False)
    prefix = "text_model." if any(k.startswith("text_model.") for k in ref.state_dict()) else ""
    mapped = {prefix + k.removeprefix("text_model."): v for k, v in ours.state_dict().items()}
    missing, unexpected = ref.load_state_dict(mapped, strict=False, assign=True)
    if unexpected or not all(k.endswith("position_ids") for k in missing):
        raise RuntimeError(f"text encoder weights did not map: missing {missing}, unexpected {unexpected}")
    ours = recast(ours, lambda: CLIPTextModel(cfg), s.dtype)
    ids = torch.randint(0, cfg.vocab_size - 2, (2, 77), generator=torch.Generator().manual_seed(3)).to(s.device)
    ours_c, ref_c = maybe_compile(ours, s), maybe_compile(ref, s)
    row = Row("sd15_text", s.label("SD1.5 CLIP text encoder (2 x 77 tokens)"), "passes/s", 1.0)
    with torch.inference_mode():
        a, b = interleave(row, lambda: ours_c(ids).to(rs.dtype), lambda: ref_c(input_ids=ids).last_hidden_state, s, True)
    row.max_abs_diff = max_abs_diff(a, b)
    row.extra = {"transformers_attn_implementation": getattr(ref.config, "_attn_implementation", None)}
    return [row]
