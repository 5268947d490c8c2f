"""One vocabulary (issue #18, part 4): the inpainting test on the model's configuration, the
composition protocols, and how a run stops."""

from __future__ import annotations

import dataclasses

import pytest

from opensd.config import ConfigError
from opensd.models.stable_diffusion import ModelFamily, SDConfig


@pytest.mark.parametrize("family", list(ModelFamily))
def test_is_inpainting_is_the_unet_taking_latent_mask_and_masked_image(family: ModelFamily) -> None:
    cfg = SDConfig.tiny(family)
    c = cfg.vae.embed_dim
    assert cfg.inpainting_in_channels == 2 * c + 1
    assert not cfg.is_inpainting
    inpainting = cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=2 * c + 1))
    assert inpainting.is_inpainting
    with pytest.raises(ConfigError, match=f"an inpainting U-Net takes {2 * c + 1}"):
        cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=c + 1))


def test_sd_inpainting_is_nine_channels() -> None:
    cfg = SDConfig.sd15()
    assert cfg.inpainting_in_channels == 9
    assert cfg.replace(unet=dataclasses.replace(cfg.unet, in_channels=9)).is_inpainting


# ----------------------------------------------------------------------------- the protocols


def test_every_registered_sampler_has_the_sampler_protocols_signature() -> None:
    import inspect

    from opensd.diffusion import list_samplers

    for spec in list_samplers():
        params = inspect.signature(spec.fn).parameters
        assert list(params)[:3] == ["denoiser", "x", "sigmas"], spec.id
        for name in ("extra_args", "callback", "generator"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None, (spec.id, name)
        rest = [p for p in list(params.values())[3:] if p.name not in ("extra_args", "callback", "generator")]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in rest), spec.id


def test_the_protocols_are_defined_once() -> None:
    import opensd.diffusion as D
    from opensd.diffusion import denoisers, guidance, protocols, registry, sampler_base, samplers

    assert guidance.ModelFn is denoisers.ModelFn is D.ModelFn is protocols.ModelFn
    assert sampler_base.DenoiserFn is samplers.DenoiserFn is D.DenoiserFn is protocols.DenoiserFn
    assert samplers.Callback is D.SamplerCallback is protocols.SamplerCallback
    assert registry.SamplerSpec.__annotations__["fn"] in ("SamplerFn", protocols.SamplerFn)


# ----------------------------------------------------------------------------- stopping a run


def test_one_interrupted_and_one_stop_check_everywhere() -> None:
    import opensd.diffusion as D
    from opensd.diffusion import interruption, samplers
    from opensd.pipelines import generation
    from opensd.serving import queue

    assert D.Interrupted is samplers.Interrupted is interruption.Interrupted is queue.Interrupted
    assert generation.StopCheck is interruption.StopCheck and generation.check_stop is interruption.check_stop


@pytest.mark.parametrize("answer", [False, "class", "instance"])
def test_a_sampler_callback_stops_the_run_by_its_answer(answer) -> None:
    import torch

    from opensd.diffusion import DiscreteSchedule, Interrupted, sample

    stop = {"class": Interrupted, "instance": Interrupted("enough")}.get(answer, answer)
    schedule = DiscreteSchedule()
    seen = []

    def callback(d):
        seen.append(d["i"])
        return stop if d["i"] == 1 else None

    with pytest.raises(Interrupted) as e:
        sample(lambda x, s, **kw: x * 0, torch.ones(1, 4, 2, 2), schedule, "euler", 4, callback=callback)
    assert e.value.step == 1 and seen == [0, 1] and e.value.x.shape == (1, 4, 2, 2)


def test_only_false_or_interrupted_asks_to_stop() -> None:
    from opensd.diffusion import Interrupted, asks_to_stop

    assert asks_to_stop(False) and asks_to_stop(Interrupted) and asks_to_stop(Interrupted("x"))
    for go_on in (None, True, 0, "", [], "Interrupted", Exception):
        assert not asks_to_stop(go_on), go_on


def test_check_stop_raises_only_when_asked() -> None:
    from opensd.diffusion import Interrupted, check_stop

    check_stop(None, "encoding the prompt")
    check_stop(lambda: False, "encoding the prompt")
    with pytest.raises(Interrupted, match="stopped while decoding the latent") as e:
        check_stop(lambda: True, "decoding the latent")
    assert e.value.step is None


def test_a_pipeline_step_callback_may_answer_interrupted_too() -> None:
    from helpers import tiny_loaded

    from opensd.diffusion import Interrupted
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(tiny_loaded())
    req = pipe.request("a red circle", steps=4, sampler="euler", seed=1, width=16, height=16)
    for stop in (False, Interrupted):
        steps = []
        result = pipe.generate(req, callback=lambda info, stop=stop, steps=steps: steps.append(info.step) or (stop if info.step == 2 else None))
        assert result.interrupted and steps == [1, 2] and len(result.images) == 1
