"""A long prompt through the README's three-node swarm, with the default config, against one node.

Starts the README's swarm (an HTTP DHT and three nodes holding thirds of the embedded SmolLM2, everything
else default) and one node holding the whole model, sends the same ~N-token prompt to both through the
official ``openai`` client (greedy), and checks that the answers are identical, that the swarm completed
without a failover, and how long the prompt took. Prints the load average, CPU and versions.

    python bench/bench_long_prompt.py --prompt-tokens 4000 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import itertools

from bench.common import bench_model_dir, machine_banner
from openhydra.testing.failover import metric
from openhydra.testing.processes import DhtProcess, NodeProcess, start_all

DATA = Path(__file__).parent / "data"


def long_prompt(model_dir: Path, tokens: int) -> str:
    """About ``tokens`` tokens of the bench documents, then a question about them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n\n".join((DATA / f"doc_{c}.txt").read_text() for c in "abcd")
    ids = tokenizer(text)["input_ids"][: tokens - 40]
    return tokenizer.decode(ids) + "\n\nIn two sentences, what are the documents above about?"


def ask(node: NodeProcess, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0, timeout=900)
    model = client.models.list().data[0].id
    began = time.monotonic()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content, time.monotonic() - began, reply.usage.prompt_tokens


def node_args(model_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    # the README's commands, with this machine's embedded-model folder and free ports
    return ["model=local", f"model.path={model_dir}", "hardware=cpu", f"node.data_dir={data_dir}", "peer.port=0",
            *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model_dir = Path(bench_model_dir(args.model_dir))
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    cuts = [0, layers // 3, 2 * layers // 3, layers]
    prompt = long_prompt(model_dir, args.prompt_tokens)
    print(machine_banner(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-long-prompt-"))
    with DhtProcess() as dht:
        swarm = [NodeProcess(node_args(model_dir, work / f"node{i + 1}", "shard=layers", f"shard.start={a}",
                                       f"shard.end={b}", "discovery=http", f"discovery.http.urls=[{dht.url}]"),
                             log_path=work / f"node{i + 1}.log")
                 for i, (a, b) in enumerate(itertools.pairwise(cuts))]
        single = NodeProcess(node_args(model_dir, work / "single"), log_path=work / "single.log")
        try:
            start_all([*swarm, single])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the coordinator sees a complete chain
                status = httpx.get(swarm[0].url + "/v1/network/status", timeout=10).json()["swarm"]
                if not status["pipeline"]["coverage"].get("holes"):
                    break
                time.sleep(0.5)
            one, one_s, n = ask(single, prompt, args.max_tokens)
            many, many_s, _ = ask(swarm[0], prompt, args.max_tokens)
            failovers = metric(swarm[0].url, "openhydra_pipeline_failovers_total")
        finally:
            for node in [*swarm, single]:
                node.stop()
    print(f"\nprompt: {n} tokens, {args.max_tokens} greedy tokens out")
    print("| path | seconds | answer |\n|---|---|---|")
    print(f"| one node | {one_s:.1f} | {one[:80]!r} |")
    print(f"| three-node swarm | {many_s:.1f} | {many[:80]!r} |")
    print(f"identical: {one == many}; swarm failovers: {failovers:.0f}; {machine_banner()}")
    if one != many or failovers:
        sys.exit(1)


if __name__ == "__main__":
    main()
