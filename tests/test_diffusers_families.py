"""diffusers folders of SD 2.x, SDXL base and the refiner: opensd writes them, diffusers loads
them offline, opensd reads them back, and generation equals diffusers' own pipelines on the
same tiny random weights and latents (<= 1e-3 on pixels, plus 8-bit rounding)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clip_tokenizer, randomize
from PIL import Image

import opensd
from opensd.checkpoints import CheckpointError
from opensd.checkpoints.diffusers_folder import load_diffusers, read_diffusers_config, save_diffusers
from opensd.checkpoints.keymap_open_clip import LOGIT_SCALE
from opensd.diffusion.schedules import NoiseScheduleConfig, Prediction
from opensd.models.stable_diffusion import ModelFamily, SDConfig, StableDiffusion
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.tokenizers.clip_bpe import CLIPTokenizer

PROMPT = "a red circle above a blue square"
NEGATIVE = "a green triangle"
SIZE = 32
TOL = 1e-3 + 0.5 / 255  # ours are 8-bit PNGs, diffusers' floats in [0, 1]


@functools.cache
def tiny(family: ModelFamily, seed: int) -> tuple[StableDiffusion, CLIPTokenizer]:
    """A tiny random model of ``family`` with CLIP's real vocabulary (SD 2: v-prediction, pad "!")."""
    tok = clip_tokenizer()
    if family is ModelFamily.SD2:
        tok = CLIPTokenizer(tok.vocab, tok.merges, pad_token="!", context_length=tok.context_length)
    cfg = SDConfig.tiny(family)
    full = dict(vocab_size=tok.vocab_size, max_length=tok.context_length)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, **full),
                      **({"text_2": dataclasses.replace(cfg.text_2, **full)} if cfg.text_2 else {}))
    if family is ModelFamily.SD2:
        cfg = cfg.replace(schedule=NoiseScheduleConfig(prediction=Prediction.V))
    torch.manual_seed(seed)
    return randomize(StableDiffusion(cfg), seed).eval(), tok


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[ModelFamily, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for seed, family in enumerate(ModelFamily):
        model, tok = tiny(family, seed + 10)
        out[family] = save_diffusers(model, tok, root / family.value)
    return out


def _reference(path: Path, cls_name: str):
    import diffusers

    kw = {"add_watermarker": False} if "XL" in cls_name else {}
    pipe = getattr(diffusers, cls_name).from_pretrained(path, local_files_only=True, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler(name: str, config):
    import diffusers as d

    if name == "euler":
        return d.EulerDiscreteScheduler.from_config(config)
    assert name == "dpmpp_2m"
    return d.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


def _np(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def _latents(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the folders


def test_save_then_load_gives_the_same_model_for_every_family(folders) -> None:
    for seed, family in enumerate(ModelFamily):
        model, tok = tiny(family, seed + 10)
        back, back_tok = load_diffusers(folders[family])
        assert back.cfg.family is family
        assert back.cfg.schedule == model.cfg.schedule and back.cfg.size_embed_dim == model.cfg.size_embed_dim
        assert back.cfg.text_configs == model.cfg.text_configs
        want, got = model.state_dict(), back.state_dict()
        assert sorted(got) == sorted(want)
        filled = set()
        if family is ModelFamily.SD2:  # diffusers keeps 1 of the 2 blocks, and no projection
            last = f"cond_stage_model.model.transformer.resblocks.{model.cfg.text.layers - 1}."
            filled = {k for k in want if k.startswith(last)} | {"cond_stage_model.model.text_projection"}
            assert all(not got[k].any() for k in filled)
        for k in want:
            if k.endswith("logit_scale"):
                assert got[k].item() == pytest.approx(LOGIT_SCALE)
            elif k not in filled:
                assert torch.equal(got[k], want[k]), (family, k)
        assert back_tok.vocab == tok.vocab
        expected_pad = "!" if family in (ModelFamily.SD2, ModelFamily.SDXL_REFINER) else tok.pad_token
        assert back_tok.pad_token == expected_pad


def test_folders_have_diffusers_layout(folders) -> None:
    index = {f: json.loads((p / "model_index.json").read_text()) for f, p in folders.items()}
    assert index[ModelFamily.SD2]["_class_name"] == "StableDiffusionPipeline"
    assert index[ModelFamily.SDXL]["_class_name"] == "StableDiffusionXLPipeline"
    ref = index[ModelFamily.SDXL_REFINER]
    assert ref["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and ref["requires_aesthetics_score"] is True
    assert ref["text_encoder"] == [None, None] and ref["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert all(index[f]["force_zeros_for_empty_prompt"] is True for f in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER))
    sd2 = folders[ModelFamily.SD2]
    assert json.loads((sd2 / "scheduler/scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert json.loads((sd2 / "text_encoder/config.json").read_text())["num_hidden_layers"] == 1  # 2 - the unused last
    assert json.loads((sd2 / "tokenizer/special_tokens_map.json").read_text())["pad_token"] == "!"
    xl = folders[ModelFamily.SDXL]
    unet = json.loads((xl / "unet/config.json").read_text())
    assert (unet["addition_embed_type"], unet["addition_time_embed_dim"], unet["projection_class_embeddings_input_dim"]) \
        == ("text_time", 8, 24 + 6 * 8)
    assert json.loads((xl / "tokenizer/special_tokens_map.json").read_text())["pad_token"] == "<|endoftext|>"
    assert json.loads((xl / "tokenizer_2/special_tokens_map.json").read_text())["pad_token"] == "!"


@pytest.mark.parametrize("family,cls_name", [
    (ModelFamily.SD2, "StableDiffusionPipeline"),
    (ModelFamily.SDXL, "StableDiffusionXLPipeline"),
    (ModelFamily.SDXL_REFINER, "StableDiffusionXLImg2ImgPipeline"),
])
def test_diffusers_auto_pipeline_loads_our_folders_offline(folders, family, cls_name) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders[family], local_files_only=True)
    assert type(pipe).__name__ == cls_name
    if family is ModelFamily.SDXL_REFINER:
        assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score is True
    if family is not ModelFamily.SD2:
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_family_detection_errors_are_one_line(folders, tmp_path: Path) -> None:
    import shutil

    bad = shutil.copytree(folders[ModelFamily.SDXL], tmp_path / "xl")
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps(dict(index, text_encoder_2=[None, None])))
    with pytest.raises(CheckpointError, match="needs text_encoder_2") as e:
        read_diffusers_config(bad)
    assert "\n" not in str(e.value)
    (bad / "model_index.json").write_text(json.dumps(dict(index, tokenizer_2=[None, None])))
    with pytest.raises(CheckpointError, match="lacks component.*tokenizer_2"):
        read_diffusers_config(bad)
    with pytest.raises(CheckpointError, match="CLIP's BPE tokenizer"):
        from opensd.tokenizers.word import WordTokenizer

        save_diffusers(tiny(ModelFamily.SDXL, 0)[0], WordTokenizer.train(["a red circle"], 16, 8), tmp_path / "w")


# ----------------------------------------------------------------------------- generation parity


@pytest.fixture(scope="module")
def xl(folders):
    return opensd.load(folders[ModelFamily.SDXL]), _reference(folders[ModelFamily.SDXL], "StableDiffusionXLPipeline")


@pytest.fixture(scope="module")
def refiner(folders):
    path = folders[ModelFamily.SDXL_REFINER]
    return opensd.load(path), _reference(path, "StableDiffusionXLImg2ImgPipeline")


@pytest.fixture(scope="module")
def sd2(folders):
    return opensd.load(folders[ModelFamily.SD2]), _reference(folders[ModelFamily.SD2], "StableDiffusionPipeline")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sdxl_txt2img_matches_diffusers(xl, sampler: str) -> None:
    ours, ref = xl
    ref.scheduler = _scheduler(sampler, ref.scheduler.config)
    lat = _latents(1)
    want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=6.0, height=SIZE, width=SIZE,
               latents=lat.clone(), output_type="np").images
    got = ours.txt2img(PROMPT, NEGATIVE, steps=8, sampler=sampler, cfg_scale=6.0, width=SIZE, height=SIZE, latents=lat)
    assert np.abs(_np(got) - want).max() <= TOL


def test_sdxl_empty_negative_and_size_conditioning_match_diffusers(xl) -> None:
    """An empty negative prompt is zeros in both (force_zeros_for_empty_prompt); the size
    numbers (original size, crop) reach the U-Net alike."""
    ours, ref = xl
    ref.scheduler = _scheduler("euler", ref.scheduler.config)
    lat = _latents(2)
    kw = dict(num_inference_steps=6, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np")
    want = ref(PROMPT, latents=lat.clone(), original_size=(512, 384), crops_coords_top_left=(16, 8), **kw).images
    got = ours.txt2img(PROMPT, "", steps=6, sampler="euler", cfg_scale=5.0, width=SIZE, height=SIZE, latents=lat,
                       original_size=(512, 384), crop_top_left=(16, 8))
    assert np.abs(_np(got) - want).max() <= TOL
    plain = ours.txt2img(PROMPT, "", steps=6, sampler="euler", cfg_scale=5.0, width=SIZE, height=SIZE, latents=lat)
    assert np.abs(_np(plain) - _np(got)).max() > 2 / 255  # the size numbers did change the image


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_refiner_img2img_matches_diffusers(refiner, sampler: str) -> None:
    ours, ref = refiner
    ref.scheduler = _scheduler(sampler, ref.scheduler.config)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    want = ref(PROMPT, image=init, strength=0.6, num_inference_steps=10, guidance_scale=7.0, negative_prompt=NEGATIVE,
               generator=torch.Generator().manual_seed(42), output_type="np").images
    got = ours.img2img(init, PROMPT, NEGATIVE, strength=0.6, steps=10, sampler=sampler, cfg_scale=7.0, seed=42)
    assert np.abs(_np(got) - want).max() <= TOL


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_sd2_v_prediction_txt2img_matches_diffusers(sd2, sampler: str) -> None:
    ours, ref = sd2
    assert ours.model.cfg.schedule.prediction is Prediction.V
    assert ref.scheduler.config.prediction_type == "v_prediction"
    ref.scheduler = _scheduler(sampler, ref.scheduler.config)
    lat = _latents(3)
    want = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, height=SIZE, width=SIZE,
               latents=lat.clone(), output_type="np").images
    got = ours.txt2img(PROMPT, NEGATIVE, steps=10, sampler=sampler, width=SIZE, height=SIZE, latents=lat)
    assert np.abs(_np(got) - want).max() <= TOL


@pytest.mark.skipif("refiner" not in inspect.signature(StableDiffusionPipeline.txt2img).parameters,
                    reason="txt2img has no refiner= yet (branch sdxl-pipeline)")
def test_base_then_refiner_matches_diffusers(xl, refiner) -> None:
    """diffusers' ensemble of experts: the base to denoising_end=0.8 as latents, the refiner
    from denoising_start=0.8; opensd: txt2img(..., refiner=, refiner_switch_at=0.8)."""
    ours, base = xl
    ours_refiner, ref_refiner = refiner
    base.scheduler = _scheduler("euler", base.scheduler.config)
    ref_refiner.scheduler = _scheduler("euler", ref_refiner.scheduler.config)
    lat = _latents(4)
    mid = base(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.0, height=SIZE, width=SIZE,
               latents=lat.clone(), denoising_end=0.8, output_type="latent").images
    want = ref_refiner(PROMPT, negative_prompt=NEGATIVE, image=mid, num_inference_steps=10, guidance_scale=7.0,
                       denoising_start=0.8, output_type="np").images
    got = ours.txt2img(PROMPT, NEGATIVE, steps=10, sampler="euler", cfg_scale=7.0, width=SIZE, height=SIZE, latents=lat,
                       refiner=ours_refiner, refiner_switch_at=0.8)
    assert np.abs(_np(got) - want).max() <= TOL


def _write_real_folder(root: Path, family: ModelFamily) -> Path:
    """The config files (no weights) of the real stabilityai folders, as diffusers wrote them."""
    from test_families_parity import REAL

    clip_l = {"architectures": ["CLIPTextModel"], "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
              "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
              "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
              "projection_dim": 768, "vocab_size": 49408}
    big_g = dict(clip_l, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
                 intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280)
    vit_h = dict(clip_l, hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_hidden_layers=23, projection_dim=512)
    vae = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3,
           "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "force_upcast": True,
           "scaling_factor": 0.18215 if family is ModelFamily.SD2 else 0.13025}
    sched = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "v_prediction" if family is ModelFamily.SD2 else "epsilon", "sample_max_value": 1.0,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
             "trained_betas": None, "use_karras_sigmas": False}
    name = {ModelFamily.SD2: "sd21", ModelFamily.SDXL: "sdxl_base", ModelFamily.SDXL_REFINER: "sdxl_refiner"}[family]
    files = {"unet/config.json": dict(REAL[name][2], _class_name="UNet2DConditionModel"), "vae/config.json": vae,
             "scheduler/scheduler_config.json": sched}
    te, tok = ["transformers", "CLIPTextModel"], ["transformers", "CLIPTokenizer"]
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    if family is ModelFamily.SD2:
        index |= {"_class_name": "StableDiffusionPipeline", "text_encoder": te, "tokenizer": tok}
        files |= {"text_encoder/config.json": vit_h, "tokenizer/special_tokens_map.json": {"pad_token": "!"}}
    elif family is ModelFamily.SDXL:
        index |= {"_class_name": "StableDiffusionXLPipeline", "text_encoder": te, "tokenizer": tok,
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": tok}
        files |= {"text_encoder/config.json": clip_l, "text_encoder_2/config.json": big_g}
    else:
        index |= {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                  "tokenizer": [None, None], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer_2": tok, "requires_aesthetics_score": True, "force_zeros_for_empty_prompt": False}
        files |= {"text_encoder_2/config.json": big_g}
    files["model_index.json"] = index
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("family,preset", [
    (ModelFamily.SD2, SDConfig.sd21), (ModelFamily.SDXL, SDConfig.sdxl), (ModelFamily.SDXL_REFINER, SDConfig.sdxl_refiner),
])
def test_real_folder_configs_read_as_our_presets(tmp_path: Path, family, preset) -> None:
    cfg = read_diffusers_config(_write_real_folder(tmp_path, family))
    want = preset()
    assert cfg.family is family
    if family is ModelFamily.SDXL:
        assert cfg == want
        return
    with torch.device("meta"):
        shapes = [{k: v.shape for k, v in StableDiffusion(c).unet.state_dict().items()} for c in (cfg, want)]
    assert shapes[0] == shapes[1]  # the refiner's depth 4 is spelled (0, 4, 4, 0) + middle 4 in SGM
    if family is ModelFamily.SD2:  # diffusers' SD 2.1 records a 512-wide projection (unused) where OpenCLIP's is 1024
        assert cfg.text == dataclasses.replace(want.text, projection_dim=512)
        want = want.replace(text=cfg.text)
    assert cfg == want.replace(unet=cfg.unet)
