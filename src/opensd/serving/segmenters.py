"""The segmenters that explain requests set beside their attention maps.

A request names no file: its ``segmenter`` is ``"auto"`` (the model's folder's
``segmenter.safetensors``, when it has one, as ``opensd explain --segmenter auto`` finds it:
:func:`opensd.explain.segmentation.find_segmenter`) or ``"none"``. So a client can make the
server read only the segmenter files that sit beside the models it serves, never a path of
its choosing.

:class:`SegmenterCache` loads each model's segmenter once
(:func:`opensd.explain.segmentation.load_for_explain`: CPU, float32, eval mode) and keeps it,
keyed by the file (its resolved path, so two names of one model share it) and re-read only
when the file's size or modification time changes. The requests that use it only read it: a
forward pass in ``no_grad`` sets nothing on the module, so explain jobs on several workers
share one. A file that cannot be used is no error for ``"auto"``: the answer says why it had
no segmenter (and the reason is cached with the file's stamp, so it is read once too).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opensd.checkpoints.segmenter import FILE_NAME
from opensd.errors import OpenSDError
from opensd.explain.segmentation import AUTO, NONE, find_segmenter, load_for_explain
from opensd.models.segmenter import Segmenter
from opensd.serving.errors import ApiError

log = logging.getLogger("opensd.serving")

CHOICES = (AUTO, NONE)  # what a request's segmenter may be
Loaded = tuple[Segmenter, tuple[str, ...]]  # a segmenter and its class names, background first


@dataclass(frozen=True)
class SegmenterChoice:
    """The segmenter a request gets (None: none), and why it has none."""

    segmenter: Loaded | None
    reason: str | None = None  # set exactly when segmenter is None


class SegmenterCache:
    """Each model folder's segmenter, loaded once (see the module doc)."""

    def __init__(self, loader: Callable[[Path], Loaded] = load_for_explain) -> None:
        self.loader = loader
        self._lock = threading.Lock()  # one load at a time; held while a (small) segmenter loads
        self._files: dict[Path, tuple[tuple[int, int], Loaded | str]] = {}  # file -> (stamp, segmenter or reason)

    def for_model(self, model_path: Path, label: str) -> SegmenterChoice:
        """The segmenter beside the model at ``model_path`` (called ``label`` in reasons), or why there is none."""
        path = find_segmenter(AUTO, model_path)
        if path is None:
            where = ("its folder holds no" if Path(model_path).is_dir()
                     else "it is a single file, not a folder that could hold a")
            return SegmenterChoice(None, f"the model {label} has no segmenter: {where} {FILE_NAME}")
        try:
            key = path.resolve()
            st = key.stat()
        except OSError as e:  # removed since it was found
            return SegmenterChoice(None, f"the model {label}'s {FILE_NAME} cannot be read ({type(e).__name__})")
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            known = self._files.get(key)
            if known is None or known[0] != stamp:
                known = (stamp, self._load(key, label))
                self._files[key] = known
        value = known[1]
        return SegmenterChoice(None, value) if isinstance(value, str) else SegmenterChoice(value)

    def _load(self, path: Path, label: str) -> Loaded | str:
        try:
            loaded = self.loader(path)
        except (OpenSDError, OSError) as e:
            reason = f"the model {label}'s {FILE_NAME} cannot be used: {' '.join(str(e).split())}"
            log.warning("explain: %s", reason)
            return reason
        log.info("explain: loaded the segmenter %s (classes %s)", path, ", ".join(loaded[1]))
        return loaded


def check_choice(asked: str) -> str:
    """A request's ``segmenter``, one of :data:`CHOICES` (any case), or a 422 naming them."""
    choice = asked.strip().lower()
    if choice not in CHOICES:
        raise ApiError(422, f'segmenter must be "{AUTO}" (the model folder\'s {FILE_NAME}, if it has one) or '
                       f'"{NONE}", got {asked!r:.80}; the server reads no segmenter file that a request names',
                       param="segmenter")
    return choice


def choose(cache: SegmenterCache, choice: str, model_path: Path, label: str) -> SegmenterChoice:
    """What a request's ``segmenter`` (one of :data:`CHOICES`, :func:`check_choice`) gives it."""
    if choice == NONE:
        return SegmenterChoice(None, f'the request\'s segmenter is "{NONE}"')
    return cache.for_model(model_path, label)


__all__ = ["CHOICES", "SegmenterCache", "SegmenterChoice", "check_choice", "choose"]
