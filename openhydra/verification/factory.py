"""Builds the verifier from the ``verification/`` group (node.py calls this; nothing else reads config)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from openhydra.verification.config import VerificationConfig
from openhydra.verification.reputation import ReputationStore
from openhydra.verification.verifier import Verifier


def build_verifier(
    config: VerificationConfig | dict[str, Any],
    data_dir: str | Path,
    *,
    stake_of: Callable[[str], int] | None = None,
    slash: Callable[[str, int, str], int] | None = None,
) -> Verifier:
    """A verifier whose reputation lives in ``<data_dir>/<reputation.db_name>``.

    With ``enabled: false`` it audits nothing but still keeps reputation (uptime, latency, stake),
    so routing and ``/v1/network/status`` work the same with verification off.
    """
    if not isinstance(config, VerificationConfig):
        config = VerificationConfig.model_validate(config)
    path = Path(data_dir).expanduser() / config.reputation.db_name
    return Verifier(config, ReputationStore(path, config.reputation, stake_of=stake_of), slash=slash)
