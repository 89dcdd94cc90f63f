"""What clients ask for beyond plain text: logprobs, structured output, tools (OpenAI and Ollama routes).

- ``response_format`` / Ollama ``format`` -> a constrained-decoding grammar (router/constrained.py); a schema
  keyword outside the supported subset is a 400 naming it.
- ``tools`` -> rendered by the model's own chat template (``apply_chat_template(messages, tools=...)``); a
  template that ignores them is a 400. The model's calls are parsed from its output: Hermes/Qwen style
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, or a bare ``{"name", "parameters"}`` object
  for templates without that tag. ``tool_choice`` "required" or a named function constrains the output to a
  valid call (Hermes-style templates only).
- logprobs -> OpenAI's chat (``choices[].logprobs.content[]``) and completions (``tokens``,
  ``token_logprobs``, ``top_logprobs``, ``text_offset``) shapes.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from openhydra.api.errors import bad_request
from openhydra.api.protocol_features import MAX_TOP_LOGPROBS, ResponseFormat, ToolSpec
from openhydra.router.constrained import (
    Grammar,
    UnsupportedSchema,
    choice_state,
    compile_schema,
    grammar_for,
    initial_state,
    json_object_node,
)
from openhydra.router.engine import Engine, TokenLogprob

# ---- request models -----------------------------------------------------------------------------------


@dataclass
class Features:
    """What one request asks for beyond plain text, resolved against the engine."""

    logprobs: int | None = None
    grammar: Grammar | None = None
    tools: tuple[str, set[str]] | None = None
    """(tool-call syntax, function names) when the output is parsed for tool calls."""
    echo: str | None = None


# ---- structured output --------------------------------------------------------------------------------


def _grammar(engine: Engine, key: str, build) -> Grammar:
    return grammar_for(engine.tokenizer, key, build)


def response_format_grammar(engine: Engine, fmt: ResponseFormat | None, param: str = "response_format"
                            ) -> Grammar | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return _grammar(engine, "json_object", lambda: initial_state(json_object_node()))
    if fmt.json_schema is None:
        raise bad_request("response_format type json_schema needs a json_schema object", param=param)
    return schema_grammar(engine, fmt.json_schema.schema_, param)


def schema_grammar(engine: Engine, schema: Any, param: str) -> Grammar:
    try:
        node = compile_schema(schema)
    except UnsupportedSchema as exc:
        raise bad_request(str(exc), param=param, code="unsupported_schema") from None
    except (TypeError, ValueError) as exc:
        raise bad_request(f"invalid JSON schema: {exc}", param=param, code="invalid_schema") from None
    key = "schema:" + json.dumps(schema, sort_keys=True)
    return _grammar(engine, key, lambda: initial_state(node))


def ollama_format_grammar(engine: Engine, fmt: str | dict | None) -> Grammar | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return _grammar(engine, "json_object", lambda: initial_state(json_object_node()))
    if isinstance(fmt, dict):
        return schema_grammar(engine, fmt, "format")
    raise bad_request(f"format must be \"json\" or a JSON schema, got {fmt!r}", param="format")


# ---- tools ---------------------------------------------------------------------------------------------

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PROBE_TOOL = {"type": "function", "function": {"name": "openhydra_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def tool_syntax(engine: Engine) -> Literal["hermes", "json"]:
    """How the model's template asks for tool calls; 400 when the template cannot express tools at all."""
    syntax = getattr(engine, "_openhydra_tool_syntax", None)
    if syntax is None:
        syntax = _probe_tool_syntax(engine)
        engine._openhydra_tool_syntax = syntax  # type: ignore[attr-defined]
    if syntax == "none":
        raise bad_request("this model's chat template cannot express tools (it renders the same prompt with and "
                          "without them), so tool calling is not available", param="tools",
                          code="tools_unsupported")
    return syntax  # type: ignore[return-value]


def _probe_tool_syntax(engine: Engine) -> str:
    messages = [{"role": "user", "content": "hi"}]
    tok = engine.tokenizer
    try:
        plain = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with_tools = tok.apply_chat_template(messages, tools=[_PROBE_TOOL], add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # a template that raises on tools cannot express them either
        with_tools, plain = None, str(exc)
    if with_tools is None or with_tools == plain or "openhydra_probe_tool" not in with_tools:
        syntax = "none"
    else:
        syntax = "hermes" if HERMES_OPEN in with_tools else "json"
    return syntax


def tools_prompt_ids(engine: Engine, messages: list[dict], tools: list[ToolSpec], **template: Any) -> list[int]:
    tool_syntax(engine)
    text = engine.tokenizer.apply_chat_template(messages, tools=[t.model_dump(exclude_none=True) for t in tools],
                                                add_generation_prompt=True, tokenize=False, **template)
    return engine.encode(text, add_special_tokens=False)


def tool_call_grammar(engine: Engine, tools: list[ToolSpec], only: str | None) -> Grammar:
    """The output must be exactly one call of one of ``tools`` (or of ``only``): Hermes syntax."""
    if tool_syntax(engine) != "hermes":
        raise bad_request("tool_choice 'required' or a named function needs a template with <tool_call> syntax; "
                          "this model's template uses another", param="tool_choice", code="tools_unsupported")
    chosen = [t for t in tools if only is None or t.function.name == only]
    if not chosen:
        raise bad_request(f"tool_choice names function {only!r}, which is not in tools", param="tool_choice")
    options = []
    for t in chosen:
        try:
            node = compile_schema(t.function.parameters, f"/{t.function.name}/parameters")
        except UnsupportedSchema as exc:
            raise bad_request(str(exc), param="tools", code="unsupported_schema") from None
        prefix = f'{HERMES_OPEN}\n{{"name": {json.dumps(t.function.name)}, "arguments": '
        options.append((prefix, node, f"}}\n{HERMES_CLOSE}"))
    key = "tools:" + json.dumps([t.model_dump() for t in chosen], sort_keys=True)
    return _grammar(engine, key, lambda: choice_state(options))


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return call if index is None else {"index": index, **call}

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": self.arguments}}


def _as_call(payload: str, names: set[str]) -> ToolCall | None:
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


class ToolCallParser:
    """Splits a model's output stream into content text and tool calls (Hermes tags or a bare JSON call).

    ``feed`` returns what can be released now: text that cannot be the start of a call, and calls whose
    closing tag has arrived; ``finish`` releases the rest.
    """

    def __init__(self, syntax: str, names: set[str]) -> None:
        self.syntax = syntax
        self.names = names
        self.buffer = ""
        self.in_call = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[str | ToolCall]:
        if self.syntax != "hermes":  # a bare JSON call is known only at the end
            self.buffer += text
            return []
        self.buffer += text
        out: list[str | ToolCall] = []
        while True:
            if not self.in_call:
                at = self.buffer.find(HERMES_OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, HERMES_OPEN)
                    if len(self.buffer) > keep:
                        out.append(self.buffer[: len(self.buffer) - keep])
                        self.buffer = self.buffer[len(self.buffer) - keep :]
                    return out
                if at:
                    out.append(self.buffer[:at])
                self.buffer = self.buffer[at + len(HERMES_OPEN) :]
                self.in_call = True
            end = self.buffer.find(HERMES_CLOSE)
            if end < 0:
                return out
            payload, self.buffer = self.buffer[:end], self.buffer[end + len(HERMES_CLOSE) :]
            self.in_call = False
            call = _as_call(payload.strip(), self.names)
            if call is not None:
                self.calls.append(call)
            out.append(call if call is not None else f"{HERMES_OPEN}{payload}{HERMES_CLOSE}")

    def finish(self) -> list[str | ToolCall]:
        rest, self.buffer = self.buffer, ""
        if self.syntax != "hermes":
            call = _as_call(rest.strip(), self.names)
            if call is not None:
                self.calls.append(call)
                return [call]
            return [rest] if rest else []
        if self.in_call:  # no closing tag before the end: a call if it parses, else text
            call = _as_call(rest.strip(), self.names)
            if call is not None:
                self.calls.append(call)
                return [call]
            return [HERMES_OPEN + rest]
        return [rest] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_tool_calls(text: str, syntax: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    parser = ToolCallParser(syntax, names)
    parts = parser.feed(text) + parser.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    return content.strip() if parser.calls else content, parser.calls


def template_messages(messages: list[Any]) -> list[dict]:
    """OpenAI chat messages as chat-template dicts (assistant tool calls with parsed arguments, tool results)."""
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        extra = m.model_extra or {}
        if extra.get("tool_calls"):
            calls = []
            raw_calls = extra["tool_calls"]
            if not isinstance(raw_calls, list) or not all(isinstance(c, dict) for c in raw_calls):
                raise bad_request("tool_calls must be a list of objects", param="messages", code="invalid_messages")
            for call in raw_calls:
                fn = call.get("function") if isinstance(call.get("function"), dict) else {}
                fn = dict(fn)
                if isinstance(fn.get("arguments"), str):
                    with contextlib.suppress(ValueError):
                        fn["arguments"] = json.loads(fn["arguments"])
                calls.append({"type": "function", "id": call.get("id"), "function": fn})
            item["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if extra.get(key):
                item[key] = extra[key]
        out.append(item)
    return out


# ---- logprobs ------------------------------------------------------------------------------------------


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    return {"content": [{
        "token": e.text, "logprob": e.logprob, "bytes": list(e.bytes),
        "top_logprobs": [{"token": _text(b), "logprob": lp, "bytes": list(b)} for _, b, lp in e.top],
    } for e in entries], "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int, top_n: int) -> tuple[dict, int]:
    """The legacy completions shape for ``entries`` starting at character ``offset``; returns the end offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.text)
        token_logprobs.append(e.logprob)
        offsets.append(offset)
        offset += len(e.text)
        if top_n:
            top: dict[str, float] = {}
            for _, b, lp in e.top:
                top.setdefault(_text(b), lp)
            tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops if top_n else None,
            "text_offset": offsets}, offset


def _text(raw: bytes) -> str:
    from openhydra.router.engine import token_text

    return token_text(raw)


NEUTRAL_SAMPLING = {"frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1, "repeat_penalty": 1,
                    "min_p": 0, "typical_p": 1, "tfs_z": 1, "mirostat": 0}
"""Sampling knobs (OpenAI's, vLLM's and Ollama's names) this node does not implement, with the value that means
"off": that value (or none) is accepted, any other is refused instead of ignored."""


OLLAMA_DEFAULTS_ACCEPTED = {"repeat_penalty": (1.1,)}
"""Ollama's own documented defaults that clients copy into every request: accepted and not applied, as Ollama's
newer engine does not apply penalties either (ollama/ollama#15783)."""


def refuse_sampling_knobs(fields: dict[str, Any], prefix: str = "", also: dict[str, tuple] | None = None) -> None:
    for name, neutral in NEUTRAL_SAMPLING.items():
        value = fields.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad_request(f"{prefix}{name} must be a number", param=prefix + name)
        if value != neutral and value not in (also or {}).get(name, ()):
            raise bad_request(f"{prefix}{name} is not supported by this node (only {neutral} is accepted)",
                              param=prefix + name, code="unsupported_parameter")


def unsupported_fields(body: BaseModel) -> None:
    """400 for sampling knobs this node cannot honour, instead of ignoring them."""
    extra = body.model_extra or {}
    refuse_sampling_knobs(extra)
    if extra.get("logit_bias"):
        raise bad_request("logit_bias is not supported by this node", param="logit_bias",
                          code="unsupported_parameter")
    if extra.get("suffix"):
        raise bad_request("suffix (insertion) is not supported by this node", param="suffix",
                          code="unsupported_parameter")
    best_of = extra.get("best_of")
    if best_of not in (None, 1) and best_of != getattr(body, "n", 1):
        raise bad_request("best_of is not supported by this node", param="best_of", code="unsupported_parameter")
    modalities = extra.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)):
        raise bad_request('modalities must be a list of strings, e.g. ["text"]', param="modalities")
    if modalities and any(m != "text" for m in modalities):
        raise bad_request("this node produces text only", param="modalities", code="unsupported_parameter")
    for name in ("functions", "function_call"):  # OpenAI's deprecated form of tools / tool_choice
        if extra.get(name) is not None:
            raise bad_request(f"{name} (deprecated by OpenAI) is not supported by this node: use tools and "
                              f"tool_choice", param=name, code="unsupported_parameter")
    if extra.get("audio"):
        raise bad_request("this node produces text only (no audio)", param="audio", code="unsupported_parameter")


def unsupported_ollama_fields(body: Any) -> None:
    """Ollama's options and fields this node cannot honour: 400 (as the OpenAI routes do), never ignored. Options
    about where and how fast to run (``num_thread``, ``num_gpu``, ``num_batch``, ``use_mmap``...) change no output
    and are accepted; so is ``num_ctx`` (the node serves the model's whole context whatever it asks: Ollama itself
    clamps a larger one, and clients send 32768 and more by habit), and Ollama's default ``repeat_penalty``."""
    options = body.options.model_extra or {}
    refuse_sampling_knobs(options, prefix="options.", also=OLLAMA_DEFAULTS_ACCEPTED)
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and (not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1):
        raise bad_request("options.num_ctx must be a positive integer", param="options.num_ctx")
    extra = body.model_extra or {}
    for name, kind, why in (("suffix", str, "insertion (suffix)"), ("template", str, "a custom prompt template"),
                            ("context", list, "a conversation context from an earlier answer (send the messages "
                                              "to /api/chat)")):
        value = extra.get(name)
        if value is not None and not isinstance(value, kind):
            raise bad_request(f"{name} must be {'a string' if kind is str else 'an array'}", param=name)
        if value:
            raise bad_request(f"{why} is not supported by this node", param=name, code="unsupported_parameter")
    think = extra.get("think")
    if think is not None and not isinstance(think, bool):
        raise bad_request("think must be true or false", param="think")
    if think:
        raise bad_request("think is not supported by this node (no separate thinking output); think: false asks "
                          "the chat template not to think", param="think", code="unsupported_parameter")


def check_content_parts(messages: list[Any]) -> None:
    """Images, audio and files cannot be honoured by a text-only model: 400, never dropped silently; a text part
    needs its text."""
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if part.type not in ("text", "input_text"):
                    raise bad_request(f"content part type '{part.type}' is not supported: this model takes text "
                                      f"only", param=f"messages[{i}].content[{j}]", code="unsupported_content")
                if part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}].text: a {part.type} part needs its text",
                                      param=f"messages[{i}].content[{j}].text")


def check_top_logprobs(value: int | None, limit: int = MAX_TOP_LOGPROBS, param: str = "top_logprobs") -> None:
    if value is not None and not 0 <= value <= limit:
        raise bad_request(f"{param} must be between 0 and {limit}", param=param)
