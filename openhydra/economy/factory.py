"""The ``_target_`` of every ``conf/economy/*.yaml``: ``instantiate(cfg.economy, identity=identity)``."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from openhydra.crypto.identity import Identity
from openhydra.economy.config import DEFAULT_TARGET, EconomyConfig
from openhydra.economy.economy import Economy, OffEconomy
from openhydra.economy.errors import LedgerUnavailable
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
    db_url = cfg.resolved_db_url()
    try:
        ledger = Ledger(
            db_url,
            cfg.policy(),
            sqlite_synchronous=cfg.sqlite_synchronous,
            busy_timeout_s=cfg.busy_timeout_s,
            retry_budget_s=cfg.retry_budget_s,
            **extra,
        )
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:  # said in one line by the CLI, not as a traceback
        reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LedgerUnavailable(f"cannot open the ledger database {_without_password(db_url)}: {reason}") from exc
    return Economy(ledger, identity, cfg)


def _without_password(db_url: str) -> str:
    """The URL as logs may show it: ``postgresql://user:***@host/db``."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(db_url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: say nothing of it
        return "(unparsable URL)"
