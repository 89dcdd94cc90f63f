"""Audits cover the whole generation: a peer that lies only after step 34 is caught at the rate theory predicts.

Before the fix an audit compared the first ``max_steps_per_audit`` = 32 steps of a sampled request,
so a liar honest until step 34 was never caught. Now the shadow compares every step: a request's span
is audited with probability r, so a liar lying in each of m requests is caught within them with
probability 1-(1-r)^m. The measured per-request rate is checked against r with an exact binomial
bound (P < 1e-3 of a false failure; the seeds are fixed, so the run is deterministic).
"""

from __future__ import annotations

import pytest
from scipy.stats import binom

from openhydra.verification.config import FaultConfig, VerificationConfig
from tests.verification.kit import PeerSpec, Swarm, prompt_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT, STEPS = 6, 40  # step s >= 1 runs at position PROMPT + s - 1
LIE_FROM_STEP = 34
R, REQUESTS, M = 0.3, 40, 5


def _specs() -> list[PeerSpec]:
    late = FaultConfig(mode="perturb", magnitude=0.05, from_position=PROMPT + LIE_FROM_STEP - 1)
    return [PeerSpec("p0", 0, 3), PeerSpec("liar", 3, 5, fault=late, throughput=1000.0),
            PeerSpec("h3a", 3, 5), PeerSpec("h3b", 3, 5), PeerSpec("p5", 5, 8)]


def test_liar_after_step_k_is_caught_at_the_predicted_rate(tiny_model_dirs, tmp_path) -> None:
    config = VerificationConfig(enabled=True, sample_rate=R, audit_rate=0.0, seed=20261203,
                                reputation={"floor": 0.0})
    swarm = Swarm(tiny_model_dirs["llama"], _specs(), config, tmp_path / "rep.db", route_by_reputation=False)
    try:
        caught, at_steps = [], []
        for i in range(REQUESTS):
            swarm.generate(f"req{i}", prompt_of(i, PROMPT), STEPS)
            assert swarm.last_chain[1] == "liar"
            assert swarm.verifier.drain(120)
            mine = [o for o in swarm.verifier.outcomes if o.session_id == f"req{i}" and "liar" in o.failed]
            caught.append(bool(mine))
            at_steps += [o.step for o in mine]
        honest_failed = [o for o in swarm.verifier.outcomes if set(o.failed) - {"liar"} or o.disputed]
    finally:
        swarm.close()
    hits = sum(caught)
    lo, hi = binom.ppf(0.0005, REQUESTS, R), binom.ppf(0.9995, REQUESTS, R)
    windows = [any(caught[k : k + M]) for k in range(0, REQUESTS, M)]
    print(f"\nliar lies from step {LIE_FROM_STEP} of {STEPS}: caught in {hits}/{REQUESTS} requests "
          f"(predicted r = {R}, 99.9% binomial range [{lo:.0f}, {hi:.0f}]); within m={M} requests "
          f"{sum(windows)}/{len(windows)} = {sum(windows) / len(windows):.2f}, predicted 1-(1-r)^m = "
          f"{1 - (1 - R) ** M:.2f}; caught at steps {sorted(set(at_steps))}")
    assert lo <= hits <= hi
    assert all(s is not None and s >= LIE_FROM_STEP for s in at_steps)
    assert not honest_failed
