"""``opensd train lcm``: latent consistency distillation into a LoRA.

The teacher's solver step is the guided DDIM step of opensd's own sampler stack; the
boundary condition and the EMA target network are what LCD says; a run killed and resumed
ends with the same weights as one that never stopped; the export is a LoRA that the
``lcm`` sampler, ``opensd generate --lora`` and the loader read.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_training import ENV, assert_states_equal, sigkill_resume_script
from test_training_lora import SIZE, save_tiny, write_images
from typer.testing import CliRunner

from opensd.checkpoints.io import read_weights
from opensd.checkpoints.lora import LoRAFile, LoRAUse, bind_loras
from opensd.config import ConfigError
from opensd.diffusion import ClassifierFreeGuidance, Denoiser, DiscreteSchedule
from opensd.diffusion.samplers import sample_ddim
from opensd.models.stable_diffusion import ModelFamily
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest
from opensd.training.config import stage_config_from_dict
from opensd.training.lcm import LCMStage, LCMStageConfig
from opensd.training.loop import list_checkpoints, run_stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_tiny(ModelFamily.SD1, tmp_path_factory.mktemp("lcm-teacher") / "sd1")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("lcm-data") / "data", n=6)


def lcm_cfg(model: Path, data: Path, out: Path, steps: int = 4, **extra) -> dict:
    train = {"out_dir": str(out), "steps": steps, "batch_size": 3, "lr": 1e-2, "warmup_steps": 0, "log_every": 1,
             "sample_every": 0, "checkpoint_every": 0, "progress": False, **extra.pop("train", {})}
    return {"model": str(model), "data": {"source": "folder", "path": str(data), "image_size": SIZE}, "train": train,
            "rank": 2, "alpha": 3.0, "eval_per_category": 0, "sample_images": 0, "sample_steps": 2, **extra}


def stage_of(cfg: dict) -> LCMStage:
    return LCMStage(stage_config_from_dict(LCMStageConfig, cfg))


def built(teacher: Path, images: Path, out: Path, **extra) -> tuple[LCMStage, torch.nn.Module]:
    from opensd.training.loop import _Trainer

    stage = stage_of(lcm_cfg(teacher, images, out, **extra))
    trainer = _Trainer(stage, False, [], 0, 1, 0)
    trainer._setup()
    return stage, stage.ctx.modules["lcm"]


# ----------------------------------------------------------------------------- the objective


def test_the_solver_step_is_a_guided_ddim_step(teacher, images, tmp_path: Path) -> None:
    stage, loss = built(teacher, images, tmp_path / "run")
    model, schedule = stage.loaded.model, DiscreteSchedule(stage.loaded.model.cfg.schedule)
    b, w = 3, 4.0
    cond = stage._unet_cond({k: v[:b] for k, v in stage.cond.items()})
    uncond = stage._unet_cond({k: v.expand(b, *v.shape[1:]) for k, v in stage.empty.items()})
    x_t = torch.randn(b, *stage.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    for index in (0, 7, 49):  # t = 19 -> s = 0 (alphas_cumprod[0]), 159 -> 139, 999 -> 979
        t = torch.full((b,), (index + 1) * 20 - 1)
        s = (t - 20).clamp(min=0)
        ours = loss._solver_step(x_t, t, s, cond, uncond, torch.full((b,), w))
        # opensd's sampler stack: CFG on the raw U-Net, eps -> x0, one DDIM step on [sigma_t, sigma_s]
        den = Denoiser(ClassifierFreeGuidance(lambda x, tt, **c: model.unet(x, tt, **c), scale=w), schedule)
        sig_t, sig_s = schedule.sigmas[t[0]].item(), schedule.sigmas[s[0]].item()
        with torch.no_grad():
            x = sample_ddim(den.with_quantize_t(True), x_t * math.sqrt(1 + sig_t**2), torch.tensor([sig_t, sig_s]),
                            extra_args={"cond": cond, "uncond": uncond})
        torch.testing.assert_close(ours, x / math.sqrt(1 + sig_s**2), rtol=1e-4, atol=1e-5)


def test_boundary_condition_and_target_network(teacher, images, tmp_path: Path) -> None:
    stage, loss = built(teacher, images, tmp_path / "run", target_decay=0.9)
    x = torch.randn(2, *stage.latents.shape[1:])
    cond = stage._unet_cond({k: v[:2] for k, v in stage.cond.items()})
    with torch.no_grad():  # at timestep 0 the consistency function is the identity (c_skip = 1, c_out = 0)
        assert torch.equal(loss._consistency(x, torch.zeros(2, dtype=torch.long), cond, loss.network), x)
        far = loss._consistency(x, torch.full((2,), 999), cond, loss.network)
    assert (far - x).abs().max() > 0.1  # elsewhere the model's x0
    student, target = loss.network.layers, loss.target.layers
    assert all(torch.equal(student[k].down, target[k].down) for k in student)  # the target starts as the student
    assert not any(p.requires_grad for p in loss.target.parameters())
    before = {k: (v.down.clone(), v.up.clone()) for k, v in target.items()}
    with torch.no_grad():
        for p in loss.network.parameters():
            p.add_(1.0)
    loss.update_target(0.9)  # target <- 0.9 target + 0.1 student
    for k, (down, up) in before.items():
        torch.testing.assert_close(target[k].down, 0.9 * down + 0.1 * student[k].down)
        torch.testing.assert_close(target[k].up, 0.9 * up + 0.1 * student[k].up)
    loss.update_target(0.0)
    assert all(torch.equal(student[k].up, target[k].up) for k in student)


def test_config_errors() -> None:
    for bad, match in (({"guidance_min": 5.0, "guidance_max": 3.0}, "guidance_max"), ({"loss": "l1"}, "loss"),
                       ({"target_decay": 1.0}, "target_decay"), ({"sample_steps": 60}, "original_steps"),
                       ({"output_name": "a/b"}, "output_name")):
        with pytest.raises(ConfigError, match=match):
            stage_config_from_dict(LCMStageConfig, bad)


# ----------------------------------------------------------------------------- a run


RESUME_SCRIPT = sigkill_resume_script("lcm", "LCMStage")


def test_exact_resume_after_sigkill_and_the_export(teacher, images, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT)

    def cfg(out: Path) -> dict:
        return lcm_cfg(teacher, images, out, steps=6, guidance_min=2.0, guidance_max=6.0, loss="l2",
                       train={"checkpoint_every": 2})

    def run(out: Path, kill_at: int = 0) -> int:
        p = subprocess.run([sys.executable, str(script), json.dumps(cfg(out)), str(kill_at)], env=ENV,
                           capture_output=True, text=True, timeout=300)
        if p.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(p.stderr[-3000:])
        return p.returncode

    a, b = tmp_path / "a", tmp_path / "b"
    ref = stage_of(cfg(a))
    result = run_stage(ref, resume=True)  # never stopped
    assert run(b, 2) == -signal.SIGKILL  # right after the step-2 checkpoint
    assert run(b, 3) == -signal.SIGKILL  # mid-interval: step 3 is lost
    assert [s for s, _ in list_checkpoints(b)] == [2]
    assert run(b) == 0
    ca = torch.load(a / "checkpoints/step_00000006.pt", weights_only=True)
    cb = torch.load(b / "checkpoints/step_00000006.pt", weights_only=True)
    for key in ("modules", "optimizers", "rng", "data", "step"):
        assert_states_equal(ca[key], cb[key], key)
    assert any(k.startswith("target.layers.") for k in ca["modules"]["lcm"])  # the target network is saved
    assert_states_equal(read_weights(a / "a.safetensors"), read_weights(b / "b.safetensors"))
    # the export: the student's LoRA in float16, kohya keys, the distillation recorded
    lora = LoRAFile.load(result.export)
    net = ref.ctx.modules["lcm"].network
    assert set(lora.layers) == set(net.layers) and all(k.startswith("lora_unet_") for k in lora.layers)
    assert any(k.endswith("resnets_0_conv1") for k in lora.layers)  # convolutions too (targets = all)
    assert all(v.dtype == torch.float16 for layer in lora.layers.values() for v in layer.tensors.values())
    assert lora.metadata["opensd_lcm_original_inference_steps"] == "50"
    assert json.loads(lora.metadata["opensd_lcm_guidance"]) == [2.0, 6.0]
    assert any(layer.up.abs().max() > 0 for layer in net.layers.values())  # it trained
    pipe = ref.pipeline()
    req = GenerationRequest("a red circle 1", steps=2, sampler="lcm", cfg_scale=1.0, width=SIZE, height=SIZE, seed=3)
    with_lora = pipe.generate(req, networks=RequestNetworks(bind_loras(pipe.model, [LoRAUse(lora)]))).images[0]
    assert with_lora.tobytes() != pipe.generate(req).images[0].tobytes()


def test_a_users_evaluator_draws_with_the_student(teacher, images, tmp_path: Path) -> None:
    seen: list = []

    def judge(draw, samples):
        drawn = draw(["a red circle", "a blue square"])
        seen.append((len(drawn), drawn[0].size, samples.name))
        return {"mine": 0.25}

    run_stage(LCMStage(stage_config_from_dict(LCMStageConfig, lcm_cfg(teacher, images, tmp_path / "run", steps=1,
                                                                     eval_per_category=1)), evaluator=judge))
    assert seen == [(2, (SIZE, SIZE), "step_00000001_eval.png")]
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert evals[-1]["mine"] == 0.25


def test_the_cli_trains_and_generate_uses_the_file(teacher, images, tmp_path: Path) -> None:
    from opensd.cli.main import app

    out = tmp_path / "run"
    args = ["train", "lcm", "-m", str(teacher), "--data", str(images), "--image-size", str(SIZE), "--out", str(out),
            "--steps", "2", "-b", "2", "--rank", "2", "--guidance", "3", "--output-name", "few", "-q",
            "--set", "eval_per_category=0", "--set", "sample_images=0", "--set", "sample_steps=2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "few.safetensors").is_file() and "exported" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["guidance_min"] == cfg["guidance_max"] == 3.0 and cfg["rank"] == 2
    res = CliRunner().invoke(app, ["generate", "a red circle", "-m", str(teacher), "--lora", str(out / "few.safetensors"),
                                   "--sampler", "lcm", "--steps", "2", "--cfg-scale", "1", "--seed", "1",
                                   "-o", str(tmp_path / "x.png"), "-q"])
    assert res.exit_code == 0, res.output
    assert "Lora hashes" in (tmp_path / "x.png").read_bytes().decode("latin-1")
