"""Bytes fields for pydantic wire records: raw ``bytes`` in Python, unpadded base64url (RFC 4648 §5) in JSON.

A record built in Python from raw bytes and the same record parsed from JSON compare equal, so the
signing payloads computed from either side agree.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64url") from exc


def _to_bytes(value: Any) -> Any:
    if isinstance(value, str):
        return b64decode(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    return value


def _serialize(value: bytes, info: Any) -> bytes | str:
    return b64encode(value) if info.mode == "json" else value


B64Bytes = Annotated[
    bytes,
    BeforeValidator(_to_bytes),
    PlainSerializer(_serialize, return_type=Any, when_used="always"),
]
"""``bytes`` that accepts base64url text on input and writes base64url in JSON mode."""
