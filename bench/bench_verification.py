"""Decode tok/s of a 3-peer pipeline with verification=default vs off, interleaved, and what it costs.

Six honest peer processes (two per span, 1 thread each, fp32): the coordinator's chain uses three of
them, the other three are what tier 1/2/3 re-execute on. Two coordinators in this process share the
peers: one with no verifier (verification=off), one with verification=default (every hop of 10% of
requests re-executed, 10% auditor rate). Requests alternate A/B (order flipped every round), same
prompts and length, greedy. Reported, medians over rounds:

- user tok/s: tokens / request wall time (verification runs on a background thread meanwhile);
- total tok/s (on arm): tokens / (request time + time to drain the verification queue after it);
- extra compute: positions re-executed by verification / positions the user's requests ran.

    python bench/bench_verification.py --model smollm2 --rounds 20 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.machine import announce
from openhydra.verification.config import VerificationConfig
from openhydra.verification.factory import build_verifier

CACHE = TEST_CACHE_ROOT
MODEL_ID = "bench-model"


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from openhydra.runtime.source import embedded_model_dir

        return embedded_model_dir(CACHE)
    path = CACHE / "tiny-v2" / f"tiny-{name}-8l"  # where tests/conftest.py builds them now
    if not path.exists():
        path = CACHE / f"tiny-{name}-8l"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the test suite once to build the tiny models")
    return path


def start_peer(path: Path, start: int, end: int, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openhydra.peer.server",
            "--model-dir",
            str(path),
            "--start",
            str(start),
            "--end",
            str(end),
            "--threads",
            str(threads),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    match = re.match(r"READY (\S+)", proc.stdout.readline())
    if not match:
        raise SystemExit("a peer did not start")
    return proc, match.group(1)


def run_request(pipeline: SwarmPipeline, session: str, prompt: list[int], tokens: int) -> float:
    began = time.perf_counter()
    feed, pos = prompt, 0
    for step in range(tokens):
        token = pipeline.step(session, feed, pos, SamplingParams(), step)
        pos += len(feed)
        feed = [token]
    elapsed = time.perf_counter() - began
    pipeline.close(session)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (real weights) or a tiny family: llama")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1, help="seed of the verifier's sampling")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result
    torch.set_num_threads(1)
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    path = model_dir(args.model)
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    bounds = [0, layers // 3, 2 * layers // 3, layers]
    peers, records = [], []
    for copy in range(2):
        for i in range(3):
            proc, address = start_peer(path, bounds[i], bounds[i + 1], args.threads)
            peers.append(proc)
            records.append(
                PeerAnnouncement(
                    peer_id=f"peer-{i}-{copy}",
                    model_id=MODEL_ID,
                    start=bounds[i],
                    end=bounds[i + 1],
                    total_layers=layers,
                    grpc_address=address,
                    dtype="float32",
                    throughput_tps=100.0 - copy,
                    announced_at=time.time(),
                    ttl_s=86400.0,
                )
            )
    lookup = lambda: list(records)  # noqa: E731
    tunables = ClientTunables(step_timeout_s=120.0)
    off = SwarmPipeline(MODEL_ID, layers, lookup, PeerChainClient([], tunables=tunables))
    with tempfile.TemporaryDirectory() as data_dir:
        default = VerificationConfig(enabled=True, seed=args.seed)  # = conf/verification/default.yaml
        verifier = build_verifier(default, data_dir)
        on = SwarmPipeline(
            MODEL_ID, layers, lookup, PeerChainClient([], tunables=tunables), score=verifier.score, verifier=verifier
        )
        gen = torch.Generator().manual_seed(0)
        rates: dict[str, list[float]] = {"off": [], "on": [], "on_total": []}
        try:
            for warm in range(2):
                for pipeline in (off, on):
                    run_request(pipeline, f"warm{warm}", [1, 2, 3, 4], 4)
            verifier.drain(600)
            verifier.metrics.user_positions._value.set(0)
            verifier.metrics.extra_positions._value.set(0)
            verifier.metrics.busy_seconds._value.set(0)
            for r in range(args.rounds):
                prompt = torch.randint(3, 4000, (args.prompt,), generator=gen).tolist()
                order = [("off", off), ("on", on)] if r % 2 == 0 else [("on", on), ("off", off)]
                for name, pipeline in order:
                    elapsed = run_request(pipeline, f"{name}{r}", prompt, args.tokens)
                    rates[name].append(args.tokens / elapsed)
                    if name == "on":
                        began = time.perf_counter()
                        verifier.drain(600)
                        rates["on_total"].append(args.tokens / (elapsed + time.perf_counter() - began))
            m = verifier.metrics
            extra, user = m.extra_positions._value.get(), m.user_positions._value.get()
            audits = {
                s.labels["tier"]: s.value
                for metric in m.audits.collect()
                for s in metric.samples
                if s.name.endswith("_total")
            }
            result = {
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
                "model": args.model,
                "rounds": args.rounds,
                "tokens": args.tokens,
                "prompt": args.prompt,
                "threads_per_peer": args.threads,
                "tok_s_off": statistics.median(rates["off"]),
                "tok_s_on": statistics.median(rates["on"]),
                "tok_s_on_total": statistics.median(rates["on_total"]),
                "extra_positions": extra,
                "user_positions": user,
                "extra_compute": extra / user if user else 0.0,
                "verifier_busy_s": m.busy_seconds._value.get(),
                "audits_by_tier": audits,
            }
            result["ratio_user"] = result["tok_s_on"] / result["tok_s_off"]
            result["ratio_total"] = result["tok_s_on_total"] / result["tok_s_off"]
        finally:
            verifier.shutdown()
            for pipeline in (off, on):
                pipeline.client.shutdown()
            for proc in peers:
                proc.terminate()
                proc.wait(timeout=20)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
