"""The stage contract's ``trainable()``: a group's optimiser, EMA and checkpoints cover what
the stage trains and nothing else, even with a frozen model registered inside its module;
a resumed run is still exact; a stage or a checkpoint that breaks the contract is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opensd.training.checkpoint_store import atomic_save
from opensd.training.config import StageConfig, TrainConfig
from opensd.training.loop import ResumeError, run_stage
from opensd.training.stage import Stage, StageContractError, Trainable, Update

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class ToyConfig(StageConfig):
    train: TrainConfig = field(default_factory=TrainConfig)


class Probe(nn.Module):
    """A frozen 'base model' registered as a child, a trained head, a persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 1)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return F.mse_loss(self.head(torch.tanh(self.base(x))).squeeze(-1), y)


class ToyStage(Stage):
    name = "toy"
    ema_groups = ("toy",)

    def build(self, ctx):
        self.ctx = ctx
        return {"toy": Probe()}

    def batch(self, step: int):
        x = torch.randn(4, 8, generator=self.ctx.generator(step))
        return x, x.sum(dim=1).sin()

    def updates(self, batch, step: int):
        loss = self.ctx.wrapped["toy"](*batch)
        yield Update("toy", loss, {"loss": loss})


class HeadOnly(ToyStage):
    """Names its trained part explicitly: the head, and the buffer as kept state."""

    def trainable(self):
        head = Trainable.of(self.ctx.modules["toy"].head, "head.")
        return {"toy": Trainable(head.parameters, ("seen",))}


def _cfg(out: Path, **train) -> ToyConfig:
    t = {"out_dir": str(out), "steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "ema_decay": 0.9,
         "log_every": 1, "sample_every": 0, "checkpoint_every": 2, "progress": False, **train}
    return ToyConfig(train=TrainConfig(**t))


def _checkpoint(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)


@pytest.mark.parametrize("cls", [ToyStage, HeadOnly], ids=["default", "explicit"])
def test_only_the_trained_parameters_are_stepped_averaged_and_saved(cls, tmp_path: Path) -> None:
    stage = cls(_cfg(tmp_path / "run"))
    run_stage(stage)
    probe = stage.ctx.modules["toy"]
    torch.manual_seed(stage.cfg.train.seed)  # the base's initial weights, which must not have moved
    untouched = nn.Linear(8, 8)
    assert torch.equal(probe.base.weight, untouched.weight) and float(probe.seen) == 6
    state = _checkpoint(tmp_path / "run", 6)
    assert sorted(state["modules"]["toy"]) == ["head.bias", "head.weight", "seen"]  # no base.*
    assert list(state["ema"]["toy"]["shadow"]) == ["head.weight", "head.bias"]
    assert [len(g["params"]) for g in state["optimizers"]["toy"]["param_groups"]] == [2]
    assert set(stage.ctx.emas["toy"].shadow) == {"head.weight", "head.bias"}
    averaged = stage.ctx.averaged("toy")  # the EMA copy: the averaged head on the same base weights
    assert torch.equal(averaged.head.weight, stage.ctx.emas["toy"].shadow["head.weight"])
    assert torch.equal(averaged.base.weight, probe.base.weight)


def test_resume_after_a_crash_is_exact_without_the_frozen_model_in_the_checkpoint(tmp_path: Path) -> None:
    ref = HeadOnly(_cfg(tmp_path / "a"))
    run_stage(ref)

    def crash(step: int, ctx) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(HeadOnly(_cfg(tmp_path / "b")), hooks=[crash])
    resumed = HeadOnly(_cfg(tmp_path / "b"))
    run_stage(resumed, resume=True)
    a, b = ref.ctx.modules["toy"].state_dict(), resumed.ctx.modules["toy"].state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = ref.ctx.emas["toy"].shadow, resumed.ctx.emas["toy"].shadow
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_a_checkpoint_holding_other_parts_is_one_line_naming_it(tmp_path: Path) -> None:
    run_stage(HeadOnly(_cfg(tmp_path / "run", steps=2)))
    path = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    state = torch.load(path, weights_only=True)
    state["modules"]["toy"]["base.weight"] = torch.zeros(8, 8)  # as if the frozen model had been saved
    atomic_save(state, path)
    with pytest.raises(ResumeError) as e:
        run_stage(HeadOnly(_cfg(tmp_path / "run", steps=4)), resume=True)
    msg = str(e.value)
    assert "does not fit this run's toy module" in msg and "base.weight, which this run does not train" in msg
    assert str(path) in msg and "\n" not in msg
    del state["modules"]["toy"]["base.weight"], state["modules"]["toy"]["seen"]
    atomic_save(state, path)
    with pytest.raises(ResumeError, match="it lacks seen"):
        run_stage(HeadOnly(_cfg(tmp_path / "run", steps=4)), resume=True)


def test_a_stage_naming_what_its_module_does_not_hold_is_refused(tmp_path: Path) -> None:
    stranger = nn.Parameter(torch.zeros(1))

    class Stranger(ToyStage):
        def trainable(self):
            return {"toy": Trainable({"head.weight": stranger})}

    class Unknown(ToyStage):
        def trainable(self):
            return {"toy": Trainable({}, ("nothing",))}

    class NoGroup(ToyStage):
        def trainable(self):
            return {}

    for cls, problem in ((Stranger, "not a parameter of its module"), (Unknown, "does not hold"),
                         (NoGroup, "gives groups")):
        with pytest.raises(StageContractError, match=problem):
            run_stage(cls(_cfg(tmp_path / cls.__name__)))
