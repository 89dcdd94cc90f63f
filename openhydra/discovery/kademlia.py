"""Discovery over hivemind's libp2p Kademlia DHT.

Each model has one DHT key, ``f"{key_prefix}:{model_id}"``; each peer stores its record under the
subkey ``peer_id`` with ``expiration_time = dht_time + ttl_s``, so a dead peer disappears once its
TTL passes. A lookup fetches the key (``latest=True``) and parses every subkey strictly.
Kademlia cannot delete: withdraw overwrites the subkey with a tombstone that lookups skip.

Ownership: every node runs :class:`~openhydra.discovery.kademlia_validator.OwnerValidator`, so under a
key-derived peer id only that peer's signed record or signed tombstone (ownership.Withdrawal) is stored or
accepted from another node, with a DHT expiration bounded by the signed timestamps (a replayed older
record cannot outlive a newer one). A record's expiration is its ``announced_at + ttl_s``; a tombstone
expires just after the record it withdraws. Readers check ownership again (base.Discovery.keep_valid).

The libp2p daemon's network-reaching defaults (NAT port mapping, AutoNAT, relays, IPFS bootstrap)
are off unless configured: a node on loopback must not reach for the internet (DESIGN §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from openhydra.discovery.base import Discovery, DiscoveryError
from openhydra.discovery.ownership import RecordRefused, Withdrawal, check_withdrawal
from openhydra.discovery.records import PeerAnnouncement

logger = logging.getLogger(__name__)

TOMBSTONE = {"withdrawn": True}  # the unsigned tombstone of a plain name; owned peer ids sign theirs


START_ATTEMPTS = 2


async def _visible_maddrs(_dht: Any, node: Any) -> list[Any]:
    return await node.get_visible_maddrs()


def _end(dht: Any) -> None:
    """Stop a DHT process that may never have become ready (shutdown's pipe message may go unread), and the
    p2pd daemon it may have launched: an orphaned p2pd ends by itself, seconds later; this frees it now."""
    import psutil

    try:
        if not dht.is_alive():
            return
        try:
            daemons = psutil.Process(dht.pid).children(recursive=True)
        except psutil.Error:
            daemons = []
        dht.kill()
        dht.join(5)
        for proc in daemons:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(daemons, timeout=5)
    except Exception:  # best effort on a failed start; the start error is what is reported
        logger.debug("could not end a DHT process that failed to start", exc_info=True)


def _is_tombstone(value: Any) -> bool:
    return isinstance(value, dict) and value.get("withdrawn") is True


class KademliaDiscovery(Discovery):
    def __init__(
        self,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        client_mode: bool = False,
        use_ipfs: bool = False,
        use_relay: bool = False,
        use_auto_relay: bool = False,
        auto_nat: bool = False,
        nat_port_map: bool = False,
        key_prefix: str = "openhydra:v1",
        start_timeout_s: float = 30.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.initial_peers = list(initial_peers)
        self.key_prefix = key_prefix
        self.start_timeout_s = start_timeout_s
        self._dht_kwargs: dict[str, Any] = dict(
            host_maddrs=list(host_maddrs),
            client_mode=client_mode,
            use_ipfs=use_ipfs,
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            auto_nat=auto_nat,
            nat_port_map=nat_port_map,
        )
        if announce_maddrs:
            self._dht_kwargs["announce_maddrs"] = list(announce_maddrs)
        self.dht: Any = None  # hivemind.DHT once started
        self._expirations: dict[tuple[str, str], float] = {}  # own records' DHT expiration, for tombstones
        self._withdrawn: dict[str, dict[str, float]] = {}  # model id -> the last lookup's owner-signed tombstones
        self._maddrs: list[str] = []  # read once at start

    def key(self, model_id: str) -> str:
        return f"{self.key_prefix}:{model_id}"

    @property
    def visible_maddrs(self) -> list[str]:
        """Multiaddrs other nodes can use as ``initial_peers`` (with /p2p/<id>)."""
        return list(self._maddrs) if self.dht is not None else []

    async def start(self) -> None:
        if self.dht is not None:
            return
        import hivemind  # heavy import (scipy, the p2p daemon): only when this backend is used

        from openhydra.discovery.kademlia_validator import OwnerValidator

        def create() -> Any:
            # hivemind's own start waits for the DHT process with no deadline, and a forked child can stall
            # (a lock held by another thread at fork time, a slow p2pd on a loaded machine): wait with one,
            # end a stalled child, and try once more. The thread always returns, so nothing is left behind
            # for the event loop's executor shutdown to wait on.
            errors = []
            for _attempt in range(START_ATTEMPTS):
                dht = hivemind.DHT(
                    initial_peers=self.initial_peers or None,
                    start=False,
                    record_validators=[OwnerValidator()],
                    **self._dht_kwargs,
                )
                try:
                    dht.run_in_background(await_ready=True, timeout=self.start_timeout_s)
                    # Read once here, under a deadline too: the property must never block a caller.
                    maddrs = dht.run_coroutine(_visible_maddrs, return_future=True).result(timeout=self.timeout_s)
                    return dht, [str(m) for m in maddrs]
                except TimeoutError:
                    errors.append(f"not ready within {self.start_timeout_s} s")
                    _end(dht)
                except BaseException:
                    _end(dht)
                    raise
            raise DiscoveryError(f"hivemind DHT did not start ({START_ATTEMPTS} tries): {'; '.join(errors)}")

        try:
            self.dht, self._maddrs = await asyncio.to_thread(create)
        except DiscoveryError:
            raise
        except Exception as exc:
            raise DiscoveryError(f"hivemind DHT did not start: {type(exc).__name__}: {exc}") from exc

    async def stop(self) -> None:
        dht, self.dht = self.dht, None
        if dht is not None:
            await asyncio.to_thread(dht.shutdown)

    def _require(self) -> Any:
        if self.dht is None:
            raise DiscoveryError("KademliaDiscovery is not started")
        return self.dht

    async def _call(self, future: Any, what: str) -> Any:
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError as exc:
            raise DiscoveryError(f"hivemind DHT {what} timed out after {self.timeout_s} s") from exc
        except DiscoveryError:
            raise
        except Exception as exc:
            raise DiscoveryError(f"hivemind DHT {what} failed: {type(exc).__name__}: {exc}") from exc

    async def _store(self, model_id: str, peer_id: str, value: dict[str, Any], expiration: float) -> None:
        dht = self._require()
        future = dht.store(self.key(model_id), value, expiration, subkey=peer_id, return_future=True)
        if not await self._call(future, "store"):
            raise DiscoveryError(f"hivemind DHT refused to store {peer_id} under {self.key(model_id)}")

    async def _announce(self, record: PeerAnnouncement) -> None:
        # Bound by the signed fields: validators refuse a record stored to live past announced_at + ttl_s.
        expiration = record.announced_at + record.ttl_s
        await self._store(record.model_id, record.peer_id, record.to_wire(), expiration)
        self._expirations[(record.model_id, record.peer_id)] = expiration

    async def _withdraw(self, record: PeerAnnouncement) -> None:
        from hivemind.utils.timed_storage import get_dht_time

        # A subkey's value is replaced only by one with a later expiration: outlive the record.
        now = get_dht_time()
        expiration = max(self._expirations.pop((record.model_id, record.peer_id), 0.0), now) + 1.0
        withdrawal = self.withdrawal_for(record, max(now, record.announced_at), expiration)
        tombstone = withdrawal.to_wire() if withdrawal.signature is not None else dict(TOMBSTONE)
        await self._store(record.model_id, record.peer_id, tombstone, expiration)

    async def _lookup(self, model_id: str) -> list[PeerAnnouncement]:
        dht = self._require()
        found = await self._call(dht.get(self.key(model_id), latest=True, return_future=True), "get")
        if found is None or not isinstance(found.value, dict):
            return []
        records, withdrawn = [], {}
        for subkey, item in found.value.items():
            value = getattr(item, "value", None)
            if _is_tombstone(value):  # the validator let it in only if its owner signed it (or it is a name)
                at = self._withdrawn_at(value, str(subkey), model_id)
                if at is not None:
                    withdrawn[str(subkey)] = at
                continue
            try:
                record = PeerAnnouncement.from_wire(value)
            except ValidationError as exc:
                self.rejected += 1
                logger.warning("dropped a bad DHT record under %r: %s", subkey, exc.errors(include_url=False)[:1])
                continue
            if record.peer_id != subkey or record.model_id != model_id:
                self.rejected += 1  # stored under someone else's name or model
                continue
            records.append(record)
        self._withdrawn[model_id] = withdrawn
        return records

    def withdrawn(self, model_id: str) -> dict[str, float]:
        return dict(self._withdrawn.get(model_id, {}))

    def _withdrawn_at(self, value: dict, peer_id: str, model_id: str) -> float | None:
        """When a tombstone says ``peer_id`` withdrew, checked again here (a DHT node of an attacker answers what it
        likes); None for one that does not hold. A plain name's unsigned tombstone carries no time: any record of it
        is older (a newer one would have replaced the tombstone), for readers that take plain names at all."""
        if value.get("signature") is None:
            return float("inf") if self.allow_unsigned_names else None
        try:
            withdrawal = Withdrawal.model_validate(value)
            check_withdrawal(withdrawal, allow_unsigned_names=self.allow_unsigned_names)
        except (ValidationError, RecordRefused, ValueError):
            return None
        if (withdrawal.peer_id, withdrawal.model_id) != (peer_id, model_id):
            return None
        return withdrawal.withdrawn_at
