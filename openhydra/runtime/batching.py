"""Continuous batching: concurrent sessions' decode steps on one runtime run as one forward.

Decode is memory-bandwidth bound (DESIGN §4): one token reads every weight of the span once, so
B sessions stepping together read them once instead of B times. :class:`DecodeBatcher` is the
scheduler: callers (peer gRPC handlers, the local pipeline's decode threads) submit single-position
steps and get a future; a worker thread takes whatever is pending, waits for more only while other
recently active sessions have not submitted yet (up to ``window_ms``, or a quarter of a step's
duration when that is longer; a lone stream never waits), runs :func:`forward_batch`,
and resolves each future with that session's output. Sessions join and leave between steps (the
batch is rebuilt every step, Orca-style iteration-level scheduling).

:func:`forward_batch` stacks the sessions' per-session ``DynamicCache`` K/V left-padded to the
longest one ([B, H, Lmax, d]), masks the padding (a boolean [B, 1, 1, Lmax + 1] mask), gives each
row its own position, runs every layer once on h [B, 1, D], then appends each row's new K/V to its
own session cache. Recurrent layers (Qwen3.5 Gated DeltaNet) need no padding: their fixed-size conv
and recurrent states are stacked [B, ...] and split back after the step. Greedy outputs equal
unbatched ones (tested); logits agree to float rounding (batched matmuls accumulate in a different
order). Steps it cannot batch run on their own, exactly as without batching: sliding-window layers,
compacted caches, a session's first position, sessions still filling prefix blocks.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

log = logging.getLogger(__name__)

ACTIVE_STEPS = 3.0
"""A session that submitted within this many step durations is expected to step again soon (worth waiting for)."""
WAIT_FRACTION = 0.25
"""While active sessions are missing, wait up to max(window, this fraction of a step's duration) for them:
on a loaded machine a caller's turnaround (sample, stream the token, submit) outgrows a fixed window."""


@dataclass
class _Pending:
    session_id: str
    position: int
    input_ids: torch.Tensor | None  # [1]
    hidden_states: torch.Tensor | None  # [1, D]
    all_logits: bool
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    steps: int = 0
    fallback_steps: int = 0
    max_seen: int = 0


class DecodeBatcher:
    """Collects single-position steps of different sessions and runs them as one batched forward."""

    def __init__(self, runtime, max_batch: int = 8, window_ms: float = 2.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._step_s = 0.0  # moving average of one batched forward's duration, s
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
        self._thread.start()

    def submit(
        self,
        session_id: str,
        position: int,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> Future:
        """Queue one position of ``session_id``; the future gives what ``runtime.forward`` would return."""
        item = _Pending(session_id, position, input_ids, hidden_states, all_logits)
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode batcher is closed")
            self._queue.append(item)
            self._last_seen[session_id] = time.monotonic()
            self._cond.notify()
        return item.future

    def forward(self, session_id: str, position: int, **inputs) -> torch.Tensor:
        return self.submit(session_id, position, **inputs).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # ---- scheduler ------------------------------------------------------------------------------------

    def _active(self, now: float) -> int:
        horizon = max(0.05, ACTIVE_STEPS * self._step_s)
        for sid in [s for s, t in self._last_seen.items() if now - t > horizon]:
            del self._last_seen[sid]
        return len(self._last_seen)

    def _take(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            deadline = time.monotonic() + max(self.window_s, WAIT_FRACTION * self._step_s)
            while len(self._queue) < self.max_batch and not self._closed:
                now = time.monotonic()
                # Wait only for sessions that are active but have not submitted yet.
                if now >= deadline or len(self._queue) >= min(self._active(now), self.max_batch):
                    break
                self._cond.wait(deadline - now)
            batch: list[_Pending] = []
            seen: set[str] = set()
            for item in list(self._queue):
                if len(batch) == self.max_batch:
                    break
                if item.session_id in seen:  # a session's next step waits for its previous one
                    continue
                seen.add(item.session_id)
                batch.append(item)
                self._queue.remove(item)
            return batch

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            batch = self._take()
            if batch is None:
                return
            began = time.monotonic()
            try:
                outputs = forward_batch(self.runtime, batch, self.stats)
            except Exception as exc:  # the whole batch failed: every caller gets the error
                log.exception("batched decode step failed")
                outputs = [exc] * len(batch)
            elapsed = time.monotonic() - began
            self._step_s = elapsed if not self._step_s else 0.8 * self._step_s + 0.2 * elapsed
            for item, out in zip(batch, outputs, strict=True):
                if isinstance(out, BaseException):
                    item.future.set_exception(out)
                else:
                    item.future.set_result(out)


# ---- the batched forward -------------------------------------------------------------------------------


def _batchable(runtime, session) -> bool:
    if getattr(runtime, "compaction", None) is not None:
        return False  # compaction captures queries and checks its threshold per step (runtime/compaction)
    if session.prefix is not None or any(t not in ("full_attention", "linear_attention") for t in runtime.layer_types):
        return False
    for layer_type, layer in zip(runtime.layer_types, session.cache.layers, strict=True):
        if layer_type == "full_attention":
            if type(layer) is not DynamicLayer or layer.get_seq_length() != session.length:
                return False  # e.g. a compacted cache: indices are not positions
        elif not (type(layer) is LinearAttentionLayer and session.length > 0 and layer.has_previous_state[0]
                  and not layer.record_past and layer.number_of_states == 1):
            return False  # recurrent state not built yet (or recording for rollback)
    return True


def forward_batch(runtime, items: list[_Pending], stats: BatchStats | None = None) -> list[object]:
    """One decode position for each item's session; per item its output tensor or the exception it raised."""
    from openhydra.runtime.shard import PositionMismatchError

    stats = stats or BatchStats()
    results: list[object] = [None] * len(items)
    ready: list[tuple[int, object, torch.Tensor]] = []  # (item index, session, h [1, 1, D])
    locked = []
    try:
        for i, item in enumerate(items):
            try:
                h = runtime._input_hidden(1, item.input_ids, item.hidden_states)  # [1, 1, D]
            except Exception as exc:
                results[i] = exc
                continue
            session = runtime._sessions.acquire(item.session_id)
            session.lock.acquire()
            locked.append(session)
            if item.position != session.length:
                results[i] = PositionMismatchError(item.session_id, session.length, item.position)
            elif not _batchable(runtime, session):
                results[i] = None  # run alone below, after the locks are released
            else:
                ready.append((i, session, h))
        if len(ready) > 1:
            hidden = _run_layers_batched(runtime, [s for _, s, _ in ready], torch.cat([h for *_, h in ready]))
            out = _batched_output(runtime, hidden)  # one read of the head for every row
            for row, (i, session, _) in enumerate(ready):
                session.length += 1
                results[i] = out[row]  # [1, V] logits on the last span, else hidden [1, D]
            stats.batches += 1
            stats.steps += len(ready)
            stats.max_seen = max(stats.max_seen, len(ready))
        elif ready:
            results[ready[0][0]] = None  # a batch of one takes the plain path
    finally:
        for session in locked:
            session.lock.release()
    for i, item in enumerate(items):
        if results[i] is None:
            stats.fallback_steps += 1
            try:
                results[i] = runtime.forward(
                    item.session_id,
                    torch.tensor([item.position]),
                    input_ids=item.input_ids,
                    hidden_states=item.hidden_states,
                    all_logits=item.all_logits,
                )
            except Exception as exc:
                results[i] = exc
    return results


def _batched_output(runtime, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B, 1, D] -> per row what ``runtime._output`` gives for one position: float32 logits [B, 1, V]
    on the last span (norm + head applied to all rows at once), else the hidden states [B, 1, D]."""
    if not runtime.is_last:
        return hidden
    with torch.inference_mode():
        return runtime.modules.lm_head(runtime.modules.norm(hidden)).float()


def _run_layers_batched(runtime, sessions: list, h: torch.Tensor) -> torch.Tensor:
    """h [B, 1, D] for B sessions of lengths L_b -> hidden [B, 1, D]; appends one K/V position to each."""
    lengths = [s.length for s in sessions]
    longest = max(lengths)
    batch = len(sessions)
    device = h.device
    with torch.inference_mode():
        temp = DynamicCache(config=runtime.shard_config)
        for i, layer_type in enumerate(runtime.layer_types):
            if layer_type == "linear_attention":  # fixed-size states: stacked, no padding
                temp.layers[i] = _stacked_linear_layer([s.cache.layers[i] for s in sessions])
                continue
            if longest == 0:
                continue
            ref = next(s.cache.layers[i] for s in sessions if s.length > 0)
            _, heads, _, k_dim = ref.keys.shape
            v_dim = ref.values.shape[-1]
            keys = ref.keys.new_zeros((batch, heads, longest, k_dim))  # [B, H, Lmax, d], left-padded
            values = ref.values.new_zeros((batch, heads, longest, v_dim))
            for row, s in enumerate(sessions):
                if s.length:
                    keys[row, :, longest - s.length :] = s.cache.layers[i].keys[0]
                    values[row, :, longest - s.length :] = s.cache.layers[i].values[0]
            temp.layers[i].update(keys, values)
        columns = torch.arange(longest + 1, device=device)  # [Lmax + 1]
        starts = torch.tensor([longest - n for n in lengths], device=device)  # [B]
        mask = (columns[None, :] >= starts[:, None])[:, None, None, :]  # [B, 1, 1, Lmax + 1]: True = attend
        masks = {"full_attention": mask, "linear_attention": None}  # one new position: no padding in states
        position_ids = torch.tensor(lengths, device=device).view(batch, 1)  # [B, 1]
        position_embeddings = runtime.modules.rotary_emb(h, position_ids)  # (cos, sin), each [B, 1, head_dim]
        for layer, layer_type in zip(runtime.modules.layers, runtime.layer_types, strict=True):
            h = layer(
                h,
                attention_mask=masks[layer_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=temp,
                use_cache=True,
            )
            if isinstance(h, tuple):
                h = h[0]
        for i, layer_type in enumerate(runtime.layer_types):
            if layer_type == "linear_attention":
                for row, s in enumerate(sessions):  # each session's state after its new position
                    s.cache.layers[i].conv_states[0].copy_(temp.layers[i].conv_states[0][row : row + 1])
                    s.cache.layers[i].recurrent_states[0].copy_(temp.layers[i].recurrent_states[0][row : row + 1])
                continue
            new_k = temp.layers[i].keys[:, :, -1:]  # [B, H, 1, d]
            new_v = temp.layers[i].values[:, :, -1:]
            for row, s in enumerate(sessions):
                s.cache.layers[i].update(new_k[row : row + 1].clone(), new_v[row : row + 1].clone())
        return h  # [B, 1, D]


def _stacked_linear_layer(layers: list) -> LinearAttentionLayer:
    """A temporary Gated-DeltaNet cache layer holding B sessions' conv [B, C, K] and recurrent [B, H, dk, dv] states."""
    ref = layers[0]
    stacked = copy.copy(ref)
    stacked.conv_states = {0: torch.cat([layer.conv_states[0] for layer in layers])}
    stacked.recurrent_states = {0: torch.cat([layer.recurrent_states[0] for layer in layers])}
    for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
                 "conv_kernel_size"):
        setattr(stacked, name, dict(getattr(ref, name)))
    return stacked
