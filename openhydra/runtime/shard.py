"""``ShardRuntime``: one contiguous layer span of a decoder-only model, serving many sessions.

A pipeline of runtimes whose spans tile ``[0, L)`` computes exactly what the full model computes
(max diff 0.0 on prefill logits, identical greedy tokens; DESIGN §4), including Qwen3.5's hybrid
Gated-DeltaNet/full-attention stacks. Positions come from the caller and must continue the
session exactly: feeding a token twice onto a cache that already holds it is the bug that made
other peer networks' greedy decoding non-deterministic, so it raises :class:`PositionMismatchError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

from openhydra.runtime import compute_lane
from openhydra.runtime.compaction.config import CompactionConfig
from openhydra.runtime.compaction.shard_hook import ShardCompaction
from openhydra.runtime.kernel_attention import use_kernel_attention
from openhydra.runtime.kv_layer import session_cache
from openhydra.runtime.lean_layers import (
    LeanLlamaLayer,
    lean_modules,
    lean_rotary,
    lean_usable,
    lowbit_of,
    matmuls_on_lowbit,
    one_position_row,
    rows_independent,
    use_kernel_norms,
)
from openhydra.runtime.malloc import maybe_trim
from openhydra.runtime.prefix_cache import PrefixCache, PrefixKey, begin_prefix, run_in_blocks
from openhydra.runtime.quant_cpu import Bf16KernelLinear
from openhydra.runtime.sessions import Session, SessionStore
from openhydra.runtime.shard_layers import build_shard, layer_types_of, load_text_config
from openhydra.verification.compare import arithmetic_name

log = logging.getLogger(__name__)

# Layer types whose cache holds a recurrent state that cannot be rolled back by cropping.
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding"})


class PositionMismatchError(ValueError):
    """A step's first position is not the session's current length."""

    def __init__(self, session_id: str, expected: int, got: int) -> None:
        super().__init__(
            f"session {session_id!r}: positions must start at {expected} (the session's length), got {got}"
        )
        self.session_id = session_id
        self.expected = expected
        self.got = got


def is_verify(all_logits: bool, seq_len: int, first: int) -> bool:
    """A step that wants logits for each of several positions after a session's start: a speculative verify
    (prefill steps want the last position's only)."""
    return all_logits and seq_len > 1 and first > 0


class ShardRuntime:
    def __init__(
        self,
        model_dir: str | Path,
        start: int = 0,
        end: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        quantization: str = "none",
        matmul: str = "pytorch",
        max_sessions: int = 64,
        session_idle_timeout_s: float = 600.0,
        compaction: CompactionConfig | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = load_text_config(self.model_dir)
        self.num_layers: int = self.config.num_hidden_layers
        end = self.num_layers if end is None else end
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"span [{start},{end}) is not a non-empty range inside [0,{self.num_layers})")
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == self.num_layers
        self.hidden_size: int = self.config.hidden_size
        self.vocab_size: int = self.config.vocab_size
        self.dtype, self.device = dtype, device
        self.model_type: str = self.config.model_type

        self.quantization = quantization  # none | int8 | nf4 (runtime/quantize.py): the span's Linear layers
        self.matmul = matmul  # pytorch | library (hardware.matmul: bf16 on the low-bit library)
        build = build_shard(self.model_dir, self.config, start, end, dtype, device, quantization, matmul)
        self.modules = build.modules
        self.shard_config = build.shard_config
        self.loaded_bytes = build.loaded_bytes
        self.layer_types = layer_types_of(self.shard_config)
        self._mask_fns = {t: _mask_function(t) for t in set(self.layer_types)}
        # fp32 layers on the low-bit kernel: their norms too, in one call each (the same module in every path)
        self.kernel_norm_layers = use_kernel_norms(self.modules.layers, dtype)
        # ... and their attention (runtime/kernel_attention.py): the same function in every path, before the lean
        # layers below read which attention the span uses
        head_dim = getattr(self.shard_config, "head_dim", None) or (
            self.shard_config.hidden_size // self.shard_config.num_attention_heads)
        self.kernel_attention = use_kernel_attention(
            self.shard_config, self.modules.layers, self.kernel_norm_layers, head_dim,
            compaction=compaction is not None and compaction.enabled)
        self._lean = lean_modules(self.modules.layers)  # plain Llama layers: the lean step (runtime/lean_layers.py)
        self._lean_layers = None if self._lean is None else [LeanLlamaLayer(layer) for layer in self.modules.layers]
        # A one-position step through full-attention layers (sdpa, no padding mask) gets no mask from transformers
        # at any cache length (its sdpa mask is skipped for a single query); asking costs ~18 µs per step.
        # tests/runtime/test_lean_layers.py checks the premise at several cache lengths.
        self._one_position_maskless = set(self.layer_types) <= {"full_attention"}
        self.is_recurrent = any(t in RECURRENT_LAYER_TYPES for t in self.layer_types)
        # every matmul on the low-bit kernel: a row's bits do not depend on the row count (runtime/batching.py)
        on_lowbit = matmuls_on_lowbit(self.modules)
        self.rows_independent = rows_independent(on_lowbit, self.layer_types)
        # bf16 on the library (runtime/quant_cpu.py use_bf16_kernel): rows independent up to this many (None: any
        # number; lowbit.bf16_kernel_rows)
        bf16_linears = [m for m in self.modules.modules() if isinstance(m, Bf16KernelLinear)]
        self.bf16_kernel = bool(bf16_linears)
        self.independent_rows = bf16_linears[0].lowbit.max_rows if bf16_linears else None
        # the arithmetic its outputs come from, as its peer announces it (the record's ``backend``): verification
        # compares only peers that compute alike (verification/verifier.py ``alternatives``)
        self.numerics = arithmetic_name(quantization, on_lowbit or self.bf16_kernel, self.kernel_attention)
        self.prefix_cache: PrefixCache | None = None  # runtime/serving.py turns it on
        self.batcher = None  # runtime/batching.py DecodeBatcher, when continuous batching is on
        self.compaction: ShardCompaction | None = None  # KV compaction of this span (runtime/compaction/)
        if compaction is not None and compaction.enabled:
            self.compaction = ShardCompaction(
                compaction, self.shard_config, self.modules, self.layer_types, start, end, self.num_layers
            )
        self._sessions = SessionStore(
            new_cache=lambda: session_cache(self.shard_config),
            max_sessions=max_sessions,
            idle_timeout_s=session_idle_timeout_s,
        )
        log.info(
            "loaded %s layers [%d,%d) of %d, %s, quantization=%s, %.1f MB",
            self.model_type,
            start,
            end,
            self.num_layers,
            dtype,
            quantization,
            self.loaded_bytes / 1e6,
        )

    # ---- sessions -------------------------------------------------------------------------------

    @property
    def parameter_count(self) -> int:
        """Parameters this span holds (a tied head shares the embedding and counts once)."""
        return sum(p.numel() for p in self.modules.parameters())

    def session_length(self, session_id: str) -> int:
        session = self._sessions.get(session_id)
        return 0 if session is None else session.length

    def close_session(self, session_id: str) -> None:
        self._sessions.drop(session_id)
        maybe_trim()  # hand freed heap back to the OS, at most every few seconds (runtime/malloc.py)

    def session_count(self) -> int:
        return len(self._sessions)

    def truncate_session(self, session_id: str, length: int) -> None:
        """Crop the session's caches to ``length`` positions (speculative-decoding rollback)."""
        self._sessions.truncate(session_id, length, self._cropper(length), self._crop_check(length))

    def adopt_session(self, old_id: str, new_id: str, length: int) -> None:
        """Failover rebuild (peer/rebuild.py): ``old_id``'s cache, cropped to ``length``, becomes ``new_id``'s.
        KeyError if ``old_id`` is unknown; ValueError/NotImplementedError if it cannot be cropped or moved."""
        self._sessions.rename(old_id, new_id, length, self._cropper(length), self._crop_check(length))

    def _crop_check(self, length: int) -> Callable[[Session], None]:
        def check(session: Session) -> None:
            if self.is_recurrent:
                raise NotImplementedError(
                    f"layers [{self.start},{self.end}) include recurrent layers "
                    f"({sorted(set(self.layer_types))}); "
                    "their state cannot be rolled back without snapshots, so truncation is not supported here. "
                    "Close the session and replay its first positions instead."
                )
            if self.compaction is not None:
                self.compaction.check_truncate(session, length)

        return check

    @staticmethod
    def _cropper(length: int) -> Callable[[Session], None]:
        def crop(session: Session) -> None:
            session.cache.crop(length - session.length)  # negative: number of positions to drop

        return crop

    # ---- compute --------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [S] -> embeddings [S, D] (first shard only)."""
        if self.modules.embed_tokens is None:
            raise RuntimeError(f"layers [{self.start},{self.end}) are not the first shard: no embeddings here")
        with torch.inference_mode():
            return self.modules.embed_tokens(input_ids.to(self.device))

    def forward(
        self,
        session_id: str,
        positions: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        all_logits: bool = False,
        prefix: PrefixKey | None = None,
        return_hidden: bool = False,
        one_pass_verify: bool = False,
    ) -> torch.Tensor:
        """Run this span for one step of one session.

        Returns hidden states [S, D] in the runtime dtype, or on the last shard float32 logits
        [1, V] for the last position ([S, V] with ``all_logits``). ``prefix`` (a new session's prompt
        block hashes) seeds the cache from the prefix cache when ``positions`` start past 0, and stores
        the session's prompt blocks there (runtime/prefix_cache.py). With a prefix cache, multi-position
        steps run in block-aligned pieces (``run_in_blocks``), hit or not, so a hit gives the cold run's
        bits. ``return_hidden``: the last shard returns its final hidden states [S, D] before the norm
        (coordinator-side sampling, peer/head.py). A speculative verify (:func:`is_verify`) runs position by
        position as plain decoding would, unless ``one_pass_verify``. Where the node computes with several
        threads it runs on the process's compute lane, whichever thread calls (runtime/compute_lane.py).
        """
        lane = compute_lane.current()
        if lane is not None and not lane.on_lane():
            return lane.run(self.forward, session_id, positions, input_ids=input_ids, hidden_states=hidden_states,
                            all_logits=all_logits, prefix=prefix, return_hidden=return_hidden,
                            one_pass_verify=one_pass_verify)
        seq_len = self._check_positions(positions)
        per_position = is_verify(all_logits, seq_len, int(positions[0])) and not one_pass_verify
        if self.compaction is not None:
            prefix = None  # a compacted cache's entries are no longer positions: not shareable
        h = self._input_hidden(seq_len, input_ids, hidden_states)  # h: [1, S, D]
        first = int(positions[0])
        session = self._sessions.acquire(session_id)
        with session.lock:
            if prefix is not None and self.prefix_cache is not None and session.length == 0:
                seeded = begin_prefix(self.prefix_cache, session, prefix, first)
                if seeded != first:
                    self._sessions.drop(session_id)
                    raise PositionMismatchError(session_id, seeded, first)
            if first != session.length:
                raise PositionMismatchError(session_id, session.length, first)
            position_ids = positions.to(self.device).view(1, seq_len)
            try:
                if per_position:
                    # A speculative verify: each position runs as the one-position decode step plain decoding
                    # would run there, so its bits (and greedy's argmax) are plain decoding's. One forward over
                    # all S positions rounds differently (a matmul's rounding depends on its row count: up to
                    # 0.44 in SmolLM2's bf16 logits), which changed greedy text.
                    out = self._verify_layer_major(session, h, position_ids)
                    if out is not None:
                        session.length += seq_len
                    else:
                        outs = []
                        for i in range(seq_len):
                            outs.append(self._step(session, h[:, i : i + 1], position_ids[:, i : i + 1], 1))
                            session.length += 1
                        out = torch.cat(outs, dim=1)
                else:
                    out = self._step(session, h, position_ids, seq_len)
                    session.length += seq_len
            except Exception:
                # A failed step may have updated some layers' caches: the session is unusable.
                self._sessions.drop(session_id)
                raise
            self._sessions.grew(session)  # the byte bound (serving.max_kv_mb): others may be evicted
        if return_hidden:
            return out[0]  # [S, D]
        if per_position and self.is_last and (lowbit_of(self.modules.lm_head) is None or (
                self.independent_rows is not None and seq_len > self.independent_rows)):
            return torch.cat([self._output(out[:, i : i + 1], False) for i in range(seq_len)])  # [S, V], per row
        return self._output(out, all_logits)

    def _step(self, session: Session, h: torch.Tensor, position_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The span's layers over ``seq_len`` new positions of ``session`` (its length is the caller's to move)."""
        if self.prefix_cache is not None and self.compaction is None and (seq_len > 1 or session.prefix is not None):
            # Exact mode: block-aligned pieces, so a prefix hit equals a cold run bit for bit.
            return run_in_blocks(self.prefix_cache, session, h, position_ids, self._run_layers)
        if self.compaction is not None:
            return self.compaction.run(session, seq_len, lambda: self._run_layers(session, h, position_ids))
        return self._run_layers(session, h, position_ids)

    def _verify_layer_major(self, session: Session, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor | None:
        """A per-position verify, layer by layer: each layer runs the S one-position steps in order, then the next
        layer (runtime/lean_layers.py ``LeanLlamaLayer.verify``). Every row gets the bits of the one-position decode
        step ``_run_layers`` runs there (its projections run per row; position i+1 attends to position i's keys,
        appended to that layer just before; element-wise operations and norms run on all rows at once), but each
        layer's weights are read S times while they are still in the CPU's caches, not once per position from
        memory (SmolLM2, 5 positions, 1 thread: 112 -> 74 ms in bf16, 151 -> 82 ms in fp32).

        Only where ``_step`` would run ``_run_layers`` plainly (no compaction, no prefix-cache blocks to record),
        on lean Llama layers, and when no layer needs a mask for a one-position step (full attention): then the
        masks do not depend on how far each layer's cache has grown. None: not applicable here."""
        if (self.compaction is not None or (self.prefix_cache is not None and session.prefix is not None)
                or not lean_usable(self._lean, self.shard_config._attn_implementation)):
            return None
        cache = session.cache
        with torch.inference_mode():
            for fn in self._mask_fns.values():
                mask = fn(config=self.shard_config, inputs_embeds=h[:, :1], attention_mask=None,
                          cache=cache, position_ids=position_ids[:, :1])
                if mask is not None:
                    return None
            # cos, sin [1, 1, S, head_dim]: element-wise per position, the steps' bits
            cos, sin = lean_rotary(self.modules.rotary_emb(h, position_ids))
            for lean in self._lean_layers:
                h = lean.verify(h, cos, sin, cache)
        return h

    def _run_layers(self, session: Session, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        cache = session.cache
        use_lean = lean_usable(self._lean, self.shard_config._attn_implementation)
        with torch.inference_mode():
            if use_lean and h.shape[1] == 1 and self._one_position_maskless:
                masks = dict.fromkeys(self._mask_fns)  # what the mask functions return here (see __init__)
            else:
                masks = {
                    layer_type: fn(
                        config=self.shard_config,
                        inputs_embeds=h,
                        attention_mask=None,
                        cache=cache,
                        position_ids=position_ids,
                    )
                    for layer_type, fn in self._mask_fns.items()
                }
            position_embeddings = self.modules.rotary_emb(h, position_ids)  # (cos, sin), each [1, S, head_dim]
            if use_lean:
                cos, sin = lean_rotary(position_embeddings)  # [1, 1, S, head_dim]
                for lean, layer_type in zip(self._lean_layers, self.layer_types, strict=True):
                    h = lean.step(h, cos, sin, cache, masks[layer_type])
                return h  # [1, S, D]: the same bits as the loop below, fewer small ops (runtime/lean_layers.py)
            for layer, layer_type in zip(self.modules.layers, self.layer_types, strict=True):
                h = layer(
                    h,
                    attention_mask=masks[layer_type],
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    cache=cache,
                    use_cache=True,
                )
                if isinstance(h, tuple):  # older decoder layers return (hidden, ...)
                    h = h[0]
            return h  # [1, S, D]

    def _output(self, h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        if not self.is_last:
            return h[0]  # [S, D]
        with torch.inference_mode():
            h = self.modules.norm(h)
            if not all_logits:
                # not h[:, -1:]: that slice sends a bf16 head down a batched matmul that copies the weight (SmolLM2:
                # 75 ms instead of 4 at a prompt's last position, same bits; tests/runtime/test_shard_output.py)
                h = one_position_row(h, -1)  # [1, 1, D]
            return self.modules.lm_head(h)[0].float()  # [1, V] or [S, V]

    def _check_positions(self, positions: torch.Tensor) -> int:
        if positions.dim() != 1 or positions.numel() == 0 or positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"positions must be a non-empty 1-D integer tensor, got shape {tuple(positions.shape)} "
                f"dtype {positions.dtype}"
            )
        seq_len = positions.numel()
        expected = torch.arange(int(positions[0]), int(positions[0]) + seq_len, dtype=positions.dtype)
        if int(positions[0]) < 0 or not torch.equal(positions.cpu(), expected):
            raise ValueError(f"positions must be contiguous and non-negative, got {positions.tolist()[:8]}…")
        return seq_len

    def _input_hidden(
        self, seq_len: int, input_ids: torch.Tensor | None, hidden_states: torch.Tensor | None
    ) -> torch.Tensor:
        if self.is_first and hidden_states is None:
            self._check_input_ids(seq_len, input_ids)
            return self.embed(input_ids).unsqueeze(0)  # [1, S, D]
        # The first shard also takes embeddings computed by the coordinator (privacy: token ids never
        # leave it); every other shard takes the previous span's hidden states.
        if hidden_states is None or input_ids is not None:
            raise ValueError(f"layers [{self.start},{self.end}) take hidden_states [S, D] and no input_ids")
        if tuple(hidden_states.shape) != (seq_len, self.hidden_size):
            raise ValueError(f"hidden_states must be [{seq_len}, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        return hidden_states.to(device=self.device, dtype=self.dtype).unsqueeze(0)  # [1, S, D]

    def _input_hiddens(
        self, steps: list[tuple[int, torch.Tensor | None, torch.Tensor | None]]
    ) -> list[torch.Tensor | Exception]:
        """:meth:`_input_hidden` of each (seq_len, input_ids, hidden_states) step ([1, S, D], or the error it raises),
        the first span's token ids embedded in one lookup: an embedding row is its own id's table row (a gather,
        then a dequantization per element for a quantized table), the same bits whatever else a lookup takes. A
        batched decode step embeds its 8 rows' ids at once (runtime/batching.py)."""
        out: list[torch.Tensor | Exception | None] = [None] * len(steps)
        ids: dict[int, torch.Tensor] = {}
        for i, (seq_len, input_ids, hidden_states) in enumerate(steps):
            try:
                if self.is_first and hidden_states is None:
                    self._check_input_ids(seq_len, input_ids)
                    ids[i] = input_ids
                else:
                    out[i] = self._input_hidden(seq_len, input_ids, hidden_states)
            except Exception as exc:
                out[i] = exc
        if ids:
            embedded = self.embed(torch.cat(list(ids.values()))).split([t.numel() for t in ids.values()])
            for i, part in zip(ids, embedded, strict=True):
                out[i] = part.unsqueeze(0)
        return out

    def _check_input_ids(self, seq_len: int, input_ids: torch.Tensor | None) -> None:
        if input_ids is None:
            raise ValueError("the first shard takes input_ids [S] or coordinator embeddings hidden_states [S, D]")
        if input_ids.dim() != 1 or input_ids.numel() != seq_len or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [{seq_len}], got {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size})")


def _mask_function(layer_type: str):
    fn = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(layer_type)
    if fn is None or isinstance(fn, dict):
        raise NotImplementedError(f"layer type {layer_type!r} is not supported by the shard runtime")
    return fn
