"""Differential-privacy noise on outgoing activations, with HMAC-SHA256 audit tags (Gaussian mechanism,
Dwork & Roth 2014 Thm A.1; RFC 2104).

Implements the "Privacy" row of SPEC.md "Security and privacy": calibrated noise is injected into
the activations a node sends, and the coordinator can check it was applied as configured.

Mechanism: each token's hidden-state vector (last dim) is clipped to L2 norm ``clip``, then
``N(0, (sigma * clip)**2)`` noise is added per coordinate. Clipping bounds one vector's L2
sensitivity by ``2 * clip`` (replace-one), so one release of one token vector is (ε, δ)-DP with
``ε = 2 * sqrt(2 ln(1.25/δ)) / sigma`` (valid as stated for ε < 1; larger values are only an
indication). :func:`epsilon` computes it; at noise levels that keep a model usable ε is in the
hundreds or more, i.e. this is a mitigation against reconstructing inputs, not a formal guarantee.

Audit: the noise is not chosen by the sender. Its seed is
``HMAC-SHA256(audit_key, "dp-seed" || session || hop || step)[:8]``, where ``audit_key`` is the hop's
key shared with the coordinator (:class:`openhydra.crypto.keys.HopKeys`), and the noise is drawn on
CPU from ``torch.Generator().manual_seed(seed)``. The sender attaches a :class:`DPRecord`: session,
hop, step, sigma, clip, shape, dtype, the seed, SHA-256 of the noised tensor's bytes, and an
HMAC-SHA256 tag over all of them. The coordinator (holding ``audit_key``) checks:

1. :meth:`DPAuditor.verify_record`: the tag is authentic, the parameters are the configured ones,
   the seed is the one it derives itself, and session/hop/step are the expected ones;
2. :meth:`DPAuditor.verify_received`: the tensor that actually arrived has the tagged digest;
3. :meth:`DPAuditor.verify_against_input` on spot-checked steps (when verification re-executes the
   span and so knows the clean activation): recomputing clip + noise gives the tagged digest
   bit for bit. This is what catches a sender that skipped or weakened the noise while claiming
   the configured parameters; without the clean input no one can tell noise from signal.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from openhydra.crypto.encoding import B64Bytes
from openhydra.crypto.errors import AuditFailure

SEED_DOMAIN = b"openhydra-dp-seed:v1"
TAG_DOMAIN = b"openhydra-dp-tag:v1"


@dataclass(frozen=True)
class DPParams:
    sigma: float
    """Noise multiplier: per-coordinate std is sigma * clip."""
    clip: float
    """L2 bound of each token vector."""

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.clip <= 0 or not math.isfinite(self.sigma * self.clip):
            raise ValueError(f"need sigma >= 0 and clip > 0, got sigma={self.sigma}, clip={self.clip}")

    @property
    def noise_std(self) -> float:
        return self.sigma * self.clip


class DPRecord(BaseModel):
    """What a sender attaches to a noised activation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str = Field(min_length=1, max_length=255)
    hop_index: int = Field(ge=0, le=255)
    step: int = Field(ge=0, lt=2**64)
    sigma: float = Field(ge=0)
    clip: float = Field(gt=0)
    shape: list[int] = Field(max_length=8)
    dtype: str = Field(max_length=32)
    seed: int = Field(ge=0, lt=2**64)
    digest: B64Bytes = Field(min_length=32, max_length=32)
    tag: B64Bytes = Field(min_length=32, max_length=32)


def epsilon(sigma: float, delta: float = 1e-5) -> float:
    """ε of one release of one clipped token vector under the classic Gaussian mechanism."""
    return math.inf if sigma <= 0 else 2.0 * math.sqrt(2.0 * math.log(1.25 / delta)) / sigma


def noise_seed(audit_key: bytes, session_id: str, hop_index: int, step: int) -> int:
    msg = SEED_DOMAIN + struct.pack(">BQ", hop_index, step) + session_id.encode()
    return int.from_bytes(hmac.new(audit_key, msg, hashlib.sha256).digest()[:8], "big")


def gaussian_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Standard normal noise, reproducible from ``seed`` on any machine (drawn on CPU, fp32)."""
    gen = torch.Generator(device="cpu").manual_seed(seed & (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def clip_rows(x: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each vector along the last dim down to L2 norm <= clip (fp32)."""
    x = x.float()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.clamp(clip / torch.clamp(norms, min=1e-12), max=1.0)


def tensor_digest(t: torch.Tensor) -> bytes:
    """SHA-256 of the tensor's dtype, shape and raw bytes (as sent on the wire)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype}|{tuple(t.shape)}|".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.digest()


def audit_tag(audit_key: bytes, r: DPRecord | dict[str, object]) -> bytes:
    f = r.model_dump() if isinstance(r, DPRecord) else r
    msg = b"|".join(
        (
            TAG_DOMAIN,
            str(f["session_id"]).encode(),
            struct.pack(">BQdd", f["hop_index"], f["step"], f["sigma"], f["clip"]),
            ",".join(str(d) for d in f["shape"]).encode(),  # type: ignore[attr-defined]
            str(f["dtype"]).encode(),
            struct.pack(">Q", f["seed"]),
            bytes(f["digest"]),  # type: ignore[arg-type]
        )
    )
    return hmac.new(audit_key, msg, hashlib.sha256).digest()


def noised(x: torch.Tensor, params: DPParams, seed: int) -> torch.Tensor:
    """clip(x) + sigma * clip * N(0, 1), cast back to x's dtype and device."""
    out = clip_rows(x.detach().to("cpu"), params.clip)
    if params.sigma > 0:
        out = out + params.noise_std * gaussian_noise(tuple(x.shape), seed)
    return out.to(dtype=x.dtype, device=x.device)


def apply_dp(
    x: torch.Tensor, params: DPParams, audit_key: bytes, session_id: str, hop_index: int, step: int
) -> tuple[torch.Tensor, DPRecord]:
    """Sender side: the noised activation to send and its audit record. ``x``: [..., D]."""
    seed = noise_seed(audit_key, session_id, hop_index, step)
    y = noised(x, params, seed)
    fields: dict[str, object] = dict(
        session_id=session_id,
        hop_index=hop_index,
        step=step,
        sigma=float(params.sigma),
        clip=float(params.clip),
        shape=list(y.shape),
        dtype=str(y.dtype).removeprefix("torch."),
        seed=seed,
        digest=tensor_digest(y),
    )
    return y, DPRecord(**fields, tag=audit_tag(audit_key, fields))  # type: ignore[arg-type]


class DPAuditor:
    """Coordinator side, for one hop: holds its audit key and the configured parameters."""

    def __init__(self, audit_key: bytes, params: DPParams, session_id: str, hop_index: int) -> None:
        self._key = audit_key
        self.params = params
        self.session_id = session_id
        self.hop_index = hop_index

    def verify_record(self, record: DPRecord, step: int) -> None:
        if not hmac.compare_digest(audit_tag(self._key, record), record.tag):
            raise AuditFailure(f"DP audit tag of hop {self.hop_index} step {step} is not authentic")
        if (record.session_id, record.hop_index, record.step) != (self.session_id, self.hop_index, step):
            raise AuditFailure(
                f"DP record is for session/hop/step {record.session_id}/{record.hop_index}/{record.step}, "
                f"expected {self.session_id}/{self.hop_index}/{step}"
            )
        if record.sigma != self.params.sigma or record.clip != self.params.clip:
            raise AuditFailure(
                f"hop {self.hop_index} applied sigma={record.sigma}, clip={record.clip}; "
                f"configured sigma={self.params.sigma}, clip={self.params.clip}"
            )
        if record.seed != noise_seed(self._key, self.session_id, self.hop_index, step):
            raise AuditFailure(f"hop {self.hop_index} used a noise seed of its own choosing")

    def verify_received(self, record: DPRecord, received: torch.Tensor) -> None:
        if list(received.shape) != record.shape or not hmac.compare_digest(tensor_digest(received), record.digest):
            raise AuditFailure(f"activation from hop {self.hop_index} is not the one its DP record covers")

    def verify_against_input(self, record: DPRecord, clean: torch.Tensor, step: int) -> None:
        """Spot check: recompute the noise on the clean activation (from re-execution)."""
        self.verify_record(record, step)
        expected = tensor_digest(noised(clean.to(getattr(torch, record.dtype)), self.params, record.seed))
        if not hmac.compare_digest(expected, record.digest):
            raise AuditFailure(f"hop {self.hop_index} did not apply the configured noise at step {step}")
