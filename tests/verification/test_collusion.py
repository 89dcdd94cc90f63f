"""Tier 3: two colluders (same lie) agree with each other; the auditor catches them at its rate.
And a span with only two peers that disagree is a tie: both disputed, nobody failed."""

from __future__ import annotations

import math

from openhydra.verification.config import FaultConfig, VerificationConfig
from tests.verification.kit import PeerSpec, Swarm, prompt_of

COLLUDE = FaultConfig(mode="perturb", magnitude=0.05, seed=42)  # same seed: identical lies


def test_colluding_pair_is_caught_by_the_auditor_at_its_rate(tiny_model_dirs, tmp_path) -> None:
    audit_rate, requests = 0.5, 70
    specs = [PeerSpec("p0", 0, 3),
             PeerSpec("colluder-a", 3, 5, fault=COLLUDE, throughput=1000.0),
             PeerSpec("colluder-b", 3, 5, fault=COLLUDE),
             PeerSpec("honest", 3, 5),
             PeerSpec("p5", 5, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=audit_rate, seed=3,
                                max_steps_per_audit=2, reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db", route_by_reputation=False)
    try:
        for i in range(requests):
            swarm.generate(f"r{i}", prompt_of(i), 2)
        assert swarm.verifier.drain()
        outcomes = [o for o in swarm.verifier.outcomes if o.span == (3, 5)]
    finally:
        swarm.close()
    # Requests whose secondary was the other colluder: tier 1 saw agreement; tier 3 decides.
    paired = [o for o in outcomes if o.tier in (1, 3) and "colluder-b" in (o.passed + o.failed)]
    caught = [o for o in paired if o.tier == 3 and sorted(o.failed) == ["colluder-a", "colluder-b"]]
    assert all(o.passed == ["honest"] for o in caught)  # the auditor is the one that was right
    assert not [o for o in paired if o.tier == 3 and not o.failed]  # an honest auditor never agrees with them
    rate = len(caught) / len(paired)
    sigma = math.sqrt(audit_rate * (1 - audit_rate) / len(paired))
    print(f"\ncolluding pair audited and caught in {len(caught)}/{len(paired)} = {rate:.3f} of its requests, "
          f"configured audit_rate {audit_rate} (sigma {sigma:.3f})")
    assert abs(rate - audit_rate) <= 3 * sigma
    # When the honest peer was drawn as the secondary, the vote is 2 colluders against 1: the honest
    # majority assumption fails, as documented; tier 3 is what catches the pair.
    outvoted = [o for o in outcomes if o.tier == 2]
    print(f"tier-2 votes (honest secondary against the pair): {len(outvoted)}")


def test_two_peers_that_disagree_are_a_tie(tiny_model_dirs, tmp_path) -> None:
    specs = [PeerSpec("p0", 0, 3), PeerSpec("liar", 3, 5, fault=COLLUDE, throughput=1000.0),
             PeerSpec("honest", 3, 5), PeerSpec("p5", 5, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, seed=0, reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db", route_by_reputation=False)
    try:
        swarm.generate("t", prompt_of(0), 2)
        assert swarm.verifier.drain()
        (outcome,) = swarm.verifier.outcomes
        assert outcome.tier == 2 and not outcome.failed and sorted(outcome.disputed) == ["honest", "liar"]
        assert "tie" in outcome.reason
        assert swarm.reputation.counts("honest")["dispute"] == 1
        assert 'openhydra_verification_ties_total 1.0' in swarm.verifier.metrics_text()
    finally:
        swarm.close()


def test_a_fresh_lone_auditor_cannot_fail_an_honest_pair_with_a_history(tiny_model_dirs, tmp_path) -> None:
    """Three peers on a span, one a fresh liar: drawn as the auditor of the two honest ones (who have been audited
    before), its disagreement alone disputes only itself; neither honest peer is failed."""
    liar = FaultConfig(mode="perturb", magnitude=0.05, seed=7)
    specs = [PeerSpec("p0", 0, 3), PeerSpec("honest-a", 3, 5, throughput=1000.0), PeerSpec("honest-b", 3, 5),
             PeerSpec("liar", 3, 5, fault=liar), PeerSpec("p5", 5, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=1.0, seed=5, max_steps_per_audit=2,
                                reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db", route_by_reputation=False)
    try:
        for peer_id in ("honest-a", "honest-b"):  # their earlier audits
            swarm.reputation.record(peer_id, "pass")
        lone = []
        for i in range(12):
            swarm.generate(f"f{i}", prompt_of(i), 2)
            assert swarm.verifier.drain()
            lone = [o for o in swarm.verifier.outcomes if o.tier == 3 and "lone auditor" in o.reason]
            if lone:
                break
        outcomes = list(swarm.verifier.outcomes)
    finally:
        swarm.close()
    assert lone, [(o.tier, o.failed, o.passed, o.reason) for o in outcomes]  # the liar audited the honest pair
    assert all(o.disputed == ["liar"] and not o.failed and not o.passed for o in lone)
    assert not [o for o in outcomes if {"honest-a", "honest-b"} & set(o.failed)], outcomes
