"""The coordinator's own opinion on a span: a third voter when a span has too few peers to decide.

With only two peers on a span, a tier-2 vote is one replay against another. A tie disputes both, and a smart
liar drawn as the secondary of an audit takes the honest peer down with it (docs/verification.md). A lone tier-3
auditor has the same problem the other way round: its word alone would fail an agreeing pair.

The referee settles such a vote. It loads the span from the coordinator's model folder, serves it from this
process on a port of its own (a :class:`~openhydra.peer.server.PeerServer`, never announced), and replays the
audited steps with itself swapped in for the span, exactly as any voter does. Its answer is one more vote:

- it breaks a tie only when it agrees with a peer's answer (the referee alone against everyone proves nothing: the
  replay passes through the chain's other hops too);
- it is never failed, passed or disputed itself, and it is never asked when the span has enough voters.

The span stays loaded for ``keep_s`` after its last vote (a liar that keeps losing ties costs one load), then the
server stops and the weights are dropped. One span at a time: a vote on another span replaces it. A span larger than
half the memory available is not loaded (:func:`load_span`): peers choose which spans exist, and two peers announcing
the whole of a large model must not make a small coordinator load it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openhydra.discovery.records import PeerAnnouncement

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.5
"""The referee loads a span only if its weights take at most this share of the memory available."""

REFEREE = "(referee)"
"""The referee's name among a vote's voters: never a peer id (peer ids have no parentheses)."""


@dataclass
class _Loaded:
    span: tuple[int, int]
    dtype: str
    server: Any  # PeerServer
    record: PeerAnnouncement
    last_used: float


class Referee:
    """Loads and serves one span at a time for :class:`~openhydra.verification.audits.AuditRunner` votes.

    ``load(span, dtype)`` returns a runtime of that span; ``serve(runtime)`` a started-able PeerServer around it;
    ``record(runtime, address)`` the announcement-shaped record the coordinator routes with (for an encrypting
    swarm: signed, so the client can encrypt to the referee's static key). Nothing is announced.
    """

    def __init__(self, load: Callable[[tuple[int, int], str], Any], serve: Callable[[Any], Any],
                 record: Callable[[Any, str], PeerAnnouncement], *, keep_s: float = 300.0) -> None:
        self._load, self._serve, self._record = load, serve, record
        self.keep_s = keep_s
        self._loaded: _Loaded | None = None
        self._lock = threading.Lock()
        self.loads = 0  # spans loaded so far (status, tests)
        self.failures = 0  # loads that failed (the vote then stays as it was)

    def peer(self, span: tuple[int, int], dtype: str) -> PeerAnnouncement | None:
        """The referee's record for ``span`` in ``dtype``, loading it first if needed; None when it cannot load."""
        with self._lock:
            loaded = self._loaded
            if loaded is not None and loaded.span == span and loaded.dtype == dtype:
                loaded.last_used = time.monotonic()
                return loaded.record
            self._unload()
            started = time.perf_counter()
            try:
                runtime = self._load(span, dtype)
                server = self._serve(runtime)
                address = server.start()
                record = self._record(runtime, getattr(server, "hop_address", address))
            except Exception as exc:  # no weights for that span here, no memory, no port: the vote stays as it was
                self.failures += 1
                log.warning("referee: cannot serve span [%d, %d) in %s: %s", *span, dtype, exc)
                return None
            self.loads += 1
            self._loaded = _Loaded(span, dtype, server, record, time.monotonic())
            log.info("referee: serving span [%d, %d) (%s) at %s for a vote, loaded in %.1f s", *span, dtype,
                     record.grpc_address, time.perf_counter() - started)
            return record

    def expire(self, now: float | None = None) -> None:
        """Drop the loaded span once it has been idle for ``keep_s`` (the verifier calls this when idle)."""
        with self._lock:
            loaded = self._loaded
            if loaded is not None and (now if now is not None else time.monotonic()) - loaded.last_used >= self.keep_s:
                log.info("referee: span [%d, %d) idle for %.0f s, unloading", *loaded.span, self.keep_s)
                self._unload()

    def status(self) -> dict:
        loaded = self._loaded
        return {"loaded_span": list(loaded.span) if loaded else None, "loads": self.loads, "failures": self.failures}

    def close(self) -> None:
        with self._lock:
            self._unload()

    def _unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            try:
                loaded.server.stop()
            except Exception as exc:
                log.debug("referee: stopping the server of span [%d, %d): %s", *loaded.span, exc)


def load_span(model_dir, span: tuple[int, int], dtype: str, *, device: str = "cpu", quantization: str = "none",
              matmul: str = "pytorch", available_bytes: int | None = None):
    """The referee's runtime of layers ``span`` of ``model_dir`` in ``dtype`` (float32 unless bfloat16/float16).

    Raises MemoryError, before reading any weight, when the span's weights would take more than
    :data:`MEMORY_SHARE` of the memory available (``available_bytes``, default: what the OS reports)."""
    import psutil
    import torch

    from openhydra.hardware.dtype import span_parameter_count
    from openhydra.runtime.shard import ShardRuntime

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    need = span_parameter_count(model_dir, *span) * torch_dtype.itemsize
    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if need > MEMORY_SHARE * available:
        raise MemoryError(f"layers {list(span)} take {need / 2**30:.2f} GiB in {dtype}, more than "
                          f"{MEMORY_SHARE:.0%} of the {available / 2**30:.2f} GiB available")
    return ShardRuntime(model_dir, *span, dtype=torch_dtype, device=device, quantization=quantization, matmul=matmul)
