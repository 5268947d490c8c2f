"""Stopping a run: one exception, one way to ask, one way to check.

A generation stops at one of two kinds of place, and both end in :class:`Interrupted`:

* **After a sampling step.** A per-step callback (a sampler's ``callback(dict)``, a
  pipeline's ``StepCallback(StepInfo)``) asks to stop by returning ``False`` or
  :class:`Interrupted` (the class or an instance), or by raising :class:`Interrupted`;
  :func:`asks_to_stop` reads its answer. The sampler raises :class:`Interrupted` carrying
  the step and the latest latent; the pipeline then decodes its latest prediction and
  flags the result ``interrupted``.
* **Where there is no partial result** (between prompt chunks, VAE tiles, before the
  decode): ``should_stop()``, a :data:`StopCheck`, is polled with :func:`check_stop`,
  which raises :class:`Interrupted` when it answers True.

The server's jobs answer both (``opensd.serving.queue.Job``: ``callback`` and
``should_stop``) from their own reasons to stop: ``/interrupt``, ``/skip``, a client
that went away, the time limit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StopCheck = Callable[[], bool]  # should_stop() -> True: stop now


class Interrupted(Exception):
    """Raised (by a callback, or for it by the sampler or :func:`check_stop`) to stop a run.

    ``step``: the step index at which sampling stopped (None outside sampling); ``x``: the
    latest latent, where there is one.
    """

    def __init__(
        self, message: str = "sampling interrupted", *, step: int | None = None, x: torch.Tensor | None = None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.x = x


def asks_to_stop(answer: object) -> bool:
    """Whether a per-step callback's return value asks to stop: ``False``, or :class:`Interrupted`
    (the class or an instance). Anything else (None, True, ...) lets the run go on."""
    return answer is False or answer is Interrupted or isinstance(answer, Interrupted)


def check_stop(should_stop: StopCheck | None, where: str) -> None:
    """Raise :class:`Interrupted` when ``should_stop()`` says so (outside sampling there is no
    partial image); ``where`` names what the run was doing."""
    if should_stop is not None and should_stop():
        raise Interrupted(f"stopped while {where}")
