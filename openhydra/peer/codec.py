"""Payload compression for tensors on the wire: none or lz4 (block format).

LZ4 is off by default: on bf16 activations it measured a ratio of ~1.0 (DESIGN §4), so it only
costs CPU. ``bench/bench_codec.py`` measures it on real SmolLM2 activations. Decompression is
bounded by the declared raw size, so a small payload cannot expand into a memory bomb.
"""

from __future__ import annotations

import lz4.block

from openhydra.peer.proto import peer_pb2 as pb


class CodecError(ValueError):
    """A payload that does not decode to the size it declares."""


CODECS = {"none": pb.CODEC_NONE, "lz4": pb.CODEC_LZ4}


def codec_from_name(name: str) -> int:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}") from None


def compress(raw: bytes, codec: int) -> bytes:
    if codec == pb.CODEC_NONE:
        return raw
    if codec == pb.CODEC_LZ4:
        return lz4.block.compress(raw, store_size=False)
    raise CodecError(f"unknown codec {codec}")


def decompress(payload: bytes, codec: int, raw_size: int) -> bytes:
    if codec == pb.CODEC_NONE:
        if len(payload) != raw_size:
            raise CodecError(f"payload is {len(payload)} bytes, expected {raw_size}")
        return payload
    if codec == pb.CODEC_LZ4:
        try:
            raw = lz4.block.decompress(payload, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4 payload does not decode to {raw_size} bytes: {exc}") from None
        if len(raw) != raw_size:
            raise CodecError(f"lz4 payload decoded to {len(raw)} bytes, expected {raw_size}")
        return raw
    raise CodecError(f"unknown codec {codec}")
