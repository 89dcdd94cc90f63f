"""Reference attention statistics, β fitting (NNLS) and C_v refit (ridge least squares).

Attention Matching (Zweiger et al., arXiv:2602.16284). For one KV head with keys K [T, D], values
V [T, Dv], existing logit bias b [T] (0 for a fresh cache) and reference queries Q [n, D]:

* logits ``L = scale·Q Kᵀ + b``; per-query partition ``Z_i = Σ_j exp(L_ij)``; output ``O = softmax(L) V``.
* β: choose w ≥ 0 on the kept set S so that ``Σ_{j∈S} w_j exp(L_ij) ≈ Z_i`` for every query (each
  row divided by Z_i so all queries weigh the same); then ``β_j = b_j + log w_j``. Solved by NNLS with
  a small ridge towards w = T/t (the weight a uniformly subsampled key would need).
* C_v: with the compacted attention ``P̃ = softmax(L_S + log w)``, solve
  ``min ||P̃ C_v - O||² + λ||C_v - V_S||²``: matching the full outputs on the reference queries while
  staying near the original values for directions those queries do not constrain.

All functions are batched over the KV heads of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openhydra.runtime.compaction.nnls import nnls_pg

_LOG_FLOOR = 1e-12


@dataclass
class ReferenceStats:
    """Full-cache attention of the reference queries, per KV head."""

    exp_logits: torch.Tensor  # [Hk, n, T]: exp(L - rowmax), float32
    partition: torch.Tensor  # [Hk, n]: Σ_j exp(L - rowmax)
    output: torch.Tensor  # [Hk, n, Dv]: softmax(L) V

    @property
    def probs(self) -> torch.Tensor:
        return self.exp_logits / self.partition.unsqueeze(-1)  # [Hk, n, T]


def group_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Pool each GQA group's query heads: q [Hq, n, D] -> [Hk, G·n, D] (head h uses KV head h // G)."""
    hq, n, d = queries.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads do not split into {num_kv_heads} KV heads")
    g = hq // num_kv_heads
    return queries.reshape(num_kv_heads, g * n, d)


def reference_stats(
    keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, queries: torch.Tensor, scale: float
) -> ReferenceStats:
    """keys [Hk, T, D], values [Hk, T, Dv], bias [Hk, T], queries [Hk, n, D] (already grouped)."""
    # float32 for the big [Hk, n, T] products: max-subtracted exponentials lose nothing that matters
    logits = scale * (queries.float() @ keys.float().transpose(1, 2)) + bias.float().unsqueeze(1)
    exp_logits = torch.exp(logits - logits.amax(-1, keepdim=True))  # [Hk, n, T]
    partition = exp_logits.sum(-1)  # [Hk, n]
    output = (exp_logits @ values.float()) / partition.unsqueeze(-1)  # [Hk, n, Dv]
    return ReferenceStats(exp_logits, partition, output)


def gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [Hk, n, T], idx [Hk, t] -> [Hk, n, t]."""
    return torch.gather(x, 2, idx.unsqueeze(1).expand(-1, x.shape[1], -1))


def fit_mass_weights(
    stats: ReferenceStats, idx: torch.Tensor, active: torch.Tensor, ridge: float = 1e-3, iters: int = 300
) -> torch.Tensor:
    """NNLS weights w ≥ 0 [Hk, t] so the kept keys reproduce each query's partition function."""
    a = gather_columns(stats.probs, idx)  # a: [Hk, n, t], rows scaled so the target is 1
    b = torch.ones(a.shape[0], a.shape[1], dtype=a.dtype)
    total = stats.exp_logits.shape[-1]
    kept = active.sum(-1, keepdim=True).clamp_min(1).double()  # [Hk, 1]
    prior = (total / kept).expand_as(active).double()
    # ridge is relative to the mean diagonal of aᵀa so it means the same at any length
    scale = (a * a).sum(1).mean().item()
    return nnls_pg(a, b, active=active, ridge=ridge * scale, prior=prior, iters=iters, w0=prior)


def fit_values(
    stats: ReferenceStats,
    idx: torch.Tensor,
    active: torch.Tensor,
    weights: torch.Tensor,
    kept_values: torch.Tensor,
    ridge: float = 1.0,
) -> torch.Tensor:
    """Ridge refit of C_v [Hk, t, Dv] towards ``kept_values`` so compacted outputs match the full ones."""
    e = gather_columns(stats.exp_logits, idx) * (weights * active).float().unsqueeze(1)  # [Hk, n, t]
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-30)  # P̃: [Hk, n, t]
    gram = (p.transpose(1, 2) @ p).double()  # [Hk, t, t]
    t = gram.shape[-1]
    lam = ridge * torch.diagonal(gram, dim1=1, dim2=2).mean(-1).clamp_min(1e-12)  # [Hk]
    eye = torch.eye(t, dtype=gram.dtype)
    lhs = gram + lam[:, None, None] * eye
    rhs = (p.transpose(1, 2) @ stats.output).double() + lam[:, None, None] * kept_values.double()  # [Hk, t, Dv]
    # lhs = PᵀP + λI is symmetric positive definite (λ > 0): Cholesky, not LU. It is the usual solver for a ridge
    # system, and it avoids LAPACK's getrf/laswp path, where MKL once failed in CI on this exact input ("Parameter
    # 6 was incorrect on entry to DLASWP"; the same seeded test passes in every other run).
    c_v = torch.cholesky_solve(rhs, torch.linalg.cholesky(lhs))
    return torch.where(active.unsqueeze(-1), c_v, torch.zeros_like(c_v))


def weights_to_bias(weights: torch.Tensor, old_bias: torch.Tensor, active: torch.Tensor, masked: float) -> torch.Tensor:
    """β = b_old + log w on live slots (w = 0 becomes log 1e-12 ≈ -27.6); ``masked`` on padding."""
    beta = old_bias.double() + torch.log(weights.clamp_min(_LOG_FLOOR))
    return torch.where(active, beta, torch.full_like(beta, masked))
