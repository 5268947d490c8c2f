"""A request's ControlNets: control units, and the residuals they add at every U-Net call.

Zhang, Rao & Agrawala 2023 ("Adding Conditional Control to Text-to-Image Diffusion
Models"). A :class:`ControlUnit` is one ControlNet with its control image and settings,
as a unit of A1111's ControlNet extension: the image (None: the img2img / inpaint image),
its ``preprocessor`` (:mod:`opensd.pipelines.preprocessors`), how it is fitted to the
output size (``resize``, :mod:`opensd.pipelines.control_resize`), a ``weight``, and the
part of the run it acts on (``start``/``end``, fractions of the steps). Units travel
with the request in :class:`~opensd.pipelines.networks.RequestNetworks` (``control``):
nothing is set on the model or on a ControlNet, so one loaded ControlNet serves any number
of requests at once.

Per run, :meth:`ControlRun.prepare` preprocesses and fits each unit's image once; then at
every call of the guided U-Net (:meth:`ControlRun.residuals`), each unit whose window
holds the current step runs its ControlNet on the U-Net's own input (the latent part of
a 9-channel inpainting input, as A1111 does), its residuals are scaled and summed over
the units (diffusers' ``MultiControlNetModel``), and the U-Net adds them
(:class:`~opensd.models.unet.ControlResiduals`).

Steps (A1111's ``guidance_schedule_handler``): step i of n (0-based, n the steps the run
takes, img2img's ``int(steps * strength)``) is controlled when ``start <= i / n <= end``;
the step counter advances in the per-step callback, so both calls of a two-call sampler
(Heun, DPM2) are one step. diffusers' ``control_guidance_end`` e keeps step i while
``(i + 1) / n <= e``: its e is A1111's e - 1/n.

Control modes (:class:`ControlMode`, A1111's ``soft_injection``/``cfg_injection``), for a
ControlNet with m residuals (13 in SD 1.x):

- ``Balanced``: every residual times ``weight``, on the cond and uncond halves of the
  guided batch (diffusers' default);
- ``My prompt is more important``: residual i times ``weight * 0.825 ** (m - 1 - i)``
  (the middle block's at full weight, the first skip's at 0.1), on both halves;
- ``ControlNet is more important``: those scales, on the conditional half only (the
  unconditional prediction runs without control, so CFG pushes toward the control);
- ``Guess mode``: diffusers' ``guess_mode``: the conditional half only, scales
  ``weight * logspace(-1, 0, m)`` (10 ** (-1/12) = 0.8254 per residual in SD 1.x: A1111's
  0.825, computed as diffusers does).

Which rows of the guided batch are conditional travels in the conditioning dicts
(``control_rows``: ones in ``cond``, zeros in ``uncond``), so the guidance's batching
(:mod:`opensd.diffusion.guidance`) carries it like any other conditioning tensor.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from opensd.checkpoints.controlnet import LoadedControlNet, controlnet_config_for, load_controlnet
from opensd.models.controlnet import ControlNet
from opensd.models.unet import ControlResiduals
from opensd.pipelines.conditioning import Conditioning
from opensd.pipelines.control_resize import ResizeMode, fit_map
from opensd.pipelines.images import to_unit_tensor
from opensd.pipelines.networks import NO_NETWORKS, RequestNetworks
from opensd.pipelines.preprocessors import MapKind, preprocess, preprocessor
from opensd.pipelines.request import GenerationRequest, RequestError

if TYPE_CHECKING:
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline

SOFT_BASE = 0.825  # A1111's soft injection, per residual from the middle block outwards
MAX_WEIGHT = 2.0  # A1111's weight slider
ROWS = "control_rows"  # the conditioning key marking the conditional rows


class ControlMode(enum.Enum):
    """How a unit's residuals are weighted and which guidance half they reach (module doc)."""

    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROL = "ControlNet is more important"
    GUESS = "Guess mode"

    @classmethod
    def parse(cls, value: ControlMode | str | int) -> ControlMode:
        """The mode for an enum, its A1111 label, its name (``balanced``, ``prompt``, ``control``,
        ``guess``) or A1111's API int (0, 1, 2)."""
        if isinstance(value, ControlMode):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 3:
            return list(cls)[value]
        if isinstance(value, str):
            key = value.strip().lower().replace("_", " ")
            for mode in cls:
                if key in (mode.value.lower(), mode.name.lower()):
                    return mode
        allowed = ", ".join(f"{m.value!r} ({m.name.lower()})" for m in cls)
        raise RequestError(f"unknown control mode {value!r}; allowed: {allowed}, or A1111's 0, 1, 2")

    @property
    def conditional_only(self) -> bool:
        return self in (ControlMode.CONTROL, ControlMode.GUESS)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_settings(
    pre: str, weight: Any, start: Any, end: Any, mode: Any, resize: Any, threshold_a: Any = None, threshold_b: Any = None,
) -> tuple[ControlMode, ResizeMode]:
    """A :class:`RequestError` (or :class:`~opensd.pipelines.preprocessors.PreprocessorError`)
    naming the first bad setting of a unit; the mode and resize mode parsed."""
    preprocessor(pre)  # unknown names: the list of known ones
    if not _number(weight) or not 0 <= weight <= MAX_WEIGHT:
        raise RequestError(f"control weight must be a number from 0 to {MAX_WEIGHT:g}, got {weight!r}")
    for name, v in (("start", start), ("end", end)):
        if not _number(v) or not 0 <= v <= 1:
            raise RequestError(f"control guidance {name} must be a fraction from 0 to 1, got {v!r}")
    if start > end:
        raise RequestError(f"control guidance start ({start}) must not be after its end ({end})")
    for name, v in (("threshold_a", threshold_a), ("threshold_b", threshold_b)):
        if v is not None and not _number(v):
            raise RequestError(f"control {name} must be a number, got {v!r}")
    return ControlMode.parse(mode), ResizeMode.parse(resize)


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet of a request and its settings (A1111's ControlNet unit)."""

    controlnet: LoadedControlNet | ControlNet
    image: Image.Image | None = None  # None: the img2img / inpaint image
    preprocessor: str = "none"
    weight: float = 1.0
    start: float = 0.0  # guidance start, a fraction of the steps
    end: float = 1.0  # guidance end
    mode: ControlMode | str | int = ControlMode.BALANCED
    resize: ResizeMode | str | int = ResizeMode.CROP
    resolution: int | None = None  # the preprocessor's resolution (None: the image's own)
    threshold_a: float | None = None
    threshold_b: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.controlnet, (LoadedControlNet, ControlNet)):
            raise RequestError(f"a control unit needs a ControlNet (load_controlnet), got {type(self.controlnet).__name__}")
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise RequestError(f"a control unit's image must be a PIL image or None, got {type(self.image).__name__}")
        mode, resize = check_settings(self.preprocessor, self.weight, self.start, self.end, self.mode, self.resize,
                                      self.threshold_a, self.threshold_b)
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "resize", resize)

    @property
    def net(self) -> ControlNet:
        return self.controlnet.model if isinstance(self.controlnet, LoadedControlNet) else self.controlnet

    @property
    def title(self) -> str:
        return self.controlnet.title if isinstance(self.controlnet, LoadedControlNet) else "ControlNet"

    def infotext(self) -> str:
        """A1111's ``ControlNet N`` infotext value."""
        mode, resize = ControlMode.parse(self.mode), ResizeMode.parse(self.resize)
        return (f"Module: {self.preprocessor}, Model: {self.title}, Weight: {self.weight:g}, Resize Mode: {resize.value}, "
                f"Guidance Start: {self.start:g}, Guidance End: {self.end:g}, Control Mode: {mode.value}")

    def control_map(self, fallback: Image.Image | None, width: int, height: int) -> Image.Image:
        """The unit's image (or ``fallback``), preprocessed and fitted to ``width`` x ``height``."""
        source = self.image if self.image is not None else fallback
        if source is None:
            raise RequestError("a control unit without an image needs an img2img or inpaint image to take it from; "
                               "give the unit a control image")
        mapped = preprocess(self.preprocessor, source, resolution=self.resolution,
                            threshold_a=self.threshold_a, threshold_b=self.threshold_b)
        return fit_map(mapped, width, height, ResizeMode.parse(self.resize), preprocessor(self.preprocessor).kind)

    def cropped(self, fallback: Image.Image | None, size: tuple[int, int], box: tuple[int, int, int, int]) -> ControlUnit:
        """The unit for an "only masked" crop: its map at ``size``, cut to ``box`` (in that
        image) and stretched to ``size`` again, as A1111 crops the control image."""
        full = self.control_map(fallback, *size)
        region = fit_map(full.crop(box), *size, ResizeMode.RESIZE, preprocessor(self.preprocessor).kind)
        flat = preprocessor(self.preprocessor).kind is MapKind.FLAT  # the map is made: only how it is resized stays
        return dataclasses.replace(self, image=region, preprocessor="segmentation" if flat else "none", resolution=None,
                                   resize=ResizeMode.RESIZE)


def control_infotext(units: Sequence[ControlUnit]) -> dict[str, str]:
    """``ControlNet 0``, ``ControlNet 1``... as A1111 writes them."""
    return {f"ControlNet {i}": u.infotext() for i, u in enumerate(units)}


def with_control(networks: RequestNetworks | None, units: Sequence[ControlUnit] | None) -> RequestNetworks | None:
    """``networks`` (None: none) with the control ``units`` added, and their ``ControlNet N``
    infotext fields numbered over all of its units."""
    if not units:
        return networks
    base = networks or NO_NETWORKS
    every = base.control + tuple(units)
    info = {k: v for k, v in base.infotext.items() if not k.startswith("ControlNet ")} | control_infotext(every)
    return dataclasses.replace(base, control=every, infotext=info)


def cropped_control(networks: RequestNetworks | None, size: tuple[int, int], box: tuple[int, int, int, int] | None) -> RequestNetworks | None:
    """``networks`` for an "only masked" inpainting of ``box`` (None: the whole picture): the
    units that bring their own image get it fitted to ``size`` and cropped as the image is
    (:meth:`ControlUnit.cropped`); the others take the cropped image itself."""
    if networks is None or not networks.control or box is None:
        return networks
    units = tuple(u.cropped(None, size, box) if u.image is not None else u for u in networks.control)
    return dataclasses.replace(networks, control=units)


def controlnet_for(pipe: StableDiffusionPipeline, path: Any) -> LoadedControlNet:
    """The ControlNet at ``path`` loaded for ``pipe``'s model: strict, in its dtype, on its device."""
    loaded = load_controlnet(path, pipe.cfg, dtype=pipe.model.dtype)
    loaded.model.to(pipe.model.device)
    return loaded


def _to_hint(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return to_unit_tensor(image).to(device, dtype)  # (1, 3, H, W) in [0, 1]


class ControlRun:
    """One run's control: its units, their control images as tensors and the step counter.

    Made per request by :meth:`prepare`; the only state it keeps is the step, advanced by
    the callback :meth:`counting` wraps (never shared between runs)."""

    def __init__(self, units: Sequence[ControlUnit], hints: Sequence[torch.Tensor], total: int) -> None:
        self.units, self.hints, self.total = tuple(units), tuple(hints), max(1, total)
        self.step = 0

    @classmethod
    def prepare(
        cls, pipe: StableDiffusionPipeline, req: GenerationRequest, units: Sequence[ControlUnit], init_image: Image.Image | None,
    ) -> ControlRun | None:
        """The run's control for ``units`` (None when there are none), each checked against
        ``pipe``'s model and its image preprocessed and fitted to the request's size."""
        if not units:
            return None
        dev, dtype = pipe.model.device, pipe.model.dtype
        hints = []
        for i, unit in enumerate(units):
            if not isinstance(unit, ControlUnit):
                raise RequestError(f"control unit {i} must be a ControlUnit, got {type(unit).__name__}")
            check_fits(unit.net, pipe, i)
            hints.append(_to_hint(unit.control_map(init_image, req.width, req.height), dev, dtype))
        total = int(req.steps * req.strength) if req.strength < 1.0 else req.steps
        return cls(units, hints, total)

    def attach(
        self, cond: Conditioning, uncond: Conditioning | None, callback: Callable[..., Any] | None,
    ) -> tuple[Conditioning, Conditioning | None, Callable[..., Any]]:
        """The run's conditioning dicts marked (:meth:`mark`) and its callback counting (:meth:`counting`)."""
        return (*self.mark(cond, uncond), self.counting(callback))

    def unet_kwargs(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None, rows: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> dict[str, ControlResiduals]:
        """``{"control": residuals}`` for a U-Net call on these inputs (cast to ``dtype``, the
        timesteps kept float32, as the U-Net gets them); ``{}`` when no unit acts on this step."""
        res = self.residuals(x.to(dtype), t.float(), context.to(dtype), None if y is None else y.to(dtype), rows)
        return {} if res is None else {"control": res}

    def counting(self, callback: Callable[..., Any] | None) -> Callable[..., Any]:
        """``callback`` (a per-step callback, or None) that also advances the step counter."""

        def counted(info: Any) -> Any:
            self.step = info.step
            return None if callback is None else callback(info)

        return counted

    def mark(self, cond: Conditioning, uncond: Conditioning | None) -> tuple[Conditioning, Conditioning | None]:
        """The conditioning dicts with ``control_rows``: 1 for each conditional row, 0 for each unconditional one."""
        rows = cond["context"].shape[0]
        marked = {**cond, ROWS: torch.ones(rows, device=cond["context"].device)}
        if uncond is None:
            return marked, None
        return marked, {**uncond, ROWS: torch.zeros(uncond["context"].shape[0], device=uncond["context"].device)}

    def active(self, unit: ControlUnit) -> bool:
        """Whether ``unit`` acts on the current step (``start <= step / total <= end``)."""
        frac = self.step / self.total
        return unit.start <= frac <= unit.end

    def residuals(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None, rows: torch.Tensor | None,
    ) -> ControlResiduals | None:
        """The summed residuals of the units acting now for the U-Net's input ``x`` (B, C, h, w)
        (latent channels first), ``t`` (B,), ``context`` and ``y``; ``rows`` (B,): 1 on the
        conditional rows (None: all are). None when no unit acts on this step."""
        total = None
        for unit, hint in zip(self.units, self.hints, strict=False):
            if not self.active(unit):
                continue
            res = _unit_residuals(unit, hint, x, t, context, y, rows)
            total = res if total is None else total + res
        return total


def _unit_residuals(
    unit: ControlUnit, hint: torch.Tensor, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
    y: torch.Tensor | None, rows: torch.Tensor | None,
) -> ControlResiduals:
    net, mode = unit.net, ControlMode.parse(unit.mode)
    x = x[:, : net.cfg.unet.in_channels]  # a 9-channel inpainting input: the latent part
    only = None
    if mode.conditional_only and rows is not None and not bool((rows > 0.5).all()):
        only = (rows > 0.5).nonzero().flatten()
        x, t, context, y = x[only], t[only], context[only], None if y is None else y[only]
    res = net(x, hint.expand(x.shape[0], -1, -1, -1), t, context, y)
    res = _scaled(res, unit.weight, mode)
    if only is None:
        return res
    assert rows is not None  # only is set from rows

    def spread(r: torch.Tensor) -> torch.Tensor:  # zeros on the unconditional rows
        full = r.new_zeros((rows.shape[0], *r.shape[1:]))
        full[only] = r
        return full

    return ControlResiduals(tuple(spread(r) for r in res.skips), spread(res.middle))


def _scaled(res: ControlResiduals, weight: float, mode: ControlMode) -> ControlResiduals:
    """Residual i of m times its scale (module doc)."""
    m = len(res.skips) + 1
    if mode is ControlMode.GUESS:  # as diffusers computes it: a float32 tensor of scales
        scales: torch.Tensor | list[float] = torch.logspace(-1, 0, m, device=res.middle.device) * weight
    elif mode is ControlMode.BALANCED:
        scales = [weight] * m
    else:
        scales = [weight * SOFT_BASE ** float(m - 1 - i) for i in range(m)]
    return ControlResiduals(tuple(r * s for r, s in zip(res.skips, scales, strict=False)), res.middle * scales[-1])


def check_fits(net: ControlNet, pipe: StableDiffusionPipeline, index: int = 0) -> None:
    """A :class:`RequestError` unless ``net`` is a ControlNet for ``pipe``'s model, on its device and in its dtype."""
    if not isinstance(net, ControlNet):
        raise RequestError(f"control unit {index}: not a ControlNet ({type(net).__name__})")
    want = controlnet_config_for(pipe.cfg, net.cfg.hint_block_channels, net.cfg.hint_channels)
    if net.cfg != want or net.cfg.downsample_factor != pipe.cfg.vae.downsample_factor:
        raise RequestError(f"control unit {index}: its ControlNet was made for another U-Net or VAE than this "
                           f"{pipe.cfg.family.value} model's; load it for this model (controlnet_for(pipe, path))")
    p = next(net.parameters())
    if p.device != pipe.model.device or p.dtype != pipe.model.dtype:
        raise RequestError(f"control unit {index}: the ControlNet is on {p.device} in {p.dtype}, the model on "
                           f"{pipe.model.device} in {pipe.model.dtype}; load it with controlnet_for(pipe, path)")
