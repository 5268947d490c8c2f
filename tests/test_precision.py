"""Precision that follows the hardware (opensd.precision) and what the pipeline does with it.

``auto`` is tested with the CPU's flags and the probe injected (an AVX2-only CPU never gets
bf16, whatever a probe says); the real probe, the loaders' 16-bit reads, float32 sampling
around a bf16 U-Net and the float16 VAE's upcast run on tiny models.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_clip_bundle, tiny_loaded, tiny_word_bundle

from opensd import precision as P
from opensd.checkpoints import LoadedModel, load_model
from opensd.checkpoints.diffusers_folder import save_diffusers
from opensd.checkpoints.opensd_format import save_opensd
from opensd.checkpoints.original import read_original, save_original
from opensd.errors import OpenSDError
from opensd.models.bert import BertTextConfig
from opensd.models.stable_diffusion import SDConfig
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

CPU = torch.device("cpu")
AVX2 = P.CPUFeatures(frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"}), "test")
SAPPHIRE = P.CPUFeatures(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), "test")
NATIVE_BF16 = P.cpu_features().native_bf16
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16)")


def _probe(ratio: float, calls: list | None = None):
    """A probe that reports the half type at ``ratio`` of float32's time (and records its calls)."""
    def probe(shape, device, half):
        if calls is not None:
            calls.append((shape, device, half))
        return P.ProbeResult(1.0, ratio, half)
    return probe


# ----------------------------------------------------------------------------- names


def test_names_aliases_and_dtypes() -> None:
    for spec, want in [("auto", P.Precision.AUTO), (None, P.Precision.AUTO), ("FP32", P.Precision.FP32),
                       ("float32", P.Precision.FP32), ("bfloat16", P.Precision.BF16), (" bf16 ", P.Precision.BF16),
                       ("float16", P.Precision.FP16), ("half", P.Precision.FP16), (torch.bfloat16, P.Precision.BF16),
                       ("torch.float16", P.Precision.FP16), (P.Precision.FP16, P.Precision.FP16)]:
        assert P.parse_precision(spec) is want, spec
    for spec, dtype in [("fp32", torch.float32), ("bf16", torch.bfloat16), (torch.float16, torch.float16)]:
        assert P.resolve_precision(spec, torch.device("cuda"), P.SD15_PROBE) == dtype  # as asked, no probe
    assert P.precision_name(torch.bfloat16) == "bf16" and P.precision_name(torch.float64) == "float64"


@pytest.mark.parametrize("bad", ["fp8", "", "int8", 16, torch.float64, torch.int8])
def test_a_bad_precision_is_one_line_naming_the_allowed_ones(bad) -> None:
    with pytest.raises(P.PrecisionError) as e:
        P.decide_precision(bad, CPU)
    assert isinstance(e.value, OpenSDError)
    msg = str(e.value)
    assert "\n" not in msg and "auto, fp32, bf16 or fp16" in msg


def test_cpuinfo_flags_on_x86_and_arm() -> None:
    x86 = "processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert P.parse_cpuinfo(x86) == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert P.CPUFeatures(P.parse_cpuinfo(x86), "x").native_bf16
    assert P.CPUFeatures(P.parse_cpuinfo(arm), "x").native_bf16
    assert not P.CPUFeatures(P.parse_cpuinfo("flags : fpu avx2 avx512f avx512bw\n"), "x").native_bf16
    assert P.parse_cpuinfo("model name : nothing else\n") == frozenset()
    here = P.cpu_features()
    assert here is P.cpu_features() and here.source  # read once per process


# ----------------------------------------------------------------------------- auto


def test_auto_never_picks_bf16_on_an_avx2_cpu() -> None:
    calls: list = []
    d = P.decide_precision("auto", CPU, P.SD15_PROBE, features=AVX2, probe=_probe(0.01, calls))
    assert d.dtype == torch.float32 and d.asked is P.Precision.AUTO
    assert calls == []  # emulated bf16 is not even timed
    assert "no native bf16" in d.reason and "avx512_bf16" in d.reason


@pytest.mark.parametrize("ratio, want", [(0.25, torch.bfloat16), (P.PROBE_MARGIN, torch.bfloat16),
                                         (0.9, torch.float32), (1.6, torch.float32)])
def test_auto_on_a_native_bf16_cpu_follows_the_probe(ratio, want) -> None:
    calls: list = []
    shape = P.ProbeShape.for_model(SDConfig.sd15())
    d = P.decide_precision("auto", CPU, shape, features=SAPPHIRE, probe=_probe(ratio, calls))
    assert d.dtype == want
    assert calls == [(shape, CPU, torch.bfloat16)]
    assert f"{ratio:.2f}x" in d.reason and "amx_bf16" in d.reason


def test_auto_never_picks_fp16_on_a_cpu_and_explicit_slow_choices_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warn
        assert P.resolve_precision("fp32", CPU, features=AVX2) == torch.float32
        assert P.resolve_precision("bf16", CPU, features=SAPPHIRE) == torch.bfloat16
        assert P.resolve_precision("auto", CPU, features=SAPPHIRE, probe=_probe(0.01)) == torch.bfloat16
    with pytest.warns(P.PrecisionWarning, match="fp16 on a CPU is slow"):
        assert P.resolve_precision("fp16", CPU, features=SAPPHIRE) == torch.float16
    with pytest.warns(P.PrecisionWarning, match="emulated"):
        assert P.resolve_precision("bf16", CPU, features=AVX2) == torch.bfloat16


def test_auto_on_gpus_follows_compute_capability_then_the_probe(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    for cap, bf16_ok, ratio, want in [((9, 0), True, 0.3, torch.bfloat16), ((8, 6), True, 0.95, torch.float32),
                                      ((7, 5), False, 0.4, torch.float16), ((6, 1), False, 0.1, torch.float32)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, ok=bf16_ok, **k: ok)
        calls: list = []
        d = P.decide_precision("auto", cuda, P.SD15_PROBE, probe=_probe(ratio, calls))
        assert d.dtype == want, (cap, d.reason)
        assert len(calls) == (0 if cap[0] < 7 else 1) and f"{cap[0]}.{cap[1]}" in d.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.resolve_precision("fp16", cuda) == torch.float16  # native on a GPU: no warning
    assert P.resolve_precision("auto", torch.device("mps"), probe=_probe(0.01)) == torch.float32


def test_probe_shapes_follow_the_model() -> None:
    sd15, sdxl = P.ProbeShape.for_model(SDConfig.sd15()), P.ProbeShape.for_model(SDConfig.sdxl())
    assert (sd15.channels, sd15.side, sd15.heads, sd15.context_dim, sd15.context_len) == (320, 12, 8, 768, 77)
    assert sd15 == P.SD15_PROBE
    assert (sdxl.channels, sdxl.side, sdxl.heads, sdxl.linear) == (640, 8, 10, True)  # its first attention level
    tiny = P.ProbeShape.for_model(SDConfig.tiny())
    assert tiny.channels == SDConfig.tiny().unet.level_channels[1] and tiny.side == SDConfig.tiny().latent_size // 2
    bert = SDConfig.tiny_bert()
    minilm = dataclasses.replace(bert, text=BertTextConfig.minilm_l6(pooler=False),
                                 unet=dataclasses.replace(bert.unet, context_dim=384))
    assert minilm.text.max_length == 512 and P.ProbeShape.for_model(minilm).context_len == 77  # one chunk, not 512


def test_the_real_probe_is_cached_and_leaves_threads_and_rng_alone() -> None:
    shape = P.ProbeShape.for_model(SDConfig.tiny())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = torch.random.get_rng_state()
        first = P.probe_half(shape, CPU, torch.bfloat16)
        assert torch.get_num_threads() == 2 and torch.equal(torch.random.get_rng_state(), rng)
        assert first.fp32_s > 0 and first.half_s > 0 and first.half == torch.bfloat16
        assert P.probe_half(shape, CPU, torch.bfloat16) is first  # cached
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- loading


def _all_floats(model) -> set[torch.dtype]:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


@pytest.mark.parametrize("fmt", ["opensd", "diffusers", "original", "ckpt"])
def test_weights_are_read_straight_into_the_precision(tmp_path: Path, fmt: str) -> None:
    model, tok = tiny_clip_bundle() if fmt in ("original", "ckpt") else tiny_word_bundle()
    stored = torch.float16 if fmt == "opensd" else torch.float32
    if fmt == "opensd":
        path = save_opensd(model, tok, tmp_path / "m", dtype=torch.float16)
    elif fmt == "diffusers":
        path = save_diffusers(model, tok, tmp_path / "m")
    elif fmt == "original":
        path = tmp_path / "m.safetensors"
        save_original(model, path)
    else:
        path = tmp_path / "m.ckpt"
        torch.save({"state_dict": model.state_dict()}, path)
    seen = []

    def pick(cfg):
        seen.append(cfg)
        return torch.bfloat16

    if fmt in ("original", "ckpt"):  # a tiny model is no preset: give its configuration
        load = lambda dtype: read_original(path, config=model.cfg, dtype=dtype).model  # noqa: E731
    else:
        load = lambda dtype: load_model(path, dtype=dtype).model  # noqa: E731
    loaded = load(pick)
    assert len(seen) == 1 and seen[0].unet == model.cfg.unet  # asked once, with the model's configuration
    assert _all_floats(loaded) == {torch.bfloat16}
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, want[k].to(stored).to(torch.bfloat16)), k
    assert _all_floats(load(None)) == {torch.float32}  # the default: float32


def test_from_path_decides_once_the_configuration_is_read(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    path = save_opensd(model, tok, tmp_path / "m")
    pipe = StableDiffusionPipeline.from_path(path, precision="bf16")
    assert _all_floats(pipe.model) == {torch.bfloat16} and pipe.precision.asked is P.Precision.BF16
    with pytest.warns(P.PrecisionWarning):
        old = StableDiffusionPipeline.from_path(path, dtype=torch.float16)  # the older keyword, still read
    assert _all_floats(old.model) == {torch.float16} and old.codec.upcasts()
    auto = StableDiffusionPipeline.from_path(path)  # default: auto, decided for this model's shapes
    assert auto.precision.asked is P.Precision.AUTO and auto.precision.dtype == auto.model.dtype
    assert auto.precision.reason.startswith("auto: ")
    with pytest.raises(P.PrecisionError, match="auto, fp32, bf16 or fp16"):
        StableDiffusionPipeline.from_path(path, precision="fp8")
    kept = StableDiffusionPipeline(tiny_loaded())
    assert kept.precision.asked is None and kept.precision.dtype == torch.float32


# ----------------------------------------------------------------------------- the loop


def _unet_inputs(pipe, **kw) -> tuple[list[tuple[torch.dtype, torch.dtype, float]], list[torch.dtype]]:
    """(x dtype, t dtype, t) of every U-Net call, and the sampler latents' dtype at every step."""
    seen, steps = [], []
    hook = pipe.model.unet.register_forward_pre_hook(lambda m, a: seen.append((a[0].dtype, a[1].dtype, a[1].max().item())))
    try:
        pipe.txt2img("a red circle", seed=5, callback=lambda i: steps.append(i.latents.dtype), **kw)
    finally:
        hook.remove()
    return seen, steps


def test_sampling_stays_float32_around_a_bf16_unet() -> None:
    pipe = StableDiffusionPipeline(tiny_loaded(), precision="bf16")
    ref = StableDiffusionPipeline(tiny_loaded(), precision="fp32")
    seen, steps = _unet_inputs(pipe, steps=4, sampler="euler_a")
    ref_seen, _ = _unet_inputs(ref, steps=4, sampler="euler_a")
    assert seen and all(x == torch.bfloat16 and t == torch.float32 for x, t, _ in seen)
    ts = [t for _, _, t in seen]
    assert ts == [t for _, _, t in ref_seen]  # the very timesteps of float32 ...
    assert any(torch.tensor(t).bfloat16().item() != t for t in ts)  # ... which bfloat16 would have rounded
    assert steps == [torch.float32] * 4
    noise = {}
    for p in (pipe, ref):
        req = p.request("a red circle", seed=5)
        noise[p] = p._initial_latents(req, [5], None, None, None, None).noise
    assert noise[pipe].dtype == torch.float32 and torch.equal(noise[pipe], noise[ref])  # the same draw


@needs_native_bf16
def test_seeds_keep_their_layout_in_bf16() -> None:
    from opensd.defaults import default_model_path

    path = default_model_path()
    fp32 = StableDiffusionPipeline.from_path(path, precision="fp32")
    bf16 = StableDiffusionPipeline.from_path(path, precision="bf16")
    prompt, seeds = "a red circle above a blue square", [0, 1, 2, 3]
    a = [np.asarray(fp32.txt2img(prompt, seed=s, steps=12, cfg_scale=5)[0], np.float64) for s in seeds]
    b = [np.asarray(bf16.txt2img(prompt, seed=s, steps=12, cfg_scale=5)[0], np.float64) for s in seeds]
    dist = np.array([[np.abs(x - y).mean() for y in a] for x in b])  # (bf16 seed, fp32 seed) mean |pixel diff|
    assert (dist.argmin(axis=1) == np.arange(len(seeds))).all(), dist  # each bf16 image is its own seed's
    assert np.diag(dist).max() < min(2.0, 0.1 * np.sort(dist, axis=1)[:, 1].min()), dist  # within 2 levels of 255, far from the others


def _overflowing_vae_model():
    """A tiny model whose VAE decoder's first convolution exceeds float16's 65504 (as SD's VAE can)."""
    model, tok = tiny_word_bundle()
    with torch.no_grad():
        model.vae.decoder.conv_in.weight.mul_(3e4)
    return model, tok


def test_the_fp16_vae_decode_is_upcast_finite_and_close_to_fp32() -> None:
    model, tok = _overflowing_vae_model()
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref32 = StableDiffusionPipeline(LoadedModel(model, tok, "t", Path("."), "opensd", "0" * 10), precision="fp32")
    want = ref32.decode_latents(latents)
    assert torch.isfinite(want).all()
    model16, tok16 = _overflowing_vae_model()
    with pytest.warns(P.PrecisionWarning):
        fp16 = StableDiffusionPipeline(LoadedModel(model16, tok16, "t", Path("."), "opensd", "0" * 10), precision="fp16")
    raw = StableDiffusionPipeline(fp16.loaded, vae_upcast=False)
    assert not torch.isfinite(raw.decode_latents(latents)).all()  # the overflow is real
    got = fp16.decode_latents(latents)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() < 2e-2  # the float16-rounded weights, run in float32
    image = fp16.txt2img("a red circle", steps=2, seed=1)[0]
    assert np.asarray(image).std() > 0  # not the black image of a NaN decode
