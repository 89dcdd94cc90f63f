"""Node-wide Prometheus metrics of the pipeline (coordinator side), the peer server and the ledger.

The HTTP API keeps its own per-app registry (openhydra/api/metrics.py) and verification its own
(openhydra/verification/metrics.py); everything below lives in one process-wide registry, ``METRICS``,
because the objects that record it (``SwarmPipeline``, ``PeerService``, ``Economy``) sit below the API
and must not import it (DESIGN.md section 2). ``ApiMetrics.exposition()`` appends this registry to
``GET /metrics``. A deployed node is one process, so the numbers are that node's; tests that run
several peers in one process see their sum.

Label values that are known up front are created at import, so a fresh node exports every series at 0
and dashboards show 0 instead of "no data" until the first failover or ledger error.
docs/operations.md lists every family with its meaning.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Pipeline step latencies on loopback are ~1 ms per hop for a decode step; WAN hops reach seconds.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
STEP_KINDS = ("prefill", "decode")
HOP_ERROR_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "FAILED_PRECONDITION", "INVALID_ARGUMENT",
                   "INTERNAL", "PERMISSION_DENIED")
SETTLEMENT_OUTCOMES = ("settled", "duplicate", "error")


def step_kind(positions: int) -> str:
    """A one-position step is a decode step; more positions are a prefill (or replay) chunk."""
    return "decode" if positions == 1 else "prefill"


class NodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # -- coordinator: router/swarm.py ----------------------------------------------------------------
        self.pipeline_step_seconds = Histogram(
            "openhydra_pipeline_step_duration_seconds",
            "One pipeline step end to end through every hop (coordinator side), by kind",
            ["kind"], buckets=STEP_BUCKETS, registry=r)
        self.pipeline_hops = Histogram(
            "openhydra_pipeline_hops", "Hops in the chain a step ran through", buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r)
        self.hop_errors = Counter(
            "openhydra_pipeline_hop_errors_total", "Failed hops seen by the coordinator, by gRPC status", ["code"],
            registry=r)
        self.failovers = Counter("openhydra_pipeline_failovers_total", "Chains repaired after a hop failed",
                                 registry=r)
        self.bans = Counter("openhydra_pipeline_peer_bans_total", "Peers banned (with backoff) after a failure",
                            registry=r)
        self.replays = Counter("openhydra_pipeline_replays_total",
                               "Sessions whose history was replayed (a new chain, an eviction)", registry=r)
        self.replayed_steps = Counter("openhydra_pipeline_replayed_steps_total", "Steps re-run by replays",
                                      registry=r)
        self.rebuilds = Counter(
            "openhydra_pipeline_rebuilds_total",
            "Replays that rebuilt only the replaced span (the other hops kept their caches: peer/rebuild.py)",
            registry=r)
        self.rebuild_fallbacks = Counter(
            "openhydra_pipeline_rebuild_fallbacks_total", "Rebuilds refused or failed, replayed in full instead",
            registry=r)
        self.replay_mismatches = Counter(
            "openhydra_pipeline_replay_mismatches_total", "Replayed steps that sampled another token", registry=r)
        self.unavailable = Counter(
            "openhydra_pipeline_unavailable_total", "Steps given up because no chain covered the model (503)",
            registry=r)
        self.discovery_lookups = Counter(
            "openhydra_discovery_lookups_total",
            "The coordinator's swarm lookups: answered by the DHT, or without it (known peers + own span)",
            ["outcome"], registry=r)
        self.own_record_added = Counter(
            "openhydra_discovery_own_record_added_total",
            "DHT lookups that lacked this node's own record, which was added (discovery/own_view.py)", registry=r)
        # -- peer: peer/forward.py -----------------------------------------------------------------------
        self.peer_step_seconds = Histogram(
            "openhydra_peer_step_duration_seconds", "This peer's compute for one step of its span (one hop), by kind",
            ["kind"], buckets=STEP_BUCKETS, registry=r)
        self.peer_steps = Counter("openhydra_peer_steps_total", "Steps this peer computed, by kind", ["kind"],
                                  registry=r)
        self.peer_positions = Counter("openhydra_peer_positions_total", "Token positions this peer computed",
                                      registry=r)
        self.peer_failures = Counter(
            "openhydra_peer_step_failures_total", "Steps this peer reported as failed (its own or relayed), by status",
            ["code"], registry=r)
        self.peer_in_flight = Gauge("openhydra_peer_steps_in_flight", "Steps this peer is computing now",
                                    registry=r)
        # -- ledger: economy/economy.py ------------------------------------------------------------------
        self.settlements = Counter("openhydra_ledger_settlements_total", "Settlements applied to this node's ledger",
                                   ["outcome"], registry=r)
        self.tokens_settled = Counter("openhydra_ledger_tokens_settled_total", "Tokens paid for by settlements",
                                      registry=r)
        self.credits_settled = Counter("openhydra_ledger_credits_settled_total",
                                       "Barter credits paid to all serving peers by settlements", registry=r)
        self.credits_earned = Counter("openhydra_ledger_credits_earned_total",
                                      "Barter credits this node earned by settlements", registry=r)
        self.hydra_minted = Counter("openhydra_ledger_hydra_minted_total", "HYDRA minted by settlements",
                                    registry=r)
        self.ledger_errors = Counter("openhydra_ledger_errors_total", "Ledger operations refused, by error",
                                     ["op", "error"], registry=r)
        for kind in STEP_KINDS:
            self.pipeline_step_seconds.labels(kind)
            self.peer_step_seconds.labels(kind)
            self.peer_steps.labels(kind)
        for code in HOP_ERROR_CODES:
            self.hop_errors.labels(code)
            self.peer_failures.labels(code)
        for outcome in SETTLEMENT_OUTCOMES:
            self.settlements.labels(outcome)

    # -- one-line hooks for the shared files -------------------------------------------------------------
    def pipeline_step(self, positions: int, hops: int, seconds: float) -> None:
        self.pipeline_step_seconds.labels(step_kind(positions)).observe(seconds)
        self.pipeline_hops.observe(hops)

    def peer_step(self, positions: int, seconds: float) -> None:
        kind = step_kind(positions)
        self.peer_steps.labels(kind).inc()
        self.peer_positions.inc(positions)
        self.peer_step_seconds.labels(kind).observe(seconds)

    def settled(self, tokens: int, credits_micro: dict[str, int], hydra_micro: dict[str, int], self_id: str) -> None:
        self.settlements.labels("settled").inc()
        self.tokens_settled.inc(tokens)
        self.credits_settled.inc(sum(credits_micro.values()) / 1_000_000)
        self.credits_earned.inc(credits_micro.get(self_id, 0) / 1_000_000)
        self.hydra_minted.inc(sum(hydra_micro.values()) / 1_000_000)

    def ledger_error(self, op: str, error: BaseException) -> None:
        name = type(error).__name__
        if op == "settle":
            self.settlements.labels("duplicate" if name == "ReceiptAlreadyApplied" else "error").inc()
        self.ledger_errors.labels(op, name).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


METRICS = NodeMetrics()
