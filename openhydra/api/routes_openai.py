"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import json as jsonlib
import time
import uuid
from collections.abc import AsyncIterator

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra.api.bodies import parse_body
from openhydra.api.errors import APIError, bad_request
from openhydra.api.features import (
    Features,
    ToolCall,
    ToolCallParser,
    chat_logprobs,
    check_content_parts,
    completion_logprobs,
    response_format_grammar,
    split_tool_calls,
    template_messages,
    tool_call_grammar,
    tool_syntax,
    tools_prompt_ids,
    unsupported_fields,
)
from openhydra.api.protocol_features import NamedToolChoice
from openhydra.api.protocol_openai import ChatCompletionRequest, CompletionRequest, SamplingFields
from openhydra.api.requests import generation_request
from openhydra.api.state import ServedModel
from openhydra.api.streaming import run_stream
from openhydra.router.engine import Engine, Finished, GenerationRequest, PromptTooLong, TextDelta


def _sse(payload: dict) -> str:
    return f"data: {jsonlib.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_prompt_ids(engine: Engine, text: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from the start-of-text token, as OpenAI's does."""
    ids = engine.text_prompt_ids(text)
    if ids:
        return ids
    tokenizer = engine.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start] if start is not None else ids


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

    def build(engine: Engine, body: SamplingFields, prompt_ids: list[int], features: Features
              ) -> list[GenerationRequest]:
        for name in ("max_tokens", "max_completion_tokens"):  # both, also when the other one is the one used
            value = getattr(body, name, None)
            if value is not None and value > api.max_tokens_limit:
                raise bad_request(f"{name} must be <= {api.max_tokens_limit} (got {value})", param=name)
        requests = [
            generation_request(
                engine, api, prompt_ids,
                max_tokens=body.requested_max_tokens(), temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k, seed=body.seed, stop=body.stop_list(), choice=i,
                prompt_param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
            for i in range(body.n)
        ]
        for r in requests:
            r.ignore_eos = body.ignore_eos
            r.logprobs = features.logprobs
            r.grammar = features.grammar
        return requests

    async def serve(request: Request, body: SamplingFields, prompt_ids: list[int], chat: bool,
                    features: Features | None = None) -> HTTPResponse | None:
        features = features or Features()
        served, engine = state.resolve(body.model, request.ctx)
        if (features.logprobs is not None or features.grammar is not None) and not hasattr(engine.pipeline,
                                                                                           "step_detail"):
            raise bad_request("this node's pipeline cannot report logprobs or constrain the output",
                              code="unsupported_parameter")
        gen_requests = build(engine, body, prompt_ids, features)
        completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        model_name = served.id  # the model that actually serves (a fallback when degraded), as OpenAI reports
        top_n = features.logprobs or 0

        if not body.stream:
            finals = [await engine.complete(r) for r in gen_requests]
            for f in finals:
                metrics.observe_generation(served.id, f.prompt_tokens, f.completion_tokens, f.ttft_s)
            choices = []
            for i, f in enumerate(finals):
                if chat:
                    message: dict = {"role": "assistant", "content": f.text}
                    finish = f.finish_reason
                    if features.tools is not None:
                        content, calls = split_tool_calls(f.text, *features.tools)
                        if calls:
                            message = {"role": "assistant", "content": content or None,
                                       "tool_calls": [c.openai() for c in calls]}
                            finish = "tool_calls"
                    lp = chat_logprobs(f.logprobs) if f.logprobs is not None else None
                    choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
                else:
                    lp = completion_logprobs(f.logprobs, 0, top_n)[0] if f.logprobs is not None else None
                    choices.append({"index": i, "text": (features.echo or "") + f.text, "logprobs": lp,
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
        parsers: dict[int, ToolCallParser] = {}
        offsets: dict[int, int] = {}

        def chunk(index: int, delta_text: str | None, finish: str | None, role: bool = False,
                  logprobs: dict | None = None, tool_calls: list[dict] | None = None) -> dict:
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                if tool_calls is not None:
                    delta["tool_calls"] = tool_calls
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta_text or "", "logprobs": logprobs, "finish_reason": finish}
            payload = {"id": completion_id, "object": chunk_obj, "created": created, "model": model_name,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return payload

        def text_chunks(index: int, text: str, entries: list | None) -> str:
            """Content (and any tool calls the parser completes) for one delta; logprobs ride on the first."""
            logprobs = None
            if entries is not None and features.logprobs is not None:
                if chat:
                    logprobs = chat_logprobs(entries)
                else:
                    logprobs, offsets[index] = completion_logprobs(entries, offsets.get(index, 0), top_n)
            parser = parsers.get(index)
            if parser is None:
                return _sse(chunk(index, text, None, logprobs=logprobs)) if text or logprobs else ""
            out = ""
            for part in parser.feed(text) if text else []:
                out += _part_chunks(index, part, logprobs)
                logprobs = None
            if logprobs is not None:
                out += _sse(chunk(index, "", None, logprobs=logprobs))
            return out

        def _part_chunks(index: int, part: str | ToolCall, logprobs: dict | None) -> str:
            if isinstance(part, str):
                return _sse(chunk(index, part, None, logprobs=logprobs)) if part else ""
            k = len(parsers[index].calls) - 1
            call = part.openai()
            out = _sse(chunk(index, None, None, logprobs=logprobs, tool_calls=[{
                "index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}]))
            args = call["function"]["arguments"]
            for at in range(0, len(args), 16):
                out += _sse(chunk(index, None, None, tool_calls=[{"index": k, "function": {"arguments":
                                                                                          args[at: at + 16]}}]))
            return out

        def on_event(item: tuple[int, TextDelta | Finished]) -> str | None:
            index, event = item
            out = ""
            if index not in started:
                started.add(index)
                if chat:
                    out += _sse(chunk(index, "", None, role=True))
                    if features.tools is not None:
                        parsers[index] = ToolCallParser(*features.tools)
                elif features.echo:
                    out += _sse(chunk(index, features.echo, None))
            if isinstance(event, TextDelta):
                return out + text_chunks(index, event.text, event.logprobs)
            metrics.observe_generation(served.id, event.prompt_tokens, event.completion_tokens, event.ttft_s)
            totals["completion"] += event.completion_tokens
            finish = event.finish_reason
            parser = parsers.get(index)
            if parser is not None:
                for part in parser.finish():
                    out += _part_chunks(index, part, None)
                if parser.calls:
                    finish = "tool_calls"
            out += _sse(chunk(index, None if chat else "", finish))
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
        unsupported_fields(body)
        check_content_parts(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        messages = template_messages(body.messages)
        features = Features(logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                            grammar=response_format_grammar(engine, body.response_format))
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        if body.tool_choice not in (None, "none", "auto") and not body.tools:
            raise bad_request("tool_choice needs tools", param="tool_choice")
        try:
            if tools:
                syntax = tool_syntax(engine)
                features.tools = (syntax, {t.function.name for t in tools})
                prompt_ids = await engine.tokenized(tools_prompt_ids, engine, messages, tools)
                forced = body.tool_choice
                if forced == "required" or isinstance(forced, NamedToolChoice):
                    if features.grammar is not None:
                        raise bad_request("response_format cannot be combined with a forced tool call",
                                          param="tool_choice")
                    only = forced.function.name if isinstance(forced, NamedToolChoice) else None
                    features.grammar = tool_call_grammar(engine, tools, only)
            else:
                prompt_ids = await engine.tokenized(engine.chat_prompt_ids, messages)
        except (APIError, PromptTooLong):
            raise
        except Exception as exc:  # a template that rejects this conversation shape
            raise APIError(400, f"messages could not be rendered with the model's chat template: {exc}",
                           param="messages", code="invalid_messages") from None
        return await serve(request, body, prompt_ids, chat=True, features=features)

    @app.post("/v1/completions")
    async def completions(request: Request) -> HTTPResponse | None:
        body = parse_body(request.body, CompletionRequest)
        _, engine = state.resolve(body.model, request.ctx)
        unsupported_fields(body)
        if body.echo and body.logprobs is not None:
            raise bad_request("echo together with logprobs (prompt-token logprobs) is not supported by this node",
                              param="echo", code="unsupported_parameter")
        features = Features(logprobs=body.logprobs, grammar=response_format_grammar(engine, body.response_format),
                            echo=body.prompt_text() if body.echo else None)
        prompt_ids = await engine.tokenized(completion_prompt_ids, engine, body.prompt_text())
        return await serve(request, body, prompt_ids, chat=False, features=features)
