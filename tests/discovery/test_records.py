"""PeerAnnouncement: strict parsing (unknown fields ignored, bad ones rejected), wire round trip."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from openhydra.discovery.records import PeerAnnouncement, freshest, parse_host_port

GOOD = dict(
    peer_id="12D3KooWabc",
    model_id="Qwen/Qwen3.5-0.8B",
    start=0,
    end=8,
    total_layers=24,
    grpc_address="127.0.0.1:50051",
    api_address="localhost:8080",
    dtype="bfloat16",
    backend="pytorch",
    throughput_tps=12.5,
    load=0.25,
    active_sessions=3,
    announced_at=1_800_000_000.0,
    ttl_s=180.0,
    region="eu-west",
    version="0.1.0",
    public_key="AAEC",
    signature="AAEC",
    static_key="AAEC",
)


def test_good_record_round_trips_through_json_and_wire():
    r = PeerAnnouncement.model_validate(GOOD)
    assert PeerAnnouncement.model_validate_json(json.dumps(r.to_wire())) == r
    assert PeerAnnouncement.from_wire(r.to_wire()) == r
    assert r.span == (0, 8) and r.num_layers == 8 and not r.is_full_model
    assert r.expires_at == 1_800_000_180.0 and r.is_expired(1_800_000_180.0) and not r.is_expired(1_800_000_179.9)
    assert b'"signature"' not in r.signing_payload() and b'"public_key":"AAEC"' in r.signing_payload()


def test_unknown_fields_ignored_and_optional_fields_default():
    minimal = {
        k: GOOD[k]
        for k in ("peer_id", "model_id", "start", "end", "total_layers", "grpc_address", "announced_at", "ttl_s")
    }
    r = PeerAnnouncement.model_validate({**minimal, "future_field": {"x": 1}})
    assert r.public_key is None and r.throughput_tps == 0.0 and r.api_address is None
    assert "future_field" not in r.to_wire()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("start", 8),
        ("start", -1),
        ("end", 25),
        ("total_layers", 0),
        ("start", "0"),
        ("start", 1.5),
        ("grpc_address", "127.0.0.1"),
        ("grpc_address", "127.0.0.1:0"),
        ("grpc_address", "127.0.0.1:65536"),
        ("grpc_address", "bad host:1"),
        ("grpc_address", "[zz]:1"),
        ("api_address", ":80"),
        ("peer_id", ""),
        ("peer_id", "a b"),
        ("peer_id", "x" * 200),
        ("model_id", "../etc"),
        ("dtype", "float8"),
        ("backend", "Py Torch"),
        ("throughput_tps", -1.0),
        ("throughput_tps", float("nan")),
        ("throughput_tps", True),
        ("load", 1.5),
        ("ttl_s", 0),
        ("ttl_s", 10 * 86400),
        ("announced_at", 0),
        ("public_key", "not base64!"),
        ("region", "eu west"),
        ("active_sessions", -1),
    ],
)
def test_bad_values_rejected_with_field_name(field, value):
    with pytest.raises(ValidationError) as info:
        PeerAnnouncement.model_validate({**GOOD, field: value})
    text = str(info.value)
    assert field in text or "span" in text


def test_missing_required_field_rejected():
    data = dict(GOOD)
    del data["grpc_address"]
    with pytest.raises(ValidationError, match="grpc_address"):
        PeerAnnouncement.model_validate(data)


def test_host_port_forms():
    assert parse_host_port("[::1]:50051") == ("::1", 50051)
    assert parse_host_port("node-1.example:8080") == ("node-1.example", 8080)
    with pytest.raises(ValueError, match=r"1\.\.65535"):
        parse_host_port("h:x")


def test_freshest_keeps_newest_per_peer_and_model():
    now = time.time()
    old = PeerAnnouncement.model_validate({**GOOD, "announced_at": now - 10, "start": 0, "end": 4})
    new = PeerAnnouncement.model_validate({**GOOD, "announced_at": now, "start": 4, "end": 8})
    other = PeerAnnouncement.model_validate({**GOOD, "model_id": "other", "announced_at": now - 20})
    assert freshest([new, old, other]) == [new, other]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*GOOD, "junk"]), json_values, max_size=12), json_values)
def test_arbitrary_input_only_ever_raises_validation_error(fields, other):
    for data in ({**GOOD, **fields}, fields, other):
        try:
            r = PeerAnnouncement.model_validate(data)
        except ValidationError:
            continue
        assert 0 <= r.start < r.end <= r.total_layers  # anything accepted is a sane span
