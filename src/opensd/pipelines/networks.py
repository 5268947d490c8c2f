"""What a request adds to a shared model for its own run: LoRAs, textual inversions, ControlNets.

A :class:`RequestNetworks` is built per request (by the LoRA and embedding libraries
from the prompt's ``<lora:name:w>`` tags, the embedding names it mentions, and the
CLI's ``--lora``) and handed to :meth:`StableDiffusionPipeline.generate`, which

* enters ``adapters`` (:func:`opensd.models.adapters.use_adapters`) around the text
  encoding and the sampling, so the LoRA deltas reach the U-Net and the text encoders of
  this run only (the VAE has no adapters);
* gives ``embeddings`` (name -> textual inversion) to the conditioner, which puts their
  vectors where the prompts name them;
* runs the ``control`` units (:class:`~opensd.pipelines.control.ControlUnit`: a ControlNet,
  its image and settings) at every U-Net call of this run (:mod:`opensd.pipelines.control`);
* adds ``infotext`` (A1111's ``Lora hashes``, ``TI hashes``, ``ControlNet N``) to every image's infotext.

Nothing of it is stored on the model or the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opensd.models.adapters import AdapterSet

if TYPE_CHECKING:
    from opensd.pipelines.control import ControlUnit


@dataclass(frozen=True)
class RequestNetworks:
    """One request's LoRA deltas, textual-inversion embeddings (name -> embedding), control
    units and infotext fields."""

    adapters: AdapterSet | None = None
    embeddings: Mapping[str, Any] = field(default_factory=dict)
    infotext: Mapping[str, str] = field(default_factory=dict)
    control: tuple[ControlUnit, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.adapters) or bool(self.embeddings) or bool(self.infotext) or bool(self.control)

    def with_merged_weights(self) -> RequestNetworks:
        """These networks with their LoRA deltas merged into the run's own copy of each adapted
        weight (:class:`~opensd.models.adapters.AdapterSet` ``merge_weights``): one op per layer
        at every call, at the memory of that copy; the shared model stays as it is."""
        if self.adapters is None:
            return self
        return dataclasses.replace(self, adapters=AdapterSet(self.adapters.deltas, merge_weights=True))

    @staticmethod
    def merge(parts: Sequence[RequestNetworks | None]) -> RequestNetworks:
        """All of ``parts`` in one (later infotext fields of one name join earlier ones with ", ")."""
        present = [p for p in parts if p is not None]
        embeddings: dict[str, Any] = {}
        infotext: dict[str, str] = {}
        for p in present:
            embeddings.update(p.embeddings)
            for k, v in p.infotext.items():
                infotext[k] = f"{infotext[k]}, {v}" if k in infotext else v
        control = tuple(u for p in present for u in p.control)
        return RequestNetworks(AdapterSet.merge([p.adapters for p in present]), embeddings, infotext, control)


NO_NETWORKS = RequestNetworks()
