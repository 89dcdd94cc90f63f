"""The ``privacy/`` config group's schema (SPEC.md "Security and privacy"; DESIGN.md §1 and §5).

Options in ``conf/privacy/``: ``off`` (plaintext activations, for debugging on one machine only),
``encrypted`` (per-hop X25519 + AES-256-GCM: the default SPEC.md promises), ``onion`` (plus onion
routing) and ``onion_dp`` (plus differential-privacy noise with audit tags). ``instantiate`` on the
group returns a validated :class:`PrivacyConfig`; build.py hands it to the coordinator and peer.

Secrets never live in these files: ``swarm_secret`` defaults to ``$OPENHYDRA_SWARM_SECRET``. The API
bearer token is ``api.bearer_token`` (the api group), not repeated here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

TARGET = "openhydra.crypto.config.PrivacyConfig"

OPEN_SWARM_POW_BITS = 20
"""What ``pow_difficulty_bits: auto`` asks of every identity in an open swarm: about 2**20 SHA-256 hashes,
1-2 CPU seconds of the pure-Python solver per identity per 10-minute window on this project's CPUs
(docs/security.md, bench/bench_pow.py). An honest node pays it once per window in a niced child process
(< 0.5% of a core); rejoining under a fresh identity, or keeping N identities alive, costs that much per
identity. 22+ bits would make a node's first announcement wait ~5 s or more on average (the count is
geometric: 1 in 20 solves takes 3x the mean)."""


class PrivacyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    target: str = Field(default=TARGET, alias="_target_")
    encrypt_activations: bool = True
    """Seal every activation per hop (AES-256-GCM under ephemeral X25519 + HKDF keys)."""
    onion: bool = False
    """Wrap the route in onion layers so each peer learns only its predecessor and successor."""
    onion_size_bytes: int = Field(default=2048, ge=256, le=1 << 20)
    """Every onion is padded to this size so its length does not reveal the route's length."""
    dp_sigma: float = Field(default=0.0, ge=0.0, le=10.0)
    """Gaussian noise multiplier: per-coordinate std is ``dp_sigma * dp_clip``; 0 turns DP off."""
    dp_clip: float = Field(default=300.0, gt=0.0)
    """L2 bound of each token's hidden-state vector a peer sends (calibrate per model: clipping
    below the hidden-state norms distorts the model before any noise is added)."""
    dp_clip_embeddings: float = Field(default=4.0, gt=0.0)
    """L2 bound of each token's embedding the coordinator sends to the first peer (embeddings
    are two orders of magnitude smaller than later hidden states)."""
    pow_difficulty_bits: Annotated[int, Field(ge=0, le=40)] | Literal["auto"] = "auto"
    """Leading zero bits a geo-challenge proof needs; 0: proofs are not required. ``auto`` (the default):
    :data:`OPEN_SWARM_POW_BITS` in an open swarm, 0 in a private one (``swarm_secret`` set), so every node of
    a swarm derives the same difficulty from its config (see :attr:`pow_bits`)."""
    region: str = Field(default="unspecified", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    """The region this node claims in its geo-challenge."""
    identity_path: str = "~/.openhydra/identity.key"
    static_key_ttl_s: int = Field(default=86_400, ge=60)
    """How long an advertised X25519 key's signature is valid; the key is regenerated per start."""
    swarm_secret: SecretStr | None = None
    """Shared secret of a private swarm (at least 16 characters); None: an open swarm."""

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.target != TARGET:
            raise ValueError(f"_target_ must be {TARGET}, got {self.target!r}")
        if self.onion and not self.encrypt_activations:
            raise ValueError("onion=true needs encrypt_activations=true (layers use the per-hop keys)")
        if self.dp_sigma > 0 and not self.encrypt_activations:
            raise ValueError("dp_sigma > 0 needs encrypt_activations=true (audit keys come from the hop keys)")
        if self.swarm_secret is not None and len(self.swarm_secret.get_secret_value()) < 16:
            raise ValueError("swarm_secret must be at least 16 characters")
        return self

    @property
    def pow_bits(self) -> int:
        """The proof-of-work difficulty in force: the explicit setting, or for ``auto`` 20 bits in an open
        swarm and 0 in a private one (whose secret already admits members; a member who holds it can mint
        identities anyway, so work would only cost the operator's own nodes CPU)."""
        if self.pow_difficulty_bits != "auto":
            return self.pow_difficulty_bits
        return 0 if self.swarm_secret is not None else OPEN_SWARM_POW_BITS

    @property
    def identity_file(self) -> Path:
        return Path(self.identity_path).expanduser()

    @property
    def dp_enabled(self) -> bool:
        return self.dp_sigma > 0

    @property
    def level(self) -> str:
        """A one-word summary for logs and /v1/network/status."""
        if not self.encrypt_activations:
            return "off"
        if self.dp_enabled:
            return "onion_dp" if self.onion else "encrypted_dp"
        return "onion" if self.onion else "encrypted"
