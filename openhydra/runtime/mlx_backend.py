"""``MlxShardRuntime``: a layer span served by Apple's MLX (mlx-lm's model code), same interface as ShardRuntime.

Chosen by ``hardware=m1…m4`` (``backend: mlx``). On Apple Silicon MLX runs on the GPU through
unified memory; on Linux ``mlx[cpu]`` runs the same code on the CPU, which is how it is tested here.

The wire stays backend-neutral: a span takes and returns ``torch`` tensors (token ids [S], hidden
states [S, D] float, logits [1, V] / [S, V] float32), converted at the edges, so an MLX span chains
with PyTorch spans in one swarm. Inside, the span is mlx-lm's own decoder blocks for the model type,
built for ``end - start`` layers and loaded with only this span's tensors (layer ``start + i`` of the
checkpoint becomes block ``i``), one ``KVCache`` per layer and session.

mlx-lm reads ``rope_theta`` at the top level of config.json, while transformers 5 writes it under
``rope_parameters`` (DESIGN §4): read as-is, SmolLM2 would silently run with the default theta
10,000 instead of 100,000 and its tokens would drift. :func:`mlx_model_config` lifts it back up.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openhydra.runtime.sessions import SessionStore
from openhydra.runtime.shard import PositionMismatchError
from openhydra.runtime.weights import CheckpointError, CheckpointIndex

log = logging.getLogger(__name__)

# Model types whose mlx-lm blocks have the plain ``block(h, mask, cache)`` form with one KVCache each.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MlxUnavailable(RuntimeError):
    pass


def mlx_import_error() -> str | None:
    """Why mlx / mlx-lm cannot be used here (the exact import error), or None when they can."""
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except Exception as exc:  # ImportError, or an OSError from a missing shared library
        return f"{type(exc).__name__}: {exc}"
    return None


def mlx_model_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json as mlx-lm expects it: the text config, with ``rope_theta``/``rope_scaling`` at the top."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = dict(config.get("text_config") or config) if "text_config" in config else config
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if config.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


class MlxShardRuntime:
    """Layers ``[start, end)`` of a decoder-only model on MLX; the methods peers call on a ShardRuntime."""

    name = "mlx"
    is_recurrent = False  # only KV-cache model types are supported, and KVCache trims

    def __init__(
        self,
        model_dir: str | Path,
        start: int = 0,
        end: int | None = None,
        *,
        dtype: str | torch.dtype = "bfloat16",
        max_sessions: int = 64,
        session_idle_timeout_s: float = 600.0,
    ) -> None:
        reason = mlx_import_error()
        if reason is not None:
            raise MlxUnavailable(f"the MLX backend needs mlx and mlx-lm (pip install 'openhydra-network[mlx]'): "
                                 f"{reason}")
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache
        from mlx_lm.utils import _get_classes

        self.model_dir = Path(model_dir)
        config = mlx_model_config(self.model_dir)
        self.model_type: str = config["model_type"]
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(f"the MLX backend serves {sorted(SUPPORTED_MODEL_TYPES)}, not {self.model_type!r}"
                                      "; use hardware=cpu (PyTorch) for this model")
        layer_types = config.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"the MLX backend serves full-attention layers only, got {sorted(set(layer_types))}")
        self.num_layers: int = int(config["num_hidden_layers"])
        end = self.num_layers if end is None else end
        if not 0 <= start < end <= self.num_layers:
            raise ValueError(f"span [{start},{end}) is not a non-empty range inside [0,{self.num_layers})")
        self.start, self.end = start, end
        self.is_first, self.is_last = start == 0, end == self.num_layers
        self.hidden_size: int = int(config["hidden_size"])
        self.vocab_size: int = int(config["vocab_size"])
        dtype_name = str(dtype).removeprefix("torch.")
        if dtype_name not in _TORCH_DTYPES:
            raise ValueError(f"MLX dtype must be one of {list(_TORCH_DTYPES)}, got {dtype_name!r}")
        self.dtype: torch.dtype = _TORCH_DTYPES[dtype_name]  # dtype of hidden states on the wire
        self._mx_dtype = getattr(mx, dtype_name)
        self.layer_types = ["full_attention"] * (end - start)
        self.quantization = "none"

        model_cls, args_cls = _get_classes(config)
        shard_config = {**config, "num_hidden_layers": end - start}
        if layer_types:
            shard_config["layer_types"] = layer_types[start:end]
        self._model = model_cls(args_cls.from_dict(shard_config))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self._load_weights(mx)
        self._sessions = SessionStore(new_cache=lambda: [KVCache() for _ in self._layers],
                                      max_sessions=max_sessions, idle_timeout_s=session_idle_timeout_s)
        log.info("loaded %s layers [%d,%d) of %d on MLX (%s), %s, %.1f MB", self.model_type, start, end,
                 self.num_layers, mx.default_device(), dtype_name, self.loaded_bytes / 1e6)

    @property
    def numerics(self) -> str:
        """What its peer announces as the record's ``backend`` (runtime/shard.py ``ShardRuntime.numerics``): MLX's
        kernels compute otherwise than PyTorch's, so audits never pair it with a PyTorch peer."""
        return "mlx"

    # ---- loading --------------------------------------------------------------------------------

    @property
    def _layers(self) -> list:
        return self._model.model.layers

    def _load_weights(self, mx) -> None:
        from mlx.utils import tree_flatten

        index = CheckpointIndex.open(self.model_dir)
        tied = self.tied = index.head_is_tied(self.tied)
        wanted: dict[str, str] = {}  # mlx parameter name -> checkpoint name
        for name, _ in tree_flatten(self._model.parameters()):
            canonical = self._canonical(name, tied)
            if canonical is None:
                continue
            source = index.source_name(canonical)
            if source is None:
                raise CheckpointError(f"checkpoint at {index.root} has no tensor for {canonical!r} (MLX {name!r})")
            wanted[name] = source
        tensors = index.read(wanted, dict.fromkeys(wanted, torch.float32))
        arrays = [(name, mx.array(t.numpy()).astype(self._mx_dtype)) for name, t in tensors.items()]
        del tensors
        self._model.load_weights(arrays, strict=False)
        loaded = dict(arrays)
        mx.eval(list(loaded.values()))
        self.loaded_bytes = sum(a.nbytes for a in loaded.values())
        self.parameter_count = sum(a.size for a in loaded.values())
        # Drop what this span does not hold, so nothing unloaded can be used by mistake.
        inner = self._model.model
        if not (self.is_first or (self.is_last and tied)):
            inner.embed_tokens = None
        if not self.is_last:
            inner.norm = None
            if "lm_head" in self._model:
                self._model.lm_head = None

    def _canonical(self, mlx_name: str, tied: bool) -> str | None:
        """The checkpoint-canonical name of an mlx-lm parameter this span needs, or None if it does not."""
        name = mlx_name.removeprefix("model.")
        if name.startswith("layers."):
            index, _, rest = name.removeprefix("layers.").partition(".")
            return f"layers.{self.start + int(index)}.{rest}"
        if name.startswith("embed_tokens."):
            return name if self.is_first or (self.is_last and tied) else None
        if name.startswith("norm."):
            return name if self.is_last else None
        if name.startswith("lm_head."):
            return None if tied or not self.is_last else name
        return name

    # ---- sessions -------------------------------------------------------------------------------

    def session_length(self, session_id: str) -> int:
        session = self._sessions.get(session_id)
        return 0 if session is None else session.length

    def session_count(self) -> int:
        return len(self._sessions)

    def close_session(self, session_id: str) -> None:
        self._sessions.drop(session_id)

    def truncate_session(self, session_id: str, length: int) -> None:
        """Drop positions ``length..`` from every layer's cache (speculative-decoding rollback)."""

        def crop(session) -> None:
            for cache in session.cache:
                cache.trim(session.length - length)

        self._sessions.truncate(session_id, length, crop)

    # Prefix cache and continuous batching are PyTorch-runtime features; an MLX span runs without them.
    @property
    def prefix_cache(self) -> None:
        return None

    @prefix_cache.setter
    def prefix_cache(self, value: object) -> None:
        if value is not None:
            log.warning("the MLX backend has no prefix cache; serving without it")

    @property
    def batcher(self) -> None:
        return None

    @batcher.setter
    def batcher(self, value: object) -> None:
        if value is not None:
            log.warning("the MLX backend has no continuous batching; serving one session per step")

    @property
    def modules(self) -> _TorchFacingHead:
        """``norm`` and ``lm_head`` callables on torch tensors, as peer/head.py's coordinator-side sampling uses."""
        return _TorchFacingHead(self)

    # ---- compute --------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [S] -> embeddings [S, D] (first shard only)."""
        import mlx.core as mx

        if not self.is_first:
            raise RuntimeError(f"layers [{self.start},{self.end}) are not the first shard: no embeddings here")
        ids = mx.array(input_ids.to(torch.int64).numpy().astype(np.int32))
        return self._to_torch(self._model.model.embed_tokens(ids), self.dtype)

    def forward(
        self,
        session_id: str,
        positions: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        all_logits: bool = False,
        prefix: object | None = None,
    ) -> torch.Tensor:
        """One step of one session: hidden states [S, D] out, or float32 logits [1, V] ([S, V]) on the last span.

        ``prefix`` is accepted for interface parity with ShardRuntime and ignored (no prefix cache here).
        """
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        seq_len = _check_positions(positions)
        h = self._input_hidden(seq_len, input_ids, hidden_states)  # h: mx [1, S, D]
        first = int(positions[0])
        session = self._sessions.acquire(session_id)
        with session.lock:
            if first != session.length:
                raise PositionMismatchError(session_id, session.length, first)
            try:
                caches = session.cache
                mask = create_attention_mask(h, caches[0])  # positions come from cache.offset == session.length
                for layer, cache in zip(self._layers, caches, strict=True):
                    h = layer(h, mask, cache)
                if self.is_last:
                    h = self._model.model.norm(h if all_logits else h[:, -1:, :])
                    h = self._model.model.embed_tokens.as_linear(h) if self.tied else self._model.lm_head(h)
                mx.eval(h)
            except Exception:
                self._sessions.drop(session_id)  # some layers' caches may have advanced
                raise
            session.length += seq_len
        if self.is_last:
            return self._to_torch(h[0], torch.float32)  # [1, V] or [S, V]
        return self._to_torch(h[0], self.dtype)  # [S, D]

    def _input_hidden(self, seq_len: int, input_ids: torch.Tensor | None, hidden_states: torch.Tensor | None):
        import mlx.core as mx

        if self.is_first and hidden_states is None:
            if input_ids is None or input_ids.dim() != 1 or input_ids.numel() != seq_len:
                raise ValueError(f"the first shard takes input_ids [{seq_len}] or hidden_states [{seq_len}, "
                                 f"{self.hidden_size}]")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
            if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.vocab_size})")
            ids = mx.array(input_ids.to(torch.int64).numpy().astype(np.int32))[None]  # [1, S]
            return self._model.model.embed_tokens(ids)  # [1, S, D]
        if hidden_states is None or input_ids is not None:
            raise ValueError(f"layers [{self.start},{self.end}) take hidden_states [S, D] and no input_ids")
        if tuple(hidden_states.shape) != (seq_len, self.hidden_size):
            raise ValueError(f"hidden_states must be [{seq_len}, {self.hidden_size}], got {tuple(hidden_states.shape)}")
        array = mx.array(hidden_states.detach().to(torch.float32).cpu().numpy())
        return array.astype(self._mx_dtype)[None]  # [1, S, D]

    @staticmethod
    def _to_torch(array, dtype: torch.dtype) -> torch.Tensor:
        import mlx.core as mx

        # numpy has no bfloat16: go through float32 (exact for bf16/fp16 values).
        return torch.from_numpy(np.array(array.astype(mx.float32), copy=True)).to(dtype)


class _TorchFacingHead:
    """The last span's final norm and head, taking and returning torch tensors ([1, S, D] -> [1, S, V])."""

    def __init__(self, runtime: MlxShardRuntime) -> None:
        self._rt = runtime
        if not runtime.is_last:
            self.norm = self.lm_head = None

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        import mlx.core as mx

        h = mx.array(hidden.detach().to(torch.float32).cpu().numpy()).astype(self._rt._mx_dtype)
        return MlxShardRuntime._to_torch(self._rt._model.model.norm(h), self._rt.dtype)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        import mlx.core as mx

        rt = self._rt
        h = mx.array(hidden.detach().to(torch.float32).cpu().numpy()).astype(rt._mx_dtype)
        logits = rt._model.model.embed_tokens.as_linear(h) if rt.tied else rt._model.lm_head(h)
        return MlxShardRuntime._to_torch(logits, torch.float32)


def _check_positions(positions: torch.Tensor) -> int:
    if positions.dim() != 1 or positions.numel() == 0 or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be a non-empty 1-D integer tensor, got shape {tuple(positions.shape)} "
                         f"dtype {positions.dtype}")
    start = int(positions[0])
    expected = torch.arange(start, start + positions.numel(), dtype=positions.dtype)
    if start < 0 or not torch.equal(positions.cpu(), expected):
        raise ValueError(f"positions must be contiguous and non-negative, got {positions.tolist()[:8]}…")
    return positions.numel()


class MlxBackend:
    """The ``hardware/`` backend object for MLX (``backend: mlx``): loads spans as :class:`MlxShardRuntime`."""

    name = "mlx"

    def __init__(self, dtype: str = "bfloat16", threads: int = 0, note: str | None = None) -> None:
        import mlx.core as mx

        self.dtype_name = dtype
        self.dtype = _TORCH_DTYPES[dtype]
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        self.threads = threads
        self.quantization = "none"
        self.note = note
        self.compaction = None  # KV compaction is a PyTorch-runtime feature

    def describe(self) -> str:
        return f"mlx on {self.device}, {self.dtype_name}"

    def load_span(self, model_dir: Path, start: int, end: int | None) -> MlxShardRuntime:
        if getattr(self.compaction, "enabled", False):
            log.warning("the MLX backend has no KV compaction; serving without it")
        return MlxShardRuntime(model_dir, start, end, dtype=self.dtype_name)
