"""Blame lands on the hop that lied: a smart liar cannot frame honest peers of other spans.

The liar is a real peer process (``openhydra.verification.liar_peer``) on the first span. It lies
(noise of its output's size) on every session it takes for a user's, and answers honestly on every
session it takes for an audit: an ``audit`` name, or a first message whose inputs repeat a session it
already served (shadows and replays re-run the user's steps through every hop that is not swapped).
Every other span has honest peers only. Before the fix, the primary of an audited span voted with the
user's recorded answer (which the liar had spoiled) against replays (which the liar left clean), so
honest primaries failed their audits. Now every voter votes with a replay, and a user answer that its
own chain does not reproduce is *irreproducible*: nobody of the span is blamed.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from openhydra.verification.config import FaultConfig, VerificationConfig
from tests.verification.kit import PeerSpec, Swarm, prompt_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REQUESTS, STEPS = 20, 4  # every hop of every request audited: 3 audits per request


def _requests_until(swarm: Swarm, done: Callable[[], bool], seed: int, limit: int) -> list[list[str]]:
    """User requests, each after the previous one's audits, until ``done()`` or ``limit``; their chains."""
    chains: list[list[str]] = []
    for i in range(limit):
        swarm.generate(f"user{seed + i}", prompt_of(seed + i), STEPS)
        chains.append(swarm.last_chain)
        assert swarm.verifier.drain(120)
        if done():
            break
    return chains


def _routed_around_and_nobody_else_blamed(swarm: Swarm, innocents: list[str], seed: int) -> None:
    """After the liar failed: three more requests, none routed through it, every span still covered; and no other
    peer ever failed or was disputed."""
    for i in range(3):
        swarm.generate(f"after{seed + i}", prompt_of(seed + i), STEPS)
        assert "liar" not in swarm.last_chain and len(swarm.last_chain) == 3
    assert swarm.verifier.drain(120)
    counts = {p: swarm.reputation.counts(p) for p in innocents}
    assert all(c["fail"] == 0 and c["dispute"] == 0 for c in counts.values()), counts


def _specs() -> list[PeerSpec]:
    smart = FaultConfig(mode="perturb", magnitude=1.0, dodge_audits=True)
    return [
        PeerSpec("liar", 0, 3, fault=smart, throughput=1000.0, threads=1),  # its own process; the cheapest: primary
        PeerSpec("h0b", 0, 3),
        PeerSpec("h3a", 3, 5, throughput=1000.0, threads=1), PeerSpec("h3b", 3, 5), PeerSpec("h3c", 3, 5),
        PeerSpec("h5a", 5, 8, throughput=1000.0), PeerSpec("h5b", 5, 8), PeerSpec("h5c", 5, 8),
    ]


def test_audit_dodging_liar_frames_no_honest_peer(tiny_model_dirs, tmp_path) -> None:
    # A fixed route (no probing, no reputation routing): the three peers of the chain cannot be told apart.
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.5, seed=16, reputation={"floor": 0.0},
                                probe_suspects=False)
    swarm = Swarm(tiny_model_dirs["llama"], _specs(), config, tmp_path / "rep.db", route_by_reputation=False)
    honest = [s.peer_id for s in _specs() if s.peer_id != "liar"]
    try:
        for i in range(REQUESTS):
            swarm.generate(f"user{i}", prompt_of(100 + i), STEPS)
            assert swarm.last_chain == ["liar", "h3a", "h5a"]
        assert swarm.verifier.drain(300)
        outcomes = swarm.verifier.outcomes
        framed = sorted({p for o in outcomes for p in (*o.failed, *o.disputed) if p in honest})
        counts = {p: swarm.reputation.counts(p) for p in honest}
        print(f"\n{len(outcomes)} audits concluded; honest peers failed or disputed: {framed}")
        assert len(outcomes) >= 50
        assert framed == [], [(o.span, o.tier, o.failed, o.disputed, o.reason) for o in outcomes
                              if set(o.failed + o.disputed) & set(honest)]
        assert all(c["fail"] == 0 and c["dispute"] == 0 for c in counts.values()), counts
        irreproducible = [o for o in outcomes if o.irreproducible]
        print(f"{len(irreproducible)} irreproducible user answers")
        assert all(swarm.reputation.components(p)["verification"] >= 1.0 for p in honest)
        # The liar did lie (its user answers were not reproduced), and every such outcome names it a suspect.
        assert irreproducible and all("liar" in o.suspects for o in irreproducible)
        assert swarm.verifier.convictions == []  # nothing told its chain's peers apart
    finally:
        swarm.close()


def test_audit_dodging_liar_is_failed_once_probing_separates_the_suspects(tiny_model_dirs, tmp_path) -> None:
    """The same liar, now with the default probing (verification/elimination.py): user chains leave suspects out in
    turn, so the liar's user chains stay irreproducible while the honest peers' are reproduced without it. The liar
    is failed (below the routing floor, no longer routed), by elimination, or by a tier-2 vote when it is drawn as
    the secondary of a chain it was not in (it cannot tell that shadow from a user session); no honest peer ever
    fails or is disputed. A third peer on the liar's span keeps such votes from ending in a tie."""
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.5, seed=17, eliminate_after=3)
    specs = [*_specs(), PeerSpec("h0c", 0, 3)]
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db")
    honest = [s.peer_id for s in specs if s.peer_id != "liar"]
    try:
        chains = _requests_until(swarm, lambda: swarm.reputation.counts("liar")["fail"] >= 1, 200, 40)
        convictions = swarm.verifier.convictions
        voted = [o for o in swarm.verifier.outcomes if "liar" in o.failed]
        print(f"\n{len(chains)} requests until the liar failed; chains: {chains}; by elimination: {convictions}; "
              f"by vote: {[(o.session_id, o.tier) for o in voted]}")
        assert swarm.reputation.counts("liar")["fail"] >= 1 and swarm.verifier.score("liar") == 0.0  # not routed
        assert [c.peer_id for c in convictions] in (["liar"], [])
        status = swarm.verifier.status()["verification"]  # what /v1/network/status shows
        assert [e["peer_id"] for e in status["eliminated"]] == [c.peer_id for c in convictions]
        assert set(status["suspects"]) <= {"liar", "h3a", "h3b", "h3c", "h5a", "h5b", "h5c"}
        assert "liar" in chains[0] and any("liar" not in c for c in chains)  # probing left it out at times
        _routed_around_and_nobody_else_blamed(swarm, honest, 300)
    finally:
        swarm.close()


def test_on_a_two_peer_span_the_referee_keeps_the_smart_liar_from_taking_the_honest_peer_down(tiny_model_dirs,
                                                                                             tmp_path) -> None:
    """The liar shares its span with one honest peer only. Drawn as the secondary of the honest peer's audit, it
    lies (it cannot tell that shadow from a user session); with no third peer the vote was a 1-1 tie, a dispute for
    both, and the young honest peer fell below the routing floor with the liar: the span had no routable peer left
    ("no chain covers all 8 layers"). Now the coordinator's referee (verification/referee.py) loads the span, votes,
    and the tie is broken against the liar: the honest peer is never disputed, and the span stays covered."""
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.5, seed=17, eliminate_after=3)
    specs = _specs()
    assert [s.peer_id for s in specs if (s.start, s.end) == (0, 3)] == ["liar", "h0b"]
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db", referee=True)
    honest = [s.peer_id for s in specs if s.peer_id != "liar"]
    try:  # a request raises if no chain covers every layer
        chains = _requests_until(swarm, lambda: swarm.reputation.below_floor("liar"), 400, 40)
        outcomes = swarm.verifier.outcomes
        refereed = [o for o in outcomes if o.refereed]
        print(f"\n{len(chains)} requests until the liar fell below the floor; refereed votes: "
              f"{[(o.tier, o.failed, o.passed, o.disputed) for o in refereed]}; "
              f"convictions {swarm.verifier.convictions}")
        assert swarm.reputation.below_floor("liar") and swarm.reputation.counts("liar")["fail"] >= 1
        assert refereed and all(o.failed == ["liar"] and o.passed == ["h0b"] for o in refereed)
        assert swarm.referee is not None and swarm.referee.status()["loaded_span"] == [0, 3]
        _routed_around_and_nobody_else_blamed(swarm, honest, 500)  # the span is still served: by h0b
        assert not swarm.reputation.below_floor("h0b")
    finally:
        swarm.close()


def test_a_liar_tipped_off_by_an_informant_dodges_every_vote_and_is_convicted_by_elimination(tiny_model_dirs,
                                                                                            tmp_path) -> None:
    """The smart liar with an accomplice that read our code. The informant serves the first span alone (so it is in
    every chain, upstream of the liar) and answers honestly; it recognises shadows and replays (their inputs repeat
    a session it served) and marks their session ids, which travel in the clear, in a folder the two share. The liar
    then dodges even the shadows in which it is the secondary, which it cannot recognise alone: no vote ever sees
    it lie. Only elimination can convict it (verification/elimination.py): its user chains are irreproducible,
    while the chains that probing routes around it are reproduced, the informant's included. Both are real peer
    processes."""
    tips = str(tmp_path / "tips")
    informant = FaultConfig(mode="informant", tip_off=tips)
    liar = FaultConfig(mode="perturb", magnitude=1.0, dodge_audits=True, tip_off=tips)
    specs = [PeerSpec("informant", 0, 3, fault=informant, threads=1),
             PeerSpec("liar", 3, 5, fault=liar, throughput=1000.0, threads=1),
             PeerSpec("h3b", 3, 5), PeerSpec("h3c", 3, 5),
             PeerSpec("h5a", 5, 8, throughput=1000.0), PeerSpec("h5b", 5, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.5, seed=19, eliminate_after=3)
    swarm = Swarm(tiny_model_dirs["llama"], specs, config, tmp_path / "rep.db", referee=True)
    others = [s.peer_id for s in specs if s.peer_id != "liar"]
    try:
        chains = _requests_until(swarm, lambda: bool(swarm.verifier.convictions), 600, 60)
        outcomes = swarm.verifier.outcomes
        print(f"\n{len(chains)} requests until a conviction: {swarm.verifier.convictions}; {len(outcomes)} audits, "
              f"{sum(o.irreproducible for o in outcomes)} irreproducible; {len(os.listdir(tips))} sessions tipped off")
        assert [c.peer_id for c in swarm.verifier.convictions] == ["liar"]
        assert "informant" in swarm.verifier.convictions[0].exonerated  # cleared by chains reproduced without it
        assert not [o for o in outcomes if "liar" in o.failed]  # no vote ever caught it: the tip-offs worked
        assert os.listdir(tips)  # the informant did mark shadows and replays
        assert any("liar" not in c for c in chains)  # probing routed around it
        # Not routed: one failed audit can leave a liar that passed every audit it recognised above the floor
        # (seen here), so a conviction excludes it whatever its score.
        print(f"liar's counts {swarm.reputation.counts('liar')}, score {swarm.reputation.score('liar'):.3f}")
        assert swarm.verifier.score("liar") == 0.0 and swarm.verifier.alternatives((3, 5), set()) != []
        assert "liar" not in [p.peer_id for p in swarm.verifier.alternatives((3, 5), set())]
        assert swarm.verifier.status()["peers"]["liar"]["routable"] is False
        _routed_around_and_nobody_else_blamed(swarm, others, 700)
    finally:
        swarm.close()
