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
from openhydra.api.features import (
    ToolCall,
    ToolCallParser,
    ollama_format_grammar,
    split_tool_calls,
    tool_syntax,
    tools_prompt_ids,
    unsupported_ollama_fields,
)
from openhydra.api.protocol_ollama import (
    OllamaBase,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaShowRequest,
)
from openhydra.api.requests import generation_request
from openhydra.api.routes_openai import completion_prompt_ids
from openhydra.api.state import ServedModel
from openhydra.api.streaming import run_stream
from openhydra.router.engine import Engine, Finished, TextDelta

OLLAMA_API_VERSION = "0.6.3"  # the Ollama API revision these routes follow


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _details(served: ServedModel) -> dict:
    return {
        "parent_model": "",
        "format": served.weights_format,
        "family": served.family,
        "families": [served.family],
        "parameter_size": f"{served.parameter_count / 1e6:.0f}M"
        if served.parameter_count < 1e9 else f"{served.parameter_count / 1e9:.1f}B",
        # what this node serves, as Ollama names it for the file it serves (a Q4_1 GGUF is dequantized on load: its
        # level is in /api/show's model_info, openhydra.source_quantization)
        "quantization_level": served_level(served),
    }


SERVED_LEVELS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def served_level(served: ServedModel) -> str:
    """'INT4' / 'INT8' / 'NF4' for weights quantized at load, else the dtype Ollama's way ('F32', 'BF16', 'F16')."""
    if served.served_quantization:
        return served.served_quantization.upper()
    return SERVED_LEVELS.get(served.dtype, served.dtype.upper())


def template_variables(body: OllamaBase) -> dict:
    """``think: false`` as the chat templates that can think spell it (Qwen3's ``enable_thinking``); templates
    without the variable ignore it. ``think: true`` is refused (api/features.unsupported_ollama_fields)."""
    return {"enable_thinking": False} if (body.model_extra or {}).get("think") is False else {}


def reply_model(requested: str, served: ServedModel) -> str:
    """The name an answer carries: the served model's (a fallback's when degraded), in the requested
    spelling when that names it (``name:latest`` stays ``name:latest``)."""
    return requested if requested.removesuffix(":latest") == served.id else served.id


def register(app: Sanic) -> None:
    state = app.ctx.state
    api = app.ctx.api
    metrics = app.ctx.metrics

    def build(engine: Engine, body: OllamaBase, prompt_ids: list[int]):
        opts = body.options
        num_predict = opts.num_predict
        gen = generation_request(
            engine, api, prompt_ids,
            max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
            temperature=opts.temperature if opts.temperature is not None else 0.8,  # Ollama's default
            top_p=opts.top_p if opts.top_p is not None else 0.9,
            top_k=opts.top_k if opts.top_k is not None else 40,
            seed=opts.seed, stop=opts.stop_list(),
            until_context_full=num_predict is not None and num_predict < 0,
            prompt_param="messages" if isinstance(body, OllamaChatRequest) else "prompt",
            max_tokens_param="options.num_predict",
        )
        gen.grammar = ollama_format_grammar(engine, body.format)
        return gen

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

    async def serve(request: Request, body: OllamaBase, prompt_ids: list[int], chat: bool,
                    tools: tuple[str, set[str]] | None = None) -> HTTPResponse | None:
        served, engine = state.resolve(body.model, request.ctx)
        gen = build(engine, body, prompt_ids)
        name = reply_model(body.model, served)

        def message(text: str, calls: list[ToolCall] | None = None) -> dict:
            if chat:
                msg: dict = {"role": "assistant", "content": text}
                if calls:
                    msg["tool_calls"] = [c.ollama() for c in calls]
                return {"message": msg}
            return {"response": text}

        if not body.stream:
            final = await engine.complete(gen)
            text, calls = split_tool_calls(final.text, *tools) if tools is not None else (final.text, [])
            return json({"model": name, "created_at": _now(), **message(text, calls),
                         **final_fields(final, served)})

        parser = ToolCallParser(*tools) if tools is not None else None

        def lines(parts: list) -> str:
            out = ""
            for part in parts:
                if isinstance(part, str) and not part:
                    continue
                line = {"model": name, "created_at": _now(), "done": False,
                        **(message(part) if isinstance(part, str) else message("", [part]))}
                out += jsonlib.dumps(line, ensure_ascii=False) + "\n"
            return out

        def on_event(event: TextDelta | Finished) -> str:
            if isinstance(event, TextDelta):
                return lines(parser.feed(event.text) if parser is not None else [event.text])
            out = lines(parser.finish()) if parser is not None else ""
            line = {"model": name, "created_at": _now(), **message(""), **final_fields(event, served)}
            return out + jsonlib.dumps(line, ensure_ascii=False) + "\n"

        def on_error(error: APIError) -> str:
            return jsonlib.dumps({"error": error.message}) + "\n"

        await run_stream(request, engine.stream(gen), content_type="application/x-ndjson",
                         on_event=on_event, on_error=on_error, end_marker=None)
        return None

    def check_num_predict(body: OllamaBase) -> None:
        """The limit holds for every answer, the empty "load" one included (the document says so)."""
        num_predict = body.options.num_predict
        if num_predict is not None and num_predict > api.max_tokens_limit:
            raise bad_request(f"options.num_predict must be <= {api.max_tokens_limit} (got {num_predict})",
                              param="options.num_predict")

    @app.post("/api/generate")
    async def generate(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, OllamaGenerateRequest)
        served, engine = state.resolve(body.model, request.ctx)
        check_num_predict(body)
        unsupported_ollama_fields(body)
        if body.images:
            raise bad_request("this model takes no images", param="images")
        if (body.model_extra or {}).get("tools"):
            raise bad_request("tools are taken by /api/chat, not /api/generate", param="tools",
                              code="unsupported_parameter")
        if not body.prompt and not body.system:
            # Ollama answers an empty prompt by loading the model and reporting it.
            return json({"model": reply_model(body.model, served), "created_at": _now(), "response": "",
                         "done": True, "done_reason": "load"})
        if body.raw:
            prompt_ids = await engine.tokenized(completion_prompt_ids, engine, body.prompt)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else [])
            messages.append({"role": "user", "content": body.prompt})
            prompt_ids = await engine.tokenized(engine.chat_prompt_ids, messages, **template_variables(body))
        return await serve(request, body, prompt_ids, chat=False)

    @app.post("/api/chat")
    async def chat(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, OllamaChatRequest)
        served, engine = state.resolve(body.model, request.ctx)
        check_num_predict(body)
        unsupported_ollama_fields(body)
        if body.tools:  # a template without tools refuses them on every answer, the "load" one too
            tool_syntax(engine)
        if not body.messages:
            return json({"model": reply_model(body.model, served), "created_at": _now(),
                         "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"})
        if any(m.images for m in body.messages):
            raise bad_request("this model takes no images", param="messages")
        messages = [{"role": m.role, "content": m.content, **({"tool_calls": m.tool_calls} if m.tool_calls else {})}
                    for m in body.messages]
        if body.tools:
            tools = (tool_syntax(engine), {t.function.name for t in body.tools})
            prompt_ids = await engine.tokenized(tools_prompt_ids, engine, messages, body.tools,
                                                **template_variables(body))
            return await serve(request, body, prompt_ids, chat=True, tools=tools)
        prompt_ids = await engine.tokenized(engine.chat_prompt_ids, messages, **template_variables(body))
        return await serve(request, body, prompt_ids, chat=True)

    def tag(served: ServedModel, name: str) -> dict:
        return {
            "name": f"{name}:latest", "model": f"{name}:latest",
            "modified_at": datetime.fromtimestamp(served.created, UTC).isoformat().replace("+00:00", "Z"),
            "size": served.weight_bytes, "digest": "", "details": _details(served),  # what this node holds
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
                "openhydra.served_dtype": served.dtype,
                "openhydra.source_quantization": served.quantization,
            },
            "capabilities": ["completion"],
            "modified_at": datetime.fromtimestamp(served.created, UTC).isoformat().replace("+00:00", "Z"),
        })

    @app.get("/api/version")
    async def version(request: Request) -> HTTPResponse:
        return json({"version": OLLAMA_API_VERSION, "openhydra": __version__})
