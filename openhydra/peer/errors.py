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


CORE_INTERNAL = "Internal error from Core"
"""The details gRPC's C core gives a call its transport lost without a status from the other side (seen when the
destination process is SIGKILLed mid-stream, where most runs report UNAVAILABLE). Our peers never send it: their
INTERNAL failures read "<exception type>: <message>"."""


def transport_status(code: grpc.StatusCode, details: str) -> tuple[grpc.StatusCode, str]:
    """A stream's end status as the router should read it: a connection gRPC core lost reads UNAVAILABLE (the
    process is gone, or unreachable), whichever of the two codes core happened to pick."""
    if code == grpc.StatusCode.INTERNAL and details.strip() == CORE_INTERNAL:
        return grpc.StatusCode.UNAVAILABLE, f"connection lost ({CORE_INTERNAL})"
    return code, details


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode for its integer value (UNKNOWN for values we do not know)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
