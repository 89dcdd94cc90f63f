"""Fetching a span's weights from real peers over gRPC (openhydra/weights/fetch.py, serve.py).

Peers here are real :class:`~openhydra.peer.server.PeerServer` instances on loopback, each holding the tiny
random Llama and sharing its weights; the fetcher runs in this process (and, for the interruption test, in a
child process that is killed with SIGKILL halfway).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime
from openhydra.verification.reputation import ReputationStore
from openhydra.weights.fetch import FETCH_LOG, FetchError, Source, SpanFetcher, get_manifest
from openhydra.weights.manifest import ensure_manifest
from openhydra.weights.node_hook import reputation_reporter
from openhydra.weights.serve import WeightsServer


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def peers(tiny: Path) -> Iterator[dict[str, PeerServer]]:
    """Three peers: 'good' (all layers), 'bad' (all layers, flips a byte per message), 'half' (layers [0, 4))."""
    signed = ensure_manifest(tiny)
    servers = {}
    for name, span, fault in (("good", (0, 8), None), ("bad", (0, 8), "flip"), ("half", (0, 4), None)):
        server = PeerServer(ShardRuntime(tiny, *span, dtype=torch.float32), port=0, model_id="tiny")
        server.weights = WeightsServer(tiny, signed, span, mbps=0, fault=fault)  # 0 here: no pacing
        server.start()
        servers[name] = server
    yield servers
    for server in servers.values():
        server.stop()


def _source(peers: dict[str, PeerServer], name: str) -> Source:
    return Source(name, peers[name].address, peers[name].weights.span)


def _span_bytes_equal(fetched: Path, original: Path, signed, span: tuple[int, int]) -> None:
    for chunk in signed.manifest.chunks(span):
        with open(fetched / chunk.path, "rb") as a, open(original / chunk.path, "rb") as b:
            assert os.pread(a.fileno(), chunk.length, chunk.offset) == os.pread(b.fileno(), chunk.length, chunk.offset)


def test_a_peer_serving_corrupted_bytes_is_detected_avoided_and_reported(peers, tiny: Path, tmp_path: Path) -> None:
    signed = ensure_manifest(tiny)
    data_dir = tmp_path / "data"
    report_bad = reputation_reporter(data_dir, {})
    fetcher = SpanFetcher(tmp_path / "out", signed, (0, 4), [_source(peers, "bad"), _source(peers, "good")],
                          pinned=signed.content_hash, on_bad_peer=report_bad, streams_per_source=2)
    report = fetcher.run()
    assert report.bad_peers == ["bad"] and report.mismatches >= 1
    assert report.bytes_by_peer.get("bad", 0) == 0  # every byte it sent was refused
    assert report.fetched_chunks == report.total_chunks
    _span_bytes_equal(tmp_path / "out", tiny, signed, (0, 4))
    store = ReputationStore(data_dir / "reputation.db")
    try:
        assert store.counts("bad").get("fail", 0) >= 1
        assert store.counts("good").get("fail", 0) == 0
    finally:
        store.close()


def test_only_a_bad_peer_means_the_fetch_fails_loudly(peers, tiny: Path, tmp_path: Path) -> None:
    signed = ensure_manifest(tiny)
    fetcher = SpanFetcher(tmp_path / "out", signed, (0, 4), [_source(peers, "bad")], pinned=signed.content_hash)
    with pytest.raises(FetchError, match="bad"):
        fetcher.run()


def test_spans_come_from_the_peers_that_hold_them(peers, tiny: Path, tmp_path: Path) -> None:
    """Layers [0, 4) are served by 'half' and 'good'; [4, 8) only by 'good': both are used, bytes exact."""
    signed = ensure_manifest(tiny)
    report = SpanFetcher(tmp_path / "out", signed, (0, 8), [_source(peers, "half"), _source(peers, "good")],
                         pinned=signed.content_hash).run()
    assert report.bytes_by_peer["half"] > 0 and report.bytes_by_peer["good"] > 0
    _span_bytes_equal(tmp_path / "out", tiny, signed, (0, 8))
    # The folder is a normal checkpoint: transformers loads it and it equals the original.
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tiny / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_peer_serves_only_its_span_and_only_its_manifest(peers, tiny: Path) -> None:
    signed = ensure_manifest(tiny)
    layer6 = next(p for p in signed.manifest.file("model.safetensors").pieces if ".layers.6." in p.name)
    with grpc.insecure_channel(peers["half"].address) as channel:
        stub = pb_grpc.PeerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchWeights(pb.WeightsRequest(manifest_hash=signed.content_hash, path="model.safetensors",
                                                     offset=layer6.offset, length=layer6.length)))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchWeights(pb.WeightsRequest(manifest_hash="0" * 64, path="config.json", offset=0,
                                                     length=10)))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as info:
            list(stub.FetchWeights(pb.WeightsRequest(manifest_hash=signed.content_hash, path="../../etc/passwd",
                                                     offset=0, length=10)))
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    # The manifest itself comes over the same RPC and is checked against the pin.
    got = get_manifest([_source(peers, "half")], signed.content_hash, signed.content_hash)
    assert got.content_hash == signed.content_hash


def test_a_fetch_killed_halfway_resumes_without_refetching_verified_chunks(peers, tiny: Path, tmp_path: Path
                                                                          ) -> None:
    signed = ensure_manifest(tiny)
    slow = PeerServer(ShardRuntime(tiny, 0, 8, dtype=torch.float32), port=0, model_id="tiny")
    slow.weights = WeightsServer(tiny, signed, (0, 8), mbps=40)  # 5 MB/s: the child is killed halfway
    slow.start()
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "openhydra.weights.fetch", "--source", f"slow={slow.address}",
         "--manifest", signed.content_hash, "--start", "0", "--end", "8", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        total = len(signed.manifest.chunks((0, 8)))
        deadline = time.monotonic() + 120
        logged = 0
        while time.monotonic() < deadline and child.poll() is None:
            if (out / FETCH_LOG).exists():
                logged = len((out / FETCH_LOG).read_text().splitlines()) - 1
                if logged >= total // 3:
                    break
            time.sleep(0.05)
        assert child.poll() is None, "the fetch finished before it could be interrupted"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        slow.stop()
    verified_before = len((out / FETCH_LOG).read_text().splitlines()) - 1
    assert 0 < verified_before < total
    served_before = peers["good"].weights.bytes_served
    report = SpanFetcher(out, signed, (0, 8), [_source(peers, "good")], pinned=signed.content_hash).run()
    assert report.resumed_chunks == verified_before
    assert report.fetched_chunks == total - verified_before
    resumed_keys = set((out / FETCH_LOG).read_text().splitlines()[1:verified_before + 1])
    resumed_bytes = sum(c.length for c in signed.manifest.chunks((0, 8)) if c.key in resumed_keys)
    assert peers["good"].weights.bytes_served - served_before == report.total_bytes - resumed_bytes
    _span_bytes_equal(out, tiny, signed, (0, 8))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 8


def test_a_private_swarm_peer_serves_weights_only_with_the_swarm_credential(tiny: Path, tmp_path: Path) -> None:
    from openhydra.crypto.membership import rpc_token
    from openhydra.weights.node_hook import private_swarm_token

    secret = "a-private-swarm-secret"
    token = private_swarm_token({"swarm_secret": secret})
    assert token == rpc_token(secret)
    signed = ensure_manifest(tiny)
    server = PeerServer(ShardRuntime(tiny, 0, 8, dtype=torch.float32), port=0, model_id="tiny", swarm_token=token)
    server.weights = WeightsServer(tiny, signed, (0, 8), mbps=0)
    server.start()
    try:
        source = Source("private", server.address, (0, 8))
        with pytest.raises(FetchError, match="PERMISSION_DENIED"):
            get_manifest([source], signed.content_hash, signed.content_hash)
        assert server.weights.requests == 0  # refused before the handler
        got = get_manifest([source], signed.content_hash, signed.content_hash, swarm_token=token)
        report = SpanFetcher(tmp_path / "out", got, (0, 4), [source], pinned=signed.content_hash,
                             swarm_token=token).run()
        assert report.fetched_chunks == report.total_chunks
    finally:
        server.stop()


def test_the_bandwidth_cap_holds_over_all_streams(tiny: Path, tmp_path: Path) -> None:
    """peer.share_weights_mbps caps the peer's total rate, however many streams fetch from it at once."""
    signed = ensure_manifest(tiny)
    server = PeerServer(ShardRuntime(tiny, 0, 8, dtype=torch.float32), port=0, model_id="tiny")
    server.weights = WeightsServer(tiny, signed, (0, 8), mbps=80)  # 10 MB/s
    server.start()
    try:
        source = Source("capped", server.address, (0, 8))
        started = time.monotonic()
        report = SpanFetcher(tmp_path / "out", signed, (0, 8), [source], pinned=signed.content_hash,
                             streams_per_source=3).run()
        elapsed = time.monotonic() - started
    finally:
        server.stop()
    rate = 80e6 / 8
    # The pacer may be 0.25 s ahead of its clock, whose start may be backdated 0.25 s (to make up oversleeps).
    burst_bytes = rate * 2 * 0.25
    assert report.fetched_bytes > 20e6
    assert elapsed >= (report.fetched_bytes - burst_bytes) / rate
