"""What a node needs to run the peer protocol privately, built once from its ``privacy`` config.

node.py calls :func:`node_privacy` and hands the pieces to the objects that use them: the static key
to :class:`~openhydra.peer.server.PeerServer`, :meth:`NodePrivacy.sign` to the announcer's record
factory, :func:`~openhydra.crypto.records.verify_record` to ``discovery.set_verifier`` and
:meth:`NodePrivacy.client_options` to :class:`~openhydra.peer.client.PeerChainClient`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openhydra.crypto.config import PrivacyConfig
from openhydra.crypto.errors import CryptoError
from openhydra.crypto.keys import SignedStaticKey, StaticKeyPair
from openhydra.crypto.membership import Membership
from openhydra.crypto.pow import WINDOW_S
from openhydra.crypto.records import sign_record, verify_record
from openhydra.discovery.refusals import RefusalLog
from openhydra.peer.embedding import Embedder, load_embedder
from openhydra.peer.head import load_head, runtime_head
from openhydra.peer.privacy import ChainPrivacy

log = logging.getLogger(__name__)
REFUSALS = RefusalLog(log)


@dataclass
class NodePrivacy:
    config: PrivacyConfig
    identity: Any  # openhydra.crypto.identity.Identity, or None when the node has none
    static: StaticKeyPair
    signed_static: SignedStaticKey | None
    membership: Membership = field(default_factory=Membership)
    _warned: bool = False
    rejected_records: int = 0

    @property
    def encrypt(self) -> bool:
        return self.config.encrypt_activations

    def sign(self, record):
        """The announcement stamped with its admission proofs and signed by this node's identity (unsigned
        if it cannot be: no identity, or a configured peer id that is not the identity's, which verifying
        nodes will then drop)."""
        record = self.membership.stamp(record)
        if self.identity is None or record.peer_id != self.identity.peer_id:
            if self.encrypt and not self._warned:
                log.warning("cannot sign the record of %s (not this identity's peer id): nodes with encryption "
                            "on will drop it; remove node.peer_id or use privacy=off", record.peer_id)
                self._warned = True
            return record
        return sign_record(record, self.identity, self.signed_static)

    def status(self, peer_server, swarm) -> PrivacyStatus:
        return PrivacyStatus(self.config.level, peer_server, swarm, admission=self.admission)

    def admission(self) -> dict[str, Any]:
        """What this node asks of every record (and so what its own records carry): for /v1/network/status."""
        return admission_status(self.config, self.membership, self.rejected_records)

    def install_verifier(self, discovery) -> None:
        """With encryption on, unsigned, forged or key-less records are dropped at lookup; with a proof of
        work or a swarm secret configured, so are records without a valid proof or swarm tag."""
        if not hasattr(discovery, "set_verifier") or not (self.encrypt or self.membership.active):
            return

        def member(record) -> bool:  # a hash or two: before any signature is checked (discovery/base.py)
            try:
                self.membership.check(record)
            except CryptoError as exc:
                self.rejected_records += 1
                REFUSALS.dropped(record.peer_id, exc)
                return False
            return True

        discovery.set_verifier(verify_record if self.encrypt else None,
                               prefilter=member if self.membership.active else None)

    def client_options(self, runtime, model_dir: Path, peers: Callable[[], list], dtype=None) -> dict[str, Any]:
        """Keyword arguments for PeerChainClient: privacy level, local embedder, static-key lookup.

        ``runtime`` is this node's own span of the model (None when coordinating a model it holds no
        layers of, e.g. a fallback); ``dtype`` then sets the embedding table's dtype."""
        if not self.encrypt:
            return {"swarm_token": self.membership.token}
        # The first shard's own table when this node holds it (exactly what hop 0 would compute).
        if runtime is not None and runtime.is_first:
            embedder: Embedder = runtime.embed
        else:
            embedder = load_embedder(model_dir, dtype if dtype is not None else runtime.dtype)

        def key_lookup(address: str, peer_id: str = "") -> tuple[str, str | None] | None:
            return record_key(peers(), address, peer_id)

        head = None
        if self.config.onion:  # sample on the coordinator: the last hop returns hidden states (peer/head.py)
            if runtime is not None and runtime.is_last:
                head = runtime_head(runtime)
            else:
                head = load_head(model_dir, dtype if dtype is not None else runtime.dtype,
                                 getattr(runtime, "matmul", "pytorch"))
        return {"privacy": ChainPrivacy.from_config(self.config), "embedder": embedder, "key_lookup": key_lookup,
                "swarm_token": self.membership.token, "head": head}


def record_key(records: list, address: str, peer_id: str = "") -> tuple[str, str | None] | None:
    """(peer id, signed static key) of the record a hop was routed by: with ``peer_id``, only that peer's record at
    ``address``. An outsider's record naming an honest peer's address must not be sealed to the honest peer's key
    (a third red team routed through such a record: the honest peer served, then the settlement, which checks the
    routed identity, left the chain unpaid); sealed to the outsider's key, its first step fails and it is banned."""
    for record in records:
        if record.grpc_address == address and (not peer_id or record.peer_id == peer_id):
            return record.peer_id, record.static_key
    return None


KNOWN_REASONS = ("tampered", "replayed", "malformed", "plaintext", "invalid_static_key", "key_exhausted",
                 "dp_audit_failed", "control_denied", "forged_failure", "forged_result", "busy", "stale", "evicted")


@dataclass
class PrivacyStatus:
    """A ``state.extra`` provider: crypto rejection counters for ``/metrics`` and the privacy level for
    ``/v1/network/status``. ``side="peer"``: steps this node's peer server rejected; ``side="coordinator"``:
    results its coordinator could not open."""

    level: str
    peer_server: Any
    swarm: Any
    admission: Callable[[], dict[str, Any]] | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        service = getattr(self.peer_server, "service", None)
        client = getattr(self.swarm, "client", None)
        return {
            "peer": dict(getattr(service, "crypto_rejections", {}) or {}),
            "coordinator": dict(getattr(client, "crypto_rejections", {}) or {}),
        }

    def metrics_text(self) -> str:
        lines = [
            "# HELP openhydra_crypto_rejections_total Sealed steps, results and onion layers rejected, by reason.",
            "# TYPE openhydra_crypto_rejections_total counter",
        ]
        for side, counts in self.counts().items():
            for reason in sorted(set(KNOWN_REASONS) | set(counts)):
                labels = f'side="{side}",reason="{reason}"'
                lines.append(f"openhydra_crypto_rejections_total{{{labels}}} {counts.get(reason, 0)}")
        return "\n".join(lines) + "\n"

    def network_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"level": self.level, "crypto_rejections": self.counts()}
        if self.admission is not None:
            status["admission"] = self.admission()
        return status


def admission_text(config: PrivacyConfig) -> str:
    """One line for the start banner and the log: what joining this node's swarm costs."""
    private = config.swarm_secret is not None
    how = "auto, " if config.pow_difficulty_bits == "auto" else ""
    kind = "private swarm (swarm secret)" if private else "open swarm"
    if config.pow_bits == 0:
        return f"{kind}, no proof of work ({how}privacy.pow_difficulty_bits=0)"
    return (f"{kind}, proof of work {config.pow_bits} bits per identity every {WINDOW_S // 60} min "
            f"({how}privacy.pow_difficulty_bits; region {config.region})")


def admission_status(config: PrivacyConfig, membership: Membership, rejected_records: int) -> dict[str, Any]:
    return {
        "private_swarm": config.swarm_secret is not None,
        "pow_setting": config.pow_difficulty_bits,
        "pow_difficulty_bits": membership.difficulty_bits,
        "pow_window_s": WINDOW_S,
        "region": config.region,
        "proofs_solved": membership.solved,
        "last_solve_s": None if membership.last_solve_s is None else round(membership.last_solve_s, 3),
        "records_rejected": rejected_records,
    }


def node_privacy(raw: dict | None, identity) -> NodePrivacy:
    config = PrivacyConfig.model_validate(raw or {"encrypt_activations": False})
    static = StaticKeyPair.generate()  # per process start, never from a seed
    signed = static.signed_by(identity, config.static_key_ttl_s) if identity is not None else None
    if config.encrypt_activations and identity is None:
        raise ValueError("privacy.encrypt_activations needs a node identity (privacy.identity_path)")
    secret = config.swarm_secret.get_secret_value() if config.swarm_secret is not None else None
    membership = Membership(config.pow_bits, config.region, secret)
    log.info("privacy level %s; admission: %s", config.level, admission_text(config))
    return NodePrivacy(config, identity, static, signed, membership)
