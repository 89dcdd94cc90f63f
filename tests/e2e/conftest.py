"""The README's local swarm (a DHT and three nodes), started once per session from README.md's commands.

The commands are read from README.md (section "A local swarm: a DHT and three nodes") and run as
written, with three substitutions a test needs: free loopback ports instead of 8468/8080-8082/50051-50053
(the DHT URL follows its port), the tiny 8-layer Llama instead of SmolLM2 (``model=local model.path=...``,
spans rescaled from 30 layers to 8), and ``HOME`` set to a temporary folder so ``$HOME/.openhydra/nodeN``
lands there (``$HOME`` expanded as a shell would); NodeProcess also asks for the tests' low join proof
of work (``TEST_POW_BITS`` instead of an open swarm's 20 bits). Both the walk-through test and the swarm settlement
tests use this one swarm (one start-up for both: the CI budget).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from openhydra.testing.processes import NodeProcess, free_port, start_all

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## A local swarm: a DHT and three nodes"
README_LAYERS = 30  # the README serves SmolLM2 (30 layers); the test's tiny model has 8


@dataclass
class ReadmeSwarm:
    nodes: list[NodeProcess]
    spans: list[tuple[int, int]]
    data_dirs: list[Path]
    after: list[str]  # the README's shell lines after the start commands (chat, balances)
    model: str


def _section_commands() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"README.md lost its walk-through section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [ln.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S) for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def walkthrough() -> tuple[list[str], list[list[str]], list[str]]:
    """(the DHT command, each node's arguments, the shell lines run afterwards) from the README."""
    commands = _section_commands()
    dht = [shlex.split(c) for c in commands if c.startswith(".venv/bin/openhydra-dht")]
    nodes = [shlex.split(c)[1:] for c in commands if c.startswith(".venv/bin/openhydra-node")
             and "-m" not in shlex.split(c)]
    after = [c for c in commands if not c.startswith(".venv/bin/")]
    assert len(dht) == 1 and len(nodes) == 3, commands
    return dht[0], nodes, after


def sweep_command() -> list[str]:
    """The arguments of the README's one-command variant (``openhydra-node -m ...``: three jobs at once)."""
    sweeps = [shlex.split(c)[1:] for c in _section_commands()
              if c.startswith(".venv/bin/openhydra-node") and "-m" in shlex.split(c)]
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


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


def _value(overrides: list[str], key: str) -> str:
    return next(a.split("=", 1)[1] for a in overrides if a.startswith(key + "="))


@pytest.fixture(scope="session")
def readme_swarm(tiny_model_dirs, tmp_path_factory):
    dht_cmd, node_args, after = walkthrough()
    home = tmp_path_factory.mktemp("home")
    dht_port = free_port()
    argv = [str(Path(sys.executable).parent / Path(dht_cmd[0]).name)] + [
        str(dht_port) if prev == "--port" else a for prev, a in itertools.pairwise(dht_cmd)
    ]
    dht = subprocess.Popen(argv, env={**os.environ, "HOME": str(home)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    model_dir = tiny_model_dirs["llama"]
    nodes = [NodeProcess(_tiny(args, model_dir, f"http://127.0.0.1:{dht_port}", home), env={"HOME": str(home)})
             for args in node_args]
    try:
        start_all(nodes)
        spans = [(int(_value(n.overrides, "shard.start")), int(_value(n.overrides, "shard.end"))) for n in nodes]
        data_dirs = [Path(_value(n.overrides, "node.data_dir")) for n in nodes]
        yield ReadmeSwarm(nodes, spans, data_dirs, after, model_dir.name)
    finally:  # stop all at once: each node's clean shutdown takes seconds
        try:
            with ThreadPoolExecutor(len(nodes)) as pool:
                list(pool.map(NodeProcess.stop, nodes))
        finally:  # a node that could not be stopped must not leave the DHT running (one outlived a CI run)
            os.killpg(dht.pid, signal.SIGKILL)
            dht.wait(timeout=10)
