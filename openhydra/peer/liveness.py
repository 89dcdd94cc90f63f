"""Liveness by progress, the coordinator's side: how long to wait for a step, and what a probe of the chain says.

A mixin of :class:`openhydra.peer.client.PeerChainClient`. A message's result is awaited for the patience
(``max(decode_timeout_s, decode_timeout_factor x median decode latency)``, capped at ``step_timeout_s``); a probe
(Info to every hop at once) is sent ``probe_timeout_s`` before it ends. A hop that does not answer is blamed; hops
whose served counters move keep the wait going; a hop holding a step without serving anything for
``step_timeout_s`` is stuck; nothing in flight and nothing served means the message was lost (no hop blamed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc

from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec
from openhydra.peer.proto import peer_pb2 as pb

if TYPE_CHECKING:
    from openhydra.peer.client import StepResult

MAX_WAIT_STEPS = 10
"""A message is awaited at most this many step timeouts, however busy the chain (see _await_progress)."""


class Liveness:
    """Waiting for a step's result by the chain's progress (see the module docstring)."""

    async def _await_progress(self, future: asyncio.Future, route: Sequence[HopSpec]) -> StepResult:
        """One message's result. Waits a patience window, probing the chain so that the verdict is due as the
        window ends: a hop that does not answer is blamed; hops that served steps since the last probe (their
        counters moved) have made progress and the wait goes on; a hop that holds a step in flight without
        serving anything for ``step_timeout_s`` is stuck and blamed; hops with nothing in flight and nothing
        served for a whole window lost the message (blamed on no hop: the session restarts on the same peers).
        Never longer than ``MAX_WAIT_STEPS`` x ``step_timeout_s`` in all."""
        t = self.tunables
        began = time.monotonic()
        seen: dict[str, pb.InfoReply] | None = None
        progress_at = began
        while True:
            patience = self.patience()
            probe_timeout = self.probe_timeout()
            early = max(0.0, patience - probe_timeout)
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=early)
            except TimeoutError:
                pass
            probe = asyncio.ensure_future(self._probe(route, probe_timeout))  # its verdict is due as patience ends
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=patience - early)
            except TimeoutError:
                pass
            finally:
                if future.done():
                    probe.cancel()
            served, dead = await probe
            if future.done():
                return future.result()
            if dead is not None:
                raise dead
            now = time.monotonic()
            moved = seen is not None and any(served[a].steps_served != seen[a].steps_served for a in served)
            busy = [a for a, info in served.items() if info.steps_in_flight > 0]
            if moved or seen is None:
                progress_at = now
            elif now - progress_at >= t.step_timeout_s and busy:
                raise HopError(busy[0], grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"stuck: a step in flight and nothing served for {now - progress_at:.0f} s")
            elif not busy and not (self.privacy.onion and len(route) > 2 and now - progress_at < t.step_timeout_s):
                # (under onion the middle hops are not probed: the step may be running there, so "lost" waits for
                # step_timeout_s without progress; a stopped middle hop is found by its predecessor's keepalive)
                raise HopError("", grpc.StatusCode.DEADLINE_EXCEEDED,
                               "step lost: every hop answers, none holds it or served anything since")
            if now - began >= MAX_WAIT_STEPS * t.step_timeout_s:
                raise HopError("", grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"no result after {now - began:.0f} s although the chain keeps serving")
            seen = served

    def probe_timeout(self) -> float:
        """The probe timeout, or 5 x the median time a recent probe took if larger (a loaded machine)."""
        return max(self.tunables.probe_timeout_s, 5 * _median(self._probe_latencies))

    async def _probe(self, route: Sequence[HopSpec],
                     timeout: float) -> tuple[dict[str, pb.InfoReply], HopError | None]:
        """Info to every hop at once: their replies, and the first hop (route order) that did not answer."""
        if self.privacy.onion and len(route) > 2:  # the coordinator's neighbours only (peer/onion_control.py)
            route = [route[0], route[-1]]
        addresses = list(dict.fromkeys(h.address for h in route))
        began = time.monotonic()
        replies = await asyncio.gather(*(self._info(a, timeout) for a in addresses), return_exceptions=True)
        if not any(isinstance(r, BaseException) for r in replies):
            self._probe_latencies.append(time.monotonic() - began)
        served: dict[str, pb.InfoReply] = {}
        for address, reply in zip(addresses, replies, strict=True):
            if isinstance(reply, grpc.aio.AioRpcError):
                if address in self.local_addresses and reply.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # our own peer, slow to answer: this process is alive by definition; count it as working
                    # (no progress of its own), so it is blamed only as stuck, after step_timeout_s
                    last = self._last_info.get(address)
                    served[address] = pb.InfoReply(address=address, steps_in_flight=1,
                                                   steps_served=last.steps_served if last else 0)
                    continue
                # Refused: the process is gone (UNAVAILABLE marks its record dead). Anything else, including a
                # connection that never completes its handshake (a stopped process), is a hop that stopped
                # answering: DEADLINE_EXCEEDED, banned with backoff, routable again once it recovers.
                refused = reply.code() == grpc.StatusCode.UNAVAILABLE and "refused" in (reply.details() or "").lower()
                if reply.code() == grpc.StatusCode.UNAVAILABLE:
                    self._pool.discard(address)
                code = grpc.StatusCode.UNAVAILABLE if refused else grpc.StatusCode.DEADLINE_EXCEEDED
                return served, HopError(address, code, f"no answer to a liveness probe within {timeout:.1f} s "
                                                       f"({reply.code().name})")
            if isinstance(reply, BaseException):
                raise reply
            served[address] = reply
            self._last_info[address] = reply
        return served, None

    def typical_decode_s(self) -> float:
        """The median of recent decode steps' latencies (0 before any)."""
        return _median(self._decode_latencies)

    def patience(self) -> float:
        """How long to wait for a message's result before probing the chain (see ClientTunables)."""
        t = self.tunables
        if t.decode_timeout_s is None:
            return t.step_timeout_s
        return min(t.step_timeout_s, max(t.decode_timeout_s, t.decode_timeout_factor * self.typical_decode_s()))

    def liveness_status(self) -> dict[str, float]:
        """What a silent hop costs a stream now: the patience before the chain is probed, the probe's timeout,
        and the recent decode latency the patience scales with (``/v1/network/status``)."""
        return {"patience_s": round(self.patience(), 3), "probe_timeout_s": round(self.probe_timeout(), 3),
                "decode_latency_s": round(self.typical_decode_s(), 4)}


def _median(latencies: Iterable[float]) -> float:
    """The middle of recent latencies (the upper one of an even count; 0 before any)."""
    recent = sorted(latencies)
    return recent[len(recent) // 2] if recent else 0.0
