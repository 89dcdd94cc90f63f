"""Property: whatever the swarm, a returned chain tiles [0, L) in order, inside each peer's span."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openhydra.discovery.records import PeerAnnouncement
from openhydra.router.coverage import LayerCoverageMap, chain_problems

NOW = 1_800_000_000.0


@st.composite
def swarms(draw):
    total = draw(st.integers(1, 24))
    n = draw(st.integers(0, 25))
    records = []
    for i in range(n):
        a = draw(st.integers(0, total - 1))
        b = draw(st.integers(a + 1, total))
        tps = draw(st.floats(0.0, 100.0, allow_nan=False))
        records.append(
            PeerAnnouncement(
                peer_id=f"p{i}",
                model_id="m",
                start=a,
                end=b,
                total_layers=total,
                grpc_address="127.0.0.1:1",
                throughput_tps=tps,
                announced_at=NOW,
                ttl_s=60.0,
            )
        )
    exclude = draw(st.sets(st.sampled_from([f"p{i}" for i in range(max(n, 1))])))
    return total, records, exclude


def _exact_chain_exists(total, records, exclude):
    reach = {0}
    for a, b in sorted({r.span for r in records if r.peer_id not in exclude}):
        if a in reach:
            reach.add(b)
    return total in reach


@settings(max_examples=400, deadline=None)
@given(swarms(), st.booleans(), st.sampled_from([0.0, 1.0, None]))
def test_any_returned_chain_tiles_the_model(swarm, partial, rtt):
    total, records, exclude = swarm
    # rtt 0 makes hops free, so the cheapest path may revisit a peer: the chain must still be valid.
    rtt_ms = None if rtt is None else (lambda _p: rtt)
    m = LayerCoverageMap(records, total, model_id="m", now=NOW, allow_partial=partial, rtt_ms=rtt_ms)
    chain = m.chain(exclude=exclude)
    covered = not m.coverage(exclude).holes
    if chain is not None:
        assert chain_problems(chain, total, "m") == []
        assert not set(chain.peer_ids) & exclude
    # Completeness: partial mode finds a chain iff every layer is covered; exact mode iff spans tile.
    if partial:
        assert (chain is not None) == covered
    else:
        assert (chain is not None) == _exact_chain_exists(total, records, exclude)


@settings(max_examples=200, deadline=None)
@given(swarms(), st.booleans(), st.data())
def test_replacement_covers_exactly_the_span(swarm, partial, data):
    total, records, exclude = swarm
    a = data.draw(st.integers(0, total - 1))
    b = data.draw(st.integers(a + 1, total))
    rep = LayerCoverageMap(records, total, model_id="m", now=NOW, allow_partial=partial, rtt_ms={}).replacement_for(
        (a, b), exclude
    )
    if rep is not None:
        assert rep.hops[0].start == a and rep.hops[-1].end == b
        for prev, nxt in zip(rep.hops, rep.hops[1:], strict=False):
            assert prev.end == nxt.start
        assert len(set(rep.peer_ids)) == len(rep.peer_ids)
        for h in rep.hops:
            assert h.peer.start <= h.start < h.end <= h.peer.end and h.peer_id not in exclude
            assert partial or not h.partial
