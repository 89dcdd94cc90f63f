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

import pytest

from openhydra.verification.config import FaultConfig, VerificationConfig
from tests.verification.kit import PeerSpec, Swarm, prompt_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REQUESTS, STEPS = 20, 4  # every hop of every request audited: 3 audits per request


def _specs() -> list[PeerSpec]:
    smart = FaultConfig(mode="perturb", magnitude=1.0, dodge_audits=True)
    return [
        PeerSpec("liar", 0, 3, fault=smart, throughput=1000.0, threads=1),  # its own process; the cheapest: primary
        PeerSpec("h0b", 0, 3),
        PeerSpec("h3a", 3, 5, throughput=1000.0, threads=1), PeerSpec("h3b", 3, 5), PeerSpec("h3c", 3, 5),
        PeerSpec("h5a", 5, 8, throughput=1000.0), PeerSpec("h5b", 5, 8), PeerSpec("h5c", 5, 8),
    ]


def test_audit_dodging_liar_frames_no_honest_peer(tiny_model_dirs, tmp_path) -> None:
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=0.5, seed=16, reputation={"floor": 0.0})
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
    finally:
        swarm.close()
