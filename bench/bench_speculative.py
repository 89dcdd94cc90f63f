"""Speculative decoding across a 3-peer pipeline vs plain decoding, under emulated RTT.

    python bench/bench_speculative.py [--model-dir smollm2|tiny|DIR] [--one-way-ms 0 10] [--k 2 4 8]
                                      [--trials 3] [--max-tokens 32] [--one-pass]

SmolLM2-135M-Instruct (bf16) split in three spans, each its own peer process (openhydra.peer.server, 1 torch
thread); the coordinator (this process, 1 thread) runs SwarmPipeline + router/speculative.Decoder, greedy.
Every connection (steps, the peers' pushes, results, Truncate RPCs) passes the userspace delay relay
(openhydra/sim/relay.py; this kernel has no ``tc netem``) with ``one_way_ms`` per crossing (10 ms = 20 ms RTT).

Arms per RTT, interleaved trial by trial: plain, and prompt lookup at each k, on two prompt sets:
  grounded   the answer quotes its input (repeat with a substitution, correct the spelling of a paragraph);
  open       open-ended questions (no input to copy; speculation should fall back and cost nothing).
Reported: decode tok/s (after the first token) per set, speculative ÷ plain (median of per-trial ratios),
acceptance rate (accepted ÷ drafted tokens) and pipeline passes per output token.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import torch

from bench.bench_push_vs_roundtrip import RELAY_HOST, Relay, _relayed
from bench.common import bench_model_dir, plot_trials, run_interleaved, spawn_ready
from openhydra.discovery.records import PeerAnnouncement
from openhydra.peer.client import ClientTunables, PeerChainClient
from openhydra.router.speculative import Decoder, SpeculativeConfig, Speculator, build_drafter
from openhydra.router.swarm import SwarmPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.sim.relay import Wire

TEXT = ("The committee met on Tuesday to review the annual budget. After a long discussion, the members agreed "
        "to increase funding for the public library, to repair the roof of the community centre, and to postpone "
        "the decision on the new sports hall until the spring meeting.")
TYPOS = ("The comittee met on tuesday to reveiw the anual budget. After a long discusion, the members agred to "
         "increse funding for the public libary and to postpone the desicion on the new sports hall.")
PROMPTS = {
    "grounded": [
        f"Repeat the following text exactly, but write Friday instead of Tuesday:\n\n{TEXT}",
        f"Rewrite this paragraph with the spelling mistakes corrected:\n\n{TYPOS}",
    ],
    "open": [
        "Write a short story about a robot who learns to paint.",
        "What are some good habits for staying healthy? Explain each one.",
    ],
}


class Bench:
    def __init__(self, model_dir: str, peers: list[str], splits: list[tuple[int, int]], max_tokens: int) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.prompts = {
            name: [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for p in prompts]
            for name, prompts in PROMPTS.items()
        }
        self.eos = {int(tokenizer.eos_token_id)}
        self.client = PeerChainClient([], advertise_host=RELAY_HOST, tunables=ClientTunables(step_timeout_s=120.0))
        num_layers = splits[-1][1]
        records = [PeerAnnouncement(peer_id=f"p{i}", model_id="m", start=a, end=b, total_layers=num_layers,
                                    grpc_address=_relayed(addr), dtype="bfloat16", announced_at=time.time(),
                                    ttl_s=86400.0)
                   for i, (addr, (a, b)) in enumerate(zip(peers, splits, strict=True))]
        self.pipeline = SwarmPipeline("m", num_layers, lambda: records, self.client)
        self.max_tokens = max_tokens
        self.stats: dict[str, list[tuple[int, int, int, int]]] = {}  # arm -> (drafted, accepted, passes, tokens)

    def arm(self, name: str, prompt_set: str, speculative: SpeculativeConfig | None):
        def run() -> float:
            speculator = Speculator(speculative, build_drafter(speculative)) if speculative else None
            tokens, elapsed, passes = 0, 0.0, 0
            for prompt in self.prompts[prompt_set]:
                session = uuid.uuid4().hex
                decoder = Decoder(self.pipeline, session, prompt, SamplingParams(), self.max_tokens, speculator)
                decoder.next_tokens()  # prefill + first token: identical in every arm, not timed
                began, out = time.perf_counter(), 0
                while out < self.max_tokens - 1:
                    got = decoder.next_tokens()
                    passes += 1
                    if any(t in self.eos for t in got):
                        out += got.index(next(t for t in got if t in self.eos))
                        break
                    out += len(got)
                elapsed += time.perf_counter() - began
                tokens += out
                self.pipeline.close(session)
            stats = speculator.stats if speculator else None
            self.stats.setdefault(name, []).append(
                (stats.drafted if stats else 0, stats.accepted if stats else 0, passes, tokens))
            return tokens / elapsed

        return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="smollm2")
    parser.add_argument("--one-way-ms", type=float, nargs="+", default=[0.0, 10.0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--sets", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--one-pass", action="store_true",
                        help="verify in one forward per hop (speculative.exact=false; what the documented runs "
                             "before 2026-12-04 measured); default: exact, position by position")
    parser.add_argument("--plot", default="docs/img/bench_speculative.png")
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    torch.set_num_threads(1)
    model_dir = bench_model_dir(args.model_dir)
    from openhydra.runtime.shard_layers import load_text_config

    num_layers = load_text_config(model_dir).num_hidden_layers
    splits = list(itertools.pairwise([0, num_layers // 3, 2 * num_layers // 3, num_layers]))
    procs: list[subprocess.Popen] = []
    results: dict[float, dict[str, list[float]]] = {}
    try:
        peers = []
        for a, b in splits:
            proc, addr = spawn_ready(["-m", "openhydra.peer.server", "--model-dir", model_dir, "--dtype", "bfloat16",
                                 "--start", str(a), "--end", str(b)])
            procs.append(proc)
            peers.append(addr)
        bench = Bench(model_dir, peers, splits, args.max_tokens)
        relay = Relay([int(a.rsplit(":", 1)[1]) for a in [*peers, bench.client.reply_address]])
        arms = {}
        for prompt_set in args.sets:
            arms[f"{prompt_set} plain"] = bench.arm(f"{prompt_set} plain", prompt_set, None)
            for k in args.k:
                name = f"{prompt_set} lookup k={k}"
                arms[name] = bench.arm(name, prompt_set,
                                       SpeculativeConfig(mode="prompt_lookup", k=k, exact=not args.one_pass))
        for name, run in arms.items():  # warm-up (connections, allocator): one plain run per prompt set
            if name.endswith("plain"):
                run()
        for one_way in args.one_way_ms:
            Wire.delay_scale = one_way
            bench.stats.clear()
            print(f"\n== one-way delay {one_way:g} ms (RTT {2 * one_way:g} ms) ==", flush=True)
            results[one_way] = run_interleaved(arms, args.trials)
            results[one_way]["_stats"] = dict(bench.stats)  # type: ignore[assignment]
        bench.client.shutdown()
        relay.close()
    finally:
        for proc in procs:
            proc.kill()
    _report(results, args.k, args.sets, args.plot)


def _report(results: dict, ks: list[int], sets: list[str], plot: str) -> None:
    print("\n| RTT | prompts | arm | decode tok/s (median) | speculative ÷ plain | acceptance | passes per token |")
    print("|---|---|---|---|---|---|---|")
    speedups: dict[str, list[float]] = {}
    for one_way, rates in results.items():
        stats = rates.pop("_stats")
        for prompt_set in sets:
            plain = rates[f"{prompt_set} plain"]
            for arm in [f"{prompt_set} plain", *(f"{prompt_set} lookup k={k}" for k in ks)]:
                values = rates[arm]
                ratio = statistics.median(v / p for v, p in zip(values, plain, strict=True))
                drafted, accepted, passes, tokens = (sum(x) for x in zip(*stats[arm], strict=True))
                acceptance = f"{accepted / drafted:.2f} ({accepted}/{drafted})" if drafted else "—"
                bold = "**" if arm.endswith(("k=4",)) else ""
                print(f"| {2 * one_way:g} ms | {prompt_set} | {arm.split(' ', 1)[1]} | {statistics.median(values):.2f} "
                      f"| {bold}{ratio:.2f}{bold} | {acceptance} | {passes / max(tokens, 1):.2f} |")
                if "lookup" in arm:
                    speedups.setdefault(f"{prompt_set}, RTT {2 * one_way:g} ms", []).append(ratio)
    _plot(speedups, ks, plot)
    last = max(results)
    plot_trials(results[last], f"decode tok/s per trial (RTT {2 * last:g} ms)",
                Path(plot).with_name(Path(plot).stem + "_trials.png"))


def _plot(speedups: dict[str, list[float]], ks: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in speedups.items():
        ax.plot(ks, values, "o-", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("k (max draft tokens per verify)")
    ax.set_ylabel("decode tok/s, speculative ÷ plain")
    ax.set_xticks(ks)
    ax.set_ylim(bottom=0)
    ax.set_title("prompt-lookup speculation, SmolLM2 over 3 peers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
