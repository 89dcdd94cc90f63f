"""The referee (verification/referee.py): the coordinator's own copy of a span breaks votes that its peers tie.

Real gRPC peers in this process (tests/verification/kit.py); the referee is a real PeerServer around a span this
process loads on demand, swapped into the replay like any voter."""

from __future__ import annotations

import socket

import pytest
import torch

from openhydra.verification.config import FaultConfig, VerificationConfig
from openhydra.verification.referee import REFEREE, Referee
from tests.verification.kit import PeerSpec, Swarm, prompt_of

LIE = FaultConfig(mode="perturb", magnitude=0.05, seed=42)


def _two_peer_span() -> list[PeerSpec]:
    return [PeerSpec("p0", 0, 3), PeerSpec("liar", 3, 5, fault=LIE, throughput=1000.0),
            PeerSpec("honest", 3, 5), PeerSpec("p5", 5, 8)]


def _metric(swarm: Swarm, result: str) -> float:
    line = next(x for x in swarm.verifier.metrics_text().splitlines()
                if x.startswith(f'openhydra_verification_referee_total{{result="{result}"}}'))
    return float(line.split()[-1])


def test_the_referee_breaks_a_two_peer_tie_against_the_liar(tiny_model_dirs, tmp_path) -> None:
    config = VerificationConfig(enabled=True, sample_rate=1.0, seed=0, reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], _two_peer_span(), config, tmp_path / "rep.db",
                  route_by_reputation=False, referee=True)
    try:
        for i in range(3):
            swarm.generate(f"t{i}", prompt_of(i), 2)
        assert swarm.verifier.drain()
        outcomes = [o for o in swarm.verifier.outcomes if o.span == (3, 5)]
        assert len(outcomes) == 3
        for outcome in outcomes:  # the liar is the primary; the honest secondary disagrees; the referee sides with it
            assert outcome.tier == 2 and outcome.refereed, outcome
            assert outcome.failed == ["liar"] and outcome.passed == ["honest"] and not outcome.disputed, outcome
            assert REFEREE in outcome.answers and REFEREE not in outcome.passed
        honest = swarm.reputation.counts("honest")
        assert (honest["pass"], honest["fail"], honest["dispute"]) == (3, 0, 0)
        assert swarm.reputation.counts("liar")["fail"] == 3
        assert _metric(swarm, "decided") == 3 and swarm.referee.loads == 1  # loaded once, kept for the next votes
        assert "openhydra_verification_ties_total 0.0" in swarm.verifier.metrics_text()
        assert swarm.verifier.status()["verification"]["referee"]["loaded_span"] == [3, 5]
        assert REFEREE not in swarm.reputation.peer_ids()
    finally:
        swarm.close()


def test_without_the_referee_the_same_vote_is_a_tie(tiny_model_dirs, tmp_path) -> None:
    """The control: the kit's default (no referee) and a referee that cannot load are both the old tie."""
    config = VerificationConfig(enabled=True, sample_rate=1.0, seed=0, reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], _two_peer_span(), config, tmp_path / "rep.db", route_by_reputation=False)

    def cannot_load(span, dtype):
        raise OSError("no weights for this span here")

    swarm.verifier.referee = Referee(cannot_load, lambda runtime: None, lambda runtime, address: None)
    try:
        swarm.generate("t", prompt_of(0), 2)
        assert swarm.verifier.drain()
        (outcome,) = swarm.verifier.outcomes
        assert outcome.tier == 2 and not outcome.failed and sorted(outcome.disputed) == ["honest", "liar"]
        assert not outcome.refereed
        assert _metric(swarm, "unavailable") == 1 and swarm.verifier.referee.failures == 1
    finally:
        swarm.close()


def test_a_referee_that_agrees_with_no_peer_decides_nothing(tiny_model_dirs, tmp_path) -> None:
    """Alone against both peers the referee proves nothing (its replay passes through the chain's other hops too):
    the vote stays a tie, and the referee is never recorded as a peer."""
    config = VerificationConfig(enabled=True, sample_rate=1.0, seed=0, reputation={"floor": 0.0})
    wrong = FaultConfig(mode="perturb", magnitude=0.05, seed=7)  # a third answer, unlike both peers'
    swarm = Swarm(tiny_model_dirs["llama"], _two_peer_span(), config, tmp_path / "rep.db",
                  route_by_reputation=False, referee=True, referee_fault=wrong)
    try:
        swarm.generate("t", prompt_of(0), 2)
        assert swarm.verifier.drain()
        (outcome,) = swarm.verifier.outcomes
        assert outcome.refereed and not outcome.failed and sorted(outcome.disputed) == ["honest", "liar"]
        assert _metric(swarm, "tie") == 1 and _metric(swarm, "decided") == 0
        assert REFEREE not in swarm.reputation.peer_ids()
    finally:
        swarm.close()


def test_the_referee_checks_a_lone_auditor(tiny_model_dirs, tmp_path) -> None:
    """Three peers on a span, one a fresh liar drawn as the auditor of the honest pair: without a referee only the
    liar is disputed (test_collusion.py); with one, the referee sides with the pair and the liar fails."""
    liar = FaultConfig(mode="perturb", magnitude=0.05, seed=7)
    specs = [PeerSpec("p0", 0, 3), PeerSpec("honest-a", 3, 5, throughput=1000.0), PeerSpec("honest-b", 3, 5),
             PeerSpec("liar", 3, 5, fault=liar), PeerSpec("p5", 5, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=1.0, seed=5, max_steps_per_audit=2,
                                reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db", route_by_reputation=False,
                  referee=True)
    try:
        for peer_id in ("honest-a", "honest-b"):
            swarm.reputation.record(peer_id, "pass")
        audited = []
        for i in range(12):
            swarm.generate(f"f{i}", prompt_of(i), 2)
            assert swarm.verifier.drain()
            audited = [o for o in swarm.verifier.outcomes if o.tier == 3 and "liar" in o.failed + o.disputed]
            if audited:
                break
        outcomes = list(swarm.verifier.outcomes)
    finally:
        swarm.close()
    assert audited, [(o.tier, o.failed, o.passed, o.reason) for o in outcomes]
    for o in audited:
        assert o.refereed and o.failed == ["liar"] and not o.disputed, o
        assert sorted(o.passed) == ["honest-a", "honest-b"] and "broken by the referee" in o.reason
    assert not [o for o in outcomes if {"honest-a", "honest-b"} & set(o.failed + o.disputed)], outcomes


def test_an_idle_referee_unloads_its_span(tiny_model_dirs) -> None:
    from tests.verification.kit import make_referee

    referee = make_referee(tiny_model_dirs["llama"], 8, keep_s=60.0)
    try:
        record = referee.peer((3, 5), "float32")
        assert record is not None and (record.start, record.end) == (3, 5)
        assert referee.peer((3, 5), "float32") is record and referee.loads == 1
        host, port = record.grpc_address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # served
        referee.expire(now=referee._loaded.last_used + 59.0)
        assert referee.status()["loaded_span"] == [3, 5]
        referee.expire(now=referee._loaded.last_used + 60.0)
        assert referee.status() == {"loaded_span": None, "loads": 1, "failures": 0}
        with pytest.raises(OSError):  # the port is closed: the server stopped with the span
            socket.create_connection((host, int(port)), timeout=5).close()
        other = referee.peer((0, 3), "bfloat16")  # another span replaces the loaded one
        assert other is not None and other.dtype == "bfloat16" and referee.loads == 2
    finally:
        referee.close()
    assert referee.status()["loaded_span"] is None


@pytest.mark.parametrize("value", [True, False])
def test_config_switch(value: bool) -> None:
    assert VerificationConfig(referee=value).referee is value
    assert VerificationConfig().referee is True and VerificationConfig().referee_keep_s == 300.0


def test_a_span_too_large_for_memory_is_not_loaded(tiny_model_dirs) -> None:
    """Peers choose which spans exist: two of them announcing a whole large model must not make a small coordinator
    load it. The guard reads only the checkpoint's headers; the vote then stays a tie."""
    from openhydra.hardware.dtype import span_parameter_count
    from openhydra.verification.referee import MEMORY_SHARE, load_span

    model_dir = tiny_model_dirs["llama"]
    need = span_parameter_count(model_dir, 0, 8) * 4  # float32
    with pytest.raises(MemoryError, match=r"layers \[0, 8\] take"):
        load_span(model_dir, (0, 8), "float32", available_bytes=int(need / MEMORY_SHARE) - 1)
    runtime = load_span(model_dir, (0, 8), "float32", available_bytes=int(need / MEMORY_SHARE) + 1)
    assert (runtime.start, runtime.end) == (0, 8)
    half = load_span(model_dir, (3, 5), "bfloat16", available_bytes=int(need / MEMORY_SHARE) - 1)  # 2 of 8, bf16
    assert half.dtype == torch.bfloat16

    referee = Referee(lambda span, dtype: load_span(model_dir, span, dtype, available_bytes=1),
                      lambda runtime: None, lambda runtime, address: None)
    assert referee.peer((0, 8), "float32") is None and referee.failures == 1 and referee.loads == 0
