"""Connection-level limits on a real node, over raw sockets from several loopback addresses (on Linux all of
127.0.0.0/8 is loopback, and a client socket bound to 127.0.0.2 is a different client IP to the server).

- api.body_timeout_s: a body that never finishes (short, trickled byte by byte, chunked without an end) is
  answered 408 and the connection closed within the bound, counted from the end of the headers;
- api.request_timeout_s: headers trickled a byte at a time (slowloris) get the same within 1.5x the bound, on a
  fresh connection and on a kept-alive one after an answered request (Sanic's own timer restarts on every byte);
- api.max_connections_per_ip: the N+1th open connection from one address gets 429 and is closed at once,
  while another address is served; trusted proxies are not capped;
- /health, /readyz and /metrics have their own per-client budget, apart from the API's;
- api.trusted_proxies: X-Forwarded-For counts only from a trusted peer, and its rightmost untrusted entry is
  the client.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import httpx
import pytest

from openhydra.testing.processes import NodeProcess
from openhydra.testing.wait import wait_until
from tests.api_edge.rawhttp import RawResponse, connect, exchange, parse, read_all, request_bytes

BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 4
API_LIMIT = 5
PROBE_LIMIT = 30
PROXY = "127.0.0.3"
SLACK_S = 6.0  # scheduling on two loaded cores; the point is seconds, not Sanic's 900 s response timeout
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def node(tiny_model_dirs, tmp_path_factory) -> Iterator[NodeProcess]:
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={tmp_path_factory.mktemp('limits')}", f"api.body_timeout_s={BODY_TIMEOUT_S}",
                 f"api.request_timeout_s={HEADER_TIMEOUT_S}",
                 f"api.max_connections_per_ip={MAX_CONNECTIONS}", f"api.rate_limit_requests={API_LIMIT}",
                 f"api.probe_rate_limit_requests={PROBE_LIMIT}", f"api.trusted_proxies=[{PROXY}/32]"]
    with NodeProcess(overrides, threads=1) as started:
        yield started


def client(source: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30)


_scrapers = itertools.cycle(f"127.0.1.{i}" for i in range(1, 255))


def metric(node: NodeProcess, name: str) -> float:
    with client(next(_scrapers)) as http:  # each scrape from its own address: polling stays under the probe limit
        for line in http.get(node.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def assert_408_and_closed(response: RawResponse, started: float) -> None:
    elapsed = time.monotonic() - started
    assert response.status == 408, response.raw[:300]
    assert response.json()["error"]["type"] == "timeout_error"
    assert response.headers.get("connection") == "close"
    assert response.error is None, f"read ended by {response.error}, not by the server closing"
    assert BODY_TIMEOUT_S - 0.2 <= elapsed <= BODY_TIMEOUT_S + SLACK_S, elapsed


def slow_headers(content_length: int | None = 1000, path: str = CHAT, method: str = "POST",
                 chunked: bool = False) -> bytes:
    headers = {"Content-Type": "application/json", **({"Transfer-Encoding": "chunked"} if chunked else {})}
    return request_bytes(method, path, None, headers, content_length=content_length)


def test_short_body_gets_408_within_the_bound(node: NodeProcess) -> None:
    with connect(node.port, "127.0.0.10") as sock:
        sock.sendall(slow_headers(1000) + b'{"model": ')  # 10 of the 1,000 bytes promised
        started = time.monotonic()
        raw, error = read_all(sock)
    response = parse(raw)
    response.error = error
    assert_408_and_closed(response, started)


def test_trickled_body_does_not_extend_the_deadline(node: NodeProcess) -> None:
    """One byte every 0.2 s: Sanic's own timers restart on every byte; the body deadline does not."""
    with connect(node.port, "127.0.0.10") as sock:
        sock.sendall(slow_headers(1000))
        started = time.monotonic()
        sock.settimeout(0.2)
        sent, raw = 0, b""
        while time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" ")
                sent += 1
                continue
            if not chunk:
                break
            raw += chunk
    response = parse(raw)
    assert_408_and_closed(response, started)
    assert 0 < sent < 1000


def _trickle(sock, data: bytes, limit_s: float) -> tuple[bytes, int]:
    """Send ``data`` a byte every 0.2 s (never all of it), reading what comes back; (what came, bytes sent)."""
    sock.settimeout(0.2)
    started, sent, raw = time.monotonic(), 0, b""
    while time.monotonic() - started < limit_s and sent < len(data) - 1:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            sock.sendall(data[sent : sent + 1])
            sent += 1
            continue
        if not chunk:
            break
        raw += chunk
    return raw, sent


def test_trickled_headers_get_408_within_the_header_bound(node: NodeProcess) -> None:
    """Slowloris: a byte of headers every 0.2 s. Sanic's request timeout restarts on every byte; the header
    deadline does not (api/connections.py), on a fresh connection and on one kept alive after a request."""
    before = metric(node, "openhydra_http_header_timeouts_total")
    headers = slow_headers(None, path="/v1/models", method="GET") + b"X-Padding: " + b"a" * 200
    for kept_alive in (False, True):
        with connect(node.port, "127.0.0.11") as sock:
            if kept_alive:  # one whole request answered first on this connection, which stays open
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                sock.settimeout(30)
                first = b""
                while b"\r\n\r\n" not in first or len(first.split(b"\r\n\r\n", 1)[1]) < int(
                        parse(first.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n").headers["content-length"]):
                    first += sock.recv(65536)
                assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
            started = time.monotonic()
            raw, sent = _trickle(sock, headers, 1.5 * HEADER_TIMEOUT_S + SLACK_S)
        elapsed = time.monotonic() - started
        response = parse(raw)
        assert response.status == 408, (kept_alive, raw[:300])
        assert response.json()["error"]["type"] == "timeout_error"
        assert HEADER_TIMEOUT_S - 0.2 <= elapsed <= 1.5 * HEADER_TIMEOUT_S + SLACK_S, elapsed
        assert 0 < sent < len(headers) - 1
    assert metric(node, "openhydra_http_header_timeouts_total") - before == 2


def test_chunked_body_without_an_end_gets_408(node: NodeProcess) -> None:
    with connect(node.port, "127.0.0.10") as sock:
        sock.sendall(slow_headers(None, chunked=True) + b"4\r\n{\"a\"\r\n")
        started = time.monotonic()
        raw, error = read_all(sock)
    response = parse(raw)
    response.error = error
    assert_408_and_closed(response, started)


def test_route_that_ignores_its_body_answers_then_closes(node: NodeProcess) -> None:
    """GET with a body that never comes: the answer goes out at once, the connection does not linger."""
    with connect(node.port, "127.0.0.10") as sock:
        sock.sendall(slow_headers(1000, path="/health", method="GET").replace(b"Connection: close", b"X-A: b"))
        started = time.monotonic()
        raw, error = read_all(sock)
    assert error is None
    assert parse(raw).status == 200
    assert time.monotonic() - started <= BODY_TIMEOUT_S + SLACK_S


def test_n_plus_first_connection_from_one_ip_is_refused(node: NodeProcess) -> None:
    # silent connections: held until Sanic's keep-alive timeout (30 s), far longer than this test
    held = [connect(node.port, "127.0.0.11") for _ in range(MAX_CONNECTIONS)]
    try:
        refused = exchange(node.port, b"", source="127.0.0.11", timeout_s=10)
        assert refused.status == 429, refused.raw[:300]
        assert refused.json()["error"]["code"] == "too_many_connections"
        assert refused.elapsed_s < 5
        with client("127.0.0.2") as other:  # another address is served meanwhile
            assert other.get(node.url + "/health").status_code == 200
        assert metric(node, "openhydra_http_connections_refused_total") >= 1
    finally:
        for sock in held:
            sock.close()
    # once they are gone, the address may connect again
    wait_until(lambda: exchange(node.port, request_bytes("GET", "/health"), source="127.0.0.11").status == 200,
               timeout_s=30, what="a new connection from 127.0.0.11 admitted after the held ones closed")


def test_the_refusal_speaks_the_api_the_request_names(node: NodeProcess) -> None:
    """Over the cap, a request under /api/ gets Ollama's error shape (the ollama client reads a string) and one
    under /v1/ OpenAI's (the openai client reads error.message); the refusal still parses nothing but the
    request line, and comes at once."""
    import ollama
    import openai

    held = [connect(node.port, "127.0.0.14") for _ in range(MAX_CONNECTIONS)]
    try:
        transport = httpx.HTTPTransport(local_address="127.0.0.14")
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=node.url, transport=transport).list()
        assert refused.value.status_code == 429
        assert refused.value.error.startswith("too many open connections from this address"), refused.value.error
        openai_client = openai.OpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0,
                                      http_client=httpx.Client(transport=httpx.HTTPTransport(
                                          local_address="127.0.0.14")))
        with pytest.raises(openai.RateLimitError) as limited:
            openai_client.models.list()
        assert limited.value.body["code"] == "too_many_connections", limited.value.body
        started = time.monotonic()
        raw = exchange(node.port, request_bytes("GET", "/api/tags"), source="127.0.0.14", timeout_s=10)
        assert raw.status == 429 and raw.json()["code"] == "too_many_connections", raw.raw[:300]
        assert time.monotonic() - started < 1.0  # the request line picked the shape: no wait for the timer
    finally:
        for sock in held:
            sock.close()


def test_silent_refused_connections_are_answered_and_their_wait_is_bounded(node: NodeProcess) -> None:
    """More silent connections over the cap than may wait for a request line (64): every one gets its 429 (those
    past the bound at once, the others after the 1 s wait), and the count of waiting ones goes back to 0."""
    from openhydra.api.connections import MAX_PENDING_REFUSALS

    held = [connect(node.port, "127.0.0.15") for _ in range(MAX_CONNECTIONS)]
    extra = [connect(node.port, "127.0.0.15") for _ in range(MAX_PENDING_REFUSALS + 16)]
    try:
        statuses = []
        for sock in extra:
            sock.settimeout(10.0)
            statuses.append(parse(sock.recv(65536)).status)
        assert statuses == [429] * len(extra), statuses
        assert metric(node, "openhydra_http_refusals_pending") == 0
    finally:
        for sock in held + extra:
            sock.close()


def test_a_flood_from_one_ip_holds_at_most_the_cap(node: NodeProcess) -> None:
    socks = [connect(node.port, "127.0.0.12") for _ in range(MAX_CONNECTIONS * 5)]
    try:
        answers: list[RawResponse | None] = []
        for sock in socks:
            sock.settimeout(3.0)  # refusals come at once; an admitted, silent connection gets nothing for 30 s
            try:
                answers.append(parse(sock.recv(65536)))
            except TimeoutError:
                answers.append(None)

        def open_connections() -> float | None:
            value = metric(node, "openhydra_http_open_connections")
            return value if value == MAX_CONNECTIONS + 1 else None  # + the scrape's own connection

        assert wait_until(open_connections, timeout_s=30, interval_s=0.3, what="only the cap left open")
    finally:
        for sock in socks:
            sock.close()
    held = [a for a in answers if a is None]
    refused = [a for a in answers if a is not None and a.status == 429]
    assert len(held) == MAX_CONNECTIONS and len(refused) == MAX_CONNECTIONS * 4, [a and a.status for a in answers]
    assert answers[:MAX_CONNECTIONS] == [None] * MAX_CONNECTIONS  # the first ones in are the ones kept


def test_probes_have_their_own_limit(node: NodeProcess) -> None:
    with client("127.0.0.13") as http:
        api = [http.get(node.url + "/v1/models").status_code for _ in range(API_LIMIT + 1)]
        assert api == [200] * API_LIMIT + [429]
        probes = [http.get(node.url + path) for path in ("/health", "/readyz", "/metrics") * (PROBE_LIMIT // 3)]
        assert all(r.status_code == 200 for r in probes), [r.status_code for r in probes]
        assert probes[-1].headers["X-RateLimit-Limit"] == str(PROBE_LIMIT)
        assert probes[-1].headers["X-RateLimit-Remaining"] == "0"
        refused = http.get(node.url + "/health")
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert http.get(node.url + "/v1/models").status_code == 429  # the API budget is still spent


def test_forwarded_for_is_ignored_from_an_untrusted_peer(node: NodeProcess) -> None:
    with client("127.0.0.14") as http:
        codes = [http.get(node.url + "/v1/models", headers={"X-Forwarded-For": f"198.51.100.{i}"}).status_code
                 for i in range(API_LIMIT + 1)]
    assert codes == [200] * API_LIMIT + [429]  # a fresh XFF per request buys no fresh budget


def test_forwarded_for_from_a_trusted_proxy_names_the_client(node: NodeProcess) -> None:
    def ask(http: httpx.Client, forwarded_for: str) -> int:
        return http.get(node.url + "/v1/models", headers={"X-Forwarded-For": forwarded_for}).status_code

    with client(PROXY) as http:
        assert [ask(http, "203.0.113.9") for _ in range(API_LIMIT)] == [200] * API_LIMIT
        assert ask(http, "203.0.113.9") == 429
        # the client cannot escape by prepending addresses: the rightmost untrusted entry is the client
        assert ask(http, "198.51.100.77, 203.0.113.9") == 429
        # trusted hops on the right are skipped
        assert ask(http, f"203.0.113.9, {PROXY}") == 429
        # another client behind the same proxy has its own budget, and so does the proxy itself
        assert ask(http, "203.0.113.10") == 200
        assert http.get(node.url + "/v1/models").status_code == 200


def test_trusted_proxy_connections_are_not_capped(node: NodeProcess) -> None:
    socks = [connect(node.port, PROXY) for _ in range(MAX_CONNECTIONS + 2)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(request_bytes("GET", "/health", headers={"X-Forwarded-For": f"192.0.2.{i}"}))
        statuses = [parse(read_all(sock)[0]).status for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [200] * len(socks)
