"""``speculative=prompt_lookup`` served through the node's own OpenAI API vs plain decoding, at an emulated RTT.

    python bench/bench_speculative_api.py [--one-way-ms 10] [--trials 5] [--max-tokens 48] [--dtype bfloat16]
                                          [--serving default|batched] [--hardware cpu|cpu_int4|cpu_int8]

Five real node processes (SmolLM2-135M-Instruct, 1 torch thread each) in one HTTP-DHT swarm: three coordinators that
each serve layers [0,10): plain, ``speculative=prompt_lookup`` (exact: every hop computes each verified position as
plain decoding does; on the low-bit kernel, ``--hardware cpu_int4`` / ``cpu_int8``, each projection in one call for
all positions, whose rows have the one-position bits) and ``speculative=prompt_lookup speculative.exact=false`` (one
forward per verify: cheaper, rounds differently), and two peers serving [10,20) and [20,30). Every node binds
127.0.0.1 and advertises 127.0.0.2 (``peer.advertise_host``, fixed ``peer.port`` and ``peer.reply_port``), where a
userspace delay relay (openhydra/sim/relay.py; this kernel has no ``tc netem``) forwards each port back with
``--one-way-ms`` per crossing: every step, push and result of a pipeline pass crosses it (10 ms = 20 ms RTT per
link). The HTTP DHT and the client's HTTP are not delayed. ``--serving batched`` runs every node with continuous
batching: an exact verify's positions are then rows of one batched forward per hop (its bits are batched plain
decoding's), instead of one decode step per position.

Arms, interleaved trial by trial: the same greedy chat requests (streaming, ``stream_options.include_usage``)
to each coordinator, on grounded prompts (the answer quotes its input) and open ones (it does not:
speculation should fall back and cost little). Reported per prompt set and arm: decode tok/s after the first
token (completion tokens - 1 over the time from the first to the last content chunk), ÷ plain (median of
per-trial ratios), and whether the arm's texts equal the plain arm's (the exact arm's must; the exit status
is 1 if they do not).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_speculative import PROMPTS  # noqa: E402
from bench.common import plot_trials, run_interleaved  # noqa: E402
from openhydra.sim.relay import LinkSpec, RelayThread  # noqa: E402

ADVERTISED = "127.0.0.2"
SPANS = {"plain": (0, 10), "speculative": (0, 10), "one-pass": (0, 10), "mid": (10, 20), "last": (20, 30)}
OPTIONS = {"speculative": ["speculative=prompt_lookup"],
           "one-pass": ["speculative=prompt_lookup", "speculative.exact=false"]}
ARMS = ("plain", "speculative", "one-pass")


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
    parser.add_argument("--serving", default="default", choices=["default", "batched"])
    parser.add_argument("--hardware", default="cpu", choices=["cpu", "cpu_fast", "cpu_int4", "cpu_int8"],
                        help="conf/hardware group (cpu_int4 / cpu_int8: pass --dtype float32, their auto dtype)")
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
    link = LinkSpec(args.one_way_ms)
    relay = RelayThread(ADVERTISED, [p for pair in ports.values() for p in pair], lambda s, d: link)
    texts: dict[str, dict[str, set[str]]] = {}  # set -> arm -> texts seen (one per prompt per trial)
    try:
        with DhtProcess() as dht:
            nodes = {}
            for name, (a, b) in SPANS.items():
                overrides = [*swarm_node_overrides(model_dir, dht.url, a, b, work / name, dtype=args.dtype,
                                                  hardware=args.hardware),
                             f"peer.port={ports[name][0]}", f"peer.reply_port={ports[name][1]}",
                             f"peer.advertise_host={ADVERTISED}", "peer.step_timeout_s=120",
                             f"serving={args.serving}"]
                if name in OPTIONS:
                    overrides += [*OPTIONS[name], f"speculative.k={args.k}"]
                nodes[name] = NodeProcess(overrides, threads=1)
            try:
                print(f"starting {len(nodes)} nodes ({args.hardware}, {args.dtype}, {args.one_way_ms} ms one way "
                      "per crossing)...", flush=True)
                start_all(list(nodes.values()))
                coordinators = {name: nodes[name].url for name in ARMS}
                for url in coordinators.values():
                    chat_decode(url, model, PROMPTS["open"][0], 8)  # warm-up: routes, channels, caches
                before = {name: speculative_counters(coordinators[name]) for name in OPTIONS}

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
                after = {name: speculative_counters(coordinators[name]) for name in OPTIONS}
            finally:
                for node in nodes.values():
                    node.stop()
    finally:
        relay.close()

    print(f"\n{'set':10s} {'arm':12s} {'decode tok/s':>13s} {'÷ plain':>8s}  text = plain's")
    for s in args.sets:
        plain = rates[f"{s} plain"]
        for name in ARMS:
            arm = rates[f"{s} {name}"]
            ratio = statistics.median(b / a for a, b in zip(plain, arm, strict=True))
            same = texts[s][name] == texts[s]["plain"]
            print(f"{s:10s} {name:12s} {statistics.median(arm):13.2f} {ratio:8.2f}  {same}")
    for name in OPTIONS:
        a, b = after[name], before[name]
        accepted = a.get("draft_tokens:accepted", 0) - b.get("draft_tokens:accepted", 0)
        drafted = accepted + a.get("draft_tokens:rejected", 0) - b.get("draft_tokens:rejected", 0)
        steps = {k.removeprefix("steps:"): int(a[k] - b.get(k, 0)) for k in a if k.startswith("steps:")}
        print(f"{name} coordinator, all sets: {accepted:.0f} of {drafted:.0f} drafted tokens accepted"
              + (f" ({accepted / drafted:.0%})" if drafted else "") + f"; pipeline steps {steps}")
    print(f"[hardware={args.hardware}, {args.dtype}, serving={args.serving}, {len(SPANS)} node processes, "
          f"1 thread each, {2 * args.one_way_ms:g} ms RTT per link, "
          f"k={args.k}, max_tokens={args.max_tokens}, trials={args.trials}]")
    plot_trials(rates, f"speculative=prompt_lookup via the node API, {2 * args.one_way_ms:g} ms RTT, "
                f"serving={args.serving}, {args.hardware} {args.dtype}", args.plot)
    mismatched = [s for s in args.sets if texts[s]["speculative"] != texts[s]["plain"]]
    if mismatched:
        print(f"exact speculative greedy text differs from plain in {mismatched}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
