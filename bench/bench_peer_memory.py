"""Resident memory of real `openhydra-node` peers per span against the bytes of the span's weights (issue 17 item 4).

    python bench/bench_peer_memory.py [--model-dir smollm2] [--hardware cpu] [--requests 6] [--max-tokens 16]
                                      [--label NAME] [--sweep] [--before COMMIT]

1. A swarm on one machine: an HTTP DHT and three plain `openhydra-node` processes serving layers [0,10), [10,20),
   [20,30) of the embedded SmolLM2-135M (hardware=cpu, float32, the default privacy=encrypted), each its own fresh
   interpreter. ``--requests`` greedy chat completions go through the first node's API (the coordinator). Then each
   node's RSS, PSS and USS are read from /proc/<pid>/smaps and split into the weight file it maps, anonymous memory
   (Python heap, copied tensors, KV caches) and shared libraries. The nodes are stopped.
2. One node serving the full model alone, the same requests, measured the same way. ``--before COMMIT`` runs only
   this step, for a node of COMMIT (a git worktree) and of this checkout, alternated twice.
3. Where the memory goes, per span: a fresh interpreter imports what a node imports, group by group, loads the span
   as the node does (``ShardRuntime`` and, on a node that does not hold the first layers, the coordinator's
   embedding table), runs a prompt and 16 decode steps, reading USS/PSS/RSS after each step; the tensors the
   runtime holds are split into views of the mapped weight file and private copies
   (openhydra/runtime/residency.py).

The span's weight bytes: the checkpoint tensors the span needs in the runtime dtype (its decoder layers, the
embedding table on the first span, the final norm and the LM head on the last; SmolLM2 ties the head to the
embeddings, so the last span needs the table too). With ``--hardware cpu_int4`` or ``cpu_int8`` the nodes quantize
their spans at load, and a span's weight bytes are what the node reports it holds (``size`` in
GET /api/tags: the quantized weights and their scales). With ``--hardware cpu_fast`` (bf16 on the library) the nodes
run bfloat16 and hold their weights in the library's packed copy: again the bytes the node reports. Target: PSS <=
weight bytes + 150 MiB. MiB = 2**20 bytes. The per-span breakdown (step 3) loads fp32 spans whatever the tier.
Prints the machine banner (load average) at start and end, writes JSON (--json) and a plot (--plot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from common import bench_model_dir, machine_banner  # noqa: E402

MIB = 2**20
TARGET_MIB = 150
SPLITS = ((0, 10), (10, 20), (20, 30))
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colours.",
           "Why is the sky blue? One sentence.", "Count from one to five.", "What do bees make?"]


def span_weight_bytes(model_dir: str, start: int, end: int) -> int:
    """Bytes of the checkpoint tensors layers [start, end) need (tied head counted once on a full span)."""
    from openhydra.runtime.shard_layers import load_text_config
    from openhydra.runtime.weights import CheckpointIndex, split_layer_name

    config = load_text_config(model_dir)
    total = config.num_hidden_layers
    index = CheckpointIndex.open(model_dir)
    tied = index.head_is_tied(bool(getattr(config, "tie_word_embeddings", False)))
    prefix = index.text_prefix
    names: set[str] = set()
    for name in index.weight_map:
        canonical = name[len(prefix):] if name.startswith(prefix) else name
        layer = split_layer_name(canonical)
        if layer is not None:
            if start <= layer[0] < end:
                names.add(name)
        elif _non_layer_needed(canonical, start == 0, end == total, tied):
            names.add(name)
    if end == total and not tied:
        names.add(index.source_name("lm_head.weight"))
    return index.tensor_bytes(sorted(names))


def _non_layer_needed(canonical: str, first: bool, last: bool, tied: bool) -> bool:
    if canonical == "embed_tokens.weight":
        return first or (last and tied)
    return last and canonical.startswith("norm.")


def node_memory(pid: int) -> dict:
    """smaps parts of the node process, plus the RSS/PSS/USS of any child processes it has."""
    import psutil

    from openhydra.runtime.residency import smaps_breakdown

    parts = {k: v.model_dump() for k, v in smaps_breakdown(pid).items()}
    children = {"rss": 0, "pss": 0, "uss": 0, "count": 0}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            info = child.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        children = {"rss": children["rss"] + info.rss, "pss": children["pss"] + info.pss,
                    "uss": children["uss"] + info.uss, "count": children["count"] + 1}
    return {"parts": parts, "children": children}


def chat(url: str, model: str, prompt: str, max_tokens: int, deadline_s: float = 180.0) -> str:
    """One greedy chat completion; retried while the swarm is still discovering its peers."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0}
    deadline = time.monotonic() + deadline_s
    while True:
        resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
        if resp.status_code == 200:
            return resp.json()["choices"][0]["message"]["content"]
        if time.monotonic() > deadline:
            raise RuntimeError(f"chat failed: {resp.status_code} {resp.text[:300]}")
        time.sleep(1.0)


def run_requests(url: str, args: argparse.Namespace) -> dict:
    """``args.requests`` chat completions through the node at ``url``; its /v1/network/status."""
    import httpx

    status = httpx.get(url + "/v1/network/status", timeout=30).json()
    replies = [chat(url, status["model"]["id"], PROMPTS[i % len(PROMPTS)], args.max_tokens)
               for i in range(args.requests)]
    print(f"  {len(replies)} replies, first: {replies[0]!r}", flush=True)
    time.sleep(2.0)  # let the sessions close on every hop (close is asynchronous)
    return status


def held_bytes(url: str) -> int:
    """The weight bytes the node at ``url`` says it holds (quantized ones with their scales): its Ollama model
    list's ``size``."""
    import httpx

    return int(httpx.get(url + "/api/tags", timeout=30).json()["models"][0]["size"])


def serve_and_measure(nodes: list, spans: list[tuple[int, int]], args: argparse.Namespace) -> list[dict]:
    from openhydra.testing.processes import start_all

    start_all(nodes, timeout_s=600)
    try:
        status = run_requests(nodes[0].url, args)
        rows = []
        for node, (start, end) in zip(nodes, spans, strict=True):
            mem = node_memory(node.proc.pid)
            rows.append({"span": [start, end], "dtype": status["model"]["dtype"], "held_bytes": held_bytes(node.url),
                         **mem})
        return rows
    finally:
        for node in nodes:
            node.stop()


def serve_sweep_and_measure(launcher, spans: list[tuple[int, int]], args: argparse.Namespace) -> list[dict]:
    """The sweep's job k serves its API on the launcher's api.port + k (openhydra/sweep.py). Each job's row gets
    ``launcher_pss``: the launcher's own PSS divided among its jobs (it holds the shared pages too)."""
    import psutil

    from openhydra.testing.processes import start_sweep

    try:
        pids = start_sweep(launcher, len(spans))
        status = run_requests(launcher.url, args)
        parent = psutil.Process(launcher.proc.pid).memory_full_info()
        rows = []
        for k, (pid, (start, end)) in enumerate(zip(pids, spans, strict=True)):
            mem = node_memory(pid)
            rows.append({"span": [start, end], "dtype": status["model"]["dtype"], "arm": "sweep",
                         "held_bytes": held_bytes(f"http://127.0.0.1:{launcher.port + k}"),
                         "launcher_pss": parent.pss / len(spans), "launcher_uss": parent.uss, **mem})
        return rows
    finally:
        launcher.stop()


def measure_processes(model_dir: str, args: argparse.Namespace) -> list[dict]:
    from openhydra.testing.processes import (
        DhtProcess,
        NodeProcess,
        consecutive_free_ports,
        swarm_node_overrides,
        sweep_overrides,
    )

    work = Path(tempfile.mkdtemp(prefix="bench-peer-memory-"))
    env = {"OPENHYDRA_CONFIG_DIR": str(work / "config"), **dict(e.split("=", 1) for e in args.env)}
    rows = []
    print("swarm of thirds:", flush=True)
    with DhtProcess() as dht:
        nodes = [NodeProcess([*swarm_node_overrides(Path(model_dir), dht.url, a, b, work / f"data{a}",
                                                    hardware=args.hardware, dtype=node_dtype(args)),
                              *args.override], env=env, log_path=work / f"node{a}.log", pow_bits=None)
                 for a, b in SPLITS]
        rows += serve_and_measure(nodes, list(SPLITS), args)
    if args.sweep:
        print("swarm of thirds, one `openhydra-node -m` sweep (its jobs forked from one process):", flush=True)
        with DhtProcess() as dht:
            launcher = NodeProcess([*sweep_overrides(Path(model_dir), dht.url, work / "data-sweep", len(SPLITS),
                                                     hardware=args.hardware, dtype=node_dtype(args)),
                                    *args.override], port=consecutive_free_ports(len(SPLITS)),
                                   env=env, log_path=work / "sweep.log", pow_bits=None)
            rows += serve_sweep_and_measure(launcher, list(SPLITS), args)
    print("full model alone:", flush=True)
    full = NodeProcess(full_node_overrides(model_dir, args, work / "data-full"), env=env,
                       log_path=work / "node-full.log", pow_bits=None)
    rows += serve_and_measure([full], [(0, SPLITS[-1][1])], args)
    held = args.hardware in ("cpu_int4", "cpu_int8", "cpu_fast")  # weights the node rewrote at load
    for row in rows:
        row["weight_bytes"] = row["held_bytes"] if held else span_weight_bytes(model_dir, *row["span"])
    return rows


def node_dtype(args: argparse.Namespace) -> str:
    """The nodes' hardware.dtype: bfloat16 for cpu_fast (its kernel is bf16), float32 activations otherwise."""
    return "bfloat16" if args.hardware == "cpu_fast" else "float32"


def full_node_overrides(model_dir: str, args: argparse.Namespace, data_dir: Path) -> list[str]:
    """A node serving the whole model alone on ``args.hardware`` (:func:`node_dtype`), ``--override`` last."""
    return ["model=local", f"model.path={model_dir}", f"hardware={args.hardware}",
            f"hardware.dtype={node_dtype(args)}",
            f"node.data_dir={data_dir}", "peer.port=0", *args.override]


def full_node_before_after(model_dir: str, commit: str, args: argparse.Namespace) -> list[dict]:
    """The full-model node of ``commit`` (a git worktree) and of this checkout, alternated twice, each alone with
    the same requests: its smaps parts (``--before``)."""
    from common import worktree

    from openhydra.testing.processes import NodeProcess

    work = Path(tempfile.mkdtemp(prefix="bench-peer-memory-before-"))
    rows = []
    with worktree(commit, work) as tree:
        for trial in range(2):
            for label, cwd, env in ((commit, tree, {"PYTHONPATH": str(tree)}), ("now", None, {})):
                overrides = ["discovery=off", *full_node_overrides(model_dir, args, work / f"data-{label}-{trial}")]
                node = NodeProcess(overrides, cwd=cwd, env=env, log_path=work / f"node-{label}-{trial}.log",
                                   pow_bits=None)
                rows += [{**row, "label": label, "trial": trial}
                         for row in serve_and_measure([node], [(0, SPLITS[-1][1])], args)]
    for row in rows:
        p = row["parts"]
        print(f"  full node at {row['label']} (trial {row['trial']}): RSS {p['total']['rss'] / MIB:.0f} MiB, PSS "
              f"{p['total']['pss'] / MIB:.0f}, weight file RSS {p['weights']['rss'] / MIB:.0f} / PSS "
              f"{p['weights']['pss'] / MIB:.0f}, anonymous PSS {p['anonymous']['pss'] / MIB:.0f}", flush=True)
    return rows


# ---------------------------------------------------------------- where the memory goes (one fresh interpreter)


TRACED_IMPORTS = ("torch._dynamo", "torch.distributed.tensor", "sympy", "scipy")
"""Heavy modules whose first importer step 3 records (the file and line of the import statement)."""


class _FirstImporter:
    """A meta path finder that finds nothing and records where each of :data:`TRACED_IMPORTS` is first imported
    (the import statement's frame; importlib's own frames skipped, availability probes with
    ``importlib.util.find_spec`` not counted)."""

    def __init__(self) -> None:
        self.importers: dict[str, str] = {}

    def find_spec(self, name: str, path=None, target=None):  # importlib's protocol
        if name in TRACED_IMPORTS and name not in self.importers:
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                         or frame.f_code.co_filename.endswith("importlib/__init__.py")):
                frame = frame.f_back
            if frame is not None and not frame.f_code.co_filename.endswith("importlib/util.py"):  # not a probe
                where = frame.f_code.co_filename.split("site-packages/")[-1]
                self.importers[name] = f"{where}:{frame.f_lineno}"
        return None


def _anonymous_bytes() -> int:
    """Anonymous memory of this process (kB in /proc/self/smaps_rollup): what no file backs, so what no other process
    can share, whatever else runs on the machine (unlike USS, which counts a library's pages only while no other
    process maps them)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


def breakdown_child(model_dir: str, start: int, end: int) -> None:
    import importlib

    import psutil

    tracer = _FirstImporter()
    sys.meta_path.insert(0, tracer)
    proc = psutil.Process()
    steps: list[dict] = []

    def mark(name: str, **extra) -> None:
        info = proc.memory_full_info()
        steps.append({"step": name, "rss": info.rss, "pss": info.pss, "uss": info.uss, "anon": _anonymous_bytes(),
                      "modules": len(sys.modules), **extra})

    mark("bare interpreter")
    import torch

    torch.set_num_threads(1)
    mark("import torch")
    if os.environ.get("BENCH_SPLIT_DYNAMO") == "1":  # --split-dynamo: its cost on a line of its own
        importlib.import_module("torch._dynamo")
        mark("import torch._dynamo (the modeling code's import of it, first)")
    from openhydra.runtime.lean_imports import skip_unused_optional_imports

    skip_unused_optional_imports()  # as openhydra-node's cli.run does first (a no-op on older commits' nodes)
    importlib.import_module("transformers")
    mark("import transformers")
    from openhydra.runtime.shard_layers import build_shard  # noqa: F401  (the modeling imports come with loading)

    mark("import openhydra.runtime")
    from transformers import AutoModelForCausalLM

    from openhydra.runtime.shard_layers import load_text_config

    with torch.device("meta"):  # the model's modeling code, imported as the node imports it (no weights)
        AutoModelForCausalLM.from_config(load_text_config(model_dir))
    mark("transformers modeling code (meta skeleton)")
    heavy = ("sympy", "scipy", "torch._dynamo", "accelerate", "kernels", "PIL", "sanic", "grpc", "hydra",
             "sqlmodel", "sqlalchemy", "hivemind", "mlx", "bitsandbytes", "psycopg")
    for module in ("openhydra.cli", "openhydra.node", "openhydra.peer.server", "openhydra.peer.client",
                   "openhydra.api.app"):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    mark("import the node's modules")
    from openhydra.runtime.residency import tensor_residency
    from openhydra.runtime.shard import ShardRuntime

    rt = ShardRuntime(model_dir, start, end, dtype=torch.float32)
    held = tensor_residency(rt.modules)
    mark("load the span (ShardRuntime)", loaded_bytes=rt.loaded_bytes, mapped_bytes=held.mapped_bytes,
         private_bytes=held.private_bytes)
    if not rt.is_first:
        from openhydra.peer.embedding import load_embedder

        embed = load_embedder(model_dir, torch.float32)
        cells = [c.cell_contents for c in (getattr(embed, "__closure__", None) or ())]  # older: a closure
        table = getattr(embed, "table", None)
        if table is None:
            table = next((c for c in cells if isinstance(c, torch.Tensor)), None)
        extra = {}
        if table is not None:
            res = tensor_residency([table])
            extra = {"mapped_bytes": res.mapped_bytes, "private_bytes": res.private_bytes}
        mark("coordinator's embedding table (not first span)", **extra)
    ids = torch.arange(100, 132)
    h = None if rt.is_first else torch.randn(32, rt.hidden_size)
    rt.forward("bench", torch.arange(32), input_ids=ids if rt.is_first else None, hidden_states=h)
    for pos in range(32, 48):
        if rt.is_first:
            rt.forward("bench", torch.tensor([pos]), input_ids=torch.tensor([pos]))
        else:
            rt.forward("bench", torch.tensor([pos]), hidden_states=torch.randn(1, rt.hidden_size))
    mark("prompt 32 + 16 decode steps (KV, workspace, touched pages)")
    rt.close_session("bench")
    mark("session closed")
    steps.append({"heavy_modules_loaded": sorted(m for m in heavy if m in sys.modules),
                  "first_importers": tracer.importers})
    print("BREAKDOWN " + json.dumps(steps), flush=True)


def measure_breakdown(model_dir: str, start: int, end: int, env_extra: dict[str, str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra}
    out = subprocess.run([sys.executable, __file__, "--breakdown-child", model_dir, str(start), str(end)], env=env,
                         capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("BREAKDOWN "):
            return json.loads(line[len("BREAKDOWN "):])
    raise RuntimeError(f"breakdown child failed ({out.returncode}): {out.stderr[-2000:]}")


# ---------------------------------------------------------------- report


def plot(results: list[dict], path: Path) -> None:
    """Stacked PSS parts per span, one bar per run (e.g. before and after), with the weight bytes and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key(r: dict) -> tuple:
        return (*r["span"], r.get("arm", ""))

    spans = [key(r) for r in results[-1]["processes"]]
    labels = [f"[{a},{b})" + (" full" if (a, b) == (0, SPLITS[-1][1]) else "") + (f"\n{arm}" if arm else "")
              for a, b, arm in spans]
    width = 0.8 / len(results)
    colors = {"weights": "tab:blue", "anonymous": "tab:orange", "libraries": "tab:gray", "other": "tab:olive",
              "launcher share": "tab:purple"}
    fig, ax = plt.subplots(figsize=(10, 4.6))
    top = 0.0
    for k, result in enumerate(results):
        rows = {key(r): r for r in result["processes"]}
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(spans))]
        bottom = [0.0] * len(spans)
        for name, color in colors.items():
            values = [(rows[s].get("launcher_pss", 0.0) if name == "launcher share" else rows[s]["parts"][name]["pss"])
                      / MIB if s in rows else 0.0 for s in spans]
            ax.bar(xs, values, width * 0.95, bottom=bottom, color=color, alpha=0.4 + 0.6 * k / max(1, len(results) - 1),
                   label=f"PSS {name}" if k == len(results) - 1 else None)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for x, total in zip(xs, bottom, strict=True):
            if len(results) > 1:  # which run each bar is
                ax.text(x, total + 8, result["label"], ha="center", va="bottom", fontsize=7, rotation=90)
        top = max(top, *bottom)
    weights = [span_bytes / MIB for span_bytes in (results[-1]["processes"][i]["weight_bytes"]
                                                   for i in range(len(spans)))]
    ax.scatter(range(len(spans)), [w + TARGET_MIB for w in weights], marker="_", s=1500, color="tab:red", zorder=3,
               label=f"target: weight bytes + {TARGET_MIB} MiB")
    ax.scatter(range(len(spans)), weights, marker="_", s=1500, color="k", zorder=3, label="span's weight bytes")
    ax.set_xticks(range(len(spans)), labels)
    ax.set_ylim(0, top * 1.45)
    ax.set_ylabel("MiB")
    tier = results[-1].get("hardware", "cpu")
    ax.set_title(f"SmolLM2-135M peers, hardware={tier} (real openhydra-node processes): PSS per span", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.text(0.01, 0.01, results[-1]["banner_start"][:150], fontsize=5.5, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def report(result: dict) -> None:
    print("\n| span | weight MiB | RSS MiB | PSS MiB | USS MiB | PSS: weight file / anonymous / libraries | "
          "PSS ÷ weights | PSS - weights (target ≤ 150) |\n|---|---|---|---|---|---|---|---|")
    for r in result["processes"]:
        t, p, w = r["parts"]["total"], r["parts"], r["weight_bytes"]
        share = r.get("launcher_pss", 0)
        over = (t["pss"] + share - w) / MIB
        arm = f" sweep (+{share / MIB:.0f} launcher share)" if r.get("arm") == "sweep" else ""
        print(f"| [{r['span'][0]},{r['span'][1]}){arm} | {w / MIB:.0f} | {t['rss'] / MIB:.0f} | "
              f"{(t['pss'] + share) / MIB:.0f} | "
              f"{t['uss'] / MIB:.0f} | {p['weights']['pss'] / MIB:.0f} / {p['anonymous']['pss'] / MIB:.0f} / "
              f"{p['libraries']['pss'] / MIB:.0f} | {(t['pss'] + share) / w:.2f}x | {over:.0f} "
              f"({'met' if over <= TARGET_MIB else 'not met'}) |")
    for span, steps in result["breakdown"].items():
        print(f"\nbreakdown {span} (fresh interpreter; deltas of anonymous memory / USS / RSS in MiB):")
        prev = None
        for s in steps:
            if "step" not in s:
                print(f"  heavy modules loaded: {s['heavy_modules_loaded']}")
                for module, where in s.get("first_importers", {}).items():
                    print(f"  {module} first imported by {where}")
                continue
            d_anon = (s.get("anon", 0) - prev.get("anon", 0)) / MIB if prev else s.get("anon", 0) / MIB
            d_uss = (s["uss"] - prev["uss"]) / MIB if prev else s["uss"] / MIB
            d_rss = (s["rss"] - prev["rss"]) / MIB if prev else s["rss"] / MIB
            extra = ""
            if "mapped_bytes" in s:
                extra = (f"  tensors: {s['mapped_bytes'] / MIB:.0f} MiB mapped, "
                         f"{s['private_bytes'] / MIB:.0f} MiB private")
            print(f"  {s['step']:58s} anon +{d_anon:6.1f} USS +{d_uss:6.1f} RSS +{d_rss:6.1f} "
                  f"(USS {s['uss'] / MIB:6.1f}, modules {s['modules']}){extra}")
            prev = s


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--breakdown-child":
        breakdown_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="smollm2")
    parser.add_argument("--hardware", default="cpu", choices=["cpu", "cpu_int4", "cpu_int8", "cpu_fast"],
                        help="the nodes' hardware tier (float32 activations; cpu_fast: bfloat16); the quantized "
                             "tiers and cpu_fast count the bytes the node holds")
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--label", default="now", help="name of this run in the JSON and plot")
    parser.add_argument("--override", action="append", default=[], help="an extra node override (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the nodes (repeatable)")
    parser.add_argument("--sweep", action="store_true",
                        help="also start the three thirds as one `openhydra-node -m` sweep (forked jobs)")
    parser.add_argument("--skip-processes", action="store_true", help="only the per-span breakdown")
    parser.add_argument("--split-dynamo", action="store_true",
                        help="step 3 imports torch._dynamo right after torch, so its cost is a line of its own "
                             "(its first importer is then this bench)")
    parser.add_argument("--before", default=None, metavar="COMMIT",
                        help="only a full-model node of COMMIT against this checkout's, alternated twice")
    parser.add_argument("--compare", action="append", default=[], help="an earlier run's JSON to plot beside this")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "bench_peer_memory.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_peer_memory.png"))
    args = parser.parse_args()

    model_dir = bench_model_dir(args.model_dir)
    banner = machine_banner()
    print(banner, flush=True)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result: dict = {"label": args.label, "commit": commit, "banner_start": banner, "model_dir": model_dir,
                    "hardware": args.hardware,
                    "requests": args.requests, "max_tokens": args.max_tokens, "processes": [], "breakdown": {}}
    if args.before:
        print(f"full-model node, hardware={args.hardware}: {args.before} against this checkout", flush=True)
        full_node_before_after(model_dir, args.before, args)
        print(f"end: {machine_banner()}")
        return
    if not args.skip_processes:
        result["processes"] = measure_processes(model_dir, args)
    env_extra = dict(e.split("=", 1) for e in args.env)
    if args.split_dynamo:
        env_extra["BENCH_SPLIT_DYNAMO"] = "1"
    for a, b in (*SPLITS, (0, SPLITS[-1][1])):
        result["breakdown"][f"[{a},{b})"] = measure_breakdown(model_dir, a, b, env_extra)
    result["banner_end"] = machine_banner()
    report(result)
    print(f"\nstart: {banner}\nend:   {result['banner_end']}\ncommit {commit}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"json: {args.json}")
    if result["processes"]:
        plot([*(json.loads(Path(p).read_text()) for p in args.compare), result], Path(args.plot))


if __name__ == "__main__":
    main()
