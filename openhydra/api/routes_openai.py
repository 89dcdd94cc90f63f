"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import json as jsonlib
import time
import uuid
from collections.abc import AsyncIterator

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra.api.bodies import parse_body
from openhydra.api.errors import APIError
from openhydra.api.protocol_openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from openhydra.api.requests import generation_request
from openhydra.api.state import ServedModel
from openhydra.api.streaming import run_stream
from openhydra.router.engine import Engine, Finished, GenerationRequest, TextDelta


def _sse(payload: dict) -> str:
    return f"data: {jsonlib.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _choices(
    engine: Engine, requests: list[GenerationRequest]
) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
    for index, req in enumerate(requests):
        async for event in engine.stream(req):
            yield index, event


def register(app: Sanic) -> None:
    state = app.ctx.state
    api = app.ctx.api
    metrics = app.ctx.metrics

    def model_card(model_id: str, served: ServedModel) -> dict:
        card = {"id": model_id, "object": "model", "created": served.created, "owned_by": "openhydra"}
        card["openhydra"] = {
            "served_by": served.id,
            "source": served.source,
            "span": list(served.span),
            "num_layers": served.num_layers,
            "context_length": served.context_length,
            "degradation_reason": served.degradation_reason,
        }
        return card

    @app.get("/v1/models")
    async def list_models(request: Request) -> HTTPResponse:
        served = state.model
        data = [] if served is None else [model_card(m, served) for m in [served.id, *served.aliases]]
        return json({"object": "list", "data": data})

    @app.get("/v1/models/<model_id:path>")
    async def get_model(request: Request, model_id: str) -> HTTPResponse:
        served, _ = state.resolve(model_id)
        return json(model_card(model_id, served))

    def build(engine: Engine, body: SamplingFields, prompt_ids: list[int]) -> list[GenerationRequest]:
        requests = [
            generation_request(
                engine, api, prompt_ids,
                max_tokens=body.requested_max_tokens(), temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k, seed=body.seed, stop=body.stop_list(), choice=i,
            )
            for i in range(body.n)
        ]
        for r in requests:
            r.ignore_eos = body.ignore_eos
        return requests

    async def serve(request: Request, body: SamplingFields, prompt_ids: list[int], chat: bool) -> HTTPResponse | None:
        served, engine = state.resolve(body.model, request.ctx)
        gen_requests = build(engine, body, prompt_ids)
        completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        model_name = body.model

        if not body.stream:
            finals = [await engine.complete(r) for r in gen_requests]
            for f in finals:
                metrics.observe_generation(served.id, f.prompt_tokens, f.completion_tokens, f.ttft_s)
            choices = []
            for i, f in enumerate(finals):
                if chat:
                    choices.append({"index": i, "message": {"role": "assistant", "content": f.text},
                                    "logprobs": None, "finish_reason": f.finish_reason})
                else:
                    choices.append({"index": i, "text": f.text, "logprobs": None,
                                    "finish_reason": f.finish_reason})
            completion_tokens = sum(f.completion_tokens for f in finals)
            return json({
                "id": completion_id, "object": obj, "created": created, "model": model_name,
                "choices": choices, "usage": _usage(len(prompt_ids), completion_tokens),
            })

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        totals = {"completion": 0}
        started: set[int] = set()

        def chunk(index: int, delta_text: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": completion_id, "object": chunk_obj, "created": created, "model": model_name,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return payload

        def on_event(item: tuple[int, TextDelta | Finished]) -> str | None:
            index, event = item
            out = ""
            if chat and index not in started:
                started.add(index)
                out += _sse(chunk(index, "", None, role=True))
            if isinstance(event, TextDelta):
                return out + _sse(chunk(index, event.text, None))
            metrics.observe_generation(served.id, event.prompt_tokens, event.completion_tokens, event.ttft_s)
            totals["completion"] += event.completion_tokens
            out += _sse(chunk(index, None if chat else "", event.finish_reason))
            if include_usage and index == len(gen_requests) - 1:
                out += _sse({"id": completion_id, "object": chunk_obj, "created": created, "model": model_name,
                             "choices": [], "usage": _usage(len(prompt_ids), totals["completion"])})
            return out

        def on_error(error: APIError) -> str:
            return _sse(error.body())

        await run_stream(
            request, _choices(engine, gen_requests), content_type="text/event-stream",
            on_event=on_event, on_error=on_error, end_marker="data: [DONE]\n\n",
        )
        return None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, ChatCompletionRequest)
        _, engine = state.resolve(body.model, request.ctx)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt_ids = engine.chat_prompt_ids(messages)
        except Exception as exc:  # a template that rejects this conversation shape
            raise APIError(400, f"messages could not be rendered with the model's chat template: {exc}",
                           param="messages", code="invalid_messages") from None
        return await serve(request, body, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, CompletionRequest)
        _, engine = state.resolve(body.model, request.ctx)
        return await serve(request, body, engine.text_prompt_ids(body.prompt_text()), chat=False)
