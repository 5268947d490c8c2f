"""Small shared builders for the tests: tiny random models with their tokenizers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time

import torch
from PIL import Image

from opensd.models.stable_diffusion import SDConfig, StableDiffusion
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

CAPTIONS = [
    "a red circle",
    "a small blue square above a green triangle",
    "three yellow circles on a black background",
    "a picture of a purple square to the left of an orange circle",
    "there is a large cyan triangle",
]


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norm affines included) so parity tests exercise them all."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    from opensd.tokenizers.clip_bpe import CLIPTokenizer

    return CLIPTokenizer.from_open_clip()


def tiny_clip_bundle(seed: int = 0):
    """A tiny SD model whose text encoder uses the real 49,408-token CLIP vocabulary."""
    tok = clip_tokenizer()
    cfg = SDConfig.tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, max_length=tok.context_length))
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval(), tok


def tiny_word_bundle(seed: int = 0):
    """A tiny SD model with opensd's small word tokenizer trained on a few captions."""
    from opensd.tokenizers.word import WordTokenizer

    tok = WordTokenizer.train(CAPTIONS, vocab_size=64, context_length=16)
    cfg = SDConfig.tiny()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, max_length=tok.context_length))
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval(), tok


BERT_PIECES = sorted({w for c in CAPTIONS for w in c.split()} | {",", ".", "!", "(", ")", ":", "##s", "##er"})


def tiny_wordpiece(context_length: int = 12):
    """A WordPiece tokenizer over the words of :data:`CAPTIONS` (and a few pieces)."""
    from opensd.tokenizers.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer

    tokens = [*SPECIAL_TOKENS, *BERT_PIECES]
    return WordPieceTokenizer({t: i for i, t in enumerate(tokens)}, context_length)


def tiny_bert_bundle(seed: int = 0, context_length: int = 12):
    """A tiny sd1 model whose text encoder is a tiny BERT (:meth:`SDConfig.tiny_bert`), and its WordPiece tokenizer."""
    tok = tiny_wordpiece(context_length)
    cfg = SDConfig.tiny_bert()
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=tok.vocab_size))
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval(), tok


def tiny_loaded(seed: int = 0):
    """:func:`tiny_word_bundle` as the :class:`LoadedModel` a pipeline takes (name "tiny", a dummy hash)."""
    from pathlib import Path

    from opensd.checkpoints import LoadedModel

    model, tok = tiny_word_bundle(seed)
    return LoadedModel(model, tok, "tiny", Path("."), "opensd", "0" * 10)


@contextlib.contextmanager
def one_thread_direct_loopback():
    """One torch thread, and no HTTP proxy for loopback traffic (server tests), restored after."""
    before = torch.get_num_threads()
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "NO_PROXY")
    saved = {k: os.environ.get(k) for k in names}
    torch.set_num_threads(1)
    for k in names[:-1]:
        os.environ.pop(k, None)
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    try:
        yield
    finally:
        torch.set_num_threads(before)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def decode_png(b64: str) -> Image.Image:
    """A base64 PNG (as the server sends) -> a loaded PIL image."""
    import base64
    import io

    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def png_pixels(b64: str):
    """A base64 PNG -> (H, W, 3) uint8 array."""
    import numpy as np

    return np.asarray(decode_png(b64).convert("RGB"))


class SlowPipeline(StableDiffusionPipeline):
    """A pipeline that pauses after each step and records the steps finished, so a test can poll mid-generation."""

    def __init__(self, loaded, pause: float):
        super().__init__(loaded)
        self.pause, self.steps_done = pause, 0

    def generate(self, req, *, callback=None, **kw):
        def slow(info):
            time.sleep(self.pause)
            self.steps_done = info.step
            return callback(info) if callback is not None else None

        return super().generate(req, callback=slow, **kw)


def tiny_family_model(family, seed: int = 0):
    """A tiny random model of ``family`` (:class:`ModelFamily`) whose text encoders use the real
    CLIP vocabulary (49,408 tokens, 77 positions), and its tokenizer."""
    tok = clip_tokenizer()
    cfg = SDConfig.tiny(family)
    vocab = {"vocab_size": tok.vocab_size, "max_length": tok.context_length}
    cfg = cfg.replace(
        text=dataclasses.replace(cfg.text, **vocab),
        **({"text_2": dataclasses.replace(cfg.text_2, **vocab)} if cfg.text_2 is not None else {}),
    )
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval(), tok


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def browser_page(url: str):
    """A headless Chromium page (30 s timeouts) for the page served at ``url``; skips the test when
    Chromium or Playwright is missing or cannot start. Yields ``(page, outside)``: a request to
    anything but ``url`` is aborted and listed in ``outside``."""
    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found: install it with `apt-get install -y chromium`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed (test extra)")
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000)
        except Exception as e:  # a Chromium that Playwright cannot drive: say so rather than fail obscurely
            pytest.skip(f"Playwright could not start {CHROMIUM}: {e}")
        page = browser.new_page()
        page.set_default_timeout(30_000)
        outside: list[str] = []
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url + "/")
                   else (outside.append(route.request.url), route.abort()))
        try:
            yield page, outside
        finally:
            browser.close()
