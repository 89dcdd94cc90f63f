"""Token-eviction baselines that Attention Matching (arXiv:2602.16284) is measured against.

* StreamingLLM (Xiao et al., arXiv:2309.17453): keep ``sinks`` first tokens plus the most recent
  window.
* H2O (Zhang et al., arXiv:2306.14048): keep "heavy hitters" by accumulated *causal* attention
  received from the prefill queries, half the budget, plus the most recent half.

Both produce plain kept-index sets, used without β or value refit (a standard cache).
"""

from __future__ import annotations

import torch

from openhydra.runtime.compaction.selection import pack_selection


def select_streaming(total: int, budgets: list[int], sinks: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention sinks + sliding window; idx/active: [Hk, t_max]."""
    orders = []
    for b in budgets:
        s = min(sinks, b)
        recent = torch.arange(total - (b - s), total)
        orders.append(torch.cat([torch.arange(s), recent]))
    t_max = max(budgets)
    order = torch.stack([torch.nn.functional.pad(o, (0, t_max - len(o))) for o in orders])
    return pack_selection(order, budgets)


def select_h2o(
    keys: torch.Tensor, queries: torch.Tensor, positions: torch.Tensor, scale: float, budgets: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy hitters by accumulated causal attention + recent window.

    keys [Hk, T, D]; queries [Hk, n, D] grouped per KV head; positions [n // G] key index each
    query sat at (repeated over the group). A query only counts keys at or before its position.
    """
    total = keys.shape[1]
    g = queries.shape[1] // positions.shape[0]
    pos = positions.repeat(g)  # [n]
    logits = scale * (queries.float() @ keys.float().transpose(1, 2))  # [Hk, n, T]
    causal = torch.arange(total)[None, :] <= pos[:, None]  # [n, T]
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    score = probs.sum(1)  # accumulated attention: [Hk, T]
    orders = []
    for h, b in enumerate(budgets):
        recent_n = b // 2
        recent = torch.arange(total - recent_n, total)
        s = score[h].clone()
        s[total - recent_n :] = float("-inf")
        heavy = s.argsort(descending=True)[: b - recent_n]
        orders.append(torch.cat([heavy, recent]))
    return pack_selection(torch.stack(orders), budgets)
