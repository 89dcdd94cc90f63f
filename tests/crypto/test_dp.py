"""DP noise and audit tags: honest senders pass; skipped, weakened or substituted noise is caught."""

from __future__ import annotations

import pytest
import torch

from openhydra.crypto.dp import (
    DPAuditor,
    DPParams,
    DPRecord,
    apply_dp,
    audit_tag,
    clip_rows,
    epsilon,
    gaussian_noise,
    noise_seed,
    noised,
    tensor_digest,
)
from openhydra.crypto.errors import AuditFailure

KEY = bytes(range(32))
PARAMS = DPParams(sigma=0.01, clip=50.0)
SESSION, HOP = "sess-dp", 1


@pytest.fixture
def activation() -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.randn(1, 7, 576) * 3).to(torch.bfloat16)  # h: [B, S, D], norms ~72 > clip


@pytest.fixture
def auditor() -> DPAuditor:
    return DPAuditor(KEY, PARAMS, SESSION, HOP)


def test_noise_statistics_and_clipping(activation: torch.Tensor) -> None:
    clipped = clip_rows(activation, PARAMS.clip)
    norms = torch.linalg.vector_norm(clipped, dim=-1)
    assert torch.all(norms <= PARAMS.clip * (1 + 1e-5)) and torch.all(norms > PARAMS.clip * 0.99)
    small = torch.ones(2, 4)
    assert torch.equal(clip_rows(small, 50.0), small)  # under the bound: untouched
    y = noised(activation.float(), PARAMS, seed=123)
    residual = y - clipped
    assert abs(residual.std().item() - PARAMS.noise_std) < 0.05 * PARAMS.noise_std
    assert abs(residual.mean().item()) < 0.05 * PARAMS.noise_std
    assert torch.equal(gaussian_noise((3, 5), 9), gaussian_noise((3, 5), 9))
    assert not torch.equal(gaussian_noise((3, 5), 9), gaussian_noise((3, 5), 10))


def test_honest_sender_passes_every_check(activation: torch.Tensor, auditor: DPAuditor) -> None:
    y, record = apply_dp(activation, PARAMS, KEY, SESSION, HOP, step=4)
    assert y.dtype == activation.dtype and y.shape == activation.shape
    assert not torch.equal(y, activation)
    wire = DPRecord.model_validate_json(record.model_dump_json())
    auditor.verify_record(wire, step=4)
    auditor.verify_received(wire, y)
    auditor.verify_against_input(wire, activation, step=4)


def test_seed_is_not_the_senders_choice() -> None:
    assert noise_seed(KEY, SESSION, HOP, 1) != noise_seed(KEY, SESSION, HOP, 2)
    assert noise_seed(KEY, SESSION, HOP, 1) != noise_seed(KEY, SESSION, 2, 1)
    assert noise_seed(KEY, SESSION, HOP, 1) != noise_seed(bytes(32), SESSION, HOP, 1)


def test_skipped_noise_detected(activation: torch.Tensor, auditor: DPAuditor) -> None:
    # honestly reports sigma=0: the parameters do not match the configuration
    _, record = apply_dp(activation, DPParams(0.0, PARAMS.clip), KEY, SESSION, HOP, step=0)
    with pytest.raises(AuditFailure, match="configured sigma"):
        auditor.verify_record(record, step=0)
    # claims the configured sigma but sends the clean (clipped) activation: the tag is authentic
    # and covers what was sent, but the spot check's recomputation disagrees
    _, honest = apply_dp(activation, PARAMS, KEY, SESSION, HOP, step=0)
    skipped = noised(activation, DPParams(0.0, PARAMS.clip), 0)
    fields = honest.model_dump(exclude={"tag"}) | {"digest": tensor_digest(skipped)}
    cheat = DPRecord(**fields, tag=audit_tag(KEY, fields))
    auditor.verify_record(cheat, step=0)
    auditor.verify_received(cheat, skipped)
    with pytest.raises(AuditFailure, match="did not apply"):
        auditor.verify_against_input(cheat, activation, step=0)


def test_weakened_noise_detected(activation: torch.Tensor, auditor: DPAuditor) -> None:
    _, record = apply_dp(activation, DPParams(PARAMS.sigma / 10, PARAMS.clip), KEY, SESSION, HOP, step=2)
    with pytest.raises(AuditFailure, match="configured"):
        auditor.verify_record(record, step=2)
    # a looser clip with the right sigma is just as much a weakening
    _, record = apply_dp(activation, DPParams(PARAMS.sigma, 1e6), KEY, SESSION, HOP, step=2)
    with pytest.raises(AuditFailure, match="configured"):
        auditor.verify_record(record, step=2)
    # the sender relabels a weak record as the configured one: the tag breaks
    relabelled = record.model_copy(update={"clip": PARAMS.clip})
    with pytest.raises(AuditFailure, match="not authentic"):
        auditor.verify_record(relabelled, step=2)


def test_own_seed_forged_tag_and_swapped_tensor_detected(activation: torch.Tensor, auditor: DPAuditor) -> None:
    _, record = apply_dp(activation, PARAMS, KEY, SESSION, HOP, step=3)
    chosen = noised(activation, PARAMS, seed=42)  # noise of its own choosing
    fields = record.model_dump(exclude={"tag"}) | {"seed": 42, "digest": tensor_digest(chosen)}
    with pytest.raises(AuditFailure, match="seed"):
        auditor.verify_record(DPRecord(**fields, tag=audit_tag(KEY, fields)), step=3)
    forged = record.model_copy(update={"tag": audit_tag(bytes(32), record)})  # no audit key
    with pytest.raises(AuditFailure, match="not authentic"):
        auditor.verify_record(forged, step=3)
    with pytest.raises(AuditFailure, match="not the one"):
        auditor.verify_received(record, activation)  # something else arrived
    with pytest.raises(AuditFailure, match="expected"):
        auditor.verify_record(record, step=4)  # replayed record from another step


def test_epsilon_is_reported_honestly() -> None:
    assert epsilon(0.0) == float("inf")
    assert 900 < epsilon(0.01) < 1000  # usable noise levels give no meaningful formal guarantee
    assert epsilon(10.0) < 1.0
    with pytest.raises(ValueError):
        DPParams(sigma=-1, clip=1)
