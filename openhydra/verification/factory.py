"""Builds the verifier from the ``verification/`` group (node.py calls this; nothing else reads config)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from openhydra.verification.config import VerificationConfig
from openhydra.verification.reputation import ReputationStore
from openhydra.verification.verifier import Verifier


def build_verifier(
    config: VerificationConfig | None = None,
    data_dir: str | Path = "~/.openhydra",
    *,
    stake_of: Callable[[str], int] | None = None,
    slash: Callable[[str, int, str], int] | None = None,
    **settings: Any,
) -> Verifier:
    """A verifier whose reputation lives in ``<data_dir>/<reputation.db_name>``.

    Pass a validated ``config``, or the group's keys as ``settings`` (``_target_`` style; they are
    validated by :class:`VerificationConfig`). ``stake_of``/``slash`` are the economy's hooks.
    """
    if config is None:
        config = VerificationConfig.model_validate({k: v for k, v in settings.items() if k != "_target_"})
    elif settings:
        raise TypeError(f"pass either config or settings, not both (got {sorted(settings)})")
    path = Path(data_dir).expanduser() / config.reputation.db_name
    return Verifier(config, ReputationStore(path, config.reputation, stake_of=stake_of), slash=slash)
