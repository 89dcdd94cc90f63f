"""Every request of the hostile corpus (hostile_cases.py) against a real node process: each gets a 2xx or a
typed 4xx with the one error body, never a 5xx or a dropped connection, and the node stays up throughout.

The node runs with the default config except: a bearer token (so the auth cases mean something), the economy
routes on (so every POST route is exercised), short body/header timeouts (so slow-request cases answer in
seconds) and a small max_tokens limit (so the generations the corpus starts stay short on two cores).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from openhydra.api.errors import ErrorBody, OllamaErrorBody
from openhydra.testing.processes import NodeProcess
from tests.api_edge.hostile_cases import (
    AUTH,
    BODY_TIMEOUT_S,
    JSON_ROUTES,
    MAX_TOKENS_LIMIT,
    TOKEN,
    Case,
    all_cases,
)
from tests.api_edge.rawhttp import RawResponse, exchange

CASES = all_cases()


@pytest.fixture(scope="module")
def corpus_node(tiny_model_dirs, tmp_path_factory) -> Iterator[NodeProcess]:
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={tmp_path_factory.mktemp('hostile')}", "economy=hydra", "privacy=encrypted",
                 f"api.bearer_token={TOKEN}", f"api.body_timeout_s={BODY_TIMEOUT_S}", "api.request_timeout_s=5",
                 f"api.max_tokens_limit={MAX_TOKENS_LIMIT}", "api.default_max_tokens=4",
                 "api.rate_limit_requests=1000000", "api.probe_rate_limit_requests=1000000"]
    with NodeProcess(overrides, threads=1) as node:
        yield node


def error_problem(response: RawResponse, path: str) -> str | None:
    """Why a 4xx answer does not carry the error body of its path (Ollama's under /api/), or None if it does."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.body[:200]!r}"
    if path.startswith("/api/"):
        if not isinstance(body, dict) or set(body) != {"error", "type", "param", "code"}:
            return f"not Ollama's error schema: {body!r:.200}"
        message = OllamaErrorBody.model_validate(body).error
    elif not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not the error schema: {body!r:.200}"
    elif set(body["error"]) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(body['error'])}"
    else:
        message = ErrorBody.model_validate(body).error.message
    if any(leak in message for leak in ("Traceback", 'File "', "site-packages", "/work/", "root:x:0:0")):
        return f"message leaks internals: {message[:200]!r}"
    return None


def test_corpus_covers_every_post_route(corpus_node: NodeProcess) -> None:
    doc = httpx.get(corpus_node.url + "/openapi.json", headers=AUTH, timeout=30).json()
    posts = {path for path, operations in doc["paths"].items() if "post" in operations}
    assert posts and posts <= set(JSON_ROUTES), posts - set(JSON_ROUTES)
    assert len(CASES) > 1000


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(corpus_node: NodeProcess, case: Case) -> None:
    response = exchange(corpus_node.port, case.data, timeout_s=case.timeout_s)
    assert response.status is not None, f"no answer ({response.error}); got {response.raw[:300]!r}"
    status = response.status
    if case.expect:
        assert status in case.expect, f"{status}, expected {case.expect}: {response.body[:300]!r}"
    else:
        assert 200 <= status < 300 or 400 <= status < 500, f"{status}: {response.body[:300]!r}"
    if status >= 400 and not case.data.startswith(b"HEAD "):
        path = case.data.split(b" ", 2)[1].decode("latin-1") if case.data.count(b" ") >= 2 else ""
        problem = error_problem(response, path)
        assert problem is None, f"{status}: {problem}"
        if case.code is not None:
            body = response.json()
            assert (body if path.startswith("/api/") else body["error"])["code"] == case.code, response.body[:300]
    if case.name == "slow-body":
        assert response.elapsed_s < BODY_TIMEOUT_S + 10, response.elapsed_s
    assert corpus_node.proc is not None and corpus_node.proc.poll() is None, "the node exited"


def test_node_survived_the_corpus(corpus_node: NodeProcess) -> None:
    """Runs after the corpus (file order): still serving, and nothing reached the catch-all 500 handler."""
    with httpx.Client(base_url=corpus_node.url, headers=AUTH, timeout=30) as http:
        assert http.get("/health").status_code == 200
        answer = http.post("/v1/chat/completions", json={"model": "tiny-llama-8l", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "still up?"}]})
        assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "length"
        metrics = http.get("/metrics").text
    server_errors = [line for line in metrics.splitlines() if line.startswith("openhydra_http_requests_total")
                     and 'status="5' in line and 'route="readyz",status="503"' not in line]  # 503: before ready
    assert not server_errors, server_errors
    log = corpus_node.log_text()
    assert "unhandled error" not in log and "uncaught" not in log, log[-3000:]
