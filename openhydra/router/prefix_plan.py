"""The coordinator's side of the peers' prefix cache: hash a new session's prompt, choose where to start.

A session's first step carries the chained HMACs of its prompt blocks (runtime/prefix_cache.py
``block_hashes``, under this coordinator's own secret) and starts at a position ``P`` that every hop
must seed from its prefix cache. ``P`` is proposed from the blocks this coordinator has sent before
(a bounded LRU of hashes: what the swarm has probably cached); a hop that holds less refuses the step
with a position mismatch naming the prefix it does hold, and the session restarts there on a fresh
peer session (strictly smaller ``P`` each time, ending at 0, which always works). So the reused length
is the minimum over the hops, and every hop's cache holds exactly the same positions.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import grpc

from openhydra.peer.errors import HopError
from openhydra.runtime.prefix_cache import PrefixKey, block_hashes

T = TypeVar("T")


class PrefixPlanner:
    def __init__(self, block: int = 32, max_hints: int = 65536, secret: bytes | None = None) -> None:
        if block < 1:
            raise ValueError(f"prefix block must be >= 1, got {block}")
        self.block = block
        self._secret = secret or os.urandom(32)
        self._hints: OrderedDict[bytes, None] = OrderedDict()
        self._max_hints = max_hints
        self._lock = threading.Lock()
        self.reused_positions = 0
        self.restarts = 0

    def key_for(self, token_ids: list[int]) -> PrefixKey:
        return PrefixKey(tuple(block_hashes(token_ids, self.block, self._secret)), self.block)

    def proposal(self, key: PrefixKey) -> int:
        """Positions this coordinator believes the swarm holds for ``key`` (blocks it has sent before)."""
        with self._lock:
            count = 0
            for h in key.hashes:
                if h not in self._hints:
                    break
                self._hints.move_to_end(h)
                count += 1
        return count * key.block

    def remember(self, key: PrefixKey) -> None:
        with self._lock:
            for h in key.hashes:
                self._hints[h] = None
                self._hints.move_to_end(h)
            while len(self._hints) > self._max_hints:
                self._hints.popitem(last=False)

    def first_step(
        self,
        token_ids: list[int],
        send: Callable[[int, PrefixKey], T],
        restart: Callable[[], None],
    ) -> T:
        """Run a session's first step: ``send(skip, key)`` feeds ``token_ids[skip:]`` at position ``skip``.

        On a hop's position mismatch below ``skip``, ``restart()`` (close the peers' half-built session,
        take a fresh session id) and send again from that hop's prefix. Other errors propagate.
        """
        key = self.key_for(token_ids)
        skip = self.proposal(key)
        while True:
            try:
                result = send(skip, key)
            except HopError as error:
                expected = error.expected_position
                if skip == 0 or error.code != grpc.StatusCode.FAILED_PRECONDITION or expected is None:
                    raise
                restart()
                self.restarts += 1
                skip = max(0, min(expected, skip - 1)) // key.block * key.block
                continue
            self.remember(key)
            self.reused_positions += skip
            return result
