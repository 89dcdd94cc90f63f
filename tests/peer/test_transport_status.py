"""A connection gRPC core lost reads as a gone process, whichever status code core picked for it."""

from __future__ import annotations

import grpc

from openhydra.peer.errors import CORE_INTERNAL, HopError, transport_status
from openhydra.router.swarm import _process_gone


def test_core_lost_connection_reads_unavailable_and_marks_the_process_gone() -> None:
    code, details = transport_status(grpc.StatusCode.INTERNAL, CORE_INTERNAL)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert CORE_INTERNAL in details
    assert _process_gone(HopError("127.0.0.1:1", code, details))


def test_a_peers_own_internal_failure_stays_internal() -> None:
    # What a live peer sends when its forward raised (peer/forward.py): not a lost connection.
    sent = (grpc.StatusCode.INTERNAL, "RuntimeError: Internal error from Core in a message")
    assert transport_status(*sent) == sent
    assert transport_status(grpc.StatusCode.DEADLINE_EXCEEDED, CORE_INTERNAL) == (
        grpc.StatusCode.DEADLINE_EXCEEDED, CORE_INTERNAL)
    assert not _process_gone(HopError("127.0.0.1:1", *sent))
