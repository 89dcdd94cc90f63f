"""Whether this machine's fp32 matmul gives the same bits for the same numbers at another address.

    python bench/probe_blas_alignment.py [--shapes 7x64x32,2x64x23,1x576x6144,7x576x1536]

Each shape M x K x N is multiplied once from fresh tensors (``a @ b.T``), then again with both operands copied into a
buffer at an offset of 1..15 floats (4..60 bytes). It prints, per shape, the largest difference to the first product
and the offsets that differed. A zero everywhere means the BLAS rounds a product the same wherever its operands lie;
otherwise two paths that hold the same numbers in different places (a preallocated KV cache and a concatenated one,
a view of a fused buffer and a fresh tensor) can differ in the last bits while computing the same thing.
``MKL_CBWR=AUTO,STRICT`` (set before starting Python) asks MKL for alignment-independent results; run it both ways.
Referred to by tests/runtime/test_shard_exactness.py (chunked prefill).
"""

from __future__ import annotations

import argparse
import os
import re

import torch


def probe(m: int, k: int, n: int, offsets: range) -> tuple[float, list[int]]:
    gen = torch.Generator().manual_seed(m * 1_000_003 + k * 1009 + n)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    reference = a @ b.t()
    worst, differing = 0.0, []
    for off in offsets:
        a_buf, b_buf = torch.empty(m * k + 16), torch.empty(n * k + 16)
        a_buf[off : off + m * k] = a.flatten()
        b_buf[off : off + n * k] = b.flatten()
        moved = a_buf[off : off + m * k].view(m, k) @ b_buf[off : off + n * k].view(n, k).t()
        diff = (moved - reference).abs().max().item()
        if diff:
            differing.append(off * 4)
            worst = max(worst, diff)
    return worst, differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="7x64x32,2x64x23,1x576x6144,7x576x1536")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, MKL_CBWR={os.environ.get('MKL_CBWR', '')!r}")
    print(f"BLAS: {blas.group(1) if blas else '?'}")
    print(f"{'M x K x N':>14}  {'max |diff|':>10}  byte offsets that changed the bits")
    for shape in args.shapes.split(","):
        m, k, n = (int(x) for x in shape.split("x"))
        worst, differing = probe(m, k, n, range(1, 16))
        print(f"{shape:>14}  {worst:10.3g}  {differing or 'none'}")


if __name__ == "__main__":
    main()
