"""The data source a config names, and the evaluator that source brings to a stage.

The one module of :mod:`opensd.training` that knows the shapes world exists, and it only
names it: for ``data.source = "shapes"`` it imports :mod:`opensd.shapes.source` (the
world as a :class:`~opensd.training.data.Source`) and :mod:`opensd.shapes.stage_eval`
(its judges) when asked, so training an image folder never loads the shapes world. The
stages and the trainer ask here and see only the generic protocols
(:class:`~opensd.training.data.Source`, :mod:`opensd.training.evaluation`).
"""

from __future__ import annotations

from typing import Any

from opensd.training.config import DataConfig, DataSource
from opensd.training.data import FolderSource, Source
from opensd.training.evaluation import FROM_DATA


def open_source(cfg: DataConfig) -> Source:
    """The source ``cfg`` describes: the shapes world, or an image-caption folder (a bad
    folder raises a ValueError naming it). With ``cfg.workers`` and a pool, the shapes
    world's pool is rendered up front in that many processes."""
    if cfg.source is DataSource.FOLDER:
        return FolderSource(cfg)
    from opensd.shapes.source import ShapesSource

    source = ShapesSource(cfg)
    if cfg.workers and source.pool:
        source.prefill(source.pool, cfg.workers)
    return source


def default_evaluator(stage: str, cfg: Any) -> Any | None:
    """The evaluator the data source of stage config ``cfg`` brings to stage ``stage`` (its
    ``name``): on the shapes world the judge of the ``vae``, ``taesd``, ``clip``, ``unet``,
    ``lcm``, ``segment`` or ``controlnet`` stage (:func:`opensd.shapes.stage_eval.judge_for`; none when
    ``eval_per_category``, or the segment stage's ``eval_scenes``, is 0); on an image folder,
    and for other stages, None."""
    data = getattr(cfg, "data", None)
    if not isinstance(data, DataConfig) or data.source is not DataSource.SHAPES:
        return None
    from opensd.shapes.stage_eval import judge_for

    return judge_for(stage, cfg)


def resolve_evaluator(evaluator: Any, stage: str, cfg: Any) -> Any | None:
    """``evaluator`` itself, or the data source's (:func:`default_evaluator`) for ``FROM_DATA``."""
    return default_evaluator(stage, cfg) if evaluator is FROM_DATA else evaluator
