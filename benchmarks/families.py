"""Benchmark cases of the newer families: one guided U-Net step of SD 2.1 and of SDXL base.

Each case builds the full-size U-Net of ``opensd.models.unet`` (``UNetConfig.sd21()``:
the 768-v architecture, OpenCLIP ViT-H context (B, 77, 1024); ``UNetConfig.sdxl_base()``:
context (B, 77, 2048) and the vector ``y`` (B, 2816), Podell et al. 2023) with random
weights, then hands the very same tensors to diffusers' ``UNet2DConditionModel``:

- diffusers' config comes from diffusers' own single-file code,
  ``create_unet_diffusers_config_from_ldm``, fed the LDM ``unet_config.params`` that
  our config stands for (:func:`ldm_unet_params`);
- the weights go through diffusers' ``convert_ldm_unet_checkpoint`` (our state dict
  under ``model.diffusion_model.``: the original checkpoint's keys), loaded with
  ``assign=True`` into a module built on the ``meta`` device, so both sides read one
  copy of the weights (checked: :func:`shares_storage`). opensd's own key maps are
  not used here.

The step is batch 2, unconditional + conditional, as classifier-free guidance calls
it; the unconditional row is what an empty SDXL negative gives (zeros). SDXL's ``y`` is
the pooled bigG embedding then the sinusoidal embedding (256 each) of the six size
numbers (original h, w; crop top, left; target h, w); diffusers computes the same from
``added_cond_kwargs={"text_embeds", "time_ids"}`` inside its forward, opensd's
Conditioner once per generation (here: once, before timing). Both outputs are
compared after the warm-up and before any timed call; a case whose sides disagree
beyond :data:`AGREE` stops there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from harness import Row, Settings, build, efficiency, interleave, max_abs_diff, maybe_compile, silence_reference_logs

FAMILY_CASES = ("sd21_unet", "sdxl_unet")
LDM_PREFIX = "model.diffusion_model."
TIME_EMBED = 256  # SDXL's size_embed_dim; diffusers' converter fixes addition_time_embed_dim to it
TEXT_LENGTH = 77
# Relative agreement (max|diff| / max|diffusers|) required before timing: fp32, else fp16/bf16.
AGREE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


@dataclass(frozen=True)
class UNetCase:
    """One family's guided-step case: its config and image side per device."""

    name: str
    label: str
    config: Callable[[], Any]  # -> UNetConfig
    cpu_size: int
    cuda_size: int

    def size(self, s: Settings) -> int:
        if s.unet_size is not None:
            return s.unet_size
        return self.cuda_size if s.device.type == "cuda" else self.cpu_size


def _cases() -> dict[str, UNetCase]:
    from opensd.models.unet import UNetConfig

    return {
        "sd21_unet": UNetCase("sd21_unet", "SD2.1 (768-v) U-Net", UNetConfig.sd21, 512, 768),
        "sdxl_unet": UNetCase("sdxl_unet", "SDXL base U-Net", UNetConfig.sdxl_base, 512, 1024),
    }


# ----------------------------------------------------------------------------- diffusers' side, by diffusers' converter


def ldm_unet_params(cfg) -> dict[str, Any]:
    """The ``unet_config.params`` of an LDM/SGM yaml that ``cfg`` (a UNetConfig) stands for."""
    params: dict[str, Any] = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "model_channels": cfg.model_channels,
        "channel_mult": list(cfg.channel_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attention_resolutions": [2**level for level in cfg.attention_levels],
        "transformer_depth": cfg.transformer_depth if isinstance(cfg.transformer_depth, int) else list(cfg.transformer_depth),
        "context_dim": cfg.context_dim,
        "use_linear_in_transformer": cfg.use_linear_in_transformer,
    }
    if cfg.head_channels is None:
        params["num_heads"] = cfg.num_heads
    elif cfg.use_linear_in_transformer:
        params["num_head_channels"] = cfg.head_channels
    else:  # diffusers' converter reads head widths only together with linear projections
        raise ValueError("ldm_unet_params: head_channels without use_linear_in_transformer has no diffusers config")
    if cfg.adm_in_channels is not None:
        params["num_classes"] = "sequential"
        params["adm_in_channels"] = cfg.adm_in_channels
    depths = [cfg.depth_at(level) for level in range(len(cfg.channel_mult))]
    if cfg.middle_depth != depths[-1]:  # diffusers' mid block takes the last level's depth
        raise ValueError(f"ldm_unet_params: middle depth {cfg.middle_depth} != last level's {depths[-1]}")
    return params


def diffusers_unet_from_ldm(ours: torch.nn.Module, cfg, image_size: int) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel on ``ours``' tensors, configured and renamed by diffusers' converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    original = {"model": {"params": {
        "unet_config": {"params": ldm_unet_params(cfg)},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},  # an 8x VAE: sample_size only
    }}}
    config = create_unet_diffusers_config_from_ldm(original, {}, image_size=image_size)
    config["norm_num_groups"] = cfg.norm_groups  # LDM fixes 32; opensd's tiny test configs use fewer
    checkpoint = {LDM_PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True, assign=True)
    return ref.eval().requires_grad_(False)


def shares_storage(ours: torch.nn.Module, ref: torch.nn.Module) -> bool:
    """True when every tensor of ``ref`` is one of ``ours``' (one copy of the weights in memory)."""
    mine = {t.data_ptr() for t in ours.state_dict().values()}
    return all(t.data_ptr() in mine for t in ref.state_dict().values())


# ----------------------------------------------------------------------------- inputs and the agreement check


def unet_inputs(cfg, latent: int, s: Settings, seed: int = 1) -> dict[str, Any]:
    """Guided-step inputs (batch 2: uncond, cond) for both sides, at a ``latent`` x ``latent`` latent."""
    from opensd.models.layers import timestep_embedding

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, latent, latent, generator=g)
    context = torch.randn(2, TEXT_LENGTH, cfg.context_dim, generator=g)
    context[0] = 0  # an empty SDXL negative; an SD 2.1 negative would be encoded text, same cost
    out: dict[str, Any] = {"x": x.to(s.device, s.dtype), "t": torch.full((2,), 500.0, device=s.device, dtype=s.dtype),
                           "context": context.to(s.device, s.dtype), "y": None, "added": None}
    if cfg.adm_in_channels is None:
        return out
    pooled = torch.randn(2, cfg.adm_in_channels - 6 * TIME_EMBED, generator=g)
    pooled[0] = 0
    side = float(8 * latent)
    time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2)  # original size, crop top-left, target size
    sizes = timestep_embedding(time_ids.flatten(), TIME_EMBED).reshape(2, -1)  # (2, 6 * 256)
    out["y"] = torch.cat([pooled, sizes], dim=1).to(s.device, s.dtype)  # (2, adm)
    out["added"] = {"text_embeds": pooled.to(s.device, s.dtype), "time_ids": time_ids.to(s.device, s.dtype)}
    return out


def agreement(row: Row, s: Settings) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The check :func:`interleave` runs before timing: records the diffs, raises past :data:`AGREE`."""

    def check(a: torch.Tensor, b: torch.Tensor) -> None:
        row.max_abs_diff = max_abs_diff(a, b)
        scale = b.float().abs().max().item()
        rel = row.max_abs_diff / scale if scale > 0 else float("inf")
        row.extra.update({"max_abs_output": scale, "rel_diff": rel, "finite": bool(torch.isfinite(a).all())})
        print(f"# {row.case}: max|diff| {row.max_abs_diff:.2e}, max|out| {scale:.3g}, relative {rel:.2e}", flush=True)
        if not (rel <= AGREE[s.dtype]):  # also catches NaN
            raise RuntimeError(f"{row.case}: outputs disagree (relative {rel:.2e} > {AGREE[s.dtype]:g}); not timed")

    return check


# ----------------------------------------------------------------------------- the cases


def _flops(cfg, inputs: dict[str, Any]) -> int:
    """FLOPs of one call on the meta device (shapes only), attention counted as its matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from opensd.models.unet import UNetModel

    meta = {k: v.to("meta") for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.device("meta"):
        shadow = UNetModel(cfg)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        shadow.to(inputs["x"].dtype)(meta["x"], meta["t"], meta["context"], meta.get("y"))
    return counter.get_total_flops()


def check_memory(name: str, cfg, s: Settings) -> None:
    """On a CPU, refuse to build a U-Net whose one copy of weights (+2 GB) exceeds MemAvailable."""
    from opensd.models.unet import UNetModel

    if s.device.type != "cpu":
        return
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    with torch.device("meta"):
        n = sum(p.numel() for p in UNetModel(cfg).parameters())
    need = n * torch.empty((), dtype=s.dtype).element_size() + 2 * 1024**3
    if need > available:
        raise RuntimeError(f"{name}: needs about {need / 1024**3:.1f} GiB, {available / 1024**3:.1f} GiB available")


def run_unet_case(case: UNetCase, s: Settings, cfg=None) -> list[Row]:
    """Time one guided step of ``case`` (or of ``cfg``, e.g. a tiny config in a test) on both sides."""
    silence_reference_logs()
    from opensd.models.unet import UNetModel

    cfg = cfg or case.config()
    size = case.size(s)
    check_memory(case.name, cfg, s)
    ours = build(lambda: UNetModel(cfg), s, native=True)
    ref = diffusers_unet_from_ldm(ours, cfg, image_size=size)
    if not shares_storage(ours, ref):
        raise RuntimeError(f"{case.name}: diffusers' U-Net does not share opensd's weights")
    inputs = unet_inputs(cfg, size // 8, s)
    x, t, context, y, added = (inputs[k] for k in ("x", "t", "context", "y", "added"))
    ours_c, ref_c = maybe_compile(ours, s), maybe_compile(ref, s)
    row = Row(case.name, f"{case.label}, guided step {size}² (batch 2{', y' if y is not None else ''})", "it/s", 1.0)

    def run_ref() -> torch.Tensor:
        return ref_c(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    with torch.inference_mode():
        interleave(row, lambda: ours_c(x, t, context, y), run_ref, s, True, check=agreement(row, s))
    row.extra.update({
        **efficiency(_flops(cfg, inputs), row, s),
        "image_size": size,
        "latent": list(x.shape),
        "parameters": sum(p.numel() for p in ours.parameters()),
        "shared_storage": True,
        "weights": "random (PyTorch default init, seed 0), built in the run's dtype",
        "diffusers_conversion": "single_file_utils.create_unet_diffusers_config_from_ldm + convert_ldm_unet_checkpoint",
        "diffusers_attention_processor": type(next(iter(ref.attn_processors.values()))).__name__,
    })
    return [row]


def case_sd21_unet(s: Settings) -> list[Row]:
    return run_unet_case(_cases()["sd21_unet"], s)


def case_sdxl_unet(s: Settings) -> list[Row]:
    return run_unet_case(_cases()["sdxl_unet"], s)


FAMILY_FUNCS = {"sd21_unet": case_sd21_unet, "sdxl_unet": case_sdxl_unet}


def family_notes(rows: list[Row]) -> str:
    """Lines under the table for the family rows: FLOPs, peak, achieved share, relative diff."""
    out = ""
    for r in rows:
        if r.case not in FAMILY_CASES or "unet_flops_per_call" not in r.extra:
            continue
        e = r.extra
        out += (
            f"\n{r.what}: {e['unet_flops_per_call'] / 1e9:.0f} GFLOP per call; matmul peak ({e['matmul_peak_dtype']}) "
            f"{e['matmul_peak_gflops']:.0f} GFLOP/s; achieved opensd {e['opensd_achieved_gflops']:.0f} GFLOP/s "
            f"({e['opensd_pct_of_peak']:.1f}%), diffusers {e['diffusers_achieved_gflops']:.0f} GFLOP/s "
            f"({e['diffusers_pct_of_peak']:.1f}%); relative diff {e['rel_diff']:.1e}; "
            f"opensd {1 / r.median('opensd'):.3g} it/s, diffusers {1 / r.median('diffusers'):.3g} it/s."
        )
    return out
