"""Client of the ``openhydra-dht`` HTTP bootstrap server, and the discovery backend built on it.

With several server URLs, announce goes to all of them and lookup merges all answers; a call
succeeds when at least one server answered. Each request has a deadline (``timeout_s``).
Records in a lookup answer are parsed one by one: a bad record is dropped, not the whole answer; the
discovery then keeps only records signed by their peer id's owner (base.Discovery.keep_valid), so a
server that serves forged or unsigned records cannot make this client use them. Withdrawals are sent
signed (ownership.Withdrawal) in the body of ``DELETE /v1/peers``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import httpx
from pydantic import TypeAdapter, ValidationError

from openhydra.discovery.base import Discovery, DiscoveryError, latest_withdrawals
from openhydra.discovery.ownership import WITHDRAWAL_MAX_AGE_S, Withdrawal
from openhydra.discovery.records import PeerAnnouncement

logger = logging.getLogger(__name__)


_WITHDRAWN = TypeAdapter(dict[str, float])
"""A lookup answer's ``withdrawn``: peer id -> withdrawn_at (unix time)."""


class HttpDhtClient:
    """One ``openhydra-dht`` server."""

    def __init__(self, url: str, timeout_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None):
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, transport=transport)
        self.rejected = 0  # records in answers that failed validation
        self.withdrawn: dict[str, dict[str, float]] = {}  # model id -> the last answer's withdrawn peers

    async def aclose(self) -> None:
        await self._http.aclose()

    async def announce(self, record: PeerAnnouncement) -> float:
        """Returns the seconds until the server expires the record."""
        resp = await self._request("POST", "/v1/announce", json=record.to_wire())
        return float(resp.json().get("expires_in_s", record.ttl_s))

    async def lookup(self, model_id: str) -> list[PeerAnnouncement]:
        resp = await self._request("GET", "/v1/peers", params={"model_id": model_id})
        try:
            items = resp.json()["peers"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DiscoveryError(f"{self.url}: malformed lookup answer") from exc
        if not isinstance(items, list):
            raise DiscoveryError(f"{self.url}: 'peers' is not a list")
        try:  # peers that withdrew since their last record (an older server sends none)
            self.withdrawn[model_id] = _WITHDRAWN.validate_python(resp.json().get("withdrawn") or {})
        except ValidationError:
            logger.warning("%s: ignored a malformed 'withdrawn' in a lookup answer", self.url)
            self.withdrawn[model_id] = {}
        records = []
        for item in items:
            try:
                record = PeerAnnouncement.from_wire(item)
            except ValidationError as exc:
                self.rejected += 1
                logger.warning("%s: dropped a bad record: %s", self.url, exc.errors(include_url=False)[:1])
                continue
            if record.model_id == model_id:
                records.append(record)
        return records

    async def withdraw(self, model_id: str, peer_id: str, signed: Withdrawal | None = None) -> bool:
        """Remove a record: ``signed`` (the owner's signed withdrawal) is required by servers for key-derived
        peer ids; without it only an unsigned name can be withdrawn, on a server that accepts those."""
        if signed is not None:
            if (signed.model_id, signed.peer_id) != (model_id, peer_id):
                raise ValueError(f"the withdrawal is for {signed.peer_id}/{signed.model_id}, not {peer_id}/{model_id}")
            resp = await self._request("DELETE", "/v1/peers", json=signed.to_wire())
        else:
            resp = await self._request("DELETE", "/v1/peers", params={"model_id": model_id, "peer_id": peer_id})
        return bool(resp.json().get("removed"))

    async def health(self) -> dict[str, object]:
        return (await self._request("GET", "/health")).json()

    async def _request(self, method: str, path: str, **kw: object) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, **kw)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise DiscoveryError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise DiscoveryError(f"{self.url}{path}: HTTP {resp.status_code}: {message}")
        return resp


class HttpDiscovery(Discovery):
    """Discovery through one or more ``openhydra-dht`` servers."""

    def __init__(self, urls: Sequence[str], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if not urls:
            raise ValueError("HttpDiscovery needs at least one server URL")
        self.urls = list(urls)
        self._clients: list[HttpDhtClient] = []

    async def start(self) -> None:
        if not self._clients:
            self._clients = [HttpDhtClient(u, self.timeout_s) for u in self.urls]

    async def stop(self) -> None:
        clients, self._clients = self._clients, []
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)

    async def _all(self, calls: list) -> list:
        if not self._clients:
            raise DiscoveryError("HttpDiscovery is not started")
        results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        if not ok:
            raise DiscoveryError("; ".join(str(r) for r in results))
        for r in results:
            if isinstance(r, BaseException):
                logger.warning("HTTP DHT call failed: %s", r)
        return ok

    async def _announce(self, record: PeerAnnouncement) -> None:
        await self.start()
        await self._all([c.announce(record) for c in self._clients])

    async def _lookup(self, model_id: str) -> list[PeerAnnouncement]:
        await self.start()
        before = sum(c.rejected for c in self._clients)
        answers = await self._all([c.lookup(model_id) for c in self._clients])
        self.rejected += sum(c.rejected for c in self._clients) - before
        return [r for answer in answers for r in answer]

    def withdrawn(self, model_id: str) -> dict[str, float]:
        return latest_withdrawals(client.withdrawn.get(model_id, {}) for client in self._clients)

    async def _withdraw(self, record: PeerAnnouncement) -> None:
        await self.start()
        now = max(time.time(), record.announced_at)  # never older than the record it withdraws
        signed = self.withdrawal_for(record, now, now + WITHDRAWAL_MAX_AGE_S)
        signed_or_none = signed if signed.signature is not None else None
        await self._all([c.withdraw(record.model_id, record.peer_id, signed_or_none) for c in self._clients])
