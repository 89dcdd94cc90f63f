"""What the OpenAI and Ollama routes answer, as pydantic models: the response half of the OpenAPI document.

The routes build their JSON by hand (routes_openai.py, routes_ollama.py); these models describe it so that
``GET /openapi.json`` documents real responses and schemathesis' ``response_schema_conformance`` check holds
the routes to them (tests/api/test_schemathesis.py). Responses may carry fields beyond these (extensions,
and fields added later such as ``logprobs`` content), so every model allows extra properties.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- OpenAI -------------------------------------------------------------------------------------------
class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Open):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(Open):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    """The model that served the request (a fallback's name when the node degraded), as OpenAI does."""
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Open):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None


class ChatCompletionChunk(Open):
    """One ``data:`` event of a streamed chat completion (``choices`` is empty in the final usage event)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(Open):
    """A text completion, and also each ``data:`` event of a streamed one (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- Ollama -------------------------------------------------------------------------------------------
class OllamaFinal(Open):
    """Fields of the last object of a generation (``done: true``); absent from the objects before it."""

    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class OllamaGenerateResponse(OllamaFinal):
    """``/api/generate``: the answer with ``"stream": false``, or one NDJSON line of a stream."""

    response: str


class OllamaChatMessage(Open):
    role: Literal["assistant"]
    content: str


class OllamaChatResponse(OllamaFinal):
    """``/api/chat``: the answer with ``"stream": false``, or one NDJSON line of a stream."""

    message: OllamaChatMessage


class OllamaStreamError(Open):
    """A line that ends an NDJSON stream which failed after it started (Ollama's own shape)."""

    error: str
