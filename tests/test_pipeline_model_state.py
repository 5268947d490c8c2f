"""A pipeline leaves the model it is given as it was (issue #18, part 4): its tensors, training
flags, ``requires_grad``, device and dtype, after the pipeline is built on it and generates;
a device or precision the model is not in runs on the pipeline's own copy. ``from_path`` owns
the model it loads and freezes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from helpers import randomize, tiny_loaded, tiny_word_bundle

from opensd.checkpoints import LoadedModel
from opensd.checkpoints.opensd_format import save_opensd
from opensd.models.taesd import TinyAutoencoder, TinyAutoencoderConfig
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline


def state(module: torch.nn.Module) -> dict:
    """Everything of ``module`` a pipeline could change behind its owner's back."""
    return {
        "tensors": {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in module.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in module.named_parameters()},
        "devices": {str(p.device) for p in module.parameters()},
        "dtypes": {p.dtype for p in module.parameters()},
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["tensors"].keys() == after["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]) and v.dtype == after["tensors"][k].dtype, k
    for key in ("training", "requires_grad", "devices", "dtypes"):
        assert before[key] == after[key], key


def training_model(seed: int = 0) -> LoadedModel:
    """The tiny model as a trainer holds it: in training mode, every parameter trainable."""
    loaded = tiny_loaded(seed)
    loaded.model.train().requires_grad_(True)
    return loaded


def generate_all(pipe: StableDiffusionPipeline) -> list[np.ndarray]:
    image = pipe.txt2img("a red circle", steps=2, sampler="euler_a", seed=3, width=16, height=16)[0]
    again = pipe.img2img(image, "a blue square", steps=2, seed=4)[0]
    mask = image.point(lambda v: 255 if v > 128 else 0)
    painted = pipe.inpaint(image, mask, "a green triangle", steps=2, seed=5)[0]
    pipe.decode_latents(torch.zeros(1, 4, 8, 8))
    pipe.encode_pixels(torch.zeros(1, 3, 16, 16))
    pipe.encode_prompt(["a red circle"])
    return [np.asarray(im) for im in (image, again, painted)]


def test_building_a_pipeline_and_generating_leave_the_model_as_it_was() -> None:
    loaded = training_model()
    before = state(loaded.model)
    pipe = StableDiffusionPipeline(loaded)
    assert pipe.model is loaded.model and pipe.loaded is loaded  # no copy where none is needed
    generate_all(pipe)
    assert_same_state(before, state(loaded.model))
    assert loaded.model.training and all(p.requires_grad for p in loaded.model.parameters())


def test_a_trainable_model_generates_the_images_a_frozen_one_does() -> None:
    trained = generate_all(StableDiffusionPipeline(training_model()))
    frozen = tiny_loaded()
    frozen.model.eval().requires_grad_(False)
    for a, b in zip(trained, generate_all(StableDiffusionPipeline(frozen)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_precision_runs_on_the_pipelines_copy() -> None:
    loaded = training_model()
    before = state(loaded.model)
    pipe = StableDiffusionPipeline(loaded, precision="bf16")
    assert pipe.model is not loaded.model and pipe.model.dtype == torch.bfloat16
    assert pipe.loaded.model is pipe.model and pipe.loaded.name == loaded.name and loaded.model.dtype == torch.float32
    generate_all(pipe)
    assert_same_state(before, state(loaded.model))


def test_a_tiny_autoencoder_given_stays_as_it_was() -> None:
    torch.manual_seed(0)
    tiny = randomize(TinyAutoencoder(TinyAutoencoderConfig.tiny()), 0, scale=0.05).train()
    before = state(tiny)
    pipe = StableDiffusionPipeline(training_model(), tiny_vae=tiny)
    assert pipe.tiny_vae is tiny
    pipe.txt2img("a red circle", steps=2, seed=1, width=16, height=16, decoder="tiny")
    assert_same_state(before, state(tiny))
    half = StableDiffusionPipeline(training_model(), tiny_vae=tiny, precision="bf16")
    assert half.tiny_vae is not tiny and next(half.tiny_vae.parameters()).dtype == torch.bfloat16
    assert_same_state(before, state(tiny))


def test_from_path_owns_and_freezes_its_model(tmp_path: Path) -> None:
    model, tok = tiny_word_bundle()
    save_opensd(randomize(model).train(), tok, tmp_path / "m")
    pipe = StableDiffusionPipeline.from_path(tmp_path / "m", precision="fp32")
    assert pipe.loaded.model is pipe.model
    assert not pipe.model.training and not any(p.requires_grad for p in pipe.model.parameters())
