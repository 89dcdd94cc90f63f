"""The real embedded SmolLM2 from a sharing peer: the pinned manifest, two spans fetched, outputs exact (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openhydra.catalog import load_catalog
from openhydra.peer.server import PeerServer
from openhydra.runtime.shard import ShardRuntime
from openhydra.weights.fetch import Source, SpanFetcher, get_manifest
from openhydra.weights.manifest import ensure_manifest
from openhydra.weights.serve import WeightsServer

pytestmark = pytest.mark.slow


def test_smollm2_spans_fetched_from_a_peer_compute_exactly_like_the_original(smollm2_dir: Path, tmp_path: Path
                                                                            ) -> None:
    pinned = load_catalog()["smollm2-135m"].manifest
    signed = ensure_manifest(smollm2_dir)
    assert signed.content_hash == pinned
    server = PeerServer(ShardRuntime(smollm2_dir, 0, 30, dtype=torch.float32), port=0, model_id="smollm2")
    server.weights = WeightsServer(smollm2_dir, signed, (0, 30), mbps=0)
    server.start()
    try:
        source = Source("seed", server.address, (0, 30))
        got = get_manifest([source], pinned, pinned)
        out = tmp_path / "fetched"
        for span in ((0, 12), (12, 30)):
            report = SpanFetcher(out, got, span, [source], pinned=pinned).run()
            assert report.fetched_chunks + report.resumed_chunks == report.total_chunks
        # Layers [0, 12) need no head: fewer bytes than the whole model.
        assert signed.manifest.span_bytes((0, 12)) < 0.6 * signed.manifest.span_bytes()
    finally:
        server.stop()
    prompt = torch.tensor([1, 9690, 42, 314, 5248, 30, 2])
    positions = torch.arange(len(prompt))
    logits = {}
    for name, folder in (("original", smollm2_dir), ("fetched", out)):
        first = ShardRuntime(folder, 0, 12, dtype=torch.float32)
        last = ShardRuntime(folder, 12, 30, dtype=torch.float32)
        h = first.forward("s", positions, input_ids=prompt)
        logits[name] = last.forward("s", positions, hidden_states=h, all_logits=True)
    assert torch.equal(logits["original"], logits["fetched"])
