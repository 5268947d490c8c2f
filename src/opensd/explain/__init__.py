"""See inside a generation: cross-attention word maps, the denoising path, forward noising.

>>> from opensd.explain import attention_maps, denoising_path, forward_noising, explain
>>> res = attention_maps(pipe, "a red circle above a blue square", seed=1, steps=20)
>>> res.maps.shape            # (n_words, H, W), one map per word of the prompt
>>> res.figure().save("attention.png")
>>> ex = explain(pipe, "a red circle", seed=1)   # all three from one generation
>>> save_explanation(ex, "explain_out")
>>> seg = load_for_explain("models/opensd-shapes/segmenter.safetensors")
>>> ex = explain(pipe, "a red circle", seed=1, segmenter=seg)  # + the segmenter beside the word maps

See :mod:`opensd.explain.attention` (DAAM, Tang et al. 2022),
:mod:`opensd.explain.path` and :mod:`opensd.explain.segmentation` for what the pictures show.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from opensd.explain.attention import (
    AttentionCollector,
    AttentionResult,
    ExplainError,
    attention_for_image,
    attention_maps,
    build_result,
    mass_in_mask,
)
from opensd.explain.path import (
    DenoisingPath,
    NoisingPath,
    PathError,
    PathRecorder,
    decode_latents,
    denoising_path,
    forward_noising,
    path_from_recorder,
)
from opensd.explain.progress import StepProgress
from opensd.explain.render import grid, heatmap_overlay, save_gif
from opensd.explain.segmentation import (
    SegmentationView,
    ShapeAgreement,
    compare_with_attention,
    find_segmenter,
    load_for_explain,
    segment_image,
)


@dataclass
class Explanation:
    """Everything ``opensd explain`` shows for one prompt and seed."""

    attention: AttentionResult
    path: DenoisingPath
    noising: NoisingPath
    segmentation: SegmentationView | None = None  # with a segmenter: its maps beside the shape words'

    @property
    def image(self):
        return self.attention.image


def explain(
    pipe,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int | None = 0,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    cfg_scale: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    clip_skip: int = 1,
    at: Sequence[int] | None = None,
    noise_image=None,
    noise_steps: int = 10,
    progress=None,
    segmenter: tuple | None = None,
) -> Explanation:
    """One generation read three ways: word maps, the denoising path at steps ``at``
    (default: every step), and the forward noising of ``noise_image`` (default: the
    generated image) over ``noise_steps`` levels. ``progress``, a step callback (such
    as :class:`~opensd.explain.progress.StepProgress`), is called after every sampling step.
    ``segmenter``: (a :class:`~opensd.models.segmenter.Segmenter`, its class names), as
    :func:`~opensd.explain.segmentation.load_for_explain` gives, adds its reading of the
    image beside the shape words' maps (:func:`~opensd.explain.segmentation.compare_with_attention`)."""
    if at is not None and (not at or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= steps for s in at)):
        raise PathError(f"at must list step numbers in 1..{steps}, got {at!r}")
    rec = PathRecorder(at)

    def on_step(info) -> None:
        rec(info)
        if progress is not None:
            progress(info)

    attn = attention_maps(
        pipe, prompt, negative_prompt=negative_prompt, seed=seed, steps=steps, sampler=sampler,
        cfg_scale=cfg_scale, width=width, height=height, clip_skip=clip_skip, callback=on_step,
    )
    path = path_from_recorder(pipe, rec, attn.image)
    noising = forward_noising(pipe, attn.image if noise_image is None else noise_image, noise_steps, seed=attn.seed or 0)
    seg = None if segmenter is None else compare_with_attention(attn, *segmenter)
    return Explanation(attn, path, noising, seg)


def save_explanation(ex: Explanation, out_dir: str | Path, *, panel: int = 128) -> dict[str, Path]:
    """Write the pictures and the raw maps into ``out_dir``; returns name -> path.

    Files: ``image.png``, ``attention.png`` (word overlays), ``attention.safetensors``
    (``maps``, ``per_token_maps``, ``token_words``) with ``attention.json`` (prompt,
    words, tokens), ``path.png`` + ``path.gif`` (denoising), ``noising.png`` +
    ``noising.gif`` (forward noising); with a segmenter, ``segmentation.png`` (its maps
    above the shape words' attention) and ``segmentation.json`` (the numbers per shape word).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExplainError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    a = ex.attention
    paths = {
        "image": out / "image.png",
        "attention": out / "attention.png",
        "maps": out / "attention.safetensors",
        "tokens": out / "attention.json",
        "path": out / "path.png",
        "path_gif": out / "path.gif",
        "noising": out / "noising.png",
        "noising_gif": out / "noising.gif",
    }
    a.image.save(paths["image"])
    a.figure(max(panel, 160)).save(paths["attention"])
    save_file(
        {
            "maps": a.maps.contiguous(),
            "per_token_maps": a.per_token_maps.contiguous(),
            "token_words": a.token_words.contiguous(),
        },
        str(paths["maps"]),
    )
    meta = {"prompt": a.prompt, "words": a.words, "tokens": a.tokens, "layer_calls": a.layer_calls}
    paths["tokens"].write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    ex.path.strip(panel).save(paths["path"])
    ex.path.save_gif(paths["path_gif"], panel=panel)
    ex.noising.strip(panel).save(paths["noising"])
    ex.noising.save_gif(paths["noising_gif"], panel=panel)
    if ex.segmentation is not None:
        paths["segmentation"] = out / "segmentation.png"
        paths["segmentation_json"] = out / "segmentation.json"
        ex.segmentation.figure(max(panel, 160)).save(paths["segmentation"])
        text = json.dumps(ex.segmentation.summary(), indent=2, ensure_ascii=False) + "\n"
        paths["segmentation_json"].write_text(text)
    return paths


__all__ = [
    "AttentionCollector",
    "AttentionResult",
    "DenoisingPath",
    "ExplainError",
    "Explanation",
    "NoisingPath",
    "PathError",
    "PathRecorder",
    "SegmentationView",
    "ShapeAgreement",
    "StepProgress",
    "attention_for_image",
    "attention_maps",
    "build_result",
    "compare_with_attention",
    "decode_latents",
    "denoising_path",
    "explain",
    "find_segmenter",
    "forward_noising",
    "grid",
    "heatmap_overlay",
    "load_for_explain",
    "mass_in_mask",
    "path_from_recorder",
    "save_explanation",
    "save_gif",
    "segment_image",
]
