"""Tier 1 + 2 against a real in-process swarm (gRPC PeerServers, one of them a FaultyRuntime).

The liar is the primary of the middle span (its announcement is the cheapest); routing ignores
reputation here so it stays primary, and the detection rate is measured against theory.
"""

from __future__ import annotations

import math

import pytest

from openhydra.verification.config import FaultConfig, VerificationConfig
from tests.verification.kit import PeerSpec, Swarm, prompt_of


def _specs(fault: FaultConfig, liar_span: tuple[int, int] = (3, 5)) -> list[PeerSpec]:
    spans = [(0, 3), (3, 5), (5, 8)]
    specs = []
    for span in spans:
        if span == liar_span:
            specs += [PeerSpec("liar", *span, fault=fault, throughput=1000.0),
                      PeerSpec(f"h{span[0]}a", *span), PeerSpec(f"h{span[0]}b", *span)]
        else:
            specs.append(PeerSpec(f"p{span[0]}", *span))
    return specs


def _caught(swarm: Swarm, session: str) -> bool:
    return any(o.session_id == session and "liar" in o.failed for o in swarm.verifier.outcomes)


def test_detection_rate_matches_theory(tiny_model_dirs, tmp_path) -> None:
    r, requests, m = 0.10, 200, 10
    config = VerificationConfig(enabled=True, sample_rate=r, audit_rate=0.0, seed=20261126,
                                reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], _specs(FaultConfig(mode="perturb", magnitude=0.05)), config,
                  tmp_path / "rep.db", route_by_reputation=False)
    try:
        detected = []
        for i in range(requests):
            swarm.generate(f"req{i}", prompt_of(i), 2)
            assert swarm.last_chain[1] == "liar"
            assert swarm.verifier.drain()
            detected.append(_caught(swarm, f"req{i}"))
        false_accusations = [o for o in swarm.verifier.outcomes if set(o.failed) - {"liar"} or o.disputed]
    finally:
        swarm.close()
    per_request = sum(detected) / requests
    windows = [any(detected[k : k + m]) for k in range(0, requests, m)]
    measured, predicted = sum(windows) / len(windows), 1 - (1 - r) ** m
    sliding = [any(detected[k : k + m]) for k in range(requests - m + 1)]  # overlapping: same mean
    sigma_req = math.sqrt(r * (1 - r) / requests)
    sigma_win = math.sqrt(predicted * (1 - predicted) / len(windows))
    print(f"\nper request: measured {per_request:.3f}, predicted r = {r:.3f} (sigma {sigma_req:.3f})"
          f"\nwithin m={m} requests: measured {measured:.3f} over {len(windows)} windows, "
          f"predicted 1-(1-r)^m = {predicted:.3f} (sigma {sigma_win:.3f}); "
          f"all {len(sliding)} overlapping windows: {sum(sliding) / len(sliding):.3f}")
    assert abs(per_request - r) <= 3 * sigma_req
    assert abs(measured - predicted) <= 3 * sigma_win
    assert not false_accusations


@pytest.mark.parametrize(("fault", "liar_span"), [
    (FaultConfig(mode="perturb", magnitude=0.01), (3, 5)),
    (FaultConfig(mode="wrong_token"), (5, 8)),
    (FaultConfig(mode="stale_cache"), (0, 3)),
])
def test_every_fault_mode_is_caught_by_a_vote(tiny_model_dirs, tmp_path, fault, liar_span) -> None:
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.0, seed=1, reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], _specs(fault, liar_span), config, tmp_path / "rep.db",
                  route_by_reputation=False)
    try:
        swarm.generate("one", prompt_of(1), 4)
        assert swarm.verifier.drain()
        (outcome,) = [o for o in swarm.verifier.outcomes if o.span == liar_span]
        assert outcome.tier == 2 and outcome.failed == ["liar"]
        assert sorted(outcome.passed) == sorted(s.peer_id for s in _specs(fault, liar_span)
                                                if s.peer_id.startswith("h"))
        if fault.mode == "stale_cache":
            assert outcome.step and outcome.step > 0  # the prefill is honest; the first decode step is not
        assert swarm.reputation.components("liar")["verification"] < 0.3
    finally:
        swarm.close()
