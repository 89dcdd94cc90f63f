"""``speculative=prompt_lookup`` served through the node's own OpenAI API vs plain decoding, at an emulated RTT.

    python bench/bench_speculative_api.py [--one-way-ms 10] [--trials 5] [--max-tokens 48] [--dtype bfloat16]

Four real node processes (SmolLM2-135M-Instruct, 1 torch thread each) in one HTTP-DHT swarm: two coordinators
that each serve layers [0,10), one with ``speculative=prompt_lookup`` and one without, and two peers serving
[10,20) and [20,30). Every node binds 127.0.0.1 and advertises 127.0.0.2 (``peer.advertise_host``, fixed
``peer.port`` and ``peer.reply_port``), where a userspace delay relay (openhydra/sim/relay.py; this kernel has no
``tc netem``) forwards each port back with ``--one-way-ms`` per crossing: every step, push and result of a
pipeline pass crosses it (10 ms = 20 ms RTT per link). The HTTP DHT and the client's HTTP are not delayed.

Arms, interleaved trial by trial: the same greedy chat requests (streaming, ``stream_options.include_usage``)
to the plain and to the speculative coordinator, on grounded prompts (the answer quotes its input) and open
ones (it does not: speculation should fall back and cost little). Reported per prompt set: decode tok/s after
the first token (completion tokens - 1 over the time from the first to the last content chunk), speculative ÷
plain (median of per-trial ratios), and whether both arms' texts were identical (greedy must be).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_speculative import PROMPTS  # noqa: E402
from bench.common import plot_trials, run_interleaved  # noqa: E402

ADVERTISED = "127.0.0.2"
SPANS = {"spec": (0, 10), "plain": (0, 10), "mid": (10, 20), "last": (20, 30)}


class RelayThread:
    """The delay relay on its own event loop thread, listening on ADVERTISED for the given ports."""

    def __init__(self, ports: list[int], one_way_ms: float) -> None:
        from openhydra.sim.relay import DelayRelay, LinkSpec

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.relay = DelayRelay([(ADVERTISED, p) for p in ports], lambda s, d: LinkSpec(one_way_ms),
                                targets={ADVERTISED: "127.0.0.1"})
        asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def chat_decode(url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int, str]:
    """One streaming greedy request: (seconds from the first to the last content chunk, tokens, text)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    stamps: list[float] = []
    parts: list[str] = []
    tokens = 0
    with httpx.Client(timeout=300) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
                parts.append(chunk["choices"][0]["delta"]["content"])
    return stamps[-1] - stamps[0], tokens, "".join(parts)


def speculative_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {f"{m.group(1)}:{m.group(2)}": float(m.group(3)) for m in
            re.finditer(r'^openhydra_speculative_(\w+)_total\{\w+="(\w+)"\} ([0-9.e+]+)$', text, re.M)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one-way-ms", type=float, default=10.0)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--sets", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_speculative_api.png"))
    args = parser.parse_args()
    from openhydra.testing.machine import announce

    announce()
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT
    from openhydra.testing.processes import DhtProcess, NodeProcess, free_port, start_all, swarm_node_overrides

    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    model = model_dir.name
    work = Path(tempfile.mkdtemp(prefix="bench-speculative-api-"))
    ports = {name: (free_port(), free_port()) for name in SPANS}  # (peer.port, peer.reply_port)
    relay = RelayThread([p for pair in ports.values() for p in pair], args.one_way_ms)
    texts: dict[str, dict[str, set[str]]] = {}  # set -> arm -> texts seen (one per prompt per trial)
    try:
        with DhtProcess() as dht:
            nodes = {}
            for name, (a, b) in SPANS.items():
                overrides = [*swarm_node_overrides(model_dir, dht.url, a, b, work / name, dtype=args.dtype),
                             f"peer.port={ports[name][0]}", f"peer.reply_port={ports[name][1]}",
                             f"peer.advertise_host={ADVERTISED}", "peer.step_timeout_s=120"]
                if name == "spec":
                    overrides += ["speculative=prompt_lookup", f"speculative.k={args.k}"]
                nodes[name] = NodeProcess(overrides, threads=1)
            try:
                print(f"starting 4 nodes ({args.dtype}, {args.one_way_ms} ms one way per crossing)...", flush=True)
                start_all(list(nodes.values()))
                coordinators = {"plain": nodes["plain"].url, "speculative": nodes["spec"].url}
                for url in coordinators.values():
                    chat_decode(url, model, PROMPTS["open"][0], 8)  # warm-up: routes, channels, caches
                before = speculative_counters(coordinators["speculative"])

                def arm(prompt_set: str, name: str, url: str):
                    def run() -> float:
                        elapsed, tokens = 0.0, 0
                        for prompt in PROMPTS[prompt_set]:
                            seconds, n, text = chat_decode(url, model, prompt, args.max_tokens)
                            elapsed, tokens = elapsed + seconds, tokens + n - 1
                            texts.setdefault(prompt_set, {}).setdefault(name, set()).add(f"{prompt[:20]}|{text}")
                        return tokens / elapsed

                    return run

                arms = {f"{s} {name}": arm(s, name, url) for s in args.sets for name, url in coordinators.items()}
                rates = run_interleaved(arms, args.trials)
                after = speculative_counters(coordinators["speculative"])
            finally:
                for node in nodes.values():
                    node.stop()
    finally:
        relay.close()

    print(f"\n{'set':10s} {'plain tok/s':>12s} {'spec tok/s':>11s} {'spec ÷ plain':>13s}  same text")
    for s in args.sets:
        plain, spec = rates[f"{s} plain"], rates[f"{s} speculative"]
        ratio = statistics.median(b / a for a, b in zip(plain, spec, strict=True))
        same = texts[s]["plain"] == texts[s]["speculative"]
        print(f"{s:10s} {statistics.median(plain):12.2f} {statistics.median(spec):11.2f} {ratio:13.2f}  {same}")
    drafted = sum(after.get(k, 0) - before.get(k, 0) for k in ("draft_tokens:accepted", "draft_tokens:rejected"))
    accepted = after.get("draft_tokens:accepted", 0) - before.get("draft_tokens:accepted", 0)
    print(f"speculative coordinator over all sets: {accepted:.0f} of {drafted:.0f} drafted tokens accepted"
          + (f" ({accepted / drafted:.0%})" if drafted else "")
          + f"; steps {({k: after[k] - before.get(k, 0) for k in after if k.startswith('steps:')})}")
    print(f"[{args.dtype}, 4 node processes, 1 thread each, {2 * args.one_way_ms:g} ms RTT per link, "
          f"k={args.k}, max_tokens={args.max_tokens}, trials={args.trials}]")
    plot_trials(rates, f"speculative=prompt_lookup via the node API, {2 * args.one_way_ms:g} ms RTT", args.plot)
    mismatched = [s for s in args.sets if texts[s]["plain"] != texts[s]["speculative"]]
    if mismatched:
        print(f"greedy texts differ between the arms in {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
