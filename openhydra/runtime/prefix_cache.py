"""Radix prefix cache: sessions that share a prompt prefix reuse that prefix's cache entries.

Keys (privacy-preserving): the coordinator cuts the prompt into blocks of ``block`` tokens and
chains ``h_i = HMAC-SHA256(secret, h_{i-1} || block_i)`` with a secret of its own
(:func:`block_hashes`). Peers only ever see these hashes, never token ids (with privacy on they get
embeddings), learn nothing about the tokens, and two coordinators' prefixes never collide. Because
``h_i`` commits to every earlier block, a hash names a whole prefix; the tree's parent links exist
for eviction (only leaves go, so a cached node's ancestors are always cached).

Values: node ``i`` holds exactly positions ``[i*block, (i+1)*block)`` of the span's cache:
- full-attention layers: the K/V slice of those positions (so a hit copies only prefix positions,
  never a continuation: nothing past the block boundary is ever stored);
- recurrent layers (Qwen3.5 Gated DeltaNet): a copy of the conv + recurrent state *at* the block
  boundary;
- other layer types (sliding windows, compacted caches): not cached; the runtime skips the cache.

Exactness (a hit gives bit-for-bit the cold run's tokens, bf16 included): a runtime with a prefix
cache computes every multi-position step in pieces that end at absolute multiples of ``block``
(:func:`run_in_blocks`), cold or warm. Matmul and attention kernels round differently for
different shapes (a 1,000-row prefill is not 32 rows at a time: bf16 K/V then differ in the last
bit, and the next token can flip), so seeded blocks are only equal to what a cold run would compute
when the cold run computes the same block-sized pieces with the same earlier positions. It does:
a cold prefill of ``N`` tokens is ``[0, b), [b, 2b), ... [kb, N)``; a warm one seeded with ``P``
positions computes ``[P, P+b), ... [kb, N)``, the same pieces on the same cache contents. The
coordinator must send chunks whose sizes are multiples of ``block`` (LocalPipeline aligns them).

Memory is bounded (``max_bytes``) with least-recently-used eviction of leaves.

Protocol (positions stay exact): the coordinator proposes a start position ``P`` (a block multiple
it believes every hop holds) and sends positions ``[P, n)`` with the hashes. A hop whose session is
new seeds its cache with exactly ``P`` positions from the tree, or refuses with a position mismatch
whose expected position is the longest prefix it can seed; the coordinator then restarts the session
at that smaller ``P`` (a strictly decreasing retry that ends at 0, which always works). So the reused
length is the minimum over hops and every hop's cache holds exactly the same positions.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import LinearAttentionLayer

from openhydra.runtime.kv_layer import PLAIN_KV_LAYERS

HASH_BYTES = 32
MAX_HASHES = 4096
"""At most this many block hashes per session (a 128k-token prompt at 32-token blocks)."""


def block_hashes(token_ids: Sequence[int], block: int, secret: bytes) -> list[bytes]:
    """Chained HMAC of each full block of ``token_ids`` that leaves at least one token to compute.

    The last prompt token is never inside a hashed block: the step that feeds it produces the logits.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    count = min(max(len(token_ids) - 1, 0) // block, MAX_HASHES)
    out: list[bytes] = []
    previous = b""
    for i in range(count):
        chunk = torch.tensor(token_ids[i * block : (i + 1) * block], dtype=torch.int64).numpy().tobytes()
        previous = hmac.new(secret, previous + chunk, hashlib.sha256).digest()
        out.append(previous)
    return out


@dataclass(frozen=True)
class PrefixKey:
    """A session's prompt blocks, as its first step names them."""

    hashes: tuple[bytes, ...]
    block: int

    def __post_init__(self) -> None:
        if not 1 <= self.block <= 65536:
            raise ValueError(f"prefix block must be in [1, 65536], got {self.block}")
        if len(self.hashes) > MAX_HASHES or any(len(h) != HASH_BYTES for h in self.hashes):
            raise ValueError(f"prefix hashes must be at most {MAX_HASHES} values of {HASH_BYTES} bytes")


@dataclass
class _Node:
    key: bytes
    parent: bytes | None
    start: int
    end: int
    layers: list[object]
    """Per layer: (keys, values) [1, H, block, d] for attention, a layer-state copy for recurrent."""
    nbytes: int
    children: int = 0


@dataclass
class SessionPrefix:
    """Per-session fill state: which of its blocks are in the tree already."""

    key: PrefixKey
    inserted: int = 0


@dataclass
class PrefixStats:
    hits: int = 0
    misses: int = 0
    reused_positions: int = 0
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    skipped: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class PrefixCache:
    """The block tree of one runtime (one layer span), bounded to ``max_bytes``."""

    def __init__(self, layer_types: Sequence[str], max_bytes: int, block: int = 32) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if not 1 <= block <= 65536:
            raise ValueError(f"prefix block must be in [1, 65536], got {block}")
        self.layer_types = list(layer_types)
        self.max_bytes = max_bytes
        self.block = block
        """Piece size for steps of sessions that carry no prompt hashes (a session's own key names its block)."""
        self.is_recurrent = any(t == "linear_attention" for t in self.layer_types)
        self.supported = all(t in ("full_attention", "linear_attention") for t in self.layer_types)
        self._nodes: OrderedDict[bytes, _Node] = OrderedDict()  # LRU order: oldest first
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = PrefixStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._nodes)

    # ---- lookup / seed ----------------------------------------------------------------------------

    def available(self, key: PrefixKey) -> int:
        """Positions of ``key``'s longest cached prefix."""
        with self._lock:
            return len(self._path(key)) * key.block

    def seed(self, cache, key: PrefixKey, positions: int) -> int:
        """Fill the empty ``cache`` with the first ``positions`` positions of ``key``'s prefix.

        Returns ``positions`` on success. Otherwise the cache is untouched and the return value is the
        longest block-aligned prefix (<= ``positions``) this tree could seed instead.
        """
        with self._lock:
            path = self._path(key)
            wanted = positions // key.block
            if positions % key.block or wanted > len(path) or not self.supported:
                self.stats.misses += 1
                return min(len(path), wanted) * key.block if self.supported else 0
            path = path[:wanted]
            for node in path:  # root first: the leaf ends most recently used
                self._nodes.move_to_end(node.key)
            layers = [node.layers for node in path]
        with torch.inference_mode():
            for i, layer_type in enumerate(self.layer_types):
                if layer_type == "full_attention":
                    keys = torch.cat([entry[i][0] for entry in layers], dim=-2)  # [1, H, P, d]
                    values = torch.cat([entry[i][1] for entry in layers], dim=-2)
                    cache.layers[i].update(keys, values)
                else:  # recurrent: the state at the last block's boundary
                    cache.layers[i] = copy.deepcopy(layers[-1][i])
        with self._lock:
            self.stats.hits += 1
            self.stats.reused_positions += positions
        return positions

    def _path(self, key: PrefixKey) -> list[_Node]:
        path: list[_Node] = []
        for h in key.hashes:
            node = self._nodes.get(h)
            if node is None or node.start != len(path) * key.block or node.end != node.start + key.block:
                break
            path.append(node)
        return path

    # ---- insert ---------------------------------------------------------------------------------------

    def begin(self, key: PrefixKey) -> SessionPrefix:
        return SessionPrefix(key=key)

    def insert_from(self, cache, plan: SessionPrefix, length: int) -> None:
        """Store every block of ``plan`` that the session's cache (``length`` positions) now covers.

        Recurrent states are only valid at exactly ``length``: blocks ending before it are skipped
        (:func:`run_in_blocks` ends a piece at every block boundary, so this does not happen).
        """
        if not self.supported or self.max_bytes == 0:
            plan.inserted = len(plan.key.hashes)
            return
        block = plan.key.block
        complete = min(len(plan.key.hashes), length // block)
        if complete <= plan.inserted:
            return
        if not _positional(cache, self.layer_types, length):  # e.g. compacted: indices are not positions
            self.stats.skipped += 1
            plan.inserted = len(plan.key.hashes)
            return
        with torch.inference_mode():
            for b in range(plan.inserted, complete):
                end = (b + 1) * block
                if self.is_recurrent and end != length:
                    continue  # no snapshot at this boundary; its children cannot be stored either
                self._insert_block(cache, plan.key, b, end)
        plan.inserted = complete

    def _insert_block(self, cache, key: PrefixKey, b: int, end: int) -> None:
        h = key.hashes[b]
        parent = key.hashes[b - 1] if b else None
        with self._lock:
            if h in self._nodes:
                self._nodes.move_to_end(h)
                return
            if parent is not None and parent not in self._nodes:
                return  # the parent was evicted: a child without it can never be reached
        start = end - key.block
        layers: list[object] = []
        nbytes = 0
        for i, layer_type in enumerate(self.layer_types):
            layer = cache.layers[i]
            if layer_type == "full_attention":
                k = layer.keys[:, :, start:end].clone()  # [1, H, block, d]
                v = layer.values[:, :, start:end].clone()
                layers.append((k, v))
                nbytes += k.numel() * k.element_size() + v.numel() * v.element_size()
            else:
                state = copy.deepcopy(layer)
                layers.append(state)
                nbytes += _state_bytes(state)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if h in self._nodes or (parent is not None and parent not in self._nodes):
                return
            self._nodes[h] = _Node(key=h, parent=parent, start=start, end=end, layers=layers, nbytes=nbytes)
            if parent is not None:
                self._nodes[parent].children += 1
            self._bytes += nbytes
            self.stats.inserted_blocks += 1
            self._evict(protect=h)

    def _evict(self, protect: bytes) -> None:
        """Drop least-recently-used leaves until within budget (never the node just inserted)."""
        while self._bytes > self.max_bytes:
            victim = next((n for n in self._nodes.values() if n.children == 0 and n.key != protect), None)
            if victim is None:
                return
            del self._nodes[victim.key]
            self._bytes -= victim.nbytes
            if victim.parent is not None and victim.parent in self._nodes:
                self._nodes[victim.parent].children -= 1
            self.stats.evicted_blocks += 1

    def clear(self) -> None:
        with self._lock:
            self._nodes.clear()
            self._bytes = 0


def _positional(cache, layer_types: Sequence[str], length: int) -> bool:
    for i, layer_type in enumerate(layer_types):
        layer = cache.layers[i]
        if layer_type == "full_attention":
            if type(layer) not in PLAIN_KV_LAYERS or layer.get_seq_length() != length:
                return False
        elif not isinstance(layer, LinearAttentionLayer):
            return False
    return True


def _state_bytes(state) -> int:
    total = 0
    for states in (getattr(state, "conv_states", {}), getattr(state, "recurrent_states", {})):
        for t in states.values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---- runtime hooks (called by ShardRuntime.forward with the session's lock held) -------------------


def begin_prefix(prefix_cache: PrefixCache, session, key: PrefixKey, first: int) -> int:
    """Start filling a new session's prompt blocks; seed its cache when its first step starts at ``first`` > 0.

    Returns the positions the session now holds: ``first`` on success, else the longest prefix this
    hop could seed (the caller refuses the step with that as the expected position).
    """
    if first > 0:
        seeded = prefix_cache.seed(session.cache, key, first)
        if seeded != first:
            return seeded
        session.length = first
    plan = prefix_cache.begin(key)
    plan.inserted = first // key.block
    session.prefix = plan
    return first


def run_in_blocks(prefix_cache: PrefixCache, session, h: torch.Tensor, position_ids: torch.Tensor, run_layers):
    """``run_layers`` in pieces that end at absolute multiples of the block (the exact mode: cold and warm
    runs compute the same pieces), storing every prompt block a piece completes while the session fills
    its blocks. ``session.length`` is left to the caller; the returned hidden states cover all S positions.
    """
    plan: SessionPrefix | None = session.prefix
    block = plan.key.block if plan is not None else prefix_cache.block
    base = session.length
    total = h.shape[1]
    outputs: list[torch.Tensor] = []
    done = 0
    while done < total:
        piece = min(total - done, block - (base + done) % block)  # up to the next block boundary
        outputs.append(run_layers(session, h[:, done : done + piece], position_ids[:, done : done + piece]))
        done += piece
        if plan is not None:
            prefix_cache.insert_from(session.cache, plan, base + done)
    if plan is not None and plan.inserted >= len(plan.key.hashes):
        session.prefix = None  # every prompt block is stored: decode steps take the plain path
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # [1, S, D]
