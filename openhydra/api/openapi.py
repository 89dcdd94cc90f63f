"""The node's own OpenAPI 3.1 document, served at ``GET /openapi.json``.

Built from the routes the app actually has (so the economy routes appear only where an economy
registered them) and from the pydantic request models (``model_json_schema``). Response schemas are
given where cheap; every operation documents the one error schema for its 4xx and 5xx answers.
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
from openhydra.api.errors import ErrorBody
from openhydra.api.protocol_ollama import OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest
from openhydra.api.protocol_openai import ChatCompletionRequest, CompletionRequest
from openhydra.api.routes_dashboard import SUMMARY_PATH, SUMMARY_SCHEMA, is_undocumented

OPENAPI_PATH = "/openapi.json"
REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)(?::[^>]*)?>")

_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Op:
    """What the document says about one route and method."""

    summary: str
    tag: str
    body: type[BaseModel] | None = None
    query: tuple[str, ...] = ()
    status: int = 200
    schema: dict[str, Any] = field(default_factory=lambda: dict(_OBJECT))
    stream: str | None = None
    """The media type a streamed answer uses, besides application/json."""
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
    ("GET", "/readyz"): Op("Readiness: 200 once the model is served, 503 while loading or failed", "public"),
    ("GET", "/metrics"): Op("Prometheus metrics", "public", schema={"type": "string"},
                            content_type="text/plain"),
    ("GET", "/v1/network/status"): Op("The node, its model and its network", "public"),
    ("GET", OPENAPI_PATH): Op("This document", "public"),
    ("GET", "/v1/models"): Op("Models served here (OpenAI)", "openai", schema=_LIST),
    ("GET", "/v1/models/{model_id}"): Op("One served model (OpenAI)", "openai"),
    ("POST", "/v1/chat/completions"): Op("Chat completion (OpenAI)", "openai", body=ChatCompletionRequest,
                                         stream="text/event-stream"),
    ("POST", "/v1/completions"): Op("Text completion (OpenAI)", "openai", body=CompletionRequest,
                                    stream="text/event-stream"),
    ("POST", "/api/generate"): Op("Generate (Ollama)", "ollama", body=OllamaGenerateRequest,
                                  stream="application/x-ndjson"),
    ("POST", "/api/chat"): Op("Chat (Ollama)", "ollama", body=OllamaChatRequest, stream="application/x-ndjson"),
    ("GET", "/api/tags"): Op("Local models (Ollama)", "ollama", schema=_MODELS),
    ("GET", "/api/ps"): Op("Running models (Ollama)", "ollama", schema=_MODELS),
    ("POST", "/api/show"): Op("Model details (Ollama)", "ollama", body=OllamaShowRequest),
    ("GET", "/api/version"): Op("API version (Ollama)", "ollama", schema=_VERSION),
    ("GET", SUMMARY_PATH): Op("Everything the web dashboard at / shows, in one answer", "dashboard",
                              schema=SUMMARY_SCHEMA),
}


def _economy_operations() -> dict[tuple[str, str], Op]:
    from openhydra.api.routes_economy import CloseChannelBody, OpenChannelBody, StakeBody, UpdateChannelBody

    return {
        ("GET", "/v1/account/balance"): Op("Credit and HYDRA balance", "economy", query=("peer_id",)),
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


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}}


def _operation(op: Op, op_id: str, path_params: list[str], refs: dict[type[BaseModel], dict]) -> dict[str, Any]:
    ok_content: dict[str, Any] = {op.content_type: {"schema": op.schema}}
    if op.stream:
        ok_content[op.stream] = {"schema": {"type": "string"}}
    out: dict[str, Any] = {
        "operationId": op_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": {
            str(op.status): {"description": "success", "content": ok_content},
            "4XX": _error_response("the request was refused (bad input, unknown model, rate limit, auth)"),
            "5XX": _error_response("the node cannot serve it now (loading, no route through the swarm)"),
        },
    }
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
              for n in path_params]
    params += [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in op.query]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[op.body]}}}
    return out


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
    bodies = sorted({op.body for op in ops.values() if op.body is not None}, key=lambda m: m.__name__)
    refs, defs = models_json_schema([(m, "validation") for m in [ErrorBody, *bodies]], ref_template=REF)
    body_refs = {m: refs[(m, "validation")] for m in bodies}

    paths: dict[str, dict[str, Any]] = {}
    for method, path, names in routes:
        op_id = re.sub(r"[^A-Za-z0-9]+", "_", f"{method.lower()} {path}").strip("_")
        paths.setdefault(path, {})[method.lower()] = _operation(ops[(method, path)], op_id, names, body_refs)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OpenHydra node API",
            "version": __version__,
            "description": "OpenAI- and Ollama-compatible inference on a peer-to-peer swarm. Every error "
                           'answer is {"error": {"message", "type", "param", "code"}}.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": defs.get("$defs", {})},
    }


def register(app: Sanic) -> None:
    cache: dict[str, Any] = {}

    @app.get(OPENAPI_PATH)
    async def openapi_document(request: Request) -> HTTPResponse:
        count = len(app.router.routes)
        if cache.get("routes") != count:  # routes registered after create_app (economy) are included
            cache["doc"], cache["routes"] = build_document(app), count
        return json(cache["doc"])
