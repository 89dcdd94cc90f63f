"""The SDK's retries against a real HTTP server on loopback that answers 429/503 with Retry-After, then 200.

The server (http.server in a thread) plays a script of answers and records when each request arrived,
so the tests check the waits the client really honoured, that attempts are bounded, and that what is
left is raised as a typed error carrying the server's OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from openhydra.sdk import (
    APIConnectionError,
    AsyncOpenHydra,
    BadRequestError,
    OpenHydra,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
    StreamError,
)
from openhydra.sdk.retry import parse_retry_after

BALANCE = {"object": "account.balance", "enabled": True, "mode": "barter", "peer_id": "12D3KooWtest", "credits": 1.5,
           "hydra": 0.0, "stake": 0.0, "escrow": 0.0, "open_channels": 0,
           "micro": {"credits": 1_500_000, "hydra": 0, "stake": 0, "escrow": 0}}
BUSY = {"error": {"message": "no chain covers the model", "type": "service_unavailable", "param": None,
                  "code": "no_route"}}
LIMITED = {"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "param": None,
                     "code": "rate_limited"}}
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hel"}, "finish_reason": None}]}


class Scripted(BaseHTTPRequestHandler):
    script: list[tuple[int, dict[str, str], object]] = []
    arrivals: list[tuple[float, str, str]] = []
    auth: list[str | None] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        type(self).arrivals.append((time.monotonic(), self.path, body))
        type(self).auth.append(self.headers.get("authorization"))
        status, headers, payload = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "text/event-stream" if isinstance(payload, str) else "application/json")
        self.send_header("content-length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[Scripted]]]:
    handler = type("Handler", (Scripted,), {"script": [], "arrivals": [], "auth": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def _gaps(handler: type[Scripted]) -> list[float]:
    times = [t for t, _, _ in handler.arrivals]
    return [b - a for a, b in itertools.pairwise(times)]


def test_retry_after_is_honoured_then_the_answer_is_returned(server):
    url, handler = server
    handler.script = [(429, {"Retry-After": "1"}, LIMITED), (503, {"Retry-After": "0.4"}, BUSY),
                      (200, {"X-OpenHydra-Degradation-Reason": "fell back to tiny"}, BALANCE)]
    waits: list[tuple[int, float, int | None]] = []
    with OpenHydra(url + "/v1", api_key="s3cret", on_retry=lambda *a: waits.append(a)) as client:
        balance = client.balance()
    assert balance.micro.credits == 1_500_000 and balance.peer_id == "12D3KooWtest"
    assert balance.degradation_reason == "fell back to tiny"
    assert waits == [(1, 1.0, 429), (2, 0.4, 503)]
    gaps = _gaps(handler)
    assert len(gaps) == 2 and gaps[0] >= 0.98 and gaps[1] >= 0.38  # the server's waits, really waited
    assert gaps[0] < 1 + 5 and gaps[1] < 0.4 + 5  # and not much more (slack for a loaded machine)
    assert [p for _, p, _ in handler.arrivals] == ["/v1/account/balance"] * 3
    assert handler.auth == ["Bearer s3cret"] * 3


def test_attempts_are_bounded_and_the_error_body_is_kept(server):
    url, handler = server
    handler.script = [(503, {"Retry-After": "0"}, BUSY)]
    with OpenHydra(url, retry=RetryPolicy(max_attempts=3)) as client, pytest.raises(ServiceUnavailableError) as err:
        client.network_status()
    assert len(handler.arrivals) == 3
    assert err.value.attempts == 3 and err.value.status_code == 503
    assert (err.value.error.message, err.value.error.type, err.value.code) == (
        "no chain covers the model", "service_unavailable", "no_route")
    assert err.value.retry_after == "0"


def test_a_retry_after_beyond_the_limit_is_not_waited_for(server):
    url, handler = server
    handler.script = [(429, {"Retry-After": "120"}, LIMITED)]
    began = time.monotonic()
    with OpenHydra(url, retry=RetryPolicy(max_wait_s=60)) as client, pytest.raises(RateLimitError) as err:
        client.balance()
    assert time.monotonic() - began < 30 and len(handler.arrivals) == 1  # far under the 60 s limit, 120 s asked
    assert err.value.code == "rate_limited"


def test_without_retry_after_the_backoff_grows_exponentially(server):
    url, handler = server
    handler.script = [(503, {}, BUSY), (503, {}, BUSY), (200, {}, BALANCE)]
    waits: list[float] = []
    policy = RetryPolicy(backoff_base_s=0.2)
    with OpenHydra(url, retry=policy, on_retry=lambda _a, wait, _s: waits.append(wait)) as client:
        client.balance()
    assert 0.1 <= waits[0] <= 0.2 and 0.2 <= waits[1] <= 0.4  # base * 2**(n-1), jittered down to half
    assert all(g >= w - 0.01 for g, w in zip(_gaps(handler), waits, strict=True))


def test_other_errors_are_not_retried_and_are_typed(server):
    url, handler = server
    handler.script = [(400, {}, {"error": {"message": "max_tokens must be >= 1", "type": "invalid_request_error",
                                           "param": "max_tokens", "code": None}})]
    with OpenHydra(url) as client, pytest.raises(BadRequestError) as err:
        client.chat([{"role": "user", "content": "hi"}], model="m", max_tokens=-1)
    assert len(handler.arrivals) == 1 and err.value.error.param == "max_tokens"
    sent = json.loads(handler.arrivals[0][2])
    assert sent == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}


def test_stream_retries_then_surfaces_the_header_and_a_mid_stream_error(server):
    url, handler = server
    body = f"data: {json.dumps(CHUNK)}\n\n: ping\n\ndata: {json.dumps(LIMITED)}\n\ndata: [DONE]\n\n"
    handler.script = [(429, {"Retry-After": "0.2"}, LIMITED),
                      (200, {"X-OpenHydra-Degradation-Reason": "smaller"}, body)]
    with OpenHydra(url) as client:
        stream = client.chat_stream([{"role": "user", "content": "hi"}], model="m")
        assert stream.degradation_reason == "smaller" and stream.attempts == 2
        seen = []
        with pytest.raises(StreamError, match="rate limit exceeded"):
            for chunk in stream:
                seen.append(chunk.text)
    assert seen == ["hel"]
    assert json.loads(handler.arrivals[-1][2])["stream"] is True


def test_async_client_honours_retry_after_too(server):
    url, handler = server
    handler.script = [(503, {"Retry-After": "0.5"}, BUSY), (200, {}, BALANCE)]

    async def run() -> float:
        async with AsyncOpenHydra(url) as client:
            return (await client.balance()).credits

    assert asyncio.run(run()) == 1.5
    assert len(handler.arrivals) == 2 and _gaps(handler)[0] >= 0.48


def test_connection_refused_is_retried_then_typed():
    waits: list[tuple[float, int | None]] = []
    client = OpenHydra("http://127.0.0.1:9", retry=RetryPolicy(max_attempts=2, backoff_base_s=0.05),
                       on_retry=lambda _a, wait, status: waits.append((wait, status)))
    with client, pytest.raises(APIConnectionError):
        client.balance()
    assert len(waits) == 1 and waits[0][1] is None


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0 ") == 0.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now=1445412480.0) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
