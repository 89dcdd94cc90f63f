"""The node's own OpenAPI 3.1 document, served at ``GET /openapi.json``.

Built from the routes the app actually has (so the economy routes appear only where an economy
registered them) and from the same pydantic models the routes validate with (``model_json_schema``:
request bodies, the balance query), so the document and the server cannot disagree on what is valid.
The node's own limits go in too: ``max_tokens`` (and Ollama's ``num_predict``) have this node's
``api.max_tokens_limit`` as their maximum, and once the model is loaded, ``tools`` and a forced
``tool_choice`` are only offered if its chat template can express them (api/features.tool_syntax).
Success answers are described by protocol_responses.py; every operation documents its error schema for its
4xx and 5xx answers (OpenAI's, or Ollama's under ``/api/``: api/errors.py).

Streams, in OpenAPI 3.1 terms (3.2's ``itemSchema`` does not exist yet in 3.1):
- ``text/event-stream`` (OpenAI): ``schema`` describes one event, as schemathesis and other 3.1 readers
  take it. Its ``data`` is ``[DONE]`` or JSON (``contentMediaType``) holding a chunk or the error schema.
- ``application/x-ndjson`` (Ollama): ``schema`` describes the whole stream as an array of its lines,
  as OpenAPI 3.2 does for sequential media types; each line is a chunk or ``{"error": "..."}``.
The document is built on the first request, once every route is registered, and cached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra import __version__
from openhydra.api.errors import OLLAMA_PREFIX, ErrorBody, OllamaErrorBody
from openhydra.api.protocol_ollama import OllamaChatRequest, OllamaGenerateRequest, OllamaOptions, OllamaShowRequest
from openhydra.api.protocol_openai import ChatCompletionRequest, CompletionRequest
from openhydra.api.protocol_responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    OllamaChatResponse,
    OllamaGenerateResponse,
    OllamaStreamError,
)
from openhydra.api.routes_dashboard import SUMMARY_PATH, SUMMARY_SCHEMA, is_undocumented
from openhydra.api.routes_public import ReadyzQuery

OPENAPI_PATH = "/openapi.json"
REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>")

_OBJECT: dict[str, Any] = {"type": "object"}
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
SSE_END = "[DONE]"

Schema = dict[str, Any] | type[BaseModel]
"""A JSON schema, or a pydantic model whose schema goes into components."""


@dataclass(frozen=True)
class Op:
    """What the document says about one route and method."""

    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    status: int = 200
    schema: Schema = field(default_factory=lambda: dict(_OBJECT))
    stream: tuple[str, tuple[type[BaseModel], ...]] | None = None
    """(media type, the models one event or line can be) of the streamed answer, besides JSON."""
    content_type: str = "application/json"


_HEALTH = {"type": "object", "required": ["status", "uptime_s"],
           "properties": {"status": {"const": "ok"}, "uptime_s": {"type": "number"}}}
_VERSION = {"type": "object", "required": ["version"],
            "properties": {"version": {"type": "string"}, "openhydra": {"type": "string"}}}
_LIST = {"type": "object", "required": ["object", "data"],
         "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _OBJECT}}}
_MODELS = {"type": "object", "required": ["models"],
           "properties": {"models": {"type": "array", "items": _OBJECT}}}

OPERATIONS: dict[tuple[str, str], Op] = {
    ("GET", "/health"): Op("Liveness", "public", schema=_HEALTH),
    ("GET", "/readyz"): Op("Readiness: 200 once the model is loaded and (scope=route, the default) a chain of peers "
                           "covers it; 503 while loading, failed or with no route", "public", query=ReadyzQuery),
    ("GET", "/metrics"): Op("Prometheus metrics", "public", schema={"type": "string"},
                            content_type="text/plain"),
    ("GET", "/v1/network/status"): Op("The node, its model and its network", "public"),
    ("GET", OPENAPI_PATH): Op("This document", "public"),
    ("GET", "/v1/models"): Op("Models served here (OpenAI)", "openai", schema=_LIST),
    ("GET", "/v1/models/{model_id}"): Op("One served model (OpenAI)", "openai"),
    ("POST", "/v1/chat/completions"): Op("Chat completion (OpenAI)", "openai", body=ChatCompletionRequest,
                                         schema=ChatCompletion, stream=(SSE, (ChatCompletionChunk, ErrorBody))),
    ("POST", "/v1/completions"): Op("Text completion (OpenAI)", "openai", body=CompletionRequest,
                                    schema=Completion, stream=(SSE, (Completion, ErrorBody))),
    ("POST", "/api/generate"): Op("Generate (Ollama)", "ollama", body=OllamaGenerateRequest,
                                  schema=OllamaGenerateResponse,
                                  stream=(NDJSON, (OllamaGenerateResponse, OllamaStreamError))),
    ("POST", "/api/chat"): Op("Chat (Ollama)", "ollama", body=OllamaChatRequest, schema=OllamaChatResponse,
                              stream=(NDJSON, (OllamaChatResponse, OllamaStreamError))),
    ("GET", "/api/tags"): Op("Local models (Ollama)", "ollama", schema=_MODELS),
    ("GET", "/api/ps"): Op("Running models (Ollama)", "ollama", schema=_MODELS),
    ("POST", "/api/show"): Op("Model details (Ollama)", "ollama", body=OllamaShowRequest),
    ("GET", "/api/version"): Op("API version (Ollama)", "ollama", schema=_VERSION),
    ("GET", SUMMARY_PATH): Op("Everything the web dashboard at / shows, in one answer", "dashboard",
                              schema=SUMMARY_SCHEMA),
}


def _economy_operations() -> dict[tuple[str, str], Op]:
    from openhydra.api.routes_economy import (
        BalanceQuery,
        CloseChannelBody,
        OpenChannelBody,
        StakeBody,
        UpdateChannelBody,
    )

    return {
        ("GET", "/v1/account/balance"): Op("Credit and HYDRA balance", "economy", query=BalanceQuery),
        ("POST", "/v1/hydra/stake"): Op("Stake HYDRA", "economy", body=StakeBody),
        ("POST", "/v1/hydra/unstake"): Op("Unstake HYDRA", "economy", body=StakeBody),
        ("POST", "/v1/hydra/channels/open"): Op("Open a payment channel", "economy", body=OpenChannelBody,
                                                status=201),
        ("POST", "/v1/hydra/channels/update"): Op("Pay over a channel or record a signed update", "economy",
                                                  body=UpdateChannelBody),
        ("POST", "/v1/hydra/channels/close"): Op("Close a payment channel", "economy", body=CloseChannelBody),
    }


def openapi_path(sanic_uri: str) -> tuple[str, list[str]]:
    """'/v1/models/<model_id:path>' -> ('/v1/models/{model_id}', ['model_id'])"""
    names = _PARAM.findall(sanic_uri)
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", sanic_uri), names


def _error_response(description: str, path: str) -> dict[str, Any]:
    model = OllamaErrorBody if path.startswith(OLLAMA_PREFIX) else ErrorBody  # api/errors.py APIError.body_for
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}


def _ref(schema: Schema) -> dict[str, Any]:
    if isinstance(schema, dict):
        return schema
    return {"$ref": REF.format(model=schema.__name__)}


def _stream_content(media_type: str, models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    item = {"anyOf": [_ref(m) for m in models]}
    if media_type == SSE:  # one event: `data: [DONE]` or `data: <JSON>`
        data = {"type": "string", "if": {"const": SSE_END},
                "else": {"contentMediaType": "application/json", "contentSchema": item}}
        return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}
    return {"schema": {"type": "array", "items": item}}  # NDJSON: the whole stream, one item a line


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter's schema: absent is how it is left out, so its ``null`` branch goes."""
    branches = [b for b in schema.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) != 1:
        return schema
    return {**branches[0], **{k: v for k, v in schema.items() if k not in ("anyOf", "default")}}


def _query_params(model: type[BaseModel]) -> list[dict[str, Any]]:
    properties = model.model_json_schema()["properties"]
    return [{"name": name, "in": "query", "required": info.is_required(),
             "schema": _without_null(properties[name])} for name, info in model.model_fields.items()]


def _operation(op: Op, op_id: str, path: str, path_params: list[str]) -> dict[str, Any]:
    ok_content: dict[str, Any] = {op.content_type: {"schema": _ref(op.schema)}}
    if op.stream:
        ok_content[op.stream[0]] = _stream_content(*op.stream)
    out: dict[str, Any] = {
        "operationId": op_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": {
            str(op.status): {"description": "success", "content": ok_content},
            "4XX": _error_response("the request was refused (bad input, unknown model, rate limit, auth)", path),
            "5XX": _error_response("the node cannot serve it now (loading, no route through the swarm)", path),
        },
    }
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
              for n in path_params]
    if op.query is not None:
        params += _query_params(op.query)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(op.body)}}}
    return out


def _cap(schemas: dict[str, Any], model: type[BaseModel], name: str, maximum: int) -> None:
    """Put the node's limit on an integer field (or the integer branch of an optional one)."""
    prop = schemas.get(model.__name__, {}).get("properties", {}).get(name)
    if prop is None:
        return
    for branch in [prop, *prop.get("anyOf", [])]:
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def _tool_syntax(app: Sanic) -> str | None:
    """'hermes', 'json' or 'none' for the served model's chat template; None while no model is loaded."""
    state = getattr(app.ctx, "state", None)
    engine = getattr(state, "engine", None)
    if engine is None:
        return None
    from openhydra.api.errors import APIError
    from openhydra.api.features import tool_syntax

    try:
        return tool_syntax(engine)
    except APIError:  # the template renders the same prompt with and without tools
        return "none"


def _limit_tools(schemas: dict[str, Any], syntax: str) -> None:
    """No tools for a template without them; no forced tool call without <tool_call> syntax."""
    if syntax == "none":
        for model in (ChatCompletionRequest, OllamaChatRequest):
            for branch in schemas.get(model.__name__, {}).get("properties", {}).get("tools", {}).get("anyOf", []):
                if branch.get("type") == "array":
                    branch["maxItems"] = 0
    if syntax != "hermes":
        chat = schemas.get(ChatCompletionRequest.__name__, {}).get("properties", {})
        if "tool_choice" in chat:
            chat["tool_choice"] = {"anyOf": [{"enum": ["none", "auto"]}, {"type": "null"}], "default": None}


def _document_refusals(schemas: dict[str, Any]) -> None:
    """What the routes refuse beyond the models' own fields (api/features.py unsupported_fields and
    unsupported_ollama_fields), so a body the document calls valid is one the node takes."""
    from openhydra.api.features import NEUTRAL_SAMPLING, OLLAMA_DEFAULTS_ACCEPTED

    def or_null(schema: dict[str, Any], description: str) -> dict[str, Any]:  # null: as if left out
        return {"anyOf": [schema, {"type": "null"}], "description": description}

    def neutral(name: str, also: tuple = ()) -> dict[str, Any]:
        return or_null({"type": "number", "enum": [NEUTRAL_SAMPLING[name], *also]},
                       "not implemented: only its neutral value")

    openai_knobs = {name: neutral(name) for name in
                    ("frequency_penalty", "presence_penalty", "repetition_penalty", "min_p", "typical_p")}
    refused = {"type": "null", "description": "not supported (use tools / tool_choice)"}
    for model in (ChatCompletionRequest, CompletionRequest):
        props = schemas.get(model.__name__, {}).setdefault("properties", {})
        props.update({k: v for k, v in openai_knobs.items() if k not in props})
        props.setdefault("modalities", or_null({"type": "array", "items": {"const": "text"}}, "text only"))
        props.setdefault("functions", refused)
        props.setdefault("function_call", refused)
    options = schemas.get(OllamaOptions.__name__, {}).setdefault("properties", {})
    for name in NEUTRAL_SAMPLING:
        options.setdefault(name, neutral(name, OLLAMA_DEFAULTS_ACCEPTED.get(name, ())))
    options.setdefault("num_ctx", or_null({"type": "integer", "minimum": 1},
                                          "accepted; the whole context is served whatever it asks"))
    for model in (OllamaGenerateRequest, OllamaChatRequest):
        props = schemas.get(model.__name__, {}).setdefault("properties", {})
        props.setdefault("think", or_null({"const": False}, "false only: no separate thinking output"))
        props.setdefault("template", or_null({"type": "string", "maxLength": 0}, "not supported"))
        props.setdefault("suffix", or_null({"type": "string", "maxLength": 0}, "not supported"))
        props.setdefault("context", or_null({"type": "array", "maxItems": 0}, "not supported: use /api/chat"))


def _models_of(op: Op) -> list[type[BaseModel]]:
    found = [m for m in (op.body, op.schema) if isinstance(m, type)]
    return found + list(op.stream[1] if op.stream else ())


def build_document(app: Sanic) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the routes ``app`` has now."""
    routes: list[tuple[str, str, list[str]]] = []
    for route in app.router.routes:
        path, names = openapi_path(route.uri)
        if is_undocumented(path):  # the dashboard page and its static files are not JSON
            continue
        for method in sorted(route.methods):
            if method not in ("HEAD", "OPTIONS"):
                routes.append((method, path, names))
    known = dict(OPERATIONS)
    if any(path.startswith(("/v1/hydra/", "/v1/account/")) for _, path, _ in routes):
        known.update(_economy_operations())

    ops = {(m, p): known.get((m, p)) or Op(f"{m} {p}", "other") for m, p, _ in routes}
    models = sorted({m for op in ops.values() for m in _models_of(op)} | {ErrorBody, OllamaErrorBody},
                    key=lambda m: m.__name__)
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = defs.get("$defs", {})
    api = getattr(app.ctx, "api", None)
    if api is not None:  # above the limit the node answers 400, so the document says so
        for model, name in ((ChatCompletionRequest, "max_tokens"), (ChatCompletionRequest, "max_completion_tokens"),
                            (CompletionRequest, "max_tokens"), (OllamaOptions, "num_predict")):
            _cap(schemas, model, name, api.max_tokens_limit)
    syntax = _tool_syntax(app)
    if syntax is not None:
        _limit_tools(schemas, syntax)
    _document_refusals(schemas)

    paths: dict[str, dict[str, Any]] = {}
    for method, path, names in routes:
        op_id = re.sub(r"[^A-Za-z0-9]+", "_", f"{method.lower()} {path}").strip("_")
        paths.setdefault(path, {})[method.lower()] = _operation(ops[(method, path)], op_id, path, names)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OpenHydra node API",
            "version": __version__,
            "description": "OpenAI- and Ollama-compatible inference on a peer-to-peer swarm. Error answers "
                           'are {"error": {"message", "type", "param", "code"}}, and under /api/ Ollama\'s '
                           '{"error": "<message>"} with type, param and code beside it.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }

def register(app: Sanic) -> None:
    cache: dict[str, Any] = {}

    @app.get(OPENAPI_PATH)
    async def openapi_document(request: Request) -> HTTPResponse:
        # routes registered after create_app (economy) are included, and what the loaded model can do
        key = (len(app.router.routes), getattr(getattr(app.ctx, "state", None), "engine", None) is not None)
        if cache.get("key") != key:
            cache["doc"], cache["key"] = build_document(app), key
        return json(cache["doc"])
