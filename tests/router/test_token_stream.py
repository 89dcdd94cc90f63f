"""A request's decode steps run back to back on a worker (router/token_stream.py), and nothing else changes:
the next step starts before the event loop takes the last one, at most AHEAD steps run ahead, the session
closes once after the last step, requests take turns when the pool is full, failures and a stopped pool reach
the consumer, and what a consumer reads is the state of the step it took. Then the same through the real
Engine on a real model: a stop string ends the output where it did, and the session is closed."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer

from openhydra.router.engine import Engine, Finished, GenerationRequest, ShuttingDown, TextDelta
from openhydra.router.pipeline import LocalPipeline
from openhydra.router.token_stream import AHEAD, ShutDown, TokenStream, Waiting
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime

WAIT_S = 30.0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


async def await_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Scripted:
    """A decoder of ``n`` steps (token i at step i, then []); ``gates[i]`` holds step i until set, ``fail_at``
    raises there. Records every call (step index, thread) into ``log`` (shared between decoders)."""

    def __init__(self, name: str, n: int, log: list, gates: dict[int, threading.Event] | None = None,
                 fail_at: int | None = None, step_s: float = 0.0) -> None:
        self.name, self.n, self.log, self.step_s = name, n, log, step_s
        self.gates = gates or {}
        self.fail_at = fail_at
        self.calls = 0
        self.drafted = self.accepted = 0

    def next_tokens(self) -> list[int]:
        i = self.calls
        self.calls += 1
        self.log.append((self.name, "start", i, threading.get_ident()))
        if i in self.gates:
            assert self.gates[i].wait(WAIT_S)
        if i == self.fail_at:
            raise ValueError(f"step {i} failed")
        time.sleep(self.step_s)  # a step's compute (releases the GIL, as torch does)
        self.drafted += 2  # what a consumer reads must be as of the step it took
        self.accepted += 1
        self.log.append((self.name, "end", i, threading.get_ident()))
        return [i] if i < self.n else []


def _stream(decoder, executor, waiting=None, closed=None, ahead: int = AHEAD) -> TokenStream:
    closed = closed if closed is not None else []
    return TokenStream(decoder, executor, waiting if waiting is not None else Waiting(), ends=lambda tokens: False,
                       on_done=lambda: closed.append((decoder.name, decoder.calls)), ahead=ahead)


def drive(decoder: Scripted, body, *, closed: list | None = None, ahead: int = AHEAD):
    """Start a stream of ``decoder`` on a pool of 2 workers, run ``await body(stream)`` on an event loop, then
    finish the stream (finish() is idempotent: a body may call it itself)."""
    with ThreadPoolExecutor(2) as pool:
        async def main():
            stream = _stream(decoder, pool, closed=closed, ahead=ahead)
            stream.start()
            try:
                return await body(stream)
            finally:
                stream.finish()

        return asyncio.run(main())


def test_the_next_step_starts_before_the_loop_takes_the_last() -> None:
    decoder = Scripted("a", 6, [])

    async def body(stream: TokenStream) -> list[int]:
        got = []
        for k in range(6):
            # before taking step k, step k+1 is already running or done: no round trip through the loop
            await await_for(lambda k=k: decoder.calls > k + 1, f"step {k + 1} to start before step {k} is taken")
            got.extend((await stream.next()).tokens)
        assert (await stream.next()).tokens == []
        return got

    assert drive(decoder, body) == list(range(6))


def test_at_most_AHEAD_steps_run_ahead_then_the_producer_parks() -> None:
    decoder = Scripted("a", 50, [])

    async def body(stream: TokenStream) -> None:
        await await_for(lambda: not stream._running, "the producer to park")
        assert decoder.calls == AHEAD  # nothing taken: AHEAD steps computed, then it waits for the loop
        assert (await stream.next()).tokens == [0]
        await await_for(lambda: decoder.calls == AHEAD + 1 and not stream._running, "one more step")
        assert decoder.calls == AHEAD + 1

    drive(decoder, body)


def test_ahead_0_is_the_old_lockstep() -> None:
    decoder = Scripted("a", 50, [])

    async def body(stream: TokenStream) -> None:
        for k in range(3):
            assert (await stream.next()).tokens == [k]
            # taken and handled: still no next step until the loop asks for it
            await await_for(lambda: not stream._running, "the producer to park")
            assert decoder.calls == k + 1

    drive(decoder, body, ahead=0)


@pytest.mark.parametrize("ahead", [0, 1, AHEAD])
def test_no_step_is_lost_between_a_fast_producer_and_a_fast_consumer(ahead: int) -> None:
    """Instant steps and a consumer that asks again at once: the windows where the producer parks while the
    loop asks for more (a lost wake-up hung the lockstep mode once) are hit many times over."""
    with ThreadPoolExecutor(2) as pool:
        async def one(round_: int) -> list[int]:
            closed: list = []
            decoder = Scripted(f"r{round_}", 20, [])
            stream = TokenStream(decoder, pool, Waiting(), ends=lambda tokens: False,
                                 on_done=lambda: closed.append(1), ahead=ahead)
            stream.start()
            out = []
            while tokens := (await asyncio.wait_for(stream.next(), WAIT_S)).tokens:
                out.extend(tokens)
            stream.finish()
            await await_for(lambda: closed, "the session to close")
            return out

        async def main() -> None:
            for round_ in range(150):
                assert await one(round_) == list(range(20))

        asyncio.run(main())


def test_finish_closes_the_session_once_after_the_step_in_flight() -> None:
    log: list = []
    gate = threading.Event()
    closed: list = []
    decoder = Scripted("a", 10, log, gates={2: gate})

    async def body(stream: TokenStream) -> None:
        assert (await stream.next()).tokens == [0]
        assert (await stream.next()).tokens == [1]
        await await_for(lambda: decoder.calls == 3, "step 2 to start")
        stream.finish()  # e.g. a stop string in step 1's text
        assert closed == []  # step 2 is still running on the session
        gate.set()
        await await_for(lambda: closed, "the session to close")

    drive(decoder, body, closed=closed)
    assert closed == [("a", 3)]  # once, after step 2, and no step after finish()
    assert log[-1][:3] == ("a", "end", 2)


def test_a_parked_producer_is_closed_by_finish() -> None:
    closed: list = []
    decoder = Scripted("a", 10, [])

    async def body(stream: TokenStream) -> None:
        await await_for(lambda: not stream._running, "the producer to park")
        stream.finish()
        await await_for(lambda: closed, "the session to close")

    drive(decoder, body, closed=closed)
    assert closed == [("a", AHEAD)]


def test_requests_take_turns_when_the_pool_is_full() -> None:
    log: list = []
    # Steps long enough for the loop to take each one at once: the producers never park, so only taking
    # turns can interleave them (without it, a would run all its steps while b waited for the worker).
    a, b = Scripted("a", 12, log, step_s=0.005), Scripted("b", 12, log, step_s=0.005)
    with ThreadPoolExecutor(1) as pool:  # one worker for two requests
        waiting = Waiting()

        async def consume(stream: TokenStream) -> list[int]:
            out = []
            while tokens := (await stream.next()).tokens:
                out.extend(tokens)
            stream.finish()
            return out

        async def main():
            sa, sb = _stream(a, pool, waiting), _stream(b, pool, waiting)
            sa.start()
            sb.start()
            return await asyncio.gather(consume(sa), consume(sb))

        assert asyncio.run(main()) == [list(range(12))] * 2
    order = [name for name, kind, _, _ in log if kind == "start"]
    first_b = order.index("b")
    assert first_b <= AHEAD, order  # b did not wait for a's whole output
    # they alternate: strictly when the loop takes each token at once; a late loop (a loaded machine) parks the
    # other producer, which lets one run on, but never past AHEAD steps its consumer has not taken plus the one
    # it computes (without turns, a ran all 12 of its steps before b's first)
    runs = [len(list(group)) for _, group in itertools.groupby(order)]
    assert max(runs) <= AHEAD + 1, order


def test_a_failing_step_reaches_the_consumer_and_the_session_closes() -> None:
    closed: list = []
    decoder = Scripted("a", 10, [], fail_at=2)

    async def body(stream: TokenStream) -> None:
        assert (await stream.next()).tokens == [0]
        assert (await stream.next()).tokens == [1]
        with pytest.raises(ValueError, match="step 2 failed"):
            await stream.next()
        stream.finish()
        await await_for(lambda: closed, "the session to close")

    drive(decoder, body, closed=closed)
    assert closed == [("a", 3)] and decoder.calls == 3


def test_a_stopped_pool_ends_the_stream() -> None:
    blocker = threading.Event()
    pool = ThreadPoolExecutor(1)
    pool.submit(blocker.wait, WAIT_S)  # the only worker is busy: the stream's producer queues behind it
    decoder = Scripted("a", 10, [])

    async def main() -> None:
        stream = _stream(decoder, pool)
        stream.start()
        pool.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(ShutDown):
            await stream.next()
        stream.finish()  # nothing to close on a stopped pool, and no error

    try:
        asyncio.run(main())
    finally:
        blocker.set()
    assert decoder.calls == 0


def test_what_the_consumer_reads_is_the_state_of_the_step_it_took() -> None:
    decoder = Scripted("a", 10, [])

    async def body(stream: TokenStream) -> None:
        await await_for(lambda: decoder.calls == AHEAD, "the producer to run ahead")
        first = await stream.next()
        assert (first.drafted, first.accepted) == (2, 1)  # not the decoder's counts now (steps ahead)
        await await_for(lambda: decoder.drafted == 2 * (AHEAD + 1), "one more step")
        second = await stream.next()
        assert (second.drafted, second.accepted) == (4, 2)

    drive(decoder, body)


# ---- through the real Engine ------------------------------------------------------------------------------


class CountingPipeline(LocalPipeline):
    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.steps = 0

    def step(self, session_id, token_ids, start_pos, sampling, step):
        self.steps += 1
        return super().step(session_id, token_ids, start_pos, sampling, step)


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    eng = Engine(AutoTokenizer.from_pretrained(path), CountingPipeline(ShardRuntime(path)), eos_token_ids=set(),
                 context_length=4096)
    yield eng
    eng.shutdown()


async def _collect(engine: Engine, request: GenerationRequest) -> tuple[list[str], Finished]:
    pieces = []
    async for event in engine.stream(request):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            final = event
    return pieces, final


def test_a_stop_string_ends_the_output_where_it_did_and_the_session_closes(engine) -> None:
    prompt = torch.arange(10, 40).tolist()
    runtime = engine.pipeline.runtime
    plain = GenerationRequest(prompt_ids=prompt, max_tokens=24, sampling=SamplingParams(temperature=0.0))
    pieces, final = asyncio.run(_collect(engine, plain))
    assert final.completion_tokens == 24 and final.finish_reason == "length"
    wait_for(lambda: runtime.session_count() == 0, "the session to close")
    # A stop string made of the 6th and 7th tokens' text (distinct from anything before it).
    k = next(i for i in range(5, 20) if pieces[i] + pieces[i + 1] not in "".join(pieces[: i + 1]))
    stop = pieces[k] + pieces[k + 1]
    before = engine.pipeline.steps
    _, cut = asyncio.run(_collect(engine, GenerationRequest(
        prompt_ids=prompt, max_tokens=24, sampling=SamplingParams(temperature=0.0), stop=[stop])))
    assert cut.finish_reason == "stop" and cut.text == "".join(pieces[:k])
    wait_for(lambda: runtime.session_count() == 0, "the stopped session to close")
    assert k + 2 <= engine.pipeline.steps - before <= k + 2 + AHEAD  # at most AHEAD steps computed past the stop


def test_a_stopped_engine_says_it_is_shutting_down(tiny_model_dirs) -> None:
    path = tiny_model_dirs["llama"]
    eng = Engine(AutoTokenizer.from_pretrained(path), LocalPipeline(ShardRuntime(path)), eos_token_ids=set(),
                 context_length=4096)
    eng.shutdown()
    with pytest.raises(ShuttingDown):
        asyncio.run(_collect(eng, GenerationRequest(prompt_ids=[5, 6, 7], max_tokens=4)))


# ---- a client gone during a long prefill (router/abandon.py) ----------------------------------------------------


class GatedRuntime:
    """A runtime whose forwards are counted; the first one waits for ``gate`` (and says it started); ``closed`` is
    set when a session is closed (after a request's last step)."""

    def __init__(self, runtime) -> None:
        self._runtime = runtime
        self.calls = 0
        self.started, self.gate, self.closed = threading.Event(), threading.Event(), threading.Event()

    def close_session(self, session_id: str) -> None:
        self._runtime.close_session(session_id)
        self.closed.set()

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            self.started.set()
            assert self.gate.wait(WAIT_S)
        return self._runtime.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


def test_a_prefill_stops_between_chunks_once_its_client_is_gone(tiny_model_dirs) -> None:
    path = tiny_model_dirs["llama"]
    runtime = ShardRuntime(path)
    gated = GatedRuntime(runtime)
    pipeline = LocalPipeline(gated, prefill_chunk=32)
    eng = Engine(AutoTokenizer.from_pretrained(path), pipeline, eos_token_ids=set(), context_length=4096)
    prompt = [10 + i % 200 for i in range(20 * 32)]  # 20 chunks

    async def client_goes_away() -> None:
        events = eng.stream(GenerationRequest(prompt_ids=prompt, max_tokens=4))
        first = asyncio.ensure_future(anext(events))
        await await_for(gated.started.is_set, "the prefill to start")
        first.cancel()  # the HTTP handler is cancelled when its client disconnects
        with pytest.raises(asyncio.CancelledError):
            await first
        await events.aclose()
        gated.gate.set()

    try:
        asyncio.run(client_goes_away())
        wait_for(gated.closed.is_set, "the abandoned session to close")
        assert runtime.session_count() == 0
        assert gated.calls == 1, f"{gated.calls} of 20 prefill chunks computed for a client that was gone"
        # the engine serves the next request as before
        _, final = asyncio.run(_collect(eng, GenerationRequest(
            prompt_ids=prompt[:40], max_tokens=3, sampling=SamplingParams(temperature=0.0))))
        assert final.completion_tokens == 3
    finally:
        eng.shutdown()


def test_waiting_for_peers_stops_once_the_step_is_abandoned() -> None:
    from concurrent.futures import Future

    from openhydra.router import abandon

    stopped = threading.Event()
    pending: Future = Future()
    threading.Timer(0.2, stopped.set).start()
    with abandon.abandon_when(stopped.is_set), pytest.raises(abandon.Abandoned):
        abandon.wait(pending, timeout=WAIT_S)
    assert pending.cancelled()
    # outside a step's scope it is a plain wait; the work's own TimeoutError is not taken for a poll
    done: Future = Future()
    done.set_result(7)
    assert abandon.wait(done, timeout=1) == 7
    class FinishesAsThePollEnds(Future):
        def result(self, timeout=None):
            if not self.done():  # the step's result arrives just as this poll's wait runs out
                self.set_result(8)
                raise TimeoutError
            return super().result(timeout)

    with abandon.abandon_when(lambda: False):
        assert abandon.wait(FinishesAsThePollEnds(), timeout=WAIT_S) == 8  # its result, not the poll's timeout
    failed: Future = Future()
    failed.set_exception(TimeoutError("the hop timed out"))
    with abandon.abandon_when(lambda: False), pytest.raises(TimeoutError, match="the hop timed out"):
        abandon.wait(failed, timeout=WAIT_S)


def test_a_stopping_engine_ends_running_streams_at_once(tiny_model_dirs) -> None:
    """CLI audit (2026-12-06): on SIGTERM a running stream kept decoding until the server's graceful-shutdown
    timeout cancelled it (15 s), and its client got no error. Now shutdown() ends it with ShuttingDown."""
    path = tiny_model_dirs["llama"]
    runtime = ShardRuntime(path)
    pipeline = CountingPipeline(runtime)
    eng = Engine(AutoTokenizer.from_pretrained(path), pipeline, eos_token_ids=set(), context_length=4096)
    request = GenerationRequest(prompt_ids=[5, 6, 7], max_tokens=4000, sampling=SamplingParams(temperature=0.0))

    async def stopped_midway() -> tuple[int, float]:
        events = eng.stream(request)
        for _ in range(3):
            await anext(events)
        began = time.monotonic()
        eng.shutdown()  # as the node's before_server_stop hook does, on the event loop
        taken = 0
        with pytest.raises(ShuttingDown):
            async for _ in events:
                taken += 1
        return taken, time.monotonic() - began

    taken, waited = asyncio.run(stopped_midway())
    assert taken <= AHEAD + 1 and waited < 5.0, (taken, waited)  # the steps already computed, then the error
    steps = pipeline.steps
    time.sleep(0.5)
    assert pipeline.steps <= steps + 1  # the producer stopped (at most the step that was in flight)
