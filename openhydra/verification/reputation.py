"""Peer reputation from recorded events, with exponential decay, persisted in SQLite.

score = 0.40 verification + 0.25 uptime + 0.20 latency consistency + 0.15 stake factor (SPEC).

Each component is a ratio of decayed event sums; an event of weight w recorded at time t counts
w * 2^-((now - t) / half_life) now (half-lives in ``ReputationConfig``):

- verification = (P + prior) / (P + prior + failure_weight * F): P passed audits, F failed ones
  (a tie counts 0.5 failure for each side). A new peer scores 1.0; one failure drops it to 0.29.
- uptime = (ok + 1) / (ok + down + 1): ok = steps the peer served in a chain, down = hop failures
  blamed on it.
- latency consistency = 1 / (1 + cv), cv = std / mean of the per-position latency of decode steps
  through the peer; 0 with fewer than 3 samples (unmeasured earns nothing), so a fresh identity
  (0.65 without stake) never starts above a peer with a clean history (0.65 + 0.2 x its consistency).
- stake factor = stake / (stake + stake_ref) from the economy's ``stake_of`` (0 without stake).

Events are appended to ``events`` (one row per verification outcome; ok/down/latency coalesced per
peer per flush) and replayed on open, so scores survive restarts. Rows older than 20 half-lives
weigh < 1e-6 and are pruned on open. Thread-safe.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openhydra.verification.config import ReputationConfig

WEIGHTS = {"verification": 0.40, "uptime": 0.25, "latency": 0.20, "stake": 0.15}
VERIFICATION_KINDS = ("pass", "fail", "dispute")
KINDS = (*VERIFICATION_KINDS, "ok", "down", "latency")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    peer_id TEXT NOT NULL, kind TEXT NOT NULL,
    n REAL NOT NULL, total REAL NOT NULL, total_sq REAL NOT NULL,
    ts REAL NOT NULL, detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
"""


@dataclass
class _Decayed:
    """Decayed (count, sum, sum of squares) as of ``at``."""

    n: float = 0.0
    s: float = 0.0
    s2: float = 0.0
    at: float = 0.0

    def add(self, n: float, s: float, s2: float, ts: float, half_life: float) -> None:
        self.decay_to(ts, half_life)
        self.n, self.s, self.s2 = self.n + n, self.s + s, self.s2 + s2

    def decay_to(self, ts: float, half_life: float) -> None:
        if ts > self.at:
            f = 0.5 ** ((ts - self.at) / half_life) if self.at else 1.0
            self.n, self.s, self.s2, self.at = self.n * f, self.s * f, self.s2 * f, ts

    def value_at(self, ts: float, half_life: float) -> tuple[float, float, float]:
        f = 0.5 ** (max(0.0, ts - self.at) / half_life) if self.at else 1.0
        return self.n * f, self.s * f, self.s2 * f


@dataclass
class _Peer:
    sums: dict[str, _Decayed] = field(default_factory=lambda: {k: _Decayed() for k in KINDS})
    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))  # undecayed totals


class ReputationStore:
    def __init__(
        self,
        path: str | Path | None,
        config: ReputationConfig | None = None,
        *,
        stake_of: Callable[[str], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or ReputationConfig()
        self.stake_of = stake_of
        self.clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._pending_rows: list[tuple] = []
        self._pending_sums: dict[tuple[str, str], list[float]] = {}
        self.path = None if path is None else Path(path)
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._load()

    def _half_life(self, kind: str) -> float:
        c = self.config
        if kind in VERIFICATION_KINDS:
            return c.verification_half_life_s
        return c.latency_half_life_s if kind == "latency" else c.uptime_half_life_s

    def _load(self) -> None:
        assert self._db is not None
        horizon = self.clock() - 20 * max(self.config.verification_half_life_s, self.config.uptime_half_life_s,
                                          self.config.latency_half_life_s)
        self._db.execute("DELETE FROM events WHERE ts < ?", (horizon,))
        rows = self._db.execute("SELECT peer_id, kind, n, total, total_sq, ts FROM events ORDER BY ts, id")
        for peer_id, kind, n, s, s2, ts in rows:
            if kind in KINDS:
                self._apply(peer_id, kind, n, s, s2, ts)

    def _apply(self, peer_id: str, kind: str, n: float, s: float, s2: float, ts: float) -> None:
        peer = self._peers.setdefault(peer_id, _Peer())
        peer.sums[kind].add(n, s, s2, ts, self._half_life(kind))
        peer.counts[kind] += n

    # ---- recording --------------------------------------------------------------------------------

    def record(self, peer_id: str, kind: str, n: float = 1.0, value: float = 0.0, detail: str = "") -> None:
        """One event: ``kind`` in pass/fail/dispute (stored one row each) or ok/down/latency (coalesced)."""
        if kind not in KINDS:
            raise ValueError(f"unknown reputation event {kind!r}; expected one of {KINDS}")
        now = self.clock()
        s, s2 = value * n, value * value * n
        with self._lock:
            self._apply(peer_id, kind, n, s, s2, now)
            if kind in VERIFICATION_KINDS:
                self._pending_rows.append((peer_id, kind, n, s, s2, now, detail[:500]))
            else:
                acc = self._pending_sums.setdefault((peer_id, kind), [0.0, 0.0, 0.0])
                acc[0] += n
                acc[1] += s
                acc[2] += s2

    def flush(self) -> None:
        with self._lock:
            now = self.clock()
            rows = self._pending_rows + [(p, k, a[0], a[1], a[2], now, "") for (p, k), a in self._pending_sums.items()]
            self._pending_rows, self._pending_sums = [], {}
        if rows and self._db is not None:
            self._db.executemany(
                "INSERT INTO events (peer_id, kind, n, total, total_sq, ts, detail) VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )

    def close(self) -> None:
        self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    # ---- scores -----------------------------------------------------------------------------------

    def components(self, peer_id: str, now: float | None = None) -> dict[str, float]:
        now = self.clock() if now is None else now
        c = self.config
        with self._lock:
            peer = self._peers.get(peer_id) or _Peer()
            get = {k: peer.sums[k].value_at(now, self._half_life(k)) for k in KINDS}
        passes, fails = get["pass"][0], get["fail"][0] + 0.5 * get["dispute"][0]
        verification = (passes + c.prior_passes) / (passes + c.prior_passes + c.failure_weight * fails)
        ok, down = get["ok"][0], get["down"][0]
        uptime = (ok + 1.0) / (ok + down + 1.0)
        n, s, s2 = get["latency"]
        latency = 0.0  # unmeasured: a fresh identity gets no credit a clean history has earned
        if n >= 3 and s > 0:
            mean = s / n
            std = math.sqrt(max(0.0, s2 / n - mean * mean))
            latency = 1.0 / (1.0 + std / mean)
        stake = 0.0
        if self.stake_of is not None:
            micro = max(0, int(self.stake_of(peer_id)))
            ref = c.stake_ref_hydra * 1_000_000
            stake = micro / (micro + ref)
        return {"verification": verification, "uptime": uptime, "latency": latency, "stake": stake}

    def score(self, peer_id: str, now: float | None = None) -> float:
        comp = self.components(peer_id, now)
        return sum(WEIGHTS[k] * comp[k] for k in WEIGHTS)

    def routing_score(self, peer_id: str) -> float:
        """The coverage map's ``score`` hook: 0 (excluded) below the floor, else the score."""
        s = self.score(peer_id)
        return s if s >= self.config.floor else 0.0

    def below_floor(self, peer_id: str) -> bool:
        return self.score(peer_id) < self.config.floor

    def counts(self, peer_id: str) -> dict[str, float]:
        with self._lock:
            peer = self._peers.get(peer_id)
            return dict(peer.counts) if peer else dict.fromkeys(KINDS, 0.0)

    def peer_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._peers)

    def status(self) -> dict[str, object]:
        """Per peer: score, components, raw counts, routable; for ``/v1/network/status``."""
        now = self.clock()
        peers = {}
        for peer_id in self.peer_ids():
            comp = self.components(peer_id, now)
            score = sum(WEIGHTS[k] * comp[k] for k in WEIGHTS)
            counts = self.counts(peer_id)
            peers[peer_id] = {
                "score": round(score, 4),
                "routable": score >= self.config.floor,
                "components": {k: round(v, 4) for k, v in comp.items()},
                "audits": {k: counts[k] for k in VERIFICATION_KINDS},
                "steps_served": counts["ok"],
                "hop_failures": counts["down"],
            }
        return {"weights": WEIGHTS, "floor": self.config.floor, "peers": peers}
