"""``opensd train lora``: only the LoRA trains, on a frozen base of any family; small exact
checkpoints; the kohya file reads back (opensd and diffusers) as the network that trained."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_family_model
from PIL import Image
from test_training import ENV, assert_states_equal, sigkill_resume_script

from opensd.checkpoints.io import read_weights
from opensd.checkpoints.lora import LoRAFile, LoRAUse, bind_loras
from opensd.checkpoints.lora_names import kohya_names
from opensd.checkpoints.opensd_format import save_opensd
from opensd.config import ConfigError
from opensd.data.imagefolder import write_imagefolder
from opensd.models.adapters import use_adapters
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest
from opensd.training.config import stage_config_from_dict
from opensd.training.loop import list_checkpoints, read_log, run_stage
from opensd.training.lora import LoRAStage, LoRAStageConfig
from opensd.training.lora_network import LoRANetwork, LoRATargets, kohya_metadata
from opensd.training.text_encoding import encode_ids

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16  # pixels; the tiny VAE halves it


def save_tiny(family: ModelFamily, folder: Path) -> Path:
    model, tok = tiny_family_model(family)
    model.cfg = model.cfg.replace(image_size=SIZE)
    return save_opensd(model, tok, folder)


def write_images(folder: Path, n: int = 4, caption: str = "a red circle", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    write_imagefolder([(im, f"{caption} {i}") for i, im in enumerate(images)], folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[ModelFamily, Path]:
    root = tmp_path_factory.mktemp("lora-models")
    return {f: save_tiny(f, root / f.value) for f in (ModelFamily.SD1, ModelFamily.SDXL)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("lora-data") / "data")


def lora_cfg(model: Path, data: Path, out: Path, steps: int = 4, **extra) -> dict:
    train = {"out_dir": str(out), "steps": steps, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
             "sample_every": 0, "checkpoint_every": 0, "progress": False, **extra.pop("train", {})}
    return {"model": str(model), "data": {"source": "folder", "path": str(data), "image_size": SIZE},
            "train": train, "sample_images": 0, "sample_steps": 2, **extra}


def stage_of(cfg: dict) -> LoRAStage:
    return LoRAStage(stage_config_from_dict(LoRAStageConfig, cfg))


# ----------------------------------------------------------------------------- the network


def test_step_0_is_the_base_model_and_only_the_lora_trains(models, images, tmp_path: Path) -> None:
    base_file = read_weights(models[ModelFamily.SD1] / "model.safetensors")
    stage = stage_of(lora_cfg(models[ModelFamily.SD1], images, tmp_path / "run", steps=30, targets="all",
                              train={"lr": 1e-2, "batch_size": 4}))
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 4, SIZE // 2, SIZE // 2, generator=g)
    probes: dict[int, float] = {}

    def probe(step: int, ctx) -> None:  # the loss at fixed t and noise on the 4 images
        if step in (1, 30):
            with torch.no_grad():
                probes[step] = float(ctx.modules["lora"](stage.instance.latents, stage.instance.text, t, noise).mean())

    build = stage.build

    def checked_build(ctx):  # at step 0 the network changes nothing: up = 0
        modules = build(ctx)
        net = modules["lora"].network
        assert all(not layer.up.any() and layer.down.abs().sum() > 0 for layer in net.layers.values())
        x, cond = stage.instance.latents[:1], encode_ids(stage.loaded.model, stage.loaded.tokenizer,
                                                         stage.instance.text["ids"][:1])["context"]
        with torch.no_grad():
            base = stage.loaded.model.unet(x, torch.tensor([500.0]), cond)
            with use_adapters(net.adapters()):
                assert torch.equal(stage.loaded.model.unet(x, torch.tensor([500.0]), cond), base)
        return modules

    stage.build = checked_build
    run_stage(stage, hooks=[probe])
    assert probes[30] < 0.7 * probes[1], probes
    module = stage.ctx.modules["lora"]
    names = [n for n, _ in module.named_parameters()]
    assert names and all(n.startswith("network.layers.lora_") for n in names)
    assert {k.split("_")[1] for k in module.network.layers} == {"unet", "te"}
    assert any(layer.up.abs().max() > 0 for layer in module.network.layers.values())  # it trained
    for k, v in stage.loaded.model.state_dict().items():  # the base is bit-identical to its file
        assert torch.equal(v, base_file[k]), k
    assert all(not p.requires_grad for p in stage.loaded.model.parameters())


def test_targets_pick_the_layers_sd_scripts_names(models) -> None:
    from opensd.checkpoints import load_model

    model = load_model(models[ModelFamily.SD1]).model
    attn = LoRANetwork(model, targets=LoRATargets.ATTN, text_encoder=False).layers
    ff = LoRANetwork(model, targets=LoRATargets.ATTN_FF).layers
    every = LoRANetwork(model, targets=LoRATargets.ALL).layers
    assert set(attn) < set(ff) < set(every)
    assert all(k.startswith("lora_unet_") and k.rsplit("_", 2)[-2:][0] in ("to", "out") for k in attn)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in attn
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj" in set(ff) - set(attn)
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in ff
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in ff
    conv = every["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.down.ndim == 4 and conv.down.shape[2:] == (3, 3) and conv.up.shape[2:] == (1, 1)
    assert not any("conv_in" in k or "time_embedding" in k for k in every)


# ----------------------------------------------------------------------------- checkpoints and resume


RESUME_SCRIPT = sigkill_resume_script("lora", "LoRAStage")


def test_exact_resume_after_sigkill_and_small_checkpoints(models, images, tmp_path: Path) -> None:
    """Text-encoder LoRA, EMA, drawn class images: killed twice, resumed, equal to an unbroken run."""
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)

    def cfg(out: Path) -> dict:
        return lora_cfg(models[ModelFamily.SD1], images, out, steps=6, class_prompt="a circle", num_class_images=2,
                        instance_prompt="a sks circle", train={"checkpoint_every": 2, "ema_decay": 0.9})

    def run(out: Path, kill_at: int = 0) -> int:
        p = subprocess.run([sys.executable, str(script), json.dumps(cfg(out)), str(kill_at)], env=ENV,
                           capture_output=True, text=True, timeout=300)
        if p.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(p.stderr[-3000:])
        return p.returncode

    a, b = tmp_path / "a", tmp_path / "b"
    ref = stage_of(cfg(a))
    run_stage(ref, resume=True)  # never stopped
    assert run(b, 2) == -signal.SIGKILL  # right after the step-2 checkpoint
    assert run(b, 3) == -signal.SIGKILL  # mid-interval: step 3 is lost
    assert [s for s, _ in list_checkpoints(b)] == [2]
    assert run(b) == 0
    ca = torch.load(a / "checkpoints/step_00000006.pt", weights_only=True)
    cb = torch.load(b / "checkpoints/step_00000006.pt", weights_only=True)
    for key in ("modules", "optimizers", "ema", "rng", "data", "step"):
        assert_states_equal(ca[key], cb[key], key)
    wa, wb = read_weights(a / "a.safetensors"), read_weights(b / "b.safetensors")
    assert_states_equal(wa, wb)
    assert (a / "class_images/00000001.png").read_bytes() == (b / "class_images/00000001.png").read_bytes()
    # the checkpoint is the LoRA's parameters, optimiser, EMA and RNG: far below the base model
    assert set(ca["modules"]) == {"lora"} and all(k.startswith("network.layers.") for k in ca["modules"]["lora"])
    size, base = (a / "checkpoints/step_00000006.pt").stat().st_size, (models[ModelFamily.SD1] / "model.safetensors").stat().st_size
    assert size < base / 8, (size, base)
    assert "ema" in ca and ca["ema"]["lora"]["num_updates"] == 6


# ----------------------------------------------------------------------------- the file


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])


def test_the_kohya_file_reads_back_as_the_trained_network(models, images, tmp_path: Path) -> None:
    stage = stage_of(lora_cfg(models[ModelFamily.SD1], images, tmp_path / "run", steps=3, targets="all",
                              output_name="style", training_comment="a test", train={"lr": 1e-2}))
    result = run_stage(stage)
    assert result.export == tmp_path / "run/style.safetensors"
    lora = LoRAFile.load(result.export)
    net = stage.ctx.modules["lora"].network
    assert set(lora.layers) == set(net.layers) and set(lora.layers) <= set(kohya_names(stage.loaded.model))
    meta = lora.metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4" and json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "style"
    assert meta["ss_training_comment"] == "a test" and meta["ss_num_train_images"] == "4"
    pipe = stage.pipeline()
    req = GenerationRequest("a red circle 1", steps=3, sampler="euler", cfg_scale=4.0, width=SIZE, height=SIZE, seed=3)
    trained = pipe.generate(req, networks=RequestNetworks(net.adapters())).images
    bound = bind_loras(pipe.model, [LoRAUse(lora)])
    read_back = pipe.generate(req, networks=RequestNetworks(bound)).images
    base = pipe.generate(req).images
    assert np.array_equal(_pixels(trained), _pixels(read_back))
    assert np.abs(_pixels(trained) - _pixels(base)).max() > 0  # the LoRA does something


def test_diffusers_load_lora_weights_draws_the_same_images(tmp_path: Path) -> None:
    """A tiny SD 1.x diffusers folder; a network with random factors on every target (LoCon
    included, and the text encoder), exported; diffusers' load_lora_weights equals opensd."""
    import diffusers

    import opensd
    from opensd.checkpoints.diffusers_folder import save_diffusers
    from opensd.checkpoints.io import write_safetensors

    model, tok = tiny_family_model(ModelFamily.SD1)
    folder = save_diffusers(model, tok, tmp_path / "sd1")
    pipe = opensd.load(folder)
    net = LoRANetwork(pipe.model, rank=2, alpha=3.0, targets=LoRATargets.ALL, text_encoder=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / "l.safetensors"
    write_safetensors(net.kohya_state(), path, metadata=kohya_metadata(net, {}))
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    req = GenerationRequest("a red circle", steps=4, sampler="euler", cfg_scale=5.0, width=32, height=32)
    ours = pipe.generate(req, latents=lat, networks=RequestNetworks(bind_loras(pipe.model, [LoRAUse(LoRAFile.load(path))])))
    base = pipe.generate(req, latents=lat)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(str(path))
    want = ref("a red circle", num_inference_steps=4, guidance_scale=5.0, height=32, width=32, latents=lat.clone(),
               output_type="np").images
    assert np.abs(_pixels(ours.images) - want).max() <= 1e-3 + 0.5 / 255  # ours are 8-bit
    assert np.abs(_pixels(base.images) - want).max() > 0.05  # diffusers applied the LoRA


def test_sdxl_trains_both_text_encoders_and_reads_back(models, images, tmp_path: Path) -> None:
    stage = stage_of(lora_cfg(models[ModelFamily.SDXL], images, tmp_path / "run", steps=2, train={"lr": 1e-2}))
    result = run_stage(stage)
    lora = LoRAFile.load(result.export)
    prefixes = {k.split("_")[1] for k in lora.layers}
    assert prefixes == {"unet", "te1", "te2"} and lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in lora.layers  # LDM names, as sd-scripts
    assert {f"lora_te2_text_model_encoder_layers_0_self_attn_{q}_proj" for q in "qkv"} <= set(lora.layers)
    model, tok = stage.loaded.model, stage.loaded.tokenizer
    ids = tok(["a red circle"])
    net = stage.ctx.modules["lora"].network
    with torch.no_grad():
        with use_adapters(net.adapters()):
            want = encode_ids(model, tok, ids)
        with use_adapters(bind_loras(model, [LoRAUse(lora)])):
            got = encode_ids(model, tok, ids)
        base = encode_ids(model, tok, ids)
    for k in ("context", "pooled"):
        assert torch.equal(got[k], want[k]) and not torch.equal(got[k], base[k]), k


@pytest.mark.parametrize("family", list(ModelFamily))
def test_training_text_encoding_is_the_pipelines(family) -> None:
    from opensd.pipelines.conditioning import Conditioner
    from opensd.training.unet import caption_encoder

    model, tok = tiny_family_model(family)
    captions = ["a red circle", "two blue squares"]
    want = caption_encoder(Conditioner(model, tok, budget=None), tok)(captions)
    got = encode_ids(model, tok, tok(captions))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ----------------------------------------------------------------------------- DreamBooth data


def test_prior_preservation_with_a_caption_less_class_folder(models, images, tmp_path: Path) -> None:
    prior = tmp_path / "dogs"
    prior.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):  # kohya-style regularisation images: no captions, the class prompt for all
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(prior / f"{i}.png")
    stage = stage_of(lora_cfg(models[ModelFamily.SD1], images, tmp_path / "run", steps=2, prior_data=str(prior),
                              class_prompt="a dog", instance_prompt="a sks dog", prior_weight=0.5,
                              text_encoder=False))
    run_stage(stage)
    assert stage.classes is not None and len(stage.classes) == 3 and stage.classes.captions == ["a dog"] * 3
    assert set(stage.instance.captions) == {"a sks dog"} and "context" in stage.instance.text  # cached: frozen text
    rows = [r for r in read_log(stage.ctx.run_dir / "log.jsonl") if r["kind"] == "train"]
    for r in rows:
        assert r["loss"] == pytest.approx(r["instance_loss"] + 0.5 * r["prior_loss"], rel=1e-5)
    assert not (stage.ctx.run_dir / "class_images").exists()


def test_bad_input_is_one_line(models, images, tmp_path: Path) -> None:
    from opensd.errors import OpenSDError

    with pytest.raises(ConfigError, match="targets"):
        stage_of(lora_cfg(models[ModelFamily.SD1], images, tmp_path / "a", targets="convs"))
    with pytest.raises(OpenSDError, match="does not exist") as e:
        run_stage(stage_of(lora_cfg(models[ModelFamily.SD1], tmp_path / "nowhere", tmp_path / "b")))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        stage_of(lora_cfg(models[ModelFamily.SD1], images, tmp_path / "c", rank=0))
    with pytest.raises(ConfigError, match="model: model not found"):
        run_stage(stage_of(lora_cfg(tmp_path / "no-model", images, tmp_path / "d")))


# ----------------------------------------------------------------------------- the command line


def test_cli_trains_a_lora_that_generate_uses(models, images, tmp_path: Path) -> None:
    from test_training import cli_app
    from typer.testing import CliRunner

    out = tmp_path / "run"
    args = ["train", "lora", "--model", str(models[ModelFamily.SD1]), "--data", str(images), "--out", str(out),
            "--steps", "3", "--batch-size", "2", "--image-size", str(SIZE), "--rank", "2", "--alpha", "1",
            "--targets", "attn", "--no-text-encoder", "--instance-prompt", "a sks circle", "--lr", "1e-2",
            "--set", "sample_steps=2", "--set", "sample_images=2", "-q"]
    res = CliRunner().invoke(cli_app(), args)
    assert res.exit_code == 0, res.output
    assert "lora: 3 steps" in res.output and f"exported {out / 'run.safetensors'}" in res.output
    assert (out / "samples/step_00000003.png").is_file()
    lora = LoRAFile.load(out / "run.safetensors")
    assert lora.metadata["ss_network_dim"] == "2" and all(k.startswith("lora_unet_") for k in lora.layers)
    # opensd generate --lora draws what the Python API draws with the file bound, and not the base image
    from opensd.cli.main import app

    gen = ["generate", "a sks circle", "-m", str(models[ModelFamily.SD1]), "--steps", "2", "--width", str(SIZE),
           "--height", str(SIZE), "--seed", "1", "-q"]
    res = CliRunner().invoke(app, [*gen, "--lora", str(out / "run.safetensors"), "--out", str(tmp_path / "lora.png")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*gen, "--out", str(tmp_path / "base.png")])
    assert res.exit_code == 0, res.output
    import opensd

    pipe = opensd.load(models[ModelFamily.SD1])
    req = GenerationRequest("a sks circle", steps=2, width=SIZE, height=SIZE, seed=1)
    want = pipe.generate(req, networks=RequestNetworks(bind_loras(pipe.model, [LoRAUse(lora)]))).images[0]
    got = np.asarray(Image.open(tmp_path / "lora.png").convert("RGB"))
    assert np.array_equal(got, np.asarray(want.convert("RGB")))
    assert not np.array_equal(got, np.asarray(Image.open(tmp_path / "base.png").convert("RGB")))
    res = CliRunner().invoke(cli_app(), args)
    assert res.exit_code == 2 and "already holds checkpoints" in res.output


# ----------------------------------------------------------------------------- textual inversion


def embedding_stage(model: Path, data: Path, out: Path, steps: int = 4, **extra):
    from opensd.training.embedding import EmbeddingStage, EmbeddingStageConfig

    cfg = lora_cfg(model, data, out, steps, token="sks", init_word="circle", **extra)
    cfg["train"] = {**cfg["train"], "lr": 5e-2}
    return EmbeddingStage(stage_config_from_dict(EmbeddingStageConfig, cfg))


@pytest.mark.parametrize("family", [ModelFamily.SD1, ModelFamily.SDXL])
def test_embedding_trains_only_its_vectors_and_reads_back(models, images, tmp_path: Path, family) -> None:
    from opensd.checkpoints.embeddings import bind_embedding, read_embedding

    stage = embedding_stage(models[family], images, tmp_path / "run", steps=3, vectors=1)
    build = stage.build

    def checked_build(ctx):  # at step 0 "a photo of sks" is "a photo of circle", bit for bit
        modules = build(ctx)
        conditioner = modules["embedding"].frozen.conditioner
        with torch.no_grad():
            got = modules["embedding"].encode(["a photo of sks"])
            want = conditioner.encode(["a photo of circle"])
        assert torch.equal(got.context, want.context)
        assert (got.pooled is None) == (family is ModelFamily.SD1)
        assert got.pooled is None or torch.equal(got.pooled, want.pooled)
        return modules

    stage.build = checked_build
    result = run_stage(stage)
    module = stage.ctx.modules["embedding"]
    model = stage.loaded.model
    assert [n for n, _ in module.named_parameters()] == [f"vectors.{i}" for i in range(len(model.text_encoders))]
    from safetensors import safe_open

    with safe_open(str(result.export), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert keys == ({"clip_l", "clip_g"} if family is ModelFamily.SDXL else {"emb_params"})
    assert meta["name"] == "sks" and meta["step"] == "3" and result.export.name == "sks.safetensors"
    # the file, read and bound as inference does, encodes a prompt as the trained vectors do
    ti = bind_embedding(read_embedding(result.export), model)
    assert ti.name == "sks" and ti.count == 1
    with torch.no_grad():
        trained = module.encode(["a sks, in the style of a photo"])
        read_back = module.frozen.conditioner.encode(["a sks, in the style of a photo"], embeddings={"sks": ti})
        start = module.frozen.conditioner.encode(["a circle, in the style of a photo"])
    assert torch.equal(trained.context, read_back.context)
    assert not torch.equal(trained.context, start.context)  # it trained; the base did not change (the start above)


def test_embedding_resume_after_a_crash_is_exact(models, images, tmp_path: Path) -> None:
    def make(out: Path):
        return embedding_stage(models[ModelFamily.SD1], images, out, steps=6, vectors=3,
                               train={"checkpoint_every": 2, "ema_decay": 0.9})

    ref = make(tmp_path / "a")
    run_stage(ref)

    def crash(step: int, ctx) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(make(tmp_path / "b"), hooks=[crash])
    resumed = make(tmp_path / "b")
    run_stage(resumed, resume=True)
    assert_states_equal(ref.ctx.modules["embedding"].state_dict(), resumed.ctx.modules["embedding"].state_dict())
    assert_states_equal(ref.ctx.emas["embedding"].shadow, resumed.ctx.emas["embedding"].shadow)
    state = torch.load(tmp_path / "b/checkpoints/step_00000006.pt", weights_only=True)
    assert list(state["modules"]["embedding"]) == ["vectors.0"] and state["modules"]["embedding"]["vectors.0"].shape[0] == 3
    assert_states_equal(read_weights(tmp_path / "a/sks.safetensors"), read_weights(tmp_path / "b/sks.safetensors"))


def test_cli_trains_an_embedding(models, images, tmp_path: Path) -> None:
    from test_training import cli_app
    from typer.testing import CliRunner

    out = tmp_path / "run"
    args = ["train", "embedding", "--model", str(models[ModelFamily.SD1]), "--data", str(images), "--out", str(out),
            "--token", "sks", "--init-word", "circle", "--vectors", "2", "--steps", "2", "--batch-size", "2",
            "--image-size", str(SIZE), "--set", "sample_steps=2", "--set", "sample_images=1", "-q"]
    res = CliRunner().invoke(cli_app(), args)
    assert res.exit_code == 0, res.output
    assert f"exported {out / 'sks.safetensors'}" in res.output and (out / "samples/step_00000002.png").is_file()
    assert read_weights(out / "sks.safetensors")["emb_params"].shape == (2, 32)
    from opensd.cli.main import app

    gen = ["generate", "a photo of sks", "-m", str(models[ModelFamily.SD1]), "--steps", "2", "--width", str(SIZE),
           "--height", str(SIZE), "--seed", "1", "-q"]
    res = CliRunner().invoke(app, [*gen, "--embeddings-dir", str(out), "--out", str(tmp_path / "ti.png")])
    assert res.exit_code == 0, res.output
    assert "TI hashes" in Image.open(tmp_path / "ti.png").info["parameters"]  # the prompt used the trained embedding
    res = CliRunner().invoke(cli_app(), [*args[:-1], "--set", "templates=['a photo']", "--resume"])
    assert res.exit_code == 2 and "{}" in res.output and "\n" not in res.output.strip()


@pytest.mark.parametrize("family,text_encoder", [(ModelFamily.SD1, True), (ModelFamily.SD1, False),
                                                 (ModelFamily.SDXL, True), (ModelFamily.SDXL, False)])
def test_caption_dropout_trains_on_the_empty_prompt(models, images, tmp_path: Path, family, text_encoder) -> None:
    cfg = lora_cfg(models[family], images, tmp_path / "run", steps=2, caption_dropout=0.99, text_encoder=text_encoder)
    stage = stage_of(cfg)
    seen: list[dict] = []
    lora_forward = None

    def probe(step: int, ctx) -> None:
        nonlocal lora_forward
        if lora_forward is None:
            module = ctx.modules["lora"]
            lora_forward = module.forward

            def spy(x0, text, t, noise):
                seen.append({k: v.clone() for k, v in text.items()})
                return lora_forward(x0, text, t, noise)
            module.forward = spy

    run_stage(stage, hooks=[probe])
    assert seen, "the loss was never called"
    text = seen[-1]
    empty = stage.empty
    for k, v in text.items():
        if k == "zero":
            assert v.all()
            continue
        assert torch.equal(v, empty[k].expand_as(v)), k  # p = 0.99: every caption of the batch dropped
    if family is ModelFamily.SDXL and not text_encoder:
        assert all(v.abs().max() == 0 for k, v in text.items())
    assert ("zero" in text) == (family is ModelFamily.SDXL and text_encoder)
    with pytest.raises(ConfigError, match="caption_dropout must be in"):
        stage_of(lora_cfg(models[family], images, tmp_path / "bad", caption_dropout=1.0))
