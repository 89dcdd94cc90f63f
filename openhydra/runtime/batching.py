"""Continuous batching: concurrent sessions' decode steps on one runtime run as one forward.

Decode is memory-bandwidth bound (DESIGN §4): one token reads every weight of the span once, so
B sessions stepping together read them once instead of B times. :class:`DecodeBatcher` is the
scheduler: callers (peer gRPC handlers, the local pipeline's decode threads) submit single-position
steps and get a future; a worker thread takes whatever is pending, waits for more only while other
recently active sessions have not submitted yet (up to ``window_ms``, or a quarter of a step's
duration when that is longer; a lone stream never waits), runs :func:`forward_batch`,
and resolves each future with that session's output. Sessions join and leave between steps (the
batch is rebuilt every step, Orca-style iteration-level scheduling). A step may carry a ``then``
callback that returns the session's next step, queued before any future is set: the local pipeline's
plain decoding uses it so the next forward need not wait for the callers' threads (runtime/step_chain.py).

:func:`forward_batch` is exact: a session's tokens are bit-for-bit those it gets when it runs alone,
in bf16 and fp32 (greedy output must not depend on other users' traffic). Two measured facts shape it
(see the section "exactness" below): a matmul's rounding depends on its row count (M=1 differs from
M=8), and attention over a left-padded stack differs from attention over the session's own cache. So
every batched step, a lone session's included, runs the weight matmuls on a fixed ``rows`` (the
batcher's ``max_batch``, zero-padded rows) and attention row by row on each session's own K/V
(a custom attention function, plain SDPA otherwise). Recurrent layers (Qwen3.5 Gated DeltaNet) stack
their fixed-size conv and recurrent states [rows, ...] and split them back after the step. Steps it
cannot batch run on their own, the same way every time: sliding-window layers, compacted caches, a
session's first position, sessions still filling prefix blocks.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import LinearAttentionLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from openhydra.runtime import compute_lane
from openhydra.runtime.kv_layer import PLAIN_KV_LAYERS

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
    input_ids: torch.Tensor | None  # [S]
    hidden_states: torch.Tensor | None  # [S, D]
    all_logits: bool
    future: Future = field(default_factory=Future)
    then: Callable[[torch.Tensor], _Pending | None] | None = None
    """Called on the batcher's thread with this step's output before its future is set: a next step to queue at
    once, or None (runtime/step_chain.py: a stream's next decode step, queued without waiting for its thread)."""

    @property
    def count(self) -> int:
        """Positions in this step: 1 for decode, k + 1 for a speculative verify (one row each)."""
        return int(self.input_ids.shape[0] if self.input_ids is not None else self.hidden_states.shape[0])


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
        if getattr(runtime, "compaction", None) is None and hasattr(runtime, "shard_config"):  # MLX: no batching
            use_rows_attention(runtime)  # before any step runs: switching it later would race with them
        self.window_s = window_ms / 1000.0
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._step_s = 0.0  # moving average of one batched forward's duration, s
        self.last_sessions = 0  # sessions in the forward that just ran (read by ``then`` callbacks)
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
        """Queue a step of ``session_id`` at ``position``; the future gives what ``runtime.forward`` would return.

        One position (decode), or up to ``max_batch`` consecutive ones with ``all_logits`` (a speculative verify:
        each position is a row of the same batched forward, so its bits are those of the batched decode step
        plain decoding runs there; the output is [S, V] logits or [S, D] hidden states)."""
        item = _Pending(session_id, position, input_ids, hidden_states, all_logits)
        if item.count > 1 and not (all_logits and item.count <= self.max_batch):
            raise ValueError(f"a batched step of {item.count} positions needs all_logits and at most max_batch "
                             f"({self.max_batch}) positions")
        return self.queue(item)

    def queue(self, item: _Pending) -> Future:
        """Queue a step built by the caller (one position, or a verify :meth:`submit` checked); its future."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode batcher is closed")
            self._queue.append(item)
            self._last_seen[item.session_id] = time.monotonic()
            self._cond.notify()
        return item.future

    def withdraw(self, item: _Pending) -> bool:
        """Take ``item`` out of the queue if no forward has taken it yet (its future is then cancelled)."""
        with self._cond:
            try:
                self._queue.remove(item)
            except ValueError:
                return False
        item.future.cancel()
        return True

    def forward(self, session_id: str, position: int, **inputs) -> torch.Tensor:
        return self.submit(session_id, position, **inputs).result()

    def submit_verify(
        self,
        session_id: str,
        position: int,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> Future:
        """Queue a speculative verify of any length: ``max_batch`` positions per batched forward (each chunk
        queued once the one before it is done); the future gives [S, V] logits or [S, D] hidden states."""
        inputs = input_ids if input_ids is not None else hidden_states
        name = "input_ids" if input_ids is not None else "hidden_states"
        done: Future = Future()
        parts: list[torch.Tensor] = []

        def queue(start: int) -> None:
            if start >= inputs.shape[0]:
                done.set_result(torch.cat(parts))
                return
            chunk = inputs[start : start + self.max_batch]
            try:
                future = self.submit(session_id, position + start, all_logits=True, **{name: chunk})
            except Exception as exc:
                done.set_exception(exc)
                return

            def landed(f: Future) -> None:
                if f.exception() is not None:
                    done.set_exception(f.exception())
                    return
                parts.append(f.result())
                queue(start + chunk.shape[0])

            future.add_done_callback(landed)

        queue(0)
        return done

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
            rows = 0
            for item in list(self._queue):
                if rows == self.max_batch:
                    break
                fits = item.session_id not in seen and rows + item.count <= self.max_batch
                seen.add(item.session_id)  # a session's next step waits for its previous one
                if not fits:
                    continue  # a verify that does not fit waits for the next forward
                batch.append(item)
                rows += item.count
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
                # on the node's compute thread where it has one (runtime/compute_lane.py), else on this one
                outputs = compute_lane.run(forward_batch, self.runtime, batch, self.stats, rows=self.max_batch)
            except Exception as exc:  # the whole batch failed: every caller gets the error
                log.exception("batched decode step failed")
                outputs = [exc] * len(batch)
            elapsed = time.monotonic() - began
            self._step_s = elapsed if not self._step_s else 0.8 * self._step_s + 0.2 * elapsed
            self.last_sessions = len({item.session_id for item in batch})
            outputs = self._follow(batch, outputs)
            for item, out in zip(batch, outputs, strict=True):
                if isinstance(out, BaseException):
                    item.future.set_exception(out)
                else:
                    item.future.set_result(out)

    def _follow(self, batch: list[_Pending], outputs: list) -> list:
        """Queue the next steps the batch's ``then`` callbacks return (before any future is set, so the next
        forward finds them waiting); a callback that raises becomes its item's error."""
        outputs = list(outputs)
        for i, item in enumerate(batch):
            if item.then is None or isinstance(outputs[i], BaseException):
                continue
            try:
                nxt = item.then(outputs[i])
            except Exception as exc:
                log.exception("session %s: the step after position %d could not be queued", item.session_id,
                              item.position)
                outputs[i] = exc
                continue
            if nxt is not None:
                try:
                    self.queue(nxt)
                except RuntimeError:  # closed (the node is stopping): whoever waits for it must not wait forever
                    nxt.future.cancel()
        return outputs


# ---- the batched forward -------------------------------------------------------------------------------


def _batchable(runtime, session) -> bool:
    if getattr(runtime, "compaction", None) is not None:
        return False  # compaction captures queries and checks its threshold per step (runtime/compaction)
    if session.prefix is not None or any(t not in ("full_attention", "linear_attention") for t in runtime.layer_types):
        return False
    if session.length == 0:
        return False  # a first position (a one-token prompt) runs alone: there is no cache to extend yet
    for layer_type, layer in zip(runtime.layer_types, session.cache.layers, strict=True):
        if layer_type == "full_attention":
            if type(layer) not in PLAIN_KV_LAYERS or layer.get_seq_length() != session.length:
                return False  # e.g. a compacted cache: indices are not positions
        elif not (type(layer) is LinearAttentionLayer and layer.has_previous_state[0]
                  and not layer.record_past and layer.number_of_states == 1):
            return False  # recurrent state not built yet (or recording for rollback)
    return True


_SPLIT = object()  # forward_batch: a verify to run one row per forward
_ALONE = object()  # forward_batch: a lone row of a rows-independent span, run as the runtime's own step


def _row(item: _Pending, r: int) -> _Pending:
    return _Pending(item.session_id, item.position + r,
                    None if item.input_ids is None else item.input_ids[r : r + 1],
                    None if item.hidden_states is None else item.hidden_states[r : r + 1], item.all_logits)


def _single(out: object) -> torch.Tensor:
    if isinstance(out, BaseException):
        raise out
    return out  # [1, V] or [1, D]


def forward_batch(
    runtime, items: list[_Pending], stats: BatchStats | None = None, rows: int | None = None
) -> list[object]:
    """One decode position (a verify: several, one row each) for each item's session; per item its output tensor
    or the exception it raised.

    ``rows``: the fixed row count every batched forward is padded to (the batcher's ``max_batch``), so a
    session's arithmetic does not depend on how many others share its step. Default: the batch's row count. A span
    whose matmuls all run on the low-bit kernel (``runtime.rows_independent``: its rows' bits do not depend on the
    row count) is not padded: a lone stream on a batched node then costs what it costs on an unbatched one.
    """
    from openhydra.runtime.shard import PositionMismatchError

    stats = stats or BatchStats()
    results: list[object] = [None] * len(items)
    ready: list[tuple[int, object, torch.Tensor]] = []  # (item index, session, h [S, 1, D]: a row per position)
    locked = []
    try:
        hiddens = runtime._input_hiddens([(item.count, item.input_ids, item.hidden_states) for item in items])
        for i, item in enumerate(items):
            h = hiddens[i]  # [1, S, D]
            if isinstance(h, Exception):
                results[i] = h
                continue
            session = runtime._sessions.acquire(item.session_id)
            session.lock.acquire()
            locked.append(session)
            if item.position != session.length:
                results[i] = PositionMismatchError(item.session_id, session.length, item.position)
            elif not _batchable(runtime, session):
                results[i] = None  # run alone below, after the locks are released
            elif item.count > 1 and "linear_attention" in runtime.layer_types:
                results[i] = _SPLIT  # recurrent states stack one row per session: a row per forward, below
            else:
                ready.append((i, session, h.transpose(0, 1)))  # [S, 1, D]
        if len(ready) == 1 and ready[0][2].shape[0] == 1 and getattr(runtime, "rows_independent", False):
            # One row whose bits do not depend on the row count: the runtime's own step gives the same bits
            # (tested), through the lean layers (runtime/lean_layers.py) rather than transformers' batched ones.
            results[ready.pop()[0]] = _ALONE
        if ready:
            sessions = [s for _, s, h in ready for _ in range(h.shape[0])]  # a verify's session once per row
            positions = [s.length + r for _, s, h in ready for r in range(h.shape[0])]
            total = len(sessions)
            try:
                # padded to the fixed row count, unless no matmul's rounding depends on it (the low-bit kernel)
                # (bf16 on the library: its rows are independent up to ``independent_rows``; past that the
                # arithmetic is PyTorch's, whose rounding depends on the row count: padded as everywhere else)
                limit = getattr(runtime, "independent_rows", None)
                independent = getattr(runtime, "rows_independent", False) and (
                    limit is None or max(rows or total, total) <= limit)
                padded = total if independent else max(rows or total, total)
                hidden = _run_layers_batched(runtime, sessions, torch.cat([h for *_, h in ready]), padded, positions)
                out = _batched_output(runtime, hidden)  # one read of the head for every row
            except Exception:
                for s in {id(s): s for s in sessions}.values():  # some layers may have appended positions:
                    runtime._sessions.drop(s.session_id)  # these sessions are unusable
                raise
            row = 0
            for i, session, h in ready:
                n = h.shape[0]
                session.length += n
                runtime._sessions.grew(session)
                # [1, V] logits on the last span, else hidden [1, D]; a verify's [S, V] / [S, D]
                results[i] = out[row] if n == 1 else out[row : row + n, 0]
                row += n
            stats.batches += 1
            stats.steps += len(ready)
            stats.max_seen = max(stats.max_seen, len(ready))
    finally:
        for session in locked:
            session.lock.release()
    for i, item in enumerate(items):
        if results[i] is _SPLIT:
            try:
                results[i] = torch.cat([_single(forward_batch(runtime, [_row(item, r)], stats, rows)[0])
                                        for r in range(item.count)])
            except Exception as exc:
                results[i] = exc
        elif results[i] is None or results[i] is _ALONE:
            if results[i] is None:
                stats.fallback_steps += 1
            else:  # a batch of one
                stats.batches, stats.steps, stats.max_seen = stats.batches + 1, stats.steps + 1, max(stats.max_seen, 1)
            try:
                results[i] = runtime.forward(  # a verify runs position by position there (runtime/shard.py)
                    item.session_id,
                    torch.arange(item.position, item.position + item.count),
                    input_ids=item.input_ids,
                    hidden_states=item.hidden_states,
                    all_logits=item.all_logits,
                )
            except Exception as exc:
                results[i] = exc
    return results


def _batched_output(runtime, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [R, 1, D] -> per row what ``runtime._output`` gives for one position: float32 logits [R, 1, V]
    on the last span (norm + head applied to all rows at once), else the hidden states [R, 1, D]."""
    if not runtime.is_last:
        return hidden
    with torch.inference_mode():
        return runtime.modules.lm_head(runtime.modules.norm(hidden)).float()


# ---- exactness: fixed row count, per-row attention ----------------------------------------------------
#
# A session's decode step must give the same bits whether it runs alone or next to 7 others (greedy
# output may not depend on other users' traffic). Measured on this CPU (torch 2.13, oneDNN/MKL):
# F.linear on M rows equals itself row for row whatever the other rows hold and wherever the row sits,
# but M=1 and M=2..8 give different roundings (fp32 differs for every M; bf16 between M=1 and M>1).
# Attention over a left-padded [B, H, Lmax, d] stack rounds differently from the session's own
# [1, H, L, d] too. So every batched step (a lone session's included) runs the weight matmuls on a fixed
# ``rows`` (zero-padded), and attention row by row on each session's own cache, with the same shapes
# whether or not others are present.

ROWS_ATTENTION = "openhydra_rows"
ROWS_KERNEL_ATTENTION = "openhydra_rows_lowbit"
"""The rows attention over the low-bit library's attention (runtime/kernel_attention.py), where the span uses it."""


class _Rows(list):
    """Per-row key (or value) tensors [1, H, L_b + 1, d] that a :class:`_RowsLayer` hands to attention."""


def rows_attention_forward(module, query, key, value, attention_mask, *, base=sdpa_attention_forward, **kwargs):
    """The span's attention (``base``: SDPA, or the low-bit library's), except for a batched step's :class:`_Rows`:
    each row attends over its own session's cache alone."""
    if not isinstance(key, _Rows):
        return base(module, query, key, value, attention_mask, **kwargs)
    outputs = [base(module, query[r : r + 1], k, v, None, **kwargs)[0]  # [1, 1, H, d]
               for r, (k, v) in enumerate(zip(key, value, strict=True))]
    padding = query.shape[0] - len(outputs)
    if padding:
        outputs.append(outputs[0].new_zeros((padding, *outputs[0].shape[1:])))
    return torch.cat(outputs), None  # [R, 1, H, d]


def use_rows_attention(runtime) -> None:
    """Point the span's attention at :func:`rows_attention_forward` over the attention it uses for ordinary steps
    (SDPA, or the low-bit library's)."""
    from openhydra.runtime.kernel_attention import KERNEL_ATTENTION, kernel_attention_forward

    current = runtime.shard_config._attn_implementation
    if current in (ROWS_ATTENTION, ROWS_KERNEL_ATTENTION):
        return
    bases = {"sdpa": (ROWS_ATTENTION, sdpa_attention_forward),
             KERNEL_ATTENTION: (ROWS_KERNEL_ATTENTION, kernel_attention_forward)}
    if current not in bases:
        raise NotImplementedError(f"continuous batching needs sdpa attention, the span uses {current!r}")
    name, base = bases[current]
    AttentionInterface.register(name, partial(rows_attention_forward, base=base))
    AttentionMaskInterface.register(name, sdpa_mask)
    runtime.shard_config._attn_implementation = name


class _RowsLayer:
    """A batched step's full-attention cache layer: appends each row's new K/V to its own session's cache."""

    def __init__(self, layers: list) -> None:
        self.layers = layers  # the sessions' DynamicLayers, one per real row

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = _Rows(), _Rows()
        for row, layer in enumerate(self.layers):  # key_states [R, H, 1, d]; padding rows are dropped
            k, v = layer.update(key_states[row : row + 1], value_states[row : row + 1])
            keys.append(k)
            values.append(v)
        return keys, values


def _run_layers_batched(runtime, sessions: list, h: torch.Tensor, rows: int,
                        positions: list[int] | None = None) -> torch.Tensor:
    """h [B, 1, D] for B rows at ``positions`` (default: each session's length) -> hidden [rows, 1, D] (rows >= B,
    zero-padded); appends each row's position to its session's cache. A session may hold consecutive rows (a
    verify): its cache layer then appends them in row order, so each row attends over the positions up to its
    own, as the one-position decode step there does."""
    from openhydra.runtime.lean_layers import lean_rotary, lean_usable  # it imports this module

    use_rows_attention(runtime)
    lengths = positions if positions is not None else [s.length for s in sessions]
    batch = len(sessions)
    padding = rows - batch
    if padding:
        h = torch.cat([h, h.new_zeros((padding, *h.shape[1:]))])  # [rows, 1, D]
    device = h.device
    with torch.inference_mode():
        position_ids = torch.tensor(lengths + [0] * padding, device=device).view(rows, 1)  # [rows, 1]
        position_embeddings = runtime.modules.rotary_emb(h, position_ids)  # (cos, sin), each [rows, 1, head_dim]
        if lean_usable(runtime._lean, runtime.shard_config._attn_implementation):
            # the same operations as the loop below, without transformers' module machinery (runtime/lean_layers.py)
            # and without a cache object: each layer gets its rows' session cache layers (every layer is full
            # attention where the lean step runs)
            cos, sin = lean_rotary(position_embeddings)  # [rows, 1, 1, head_dim]
            for i, lean in enumerate(runtime._lean_layers):
                h = lean.step_rows(h, cos, sin, [s.cache.layers[i] for s in sessions])
            return h  # [rows, 1, D]
        temp = DynamicCache(config=runtime.shard_config)
        for i, layer_type in enumerate(runtime.layer_types):
            if layer_type == "linear_attention":  # fixed-size states: stacked (zeros for padding rows)
                temp.layers[i] = _stacked_linear_layer([s.cache.layers[i] for s in sessions], padding)
            else:
                temp.layers[i] = _RowsLayer([s.cache.layers[i] for s in sessions])
        masks = {"full_attention": None, "linear_attention": None}  # one new position: nothing to mask per row
        for layer, layer_type in zip(runtime.modules.layers, runtime.layer_types, strict=True):
            h = layer(
                h,
                attention_mask=masks[layer_type],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=temp,
                use_cache=True,
            )
            if isinstance(h, tuple):
                h = h[0]
        for i, layer_type in enumerate(runtime.layer_types):
            if layer_type == "linear_attention":
                for row, s in enumerate(sessions):  # each session's state after its new position
                    s.cache.layers[i].conv_states[0].copy_(temp.layers[i].conv_states[0][row : row + 1])
                    s.cache.layers[i].recurrent_states[0].copy_(temp.layers[i].recurrent_states[0][row : row + 1])
        return h  # [rows, 1, D]


def _stacked_linear_layer(layers: list, padding: int = 0) -> LinearAttentionLayer:
    """A temporary Gated-DeltaNet cache layer holding B sessions' conv [B+p, C, K] and recurrent [B+p, H, dk, dv]
    states (``padding`` zero rows last)."""
    ref = layers[0]
    stacked = copy.copy(ref)
    conv = [layer.conv_states[0] for layer in layers]
    recurrent = [layer.recurrent_states[0] for layer in layers]
    if padding:
        conv.append(conv[0].new_zeros((padding, *conv[0].shape[1:])))
        recurrent.append(recurrent[0].new_zeros((padding, *recurrent[0].shape[1:])))
    stacked.conv_states = {0: torch.cat(conv)}
    stacked.recurrent_states = {0: torch.cat(recurrent)}
    for name in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
                 "conv_kernel_size"):
        setattr(stacked, name, dict(getattr(ref, name)))
    return stacked
