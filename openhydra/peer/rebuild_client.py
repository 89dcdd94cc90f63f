"""The coordinator's side of a failover rebuild (peer/rebuild.py): send a session's history so that only the
replacement span recomputes it, the other hops adopting their caches under the new session id.

A mixin of :class:`openhydra.peer.client.PeerChainClient` (its ``_send``/``_gather`` step path and crypto routes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from openhydra.peer.errors import HopError
from openhydra.peer.messages import HopSpec
from openhydra.peer.rebuild import adopt_tag
from openhydra.runtime.prefix_cache import PrefixKey
from openhydra.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from openhydra.peer.client import StepResult


class RebuildClient:
    """``rebuild``: the failover path that keeps the surviving hops' caches."""

    def rebuild(self, session_id: str, old_session: str, feeds: Sequence[tuple[list[int], int, SamplingParams, int]],
                route: Sequence[HopSpec], span: tuple[int, int], length: int,
                prefix: PrefixKey | None = None) -> list[StepResult]:
        """Failover rebuild (peer/rebuild.py): on ``route`` under the new ``session_id``, the hops outside layers
        ``span`` adopt ``old_session``'s caches cropped to ``length`` positions, and the replacement for ``span``
        rebuilds its cache from the feeds (pipelined, original message boundaries). Results whose token is -1
        were answered by a last hop that held the position already. Raises :class:`HopError` as a step does;
        the caller then falls back to a full replay. ``prefix``: the prompt block hashes, when the session's first step
        skipped cached prompt blocks; they go with the first feed, which then holds exactly those blocks (router/
        swarm.py) and which the hop before the replacement answers from its per-block outputs (peer/rebuild.py)."""
        chain = self._checked(route)
        messages = sum(-(-len(f[0]) // self.tunables.prefill_chunk) for f in feeds)
        return self._call(self._rebuild(session_id, old_session, [(list(f[0]), *f[1:]) for f in feeds], chain,
                                        span, length, prefix), timeout=self._wait_budget(messages))

    async def _rebuild(self, session_id: str, old_session: str,
                       feeds: Sequence[tuple[list[int], int, SamplingParams, int]], route: tuple[HopSpec, ...],
                       span: tuple[int, int], length: int, prefix: PrefixKey | None) -> list[StepResult]:
        tags = self._adopt_tags(session_id, old_session, route, length)
        control: dict[str, Any] = {"rebuild_start": span[0], "rebuild_end": span[1]}
        futures: list[tuple[int, asyncio.Future]] = []
        ends: list[int] = []
        for tokens, start, sampling, step in feeds:
            first = {"adopt_session": old_session, "adopt_length": length, "adopt_tags": tags} if not futures else {}
            futures += await self._send(session_id, tokens, start, sampling, step, {}, route,
                                        prefix if not futures else None, queued=len(futures),
                                        control={**control, **first}, with_input=span[0] == 0)
            ends.append(len(futures) - 1)
        try:
            results = await self._gather(session_id, futures, route)
        finally:
            self._rebuilding.difference_update((session_id, seq) for seq, _future in futures)
        out = []
        for (_tokens, _start, sampling, step), i in zip(feeds, ends, strict=True):
            result = results[i]
            if result.hidden is not None:  # the last span was rebuilt under onion: sample here to compare
                result = self._sample_here(result, sampling, step, {})
            out.append(result)
        return out

    def _adopt_tags(self, session_id: str, old_session: str, route: tuple[HopSpec, ...], length: int) -> list[bytes]:
        """Per hop of the new route: proof, under that hop's audit key of the old session, that this coordinator
        ran it (peer/rebuild.py). Empty without encryption; b"" for hops that did not serve the old session."""
        if not self.privacy.encrypt:
            return []
        old = self._crypto.get(old_session)
        if old is None:
            raise HopError("", grpc.StatusCode.FAILED_PRECONDITION, "the old session's keys are gone: cannot adopt")
        index = {(h.address, h.start, h.end): i for i, h in enumerate(old.route)}
        tags = []
        for hop in route:
            i = index.get((hop.address, hop.start, hop.end))
            tags.append(b"" if i is None else adopt_tag(old.crypto.audit_key(i), session_id, old_session, length))
        return tags
