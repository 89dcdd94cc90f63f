"""Tensor wire format: raw little-endian bytes of a dense tensor plus dtype and shape.

Encoding views the tensor's memory as bytes (bf16 included, which numpy cannot represent) and
decoding rebuilds it with ``torch.frombuffer``: no per-element conversion on either side. Every
field is checked against what the receiver expects before any tensor is built.
"""

from __future__ import annotations

import sys

import torch

from openhydra.peer.codec import CodecError, compress, decompress
from openhydra.peer.proto import peer_pb2 as pb

TORCH_TO_WIRE = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.int64: pb.DTYPE_INT64,
}
WIRE_TO_TORCH = {v: k for k, v in TORCH_TO_WIRE.items()}
FLOAT_DTYPES = frozenset({pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT16})
MAX_TENSOR_BYTES = 256 * 1024 * 1024

if sys.byteorder != "little":  # pragma: no cover - every platform we ship on is little-endian
    raise ImportError("the OpenHydra tensor wire format assumes a little-endian host")


class WireError(ValueError):
    """A tensor message that does not match what the receiver expects."""


def dtype_name(wire_dtype: int) -> str:
    return pb.DType.Name(wire_dtype) if wire_dtype in pb.DType.values() else f"DType({wire_dtype})"


def encode_tensor(tensor: torch.Tensor, codec: int = pb.CODEC_NONE) -> pb.Tensor:
    if tensor.dtype not in TORCH_TO_WIRE:
        raise WireError(f"cannot send dtype {tensor.dtype}; supported: {sorted(map(str, TORCH_TO_WIRE))}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes()
    return pb.Tensor(
        dtype=TORCH_TO_WIRE[tensor.dtype],
        shape=list(tensor.shape),
        codec=codec,
        raw_size=len(raw),
        payload=compress(raw, codec),
    )


def decode_tensor(
    message: pb.Tensor,
    *,
    shape: tuple[int, ...] | None = None,
    dtypes: frozenset[int] | None = None,
    max_bytes: int = MAX_TENSOR_BYTES,
) -> torch.Tensor:
    """Check dtype, shape and sizes against the expectation, then rebuild the tensor."""
    if message.dtype not in WIRE_TO_TORCH or (dtypes is not None and message.dtype not in dtypes):
        allowed = sorted(dtype_name(d) for d in (dtypes or WIRE_TO_TORCH))
        raise WireError(f"dtype {dtype_name(message.dtype)} not accepted here; expected one of {allowed}")
    got_shape = tuple(int(d) for d in message.shape)
    if shape is not None and got_shape != shape:
        raise WireError(f"shape {list(got_shape)} does not match the expected {list(shape)}")
    if any(d < 0 for d in got_shape):
        raise WireError(f"negative dimension in shape {list(got_shape)}")
    dtype = WIRE_TO_TORCH[message.dtype]
    numel = 1
    for d in got_shape:
        numel *= d
    expected_bytes = numel * dtype.itemsize
    if expected_bytes > max_bytes:
        raise WireError(f"tensor of {expected_bytes} bytes exceeds the {max_bytes}-byte limit")
    if message.raw_size != expected_bytes:
        raise WireError(f"raw_size {message.raw_size} != {expected_bytes} bytes for {list(got_shape)} {dtype}")
    try:
        raw = decompress(message.payload, message.codec, expected_bytes)
    except CodecError as exc:
        raise WireError(str(exc)) from None
    if numel == 0:
        return torch.empty(got_shape, dtype=dtype)
    # bytearray: frombuffer needs a writable buffer to hand out a normal (writable) tensor.
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(got_shape)
