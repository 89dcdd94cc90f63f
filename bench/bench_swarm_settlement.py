"""Swarm settlement's cost per request, as a share of the request's latency (issue 6's 1% target).

    python bench/bench_swarm_settlement.py [--trials 6] [--tokens 64]

A real swarm: the HTTP DHT and three node processes (1 thread each) serving SmolLM2-135M (the embedded
weights, bf16) split 10 + 10 + 10 layers. Each trial sends one greedy chat request through node 0 with
the ``openai`` client (``ignore_eos``, so every request is ``--tokens`` long) and times it end to end,
then waits for that request's settlement and reads how long it took on the coordinator (2 RPC rounds to
the 3 hops, the local ledger write, 2 remote ledger writes: ``/v1/network/status`` -> ``settlement.last_ms``).
Request and settlement are measured in the same trial, one after the other (the settlement starts only
once the answer is complete, so it never adds to the client's latency). Prints the table and the ratio,
writes docs/img/swarm_settlement_bench.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from bench.common import plot_trials, print_table  # noqa: E402
from openhydra.runtime.source import embedded_model_dir  # noqa: E402
from openhydra.testing import TEST_CACHE_ROOT  # noqa: E402
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all, swarm_node_overrides  # noqa: E402

SPLITS = [(0, 10), (10, 20), (20, 30)]


def settlement_status(node: NodeProcess) -> dict:
    return httpx.get(node.url + "/v1/network/status", timeout=10).json()["settlement"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    rates: dict[str, list[float]] = {"request ms": [], "settlement ms": []}
    with tempfile.TemporaryDirectory() as tmp, DhtProcess() as dht:
        nodes = [NodeProcess(swarm_node_overrides(model_dir, dht.url, a, b, Path(tmp) / f"n{a}", dtype="bfloat16"))
                 for a, b in SPLITS]
        try:
            start_all(nodes)
            client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="x", max_retries=0, timeout=600)
            model = client.models.list().data[0].id
            for trial in range(args.trials + 1):  # trial 0 warms up (first chain, caches) and is dropped
                done = settlement_status(nodes[0])["completed"]
                began = time.perf_counter()
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"Tell me a story, part {trial}."}],
                    max_tokens=args.tokens, temperature=0, extra_body={"ignore_eos": True})
                request_ms = (time.perf_counter() - began) * 1000
                deadline = time.monotonic() + 60
                while (status := settlement_status(nodes[0]))["completed"] <= done:
                    if time.monotonic() > deadline:
                        raise TimeoutError("settlement did not finish")
                    time.sleep(0.05)
                if status["failed"]:
                    raise RuntimeError(f"settlement failed: {status['failures_by_stage']}")
                print(f"trial {trial}: request {request_ms:.0f} ms, settlement {status['last_ms']:.1f} ms", flush=True)
                if trial:
                    rates["request ms"].append(request_ms)
                    rates["settlement ms"].append(status["last_ms"])
        finally:
            for node in nodes:
                node.stop()
    print_table(rates, metric="median ms")
    med = {k: statistics.median(v) for k, v in rates.items()}
    share = [s / r for s, r in zip(rates["settlement ms"], rates["request ms"], strict=True)]
    print(f"\nsettlement / request latency: median {100 * statistics.median(share):.2f}% "
          f"(per trial: {', '.join(f'{100 * x:.2f}%' for x in share)}); "
          f"{args.tokens} completion tokens, request median {med['request ms']:.0f} ms")
    plot_trials(rates, f"SmolLM2 over 3 peers, {args.tokens} tokens: request vs its settlement",
                REPO / "docs/img/swarm_settlement_bench.png", ylabel="ms")


if __name__ == "__main__":
    main()
