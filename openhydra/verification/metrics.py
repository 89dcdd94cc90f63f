"""Prometheus metrics of verification: what it re-executed (its cost) and what it found.

A registry of its own; the API merges ``metrics_text()`` into ``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class VerificationMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.audits = Counter("openhydra_verification_audits_total",
                              "Audits started: tier 1 shadow re-executions, tier 2 votes, tier 3 auditor checks",
                              ["tier"], registry=r)
        self.steps_compared = Counter("openhydra_verification_steps_compared_total",
                                      "Steps whose answers were compared", registry=r)
        self.verdicts = Counter("openhydra_verification_verdicts_total", "Step comparisons by verdict",
                                ["verdict"], registry=r)
        self.failures = Counter("openhydra_verification_failures_total",
                                "Peers recorded as failing an audit, by the tier that decided", ["tier"], registry=r)
        self.ties = Counter("openhydra_verification_ties_total", "Votes without a majority (disputes)", registry=r)
        self.referee = Counter("openhydra_verification_referee_total",
                               "Votes the coordinator's own copy of a span was asked to settle, by result: decided, "
                               "tie (it agreed with no peer), unavailable (could not load the span), failed (its "
                               "replay failed)", ["result"], registry=r)
        self.extra_steps = Counter("openhydra_verification_extra_steps_total",
                                   "Steps re-executed for verification (shadow steps and replays)", registry=r)
        self.extra_positions = Counter("openhydra_verification_extra_positions_total",
                                       "Token positions re-executed for verification", registry=r)
        self.user_positions = Counter("openhydra_verification_user_positions_total",
                                      "Token positions the user's requests ran (the denominator of the cost)",
                                      registry=r)
        self.busy_seconds = Counter("openhydra_verification_busy_seconds_total",
                                    "Wall time the verification worker spent re-executing", registry=r)
        self.dropped = Counter("openhydra_verification_dropped_total",
                               "Audits dropped because the queue was full", registry=r)
        self.unverifiable = Counter("openhydra_verification_unverifiable_total",
                                    "Sampled spans with no other peer to re-execute them", registry=r)
        self.abandoned = Counter("openhydra_verification_abandoned_total",
                                 "Audits ended without a verdict (hop failure or chain change)", registry=r)
        self.irreproducible = Counter("openhydra_verification_irreproducible_total",
                                      "User answers that a replay of their own chain did not reproduce (a hop "
                                      "behaved differently in the user's session; nobody of the span blamed)",
                                      registry=r)
        self.slashed = Counter("openhydra_verification_slashed_hydra_total",
                               "HYDRA stake slashed after failed audits", registry=r)
        self.queue_depth = Gauge("openhydra_verification_queue_depth", "Events waiting for the worker",
                                 registry=r)
        self.reputation = Gauge("openhydra_peer_reputation", "Peer reputation score and its components",
                                ["peer_id", "component"], registry=r)
        for tier in ("1", "2", "3"):  # every series exists from the start: dashboards show 0, not "no data"
            self.audits.labels(tier)
            self.failures.labels(tier)
        self.failures.labels("elimination")  # verification/elimination.py: failed from user chains, not by a vote
        for result in ("decided", "tie", "unavailable", "failed"):
            self.referee.labels(result)
        for verdict in ("agree", "disagree", "inconclusive"):
            self.verdicts.labels(verdict)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
