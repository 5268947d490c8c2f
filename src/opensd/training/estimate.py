"""How long a training run will take: measured after its first steps, printed once.

:class:`TimeEstimate` is a :func:`opensd.training.loop.run_stage` hook. It starts its
clock after the first step of the run (which pays for warm-up), and once it has seen
``min_steps`` more steps and ``min_seconds`` of training it prints one line on stderr,
for example::

    train unet: about 3 h 20 min for 40,000 steps at 3.3 steps/s; --preset quick takes about 3 min

With ``train.time_limit`` it says where the limit will stop the run instead. The
steps are counted at the measured speed; evaluations and checkpoints add to it.
The progress bar keeps a live ETA (tqdm's ``<remaining>``) for the rest of the run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

MIN_STEPS = 5
MIN_SECONDS = 3.0
# Suggest --preset quick when a run would take longer than this.
SUGGEST_QUICK_AFTER = 15 * 60


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"3 h 20 min"``, ``"2 d 5 h"``: rounded to what matters."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    minutes = round(s / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def estimate_line(stage: str, steps: int, rate: float, *, time_limit: float = 0.0,
                  quick_seconds: float | None = None) -> str:
    """The estimate for a run of ``steps`` steps at ``rate`` steps/s (see the module docstring)."""
    need = steps / rate
    speed = f"{rate:.3g} steps/s"
    if time_limit and time_limit < need:
        line = (f"train {stage}: {steps:,} steps at {speed} would take about {format_duration(need)}; "
                f"train.time_limit stops the run after {format_duration(time_limit)}, at about "
                f"{int(time_limit * rate):,} steps")
    else:
        line = f"train {stage}: about {format_duration(need)} for {steps:,} steps at {speed}"
    if quick_seconds is not None and min(need, time_limit or need) > SUGGEST_QUICK_AFTER:
        line += f"; --preset quick takes about {format_duration(quick_seconds)}"
    return line


class TimeEstimate:
    """A run hook printing :func:`estimate_line` once, after the first few steps (rank 0 only).

    ``quick_seconds``: the quick preset's time for this stage, quoted when the run is long
    (``None``: not quoted, e.g. when the run is the quick preset). ``clock`` and ``write``
    are replaceable for tests.
    """

    def __init__(self, stage: str, total_steps: int, *, time_limit: float = 0.0, quick_seconds: float | None = None,
                 min_steps: int | None = None, min_seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, write: Callable[[str], Any] | None = None) -> None:
        self.stage, self.total, self.time_limit, self.quick_seconds = stage, total_steps, time_limit, quick_seconds
        self.min_steps = MIN_STEPS if min_steps is None else min_steps
        self.min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
        self.clock, self.write = clock, write or _write
        self.start: tuple[int, float] | None = None
        self.line: str | None = None

    def __call__(self, done: int, ctx: Any = None) -> None:
        if self.line is not None or (ctx is not None and not getattr(ctx, "is_main", True)) or done >= self.total:
            return
        now = self.clock()
        if self.start is None:
            self.start = (done, now)
            return
        steps, seconds = done - self.start[0], now - self.start[1]
        if steps < self.min_steps or seconds < self.min_seconds or seconds <= 0:
            return
        run_steps = self.total - self.start[0] + 1  # the steps of this run (a resumed one starts late)
        self.line = estimate_line(self.stage, run_steps, steps / seconds, time_limit=self.time_limit,
                                  quick_seconds=self.quick_seconds)
        self.write(self.line)


def _write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)  # above the progress bar, which tqdm redraws


__all__ = ["MIN_SECONDS", "MIN_STEPS", "TimeEstimate", "estimate_line", "format_duration"]
