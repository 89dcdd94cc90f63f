"""Costs of the crypto layer (openhydra/crypto/): per-activation sealing, onion routing, DP noise, PoW.

Prints, as medians of ``--repeats`` runs:
- seal + open of one activation, 1.8 KB (one bf16 hidden state of a 896-wide model: a decode step)
  and 64 KB (a prefill chunk), in µs;
- onion wrap of a 3-hop route (3 signature checks, 3 ephemeral X25519 + HKDF, 3 AES-GCM layers)
  and one peel, in µs;
- Ed25519 sign/verify and DP noise + audit record for one decode-step activation;
- the geo-challenge PoW at the configured difficulty (``conf/privacy/onion.yaml``): time for an
  honest peer (median over ``--pow-runs`` identities) and the hash rate, extrapolated to minting
  1,000 identities (and keeping them alive: proofs expire after 10 to 20 minutes).

    python bench/bench_crypto.py [--repeats 5] [--pow-runs 5] [--png docs/img/crypto_costs.png]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from omegaconf import OmegaConf

from openhydra.crypto.dp import DPParams, apply_dp
from openhydra.crypto.identity import Identity, verify_signature
from openhydra.crypto.keys import StaticKeyPair
from openhydra.crypto.onion import HopRef, RouteHop, peel, wrap_route
from openhydra.crypto.pow import solve
from openhydra.crypto.seal import channel

REPO = Path(__file__).resolve().parent.parent


def per_call_us(fn: Callable[[], object], number: int, repeats: int) -> tuple[float, float]:
    """(median, min) over ``repeats`` of the mean time of ``number`` calls, in µs. On the shared,
    noisy cores the min is the better estimate of the intrinsic cost; the median is what a busy
    node sees."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e6)
    return statistics.median(samples), min(samples)


def bench_seal(size: int, number: int, repeats: int) -> tuple[float, float]:
    sealer, opener = channel(os.urandom(32), "bench-session", 1)
    payload = os.urandom(size)

    def roundtrip() -> None:
        opener.open(sealer.seal(7, payload))

    return per_call_us(roundtrip, number, repeats)


def bench_onion(repeats: int) -> tuple[tuple[float, float], tuple[float, float]]:
    nodes = []
    for i in range(3):
        ident, static = Identity.generate(), StaticKeyPair.generate()
        nodes.append(
            (
                static,
                RouteHop(
                    HopRef(peer_id=ident.peer_id, address=f"127.0.0.1:{50051 + i}"),
                    static.signed_by(ident),
                    payload=b"layers 0-10",
                ),
            )
        )
    hops = [h for _, h in nodes]
    wrap_us = per_call_us(lambda: wrap_route("bench-session", hops), 200, repeats)
    onion = wrap_route("bench-session", hops).onion
    peel_us = per_call_us(lambda: peel(onion, nodes[0][0], "bench-session"), 500, repeats)
    return wrap_us, peel_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pow-runs", type=int, default=5)
    ap.add_argument("--png", type=Path, default=REPO / "docs" / "img" / "crypto_costs.png")
    args = ap.parse_args()
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(1)
    onion_conf = OmegaConf.load(REPO / "conf" / "privacy" / "onion.yaml")
    bits = int(onion_conf.pow_difficulty_bits)

    results: dict[str, tuple[float, float]] = {}
    results["seal+open 1.8 KB"] = bench_seal(1792, 5000, args.repeats)
    results["seal+open 64 KB"] = bench_seal(64 * 1024, 500, args.repeats)
    aead, nonce, blob = AESGCM(os.urandom(32)), os.urandom(12), os.urandom(1792)
    results["raw AES-GCM enc+dec 1.8 KB"] = per_call_us(
        lambda: aead.decrypt(nonce, aead.encrypt(nonce, blob, b"ad"), b"ad"), 5000, args.repeats
    )
    results["onion wrap, 3 hops"], results["onion peel, 1 hop"] = bench_onion(args.repeats)
    ident = Identity.generate()
    sig = ident.sign(b"x" * 200)
    results["ed25519 sign"] = per_call_us(lambda: ident.sign(b"x" * 200), 2000, args.repeats)
    results["ed25519 verify"] = per_call_us(
        lambda: verify_signature(ident.public_key_bytes, sig, b"x" * 200), 2000, args.repeats
    )
    h = torch.randn(1, 1, 576).to(torch.bfloat16)
    params, key = DPParams(0.001, 300.0), os.urandom(32)
    results["dp noise+record [1,1,576]"] = per_call_us(lambda: apply_dp(h, params, key, "s", 1, 3), 1000, args.repeats)

    print("| operation | median µs | min µs |")
    print("| --- | --- | --- |")
    for name, (med, best) in results.items():
        print(f"| {name} | {med:,.1f} | {best:,.1f} |")

    # PoW: honest peer at the configured difficulty, a few distinct identities
    times, hashes = [], []
    for _ in range(args.pow_runs):
        t0 = time.perf_counter()
        proof = solve(Identity.generate().peer_id, "eu-west", bits)
        times.append(time.perf_counter() - t0)
        hashes.append(proof.nonce + 1)
    rate = sum(hashes) / sum(times)
    expected_s = 2**bits / rate
    print(f"\nPoW at {bits} bits (conf/privacy/onion.yaml), {args.pow_runs} identities, one core:")
    print(
        f"  honest peer: median {statistics.median(times):.2f} s (runs: "
        f"{', '.join(f'{t:.2f}' for t in times)}), {rate / 1e6:.2f} M hashes/s, expected {expected_s:.2f} s"
    )
    print(
        f"  minting 1,000 identities: ~{1000 * expected_s / 60:.0f} core-minutes (expected 2^{bits} hashes each); "
        f"keeping them alive costs the same every 10-minute window = {1000 * expected_s / 600:.1f} cores busy"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results)
    ax.barh(names, [results[n][0] for n in names], color="tab:blue", label="median")
    ax.barh(names, [results[n][1] for n in names], color="tab:orange", height=0.4, label="min")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("µs per operation (one core)")
    for i, n in enumerate(names):
        ax.text(results[n][0], i, f" {results[n][0]:,.1f}", va="center", fontsize=8)
    ax.set_title(f"OpenHydra crypto costs; PoW {bits} bits: {expected_s:.2f} s per identity")
    ax.invert_yaxis()
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
