"""Attention Matching math on synthetic K/V/Q (arXiv:2602.16284): exactness, NNLS, phase 2 vs phase 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from openhydra.runtime.compaction.fitting import (
    fit_mass_weights,
    fit_values,
    group_queries,
    reference_stats,
    weights_to_bias,
)
from openhydra.runtime.compaction.layer import MASKED_BIAS
from openhydra.runtime.compaction.nnls import nnls_pg
from openhydra.runtime.compaction.selection import select_hak, select_omp

HK, T, D = 2, 256, 16
SCALE = D**-0.5


def synthetic(seed: int = 0, n: int = 1024) -> tuple[torch.Tensor, ...]:
    """Keys of uneven norms and queries from a shared low-rank distribution, like real heads."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(HK, T, D, generator=g) * torch.rand(HK, T, 1, generator=g) * 2  # k: [Hk, T, D]
    v = torch.randn(HK, T, D, generator=g)  # v: [Hk, T, D]
    basis = torch.randn(HK, D, D, generator=g)
    q_ref = torch.randn(HK, n, D, generator=g) @ basis * 0.5  # q: [Hk, n, D]
    q_new = torch.randn(HK, n, D, generator=g) @ basis * 0.5  # held-out queries, same distribution
    return k, v, q_ref, q_new


def compact_output(ck: torch.Tensor, beta: torch.Tensor, cv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    logits = SCALE * q.double() @ ck.double().transpose(1, 2) + beta.double().unsqueeze(1)
    return torch.softmax(logits, -1) @ cv.double()  # [Hk, n, Dv]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def test_nnls_matches_scipy() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 40, 12, generator=g, dtype=torch.float64)
    b = torch.randn(3, 40, generator=g, dtype=torch.float64)
    w = nnls_pg(a, b, iters=5000, precise=True)
    for h in range(3):
        ref, _ = nnls(a[h].numpy(), b[h].numpy())
        assert np.allclose(w[h].numpy(), ref, atol=1e-5), (w[h], ref)
    assert (w >= 0).all()
    fast = nnls_pg(a, b, iters=5000)  # float32 iterations: same solution to single precision
    assert torch.allclose(fast, w, atol=1e-4)


def test_ratio_one_fit_is_exact() -> None:
    k, v, q, _ = synthetic()
    stats = reference_stats(k, v, torch.zeros(HK, T), q, SCALE)
    idx = torch.arange(T).expand(HK, T)
    active = torch.ones(HK, T, dtype=torch.bool)
    w = fit_mass_weights(stats, idx, active)
    cv = fit_values(stats, idx, active, w, v)
    beta = weights_to_bias(w, torch.zeros(HK, T), active, MASKED_BIAS)
    # float32 statistics: exact up to single-precision round-off
    assert torch.allclose(w, torch.ones_like(w), atol=1e-3)
    assert torch.allclose(cv, v.double(), atol=1e-3)
    assert rel_err(compact_output(k, beta, cv, q), stats.output.double()) < 1e-5


@pytest.mark.parametrize("select", [select_hak, select_omp])
@pytest.mark.parametrize("budget", [128, 64, 26])
def test_phase2_beats_phase1_at_same_budget(select, budget: int) -> None:
    k, v, q_ref, q_new = synthetic()
    stats = reference_stats(k, v, torch.zeros(HK, T), q_ref, SCALE)
    held = reference_stats(k, v, torch.zeros(HK, T), q_new, SCALE)
    idx, active = select(stats, [budget] * HK)
    ck, kept_v = gather(k, idx), gather(v, idx)
    phase1 = compact_output(ck, torch.zeros(HK, budget), kept_v, q_new)
    w = fit_mass_weights(stats, idx, active)
    beta = weights_to_bias(w, torch.zeros(HK, budget), active, MASKED_BIAS)
    phase2 = compact_output(ck, beta, fit_values(stats, idx, active, w, kept_v, ridge=1e-2), q_new)
    e1, e2 = rel_err(phase1, held.output.double()), rel_err(phase2, held.output.double())
    # on queries the fit never saw, phase 2 must still cut the error by a clear margin
    assert e2 < 0.8 * e1, (e1, e2)
    # and each held-out query's attention mass on the block is reproduced better than without β
    e = held.exp_logits  # [Hk, n, T]
    kept = torch.gather(e, 2, idx.unsqueeze(1).expand(-1, e.shape[1], -1))  # [Hk, n, t]
    full_mass = e.sum(-1)
    mass_err1 = (kept.sum(-1) / full_mass - 1).abs().mean().item()
    mass_err2 = ((kept * w.unsqueeze(1)).sum(-1) / full_mass - 1).abs().mean().item()
    assert mass_err2 < 0.8 * mass_err1, (mass_err1, mass_err2)


def test_beta_weights_are_nonnegative_and_padding_masked() -> None:
    k, v, q, _ = synthetic(seed=3, n=256)
    stats = reference_stats(k, v, torch.zeros(HK, T), q, SCALE)
    idx, active = select_hak(stats, [40, 17])
    w = fit_mass_weights(stats, idx, active)
    assert (w >= 0).all()
    assert (w[~active] == 0).all()
    beta = weights_to_bias(w, torch.zeros(HK, 40), active, MASKED_BIAS)
    assert torch.isfinite(beta).all()
    assert (beta[~active] == MASKED_BIAS).all()
    assert (beta[active] > MASKED_BIAS / 2).all()


def test_omp_matches_mass_better_than_hak_on_reference() -> None:
    k, v, q, _ = synthetic(seed=5, n=512)
    stats = reference_stats(k, v, torch.zeros(HK, T), q, SCALE)
    errs = {}
    for name, select in (("hak", select_hak), ("omp", select_omp)):
        idx, active = select(stats, [24] * HK)
        w = fit_mass_weights(stats, idx, active, ridge=0.0)
        a = torch.gather(stats.probs, 2, idx.unsqueeze(1).expand(-1, stats.probs.shape[1], -1))
        errs[name] = ((a.double() @ w.unsqueeze(-1)).squeeze(-1) - 1).norm().item()
    assert errs["omp"] <= errs["hak"] * 1.01, errs


def test_group_queries_follow_gqa_layout() -> None:
    q = torch.arange(4 * 3 * 2, dtype=torch.float32).reshape(4, 3, 2)  # [Hq=4, n=3, D=2]
    grouped = group_queries(q, 2)  # KV head 0 serves query heads 0, 1
    assert grouped.shape == (2, 6, 2)
    assert torch.equal(grouped[0], torch.cat([q[0], q[1]]))
    assert torch.equal(grouped[1], torch.cat([q[2], q[3]]))
