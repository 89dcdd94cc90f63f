"""Database engines for the ledger and the one way to run a write transaction on them.

SQLite (the default) runs in WAL mode with ``synchronous=FULL``: every commit fsyncs the WAL, so an
acknowledged settlement survives a process kill *and* a power cut (NORMAL would survive only the
former). Write transactions start with ``BEGIN IMMEDIATE`` so the write lock is taken up front and two
writers can never deadlock on a read-to-write upgrade; ``busy_timeout`` waits for the lock.

PostgreSQL runs at READ COMMITTED; the ledger takes row locks (``SELECT ... FOR UPDATE``) in a fixed
order, and the runner retries serialization failures and deadlocks.

Lock contention never reaches a caller: :meth:`Store.run` retries "database is locked" (SQLite) and
SQLSTATE 40001/40P01 (Postgres) with jittered backoff, then raises :class:`LedgerUnavailable`.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session, SQLModel

from openhydra.economy.errors import LedgerUnavailable
from openhydra.economy.tables import ASSET_CREDIT, ASSET_HYDRA, Supply, all_tables

T = TypeVar("T")

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_RETRY_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available
_SQLITE_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED (extended codes keep these in the low byte)
_SCHEMA_LOCK_KEY = 0x0E_C0_1ED6  # advisory lock id for concurrent schema creation on Postgres


# The journal is append-only, enforced by the database itself: rows can be inserted, never changed.
_APPEND_ONLY_DDL = {
    "sqlite": [
        f"CREATE TRIGGER IF NOT EXISTS econ_journal_no_{op.lower()} BEFORE {op} ON econ_journal "
        "BEGIN SELECT RAISE(ABORT, 'econ_journal is append-only'); END"
        for op in ("UPDATE", "DELETE")
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION econ_journal_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'econ_journal is append-only'; END $$",
        "CREATE OR REPLACE TRIGGER econ_journal_no_change BEFORE UPDATE OR DELETE ON econ_journal "
        "FOR EACH ROW EXECUTE FUNCTION econ_journal_append_only()",
        "CREATE OR REPLACE TRIGGER econ_journal_no_truncate BEFORE TRUNCATE ON econ_journal "
        "FOR EACH STATEMENT EXECUTE FUNCTION econ_journal_append_only()",
    ],
}


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).expanduser()}"


class Store:
    def __init__(
        self,
        db_url: str,
        *,
        sqlite_synchronous: str = "FULL",
        busy_timeout_s: float = 5.0,
        retry_budget_s: float = 60.0,
    ) -> None:
        if sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}")
        self.url = make_url(db_url)
        self.backend = self.url.get_backend_name()
        self.retry_budget_s = retry_budget_s
        self.retries = 0  # lock-contention retries so far (a health signal; see docs/economy.md)
        if self.backend == "sqlite":
            self.engine = self._sqlite_engine(sqlite_synchronous.upper(), busy_timeout_s)
        elif self.backend == "postgresql":
            url = self.url.set(drivername="postgresql+psycopg")
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
        else:
            raise ValueError(f"unsupported ledger database {self.backend!r}: use sqlite:/// or postgresql://")
        self.read_engine = self.engine.execution_options(ledger_readonly=True)
        self.run(self._create_schema, write=True)

    # -- engines ---------------------------------------------------------------------------------------
    def _sqlite_engine(self, synchronous: str, busy_timeout_s: float) -> Engine:
        db = self.url.database
        if not db or db == ":memory:":
            raise ValueError("the ledger needs a file database (WAL does not apply to :memory:)")
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            self.url.set(database=str(Path(db).expanduser())),
            connect_args={"timeout": busy_timeout_s, "isolation_level": None},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute(f"PRAGMA synchronous = {synchronous}")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Reads take no write lock (WAL readers never block); writes take it up front.
            readonly = conn.get_execution_options().get("ledger_readonly", False)
            conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

        return engine

    def _create_schema(self, session: Session) -> None:
        if self.backend == "postgresql":
            session.exec(text("SELECT pg_advisory_xact_lock(:k)").bindparams(k=_SCHEMA_LOCK_KEY))
        conn = session.connection()
        SQLModel.metadata.create_all(conn, tables=[t.__table__ for t in all_tables()])
        for ddl in _APPEND_ONLY_DDL[self.backend]:
            conn.exec_driver_sql(ddl)
        for asset in (ASSET_CREDIT, ASSET_HYDRA):
            if session.get(Supply, asset) is None:
                session.add(Supply(asset=asset))

    # -- transactions ----------------------------------------------------------------------------------
    def run(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction, commit, and return its result; retry lock contention.

        ``fn`` may run more than once, so it must not have side effects outside the session. Ledger
        errors it raises roll the transaction back and propagate unchanged.
        """
        deadline = time.monotonic() + self.retry_budget_s
        delay = 0.002
        while True:
            try:
                engine = self.engine if write else self.read_engine
                with Session(engine, expire_on_commit=False) as session, session.begin():
                    return fn(session)
            except DBAPIError as exc:
                if not self._retryable(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise LedgerUnavailable(f"ledger database busy for {self.retry_budget_s:.0f} s") from exc
                self.retries += 1
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)

    def _retryable(self, exc: DBAPIError) -> bool:
        orig = exc.orig
        if self.backend == "sqlite":
            code = getattr(orig, "sqlite_errorcode", None)
            if code is not None:
                return (code & 0xFF) in _SQLITE_BUSY_CODES
            msg = str(orig).lower()
            return isinstance(exc, OperationalError) and ("locked" in msg or "busy" in msg)
        if getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES:
            return True
        # A dropped connection (server restart, pre-ping race) is worth one more try on a fresh one.
        return bool(getattr(exc, "connection_invalidated", False))

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` on SQLite ("ok" when healthy); "ok" on Postgres (server-managed)."""
        if self.backend != "sqlite":
            return "ok"
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)

    def after_fork(self) -> None:
        """Call in a forked child: new connections of its own, the parent's left untouched."""
        self.engine.dispose(close=False)

    def dispose(self) -> None:
        self.engine.dispose()
