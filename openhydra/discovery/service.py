"""Discovery backends in one place: off (Null), HTTP DHT, Kademlia DHT, and both (DualStack).

``DualStack`` announces to both stacks and merges both lookups, keeping each peer's freshest
record: the HTTP bootstrap is fast and simple, Kademlia keeps working without it. A call succeeds
when at least one stack answered; a stack that fails is logged and counted in ``failures``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from openhydra.discovery.base import Discovery, DiscoveryError, latest_withdrawals
from openhydra.discovery.http_dht import HttpDiscovery
from openhydra.discovery.kademlia import KademliaDiscovery
from openhydra.discovery.records import PeerAnnouncement

__all__ = [
    "Discovery",
    "DiscoveryError",
    "DualStackDiscovery",
    "HttpDiscovery",
    "KademliaDiscovery",
    "NullDiscovery",
]

logger = logging.getLogger(__name__)


class NullDiscovery(Discovery):
    """Discovery off: nothing leaves the process. A lookup sees only this process's own records
    (so a lone node still finds itself), until their TTL passes."""

    def __init__(self, clock: Callable[[], float] = time.time, **kw: Any) -> None:
        kw.setdefault("allow_unsigned_names", True)  # nothing crosses a process boundary: no one to forge
        super().__init__(**kw)
        self._clock = clock
        self._records: dict[tuple[str, str], PeerAnnouncement] = {}

    async def _announce(self, record: PeerAnnouncement) -> None:
        self._records[(record.model_id, record.peer_id)] = record

    async def _lookup(self, model_id: str) -> list[PeerAnnouncement]:
        now = self._clock()
        return [r for (m, _), r in self._records.items() if m == model_id and not r.is_expired(now)]

    async def _withdraw(self, record: PeerAnnouncement) -> None:
        self._records.pop((record.model_id, record.peer_id), None)


class DualStackDiscovery(Discovery):
    """HTTP DHT and Kademlia DHT together. The verifier is applied once, to the merged lookup."""

    def __init__(self, http: HttpDiscovery, kademlia: KademliaDiscovery, **kw: Any) -> None:
        super().__init__(**kw)
        self.http = http
        self.kademlia = kademlia
        self.stacks: tuple[Discovery, ...] = (http, kademlia)
        self.failures: dict[str, int] = {"http": 0, "kademlia": 0}

    def set_identity(self, identity: Any) -> None:
        super().set_identity(identity)
        for stack in self.stacks:
            stack.set_identity(identity)

    def set_allow_unsigned_names(self, allow: bool) -> None:
        super().set_allow_unsigned_names(allow)
        for stack in self.stacks:
            stack.set_allow_unsigned_names(allow)

    async def start(self) -> None:
        await self._both("start", [s.start() for s in self.stacks])

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.stacks), return_exceptions=True)

    async def _both(self, what: str, calls: list[Awaitable[Any]]) -> list[Any]:
        results = await asyncio.gather(*calls, return_exceptions=True)
        ok = []
        for name, result in zip(self.failures, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # cancellation and the like are not stack failures
                self.failures[name] += 1
                logger.warning("%s discovery %s failed: %s", name, what, result)
            else:
                ok.append(result)
        if not ok:
            raise DiscoveryError(f"{what} failed on both stacks: " + "; ".join(str(r) for r in results))
        return ok

    async def _announce(self, record: PeerAnnouncement) -> None:
        await self._both("announce", [s.announce(record) for s in self.stacks])

    async def _lookup(self, model_id: str) -> list[PeerAnnouncement]:
        before = self.http.rejected + self.kademlia.rejected
        answers = await self._both("lookup", [s._lookup(model_id) for s in self.stacks])
        self.rejected += self.http.rejected + self.kademlia.rejected - before
        return [r for answer in answers for r in answer]

    def withdrawn(self, model_id: str) -> dict[str, float]:
        return latest_withdrawals(stack.withdrawn(model_id) for stack in self.stacks)

    async def _withdraw(self, record: PeerAnnouncement) -> None:
        await self._both("withdraw", [s.withdraw(record.peer_id) for s in self.stacks])
