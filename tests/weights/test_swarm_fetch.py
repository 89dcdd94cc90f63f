"""A swarm where one node has the model and the others start with an empty cache and no hub (issue 19).

Real processes: the HTTP DHT, node A holding the tiny random Llama (all 8 layers, sharing its weights), then
nodes B (layers [0, 4)) and C (layers [4, 8)) with ``model.source=swarm``, the pinned manifest and an empty
model cache of their own. They fetch their spans from the swarm; then A is stopped, so the only chain is
B -> C, and greedy output through B's OpenAI API must equal transformers' generate on the original folder.
B restarted afterwards reuses its folder without fetching anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from openhydra.testing.processes import DhtProcess, NodeProcess, swarm_node_overrides
from openhydra.weights.fetch import SOURCE_MARKER, swarm_folder
from openhydra.weights.manifest import ensure_manifest
from tests.api.conftest import Reference

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "List three colours and a number."}]


def _swarm_overrides(name: str, manifest: str, dht_url: str, start: int, end: int, data_dir: Path) -> list[str]:
    return [
        "model=local", "model.path=null", f"model.name={name}", "model.source=swarm", f"model.manifest={manifest}",
        "hardware=cpu", "hardware.dtype=float32", "shard=layers", f"shard.start={start}", f"shard.end={end}",
        "discovery=http", f"discovery.http.urls=[{dht_url}]", "discovery.ttl_s=6",
        "discovery.announce_interval_s=2", "peer.port=0", f"node.data_dir={data_dir}",
        "api.rate_limit_requests=100000",
    ]


def _wait_chain_without(node: NodeProcess, gone_port: str, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = httpx.get(node.url + "/v1/network/status", timeout=10).json()
        peers = status["swarm"]["peers"]
        if peers and all(not p["grpc_address"].endswith(gone_port) for p in peers):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the stopped node's record is still listed: {peers}")


def test_nodes_with_an_empty_cache_fetch_their_spans_and_serve_exactly(tiny_model_dirs, tmp_path: Path) -> None:
    model_dir = tiny_model_dirs["llama"]
    manifest = ensure_manifest(model_dir).content_hash
    name = model_dir.name
    reference = Reference(model_dir, torch.float32)
    expected = reference.text(reference.greedy(reference.chat_ids(PROMPT), 16))
    empty_cache = tmp_path / "cache-bc"  # B and C share one machine cache, empty at start, with no hub
    env = {"OPENHYDRA_CACHE": str(empty_cache), "HF_HUB_OFFLINE": "1"}
    with DhtProcess() as dht:
        a_overrides = [*swarm_node_overrides(model_dir, dht.url, 0, 8, tmp_path / "a"), "peer.share_weights_mbps=800"]
        a = NodeProcess(a_overrides, log_path=tmp_path / "a.log")
        b = NodeProcess(_swarm_overrides(name, manifest, dht.url, 0, 4, tmp_path / "b"), env=env,
                        log_path=tmp_path / "b.log")
        c = NodeProcess(_swarm_overrides(name, manifest, dht.url, 4, 8, tmp_path / "c"), env=env,
                        log_path=tmp_path / "c.log")
        try:
            a.start()
            a.wait_ready()
            b.start()
            c.start()
            b.wait_ready()
            c.wait_ready()
            a_status = httpx.get(a.url + "/v1/network/status", timeout=10).json()
            a_grpc = a_status["swarm"]["peer"]["grpc_address"]
            assert a_status["swarm"]["peer"]["weights"]["bytes_served"] > 0
            folder = swarm_folder(empty_cache, name, manifest)
            marker = json.loads((folder / SOURCE_MARKER).read_text())
            assert sorted(map(tuple, marker["spans"])) == [(0, 4), (4, 8)]
            for log in (b.log_text(), c.log_text()):
                assert "fetched layers" in log
            # Only the spans were fetched: B's half of the layers plus the embeddings, C's half plus the norm
            # (the head is tied to the embeddings, so C takes them too); nothing else was written.
            b_status = httpx.get(b.url + "/v1/network/status", timeout=10).json()
            assert b_status["swarm"]["peer"]["span"] == [0, 4]
            a.stop()
            _wait_chain_without(b, a_grpc.rsplit(":", 1)[1])
            client = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0, timeout=120)
            reply = client.chat.completions.create(model=name, messages=PROMPT, max_tokens=16, temperature=0)
            assert reply.choices[0].message.content == expected
            # Next start: the folder is reused, no fetch (A, the only full copy, is gone).
            b.stop()
            b2 = NodeProcess(_swarm_overrides(name, manifest, dht.url, 0, 4, tmp_path / "b"), env=env,
                             log_path=tmp_path / "b2.log")
            try:
                b2.start()
                b2.wait_ready()
                assert "reusing" in b2.log_text() and "fetching layers" not in b2.log_text()
                client = openai.OpenAI(base_url=b2.url + "/v1", api_key="x", max_retries=0, timeout=120)
                reply = client.chat.completions.create(model=name, messages=PROMPT, max_tokens=16, temperature=0)
                assert reply.choices[0].message.content == expected
            finally:
                b2.stop()
        finally:
            for node in (a, b, c):
                node.stop()
