"""Golden outputs of the default model: the refactors of the generation path must keep them.

The SHA-256 of every image's pixels and of its PNG file (with its infotext) were
recorded from the code before conditioning became a dict of named tensors
(``python tests/test_golden.py`` prints the current values). A change that alters a
single pixel or a byte of the infotext fails here.

The values were recorded on a CPU with AVX-512 kernels. Other kernels sum in another order
(AVX2's GEMM blocks differ), which can move a pixel by one step of rounding; where the
default code gives other bytes on such a CPU, its values were recorded from the same code
(the commit before the refactors) on that CPU and are kept in ``CAPABILITY_VALUES``, keyed
by ``torch.backends.cpu.get_cpu_capability()``. Every other case must match the recorded
values exactly on every CPU.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "opensd-shapes"

def _cases(pipe):
    base = Image.new("RGB", (64, 64), (20, 30, 40))
    for x in range(16, 48):
        for y in range(20, 44):
            base.putpixel((x, y), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    return {
        "txt2img": lambda: pipe.txt2img("a red circle above a blue square", seed=1, steps=8, cfg_scale=5),
        "txt2img_batch_euler_a": lambda: pipe.txt2img(
            "three yellow triangles", "a green square", seed=7, steps=6, sampler="euler_a", batch_size=2
        ),
        "txt2img_cfg1_clip_skip": lambda: pipe.txt2img("a big blue circle", seed=3, steps=5, cfg_scale=1.0, clip_skip=2),
        "img2img": lambda: pipe.img2img(base, "a red square", seed=2, steps=10, strength=0.6, sampler="ddim"),
        "inpaint": lambda: pipe.inpaint(base, mask, "a green triangle", seed=4, steps=8, sampler="dpmpp_2m"),
    }


def _digests(images) -> list[tuple[str, str]]:
    out = []
    for im in images:
        pixels = hashlib.sha256(np.asarray(im.convert("RGB")).tobytes()).hexdigest()
        buf = io.BytesIO()
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", im.info["parameters"])
        im.save(buf, format="PNG", pnginfo=info)
        out.append((pixels, hashlib.sha256(buf.getvalue()).hexdigest()))
    return out


@pytest.fixture(scope="module")
def pipe():
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded values were computed on one thread
    yield StableDiffusionPipeline.from_path(MODEL, precision="fp32")  # recorded in float32 (auto may pick bf16 elsewhere)
    torch.set_num_threads(threads)


def current(pipe) -> dict[str, list[tuple[str, str]]]:
    return {name: _digests(run()) for name, run in _cases(pipe).items()}


@pytest.mark.parametrize("name", ["txt2img", "txt2img_batch_euler_a", "txt2img_cfg1_clip_skip", "img2img", "inpaint"])
def test_default_model_outputs_are_unchanged(pipe, name) -> None:
    got = _digests(_cases(pipe)[name]())
    assert got == expected(name)


def expected(name: str, capability: str | None = None) -> list[tuple[str, str]]:
    """The recorded digests of case ``name`` for this CPU's kernels (see the module docstring)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    return CAPABILITY_VALUES.get(capability, {}).get(name, GOLDEN_VALUES[name])


# name -> per image (sha256 of the RGB pixels, sha256 of the PNG bytes with its infotext)
GOLDEN_VALUES: dict[str, list[tuple[str, str]]] = {
    'txt2img': [('bec34e5b1d01adf091e773e3600d31eeebe55303303b5d96a8715294fa85276e', 'd77f7fab1da4bf9fe79f1fe2d88550b9d1b0cef848d0d2a90d280aaeb0f01a9f')],
    'txt2img_batch_euler_a': [('be9ea69bf9c299efafef9d93650c71c64a1c6b39d1efbf391536481a6b5b2fb9', '8041e5aebbced4db0c978f2d851223660f287bb2d4e7ebbf0e68993d3d12a746'), ('4d280863888a9a62a124a30ae2644e1becdc05e5281cbcc7929453e1951bcf95', '8de931dce0666db60c06a9e9f177a67f0147d1a32bf0d5c520dc8e31d01dde5c')],
    'txt2img_cfg1_clip_skip': [('f96b39cadc626601e5219720c822152d4ea25392ea725531ede49244007fdcfe', '0f79b4e12b5a8e77716f350c1db85e7d8ff92ce81aaa0081e41cd49f6f4db1dc')],
    'img2img': [('963421b63ba28caa6e94dc72c7581788b6cf648fde7e24b3d569b5c5d1a996d5', '23148dc8e60f2c8492470d64b8640548a9dd6849858a5581b4cdf3ba078d38f9')],
    'inpaint': [('caa19452eee38f087ca02eb2cabb9e344b4ce3eec45d733d9489b0adf829ba52', '3581b0dca46f4c527d1863a6c8b87e7ee3f434174b7e4d0df988daebac2e3d1f')],
}

# capability -> name -> digests, where that CPU's kernels give other bytes than GOLDEN_VALUES
# (recorded at 4d30486, before the refactors, on a 2-core AMD EPYC with AVX2 only)
CAPABILITY_VALUES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "AVX2": {
        'img2img': [('c0b9f1d36a8cd5fa845a6eed9dfeaf14d5e2585cc9c9be648266663869da0e75', 'b9da593ffd5fb5d8022667831153c39fb07007e3a560a35e4c024abd8910d3b5')],
    },
}

if __name__ == "__main__":
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

    torch.set_num_threads(1)
    values = current(StableDiffusionPipeline.from_path(MODEL, precision="fp32"))
    for k, v in values.items():
        print(f"    {k!r}: {v!r},", file=sys.stdout)
