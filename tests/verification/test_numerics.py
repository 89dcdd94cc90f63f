"""Audits compare only peers that compute alike. A record's ``backend`` says which arithmetic its span's outputs come
from (ShardRuntime.numerics: unquantized, or which quantization on which kernel); an int4 peer and an fp32 peer of
the same span differ by far more than any dtype tolerance (0.95 top-1 agreement on SmolLM2), so pairing them would
accuse honest peers. A made-up backend is audited as "pytorch"; a real but rare one leaves its peer unverifiable
(counted), as a span nobody else serves does."""

from __future__ import annotations

import time

import pytest
import torch

from openhydra.discovery.records import PeerAnnouncement
from openhydra.runtime import lowbit
from openhydra.runtime.shard import ShardRuntime
from openhydra.verification import verifier as verifier_module
from openhydra.verification.config import VerificationConfig
from openhydra.verification.reputation import ReputationStore
from openhydra.verification.verifier import Verifier
from tests.verification.kit import PeerSpec, Swarm, prompt_of


class _Bans:
    def is_banned(self, peer_id: str) -> bool:
        return False


class _Pipeline:
    def __init__(self, records: list[PeerAnnouncement]) -> None:
        self.records, self.bans = records, _Bans()

    def peers(self) -> list[PeerAnnouncement]:
        return list(self.records)


def _record(peer: str, backend: str, dtype: str = "float32") -> PeerAnnouncement:
    return PeerAnnouncement(peer_id=peer, model_id="org/model", start=0, end=4, total_layers=8,
                            grpc_address="127.0.0.1:50051", dtype=dtype, backend=backend, announced_at=time.time(),
                            ttl_s=600.0)


def test_audit_candidates_compute_as_the_audited_peer_does() -> None:
    records = [_record("fp32-a", "pytorch"), _record("fp32-b", "pytorch"), _record("bf16", "pytorch", "bfloat16"),
               _record("int4-a", "pytorch-int4-lowbit3"), _record("int4-b", "pytorch-int4-lowbit3"),
               _record("int4-torch", "pytorch-int4-torch")]
    verifier = Verifier(VerificationConfig(enabled=True), ReputationStore(None))
    verifier._pipeline = _Pipeline(records)
    by_id = {r.peer_id: r for r in records}

    def ids(like: str | None, exclude: str) -> list[str]:
        return [r.peer_id for r in verifier.alternatives((0, 4), {exclude}, by_id.get(like))]

    assert ids("fp32-a", "fp32-a") == ["bf16", "fp32-b"]  # a bf16 peer still audits an fp32 one (looser tolerance)
    assert ids("int4-a", "int4-a") == ["int4-b"]  # never an fp32 peer, nor int4 on another kernel
    assert ids("int4-torch", "int4-torch") == []  # unverifiable by peers here (counted as such), not accused
    assert len(ids(None, "fp32-a")) == 5  # without a peer to match: every other peer of the span


def test_a_made_up_backend_is_audited_like_pytorch() -> None:
    """A liar who announces an arithmetic nobody else has would have no auditor: an unknown value pairs as "pytorch"
    (what every record said before peers announced their arithmetic), so the unquantized peers of its span audit it."""
    records = [_record("liar", "pytorch-int3-magic"), _record("fp32", "pytorch"),
               _record("int4", "pytorch-int4-lowbit3")]
    verifier = Verifier(VerificationConfig(enabled=True), ReputationStore(None))
    verifier._pipeline = _Pipeline(records)
    assert [r.peer_id for r in verifier.alternatives((0, 4), {"liar"}, records[0])] == ["fp32"]


@pytest.mark.parametrize(("quantization", "expected"), [("none", "pytorch"), ("int4", None), ("int8", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_runtime_numerics(tiny_model_dirs, quantization, expected, dtype) -> None:
    """fp32 spans on the low-bit kernel run its attention too ("lowbit3"); bf16 ones keep PyTorch's attention, as
    every low-bit span of the previous release did ("lowbit2"), and pair with those."""
    rt = ShardRuntime(tiny_model_dirs["llama"], 0, 4, dtype=dtype, quantization=quantization)
    kernel = "torch" if lowbit.kernel() is None else "lowbit3" if dtype == torch.float32 else "lowbit2"
    assert rt.kernel_attention == (kernel == "lowbit3" and quantization != "none")
    assert rt.numerics == (expected or f"pytorch-{quantization}-{kernel}")
    _record("x", rt.numerics)  # a valid record field


def test_without_the_low_bit_kernel_a_span_says_so(tiny_model_dirs, monkeypatch) -> None:
    monkeypatch.setattr(lowbit, "kernel", lambda: None)
    rt = ShardRuntime(tiny_model_dirs["llama"], 0, 4, dtype=torch.float32, quantization="int4")
    assert rt.numerics == "pytorch-int4-torch"


def _mixed_run(model_dir, tmp_path, name: str) -> tuple[list, int]:
    """Two int4 and two fp32 peers on [0, 4), two fp32 on [4, 8); the int4 peer "int4-a" is the one routed to (the
    highest throughput), every hop audited, every agreeing pair re-audited. The outcomes and the audits begun."""
    specs = [PeerSpec("int4-a", 0, 4, quantization="int4", throughput=1000.0),
             PeerSpec("int4-b", 0, 4, quantization="int4"), PeerSpec("fp32-a", 0, 4), PeerSpec("fp32-b", 0, 4),
             PeerSpec("tail-a", 4, 8, throughput=1000.0), PeerSpec("tail-b", 4, 8)]
    config = VerificationConfig(enabled=True, sample_rate=1.0, audit_rate=1.0, max_steps_per_audit=6, seed=7)
    swarm = Swarm(model_dir, specs, config, tmp_path / f"{name}.db")
    try:
        assert {r.peer_id: r.backend for r in swarm.records}["int4-a"].startswith("pytorch-int4-")
        for i in range(4):
            swarm.generate(f"{name}{i}", prompt_of(i, 8), 6)
            assert swarm.verifier.drain(timeout_s=300)
        return list(swarm.verifier.outcomes), swarm.verifier.metrics.audits.labels("1")._value.get()
    finally:
        swarm.close()


def test_a_swarm_mixing_int4_and_fp32_peers_accuses_no_one(tiny_model_dirs, tmp_path, monkeypatch) -> None:
    """Real gRPC peers in process. With audits pairing like with like, the int4 peer is audited by the other int4
    peer only, and no one is accused; pairing any peer of the span (what every audit did before) accuses honest
    peers in the same run."""
    model_dir = tiny_model_dirs["llama"]
    outcomes, audits = _mixed_run(model_dir, tmp_path, "alike")
    accused = [o for o in outcomes if o.failed or o.disputed]
    assert audits >= 8 and len(outcomes) >= 4 and not accused, accused[:3]
    monkeypatch.setattr(verifier_module, "arithmetic_of", lambda record: "pytorch")  # any peer of the span
    outcomes, _ = _mixed_run(model_dir, tmp_path, "any")
    assert [o for o in outcomes if o.failed or o.disputed]  # honest peers accused
