"""How a node uses weights from the swarm: fetch its span when its source fails, share its span once serving.

Kept apart from openhydra/node.py, which only calls :func:`swarm_fetch_for` (handed to catalog.resolve_model)
and :func:`share_weights` (before its peer server starts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from openhydra.config.schema import ModelConfig

log = logging.getLogger(__name__)


def reputation_reporter(data_dir: Path, verification: dict | None) -> Callable[[str, str], None]:
    """Record a peer that sent bytes not matching the manifest as a verification ``fail`` in this node's store."""
    from openhydra.verification.config import VerificationConfig
    from openhydra.verification.reputation import ReputationStore

    vcfg = VerificationConfig.model_validate(verification or {})
    path = Path(data_dir).expanduser() / vcfg.reputation.db_name

    def report(peer_id: str, detail: str) -> None:
        store = ReputationStore(path, vcfg.reputation)
        try:
            store.record(peer_id, "fail", detail=f"weights: {detail}")
            store.flush()
        finally:
            store.close()
        log.warning("reported peer %s to reputation (%s): %s", peer_id, path, detail)

    return report


def private_swarm_token(privacy: dict | None) -> str | None:
    """The RPC credential of a private swarm (crypto/membership.py), which its peers demand on every call."""
    from openhydra.crypto.membership import rpc_token

    secret = (privacy or {}).get("swarm_secret")  # validated with the rest of the privacy group at start
    if hasattr(secret, "get_secret_value"):
        secret = secret.get_secret_value()
    return rpc_token(str(secret)) if secret else None


def swarm_fetch_for(node) -> Callable[[ModelConfig], tuple[Path, str]]:
    """``entry -> (folder, source)``: this node's span of ``entry`` fetched from the peers that share it."""
    from openhydra.catalog import api_name
    from openhydra.weights.fetch import fetch_span

    def fetch(entry: ModelConfig) -> tuple[Path, str]:
        cfg = node.cfg
        node._ensure_background()
        model_id = api_name(entry)
        node.state.loading_stage = f"looking up peers sharing {model_id}'s weights"
        records = node.background.run(node.discovery.lookup(model_id), timeout=15)

        def choose(num_layers: int) -> tuple[int, int]:
            return node._choose_span(SimpleNamespace(api_name=model_id), num_layers)

        def progress(line: str) -> None:
            node.state.loading_stage = f"fetching from the swarm: {line}"
            node.state.extra["weights_fetch"] = line

        folder, span, signed = fetch_span(
            model_id, records, entry.manifest, choose, cfg.node.model_cache_path,
            on_bad_peer=reputation_reporter(cfg.node.data_path, cfg.verification), on_progress=progress,
            swarm_token=private_swarm_token(cfg.privacy))
        node.swarm_spans[folder] = span
        return folder, f"swarm:{model_id} (manifest {signed.content_hash[:16]})"

    return fetch


def share_weights(folder: Path, span: tuple[int, int], mbps: float, identity=None):
    """The WeightsServer for this node's span, or None (sharing off, or the folder cannot be described)."""
    from openhydra.weights.serve import weights_server_for

    try:
        return weights_server_for(folder, span, mbps, identity)
    except Exception as exc:  # serving inference matters more than sharing weights
        log.warning("not sharing weights of %s: %s", folder, exc)
        return None
