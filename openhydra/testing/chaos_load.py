"""The load side of a chaos run: N concurrent greedy streams through the official ``openai`` client, each
request's outcome classified against the text the same swarm produced with no fault.

Outcomes: ``ok`` (exactly the expected text), ``wrong_text`` (a different or truncated text with no error),
``typed_error`` (an HTTP error with an OpenAI-style JSON body, or an error event in the stream), ``hung`` (no
progress for more than ``hang_s``: the client's read timeout fired, a gap that long was seen, or the request was
still open when the run gave up on it) and ``untyped_error`` (anything else: a dropped connection, a body that is
not the error schema). A request's *stall* is its largest gap between the request start and the first content
chunk or between two consecutive chunks (or before the error/end).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from pydantic import BaseModel

CHAOS_PROMPTS = [
    "List three colours and a number.",
    "Write a short poem about a lighthouse.",
    "Explain in two sentences why the sky is blue.",
    "Name four animals that live in the sea and say one fact about each.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Give a recipe for pancakes: " + " ".join(f"step {i} uses {i * 3 % 7} spoons" for i in range(40)),
]


class Outcome(StrEnum):
    OK = "ok"
    WRONG_TEXT = "wrong_text"
    TYPED_ERROR = "typed_error"
    HUNG = "hung"
    UNTYPED_ERROR = "untyped_error"


class ErrorInfo(BaseModel):
    kind: str
    """The client's exception class (APIStatusError subclasses, APIError for a stream error event, ...)."""
    status: int | None = None
    type: str | None = None
    code: str | None = None
    message: str


class RequestResult(BaseModel):
    stream: int
    prompt: int
    started_s: float
    """Seconds since the load started."""
    ended_s: float | None = None
    outcome: Outcome | None = None
    chunk_times_s: list[float] = []
    """Arrival of each content chunk, seconds since the load started."""
    completion_tokens: int | None = None
    stall_s: float = 0.0
    error: ErrorInfo | None = None
    text: str | None = None
    """The text received, kept only when it is wrong."""


def _is_error_schema(body: object) -> bool:
    return isinstance(body, dict) and isinstance(body.get("message"), str) and isinstance(body.get("type"), str)


def stream_chat(client, model: str, prompt: str, max_tokens: int, on_chunk: Callable[[str], None]) -> int | None:
    """One greedy streamed chat completion (``ignore_eos``: every request makes ``max_tokens`` tokens); returns the
    completion tokens the final usage chunk reports."""
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            on_chunk(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return usage


def expected_texts(base_url: str, model: str, prompts: list[str], max_tokens: int, timeout_s: float = 120.0
                   ) -> list[str]:
    """Each prompt's greedy text on the swarm with no fault, asked twice: the swarm must agree with itself
    (the second run also goes through the peers' prefix caches) or the chaos comparison would mean nothing."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="chaos", max_retries=0, timeout=timeout_s)
    texts = []
    for prompt in prompts:
        runs = []
        for _ in range(2):
            parts: list[str] = []
            stream_chat(client, model, prompt, max_tokens, parts.append)
            runs.append("".join(parts))
        if runs[0] != runs[1] or not runs[0]:
            raise RuntimeError(f"the no-fault swarm is not deterministic for {prompt[:40]!r}: {runs!r}")
        texts.append(runs[0])
    client.close()
    return texts


class LoadGenerator:
    """``streams`` threads, each sending its next request as soon as its last one ended, until ``stop_at``."""

    def __init__(self, base_url: str, model: str, prompts: list[str], expected: list[str], *, streams: int,
                 max_tokens: int, hang_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 on_result: Callable[[RequestResult], None] | None = None) -> None:
        self.base_url = base_url
        self.model = model
        self.prompts = prompts
        self.expected = expected
        self.streams = streams
        self.max_tokens = max_tokens
        self.hang_s = hang_s
        self.results: list[RequestResult] = []
        self._clock = clock
        self._on_result = on_result
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.t0 = clock()
        self.stop_at = self.t0

    def start(self, duration_s: float) -> LoadGenerator:
        self.t0 = self._clock()
        self.stop_at = self.t0 + duration_s
        for index in range(self.streams):
            thread = threading.Thread(target=self._worker, args=(index,), name=f"chaos-stream-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def now_s(self) -> float:
        return self._clock() - self.t0

    def _worker(self, index: int) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key="chaos", max_retries=0, timeout=self.hang_s)
        sent = 0
        try:
            while self._clock() < self.stop_at:
                prompt = (index + sent * self.streams) % len(self.prompts)  # concurrent streams differ
                sent += 1
                result = RequestResult(stream=index, prompt=prompt, started_s=round(self.now_s(), 4))
                with self._lock:
                    self.results.append(result)
                self._one(client, result)
                if self._on_result is not None:
                    self._on_result(result)
        finally:
            client.close()

    def _one(self, client, result: RequestResult) -> None:
        import openai

        parts: list[str] = []

        def on_chunk(text: str) -> None:
            parts.append(text)
            result.chunk_times_s.append(round(self.now_s(), 4))

        try:
            result.completion_tokens = stream_chat(client, self.model, self.prompts[result.prompt], self.max_tokens,
                                                   on_chunk)
            text = "".join(parts)
            result.outcome = Outcome.OK if text == self.expected[result.prompt] else Outcome.WRONG_TEXT
            if result.outcome is Outcome.WRONG_TEXT:
                result.text = text
        except openai.APITimeoutError as exc:
            result.outcome = Outcome.HUNG
            result.error = ErrorInfo(kind=type(exc).__name__, message=str(exc)[:300])
        except openai.APIStatusError as exc:
            result.outcome = Outcome.TYPED_ERROR if _is_error_schema(exc.body) else Outcome.UNTYPED_ERROR
            result.error = ErrorInfo(kind=type(exc).__name__, status=exc.status_code, type=exc.type, code=exc.code,
                                     message=str(exc.message)[:300])
        except openai.APIConnectionError as exc:
            result.outcome = Outcome.UNTYPED_ERROR
            result.error = ErrorInfo(kind=type(exc).__name__, message=f"{exc} ({exc.__cause__!r})"[:300])
        except openai.APIError as exc:  # an error event inside the stream
            result.outcome = Outcome.TYPED_ERROR if _is_error_schema(exc.body) else Outcome.UNTYPED_ERROR
            result.error = ErrorInfo(kind=type(exc).__name__, type=exc.type, code=exc.code,
                                     message=str(exc.message)[:300])
        except Exception as exc:  # what the client itself did not expect (a malformed event, ...): untyped
            result.outcome = Outcome.UNTYPED_ERROR
            result.error = ErrorInfo(kind=type(exc).__name__, message=str(exc)[:300])
        result.ended_s = round(self.now_s(), 4)
        result.stall_s = stall_of(result, result.ended_s)
        if result.stall_s > self.hang_s:
            result.outcome = Outcome.HUNG

    def join(self, grace_s: float) -> list[RequestResult]:
        """Wait for the streams to finish their last request (at most ``grace_s`` after ``stop_at``); requests
        still open then are hung."""
        deadline = self.stop_at + grace_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - self._clock()))
        now = self.now_s()
        with self._lock:
            for result in self.results:
                if result.outcome is None:
                    result.outcome = Outcome.HUNG
                    result.stall_s = stall_of(result, now)
                    result.error = ErrorInfo(kind="still_open", message=f"still open {grace_s:.0f} s after the end")
            return [result.model_copy(deep=True) for result in self.results]


def stall_of(result: RequestResult, end_s: float) -> float:
    """The largest gap between the request start, each content chunk, and ``end_s``."""
    points = [result.started_s, *result.chunk_times_s, end_s]
    return round(max(b - a for a, b in itertools.pairwise(points)), 4)
