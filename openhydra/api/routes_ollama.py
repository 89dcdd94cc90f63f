"""Ollama-compatible routes: /api/generate, /api/chat, /api/tags, /api/show, /api/ps, /api/version.

Streams are NDJSON by default; ``"stream": false`` returns one object. The final object carries
done, done_reason, prompt_eval_count, eval_count and durations in nanoseconds, as Ollama's does.
"""

from __future__ import annotations

import json as jsonlib
from datetime import UTC, datetime, timedelta

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra import __version__
from openhydra.api.bodies import parse_body
from openhydra.api.errors import APIError, bad_request
from openhydra.api.protocol_ollama import (
    OllamaBase,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)
from openhydra.api.requests import generation_request
from openhydra.api.state import ServedModel
from openhydra.api.streaming import run_stream
from openhydra.router.engine import Engine, Finished, TextDelta

OLLAMA_API_VERSION = "0.6.3"  # the Ollama API revision these routes follow


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(served: ServedModel) -> dict:
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": served.family,
        "families": [served.family],
        "parameter_size": f"{served.parameter_count / 1e6:.0f}M"
        if served.parameter_count < 1e9 else f"{served.parameter_count / 1e9:.1f}B",
        "quantization_level": served.dtype.upper(),
    }


def register(app: Sanic) -> None:
    state = app.ctx.state
    api = app.ctx.api
    metrics = app.ctx.metrics

    def build(engine: Engine, body: OllamaBase, prompt_ids: list[int]):
        opts = body.options
        num_predict = opts.num_predict
        return generation_request(
            engine, api, prompt_ids,
            max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
            temperature=opts.temperature if opts.temperature is not None else 0.8,  # Ollama's default
            top_p=opts.top_p if opts.top_p is not None else 0.9,
            top_k=opts.top_k if opts.top_k is not None else 40,
            seed=opts.seed, stop=opts.stop_list(),
            until_context_full=num_predict is not None and num_predict < 0,
        )

    def final_fields(final: Finished, served: ServedModel) -> dict:
        metrics.observe_generation(served.id, final.prompt_tokens, final.completion_tokens, final.ttft_s)
        return {
            "done": True,
            "done_reason": final.finish_reason,
            "total_duration": final.total_ns,
            "load_duration": 0,
            "prompt_eval_count": final.prompt_tokens,
            "prompt_eval_duration": final.prompt_eval_ns,
            "eval_count": final.completion_tokens,
            "eval_duration": final.eval_ns,
        }

    async def serve(request: Request, body: OllamaBase, prompt_ids: list[int], chat: bool) -> HTTPResponse | None:
        served, engine = state.resolve(body.model, request.ctx)
        gen = build(engine, body, prompt_ids)

        def message(text: str) -> dict:
            if chat:
                return {"message": {"role": "assistant", "content": text}}
            return {"response": text}

        if not body.stream:
            final = await engine.complete(gen)
            return json({"model": body.model, "created_at": _now(), **message(final.text),
                         **final_fields(final, served)})

        def on_event(event: TextDelta | Finished) -> str:
            if isinstance(event, TextDelta):
                line = {"model": body.model, "created_at": _now(), **message(event.text), "done": False}
            else:
                line = {"model": body.model, "created_at": _now(), **message(""), **final_fields(event, served)}
            return jsonlib.dumps(line, ensure_ascii=False) + "\n"

        def on_error(error: APIError) -> str:
            return jsonlib.dumps({"error": error.message}) + "\n"

        await run_stream(request, engine.stream(gen), content_type="application/x-ndjson",
                         on_event=on_event, on_error=on_error, end_marker=None)
        return None

    @app.post("/api/generate")
    async def generate(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, OllamaGenerateRequest)
        _, engine = state.resolve(body.model, request.ctx)
        if body.images:
            raise bad_request("this model takes no images", param="images")
        if not body.prompt and not body.system:
            # Ollama answers an empty prompt by loading the model and reporting it.
            return json({"model": body.model, "created_at": _now(), "response": "", "done": True,
                         "done_reason": "load"})
        if body.raw:
            prompt_ids = engine.text_prompt_ids(body.prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else [])
            messages.append({"role": "user", "content": body.prompt})
            prompt_ids = engine.chat_prompt_ids(messages)
        return await serve(request, body, prompt_ids, chat=False)

    @app.post("/api/chat")
    async def chat(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, OllamaChatRequest)
        _, engine = state.resolve(body.model, request.ctx)
        if not body.messages:
            return json({"model": body.model, "created_at": _now(),
                         "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        if any(m.images for m in body.messages):
            raise bad_request("this model takes no images", param="messages")
        prompt_ids = engine.chat_prompt_ids([{"role": m.role, "content": m.content} for m in body.messages])
        return await serve(request, body, prompt_ids, chat=True)

    def tag(served: ServedModel, name: str) -> dict:
        return {
            "name": f"{name}:latest", "model": f"{name}:latest",
            "modified_at": datetime.fromtimestamp(served.created, UTC).isoformat().replace("+00:00", "Z"),
            "size": served.parameter_count * 2, "digest": "", "details": _details(served),
        }

    @app.get("/api/tags")
    async def tags(request: Request) -> HTTPResponse:
        served = state.model
        models = [] if served is None else [tag(served, n) for n in [served.id, *served.aliases]]
        return json({"models": models})

    @app.get("/api/ps")
    async def ps(request: Request) -> HTTPResponse:
        served = state.model
        models = []
        if served is not None and state.ready:
            expires = (datetime.now(UTC) + timedelta(days=365)).isoformat().replace("+00:00", "Z")
            models = [{**tag(served, served.id), "expires_at": expires, "size_vram": 0}]
        return json({"models": models})

    @app.post("/api/show")
    async def show(request: Request) -> HTTPResponse:
        body = parse_body(request.body, OllamaShowRequest)
        name = body.model_name()
        if not name:
            raise bad_request("model is required", param="model")
        served, engine = state.resolve(name)
        template = getattr(engine.tokenizer, "chat_template", None) or ""
        return json({
            "modelfile": f"# served by OpenHydra from {served.source}\nFROM {served.id}\n",
            "parameters": "", "template": template, "details": _details(served),
            "model_info": {
                "general.architecture": served.family, "general.parameter_count": served.parameter_count,
                f"{served.family}.context_length": served.context_length,
                f"{served.family}.block_count": served.num_layers,
            },
            "capabilities": ["completion"],
            "modified_at": datetime.fromtimestamp(served.created, UTC).isoformat().replace("+00:00", "Z"),
        })

    @app.get("/api/version")
    async def version(request: Request) -> HTTPResponse:
        return json({"version": OLLAMA_API_VERSION, "openhydra": __version__})
