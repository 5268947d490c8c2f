"""Cross-attention maps: where in the image each word of the prompt is looked at (DAAM).

Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross
Attention": every cross-attention layer of the U-Net has, for each image position
and head, a softmax over the text tokens. Upsample each layer's maps to the latent
size, sum them over heads, layers and denoising steps, and a token's map shows
which pixels it shaped. Here:

* only the conditional half of the guided batch is read (the prompt, not the
  negative prompt), from every ``attn2`` of the U-Net at every network call;
* maps are upsampled bilinearly (DAAM: bicubic), which keeps them non-negative and
  keeps the softmax's sum over tokens equal to 1;
* the sum is divided by the number of (call, layer, head) maps added, so
  ``per_token_maps`` (L, h, w) is the mean attention probability and sums to 1 over
  all L context positions (bos, eos and padding included) at every pixel;
* a word's map is the sum of its tokens' maps (sub-word tokens of one word summed),
  upsampled to the image: ``maps`` (n_words, H, W) holds the share of attention the
  word gets, in [0, 1], and ``maps.sum(0) <= 1`` (the rest goes to bos/eos/padding,
  which take most of it in trained models). Pictures normalize each word's map by
  its maximum, as DAAM's figures do.

Every family works the same way: the U-Net's conditioning comes from the pipeline's
``Conditioner`` (``pipe.request`` / ``pipe.conditioner.for_request``), so SDXL's ``y``
goes in too. SDXL concatenates its two encoders on the width (CLIP ViT-L 768 + bigG
1280 = 2048), not on the length: context position ``i`` is still token ``i`` of the
prompt's chunks, and a word's positions are those its tokens have under the first
tokenizer, as in SD 1.x. SD 2.x pads with ``!`` (id 0); padding positions are
labelled ``<pad>`` whatever their id.

Capture is :mod:`opensd.models.capture`: while collecting, the chosen layers of this
thread's (or asyncio task's) U-Net calls compute attention explicitly instead of by SDPA
(the same result up to float rounding); nothing is set on the shared U-Net, so a
generation beside it, on the same pipeline, is neither recorded nor changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from opensd.errors import OpenSDError
from opensd.explain.render import grid, heatmap_overlay, upscale, with_label
from opensd.models.capture import (
    AttentionSink,
    CaptureError,
    capture_attention,
    cross_attention_layers,
    feature_grid,
    is_cross_attention,
)
from opensd.prompts.syntax import TokenizedPrompt, context_length, tokenize_prompt


class ExplainError(OpenSDError):
    """Bad input to an explain function (unknown word, wrong mask shape, bad steps)."""


# ----------------------------------------------------------------------------- helpers

def normalize_word(word: str) -> str:
    """Lower case, letters and digits only: ``"(Circle:1.2),"`` -> ``"circle12"``; ``"circle,"`` -> ``"circle"``."""
    return re.sub(r"[\W_]+", "", word.lower())


def mass_in_mask(heat: torch.Tensor, mask: torch.Tensor | np.ndarray) -> float:
    """The share of ``heat`` (H, W, non-negative) inside the boolean ``mask`` (H, W)."""
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    if mask.shape != heat.shape:
        raise ExplainError(f"mask {tuple(mask.shape)} and map {tuple(heat.shape)} must have one shape")
    total = float(heat.sum())
    if total <= 0:
        raise ExplainError("the map holds no attention mass")
    return float(heat[mask].sum()) / total


# ----------------------------------------------------------------------------- collecting

class AttentionCollector:
    """Context manager: sums the cross-attention probabilities of ``unet``'s layers, for
    the U-Net calls this thread (or asyncio task) makes inside the ``with`` block.

    ``latent_size``: (h, w) of the latent the maps are upsampled to. ``row``: which
    batch row to read (-1: the last, the conditional one of ``[uncond; cond]``, and
    the only one without guidance). ``select``: which layers, by module path in
    ``unet`` (default: every ``attn2``). One collector is one capture: make a new one
    for each (it may not be entered while it is collecting).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        latent_size: tuple[int, int],
        row: int = -1,
        select: Callable[[str], bool] = is_cross_attention,
    ) -> None:
        layers = cross_attention_layers(unet, select)
        if not layers:
            raise ExplainError("this network has no cross-attention layers to read")
        self.sink = AttentionSink(layers, self._store)
        self.size = (int(latent_size[0]), int(latent_size[1]))
        self.row = row
        self.total: torch.Tensor | None = None  # (L, h, w)
        self.count = 0  # (call, layer, head) maps added
        self.layer_calls = 0
        self._scope: AbstractContextManager[AttentionSink | None] | None = None

    def __enter__(self) -> AttentionCollector:
        if self._scope is not None:
            raise ExplainError("this attention collector is already collecting; make one collector per capture")
        self._scope = capture_attention(self.sink)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        scope, self._scope = self._scope, None
        assert scope is not None  # set by __enter__
        scope.__exit__(*exc)

    def _store(self, layer: str, probs: torch.Tensor) -> None:
        p = probs[self.row].float()  # (heads, N, L)
        heads, n, length = p.shape
        try:
            hh, ww = feature_grid(n, *self.size)
        except CaptureError as e:
            raise ExplainError(str(e)) from None
        m = p.sum(0).transpose(0, 1).reshape(length, hh, ww)  # (L, h_l, w_l)
        if (hh, ww) != self.size:
            m = F.interpolate(m[None], size=self.size, mode="bilinear", align_corners=False)[0]  # (L, h, w)
        if self.total is None:
            self.total = m
        elif self.total.shape[0] != length:
            raise ExplainError(f"the context length changed between calls ({self.total.shape[0]} -> {length})")
        else:
            self.total += m
        self.count += heads
        self.layer_calls += 1

    @property
    def per_token(self) -> torch.Tensor:
        """(L, h, w) mean attention probability per context position; sums to 1 over L."""
        if self.total is None:
            raise ExplainError("no cross-attention was recorded (did the U-Net run inside the with block?)")
        return (self.total / self.count).cpu()


# ----------------------------------------------------------------------------- results

@dataclass
class AttentionResult:
    """Word and token attention maps of one image (see the module doc for what they sum to)."""

    image: Image.Image
    prompt: str
    words: list[str]  # the prompt's words, syntax removed
    tokens: list[str]  # one label per context position: "<bos>", "red</w>"-like pieces, "<eos>", "<pad>"
    token_words: torch.Tensor  # (L,) long: the word of each context position, -1 for bos/eos/pad
    maps: torch.Tensor  # (n_words, H, W) at image resolution
    per_token_maps: torch.Tensor  # (L, h, w) at latent resolution
    layer_calls: int  # cross-attention layer calls summed
    seed: int | None = None  # the generation's seed (None for a given image)

    def word_index(self, word: str) -> list[int]:
        """Indices of the prompt's words equal to ``word`` (compared by :func:`normalize_word`)."""
        key = normalize_word(word)
        found = [i for i, w in enumerate(self.words) if normalize_word(w) == key]
        if not found:
            raise ExplainError(f"{word!r} is not a word of the prompt; its words are {', '.join(self.words)}")
        return found

    def word_map(self, word: str) -> torch.Tensor:
        """(H, W): the summed maps of every occurrence of ``word``."""
        return self.maps[self.word_index(word)].sum(0)

    def figure(self, panel: int = 192) -> Image.Image:
        """The image, then one overlay per word (each normalized to its maximum), labelled."""
        base = upscale(self.image, panel)
        panels = [with_label(base, "image")]
        panels += [with_label(heatmap_overlay(base, m), w) for w, m in zip(self.words, self.maps, strict=False)]
        cols = min(len(panels), 6)
        return grid(panels, cols)


def _token_labels(tokenizer, tp: TokenizedPrompt, length: int) -> list[str]:
    labels = []
    for chunk in tp.chunks:
        seen_eos = False
        for pos, (tid, wi) in enumerate(zip(chunk.ids, chunk.word_index, strict=False)):
            if wi >= 0:
                labels.append(tokenizer.decode([tid]) or str(tid))
            elif pos == 0:
                labels.append("<bos>")
            elif not seen_eos:
                labels.append("<eos>")
                seen_eos = True
            else:
                labels.append("<pad>")
    ctx = tp.context
    while len(labels) < length:  # empty-prompt chunks padding the prompt to the negative's length
        labels += ["<bos>", "<eos>"] + ["<pad>"] * (ctx - 2)
    return labels[:length]


def build_result(
    pipe, prompt: str, image: Image.Image, collector: AttentionCollector
) -> AttentionResult:
    """Turn what ``collector`` gathered while ``prompt`` conditioned the U-Net into word maps."""
    per_token = collector.per_token  # (L, h, w)
    length = per_token.shape[0]
    tp = tokenize_prompt(pipe.tokenizer, prompt, context_length(pipe.tokenizer, pipe.model.text_encoder))
    token_words = tp.word_index
    if token_words.numel() > length:
        raise ExplainError(f"the prompt has {token_words.numel()} context positions but the U-Net saw {length}")
    token_words = torch.cat([token_words, torch.full((length - token_words.numel(),), -1, dtype=torch.long)])
    n_words = len(tp.words)
    h, w = per_token.shape[1:]
    word_latent = torch.zeros(n_words, h, w)
    keep = token_words >= 0
    word_latent.index_add_(0, token_words[keep], per_token[keep])  # (n_words, h, w)
    W, H = image.size
    if n_words and (h, w) != (H, W):
        maps = F.interpolate(word_latent[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    else:
        maps = word_latent
    return AttentionResult(
        image=image,
        prompt=prompt,
        words=list(tp.words),
        tokens=_token_labels(pipe.tokenizer, tp, length),
        token_words=token_words,
        maps=maps,
        per_token_maps=per_token,
        layer_calls=collector.layer_calls,
    )


# ----------------------------------------------------------------------------- entry points

def attention_maps(
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
    callback=None,
) -> AttentionResult:
    """Generate one image for ``prompt`` and return it with its DAAM word maps.

    ``callback`` is passed on to the pipeline (e.g. to record the denoising path in
    the same run).
    """
    req = pipe.request(
        prompt, negative_prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale, width=width, height=height,
        seed=seed, clip_skip=clip_skip,
    )
    f = pipe.cfg.vae.downsample_factor
    with AttentionCollector(pipe.model.unet, (req.height // f, req.width // f)) as col:
        result = pipe.generate(req, callback=callback)
    out = build_result(pipe, prompt, result.images[0], col)
    out.seed = result.seeds[0]
    return out


def attention_for_image(
    pipe,
    image,
    prompt: str,
    *,
    timesteps: Sequence[int] | None = None,
    seed: int = 0,
    clip_skip: int = 1,
    width: int | None = None,
    height: int | None = None,
) -> AttentionResult:
    """Word maps of ``prompt`` on a given image: encode it, noise it, run the U-Net once per timestep.

    ``timesteps``: training timesteps to noise to (default: the middle one, T // 2);
    the maps are averaged over them. The noise comes from ``seed``. No guidance: only
    the prompt conditions the U-Net.
    """
    from opensd.pipelines.images import load_image, to_tensor

    image = load_image(image)
    width, height = pipe._size_for(image, width, height)
    T = pipe.schedule.num_train_timesteps
    timesteps = [T // 2] if timesteps is None else list(timesteps)
    if not timesteps or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < T for t in timesteps):
        raise ExplainError(f"timesteps must be a non-empty list of integers in [0, {T - 1}], got {timesteps!r}")
    model = pipe.model
    dev, dtype = model.device, model.dtype
    with torch.inference_mode():
        pixels = to_tensor(image, width, height).to(dev, dtype)
        x0 = model.vae.to_latent(pipe.encode_pixels(pixels, False).mean.float())  # (1, C, h, w), float32
        eps = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(dev)
        req = pipe.request(prompt, width=width, height=height, clip_skip=clip_skip, cfg_scale=1.0)
        cond, _ = pipe.conditioner.for_request(req)  # {"context": (1, L, D)} (+ SDXL's "y")
        with AttentionCollector(model.unet, tuple(x0.shape[2:])) as col:
            for t in timesteps:
                a = pipe.schedule.alphas_cumprod[t].item()
                x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps  # VP noising (Ho et al. 2020, eq. 4), in float32
                model.unet(x_t.to(dtype), torch.tensor([float(t)], device=dev), **cond)  # t float32, as the pipeline gives it
    shown = image.convert("RGB")
    if shown.size != (width, height):
        shown = shown.resize((width, height), Image.Resampling.LANCZOS)
    return build_result(pipe, prompt, shown, col)


__all__ = [
    "AttentionCollector",
    "AttentionResult",
    "ExplainError",
    "attention_for_image",
    "attention_maps",
    "build_result",
    "mass_in_mask",
    "normalize_word",
]
