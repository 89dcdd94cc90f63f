"""Batched non-negative least squares by accelerated projected gradient (FISTA).

Attention Matching (arXiv:2602.16284, §3.2) fits the attention-mass weights w = exp(β) of the kept
keys by NNLS. Compaction solves one small problem per KV head and layer; doing them as one batched
tensor program is much faster than a loop of ``scipy.optimize.nnls`` calls, and the tests check the
solutions against scipy.
"""

from __future__ import annotations

import torch


def nnls_pg(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    active: torch.Tensor | None = None,
    ridge: float = 0.0,
    prior: torch.Tensor | None = None,
    iters: int = 300,
    w0: torch.Tensor | None = None,
) -> torch.Tensor:
    """Solve ``min_w ||a w - b||² + ridge·||w - prior||²`` s.t. ``w >= 0`` for a batch.

    a: [H, n, t]; b: [H, n]; active: [H, t] bool, inactive columns are held at 0;
    prior: [H, t] (defaults to 1). Returns w: [H, t], float64 precision internally.
    """
    a = a.double()
    b = b.double()
    h, _, t = a.shape
    gram = a.transpose(1, 2) @ a  # gram: [H, t, t]
    rhs = (a.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1)  # rhs: [H, t]
    if ridge > 0.0:
        p = torch.ones(h, t, dtype=a.dtype) if prior is None else prior.double()
        gram = gram + ridge * torch.eye(t, dtype=a.dtype)
        rhs = rhs + ridge * p
    mask = torch.ones(h, t, dtype=a.dtype) if active is None else active.to(a.dtype)
    # Lipschitz constant of the gradient: the largest eigenvalue of each gram matrix
    lip = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(1e-30)  # lip: [H]
    step = (1.0 / lip).unsqueeze(-1)
    w = (torch.ones(h, t, dtype=a.dtype) if w0 is None else w0.double().clamp_min(0.0)) * mask
    y, theta = w.clone(), 1.0
    for _ in range(iters):
        grad = (gram @ y.unsqueeze(-1)).squeeze(-1) - rhs
        w_next = (y - step * grad).clamp_min(0.0) * mask
        theta_next = (1.0 + (1.0 + 4.0 * theta * theta) ** 0.5) / 2.0
        y = w_next + ((theta - 1.0) / theta_next) * (w_next - w)
        w, theta = w_next, theta_next
    return w
