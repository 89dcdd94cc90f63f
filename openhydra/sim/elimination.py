"""A swarm's user sessions against the elimination (verification/elimination.py), without processes: how many
sessions a liar that dodges audits survives, and whether an honest peer is ever failed (tests and
bench/bench_elimination.py)."""

from __future__ import annotations

import random

from openhydra.verification.elimination import Conviction, Elimination


def simulate(spans: list[list[str]], liars: dict[str, float], sessions: int, seed: int, *, audited: float = 1.0,
             probe: bool = True, min_sessions: int = 5) -> tuple[Elimination, list[tuple[int, Conviction]]]:
    """Route each user session through the first peer of each span that is not left out (peers listed cheapest
    first), taking the elimination's sets to leave out in order as ``SwarmPipeline._new_chain`` does. A session is
    audited with probability ``audited``; its answer is irreproducible when a liar of its chain lied in it (each
    liar independently, at its rate per session). Returns the elimination and each conviction with the number of
    sessions run when it came."""
    rng = random.Random(seed)
    elim = Elimination(min_sessions)
    convictions: list[tuple[int, Conviction]] = []
    for i in range(sessions):
        chain = [span[0] for span in spans]
        for avoid in elim.avoid() if probe else ():
            if all(any(p not in avoid for p in span) for span in spans):
                chain = [next(p for p in span if p not in avoid) for span in spans]
                break
        lied = any(rng.random() < liars.get(p, 0.0) for p in chain)
        if rng.random() < audited:
            conviction = elim.record(f"s{i}", chain, bad=lied)
            if conviction is not None:
                convictions.append((i + 1, conviction))
    return elim, convictions
