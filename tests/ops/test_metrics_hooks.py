"""The rare events of /metrics are counted where they happen: failover, ban, replay and hop errors in the
router; settlements, duplicates and refusals in the ledger (a real SQLite ledger with signed receipts).

The failover case drives the real SwarmPipeline with a scripted client whose hop fails
(tests/router/scripted.py, as tests/router/test_dead_records.py does); a failover through real processes is
covered, with its /metrics counters, by tests/ops/test_prometheus.py's dashboard queries and tests/swarm/.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from openhydra.crypto.identity import Identity
from openhydra.economy.errors import InvalidReceipt, ReceiptAlreadyApplied
from openhydra.economy.factory import build_economy
from openhydra.economy.receipts import build_settlement
from openhydra.metrics import METRICS
from openhydra.router.bans import BanList, BanTunables
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from tests.router.scripted import ScriptedClient, announcement


def value(name: str, **labels: str) -> float:
    got = METRICS.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_failover_counts_hop_error_ban_failover_and_replay():
    records = [announcement("a", 0, 2), announcement("b", 2, 4), announcement("c", 2, 4)]
    client = ScriptedClient()
    swarm = SwarmPipeline("m", 4, lambda: list(records), client, bans=BanList(BanTunables(initial_s=5, max_s=5)))
    before = {name: value(name) for name in ("openhydra_pipeline_failovers_total", "openhydra_pipeline_peer_bans_total",
                                             "openhydra_pipeline_replays_total",
                                             "openhydra_pipeline_replayed_steps_total")}
    errors_before = value("openhydra_pipeline_hop_errors_total", code="DEADLINE_EXCEEDED")
    decode_before = value("openhydra_pipeline_step_duration_seconds_count", kind="decode")
    prefill_before = value("openhydra_pipeline_step_duration_seconds_count", kind="prefill")

    swarm.step("s", [1, 2, 3], 0, SamplingParams(), 0)  # prefill, 2 hops
    client.dead[client.routes[-1][1]] = grpc.StatusCode.DEADLINE_EXCEEDED
    assert swarm.step("s", [7], 3, SamplingParams(), 1) == 7  # fails over, replays the prefill, decodes

    assert value("openhydra_pipeline_failovers_total") == before["openhydra_pipeline_failovers_total"] + 1
    assert value("openhydra_pipeline_peer_bans_total") == before["openhydra_pipeline_peer_bans_total"] + 1
    assert value("openhydra_pipeline_replays_total") == before["openhydra_pipeline_replays_total"] + 1
    assert value("openhydra_pipeline_replayed_steps_total") == before["openhydra_pipeline_replayed_steps_total"] + 1
    assert value("openhydra_pipeline_hop_errors_total", code="DEADLINE_EXCEEDED") == errors_before + 1
    assert value("openhydra_pipeline_step_duration_seconds_count", kind="prefill") == prefill_before + 1
    assert value("openhydra_pipeline_step_duration_seconds_count", kind="decode") == decode_before + 1


def test_ledger_counts_settlements_credits_duplicates_and_refusals(tmp_path):
    me, other = Identity.generate(), Identity.generate()
    economy = build_economy(identity=me, db_url=f"sqlite:///{tmp_path / 'ledger.db'}")
    settled = value("openhydra_ledger_settlements_total", outcome="settled")
    duplicate = value("openhydra_ledger_settlements_total", outcome="duplicate")
    error = value("openhydra_ledger_settlements_total", outcome="error")
    earned, paid = value("openhydra_ledger_credits_earned_total"), value("openhydra_ledger_credits_settled_total")
    tokens = value("openhydra_ledger_tokens_settled_total")
    refused = value("openhydra_ledger_errors_total", op="settle", error="ReceiptAlreadyApplied")
    try:
        # 3,000 tokens = 3 credits, split 3:1 by layers served (this node served 6 of 8 layers)
        receipt = build_settlement(uuid.uuid4().hex, "m", 3000, [(me, 6), (other, 2)])
        economy.settle(receipt)
        with pytest.raises(ReceiptAlreadyApplied):
            economy.settle(receipt)
        forged = build_settlement(uuid.uuid4().hex, "m", 3000, [(me, 8)])
        forged = forged.model_copy(update={"tokens_served": 9_000_000})  # signatures no longer match
        with pytest.raises(InvalidReceipt):
            economy.settle(forged)
    finally:
        economy.close()
    assert value("openhydra_ledger_settlements_total", outcome="settled") == settled + 1
    assert value("openhydra_ledger_tokens_settled_total") == tokens + 3000
    assert value("openhydra_ledger_credits_settled_total") == pytest.approx(paid + 3.0)
    assert value("openhydra_ledger_credits_earned_total") == pytest.approx(earned + 2.25)
    assert value("openhydra_ledger_settlements_total", outcome="duplicate") == duplicate + 1
    assert value("openhydra_ledger_errors_total", op="settle", error="ReceiptAlreadyApplied") == refused + 1
    assert value("openhydra_ledger_settlements_total", outcome="error") == error + 1
