"""Data-parallel training: two gloo processes on the CPU (torchrun) run all three stages and stay identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from test_training import ENV, assert_states_equal, clip_cfg, unet_cfg, vae_cfg

from opensd.training.loop import read_log

DDP_SCRIPT = """
import json, os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from opensd.training.clip import CLIPStage, CLIPStageConfig
from opensd.training.config import stage_config_from_dict
from opensd.training.loop import run_stage
from opensd.training.unet import UNetStage, UNetStageConfig
from opensd.training.vae import VAEStage, VAEStageConfig

cfgs, out = json.loads(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo")  # once for all three stages; run_stage leaves a group it did not make
rank = dist.get_rank()

def keep(name):
    def hook(step, ctx):
        if step == ctx.cfg.steps:
            state = {k: m.state_dict() for k, m in ctx.modules.items()}
            state["ema"] = {k: e.shadow for k, e in ctx.emas.items()}
            torch.save(state, os.path.join(out, f"{name}{rank}.pt"))
    return hook

for name, stage, cfg_cls in (("vae", VAEStage, VAEStageConfig), ("clip", CLIPStage, CLIPStageConfig),
                             ("unet", UNetStage, UNetStageConfig)):
    run_stage(stage(stage_config_from_dict(cfg_cls, cfgs[name])), hooks=[keep(name)])
dist.destroy_process_group()
"""


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    vcfg = vae_cfg(tmp_path / "vae", steps=3, log_every=1)
    vcfg["disc"] = {"enabled": True, "start_step": 1, "layers": 2, "channels": 16}
    ccfg = clip_cfg(tmp_path / "clip", steps=3, log_every=1)
    ucfg = unet_cfg(tmp_path / "unet", tmp_path / "vae", tmp_path / "clip", steps=3, log_every=1, ema_decay=0.9)
    ucfg["eval_per_category"] = 0
    cfgs = {"vae": vcfg, "clip": ccfg, "unet": ucfg}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(cfgs), str(tmp_path)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    for name in ("vae", "clip", "unet"):
        r0 = torch.load(tmp_path / f"{name}0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{name}1.pt", weights_only=True)
        assert_states_equal(r0, r1, name)  # each rank saw its own half of the batch: equal only if synced
        steps = [r["step"] for r in read_log(tmp_path / name / "log.jsonl") if r["kind"] == "train"]
        assert steps == [1, 2, 3]  # rank 0 alone writes the log
        ckpt = torch.load(tmp_path / name / "checkpoints/step_00000003.pt", weights_only=True)
        assert ckpt["world"] == 2 and len(ckpt["rng"]) == 2
    assert (tmp_path / "unet/model/model.safetensors").is_file()
