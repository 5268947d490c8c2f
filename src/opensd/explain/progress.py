"""A progress bar over the sampling steps of one or several generations (``opensd explain``, ``interpolate``).

:class:`StepProgress` is a pipeline step callback (it receives a
:class:`~opensd.pipelines.stable_diffusion.StepInfo` per finished step). It draws
one tqdm bar on stderr whose total is ``runs`` times the steps of a run, so an
interpolation of 8 frames of 20 steps shows one bar of 160 steps with its ETA.
Disabled, it draws nothing and costs nothing. Close it (or use it as a context
manager) so the bar's last line is finished.
"""

from __future__ import annotations

import sys
from typing import Any


class StepProgress:
    """A step callback drawing one tqdm bar over ``runs`` generations; nothing when not ``enabled``."""

    def __init__(self, runs: int = 1, *, desc: str = "sampling", enabled: bool = True, file: Any = None) -> None:
        self.runs, self.desc, self.enabled = runs, desc, enabled
        self.file = file
        self.bar: Any = None  # a tqdm bar once the first step arrives

    def __call__(self, info) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=info.total * self.runs, desc=self.desc, unit="step",
                            file=self.file if self.file is not None else sys.stderr, dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["StepProgress"]
