"""Which modules run on one of opensd's own CPU kernels: the routing table that
:mod:`opensd.conv_kernels`, :mod:`opensd.attention_kernels` and
:mod:`opensd.upsample_kernels` share.

A model's kernel selection (:mod:`opensd.kernels`) puts modules on a route once, under the
table's lock; every forward call then asks :meth:`Routes.get` without the lock. Modules are
held weakly, so a freed model leaves the table. Until anything has been routed, and inside a
traced graph (``torch.compile``), the answer is None at the cost of one flag test: the
kernels are eager-only, and a compiled model keeps torch's. Use: ``routes.set(layers, True)``
once, ``routes.get(layer)`` on every call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Generic, TypeVar

import torch
from torch import nn

V = TypeVar("V")


class Routes(Generic[V]):
    """Modules on a route, each with its value (``V``: what the kernel needs to know, e.g. a
    softmax kind). ``lock`` also guards the caller's own per-module caches."""

    def __init__(self) -> None:
        self._on: weakref.WeakKeyDictionary[nn.Module, V] = weakref.WeakKeyDictionary()
        self._any = False  # anything ever routed: the fast path skips the lookup while False
        self.lock = threading.Lock()

    def get(self, module: nn.Module) -> V | None:
        """``module``'s value where it is on the route and the call is eager, else None."""
        if not self._any or torch.compiler.is_compiling():
            return None
        return self._on.get(module)

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._on

    def value(self, module: nn.Module) -> V | None:
        """``module``'s value on the route (None: off it), whether or not a call would take it."""
        return self._on.get(module)

    def set(self, modules: Iterable[nn.Module], value: V | None) -> int:
        """Put ``modules`` on the route with ``value`` (None: take them off it); returns how many."""
        count = 0
        with self.lock:
            for m in modules:
                if value is None:
                    self._on.pop(m, None)
                else:
                    self._on[m] = value
                count += 1
            self._any = self._any or (value is not None and count > 0)
        return count
