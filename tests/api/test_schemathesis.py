"""Fuzz the HTTP API with schemathesis against the node's own OpenAPI document (GET /openapi.json).

A real node (tiny random Llama, economy and encryption on, so every route family is registered) gets
at least 1,000 generated requests across every operation, valid and invalid. No answer may be a 5xx,
every 4xx must carry the one error schema, no stream may end in an error, and /health still answers.
Generation is bounded (api.max_tokens_limit=4) so the test fits CI on two cores.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from openhydra.api.app import create_app
from openhydra.api.errors import ErrorBody
from openhydra.api.openapi import build_document
from openhydra.api.state import NodeState
from openhydra.config.schema import ApiConfig
from openhydra.testing.processes import NodeProcess

MAX_TOKENS = 4
EXAMPLES_PER_MODE = 50  # per operation and generation mode; the test asserts >= MIN_CASES in all
MIN_CASES = 1000
ECONOMY_PATHS = {"/v1/account/balance", "/v1/hydra/stake", "/v1/hydra/unstake", "/v1/hydra/channels/open",
                 "/v1/hydra/channels/update", "/v1/hydra/channels/close"}


@pytest.fixture(scope="module")
def fuzz_node(tiny_model_dirs, tmp_path_factory) -> Iterator[NodeProcess]:
    data = tmp_path_factory.mktemp("fuzz-node")
    overrides = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "hardware.dtype=float32",
                 f"node.data_dir={data}", "economy=hydra", "privacy=encrypted",
                 "api.rate_limit_requests=100000", f"api.max_tokens_limit={MAX_TOKENS}",
                 f"api.default_max_tokens={MAX_TOKENS}"]
    with NodeProcess(overrides, threads=1) as node:
        yield node


def test_document_lists_economy_routes_only_when_registered() -> None:
    app = create_app(NodeState(), ApiConfig())
    doc = build_document(app)
    assert doc["openapi"].startswith("3.1")
    assert not ECONOMY_PATHS & set(doc["paths"])
    assert {"/health", "/v1/chat/completions", "/api/chat", "/v1/models/{model_id}"} <= set(doc["paths"])
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "ErrorBody" in doc["components"]["schemas"]


def _error_body_problem(response: requests.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return f"4xx body is not JSON: {response.text[:200]!r}"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"4xx body is not the error schema: {body!r:.200}"
    if set(body["error"]) != {"message", "type", "param", "code"}:
        return f"4xx error has fields {sorted(body['error'])}"
    ErrorBody.model_validate(body)
    if "Traceback" in body["error"]["message"] or ".py" in body["error"]["message"]:
        return f"4xx message leaks server internals: {body['error']['message'][:200]!r}"
    return None


def _aim(case: Any, served: str, aim: bool) -> Any:
    """Point about half the generated requests at the served model, with a max_tokens the node accepts,
    so the fuzzer reaches the generation code and not only the 404 for an unknown model."""
    if not aim:
        return case
    if isinstance(case.body, dict):
        if "model" in case.body or case.operation.path.startswith(("/v1/c", "/api/")):
            case.body["model"] = served
        for key in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
                case.body[key] = value % MAX_TOKENS + 1
        options = case.body.get("options")
        if isinstance(options, dict) and isinstance(options.get("num_predict"), int):
            options["num_predict"] = max(-2, min(options["num_predict"], MAX_TOKENS))
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = served
    return case


def _curl(case: Any) -> str:
    command = case.as_curl_command()
    return command if len(command) <= 800 else command[:800] + " ..."


def _metric_samples(text: str, name: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out.append((labels, float(value)))
    return out


class FuzzRun:
    """Sends generated cases and collects what went wrong, without stopping at the first problem."""

    def __init__(self, session: requests.Session) -> None:
        self.session = session
        self.per_operation: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []

    def fuzz(self, op: Any, mode: schemathesis.GenerationMode, served: str) -> None:
        strategy = st.builds(_aim, op.as_strategy(generation_mode=mode), st.just(served), st.booleans())

        @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def send(case: Any) -> None:
            self.send(case, f"{op.label} [{mode.value}]")

        send()

    def send(self, case: Any, label: str) -> None:
        try:
            response = case.call(session=self.session, timeout=60)
        except requests.RequestException as exc:  # a hang or a dropped connection is a bug too
            self.problems.append(f"{label}: {type(exc).__name__}: {exc}\n  {_curl(case)}")
            return
        self.per_operation[case.operation.label] += 1
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.problems.append(f"{label}: {response.status_code} {response.text[:300]!r}\n"
                                 f"  {_curl(case)}")
        elif response.status_code >= 400:
            problem = _error_body_problem(response)
            if problem:
                self.problems.append(f"{label}: {problem}\n  {_curl(case)}")


def _server_errors(metrics: str) -> dict[str, float]:
    return {labels: value for labels, value in _metric_samples(metrics, "openhydra_http_requests_total")
            if re.search(r'status="5\d\d"', labels)}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_finds_no_server_errors(fuzz_node: NodeProcess) -> None:
    base = fuzz_node.url
    served = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert paths >= ECONOMY_PATHS, "an economy node documents its economy routes"

    # /readyz answered 503 while the node loaded; only 5xx counted from here on are the fuzzer's
    server_errors_before = _server_errors(httpx.get(base + "/metrics", timeout=10).text)
    run = FuzzRun(requests.Session())
    started = time.monotonic()
    for op in operations:
        run.fuzz(op, schemathesis.GenerationMode.POSITIVE, served)
        if op.body:
            run.fuzz(op, schemathesis.GenerationMode.NEGATIVE, served)
        elif op.path_parameters or op.query:
            # A string in the path or query has few invalid values (none at all for an optional one).
            with contextlib.suppress(Unsatisfiable):
                run.fuzz(op, schemathesis.GenerationMode.NEGATIVE, served)
    per_operation, statuses, problems = run.per_operation, run.statuses, run.problems

    cases = sum(per_operation.values())
    elapsed = time.monotonic() - started
    print(f"\nschemathesis: {cases} cases over {len(per_operation)} operations in {elapsed:.0f} s; "
          f"statuses {dict(sorted(statuses.items()))}")
    for label, n in sorted(per_operation.items()):
        print(f"  {n:5d}  {label}")
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:10])
    assert cases >= MIN_CASES
    assert set(per_operation) == {op.label for op in operations}, "every operation was exercised"

    health = httpx.get(base + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(base + "/metrics", timeout=10).text
    stream_errors = _metric_samples(metrics, "openhydra_stream_errors_total")
    assert all(value == 0 for _, value in stream_errors), f"streams ended in an error: {stream_errors}"
    assert _server_errors(metrics) == server_errors_before, "the node counted 5xx answers (streams included)"
