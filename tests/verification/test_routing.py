"""The liar falls below the floor within a bounded number of requests, is routed around, and the user
sees the honest output; its reputation survives a restart; failed audits call the slash hook."""

from __future__ import annotations

import torch

from openhydra.runtime.shard import ShardRuntime
from openhydra.verification.config import FaultConfig, VerificationConfig
from openhydra.verification.reputation import WEIGHTS
from tests.verification.kit import PeerSpec, Swarm, prompt_of

SPECS = [
    PeerSpec("p0", 0, 3),
    PeerSpec("liar", 3, 5, fault=FaultConfig(mode="perturb", magnitude=1.0), throughput=1000.0),
    PeerSpec("h1", 3, 5),
    PeerSpec("h2", 3, 5),
    PeerSpec("p5", 5, 8),
]
MAX_REQUESTS = 20  # at sample_rate 0.5, P(the liar's hop is never audited in 20 requests) = 1e-6


def _honest_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    runtimes = [ShardRuntime(model_dir, a, b) for a, b in ((0, 3), (3, 5), (5, 8))]
    tokens, feed, pos = [], prompt, 0
    for _ in range(n):
        positions = torch.arange(pos, pos + len(feed))
        h = runtimes[0].forward("ref", positions, input_ids=torch.tensor(feed))
        for rt in runtimes[1:]:
            h = rt.forward("ref", positions, hidden_states=h)
        tokens.append(int(h[-1].argmax()))
        pos += len(feed)
        feed = [tokens[-1]]
    return tokens


def test_liar_is_routed_around_and_output_is_honest(tiny_model_dirs, tmp_path) -> None:
    model = tiny_model_dirs["llama"]
    config = VerificationConfig(enabled=True, sample_rate=0.5, audit_rate=0.1, seed=5, slash_hydra=2.0)
    db = tmp_path / "reputation.db"
    swarm = Swarm(model, SPECS, config, db)
    slashed: list[tuple[str, int, str]] = []
    swarm.verifier.slash = lambda peer, amount, reason: slashed.append((peer, amount, reason)) or amount
    try:
        served_by_liar = 0
        for i in range(MAX_REQUESTS):
            swarm.generate(f"r{i}", prompt_of(i), 4)
            served_by_liar += "liar" in swarm.last_chain
            assert swarm.verifier.drain()
            if swarm.reputation.below_floor("liar"):
                break
        assert swarm.reputation.below_floor("liar"), f"liar not caught in {MAX_REQUESTS} requests"
        print(f"\nliar below the floor after {i + 1} requests ({served_by_liar} served through it); "
              f"score {swarm.reputation.score('liar'):.3f} < floor {config.reputation.floor}")
        assert slashed and slashed[0][:2] == ("liar", 2_000_000) and "failed audit" in slashed[0][2]
        # Routed around from now on, and every answer is the honest chain's.
        for i in range(100, 106):
            prompt = prompt_of(i)
            assert swarm.generate(f"after{i}", prompt, 6) == _honest_greedy(model, prompt, 6)
            assert "liar" not in swarm.last_chain
        status = swarm.verifier.status()
        liar = status["peers"]["liar"]
        assert liar["routable"] is False and liar["audits"]["fail"] >= 1
        assert set(liar["components"]) == set(WEIGHTS)
        assert all(status["peers"][p]["routable"] for p in ("p0", "h1", "h2", "p5"))
        text = swarm.verifier.metrics_text()
        assert 'openhydra_peer_reputation{component="score",peer_id="liar"}' in text
        assert "openhydra_verification_extra_positions_total" in text
    finally:
        swarm.close()

    # A restarted coordinator reads the same SQLite file: the liar is excluded from its first request.
    restarted = Swarm(model, SPECS, config, db)
    try:
        assert restarted.reputation.below_floor("liar")
        prompt = prompt_of(7)
        assert restarted.generate("first", prompt, 4) == _honest_greedy(model, prompt, 4)
        assert "liar" not in restarted.last_chain
    finally:
        restarted.close()
