"""Resident memory of one node serving 1,000 requests vs a plain transformers process holding the same model.

One `openhydra-node` process serves the embedded SmolLM2-135M with the node's default config (model=local on the
converted folder, hardware=auto, serving=default with its prefix cache, economy=barter), except a rate limit high
enough that 1,000 requests are not throttled. The official `openai` client sends varied requests from a few
threads at once: chat and legacy completions, streamed and not, greedy and sampled, short `max_tokens`. A sampler
thread reads the node's RSS, PSS and USS (psutil memory_full_info, the node and any child process summed) about
once a second. Then a plain python process loads the same folder with `AutoModelForCausalLM` in the dtype the node
reports in /v1/network/status (model.dtype), runs two `generate` calls, and is measured the same way from outside.
Both processes run with 1 torch thread. MB = 1e6 bytes.

    python bench/bench_node_memory.py [--requests 1000] [--concurrency 4] [--max-tokens 8-16]

Prints the table (node after warm-up, node after N requests, plain transformers, ratio), the machine banner
(load average), writes JSON (--json) and a plot of the node's RSS over requests with the transformers line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import bench_model_dir, machine_banner  # noqa: E402

MB = 1e6
SUBJECTS = ["the sea", "a lighthouse", "volcanoes", "bread", "the moon", "rivers", "owls", "trains", "chess",
            "glaciers", "bees", "paper", "copper", "rain", "deserts", "violins", "maps", "clocks", "salt", "kites"]
ASKS = ["Tell me one fact about {s}.", "Write a haiku about {s}.", "Explain {s} to a child in one sentence.",
        "List two words that describe {s}.", "What is the history of {s}? Be brief.", "Why do people like {s}?"]
SYSTEMS = [None, "You are a concise assistant.", "You answer in one short sentence, politely and plainly."]


@dataclass
class MemorySample:
    t_s: float
    requests_done: int
    rss: int
    pss: int
    uss: int
    processes: int
    prefix_cache_bytes: int | None = None


@dataclass
class Sampler:
    """Reads the memory of a process tree about every ``interval_s`` in a background thread."""

    pid: int
    interval_s: float = 1.0
    status_url: str | None = None
    samples: list[MemorySample] = field(default_factory=list)
    requests_done: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = field(default_factory=time.monotonic)

    def read(self) -> MemorySample:
        rss, pss, uss, count = tree_memory(self.pid)
        sample = MemorySample(time.monotonic() - self._t0, self.requests_done, rss, pss, uss, count,
                              self._prefix_cache_bytes())
        self.samples.append(sample)
        return sample

    def _prefix_cache_bytes(self) -> int | None:
        if self.status_url is None:
            return None
        import httpx

        serving = httpx.get(self.status_url, timeout=30).json().get("serving") or {}
        return (serving.get("prefix_cache") or {}).get("bytes")

    def start(self) -> Sampler:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.read()
                except Exception:  # the process may be gone at the very end; the last good sample stands
                    return

        self._thread = threading.Thread(target=loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def tree_memory(pid: int) -> tuple[int, int, int, int]:
    """(RSS, PSS, USS, process count) of a process and all its children, from /proc/<pid>/smaps_rollup."""
    import psutil

    root = psutil.Process(pid)
    rss = pss = uss = count = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, pss, uss, count = rss + info.rss, pss + info.pss, uss + info.uss, count + 1
    return rss, pss, uss, count


def request_plan(count: int, max_tokens: tuple[int, int], seed: int) -> list[dict]:
    """``count`` varied requests: endpoint, stream or not, prompt, max_tokens, temperature."""
    rng = random.Random(seed)
    plan = []
    for i in range(count):
        subject, ask = rng.choice(SUBJECTS), rng.choice(ASKS)
        prompt = ask.format(s=subject) + (f" (note {i})" if rng.random() < 0.5 else "")
        sampled = rng.random() < 0.5
        plan.append({
            "endpoint": "chat" if i % 4 in (0, 1) else "completions",
            "stream": i % 2 == 1,
            "system": rng.choice(SYSTEMS),
            "prompt": prompt,
            "max_tokens": rng.randint(*max_tokens),
            "temperature": 0.8 if sampled else 0.0,
            "seed": rng.randrange(1 << 30) if sampled else None,
        })
    return plan


def send(client, model: str, req: dict) -> int:
    """One request through the official openai client; returns the completion tokens it got back (streamed:
    the number of content chunks)."""
    common = {"model": model, "max_tokens": req["max_tokens"], "temperature": req["temperature"]}
    if req["seed"] is not None:
        common["seed"] = req["seed"]
    if req["endpoint"] == "chat":
        messages = ([{"role": "system", "content": req["system"]}] if req["system"] else []) + [
            {"role": "user", "content": req["prompt"]}]
        if not req["stream"]:
            out = client.chat.completions.create(messages=messages, **common)
            return out.usage.completion_tokens
        chunks = client.chat.completions.create(messages=messages, stream=True, **common)
        return sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    prompt = f"{req['system'] or ''}\nQ: {req['prompt']}\nA:".lstrip()
    if not req["stream"]:
        out = client.completions.create(prompt=prompt, **common)
        return out.usage.completion_tokens
    chunks = client.completions.create(prompt=prompt, stream=True, **common)
    return sum(1 for c in chunks if c.choices and c.choices[0].text)


def run_requests(url: str, model: str, plan: list[dict], concurrency: int, sampler: Sampler | None,
                 progress_every: int = 50) -> int:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    tokens = 0
    lock = threading.Lock()
    started = time.monotonic()

    def one(req: dict) -> None:
        nonlocal tokens
        got = send(client, model, req)
        with lock:
            tokens += got
            if sampler is not None:
                sampler.requests_done += 1
                done = sampler.requests_done
                if done % progress_every == 0:
                    print(f"  {done} requests, {tokens} tokens, {time.monotonic() - started:.0f} s", flush=True)

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(one, req) for req in plan]:
            future.result()  # a failed request fails the benchmark: its memory would not be representative
    return tokens


def measure_node(model_dir: str, args: argparse.Namespace) -> dict:
    import httpx

    from openhydra.testing.processes import NodeProcess

    work = Path(tempfile.mkdtemp(prefix="bench-node-memory-"))
    overrides = ["model=local", f"model.path={model_dir}", f"node.data_dir={work / 'data'}",
                 "api.rate_limit_requests=1000000", *args.override]
    # An empty user config dir: no auto-promotion override from this machine's ~/.config changes the config.
    node = NodeProcess(overrides, threads=args.threads, env={"OPENHYDRA_CONFIG_DIR": str(work / "config")},
                       log_path=work / "node.log")
    lo, hi = (int(x) for x in args.max_tokens.split("-"))
    with node:
        status = httpx.get(node.url + "/v1/network/status", timeout=30).json()
        model, dtype = status["model"]["id"], status["model"]["dtype"]
        print(f"node ready: {model} {dtype} ({status['model'].get('dtype_reason')}); log {node.log_path}", flush=True)
        sampler = Sampler(node.proc.pid, args.interval, node.url + "/v1/network/status")
        idle = sampler.read()
        warm_tokens = run_requests(node.url, model, request_plan(args.warmup, (lo, hi), seed=1), args.concurrency,
                                   None)
        sampler.requests_done = 0
        warm = sampler.read()
        print(f"after {args.warmup} warm-up requests ({warm_tokens} tokens): RSS {warm.rss / MB:.0f} MB "
              f"PSS {warm.pss / MB:.0f} MB", flush=True)
        sampler.start()
        t0 = time.monotonic()
        tokens = run_requests(node.url, model, request_plan(args.requests, (lo, hi), seed=2), args.concurrency,
                              sampler)
        elapsed = time.monotonic() - t0
        sampler.stop()
        final = sampler.read()
        after = httpx.get(node.url + "/v1/network/status", timeout=30).json()
    peak = max(sampler.samples, key=lambda s: s.rss)
    return {
        "model": model, "dtype": dtype, "dtype_reason": status["model"].get("dtype_reason"),
        "overrides": overrides, "requests": args.requests, "warmup_requests": args.warmup,
        "completion_tokens": tokens, "seconds": elapsed, "idle": asdict(idle), "after_warmup": asdict(warm),
        "after_requests": asdict(final), "peak": asdict(peak), "serving": after.get("serving"),
        "samples": [asdict(s) for s in sampler.samples],
    }


def transformers_child(model_dir: str, dtype_name: str) -> None:
    """The plain process: load the folder, two generate calls, say READY, wait to be measured and closed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).eval()
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"GEN {question!r} -> {reply!r}", flush=True)
    gc.collect()
    print(f"READY {model.dtype}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin


def measure_transformers(model_dir: str, dtype: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, __file__, "--transformers-child", model_dir, dtype], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # blocks until the child speaks; it exits (EOF) if loading fails
            lines.append(line.rstrip())
            print("  transformers:", line.rstrip(), flush=True)
            if line.startswith("READY"):
                break
        else:
            raise RuntimeError(f"the transformers process exited with {proc.wait()}: {lines}")
        rss, pss, uss, count = tree_memory(proc.pid)
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=60)
    return {"dtype": dtype, "rss": rss, "pss": pss, "uss": uss, "processes": count, "log": lines}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    node, plain = result["node"], result["transformers"]
    samples = node["samples"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot([s["requests_done"] for s in samples], [s["rss"] / MB for s in samples], "-", label="node RSS")
    ax.plot([s["requests_done"] for s in samples], [s["pss"] / MB for s in samples], "-", label="node PSS")
    cache = [(s["requests_done"], s["prefix_cache_bytes"] / MB) for s in samples if s["prefix_cache_bytes"] is not None]
    if cache:
        ax.plot(*zip(*cache, strict=True), "-", color="tab:green", linewidth=1, label="node prefix cache")
    ax.axhline(plain["rss"] / MB, color="k", linestyle="--", label="plain transformers RSS")
    ax.axhline(plain["pss"] / MB, color="gray", linestyle=":", label="plain transformers PSS")
    ax.axhline(1.3 * plain["rss"] / MB, color="tab:red", linestyle="-.", linewidth=0.8, label="1.3x transformers RSS")
    ax.set_xlabel("requests served (after warm-up)")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ratio = result["ratio_rss"]
    ax.set_title(f"SmolLM2-135M {node['dtype']}: node / transformers RSS = {ratio:.2f}x", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.text(0.01, 0.01, result["banner"][:150], fontsize=5.5, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--transformers-child":
        transformers_child(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="smollm2", help="smollm2 (default), tiny, or a folder")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", default="8-16", help="each request's max_tokens, uniform in LO-HI")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both processes")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--override", action="append", default=[], help="an extra node override (repeatable)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "bench_node_memory.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_node_memory.png"))
    args = parser.parse_args()

    model_dir = bench_model_dir(args.model_dir)
    print(machine_banner(), flush=True)
    node = measure_node(model_dir, args)
    plain = measure_transformers(model_dir, node["dtype"], args.threads)
    banner = machine_banner()
    result = {"model_dir": model_dir, "banner": banner, "threads": args.threads, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "node": node, "transformers": plain,
              "ratio_rss": node["after_requests"]["rss"] / plain["rss"],
              "ratio_pss": node["after_requests"]["pss"] / plain["pss"],
              "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OPENHYDRA_MALLOC_"))}}

    rows = [(f"node after {args.warmup} warm-up requests", node["after_warmup"]),
            (f"node after {args.requests} requests", node["after_requests"]),
            ("node peak (sampled)", node["peak"]),
            (f"plain transformers ({plain['dtype']}, 2 generate calls)", plain)]
    print(f"\n{banner}")
    print(f"node: {node['requests']} requests, {node['completion_tokens']} completion tokens in "
          f"{node['seconds']:.0f} s ({args.concurrency} at a time, max_tokens {args.max_tokens}); prefix cache "
          f"{(node['serving'] or {}).get('prefix_cache')}; malloc env {result['malloc_env'] or 'default'}")
    print("\n| process | RSS MB | PSS MB | USS MB | prefix cache MB |\n|---|---|---|---|---|")
    for name, m in rows:
        cache = m.get("prefix_cache_bytes")
        print(f"| {name} | {m['rss'] / MB:.0f} | {m['pss'] / MB:.0f} | {m['uss'] / MB:.0f} | "
              f"{'-' if cache is None else f'{cache / MB:.0f}'} |")
    print(f"| ratio node after {args.requests} / transformers | {result['ratio_rss']:.2f}x | "
          f"{result['ratio_pss']:.2f}x | {node['after_requests']['uss'] / plain['uss']:.2f}x | |")
    cache = node["after_requests"].get("prefix_cache_bytes") or 0
    result["ratio_rss_without_prefix_cache"] = (node["after_requests"]["rss"] - cache) / plain["rss"]
    print(f"node RSS less its prefix cache ({cache / MB:.0f} MB, bounded by serving.prefix_cache.max_mb and "
          f"max_fraction_of_weights) / transformers: {result['ratio_rss_without_prefix_cache']:.2f}x")
    print(f"goal <= 1.3x (RSS): {'met' if result['ratio_rss'] <= 1.3 else 'NOT met'}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"json: {args.json}")
    plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
