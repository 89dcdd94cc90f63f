"""Tensor wire format and codecs: exact round trips and strict rejection of anything malformed."""

from __future__ import annotations

import lz4.block
import pytest
import torch

from openhydra.peer.codec import codec_from_name
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.wire import FLOAT_DTYPES, WireError, decode_tensor, encode_tensor


@pytest.mark.parametrize("codec", [pb.CODEC_NONE, pb.CODEC_LZ4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_round_trip_is_bit_exact(dtype: torch.dtype, codec: int) -> None:
    t = (torch.randn(7, 33) * 100).to(dtype)
    message = encode_tensor(t, codec)
    assert message.raw_size == t.numel() * t.element_size()
    if codec == pb.CODEC_NONE:
        assert len(message.payload) == message.raw_size
    back = decode_tensor(pb.Tensor.FromString(message.SerializeToString()), shape=(7, 33))
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_non_contiguous_tensor_is_sent_in_logical_order() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3], not contiguous
    assert torch.equal(decode_tensor(encode_tensor(t)), t)


def test_wrong_shape_dtype_and_sizes_rejected() -> None:
    message = encode_tensor(torch.randn(4, 8))
    with pytest.raises(WireError, match="shape"):
        decode_tensor(message, shape=(4, 9))
    with pytest.raises(WireError, match="DTYPE_FLOAT32 not accepted"):
        decode_tensor(message, dtypes=frozenset({pb.DTYPE_INT64}))
    with pytest.raises(WireError, match="not accepted"):
        decode_tensor(pb.Tensor(dtype=99, shape=[1], raw_size=4, payload=b"\0" * 4), dtypes=FLOAT_DTYPES)
    truncated = pb.Tensor()
    truncated.CopyFrom(message)
    truncated.payload = message.payload[:-4]
    with pytest.raises(WireError, match="payload is"):
        decode_tensor(truncated)
    lying = pb.Tensor()
    lying.CopyFrom(message)
    lying.raw_size = 12
    with pytest.raises(WireError, match="raw_size"):
        decode_tensor(lying)
    with pytest.raises(WireError, match="exceeds"):
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 10], raw_size=1 << 32), max_bytes=1 << 30)
    with pytest.raises(WireError, match="negative"):
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, -4], raw_size=16, payload=b"\0" * 16))


def test_lz4_payload_cannot_expand_beyond_declared_size() -> None:
    bomb = lz4.block.compress(b"\0" * (1 << 20), store_size=False)  # 1 MiB of zeros, a few KB compressed
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], codec=pb.CODEC_LZ4, raw_size=16, payload=bomb)
    with pytest.raises(WireError, match="lz4"):
        decode_tensor(message)
    garbage = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4], codec=pb.CODEC_LZ4, raw_size=16, payload=b"\xff" * 9)
    with pytest.raises(WireError, match="lz4"):
        decode_tensor(garbage)


def test_codec_names() -> None:
    assert codec_from_name("none") == pb.CODEC_NONE and codec_from_name("lz4") == pb.CODEC_LZ4
    with pytest.raises(ValueError, match="unknown codec"):
        codec_from_name("zstd")
