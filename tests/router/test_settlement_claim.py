"""What the coordinator asks its final chain to settle when a session closes (economy/swarm_settlement.py)."""

from __future__ import annotations

import time

from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from tests.router.scripted import ScriptedClient, announcement


def _closed(first_sent: tuple[int, object] | None, recomputed: tuple[tuple[int, int], ...] = ()) -> tuple:
    now = time.time()
    records = [announcement("a", 0, 2, now), announcement("b", 2, 4, now)]
    ended = []
    swarm = SwarmPipeline("m", 4, lambda: list(records), ScriptedClient(),
                          on_session_end=lambda *args: ended.append(args))
    swarm.step("s1", list(range(40)), 0, SamplingParams(), 0)  # a 40-token prompt
    swarm.step("s1", [7], 40, SamplingParams(), 1)
    swarm._sessions["s1"].first_sent = first_sent  # as router/prefix_plan.py leaves it when blocks were reused
    swarm._sessions["s1"].recomputed_seed.extend(recomputed)  # as _rebuild leaves it after such a first step
    swarm.close("s1")
    (_, _, positions, route, caps), = ended
    return positions, route, caps


def test_the_claim_leaves_out_prompt_blocks_taken_from_the_prefix_caches_and_names_the_routed_peers():
    """A second red team: under privacy=onion a hop signed its own receipt for the whole session of a request whose
    first 3,200 positions every hop took from its prefix cache, and the coordinator's ledger paid it, because the
    coordinator capped receipts at the session's positions (3,201x what the hop computed). The coordinator now
    claims the positions every hop computed, and names each hop with the peer id it routed to (a hop answering as
    another identity is not paid)."""
    positions, route, caps = _closed(None)
    assert positions == 41 and caps == [41, 41]
    assert [(h.peer_id, h.start, h.end) for h in route] == [("a", 0, 2), ("b", 2, 4)]
    positions, _, caps = _closed((32, object()))  # one 32-token block was seeded on every hop
    assert positions == 41 - 32 and caps == [9, 9]


def test_a_hop_that_replaced_a_failed_span_after_a_seeded_first_step_may_claim_the_whole_session():
    """A third red team: under privacy=onion, after a failover rebuild of a prefix-seeded session, the replacement
    (which computed the seeded blocks too) had its own receipt refused for claiming more than the others computed,
    and went unpaid. The coordinator caps each hop by what that hop computed."""
    positions, _, caps = _closed((32, object()), recomputed=((2, 4),))
    assert positions == 9 and caps == [9, 41]
