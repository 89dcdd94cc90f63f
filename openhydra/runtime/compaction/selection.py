"""Phase 1 of Attention Matching (arXiv:2602.16284, §3.3): which keys C_k to keep.

* HAK, highest attention keys: score each key by the root-mean-square of the attention it gets
  from the reference queries, keep the top ``t`` per KV head.
* OMP: greedy orthogonal matching pursuit on the attention-mass residual. Each query's mass row is
  normalised to sum 1; keys are added in chunks by their correlation with the residual
  ``1 - A_S w`` and w is refitted (NNLS) after every chunk. Slower than HAK, better at high ratios.

Both return indices ``idx: [Hk, t_max]`` (ascending positions, so kept keys keep their order) and
``active: [Hk, t_max]``, False on the padding of heads whose budget is below ``t_max``.
"""

from __future__ import annotations

import torch

from openhydra.runtime.compaction.fitting import ReferenceStats
from openhydra.runtime.compaction.nnls import nnls_pg


def _validate_budgets(budgets: list[int], total: int) -> list[int]:
    if any(b < 1 or b > total for b in budgets):
        raise ValueError(f"per-head budgets {budgets} must lie in [1, {total}]")
    return budgets


def pack_selection(order: torch.Tensor, budgets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``budgets[h]`` entries of ``order[h]`` (a ranking [Hk, ≥t_max]), sorted, padded to t_max."""
    t_max = max(budgets)
    idx = torch.zeros(len(budgets), t_max, dtype=torch.long)
    active = torch.zeros(len(budgets), t_max, dtype=torch.bool)
    for h, b in enumerate(budgets):
        idx[h, :b] = order[h, :b].sort().values
        active[h, :b] = True
    return idx, active


def select_hak(stats: ReferenceStats, budgets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top keys by RMS attention over the reference queries."""
    _validate_budgets(budgets, stats.exp_logits.shape[-1])
    score = stats.probs.pow(2).mean(1).sqrt()  # score: [Hk, T]
    order = score.argsort(dim=-1, descending=True)
    return pack_selection(order, budgets)


def select_omp(
    stats: ReferenceStats, budgets: list[int], chunks: int = 16, refit_iters: int = 60
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OMP on the partition-function residual, ``chunks`` refits per head."""
    total = stats.exp_logits.shape[-1]
    _validate_budgets(budgets, total)
    a = stats.probs  # a: [Hk, n, T], each row sums to 1: target is the all-ones vector
    hk, n, _ = a.shape
    t_max = max(budgets)
    step = max(1, -(-t_max // chunks))
    picked = torch.zeros(hk, total, dtype=torch.bool)
    order = torch.empty(hk, 0, dtype=torch.long)
    residual = torch.ones(hk, n, dtype=a.dtype)
    w = torch.empty(hk, 0, dtype=torch.float64)
    while order.shape[1] < t_max:
        k = min(step, t_max - order.shape[1])
        corr = (a.transpose(1, 2) @ residual.unsqueeze(-1)).squeeze(-1)  # corr: [Hk, T]
        corr = corr.masked_fill(picked, float("-inf"))
        new = corr.topk(k, dim=-1).indices  # [Hk, k]
        picked.scatter_(1, new, True)
        order = torch.cat([order, new], dim=1)
        sub = torch.gather(a, 2, order.unsqueeze(1).expand(-1, n, -1))  # [Hk, n, |S|]
        w0 = torch.cat([w, torch.ones(hk, k, dtype=torch.float64)], dim=1)
        w = nnls_pg(sub, torch.ones(hk, n, dtype=a.dtype), iters=refit_iters, w0=w0)
        residual = 1.0 - (sub @ w.to(sub.dtype).unsqueeze(-1)).squeeze(-1)
    return pack_selection(order, budgets)
