"""The README's local-swarm walk-through, run as a newcomer would: the DHT and three nodes, a chat, earnings.

The commands are read from README.md (section "A local swarm: a DHT and three nodes") and run as
written, with three substitutions a test needs: free loopback ports instead of 8468/8080-8082/50051-50053
(the DHT URL follows its port), the tiny 8-layer Llama instead of SmolLM2 (``model=local model.path=...``,
spans rescaled from 30 layers to 8), and ``HOME`` set to a temporary folder so ``$HOME/.openhydra/nodeN``
lands there (``$HOME`` expanded as a shell would). Then: chat through the first node with the ``openai``
client, ``GET /`` (the dashboard, when the node serves one), and every node's ``/v1/account/balance``
shows credits it did not have before.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from openhydra.testing.processes import NodeProcess, free_port, start_all

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## A local swarm: a DHT and three nodes"
README_LAYERS = 30  # the README serves SmolLM2 (30 layers); the test's tiny model has 8


def walkthrough() -> tuple[list[str], list[list[str]], list[str]]:
    """(the DHT command, each node's arguments, the shell lines run afterwards) from the README."""
    text = README.read_text()
    assert SECTION in text, f"README.md lost its walk-through section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for ln in block.splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith("#")]
    dht = [shlex.split(c) for c in commands if c.startswith(".venv/bin/openhydra-dht")]
    nodes = [shlex.split(c)[1:] for c in commands if c.startswith(".venv/bin/openhydra-node")]
    after = [c for c in commands if not c.startswith(".venv/bin/")]
    assert len(dht) == 1 and len(nodes) == 3, commands
    return dht[0], nodes, after


def _tiny(args: list[str], model_dir: Path, dht_url: str, home: Path) -> list[str]:
    """A README node command with the test's substitutions (see the module docstring)."""
    out = []
    for arg in (a.replace("$HOME", str(home)) for a in args):
        key, _, value = arg.partition("=")
        if key == "model":
            out += ["model=local", f"model.path={model_dir}"]
        elif key in ("shard.start", "shard.end"):
            out.append(f"{key}={round(int(value) * 8 / README_LAYERS)}")
        elif key == "peer.port":
            out.append(f"peer.port={free_port()}")
        elif key != "api.port":  # NodeProcess gives the API a free port
            out.append(arg)
    return [*out, f"discovery.http.urls=[{dht_url}]"]


def test_readme_walkthrough(tiny_model_dirs, tmp_path):
    dht_cmd, node_args, after = walkthrough()
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    dht_port = free_port()
    argv = [str(Path(sys.executable).parent / Path(dht_cmd[0]).name)] + [
        str(dht_port) if prev == "--port" else a for prev, a in itertools.pairwise(dht_cmd)
    ]
    dht = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    dht_url = f"http://127.0.0.1:{dht_port}"
    nodes = [NodeProcess(_tiny(args, tiny_model_dirs["llama"], dht_url, home), env={"HOME": str(home)})
             for args in node_args]
    try:
        start_all(nodes)
        data_dirs = [next(a.split("=", 1)[1] for a in n.overrides if a.startswith("node.data_dir=")) for n in nodes]
        assert len(set(data_dirs)) == 3  # each node its own identity and ledger, as the README says
        before = {n.url: httpx.get(n.url + "/v1/account/balance", timeout=10).json()["micro"]["credits"]
                  for n in nodes}
        # the README's chat (its curl line), with the openai client, through the first node
        chat = next(c for c in after if "/v1/chat/completions" in c)
        content = re.search(r'"content": "([^"]+)"', chat).group(1)
        client = openai.OpenAI(base_url=nodes[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=48)
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        page = httpx.get(nodes[0].url + "/", timeout=10)
        if page.status_code != 404:  # the dashboard, where this build has one
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert any("/v1/account/balance" in c for c in after)
        deadline = time.monotonic() + 60  # settlement runs after the answer
        while time.monotonic() < deadline:
            now = {n.url: httpx.get(n.url + "/v1/account/balance", timeout=10).json()["micro"]["credits"]
                   for n in nodes}
            if all(now[u] > before[u] for u in now):
                break
            time.sleep(0.3)
        assert all(now[u] > before[u] for u in now), (before, now)
        for d in data_dirs:
            assert (Path(d) / "ledger.db").exists() and (Path(d) / "identity.key").exists()
    finally:
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(NodeProcess.stop, nodes))
        os.killpg(dht.pid, 9)
        dht.wait(timeout=10)
