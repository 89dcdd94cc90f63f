"""Comparing two executions of the same step: log-probabilities within a dtype tolerance, tokens exactly.

What the coordinator sees of a step is the last peer's answer: the sampled token and the top-k
log-probabilities of the last position (``return_top_k``). Two honest chains differ in those floats
by a little, depending on dtype and thread count; the tolerance is the measured spread with a
margin (docs/verification.md). The rules, each checked both ways:

- a token id in both top-k lists: its log-probabilities differ by at most ``tol``;
- an id in one list but not the other: it cannot rank above the other list's k-th entry by more
  than ``tol`` (else the other chain would have listed it);
- the sampled tokens are compared exactly. A greedy mismatch is allowed only as a near-tie: each
  chain rates the other's token within ``tol`` of its own. A seeded-sampling mismatch with agreeing
  log-probabilities is *inconclusive* (the draw fell on a boundary the tolerance cannot resolve).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Answer:
    """One chain's answer to one step."""

    token: int
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]

    @classmethod
    def of(cls, result) -> Answer:  # a peer.client.StepResult
        return cls(int(result.token), tuple(result.top_ids), tuple(result.top_logprobs))


@dataclass(frozen=True)
class Comparison:
    verdict: Verdict
    max_diff: float  # largest log-probability difference seen (over ids listed by both)
    reason: str = ""


def arithmetic_name(quantization: str, lowbit: bool, attention: bool = False) -> str:
    """The ``backend`` a PyTorch span announces (ShardRuntime.numerics): "pytorch" unquantized, else
    "pytorch-<quantization>-<kernel>", the kernel "lowbit3" (OpenHydra's low-bit kernel with its attention: fp32
    spans, runtime/kernel_attention.py), "lowbit2" (the low-bit kernel's matmuls, with PyTorch's attention: what
    every low-bit span of the previous release computed, and bf16 spans now) or "torch" (PyTorch's kernels). The
    number changes whenever the kernel's bits do. Unquantized: "pytorch", or "pytorch-bf16-lowbit1" where the span's
    bf16 matmuls run on the low-bit library (runtime/quant_cpu.py use_bf16_kernel)."""
    if quantization == "none":
        return "pytorch-bf16-lowbit1" if lowbit else "pytorch"
    kernel = ("lowbit3" if attention else "lowbit2") if lowbit else "torch"
    return f"pytorch-{quantization}-{kernel}"


KNOWN_ARITHMETIC = frozenset({"pytorch", "mlx", arithmetic_name("none", True),
                              *(arithmetic_name(quantization, lowbit, attention)
                                for quantization in ("int4", "int8", "nf4")
                                for lowbit in (True, False) for attention in (True, False))})
"""The ``backend`` values this release's peers announce (runtime ``numerics``)."""


def arithmetic_of(record) -> str:
    """Which arithmetic a peer's record says its span computes with, for pairing peers in audits: its ``backend`` if
    this release knows it, else "pytorch". A made-up value is no way out of audits: it pairs like "pytorch" (as every
    record did before peers said their arithmetic), and so does an honest peer of a later release with a new kernel."""
    backend = getattr(record, "backend", "pytorch")
    return backend if backend in KNOWN_ARITHMETIC else "pytorch"


def tolerance_for(dtypes: Iterable[str], table: dict[str, float]) -> float:
    """The loosest tolerance among the dtypes of every hop involved (unknown dtypes: the loosest)."""
    loosest = max(table.values())
    return max((table.get(d, loosest) for d in dtypes), default=table.get("float32", loosest))


def compare(a: Answer, b: Answer, tol: float, greedy: bool) -> Comparison:
    if not a.top_ids or not b.top_ids:
        if a.token == b.token:
            return Comparison(Verdict.AGREE, 0.0, "tokens only")
        return Comparison(Verdict.DISAGREE, math.inf, f"token {a.token} != {b.token} (no log-probabilities)")
    la, lb = dict(zip(a.top_ids, a.top_logprobs, strict=True)), dict(zip(b.top_ids, b.top_logprobs, strict=True))
    max_diff = 0.0
    for tid in la.keys() & lb.keys():
        diff = abs(la[tid] - lb[tid])
        max_diff = max(max_diff, diff)
        if not diff <= tol:  # NaN fails too
            return Comparison(Verdict.DISAGREE, diff, f"log p({tid}) {la[tid]:.4f} vs {lb[tid]:.4f} (tol {tol:g})")
    for mine, other, missing_from in ((la, lb, "second"), (lb, la, "first")):
        floor = min(other.values())
        for tid, lp in mine.items():
            if tid not in other and lp > floor + tol:
                return Comparison(Verdict.DISAGREE, lp - floor,
                                  f"id {tid} at log p {lp:.4f} is missing from the {missing_from} answer's "
                                  f"top-{len(other)} (cut at {floor:.4f})")
    if a.token == b.token:
        return Comparison(Verdict.AGREE, max_diff)
    if not greedy:
        return Comparison(Verdict.INCONCLUSIVE, max_diff, f"sampled {a.token} vs {b.token}, log-probabilities agree")
    near_tie = all(
        a.token in lp and b.token in lp and abs(lp[a.token] - lp[b.token]) <= tol for lp in (la, lb)
    )
    if near_tie:
        return Comparison(Verdict.INCONCLUSIVE, max_diff, f"greedy near-tie {a.token} vs {b.token}")
    return Comparison(Verdict.DISAGREE, max_diff, f"greedy token {a.token} != {b.token}")
