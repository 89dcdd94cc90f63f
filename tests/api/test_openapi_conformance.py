"""The OpenAPI document and the server agree, case by case (issue #15, item 5), on a real node process.

Each body below is sent to a real node and checked against the node's own document (GET /openapi.json,
validated with jsonschema-rs, as schemathesis does): a body the document calls invalid gets a 400, a
body it calls valid does not. Then the answers themselves: a JSON answer and every SSE event of a stream
match the schemas the document declares for them. tests/api/test_schemathesis.py fuzzes the same
agreement with thousands of generated cases; these are the cases the issue named.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema_rs
import pytest
from safetensors import safe_open

from openhydra.testing.processes import NodeProcess

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def node(tiny_node: NodeProcess) -> dict[str, Any]:
    doc = httpx.get(tiny_node.url + "/openapi.json", timeout=10).json()
    served = httpx.get(tiny_node.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    return {"url": tiny_node.url, "doc": doc, "served": served}


def _validator(doc: dict, schema: dict) -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for({**schema, "components": doc["components"]})


def _body_validator(doc: dict, path: str) -> jsonschema_rs.Validator:
    return _validator(doc, doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


def _chat(served: str, **fields: Any) -> dict:
    return {"model": served, "messages": MESSAGES, "max_tokens": 2, **fields}


def _completion(served: str, **fields: Any) -> dict:
    return {"model": served, "prompt": "Hello", "max_tokens": 2, **fields}


def _generate(served: str, **fields: Any) -> dict:
    return {"model": served, "prompt": "Hi", "stream": False, **fields}


def _show(served: str, **fields: Any) -> dict:
    return fields


def _case_id(value: Any) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", None) or json.dumps(value)[:40]


INVALID = [  # coerced by pydantic's lax mode before: the document says integer / boolean
    ("/v1/chat/completions", _chat, {"top_k": False}),
    ("/v1/chat/completions", _chat, {"seed": False}),
    ("/v1/chat/completions", _chat, {"max_tokens": "4"}),
    ("/v1/chat/completions", _chat, {"max_tokens": True}),
    ("/v1/chat/completions", _chat, {"stream": True, "stream_options": {"include_usage": 0}}),
    ("/v1/chat/completions", _chat, {"temperature": "0.5"}),
    ("/v1/chat/completions", _chat, {"n": 1.5}),
    ("/v1/chat/completions", _chat, {"stop": ["x"] * 17}),
    ("/v1/completions", _completion, {"max_tokens": "4"}),
    ("/v1/completions", _completion, {"prompt": ["a", "b"]}),
    ("/v1/completions", _completion, {"echo": 1}),
    ("/api/generate", _generate,
     {"options": {"num_predict": "2"}}),
    ("/api/generate", _generate,
     {"raw": 0}),
    ("/api/generate", _generate,
     {"images": ["aGk="]}),
    ("/api/show", _show, {"model": None, "name": ""}),
    # what the routes refuse beyond the models' fields (api/features.py), documented since the 2026-12-06 audit
    ("/v1/chat/completions", _chat, {"presence_penalty": 0.5}),
    ("/v1/chat/completions", _chat, {"min_p": 0.1}),
    ("/v1/chat/completions", _chat, {"modalities": ["text", "audio"]}),
    ("/v1/chat/completions", _chat, {"modalities": "text"}),
    ("/v1/chat/completions", _chat, {"functions": [{"name": "f"}]}),
    ("/v1/completions", _completion, {"function_call": "auto"}),
    ("/api/generate", _generate, {"options": {"repeat_penalty": 1.3}}),
    ("/api/generate", _generate, {"options": {"num_ctx": 0}}),
    ("/api/generate", _generate, {"think": True}),
    ("/api/generate", _generate, {"template": "{{ .Prompt }}"}),
    ("/api/generate", _generate, {"context": [1, 2]}),
]

VALID = [  # refused before although the document allowed them
    ("/v1/completions", _completion, {"prompt": ""}),
    ("/v1/completions", _completion, {"prompt": [""]}),
    ("/v1/chat/completions", _chat, {"max_tokens": 2.0}),  # JSON Schema: 2.0 is an integer
    ("/v1/chat/completions", _chat, {"seed": 7, "top_k": 0, "n": 2}),
    ("/v1/chat/completions", _chat, {"unknown_new_field": {"x": 1}}),  # clients send new fields
    ("/api/generate", _generate,
     {"options": {"num_predict": 2, "seed": 3.0}}),
    ("/api/show", _show, {"model": None, "name": "x"}),  # 404, not 400
    ("/v1/chat/completions", _chat, {"presence_penalty": 0, "min_p": 0.0, "modalities": ["text"]}),
    ("/api/generate", _generate, {"think": False, "options": {"repeat_penalty": 1.1, "num_ctx": 99999}}),
]


@pytest.mark.parametrize(("path", "make", "fields"), INVALID, ids=_case_id)
def test_document_and_server_refuse_the_same_bodies(node, path, make, fields) -> None:
    body = make(node["served"], **fields)
    assert not _body_validator(node["doc"], path).is_valid(body), "the document should call this invalid"
    answer = httpx.post(node["url"] + path, json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    body = answer.json()
    if path.startswith("/api/"):  # Ollama's own shape there (api/errors.py)
        assert isinstance(body["error"], str) and body["error"] and body["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "make", "fields"), VALID, ids=_case_id)
def test_document_and_server_accept_the_same_bodies(node, path, make, fields) -> None:
    body = make(node["served"], **fields)
    _body_validator(node["doc"], path).validate(body)
    answer = httpx.post(node["url"] + path, json=body, timeout=60)
    assert answer.status_code in (200, 404), answer.text


def test_empty_prompt_completes_from_the_start_token(node) -> None:
    answer = httpx.post(node["url"] + "/v1/completions", timeout=60,
                        json={"model": node["served"], "prompt": "", "max_tokens": 3, "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == 1
    assert answer.json()["usage"]["completion_tokens"] >= 1


def test_the_max_tokens_limit_is_in_the_document(node) -> None:
    schemas = node["doc"]["components"]["schemas"]
    limit = next(b["maximum"] for b in schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"]
                 if b.get("type") == "integer")
    over = _chat(node["served"], max_tokens=limit + 1)
    assert not _body_validator(node["doc"], "/v1/chat/completions").is_valid(over)
    assert httpx.post(node["url"] + "/v1/chat/completions", json=over, timeout=60).status_code == 400
    # Over the limit in the field not used (max_completion_tokens wins): still outside the document, still a 400
    # (found by schemathesis: it was served).
    both = _chat(node["served"], max_tokens=limit + 1, max_completion_tokens=1)
    assert not _body_validator(node["doc"], "/v1/chat/completions").is_valid(both)
    answer = httpx.post(node["url"] + "/v1/chat/completions", json=both, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "max_tokens", answer.text
    num_predict = schemas["OllamaOptions"]["properties"]["num_predict"]["anyOf"][0]
    assert num_predict["maximum"] == limit
    load = {"model": node["served"], "prompt": "", "options": {"num_predict": limit + 1}}  # the "load" answer too
    assert httpx.post(node["url"] + "/api/generate", json=load, timeout=60).status_code == 400


def _response_content(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["responses"]["200"]["content"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_and_sse_answers_match_their_declared_schemas(node, path) -> None:
    make = _chat if path == "/v1/chat/completions" else _completion
    content = _response_content(node["doc"], path)
    assert set(content) == {"application/json", "text/event-stream"}

    answer = httpx.post(node["url"] + path, json=make(node["served"]), timeout=60)
    assert answer.headers["content-type"].startswith("application/json")
    _validator(node["doc"], content["application/json"]["schema"]).validate(answer.json())

    event_schema = content["text/event-stream"]["schema"]
    chunk_schema = event_schema["properties"]["data"]["else"]["contentSchema"]
    chunks = _validator(node["doc"], chunk_schema)
    body = make(node["served"], stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", node["url"] + path, json=body, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 3
    for payload in data[:-1]:
        chunks.validate(json.loads(payload))


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_ndjson_streams_match_their_declared_schema(node, path) -> None:
    content = _response_content(node["doc"], path)
    assert set(content) == {"application/json", "application/x-ndjson"}
    lines_schema = _validator(node["doc"], content["application/x-ndjson"]["schema"])
    body = {"model": node["served"], "options": {"num_predict": 3},
            **({"prompt": "Hi"} if path == "/api/generate" else {"messages": MESSAGES})}
    with httpx.stream("POST", node["url"] + path, json=body, timeout=60) as stream:
        assert stream.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in stream.iter_lines() if line.strip()]
    assert lines[-1]["done"] is True
    lines_schema.validate(lines)


def test_show_reports_the_source_dtype_of_a_safetensors_folder(node, tiny_llama) -> None:
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()  # e.g. "F32"
    show = httpx.post(node["url"] + "/api/show", json={"model": node["served"]}, timeout=10).json()
    assert show["details"]["quantization_level"] == "F32"  # what it serves (a float32 node)
    assert show["model_info"]["openhydra.source_quantization"] == dtype
    assert show["details"]["format"] == "safetensors"
    assert show["model_info"]["openhydra.served_dtype"] == "float32"
