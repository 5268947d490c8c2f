"""What every CLI command shares: user-facing errors as one clear line, bugs as one line and a hint.

A :class:`~opensd.errors.OpenSDError` (bad input, a bad file) and the OS's own "file not
found"/"permission denied" print ``error: <message>`` on stderr and exit 2. Any other
exception is a bug in opensd: it prints ``internal error: <type>: <message>`` with a hint
to rerun with ``--debug`` (or ``OPENSD_DEBUG=1``), which shows the traceback, and exits 1.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import typer

from opensd.errors import OpenSDError

F = TypeVar("F", bound=Callable)

# Errors that describe bad input or a bad file: shown as one line, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (OpenSDError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

DEBUG_ENV = "OPENSD_DEBUG"

# The --device option every command that runs a model takes (opensd.devices.resolve_device reads it).
DEVICE = typer.Option(None, "--device", help="auto (CUDA, then MPS, else the CPU), cpu, cuda, cuda:N or mps. Default: auto.")

class PredictionChoice(enum.StrEnum):
    """--prediction's values: auto (what the model says), eps, v."""

    AUTO = "auto"
    EPS = "eps"
    V = "v"


# The --prediction option of the commands that load a model (opensd.checkpoints.load_model's prediction).
PREDICTION = typer.Option(
    PredictionChoice.AUTO, "--prediction", case_sensitive=False,
    help="What the model predicts: auto (what the file says: its metadata, a v_pred key, for SD 2.x "
    "A1111's probe; else eps), eps (the noise) or v (v-prediction, SD 2.x 768-v). docs/models.md.",
)

class PrecisionChoice(enum.StrEnum):
    """--precision's values: opensd.precision.Precision's, named here so that the CLI starts without torch."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


# The --precision option of the commands that run a model (opensd.precision; docs/precision.md).
PRECISION = typer.Option(
    PrecisionChoice.AUTO, "--precision", case_sensitive=False,
    help="Number format of the networks: auto (bf16 where this CPU computes it natively and a short probe at "
    "the model's shapes measures it faster, on a CUDA GPU its half type when faster; else fp32), fp32, bf16 or "
    "fp16 (slow on a CPU). Sampling stays fp32. docs/precision.md.",
)


@contextlib.contextmanager
def precision_warnings() -> Iterator[None]:
    """Inside: a precision that is slow here (fp16 on a CPU) is said in one ``warning:`` line on
    stderr, not as a Python warning with its source line."""
    from opensd.precision import PrecisionWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PrecisionWarning)
        yield
    for w in caught:
        if issubclass(w.category, PrecisionWarning):
            typer.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def load_pipeline(path, device, precision: PrecisionChoice | str = PrecisionChoice.AUTO, prediction: str | None = None, **kw):
    """The pipeline of the model at ``path`` on ``device`` in ``precision`` (:func:`precision_warnings`);
    ``kw``: the pipeline's other options (``tiny_vae``)."""
    import opensd

    with precision_warnings():
        return opensd.load(path, device=device, precision=getattr(precision, "value", precision), prediction=prediction, **kw)


# Models below this many U-Net parameters run on one CPU thread by default (see default_threads).
SMALL_MODEL_PARAMS = 100_000_000

THREADS = typer.Option(
    None, "--threads", min=1,
    help="CPU threads for torch. Default: 1 for models under 100M U-Net parameters (the bundled "
    "model: its operations are too small for more threads to pay, and on a busy machine threads "
    "stall each other), else torch's default (one per core).",
)


def default_threads(unet_params: int) -> int | None:
    """The CPU thread count for a model with ``unet_params`` U-Net parameters; None: torch's default.

    A small model's operations (the bundled 32 px model's convolutions and attention on
    8x8 latents) finish in microseconds, so more threads add a fork-join barrier per
    operation and gain nothing; on a machine whose cores are busy the barrier waits for a
    descheduled thread, which made 2 threads 10-30x slower than 1 (the measurement:
    ``scripts/measure_threads.py``). A model of SD 1.x size (860M U-Net parameters) has
    operations large enough to split, and keeps torch's default of one thread per core.
    """
    return 1 if unet_params < SMALL_MODEL_PARAMS else None


def use_threads(threads: int | None, model) -> int:
    """Set torch's CPU threads for running ``model`` (a :class:`~opensd.models.stable_diffusion.StableDiffusion`):
    ``threads`` when given, else :func:`default_threads`. Returns the count in use.
    Every command that runs a model calls this once, after loading it."""
    import torch

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OpenSDError(f"--threads must be an integer >= 1, got {threads!r}")
    if threads is None:
        threads = default_threads(sum(p.numel() for p in model.unet.parameters()))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def set_debug(on: bool) -> None:
    """``opensd --debug``: let unexpected exceptions show their traceback."""
    if on:
        os.environ[DEBUG_ENV] = "1"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (multi-line messages are joined)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def fail_cleanly(fn: F) -> F:
    """Run a command; a user error prints ``error: ...`` and exits 2, a bug prints one line and exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except USER_ERRORS as e:
            typer.echo(f"error: {one_line(e)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debug_enabled():
                raise
            typer.echo(f"internal error: {type(e).__name__}: {one_line(e)}", err=True)
            typer.echo(f"this is a bug in opensd; rerun with --debug (or {DEBUG_ENV}=1) to see the traceback", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
