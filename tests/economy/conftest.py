"""Ledger test fixtures: a fresh SQLite file, and (when OPENHYDRA_TEST_PG_URL is set) a fresh Postgres schema.

Start a server with ``export OPENHYDRA_TEST_PG_URL="$(scripts/start_postgres.sh)"``; without it the
PostgreSQL cases are skipped locally (CI exports it, so they run there).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from openhydra.crypto.identity import Identity

PG_ENV = "OPENHYDRA_TEST_PG_URL"


def pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


def _admin_engine(base: str):  # type: ignore[no-untyped-def]
    return create_engine(make_url(base).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")


def new_pg_schema(base: str) -> tuple[str, Callable[[], None]]:
    """A fresh schema on the test server; the URL routes every connection to it via search_path."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine(base)
    with engine.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})

    def drop() -> None:
        eng = _admin_engine(base)
        with eng.connect() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        eng.dispose()

    return url.render_as_string(hide_password=False), drop


BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.skipif(pg_base_url() is None, reason=f"{PG_ENV} not set")),
]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    base = pg_base_url()
    assert base is not None
    url, drop = new_pg_schema(base)
    yield url
    drop()


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def peers() -> list[Identity]:
    return [Identity.generate() for _ in range(4)]
