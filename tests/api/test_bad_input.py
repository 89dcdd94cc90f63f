"""Bad input gets a clear JSON error with the right status, never a 5xx, and the node stays up."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

MODEL = "tiny-llama-8l"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def http(tiny_node):
    with httpx.Client(base_url=tiny_node.url, timeout=30) as client:
        yield client


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (CHAT, b"{not json", 400, None),
        (CHAT, b"[1, 2, 3]", 400, None),
        (CHAT, b'["a", "b"]', 400, None),
        (CHAT, b"", 400, None),
        (CHAT, json.dumps({"model": MODEL}).encode(), 400, "messages"),
        (CHAT, json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "messages[0].role"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(),
         400, "max_tokens"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"})
         .encode(), 400, "temperature"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9})
         .encode(), 400, "max_tokens"),
        (CHAT, json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}).encode(), 400,
         "n"),
        (CHAT, json.dumps({"model": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode(), 400, "prompt"),
        ("/api/generate", json.dumps({"model": MODEL, "prompt": "x", "options": {"num_predict": -7}}).encode(), 400,
         "options.num_predict"),
        ("/api/chat", json.dumps({"model": MODEL, "messages": [{"role": "user"}], "options": []}).encode(), 400,
         "options"),
        (CHAT, json.dumps({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
        ("/api/chat", json.dumps({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
         "model"),
    ],
)
def test_bad_requests_get_typed_errors(http, path, body, status, param):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param
    assert "Traceback" not in error["message"] and "/work" not in error["message"]


def test_body_over_limit_is_413(http):
    response = http.post(CHAT, content=b"x" * (2 << 20))
    assert response.status_code == 413
    error_of(response)


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").status_code == 404
    error_of(http.get("/v1/nothing"))
    response = http.get(CHAT)
    assert response.status_code == 405
    error_of(response)


def test_context_overflow_is_400(http):
    long_text = "word " * 5000
    response = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded"


def test_health_readyz_metrics(http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert http.get("/readyz").status_code == 200
    http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("openhydra_http_requests_total", "openhydra_http_request_duration_seconds_bucket",
                 "openhydra_tokens_generated_total", "openhydra_time_to_first_token_seconds_bucket"):
        assert name in text
    assert 'status="400"' in text  # the bad requests above were counted, not crashed on


def _active_sessions(http) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("openhydra_active_sessions "):
            return float(line.split()[1])
    raise AssertionError("no openhydra_active_sessions metric")


def test_client_disconnect_mid_stream_frees_the_session(tiny_node, http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=tiny_node.url, timeout=30) as own, own.stream("POST", CHAT, json=body) as stream:
        lines = stream.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
        assert _active_sessions(http) == 1
    deadline = time.monotonic() + 10
    while _active_sessions(http) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _active_sessions(http) == 0
    assert "openhydra_client_disconnects_total" in http.get("/metrics").text
    assert http.get("/health").status_code == 200


def test_concurrent_requests_do_not_cross_streams(tiny_node, http):
    prompts = [f"Write about topic number {i}." for i in range(6)]

    def ask(prompt: str, stream: bool) -> str:
        # seeded sampling: each request has its own deterministic, distinct output
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                "temperature": 1.0, "seed": len(prompt) + ord(prompt[-2]), "stream": stream}
        with httpx.Client(base_url=tiny_node.url, timeout=60) as c:
            if not stream:
                return c.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
            text = ""
            with c.stream("POST", CHAT, json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        for choice in json.loads(line[6:])["choices"]:
                            text += choice["delta"].get("content") or ""
            return text

    sequential = [ask(p, False) for p in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, ask(prompts[i], i % 2 == 0)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == sequential
    assert len(set(sequential)) == len(prompts)


def test_rate_limit_headers_on_every_response(http):
    # probes count against their own budget (api.probe_rate_limit_requests, default 1200), the API against its own
    for path, limit in (("/health", "1200"), ("/v1/models", "100000"), ("/v1/nothing", "100000")):
        response = http.get(path)
        assert response.headers["X-RateLimit-Limit"] == limit
        assert int(response.headers["X-RateLimit-Remaining"]) >= 0
        assert int(response.headers["X-RateLimit-Reset"]) > 1_700_000_000  # epoch seconds
