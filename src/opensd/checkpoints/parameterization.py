"""What an original file's U-Net predicts: the noise (eps) or v (Salimans & Ho 2022).

A single file carries no scheduler config, and the two parameterizations have the same
weights' shapes, so the answer is read from what the file says, in this order
(:func:`resolve_prediction`):

1. an explicit override (``load_model(path, prediction=Prediction.V)``, ``--prediction v``);
2. the safetensors header's metadata: Stability's ModelSpec ``modelspec.prediction_type``
   (``"v"`` or ``"epsilon"``), else its ``modelspec.architecture`` when that names the
   parameterization (``stable-diffusion-v2-768-v``, ``stable-diffusion-v2-512``), else
   kohya's training metadata ``ss_v_parameterization`` (``"True"``/``"False"``);
3. ComfyUI's marker tensor ``v_pred`` in the state dict (an empty tensor that trainers
   and mergers add to v-prediction files);
4. SD 2.x without any of these: A1111's probe (:func:`probe_mean_offset`), since SD 2.x
   ships both a 768-v and a 512-eps model of one architecture;
5. otherwise eps, what SD 1.x and SDXL base were trained with.

Zero-terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed") is recorded only where the file says so: ComfyUI's ``ztsnr`` marker key or
kohya's ``ss_zero_terminal_snr`` metadata. opensd's schedules do not rescale betas to
zero terminal SNR, so such a model samples with its plain schedule, and ``opensd info``
says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from opensd.checkpoints.io import CheckpointError
from opensd.diffusion.schedules import Prediction
from opensd.models.stable_diffusion import ModelFamily
from opensd.models.unet import UNetModel

# Marker tensors that are no network weights; they are read here and set aside before loading.
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
MARKER_KEYS = frozenset({V_PRED_KEY, ZTSNR_KEY})

MODELSPEC_PREDICTION = "modelspec.prediction_type"
MODELSPEC_ARCHITECTURE = "modelspec.architecture"
KOHYA_V = "ss_v_parameterization"
KOHYA_ZTSNR = "ss_zero_terminal_snr"

_PREDICTION_VALUES = {"v": Prediction.V, "v_prediction": Prediction.V, "epsilon": Prediction.EPS, "eps": Prediction.EPS}
# ModelSpec architecture ids that fix the parameterization (the spec's own examples)
_ARCHITECTURES = {"stable-diffusion-v2-768-v": Prediction.V, "stable-diffusion-v2-512": Prediction.EPS}

# A1111's threshold on mean(out - x) (modules/sd_models_config.py, is_using_v_parameterization_for_sd2)
PROBE_THRESHOLD = -1.0


@dataclass(frozen=True)
class Parameterization:
    """A model's prediction, how it was found (``source``, one phrase), and whether the file
    says it was trained with zero terminal SNR (``zero_terminal_snr``: where it says so, or None)."""

    prediction: Prediction
    source: str
    decided: bool = True  # False: nothing said it, ``prediction`` is the default
    zero_terminal_snr: str | None = None

    @property
    def short(self) -> str:
        return "v" if self.prediction is Prediction.V else "eps"

    def describe(self) -> str:
        return f"{self.short}-prediction ({self.source})"


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (``{}`` for torch files or none)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # the parser of an untrusted file: whatever it raises, the file is at fault
        raise CheckpointError(f"{path}: unreadable safetensors header: {' '.join(str(e).split())[:200]}") from None
    return {str(k): str(v) for k, v in meta.items()}


def parse_prediction(value: str | Prediction | None) -> Prediction | None:
    """``"auto"``/None -> None, ``"eps"``/``"epsilon"`` -> EPS, ``"v"``/``"v_prediction"`` -> V."""
    if value is None or isinstance(value, Prediction):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text not in _PREDICTION_VALUES:
        raise CheckpointError(f"prediction must be auto, eps or v, got {value!r}")
    return _PREDICTION_VALUES[text]


def from_metadata(meta: Mapping[str, str]) -> tuple[Prediction, str] | None:
    """The prediction the header's metadata states, and where; None when it states none."""
    if MODELSPEC_PREDICTION in meta:
        value = meta[MODELSPEC_PREDICTION].strip().lower()
        if value not in _PREDICTION_VALUES:
            raise CheckpointError(
                f"the file's metadata says {MODELSPEC_PREDICTION} = {meta[MODELSPEC_PREDICTION]!r}; "
                "opensd runs 'v' and 'epsilon' models (override with --prediction eps|v)"
            )
        return _PREDICTION_VALUES[value], f"metadata {MODELSPEC_PREDICTION} = {meta[MODELSPEC_PREDICTION]!r}"
    arch = meta.get(MODELSPEC_ARCHITECTURE, "").strip().lower()
    if arch in _ARCHITECTURES:
        return _ARCHITECTURES[arch], f"metadata {MODELSPEC_ARCHITECTURE} = {arch!r}"
    flag = meta.get(KOHYA_V, "").strip().lower()
    if flag in ("true", "false"):
        return (Prediction.V if flag == "true" else Prediction.EPS), f"metadata {KOHYA_V} = {meta[KOHYA_V]!r}"
    return None


def zero_terminal_snr(meta: Mapping[str, str], keys: Iterable[str]) -> str | None:
    """Where the file says it was trained with zero terminal SNR; None where it does not."""
    if ZTSNR_KEY in set(keys):
        return f"the file's {ZTSNR_KEY!r} marker key"
    if meta.get(KOHYA_ZTSNR, "").strip().lower() == "true":
        return f"metadata {KOHYA_ZTSNR} = {meta[KOHYA_ZTSNR]!r}"
    return None


@torch.no_grad()
def probe_mean_offset(unet: UNetModel, num_train_timesteps: int = 1000) -> float:
    """A1111's v-prediction probe for SD 2.x: ``mean(unet(x, t_max, c) - x)`` on constants.

    ``x`` (1, C, 8, 8) and the context (1, 2, D) are all 0.5, ``t`` the last training
    step (999). Why it tells the two apart: at the last step ``alpha_bar`` is about
    0.005, so a noisy latent is almost all noise, ``x_t ~ sqrt(1 - alpha_bar) eps``. An
    eps network therefore answers with roughly its own input, and ``out - x`` averages
    near 0. A v network answers ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0``,
    about ``-x0``: minus its guess of the clean latent, which owes nothing to the input,
    so ``out - x`` is far from 0 and, on SD 2.x's 768-v weights, below -1 (A1111's
    threshold, :data:`PROBE_THRESHOLD`, measured on the released checkpoints). It is a
    heuristic for SD 2.x U-Nets only; the other families never need it.
    """
    p = next(unet.parameters())
    cfg = unet.cfg
    x = torch.full((1, cfg.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, cfg.context_dim), 0.5, dtype=p.dtype, device=p.device)
    t = torch.tensor([num_train_timesteps - 1], device=p.device)
    out = unet(x, t, context)
    return float((out[:, : x.shape[1]] - x[:, : out.shape[1]]).float().mean())


def resolve_prediction(
    override: Prediction | None,
    meta: Mapping[str, str],
    keys: Iterable[str],
    family: ModelFamily,
    probe: Callable[[], float],
) -> Parameterization:
    """The parameterization of an original file, in the order of this module's docstring.

    ``probe`` runs :func:`probe_mean_offset` on the loaded U-Net; it is called only for
    SD 2.x files that say nothing.
    """
    keys = list(keys)
    ztsnr = zero_terminal_snr(meta, keys)
    if override is not None:
        return Parameterization(override, "set by the caller (--prediction)", True, ztsnr)
    said = from_metadata(meta)
    if said is not None:
        return Parameterization(said[0], said[1], True, ztsnr)
    if V_PRED_KEY in keys:
        return Parameterization(Prediction.V, f"the file's {V_PRED_KEY!r} marker key", True, ztsnr)
    if family is ModelFamily.SD2:
        offset = probe_mean_offset_checked(probe)
        found = Prediction.V if offset < PROBE_THRESHOLD else Prediction.EPS
        return Parameterization(found, f"A1111's probe: mean(out - x) = {offset:.2f} at t=999, v below {PROBE_THRESHOLD:g}",
                                True, ztsnr)
    return Parameterization(Prediction.EPS, "the default: nothing in the file says v", False, ztsnr)


def probe_mean_offset_checked(probe: Callable[[], float]) -> float:
    """The probe's value; a NaN (broken weights) is a one-line error asking for an override."""
    value = probe()
    if value != value:
        raise CheckpointError("the v-prediction probe gave NaN (broken U-Net weights?); "
                              "set --prediction eps or v to load it anyway")
    return value
