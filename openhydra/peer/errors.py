"""Typed failures of a pipeline hop, as the coordinator sees them."""

from __future__ import annotations

import grpc


class HopError(RuntimeError):
    """A step failed at ``address`` (the hop to ban / fail over), with the gRPC status ``code``.

    ``address`` is empty only when no hop could be blamed (every hop answered a probe after a timeout).
    ``expected_position`` is set for position mismatches (FAILED_PRECONDITION): the length that hop's
    session holds, so the coordinator knows how much history to replay.
    """

    def __init__(self, address: str, code: grpc.StatusCode, message: str, expected_position: int | None = None) -> None:
        super().__init__(f"hop {address or '?'} failed with {code.name}: {message}")
        self.address = address
        self.code = code
        self.message = message
        self.expected_position = expected_position


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode for its integer value (UNKNOWN for values we do not know)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
