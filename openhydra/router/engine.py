"""The coordinator's generation engine: prompt in, a stream of text deltas and a final summary out.

It owns the session lifecycle (a session id per choice, closed on every exit path, including a client
that disconnects), the decode loop (each step feeds exactly the tokens the cache has not seen),
stop handling (EOS ids, stop strings across token boundaries, max_tokens) and the timings the APIs
report. Model work runs on a thread pool so the event loop keeps serving other requests; a request's steps run
there back to back (router/token_stream.py).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from openhydra.router.admission import CLIENT, FairSlots, Refused
from openhydra.router.coalesce import Coalescer
from openhydra.router.constrained import Constraint, Grammar
from openhydra.router.detokenize import IncrementalDetokenizer, StopMatcher
from openhydra.router.pipeline import Pipeline
from openhydra.router.speculative import Decoder, Speculator
from openhydra.router.token_stream import AHEAD, Produced, TokenStream, Waiting
from openhydra.runtime.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks that need a fixed length; vLLM's extension of the same name)."""
    logprobs: int | None = None
    """Report each output token's logprob and this many most likely alternatives (0: the token's alone)."""
    grammar: Grammar | None = None
    """Constrained decoding (router/constrained.py): the output always stays a valid prefix of the grammar."""

    @property
    def needs_detail(self) -> bool:
        return self.logprobs is not None or self.grammar is not None


@dataclass
class TokenLogprob:
    """One output token as OpenAI's logprobs report it. With constrained decoding the logprobs are those of
    the distribution actually sampled from (the masked, renormalised logits)."""

    token_id: int
    bytes: bytes
    logprob: float
    top: list[tuple[int, bytes, float]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return token_text(self.bytes)


def token_text(raw: bytes) -> str:
    """A token's text; a piece of a multi-byte character is written as its bytes (``\\xe2``), as OpenAI does."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class TextDelta:
    text: str
    token_id: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """The tokens whose text this delta completes (logprobs requests only)."""


@dataclass
class Finished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    text: str
    started_at: float
    first_token_at: float | None
    finished_at: float
    draft_tokens: int = 0
    """Speculative decoding: draft tokens verified, and how many of them were accepted."""
    accepted_draft_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    """Every output token's logprobs (logprobs requests only)."""
    constraint_complete: bool | None = None
    """Constrained requests: whether the output is a complete value of the grammar."""

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def prompt_eval_ns(self) -> int:
        end = self.first_token_at or self.finished_at
        return int((end - self.started_at) * 1e9)

    @property
    def eval_ns(self) -> int:
        return int((self.finished_at - (self.first_token_at or self.finished_at)) * 1e9)

    @property
    def total_ns(self) -> int:
        return int((self.finished_at - self.started_at) * 1e9)


class ContextTooLong(ValueError):
    pass


class PromptTooLong(ContextTooLong):
    """A prompt whose byte length alone proves it longer than the context (refused before tokenizing it)."""


class Unsupported(ValueError):
    """The request asks for something this pipeline cannot do (the API answers 400)."""


class Overloaded(RuntimeError):
    """Every generation slot of the node is taken and the queue for one is full, or the wait for one ran out (the
    API answers 503 with Retry-After: the request was never started, so retrying it loses nothing)."""

    retry_after_s = 2
    api_code = "overloaded"


class ShuttingDown(RuntimeError):
    """The engine was shut down (the node is stopping) while a request was running."""

    retry_after_s = 5
    api_code = "shutting_down"


_SHRINK_AT_MOST = {None: 1, "NFC": 3, "NFD": 3, "NFKC": 3, "NFKD": 3, "Prepend": 1, "ByteLevel": 1}
"""Normalizer type -> how many times fewer bytes it may leave of a text, at most (others: not known)."""


def _bytes_per_token_at_most(tokenizer: Any) -> int:
    """Input bytes one token can stand for, at most (times what the normalizer may shrink); 0: not known. A
    byte-level vocabulary entry's characters stand for one input byte each; any other entry's UTF-8 bytes bound
    what it covers (a SentencePiece "▁" is 3 bytes for 1, a byte-fallback "<0x41>" 6 for 1); an added token
    matches its own text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return 0
    normalizer = backend.normalizer
    kind = type(normalizer).__name__ if normalizer is not None else None
    if kind not in _SHRINK_AT_MOST:
        return 0
    byte_level = type(backend.decoder).__name__ == "ByteLevel"
    pieces = backend.get_vocab(with_added_tokens=False)
    longest = max((len(p) if byte_level else len(p.encode("utf-8")) for p in pieces), default=0)
    added = [t.content for t in backend.get_added_tokens_decoder().values()]
    longest = max([longest, *(len(t.encode("utf-8")) for t in added)])
    return _SHRINK_AT_MOST[kind] * longest


class Engine:
    def __init__(
        self,
        tokenizer,
        pipeline: Pipeline,
        *,
        eos_token_ids: set[int],
        context_length: int,
        max_concurrent_sessions: int = 32,
        max_queued_requests: int = 64,
        queue_timeout_s: float = 30.0,
        speculator: Speculator | None = None,
        decode_ahead: int = AHEAD,
    ) -> None:
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length
        self.executor = ThreadPoolExecutor(max_workers=max_concurrent_sessions, thread_name_prefix="decode")
        # Prompts are tokenized off the event loop, one at a time (the tokenizer's Rust code releases the GIL; a
        # fast tokenizer used from several threads at once can fail): a red team's ~1 MiB prompts each held the
        # loop ~1.3 s, /health took 2.3 s and an honest chat 19.9 s.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._bytes_per_token_at_most: int | None = None
        self._waiting = Waiting()  # requests whose decode steps wait for a worker (router/token_stream.py)
        self.decode_ahead = decode_ahead
        self.closed = False
        self._streams: set[TokenStream] = set()  # running requests' producers, ended by shutdown()
        self.active_sessions: set[str] = set()
        # At most max_concurrent_sessions generations at once (the runtime keeps a bounded number of sessions: more
        # would evict running ones); up to max_queued_requests more wait for queue_timeout_s, each client in turn
        # (router/admission.py).
        self._slots = FairSlots(max_concurrent_sessions, max_queued_requests)
        self.max_concurrent_sessions = max_concurrent_sessions
        self.queue_timeout_s = queue_timeout_s
        self.speculator = speculator
        """Speculative decoding (router/speculative.py); None: one pipeline step per token."""
        self.on_finish: Callable[[Finished], None] | None = None
        self.coalescer: Coalescer | None = None
        """When set (serving.coalesce), identical greedy requests in flight together run once (router/coalesce.py)."""
        """Called off the event loop after every completed generation (settlement, accounting)."""

    # -- prompts ---------------------------------------------------------------------------------
    def chat_prompt_ids(self, messages: list[dict[str, str]], **template: Any) -> list[int]:
        """``template``: variables for the chat template (``enable_thinking=False``; a template ignores others)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template)
        return self.encode(text, add_special_tokens=False)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.encode(prompt)

    def encode(self, text: str, **options: Any) -> list[int]:
        """``text``'s tokens, or :class:`PromptTooLong` without tokenizing when its length in bytes alone proves it
        longer than the context (a megabyte of text is ~1 s of a core to tokenize, for an error)."""
        least = self._tokens_at_least(text)
        if least > self.context_length:
            raise PromptTooLong(f"prompt is at least {least} tokens ({len(text.encode('utf-8', 'replace'))} bytes); "
                                f"the model's context length is {self.context_length}")
        return list(self.tokenizer(text, **options)["input_ids"])

    def _tokens_at_least(self, text: str) -> int:
        """A lower bound on ``text``'s token count: no token covers more input bytes than the longest vocabulary
        entry has (a byte-level token's characters stand for one byte each, a SentencePiece token's for one or
        more), and Unicode normalization shrinks text at most 3-fold in bytes (Hangul composition). 0 where the
        tokenizer's normalizer could shrink it further (strip, replace) or is not known."""
        per_token = self._bytes_per_token_at_most
        if per_token is None:
            per_token = self._bytes_per_token_at_most = _bytes_per_token_at_most(self.tokenizer)
        if per_token <= 0:
            return 0
        return len(text.encode("utf-8", "replace")) // per_token

    async def tokenized(self, render: Callable[..., list[int]], *args: Any, **kwargs: Any) -> list[int]:
        """``render(*args, **kwargs)`` (a prompt's tokens: :meth:`chat_prompt_ids` and the like) on the tokenizing
        thread, so a long prompt does not hold the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, functools.partial(render, *args, **kwargs))

    def check_fits(self, prompt_len: int, max_tokens: int, max_tokens_name: str = "max_tokens") -> None:
        """``max_tokens_name``: what the message calls the length (the field the client sent it in)."""
        if prompt_len + max_tokens > self.context_length:
            raise ContextTooLong(
                f"prompt ({prompt_len} tokens) + {max_tokens_name} ({max_tokens}) exceeds the model's context "
                f"length of {self.context_length} tokens"
            )

    # -- generation ------------------------------------------------------------------------------
    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Finished]:
        """Yield text deltas, then one `Finished`. Cancelling the iterator frees the session."""
        if request.needs_detail and not hasattr(self.pipeline, "step_detail"):
            raise Unsupported("this node's pipeline cannot report logprobs or constrain the output")
        if self.coalescer is not None and not request.needs_detail:
            async for event in self.coalescer.stream(request, lambda: self._stream_one(request)):
                yield event
            return
        async for event in self._stream_one(request):
            yield event

    async def _admit(self) -> None:
        """Take a generation slot, waiting in the request's client's line for one when all are taken (clients in
        turn); :class:`Overloaded` when the room is full, the wait runs out, or another client took its place."""
        try:
            await self._slots.acquire(CLIENT.get(), self.queue_timeout_s)
        except Refused:
            raise Overloaded(f"the node is busy: {self.max_concurrent_sessions} generations running and "
                             f"{self.queued} waiting (api.max_concurrent_sessions, api.max_queued_requests); retry"
                             ) from None
        except TimeoutError:
            raise Overloaded(f"the node is busy: no generation slot freed within {self.queue_timeout_s:g} s "
                             f"({self.max_concurrent_sessions} running; api.queue_timeout_s); retry") from None

    @property
    def queued(self) -> int:
        """Requests waiting for a generation slot now."""
        return self._slots.waiting

    async def _stream_one(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Finished]:
        self.check_fits(len(request.prompt_ids), request.max_tokens)
        if self.closed:
            raise ShuttingDown("the node is shutting down; retry the request on another node")
        await self._admit()
        try:
            async with aclosing(self._generate(request)) as events:  # closed here, not whenever it is collected
                async for event in events:
                    yield event
        finally:
            self._slots.release()

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Finished]:
        session_id = uuid.uuid4().hex
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(request.stop)
        started = time.perf_counter()
        first_token_at: float | None = None
        pieces: list[str] = []
        completion_tokens = 0
        finish_reason: Literal["stop", "length"] = "length"
        eos = frozenset() if request.ignore_eos else frozenset(self.eos_token_ids)
        if request.needs_detail:
            decoder = DetailDecoder(self, session_id, request)
        else:
            decoder = Decoder(self.pipeline, session_id, request.prompt_ids, request.sampling, request.max_tokens,
                              self.speculator, stop_ids=eos)
        details: list[TokenLogprob] | None = [] if request.logprobs is not None else None
        # A token's logprob goes out with the first content it gave (text held back as a possible stop prefix holds
        # it back too), and not at all if a stop string swallowed all of its text: the logprobs spell the content.
        starts: list[int] = []  # where each of ``details``' tokens starts in the generated text (in characters)
        decoded = emitted = 0  # characters of generated text decoded so far, and of them sent as content
        sent = 0  # ``details[:sent]`` went out with content
        self.active_sessions.add(session_id)
        steps = TokenStream(decoder, self.executor, self._waiting, ends=lambda tokens: not eos.isdisjoint(tokens),
                            on_done=lambda: self._close_session(session_id, decoder), ahead=self.decode_ahead)
        self._streams.add(steps)
        last = Produced(tokens=[])  # the decoder's state as of the last step taken
        try:
            steps.start()
            done = False
            while not done:
                # one token per step, or several when a speculative draft was accepted
                try:
                    last = await steps.next()
                except (RuntimeError, asyncio.CancelledError):
                    if self.closed:  # the node is stopping (Ctrl-C): say so, not "cannot schedule futures"
                        raise ShuttingDown("the node is shutting down; retry the request on another node") from None
                    raise
                tokens = last.tokens
                if not tokens:  # max_tokens reached, or a complete constrained value (under ignore_eos)
                    if last.ended:
                        finish_reason = "stop"
                    break
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                for token in tokens:  # EOS, stop strings and max_tokens are exact within a batch
                    if token in self.eos_token_ids and not request.ignore_eos:
                        finish_reason, done = "stop", True
                        break
                    completion_tokens += 1
                    piece = detok.push(token)
                    if details is not None:
                        assert last.detail is not None and last.detail.token_id == token  # one token per step
                        details.append(last.detail)
                        starts.append(decoded)
                    decoded += len(piece)
                    emit, hit_stop = stops.feed(piece)
                    emitted += len(emit)
                    ready = sent if details is None else bisect.bisect_left(starts, emitted)
                    if hit_stop and details is not None:
                        del details[ready:], starts[ready:]  # tokens that only spell the stop string
                    if emit:
                        pieces.append(emit)
                        yield TextDelta(emit, token, [] if details is None else details[sent:ready])
                        sent = ready
                    if hit_stop:
                        finish_reason, done = "stop", True
                        break
            rest = stops.flush()  # text held back as a possible stop prefix that never became one
            unsent = [] if details is None else details[sent:]
            if rest or unsent:
                pieces.append(rest)
                yield TextDelta(rest, -1, unsent)
            final = Finished(
                finish_reason=finish_reason,
                prompt_tokens=len(request.prompt_ids),
                completion_tokens=completion_tokens,
                text="".join(pieces),
                started_at=started,
                first_token_at=first_token_at,
                finished_at=time.perf_counter(),
                draft_tokens=last.drafted,
                accepted_draft_tokens=last.accepted,
                logprobs=details,
                constraint_complete=last.constraint_complete,
            )
            if last.drafted:
                log.debug("session %s: %d/%d draft tokens accepted", session_id, last.accepted, last.drafted)
            if self.on_finish is not None and not self.closed:
                self.executor.submit(self._run_hook, final)
            yield final
        finally:
            self.active_sessions.discard(session_id)
            self._streams.discard(steps)
            steps.finish()  # the session closes after the step in flight, if any (token_stream.py)

    def _close_session(self, session_id: str, decoder) -> None:
        if not self.closed:
            self.pipeline.close(session_id)
            decoder.close()

    def _run_hook(self, final: Finished) -> None:
        try:
            self.on_finish(final)
        except Exception:  # accounting must never break serving; it is logged and counted by its owner
            log.exception("on_finish hook failed")

    async def complete(self, request: GenerationRequest) -> Finished:
        final: Finished | None = None
        async for event in self.stream(request):
            if isinstance(event, Finished):
                final = event
        assert final is not None
        return final

    def shutdown(self) -> None:
        """Stop: every running stream ends now with :class:`ShuttingDown` (its client gets the error event), and the
        decode pool takes no more work."""
        self.closed = True
        for steps in list(self._streams):
            steps.abort(ShuttingDown("the node is shutting down; retry the request on another node"))
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._tokenizing.shutdown(wait=False, cancel_futures=True)


class DetailDecoder:
    """Plain decoding (one pipeline step per token, no speculation) for requests that need more than the
    sampled token: logprobs (the last hop's top-k and the sampled token's logprob) and constrained decoding
    (the last position's logits come back to the coordinator, which masks them and samples itself)."""

    drafted = 0
    accepted = 0

    def __init__(self, engine: Engine, session_id: str, request: GenerationRequest) -> None:
        self.pipeline = engine.pipeline
        self.table_bytes = _token_bytes(engine.tokenizer)
        self.session_id = session_id
        self.request = request
        self.history = list(request.prompt_ids)
        self.produced = 0
        self.constraint = (Constraint(request.grammar, engine.eos_token_ids) if request.grammar is not None
                           else None)
        self._details: dict[int, TokenLogprob] = {}
        self._last: TokenLogprob | None = None
        self.ended = False  # the constrained value is complete and its EOS was handed out: the output is over

    def next_tokens(self) -> list[int]:
        req = self.request
        if self.produced >= req.max_tokens:
            return []
        if self.constraint is not None and not self.constraint.state:  # the value is complete: only EOS fits
            if self.ended:  # ignore_eos counted that EOS: nothing can follow a complete value (was: EOS forever)
                return []
            self.ended = True
            if not self.constraint.eos_token_ids:
                return []
            eos = min(self.constraint.eos_token_ids)
            # the only token the constraint allows: probability 1 (under ignore_eos it is counted and reported)
            self._last = self._entry(eos, 0.0, [eos] if req.logprobs else [], [0.0] if req.logprobs else [])
            return [eos]
        first = self.produced == 0
        feed = self.history if first else [self.history[-1]]
        start = 0 if first else len(self.history) - 1
        top_n = req.logprobs or 0
        result = self.pipeline.step_detail(self.session_id, feed, start, req.sampling, self.produced,
                                           top_k=0 if self.constraint is not None or req.logprobs is None
                                           else max(1, top_n),
                                           logits=self.constraint is not None)
        if self.constraint is not None:
            import torch

            logits = result.logits[-1].float()  # [V]
            mask = self.constraint.mask(logits.numel())
            if not bool(mask.any()):  # a dead end (a character no token can spell): end the output here
                log.warning("session %s: no token continues the constrained output", self.session_id)
                return []
            masked = logits.masked_fill(~mask, float("-inf"))
            token = sample(masked, req.sampling, self.produced)
            self.constraint.advance(token)
            if req.logprobs is not None:
                logprobs = torch.log_softmax(masked, dim=-1)
                top = torch.topk(logprobs, min(top_n, int(mask.sum()))) if top_n else None
                top_ids = top.indices.tolist() if top is not None else []
                top_lps = top.values.tolist() if top is not None else []
                self._last = self._entry(token, float(logprobs[token]), top_ids, top_lps)
        else:
            token = result.token
            if req.logprobs is not None:
                token_lp = result.token_logprob
                if token_lp is None:
                    raise RuntimeError("the last hop returned no logprob for the sampled token")
                self._last = self._entry(token, token_lp, list(result.top_ids)[:top_n],
                                         list(result.top_logprobs)[:top_n])
        self.history.append(token)
        self.produced += 1
        return [token]

    def _entry(self, token: int, logprob: float, top_ids: list[int], top_lps: list[float]) -> TokenLogprob:
        return TokenLogprob(token, self._bytes(token), logprob,
                            [(i, self._bytes(i), lp) for i, lp in zip(top_ids, top_lps, strict=True)])

    def _bytes(self, token: int) -> bytes:
        return self.table_bytes[token] if token < len(self.table_bytes) else b""

    @property
    def last_detail(self) -> TokenLogprob | None:
        """The last step's token with its logprobs (router/token_stream.py hands it over with the token)."""
        return self._last

    def close(self) -> None:
        if self.constraint is not None and self.constraint.steps:
            log.debug("session %s: constrained decoding %.2f ms per token", self.session_id,
                      1000 * self.constraint.mask_seconds / self.constraint.steps)


def _token_bytes(tokenizer) -> list[bytes]:
    from openhydra.router.constrained import TokenTable

    return TokenTable.of(tokenizer).bytes
