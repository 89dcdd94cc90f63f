"""The ``_target_`` of every ``conf/economy/*.yaml``: ``instantiate(cfg.economy, identity=identity)``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from openhydra.crypto.identity import Identity
from openhydra.economy.config import DEFAULT_TARGET, EconomyConfig
from openhydra.economy.economy import Economy, OffEconomy
from openhydra.economy.ledger import Ledger
from openhydra.economy.signing import SigningIdentity

log = logging.getLogger(__name__)


def build_economy(
    identity: SigningIdentity | None = None, clock: Callable[[], float] | None = None, **keys: Any
) -> Economy | OffEconomy:
    """Validate the group's keys and build the economy the node will use.

    ``identity`` is the node's Ed25519 identity (build.py passes it). Without one a throwaway key is
    generated, which is only right for tests: its credits can never be claimed again.
    """
    keys.setdefault("_target_", DEFAULT_TARGET)
    cfg = EconomyConfig.model_validate(keys)
    if not cfg.enabled:
        return OffEconomy()
    if identity is None:
        log.warning("economy built without a node identity; using a throwaway key")
        identity = Identity.generate()
    extra = {"clock": clock} if clock is not None else {}
    ledger = Ledger(
        cfg.resolved_db_url(),
        cfg.policy(),
        sqlite_synchronous=cfg.sqlite_synchronous,
        busy_timeout_s=cfg.busy_timeout_s,
        retry_budget_s=cfg.retry_budget_s,
        **extra,
    )
    return Economy(ledger, identity, cfg)
