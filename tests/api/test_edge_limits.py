"""Rate limiting (the spec's 120 requests / 60 s per IP) and bearer auth on a real node."""

from __future__ import annotations

import httpx
import openai
import pytest

from openhydra.testing.processes import NodeProcess

TOKEN = "s3cret-token-for-tests-0123456789"
APP_ORIGIN = "http://app.example:3000"


@pytest.fixture(scope="module")
def edge_node(tiny_model_dirs, tmp_path_factory):
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu",
                 f"node.data_dir={tmp_path_factory.mktemp('edge')}", f"api.bearer_token={TOKEN}",
                 f'api.cors_origins=["{APP_ORIGIN}"]']
    with NodeProcess(overrides) as node:
        yield node


def test_bearer_token_is_required_when_configured(edge_node):
    # runs first in this module: it spends 3 of the window's 120 API requests
    assert httpx.get(edge_node.url + "/v1/models").status_code == 401
    assert httpx.get(edge_node.url + "/health").status_code == 200  # probes stay public
    wrong = openai.OpenAI(base_url=edge_node.url + "/v1", api_key="wrong-token-wrong-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    right = openai.OpenAI(base_url=edge_node.url + "/v1", api_key=TOKEN, max_retries=0)
    assert [m.id for m in right.models.list().data] == ["tiny-llama-8l"]


def test_a_listed_origin_may_call_from_a_browser_with_the_token(edge_node):
    # runs before the 429 test: its requests come out of the same window
    asked = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
    preflight = httpx.options(edge_node.url + "/v1/chat/completions", headers=asked)  # no token: browsers send none
    assert preflight.status_code == 204, preflight.text
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    bearer = {"Authorization": f"Bearer {TOKEN}", "Origin": APP_ORIGIN}
    answer = httpx.get(edge_node.url + "/v1/models", headers=bearer)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "X-RateLimit-Remaining" in answer.headers["access-control-expose-headers"]
    assert httpx.get(edge_node.url + "/v1/models", headers={"Origin": APP_ORIGIN}).status_code == 401  # still


def test_an_origin_not_listed_gets_no_cors_answer(edge_node):
    other = "http://evil.example"
    preflight = httpx.options(edge_node.url + "/v1/chat/completions",
                              headers={"Origin": other, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and preflight.json()["error"]["code"] == "origin_not_allowed"
    answer = httpx.get(edge_node.url + "/v1/models", headers={"Authorization": f"Bearer {TOKEN}", "Origin": other})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


def test_121st_request_in_a_window_is_429_with_retry_after(edge_node):
    # an API route: /health, /readyz and /metrics have their own, larger budget (api.probe_rate_limit_requests)
    with httpx.Client(base_url=edge_node.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        first = http.get("/v1/models")
        assert first.headers["X-RateLimit-Limit"] == "120"
        used_before = 120 - int(first.headers["X-RateLimit-Remaining"])
        rest = [http.get("/v1/models") for _ in range(120 - used_before)]
        assert all(r.status_code == 200 for r in rest)
        assert rest[-1].headers["X-RateLimit-Remaining"] == "0"
        assert http.get("/health").status_code == 200  # probes still answer
        refused = http.get("/v1/models")
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
