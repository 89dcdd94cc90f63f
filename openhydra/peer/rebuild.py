"""Failover rebuild: replace one span of a chain without recomputing the others (see peer.proto, Step fields 40-44).

A full replay re-runs a session's whole history on every hop of the new chain: its cost grows with the history and
the number of hops (a 4-peer chain at token 50 stalled 3-4 s on a quiet 2-core machine). But only the replaced span
lost anything. So:

* every hop that pushes hidden states on keeps the exact bytes it pushed per message (:class:`Retained`, bounded);
* after a failure the coordinator opens a new session id on the new route; its first message tells each surviving
  hop to *adopt* the old session's cache, cropped to the committed positions, authenticated by an
  :func:`adopt_tag` that only the coordinator which ran the old session can compute (it holds the old per-hop audit
  keys; a stranger who saw the session id in the clear cannot);
* the history is re-sent as rebuild messages: the hop just before the replaced layers re-pushes what it retained for
  exactly that message (same positions, same bytes, so the replacement builds the cache the dead hop had), the
  replacement computes, every other hop passes an empty marker on, and the last hop answers each message.

A session whose first step reused cached prompt blocks (runtime/prefix_cache.py) never pushed those positions, and the
replacement may not hold the blocks. So each pushing hop also keeps its output for every full prompt block it
computes, keyed by the block's chained hash (:meth:`Retained.keep_blocks`); the coordinator sends the skipped
blocks as one extra rebuild message ahead of the history, which the hop before the replacement answers from those
block outputs (:meth:`Retained.prefix_blocks`), so the replacement computes them as the dead hop once did.

Anything missing (a retained message evicted, an old session gone, a cache that cannot be cropped) is refused with
FAILED_PRECONDITION and the coordinator falls back to a full replay: the rebuild is an optimisation, never a
different answer.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import torch

from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.wire import encode_tensor
from openhydra.runtime.prefix_cache import PrefixKey

ADOPT_LABEL = b"openhydra-adopt\x00"
DEFAULT_RETAIN_BYTES = 256 << 20
"""Retained activations per peer across sessions (LRU by session): 256 MiB is ~110k positions of a 576-wide fp32
model or ~26k of a 5120-wide bf16 one. A session evicted from it falls back to a full replay on failover."""


def adopt_tag(audit_key: bytes, new_session: str, old_session: str, length: int) -> bytes:
    """HMAC-SHA256 binding "move ``old_session``'s cache, cropped to ``length``, to ``new_session``" to one hop."""
    message = ADOPT_LABEL + struct.pack(">Q", length) + _field(new_session) + _field(old_session)
    return hmac.new(audit_key, message, hashlib.sha256).digest()


def _field(value: str) -> bytes:
    raw = value.encode()
    return struct.pack(">H", len(raw)) + raw


class Role(Enum):
    """What a hop does with one rebuild message."""

    RELAY = "relay"  # it holds these positions already: pass an empty marker on (or answer, if last)
    FEED = "feed"  # it holds them and the replacement starts right after it: re-push what it retained
    COMPUTE = "compute"  # it is (part of) the replacement: run the span as usual


def role(start: int, end: int, rebuild_start: int, rebuild_end: int) -> Role:
    """This hop's role for layers [start, end) when [rebuild_start, rebuild_end) is rebuilt; ValueError if the
    span straddles a boundary (the replacement must tile exactly the failed span)."""
    if not 0 <= rebuild_start < rebuild_end:
        raise ValueError(f"invalid rebuild span [{rebuild_start},{rebuild_end})")
    if rebuild_start <= start and end <= rebuild_end:
        return Role.COMPUTE
    if end == rebuild_start:
        return Role.FEED
    if end < rebuild_start or start >= rebuild_end:
        return Role.RELAY
    raise ValueError(f"span [{start},{end}) straddles the rebuilt layers [{rebuild_start},{rebuild_end})")


@dataclass(frozen=True)
class _Kept:
    start: int
    count: int
    tensor: bytes  # the serialized pb.Tensor as pushed (after DP noise and codec)


class Retained:
    """The hidden states each session pushed, per message, within a byte budget (LRU by session), and this hop's
    output for each full prompt block it computed, by block hash (LRU, a quarter of the budget)."""

    def __init__(self, budget_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._sessions: OrderedDict[str, dict[tuple[int, int], _Kept]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted_sessions = 0
        self._keys: dict[str, PrefixKey] = {}  # each session's prompt blocks, as its first message named them
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._block_bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes + self._block_bytes

    def keep_blocks(self, session_id: str, start: int, hidden: torch.Tensor, key: PrefixKey | None) -> None:
        """Keep this hop's output ``hidden`` [S, D] (positions from ``start``) for each full prompt block of the
        session it covers; ``key`` comes with the session's first message (later messages pass None)."""
        if self.budget_bytes <= 0:
            return
        with self._lock:
            if key is not None:
                self._keys[session_id] = key
            key = self._keys.get(session_id)
        if key is None:
            return
        first, end = -(-start // key.block), min((start + hidden.shape[0]) // key.block, len(key.hashes))
        for b in range(first, end):
            digest = key.hashes[b]
            with self._lock:
                if digest in self._blocks:
                    self._blocks.move_to_end(digest)
                    continue
            piece = hidden[b * key.block - start : (b + 1) * key.block - start].clone()
            size = piece.numel() * piece.element_size()
            with self._lock:
                self._blocks[digest] = piece
                self._block_bytes += size
                while self._block_bytes > self.budget_bytes // 4 and self._blocks:
                    _digest, dropped = self._blocks.popitem(last=False)
                    self._block_bytes -= dropped.numel() * dropped.element_size()

    def prefix_blocks(self, key: PrefixKey, count: int, codec: int) -> pb.Tensor | None:
        """This hop's output for the first ``count`` positions (whole blocks of ``key``), as one wire tensor; None
        unless every block is held."""
        if count <= 0 or count % key.block or count // key.block > len(key.hashes):
            return None
        with self._lock:
            pieces = [self._blocks.get(digest) for digest in key.hashes[: count // key.block]]
        if any(piece is None for piece in pieces):
            return None
        return encode_tensor(torch.cat(pieces), codec)

    def keep(self, session_id: str, start: int, count: int, tensor: pb.Tensor) -> None:
        if self.budget_bytes <= 0:
            return
        kept = _Kept(start, count, tensor.SerializeToString())
        with self._lock:
            messages = self._sessions.setdefault(session_id, {})
            self._sessions.move_to_end(session_id)
            old = messages.pop((start, count), None)
            if old is not None:
                self._bytes -= len(old.tensor)
            messages[(start, count)] = kept
            self._bytes += len(kept.tensor)
            while self._bytes > self.budget_bytes and self._sessions:
                sid, dropped = self._sessions.popitem(last=False)
                self._bytes -= sum(len(k.tensor) for k in dropped.values())
                self._keys.pop(sid, None)
                self.evicted_sessions += 1

    def get(self, session_id: str, start: int, count: int) -> pb.Tensor | None:
        with self._lock:
            kept = self._sessions.get(session_id, {}).get((start, count))
        if kept is None:
            return None
        tensor = pb.Tensor()
        tensor.ParseFromString(kept.tensor)
        return tensor

    def rename(self, old: str, new: str, length: int) -> None:
        """``old``'s messages that end within ``length`` positions become ``new``'s; the rest is dropped."""
        with self._lock:
            messages = self._sessions.pop(old, None)
            if messages is None:
                return
            kept = {k: v for k, v in messages.items() if v.start + v.count <= length}
            self._bytes -= sum(len(v.tensor) for k, v in messages.items() if k not in kept)
            self._sessions[new] = kept
            if old in self._keys:
                self._keys[new] = self._keys.pop(old)

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._keys.pop(session_id, None)
            messages = self._sessions.pop(session_id, None)
            if messages is not None:
                self._bytes -= sum(len(k.tensor) for k in messages.values())
