"""One OpenHydra node's streaming decode vs llama.cpp (node-llama-cpp) on the same embedded SmolLM2 Q4_1 GGUF.

    python bench/bench_llamacpp.py [--trials 5] [--tokens 64] [--threads 1] [--arms cpu_int4,cpu_int8,cpu]
                                   [--isa native|avx2]

- llama.cpp: the prebuilt ``node-llama-cpp`` npm package (pinned 3.21.1), installed by this script under a scratch
  folder (``--scratch``, default ``~/.cache/openhydra/bench-llamacpp``) with ``npm i -E``; it needs ``node``/``npm``
  and the npm registry, nothing in the repo depends on it. One persistent ``node`` process loads the GGUF (CPU only,
  ``--threads`` threads) and, per trial, evaluates the chat prompt and 64 greedy tokens on a fresh sequence.
- OpenHydra: one ``openhydra-node model=smollm2-135m hardware=<arm> hardware.threads=<threads>`` process per arm,
  as a user runs it, driven by the official ``openai`` client streaming ``--tokens`` greedy tokens.

``--isa avx2`` runs both as on a CPU with AVX2 and no AVX-512, on this one: llama.cpp from a scratch folder whose
CPU backends stop at ggml's ``haswell`` variant (AVX2, FMA, F16C; the others removed, so ggml's loader cannot pick
an AVX-512 one), the node with its low-bit kernel built for ``-march=x86-64-v3`` (``OPENHYDRA_LOWBIT_MARCH``) and
PyTorch held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``). Which ggml CPU backend llama.cpp mapped and the node's
``model.kernel`` are printed. The same silicon runs both, so it shows the code paths, not an AVX2 machine's speed.

Both report decode tok/s = (tokens - 1) / (time of last token - time of first token) (prefill excluded), trials
interleaved A/B/C (order alternating), medians of ``--trials``. Also the share of the memory-bandwidth roofline
per arm: tok/s x bytes read per token / copy bandwidth (bench/bench_roofline.py's ``copy_bandwidth`` and K/V
bytes), where bytes per token are the GGUF's tensor bytes for llama.cpp and the ShardRuntime's loaded bytes for
the node. Load average, CPU flags and versions are printed with the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_roofline import copy_bandwidth, kv_bytes_per_token  # noqa: E402
from common import machine_banner, medians, plot_trials, print_table, run_interleaved  # noqa: E402

NODE_LLAMA_CPP = "node-llama-cpp@3.21.1"
MODEL_NAME = "openhydra-smollm2-135m"
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
DTYPE_OF = {"cpu": "float32", "cpu_int8": "float32", "cpu_int4": "float32"}  # pinned: same dtype in every run
QUANT_OF = {"cpu": "none", "cpu_int8": "int8", "cpu_int4": "int4"}

RUNNER_JS = r"""
import {getLlama} from "node-llama-cpp";
import readline from "node:readline";
const [modelPath, threads] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never"});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const context = await model.createContext({contextSize: 1024, threads: Number(threads), batchSize: 512});
console.log(JSON.stringify({ready: true, threads: context.currentThreads ?? Number(threads)}));
const rl = readline.createInterface({input: process.stdin});
for await (const line of rl) {
  const req = JSON.parse(line);
  const sequence = context.getSequence();
  const tokens = model.tokenize(req.prompt, true);
  const stamps = [];
  for await (const token of sequence.evaluate(tokens, {temperature: 0})) {
    stamps.push(performance.now());
    if (stamps.length >= req.tokens) break;
  }
  sequence.dispose();
  const rate = (stamps.length - 1) / ((stamps[stamps.length - 1] - stamps[0]) / 1000);
  console.log(JSON.stringify({rate, n: stamps.length, prompt_tokens: tokens.length}));
}
"""


def install_node_llama_cpp(scratch: Path) -> Path:
    """``npm i -E node-llama-cpp@3.21.1`` under ``scratch`` (once); returns the runner script's path."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_llamacpp: needs {tool} on PATH (apt-get install nodejs npm)")
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / "node_modules" / "node-llama-cpp" / "package.json").exists():
        if not (scratch / "package.json").exists():
            (scratch / "package.json").write_text(json.dumps({"name": "bench-llamacpp", "private": True}))
        print(f"installing {NODE_LLAMA_CPP} under {scratch}", flush=True)
        subprocess.run(["npm", "i", "-E", NODE_LLAMA_CPP, "--no-audit", "--no-fund"], cwd=scratch, check=True)
    version = json.loads((scratch / "node_modules" / "node-llama-cpp" / "package.json").read_text())["version"]
    print(f"node-llama-cpp {version}, node {subprocess.check_output(['node', '--version'], text=True).strip()}")
    runner = scratch / "runner.mjs"
    runner.write_text(RUNNER_JS)
    return runner


AVX2_VARIANTS = ("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell")
"""ggml's x86 CPU backends that need no more than AVX2 + FMA + F16C (``--isa avx2`` keeps only these)."""


def keep_avx2_backends(scratch: Path) -> list[str]:
    """Remove the ggml CPU backends beyond AVX2 from ``scratch``'s node-llama-cpp binaries; the ones kept."""
    kept = []
    for lib in (scratch / "node_modules" / "@node-llama-cpp").glob("linux-x64*/bins/*/libggml-cpu-*.so"):
        variant = lib.name.removeprefix("libggml-cpu-").removesuffix(".so")
        if variant in AVX2_VARIANTS:
            kept.append(variant)
        else:
            lib.unlink()
    return sorted(set(kept))


class LlamaCpp:
    """A persistent node-llama-cpp process: one JSON request per line in, one JSON result per line out."""

    def __init__(self, runner: Path, gguf: Path, threads: int) -> None:
        self.proc = subprocess.Popen(["node", str(runner), str(gguf), str(threads)], cwd=runner.parent,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = json.loads(self._line())
        print(f"llama.cpp ready: {first}; ggml CPU backend {self.cpu_backend()}", flush=True)

    def cpu_backend(self) -> str:
        """The ``libggml-cpu-*.so`` variant this process mapped (ggml picks the best one the CPU runs)."""
        maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        found = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "libggml-cpu-" in line}
        return ", ".join(sorted(found)) or "none found"

    def _line(self) -> str:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("node-llama-cpp runner exited")
            if line.startswith("{"):
                return line

    def decode_rate(self, prompt: str, tokens: int) -> float:
        self.proc.stdin.write(json.dumps({"prompt": prompt, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())["rate"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def node_decode_rate(client, tokens: int) -> float:
    """Streaming chat completion through the official openai client; decode tok/s excluding the first token."""
    stamps: list[float] = []
    stream = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=tokens, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def gguf_tensor_bytes(gguf: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default="cpu_int4,cpu_int8,cpu", help="hardware= options of the node arms")
    parser.add_argument("--isa", default="native", choices=["native", "avx2"],
                        help="avx2: both sides as on a CPU without AVX-512 (see above)")
    parser.add_argument("--scratch", type=Path, help="node-llama-cpp's folder (default "
                        "~/.cache/openhydra/bench-llamacpp, or bench-llamacpp-avx2 with --isa avx2)")
    parser.add_argument("--plot", default=str(REPO / "docs" / "img" / "bench_llamacpp.png"))
    args = parser.parse_args()
    if args.scratch is None:
        suffix = "-avx2" if args.isa == "avx2" else ""
        args.scratch = Path(f"~/.cache/openhydra/bench-llamacpp{suffix}").expanduser()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.isa == "avx2":  # before torch is imported, here and in the node processes (they inherit it)
        os.environ["ATEN_CPU_CAPABILITY"] = "avx2"
        os.environ["OPENHYDRA_LOWBIT_MARCH"] = "x86-64-v3"
    import httpx
    import torch
    from openai import OpenAI
    from transformers import AutoTokenizer

    from openhydra.runtime.shard import ShardRuntime
    from openhydra.runtime.source import embedded_gguf_path, embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT
    from openhydra.testing.processes import NodeProcess

    torch.set_num_threads(args.threads)
    print(machine_banner(), flush=True)
    runner = install_node_llama_cpp(args.scratch)
    if args.isa == "avx2":
        print(f"ggml CPU backends kept: {keep_avx2_backends(args.scratch)}", flush=True)
    gguf = embedded_gguf_path()
    model_dir = embedded_model_dir(TEST_CACHE_ROOT)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    node_arms = args.arms.split(",")

    # Bytes each arm reads per decoded token (weights + K/V at the mean position), for the roofline share.
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    mean_position = prompt_tokens + args.tokens // 2
    per_token: dict[str, int] = {}
    for arm in node_arms:
        rt = ShardRuntime(model_dir, dtype=getattr(torch, DTYPE_OF[arm]), quantization=QUANT_OF[arm])
        per_token[f"node {arm}"] = rt.loaded_bytes + kv_bytes_per_token(rt, mean_position)
        kv_f16 = kv_bytes_per_token(rt, mean_position) * 2 // rt.dtype.itemsize  # llama.cpp's K/V cache is f16
        del rt
    per_token["llama.cpp Q4_1"] = gguf_tensor_bytes(gguf) + kv_f16

    nodes = {arm: NodeProcess(["model=smollm2-135m", f"hardware={arm}", f"hardware.dtype={DTYPE_OF[arm]}",
                               f"hardware.threads={args.threads}", "api.rate_limit_requests=100000"],
                              threads=args.threads)
             for arm in node_arms}
    llama = None
    load_before = os.getloadavg()
    try:
        for node in nodes.values():
            node.start()
        for node in nodes.values():
            node.wait_ready()
        for arm, node in nodes.items():
            status = httpx.get(node.url + "/v1/network/status", timeout=10).json()["model"]
            print(f"node {arm}: dtype {status['dtype']}, kernel {status.get('kernel')}", flush=True)
        clients = {arm: OpenAI(base_url=node.url + "/v1", api_key="none", timeout=600) for arm, node in nodes.items()}
        llama = LlamaCpp(runner, gguf, args.threads)
        arms = {"llama.cpp Q4_1": lambda: llama.decode_rate(prompt, args.tokens)}
        for arm, client in clients.items():
            arms[f"node {arm}"] = lambda client=client: node_decode_rate(client, args.tokens)
        for fn in arms.values():  # warm-up
            fn()
        rates = run_interleaved(arms, args.trials)
        bandwidth = copy_bandwidth()
    finally:
        if llama is not None:
            llama.close()
        for node in nodes.values():
            node.stop()
    load_after = os.getloadavg()
    med = medians(rates)
    print_table(rates)
    ref = med["llama.cpp Q4_1"]
    print(f"\nmemory bandwidth (copy, 1 thread): {bandwidth / 1e9:.1f} GB/s")
    print("\n| arm | decode tok/s (median) | ÷ llama.cpp | MB read per token | roofline share |\n|---|---|---|---|---|")
    for name in rates:
        print(f"| {name} | {med[name]:.1f} | {med[name] / ref:.2f} | {per_token[name] / 1e6:.1f} | "
              f"{med[name] * per_token[name] / bandwidth:.2f} |")
    print(f"\nload average before {load_before}, after {load_after}; {machine_banner()}")
    print(f"[threads={args.threads}, tokens={args.tokens}, trials={args.trials}, prompt tokens={prompt_tokens}]")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_trials(rates, f"SmolLM2-135M, {args.threads} thread: node {node_arms[0]} ÷ llama.cpp = "
                f"{med[f'node {node_arms[0]}'] / ref:.2f}", args.plot)
    print(json.dumps({"medians": med, "bytes_per_token": per_token, "bandwidth": bandwidth,
                      "loadavg": [load_before, load_after]}))


if __name__ == "__main__":
    sys.exit(main())
