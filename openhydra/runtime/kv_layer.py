"""A full-attention cache layer that appends in place: transformers' ``DynamicLayer`` with room to grow.

``DynamicLayer.update`` concatenates, so every decode step copies the layer's whole K/V: on a CPU node at
batch 1 that was 18% of a SmolLM2 int4 token at ~110 positions (``aten::cat``, bench/profile_decode_step.py),
and it grows with the context (quadratic over a generation). :class:`AppendLayer` keeps K/V in a buffer with
spare positions, writes each new position into it and exposes ``keys``/``values`` as views of its first
positions. It is a ``DynamicLayer`` in everything else (crop, reorder, batch select, offload, prefix-cache
seeding all read or replace ``keys``/``values`` and keep working): when someone replaces them, the next update
moves them into a fresh buffer.

The attention reads the same numbers through a view with the buffer's strides; tests/runtime/test_kv_layer.py
checks that logits and caches are bit-identical to ``DynamicLayer``'s over long decodes, crops and speculative
verifies, in fp32 and bf16, on real weights.

A view handed out by :meth:`AppendLayer.update` stays valid until the next ``update`` after a crop (which
writes over the cropped positions); nothing in the runtime keeps one longer (the prefix cache clones its blocks).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_MIN = 32  # positions of room a buffer gets at least when it (re)grows
ROUND_TO = 16  # buffer capacity is a multiple of this many positions


def _capacity(needed: int) -> int:
    """Room for ``needed`` positions plus max(SPARE_MIN, needed / 8) more: a copy of the layer every ≥ 32 appends,
    and every needed/8 on long contexts (amortised: ~8 positions copied per append, against all of them when
    concatenating), with at most 47 positions or ~12% unused (many short sessions hold little spare)."""
    spare = max(SPARE_MIN, needed // 8)
    return -(-(needed + spare) // ROUND_TO) * ROUND_TO


def _made_on_read(attribute: str) -> property:
    """:class:`AppendLayer`'s ``keys`` or ``values``: ``attribute`` once any views a lazy ``expose`` left pending are
    made (reading or assigning either makes both)."""

    def read(layer: AppendLayer) -> torch.Tensor | None:
        if layer._end is not None:
            layer._make_views()
        return getattr(layer, attribute)

    def assign(layer: AppendLayer, tensor: torch.Tensor | None) -> None:
        if layer._end is not None:
            layer._make_views()
        setattr(layer, attribute, tensor)

    return property(read, assign)


class AppendLayer(DynamicLayer):
    """``DynamicLayer`` whose ``update`` writes into a preallocated buffer instead of concatenating.

    ``keys`` and ``values`` are properties over ``_keys``/``_values``: after :meth:`expose` with ``lazily`` they are
    the buffers' first positions, made into views only when someone reads (or replaces) them. A batched decode step
    appends to every layer of 8 sessions and reads none of them (its library call attends over the buffers), so it
    does not pay two views per layer and row. Everything that assigns ``keys``/``values`` (crop, reset, batch
    select, offload) assigns through the properties and finds the views made first."""

    def __init__(self, **kwargs) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._end: int | None = None  # set: keys/values are the buffers' first _end positions, views not made yet
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None  # [B, H, capacity, d]
        self._value_buffer: torch.Tensor | None = None
        self._views: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # what we last exposed
        self._note_buffers()

    keys = _made_on_read("_keys")
    values = _made_on_read("_values")

    def get_seq_length(self) -> int:
        return self._end if self._end is not None else super().get_seq_length()  # without making the views

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, H, S, d]
        held = self.reserve(key_states, value_states)
        count = key_states.shape[-2]
        # narrow: the views buffer[:, :, held:end] and buffer[:, :, :end] are, in one call each
        self._key_buffer.narrow(2, held, count).copy_(key_states)
        self._value_buffer.narrow(2, held, count).copy_(value_states)
        return self.expose(held + count)

    @staticmethod
    def append_shape(key_states: torch.Tensor,
                     value_states: torch.Tensor) -> tuple[int, torch.dtype, torch.Size, int, int]:
        """What :meth:`reserve` checks an append against: the positions, the dtype, the leading [B, H] dimensions,
        the key and value head dimensions."""
        return (key_states.shape[-2], key_states.dtype, key_states.shape[:2], key_states.shape[-1],
                value_states.shape[-1])

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor,
                shape: tuple[int, torch.dtype, torch.Size, int, int] | None = None) -> int:
        """Room in the buffers for ``key_states``' positions after the held ones, which are returned: a buffer of
        their dtype and shape (moved into a fresh one when needed, as :meth:`update` does). Writes nothing: the
        caller writes positions held.. into the buffers (:attr:`layout` says where), then calls :meth:`expose`.
        A batched decode step's attention library call appends that way (runtime/lowbit.py
        ``append_attention_rows``), for 8 rows per layer: it passes ``shape``, :meth:`append_shape` of the states,
        read once for all rows (a tensor's attributes cost more to read than the checks themselves)."""
        count, dtype, lead, key_dim, value_dim = shape or self.append_shape(key_states, value_states)
        if self._end is not None:  # our own positions, which nobody has read or replaced since
            held = self._end
            keys = values = None
        else:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self._keys, self._values
            if keys is not self._views[0] or values is not self._views[1]:
                held = 0 if keys.numel() == 0 else keys.shape[-2]
                if not (self._is_prefix_view(keys, self._key_buffer)
                        and self._is_prefix_view(values, self._value_buffer)):
                    self._rehome(keys, values, held, held + count, key_states, value_states)
            else:
                held = keys.shape[-2]
        end = held + count
        if (end > self._capacity or dtype != self._dtype or lead != self._lead or key_dim != self._key_dim
                or value_dim != self._value_dim):
            if keys is None:
                keys, values = self.keys, self.values  # the views, made
            self._rehome(keys, values, held, end, key_states, value_states)
        return held

    def expose(self, end: int, lazily: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``keys``/``values`` become the buffers' first ``end`` positions: views, returned, or with ``lazily`` made
        when first read (returns None)."""
        if lazily:
            self._end = end
            return None
        self._end = None
        self._keys, self._values = self._key_buffer.narrow(2, 0, end), self._value_buffer.narrow(2, 0, end)
        self._views = (self._keys, self._values)
        return self._views

    def _make_views(self) -> None:
        self.expose(self._end)

    @staticmethod
    def _is_prefix_view(tensor: torch.Tensor, buffer: torch.Tensor | None) -> bool:
        """Whether ``tensor`` is ``buffer[:, :, :n]`` (what ``crop`` leaves of our view)."""
        return (buffer is not None and tensor.dim() == 4 and tensor.storage_offset() == 0
                and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                and tensor.stride() == buffer.stride() and tensor.shape[:2] == buffer.shape[:2]
                and tensor.shape[-1] == buffer.shape[-1])

    def _rehome(self, keys: torch.Tensor, values: torch.Tensor, held: int, needed: int,
                key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A fresh buffer with room for ``needed`` positions, holding the ``held`` positions of keys/values."""
        capacity = _capacity(needed)
        batch, heads = key_states.shape[:2]
        key_buffer = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
        value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if held:
            key_buffer[:, :, :held].copy_(keys)
            value_buffer[:, :, :held].copy_(values)
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self._note_buffers()
        self.expose(held)

    def _note_buffers(self) -> None:
        """What :meth:`reserve` checks an append against, read once per buffer instead of once per append (a batched
        step appends 8 rows in every layer: its checks are most of an append's Python), and :attr:`layout`: the key
        and value buffers' addresses and their strides per head and per position (elements), or None."""
        key_buffer, value_buffer = self._key_buffer, self._value_buffer
        if key_buffer is None or value_buffer is None:
            self._capacity, self._dtype, self._lead, self._key_dim, self._value_dim = -1, None, None, -1, -1
            self.layout = None
            return
        self._capacity, self._dtype = key_buffer.shape[-2], key_buffer.dtype
        self._lead, self._key_dim, self._value_dim = key_buffer.shape[:2], key_buffer.shape[-1], value_buffer.shape[-1]
        self.layout = (key_buffer.data_ptr(), value_buffer.data_ptr(), *key_buffer.stride()[1:3],
                       *value_buffer.stride()[1:3])

    def reset(self) -> None:
        super().reset()  # assigns keys and values (None) through the properties: no views pending after it
        self._key_buffer = self._value_buffer = None
        self._views = (None, None)
        self._note_buffers()


PLAIN_KV_LAYERS = (DynamicLayer, AppendLayer)  # a full-attention layer whose index i is position i


def session_cache(config) -> DynamicCache:
    """``DynamicCache(config=config)`` with each plain full-attention layer an :class:`AppendLayer`."""
    cache = DynamicCache(config=config)
    cache.layers = [AppendLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
