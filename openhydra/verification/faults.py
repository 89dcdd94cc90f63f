"""Dishonest peers on purpose: a runtime wrapper that lies in a chosen way (tests and demos, not mocks).

``FaultyRuntime`` wraps a real :class:`~openhydra.runtime.shard.ShardRuntime` and is served by the
real gRPC ``PeerServer``; the coordinator cannot tell it from an honest peer except by its outputs.

- ``perturb``: adds Gaussian noise of ``magnitude`` x the output's RMS to the hidden states (or the
  logits on the last span). The noise is a function of ``seed`` and the step's positions only, so
  two peers with the same seed lie identically (collusion) and a replay reproduces the lie.
- ``wrong_token`` (last span only): pushes the top-ranked token to the bottom of the logits, so
  the peer samples another token and reports log-probabilities consistent with its lie.
- ``stale_cache`` (attention-only spans): a lazy peer that never appends decoded tokens to its
  cache: every decode step is computed against the prompt's cache alone, at the prompt's end.

``rate`` < 1 lies on that fraction of steps, chosen from (seed, position) so colluders agree
(``stale_cache`` ignores it: a stale cache stays stale).

``from_position`` > 0 is a *late liar*: honest on every step before that position (a verifier that
only compares the first N steps never sees it lie).

``dodge_audits`` is a *smart liar*: it answers honestly on every session it takes for an audit, by
whatever signal it has: a session id naming an audit, or a session whose first message repeats the
inputs of a session it already served (a shadow or replay of a request re-executes the same steps,
so every hop of the chain that is not swapped sees the same inputs twice). It lies on the others.

``informant`` with ``tip_off`` (a folder the colluders share) is the smart liar's accomplice on another span: it
answers honestly, and marks in the folder every session it takes for an audit, before it forwards that session's
first message. A dodging liar with the same ``tip_off`` dodges those sessions too. With the informant upstream of the
liar in every chain (the only peer of an earlier span), the liar also dodges the shadows in which it is the
secondary, which it cannot recognise alone, so no vote ever sees it lie: only elimination can convict it.

``curious`` with ``spy_dir`` is not a liar: an honest last span that reads what it should not. Under ``privacy=onion``
the last peer returns its final hidden states and the coordinator samples (peer/head.py), but the model is public: this
peer applies the model's own final norm and head (the last span loads them) to the hidden states it returns and writes
each step's greedy token to ``spy_dir/<session hash>``. docs/security.md says what that shows.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from openhydra.verification.config import FaultConfig

log = logging.getLogger(__name__)

SEEN_INPUTS = 4096  # dodge_audits: first-message digests remembered (sessions)


def _generator(seed: int, first_position: int, num_positions: int) -> torch.Generator:
    digest = hashlib.blake2b(f"fault:{seed}:{first_position}:{num_positions}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _session_file(folder: Path, session_id: str) -> Path:
    """The file a fault keeps about one session (tips, spied tokens): named by a hash of its id."""
    return folder / hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()


class FaultyRuntime:
    """A ``ShardRuntime`` that lies according to ``fault``; every other attribute is the real runtime's."""

    def __init__(self, runtime: Any, fault: FaultConfig) -> None:
        if fault.mode == "none":
            raise ValueError("FaultyRuntime needs a fault mode other than 'none'")
        if fault.mode == "wrong_token" and not runtime.is_last:
            raise ValueError(
                f"fault wrong_token needs the last span (it samples); this peer holds [{runtime.start},{runtime.end})"
            )
        if fault.mode == "stale_cache" and getattr(runtime, "is_recurrent", False):
            raise ValueError("fault stale_cache needs attention-only layers (it crops the cache back)")
        self.inner = runtime
        self.fault = fault
        self._prompt_end: dict[str, int] = {}  # stale_cache: session -> length the cache is kept at
        self.lies = 0
        self._seen: OrderedDict[bytes, str] = OrderedDict()  # dodge_audits: first-input digest -> session
        self._suspected: OrderedDict[str, bool] = OrderedDict()  # dodge_audits: session -> taken for an audit
        self.dodged = 0  # steps answered honestly because the session looked like an audit
        self.batcher = None  # decode batching would call the honest runtime directly: a liar computes alone
        self._tips = Path(fault.tip_off) if fault.tip_off else None
        if fault.mode == "curious" and (not runtime.is_last or not fault.spy_dir):
            raise ValueError("fault curious needs the last span and spy_dir (where it writes what it reads)")
        if fault.mode == "informant" and self._tips is None:
            raise ValueError("fault informant needs tip_off (the colluders' shared folder)")
        if self._tips is not None:
            self._tips.mkdir(parents=True, exist_ok=True)
        log.warning("peer runtime [%d,%d) is DISHONEST on purpose: fault %s", runtime.start, runtime.end,
                    fault.model_dump())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _looks_audited(self, session_id: str, positions: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        """dodge_audits: decided at a session's first message, remembered for the session."""
        known = self._suspected.get(session_id)
        if known is not None:
            return known
        tensor = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("hidden_states")
        h = hashlib.blake2b(digest_size=16)
        h.update(positions.cpu().numpy().tobytes())
        if tensor is not None:
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digest = h.digest()
        suspected = "audit" in session_id.lower() or digest in self._seen or self._tipped(session_id)
        self._seen[digest] = session_id
        self._suspected[session_id] = suspected
        while len(self._seen) > SEEN_INPUTS:
            self._seen.popitem(last=False)
        while len(self._suspected) > SEEN_INPUTS:
            self._suspected.popitem(last=False)
        return suspected

    def _tip_path(self, session_id: str) -> Path:
        return _session_file(self._tips, session_id)

    def _tipped(self, session_id: str) -> bool:
        return self._tips is not None and self.fault.mode != "informant" and self._tip_path(session_id).exists()

    def _lies_now(self, first: int, n: int) -> bool:
        if first + n <= self.fault.from_position:  # a late liar: honest before from_position
            return False
        if self.fault.rate >= 1.0:
            return True
        return float(torch.rand(1, generator=_generator(self.fault.seed + 1, first, n))) < self.fault.rate

    def close_session(self, session_id: str) -> None:
        self._prompt_end.pop(session_id, None)
        self.inner.close_session(session_id)

    def forward(self, session_id: str, positions: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        first, n = int(positions[0]), positions.numel()
        if self.fault.mode == "informant":  # honest; marks the sessions it takes for audits for its colluders
            if self._looks_audited(session_id, positions, kwargs):
                self._tip_path(session_id).touch()
                self.dodged += 1
            return self.inner.forward(session_id, positions, **kwargs)
        if self.fault.mode == "curious":
            out = self.inner.forward(session_id, positions, **kwargs)
            if kwargs.get("return_hidden"):
                self._read_token(session_id, first + n, out)
            return out
        lie = self._lies_now(first, n)
        if self.fault.dodge_audits and self._looks_audited(session_id, positions, kwargs):
            self.dodged += 1
            return self.inner.forward(session_id, positions, **kwargs)
        if self.fault.mode == "stale_cache":
            return self._stale_forward(session_id, positions, **kwargs)
        out = self.inner.forward(session_id, positions, **kwargs)
        if not lie:
            return out
        self.lies += 1
        if self.fault.mode == "perturb":
            noise = torch.randn(out.shape, generator=_generator(self.fault.seed, first, n), dtype=torch.float32)
            rms = out.float().pow(2).mean().sqrt()
            return (out.float() + self.fault.magnitude * rms * noise).to(out.dtype)
        # wrong_token: the best token of the last position becomes the worst.
        out = out.clone()  # logits [1, V] or [S, V], float32
        row = out[-1]
        row[int(torch.argmax(row))] = row.min() - 1.0
        return out

    def _read_token(self, session_id: str, position: int, hidden: torch.Tensor) -> None:
        """curious: the greedy token the coordinator will sample from these final hidden states [S, D]."""
        modules = self.inner.modules
        with torch.inference_mode():
            logits = modules.lm_head(modules.norm(hidden[-1:].unsqueeze(0)))[0, -1]  # [V]
        spy = Path(self.fault.spy_dir)
        spy.mkdir(parents=True, exist_ok=True)
        with _session_file(spy, session_id).open("a") as f:
            f.write(f"{position} {int(torch.argmax(logits))}\n")

    def _stale_forward(self, session_id: str, positions: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        n = positions.numel()
        base = self._prompt_end.get(session_id)
        if n > 1 or base is None:  # prefill chunks are computed honestly
            out = self.inner.forward(session_id, positions, **kwargs)
            self._prompt_end[session_id] = int(positions[-1]) + 1
            return out
        # Decode against the prompt-only cache, at the prompt's end position, then forget the token.
        self.lies += 1
        out = self.inner.forward(session_id, torch.tensor([base], dtype=positions.dtype), **kwargs)
        self.inner.truncate_session(session_id, base)
        return out
