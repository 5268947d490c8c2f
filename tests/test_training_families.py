"""The U-Net stage for every family: conditioning cached as named tensors, SD 2.x / SDXL fine-tuning, cache versions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import clip_tokenizer, randomize
from safetensors.torch import load_file, save_file

from opensd.checkpoints.opensd_format import save_opensd
from opensd.config import to_dict
from opensd.models.layers import timestep_embedding
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.tokenizers.clip_bpe import CLIPTokenizer
from opensd.training.config import stage_config_from_dict
from opensd.training.data import TrainingDataError, read_latent_cache
from opensd.training.loop import read_log, run_stage
from opensd.training.sources import open_source
from opensd.training.unet import UNetStage, UNetStageConfig

SIZE = 16  # pixels; the tiny VAE halves it


pytestmark = pytest.mark.usefixtures("one_thread")


def tokenizer_of(family: ModelFamily):
    """SD 2.x (and the refiner's bigG) pad with "!" (id 0); SD 1.x and SDXL's first tokenizer with end-of-text."""
    if family in (ModelFamily.SD2, ModelFamily.SDXL_REFINER):
        return CLIPTokenizer.from_open_clip(pad_token="!")
    return clip_tokenizer()


def save_tiny(family: ModelFamily, folder: Path) -> Path:
    """A tiny random model of ``family`` with CLIP's real vocabulary, as an opensd folder (16 px)."""
    tok = tokenizer_of(family)
    cfg = SDConfig.tiny(family)

    def real_vocab(text):
        return dataclasses.replace(text, vocab_size=tok.vocab_size, max_length=tok.context_length)

    cfg = cfg.replace(image_size=SIZE, text=real_vocab(cfg.text), **({"text_2": real_vocab(cfg.text_2)} if cfg.text_2 else {}))
    torch.manual_seed(0)
    return save_opensd(randomize(StableDiffusion(cfg), 0).eval(), tok, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[ModelFamily, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny(f, root / f.value) for f in ModelFamily}


def stage_for(model: Path, out: Path, steps: int = 3, **extra) -> UNetStage:
    t = {"out_dir": str(out), "steps": steps, "batch_size": 4, "lr": 3e-3, "warmup_steps": 0, "ema_decay": 0.0,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 0, "progress": False, "bf16": False}
    cfg = {"init_from": str(model), "cache_size": 8, "cache_batch": 8, "train": t, "data": {"image_size": SIZE},
           "eval_per_category": 0, "sample_steps": 2, **extra}
    return UNetStage(stage_config_from_dict(UNetStageConfig, cfg))


class UNetCalls:
    """Records the keyword arguments of every U-Net call (its conditioning)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})


def train_recording(stage: UNetStage):
    """Run ``stage``; returns (result, the U-Net's weights before step 1, its recorded calls)."""
    before: dict[str, torch.Tensor] = {}
    recorder: list[UNetCalls] = []
    build = stage.build

    def recording_build(ctx):
        modules = build(ctx)
        before.update({k: v.clone() for k, v in modules["unet"].unet.state_dict().items()})
        recorder.append(UNetCalls(modules["unet"].unet))
        return modules

    stage.build = recording_build
    result = run_stage(stage)
    return result, before, recorder[0].calls


def captions(stage: UNetStage, n: int) -> list[str]:
    """The captions of the stage's first ``n`` cached items."""
    return open_source(stage.cfg.data).captions(n)


# ----------------------------------------------------------------------------- every family fine-tunes


@pytest.mark.parametrize("family", [ModelFamily.SD2, ModelFamily.SDXL, ModelFamily.SDXL_REFINER])
def test_a_family_model_fine_tunes_and_its_cache_is_the_pipelines_encoding(tmp_path: Path, models, family) -> None:
    import opensd

    stage = stage_for(models[family], tmp_path / "run", caption_dropout=0.0)
    result, before, calls = train_recording(stage)
    rows = [r for r in read_log(result.run_dir / "log.jsonl") if r["kind"] == "train"]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    after = stage.ctx.modules["unet"].unet.state_dict()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-4  # the weights moved

    # The cache holds each caption as the pipeline encodes that prompt.
    pipe = opensd.load(models[family])
    caption = captions(stage, 1)[0]
    text = pipe.conditioner.encode([caption])
    torch.testing.assert_close(stage.cond["context"][:1].float(), text.context, atol=2e-3, rtol=2e-3)  # float16 cache
    has_y = family is not ModelFamily.SD2
    assert set(stage.cond) == ({"context", "pooled"} if has_y else {"context"})
    if has_y:
        torch.testing.assert_close(stage.cond["pooled"][:1].float(), text.pooled, atol=2e-3, rtol=2e-3)
    width = pipe.cfg.context_dim
    assert all(c["context"].shape[-1] == width for c in calls) and all(("y" in c) == has_y for c in calls)

    exported = opensd.load(result.export)
    assert exported.cfg.family is family
    assert all(torch.equal(after[k], v) for k, v in exported.model.unet.state_dict().items())
    assert exported.txt2img("a red circle", steps=2, seed=0, cfg_scale=3.0)[0].size == (SIZE, SIZE)


def test_sdxl_training_y_is_the_pooled_caption_and_the_real_image_size(tmp_path: Path, models) -> None:
    """SDXL's y: pooled bigG text, then the Fourier embedding of original size = the image's
    (16, 16), crop (0, 0), target = the training size (16, 16); a dropped caption is zeros."""
    stage = stage_for(models[ModelFamily.SDXL], tmp_path / "run", steps=2, caption_dropout=0.5)
    _, _, calls = train_recording(stage)
    dim = SDConfig.tiny(ModelFamily.SDXL).size_embed_dim
    size = timestep_embedding(torch.tensor([16.0, 16.0, 0.0, 0.0, 16.0, 16.0]), dim).reshape(1, -1)  # (1, 6 * dim)
    pooled_dim = stage.sd_cfg.pooled_dim
    dropped_rows = 0
    for call in calls:
        y, context = call["y"], call["context"]  # (B, adm), (B, L, D)
        assert y.shape == (4, pooled_dim + 6 * dim)
        torch.testing.assert_close(y[:, pooled_dim:], size.expand(4, -1))
        pooled = y[:, :pooled_dim]
        dropped = (pooled == 0).all(dim=1)
        assert torch.equal(dropped, (context == 0).flatten(1).all(dim=1))  # context and pooled drop together
        dropped_rows += int(dropped.sum())
        cached = stage.cond["pooled"].float()
        kept = pooled[~dropped]
        assert all(any(torch.allclose(row, c, atol=1e-6) for c in cached) for row in kept)  # a cached caption's
    assert 0 < dropped_rows < 4 * len(calls)  # caption dropout 0.5 dropped some, not all


# ----------------------------------------------------------------------------- the cache file


def test_sd1_cache_reads_a_version_1_file_and_refuses_others_in_one_line(tmp_path: Path, models) -> None:
    stage = stage_for(models[ModelFamily.SD1], tmp_path / "a", steps=1)
    run_stage(stage)
    path = stage.cache_file
    v2 = load_file(str(path))
    assert {"latents", "cond.context", "empty.context"} <= set(v2)
    # SD 1.x: the cached context is the text encoder's output on the tokenized captions, bit for bit (as before dicts)
    text, tok = stage.frozen.text_encoder, stage.tokenizer
    with torch.no_grad():
        expected = text(tok(captions(stage, 8))).half()
        empty = text(tok([""])).float()
    assert torch.equal(v2["cond.context"], expected) and torch.equal(v2["empty.context"], empty)

    # A file as the code before conditioning dicts wrote it (no version): read, same tensors.
    old = tmp_path / "b" / "cache" / path.name
    old.parent.mkdir(parents=True)
    save_file({"latents": v2["latents"], "context": v2["cond.context"], "empty_context": v2["empty.context"]}, str(old),
              metadata={"vae_dir": "", "clip_dir": ""})
    again = stage_for(models[ModelFamily.SD1], tmp_path / "b", steps=1)
    run_stage(again)
    assert again.cache_file == old and "cond.context" not in load_file(str(old))  # read, not rebuilt
    assert torch.equal(again.context, expected) and torch.equal(again.empty["context"], empty)

    # SDXL needs the pooled text, which a version-1 file never held; an unknown version is refused too.
    with pytest.raises(TrainingDataError, match=r"lacks cond\.pooled, empty\.pooled, which this model needs: delete"):
        read_latent_cache(old, ["context", "pooled"])
    newer = tmp_path / "newer.safetensors"
    save_file({"latents": v2["latents"]}, str(newer), metadata={"opensd_cache_version": "9"})
    with pytest.raises(TrainingDataError, match="has version '9'; this opensd reads versions 1 and 2") as e:
        read_latent_cache(newer, ["context"])
    assert "\n" not in str(e.value) and "rebuild" in str(e.value)


def test_the_cache_name_of_sd1_is_unchanged_and_families_get_their_own(models) -> None:
    """The text hash of an SD 1.x model is what opensd hashed before families (its old caches are found again)."""
    from opensd.training.data import state_hash, tokenizer_hash
    from opensd.training.text_encoding import text_cache_hash
    from opensd.training.transplant import opensd_model

    sd, tok = opensd_model(str(models[ModelFamily.SD1]), "init_from")
    text = sd.text_encoder
    old = state_hash(text, extra=json.dumps(to_dict(text.cfg)).encode() + tokenizer_hash(tok).encode())
    assert text_cache_hash(sd.text_encoders, tok, ModelFamily.SD1) == old
    xl, xl_tok = opensd_model(str(models[ModelFamily.SDXL]), "init_from")
    assert text_cache_hash(xl.text_encoders, xl_tok, ModelFamily.SDXL) != text_cache_hash(xl.text_encoders[:1], xl_tok, ModelFamily.SDXL)
