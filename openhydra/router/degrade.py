"""Per-request degradation: serve the node's own model, or the nearest smaller model the swarm covers.

A coordinator serves one model. When the swarm loses layer coverage of it (peers left, were banned),
it does not fail every request until coverage returns: it walks the model's fallback chain (largest to
smallest, ``model.fallback``) and serves the first model for which a complete chain of peers exists,
saying so in ``X-OpenHydra-Degradation-Reason``. The decision comes from layer coverage
(:func:`~openhydra.router.coverage.nearest_covered_model`), never from a peer count. When nothing is
covered, the node's own model is kept, so the request ends in the pipeline's typed 503.

The degrader is generic over what an "option" is (the node pairs a served-model description with an
engine); building a fallback option (tokenizer, embedding table, a chain client) happens once, on first
use, and is then reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import LayerCoverageMap, ModelChoice, nearest_covered_model

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Degraded(Generic[T]):
    option: T
    model_id: str
    reason: str | None
    """None when the node's own model is served."""


class ModelDegrader(Generic[T]):
    def __init__(
        self,
        primary_id: str,
        primary: T,
        primary_map: Callable[[], LayerCoverageMap] | None,
        fallbacks: Sequence[str],
        lookup: Callable[[str], list[PeerAnnouncement]],
        build: Callable[[str, LayerCoverageMap], T],
        *,
        banned: Callable[[], set[str]] = set,
        lookup_ttl_s: float = 2.0,
    ) -> None:
        """``primary_map`` is None when this node holds the whole model itself (never degraded);
        ``fallbacks`` are API model ids, nearest first; ``build(model_id, map)`` makes a fallback option."""
        self.primary_id, self.primary = primary_id, primary
        self._primary_map = primary_map
        self.fallbacks = list(fallbacks)
        self._lookup = lookup
        self._build = build
        self._banned = banned
        self._ttl = lookup_ttl_s
        self._maps: dict[str, tuple[float, LayerCoverageMap]] = {}
        self._options: dict[str, T] = {}
        self._lock = threading.Lock()
        self.degraded_requests = 0

    def _pick(self) -> tuple[ModelChoice | None, dict[str, LayerCoverageMap]]:
        """The model a request would be served with now (None: not even the node's own is covered), and the
        coverage maps it was chosen from; nothing is built. Only for a node that does not hold the whole model."""
        assert self._primary_map is not None
        banned = self._banned()
        primary_map = self._primary_map()
        maps = {self.primary_id: primary_map}
        chain = primary_map.chain(exclude=banned)
        if chain is not None:  # the common case: no fallback lookups at all
            return ModelChoice(self.primary_id, chain, None), maps
        for model_id in self.fallbacks:
            maps[model_id] = self._fallback_map(model_id)
        return nearest_covered_model(self.primary_id, [self.primary_id, *self.fallbacks], maps, exclude=banned), maps

    def covered(self) -> tuple[str, str | None] | None:
        """For /readyz: (model id, why degraded or None) of what a request would be served with now; None when not
        even a fallback is covered."""
        if self._primary_map is None:
            return self.primary_id, None
        choice = self._pick()[0]
        return None if choice is None else (choice.model_id, choice.reason)

    def choose(self) -> Degraded[T]:
        if self._primary_map is None or not self.fallbacks:
            return Degraded(self.primary, self.primary_id, None)
        choice, maps = self._pick()
        if choice is None or choice.model_id == self.primary_id:
            return Degraded(self.primary, self.primary_id, None)  # the pipeline answers with its typed 503
        option = self._option(choice.model_id, maps[choice.model_id])
        self.degraded_requests += 1
        log.warning("degraded: %s", choice.reason)
        return Degraded(option, choice.model_id, choice.reason)

    def status(self) -> dict:
        return {
            "model_id": self.primary_id,
            "fallbacks": self.fallbacks,
            "built": sorted(self._options),
            "degraded_requests": self.degraded_requests,
        }

    def _fallback_map(self, model_id: str) -> LayerCoverageMap:
        cached = self._maps.get(model_id)
        if cached is not None and time.monotonic() - cached[0] < self._ttl:
            return cached[1]
        try:
            records = [r for r in self._lookup(model_id) if r.model_id == model_id]
        except Exception as exc:  # discovery trouble means "not covered", never a failed request
            log.warning("lookup of fallback %s failed: %s", model_id, exc)
            records = []
        cmap = LayerCoverageMap(records, model_id=model_id)
        self._maps[model_id] = (time.monotonic(), cmap)
        return cmap

    def _option(self, model_id: str, cmap: LayerCoverageMap) -> T:
        with self._lock:
            option = self._options.get(model_id)
            if option is None:
                log.info("building the coordinator for fallback %s (%d layers)", model_id, cmap.total_layers)
                option = self._options[model_id] = self._build(model_id, cmap)
            return option
