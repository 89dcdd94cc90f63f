"""What a new identity costs: CPU seconds to solve the join proof of work (crypto/pow.py), per difficulty.

A slashed peer that comes back under a fresh Ed25519 identity must first solve a geo-challenge proof
for that id (when the swarm requires one: ``privacy.pow_difficulty_bits``), and again every 10-minute
window it stays. This measures, per difficulty, the CPU time of ``solve`` for distinct fresh peer ids
(interleaved across difficulties, one core), its median and spread, the hashes per second, and the
verifier's side (one ``verify``), so the ratio solve/verify is the attacker's cost per unit of defence.

    python bench/bench_pow.py --bits 12 16 18 20 --ids 8

``--stall BITS`` instead measures what a node's re-solve does to serving: the latency of a decode-like step
(60 small torch ops on one thread) with no solve running, with the solve on a thread of the same process
(holding the GIL between hashes), and in membership.py's niced child process, interleaved, twice each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import finish_plot

from openhydra.crypto.identity import Identity
from openhydra.crypto.pow import solve, verify
from openhydra.testing.machine import announce


def stall_check(bits: int, rounds: int = 2) -> None:
    import torch

    from openhydra.crypto.membership import Membership

    torch.set_num_threads(1)
    x, w = torch.randn(1, 576), torch.randn(576, 576)

    def step() -> None:
        h = x
        for _ in range(60):
            h = torch.nn.functional.silu(h @ w) * 0.01 + h

    def steps_ms(until) -> list[float]:
        lat: list[float] = []
        while not until() or len(lat) < 20:
            t0 = time.perf_counter()
            step()
            lat.append((time.perf_counter() - t0) * 1e3)
        return lat

    print(f"load average at start: {os.getloadavg()}")
    for _ in range(rounds):
        for mode in ("none", "thread", "child"):
            if mode == "none":
                end = time.monotonic() + 2.0
                lat, took = steps_ms(lambda end=end: time.monotonic() > end), 0.0
            else:
                rules = Membership(difficulty_bits=bits, region="eu-west", solve_in_child=mode == "child")
                t0 = time.perf_counter()
                rules.prepare(Identity.generate().peer_id)
                pending = next(iter(rules._solving.values()))
                lat = steps_ms(pending.done)
                took = time.perf_counter() - t0
            print(f"{mode:>6}: step median {statistics.median(lat):6.2f} ms, max {max(lat):6.1f} ms, "
                  f"{len(lat):4d} steps, solve {took:5.1f} s")
    print(f"load average at end: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[12, 16, 18, 20])
    parser.add_argument("--ids", type=int, default=8, help="fresh identities per difficulty")
    parser.add_argument("--png", default="docs/img/bench_pow.png")
    parser.add_argument("--stall", type=int, metavar="BITS", help="measure serving stalls during a solve instead")
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    if args.stall is not None:
        stall_check(args.stall)
        return
    print(f"load average at start: {os.getloadavg()}")
    cpu: dict[int, list[float]] = {b: [] for b in args.bits}
    hashes: dict[int, list[int]] = {b: [] for b in args.bits}
    check: dict[int, list[float]] = {b: [] for b in args.bits}
    now = time.time()
    for _ in range(args.ids):  # interleaved: each round solves once at every difficulty
        for bits in args.bits:
            peer_id = Identity.generate().peer_id
            t0 = time.process_time()
            proof = solve(peer_id, "eu-west", bits, now=now)
            cpu[bits].append(time.process_time() - t0)
            hashes[bits].append(proof.nonce + 1)
            t0 = time.perf_counter()
            verify(proof, peer_id, bits, claimed_region="eu-west", now=now)
            check[bits].append(time.perf_counter() - t0)
    print(f"load average at end: {os.getloadavg()}")
    print(f"{'bits':>4} {'median CPU s/id':>16} {'p10':>8} {'p90':>8} {'mean':>8} {'Mhash/s':>8} "
          f"{'verify us':>9} {'solve/verify':>12}")
    rows = []
    for bits in args.bits:
        xs = sorted(cpu[bits])
        rate = sum(hashes[bits]) / max(sum(xs), 1e-9) / 1e6
        ver = statistics.median(check[bits])
        p10, p90 = xs[len(xs) // 10], xs[min(len(xs) - 1, (9 * len(xs)) // 10)]
        rows.append((bits, statistics.median(xs), statistics.mean(xs)))
        print(f"{bits:>4} {statistics.median(xs):>16.3f} {p10:>8.3f} {p90:>8.3f} {statistics.mean(xs):>8.3f} "
              f"{rate:>8.2f} {ver * 1e6:>9.1f} {statistics.mean(xs) / ver:>12.0f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy([r[0] for r in rows], [r[2] for r in rows], "o-", label="mean CPU s per identity")
        ax.semilogy([r[0] for r in rows], [r[1] for r in rows], "s--", label="median")
        finish_plot(fig, ax, args.png, xlabel="privacy.pow_difficulty_bits", ylabel="CPU seconds (one core)",
                    title="Cost of one fresh identity (per 10-minute window)", dpi=100)


if __name__ == "__main__":
    main()
