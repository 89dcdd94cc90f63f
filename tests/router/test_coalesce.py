"""Request coalescing: identical greedy requests in flight together get identical outputs from one run."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from openhydra.router.coalesce import Coalescer
from openhydra.router.engine import Engine, Finished, GenerationRequest, TextDelta
from openhydra.router.pipeline import LocalPipeline
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime


class CountingPipeline(LocalPipeline):
    """A real LocalPipeline that counts sessions started (prefill steps) and steps run."""

    def __init__(self, runtime) -> None:
        super().__init__(runtime)
        self.runs = 0
        self.steps = 0

    def step(self, session_id, token_ids, start_pos, sampling, step):
        self.steps += 1
        self.runs += start_pos == 0
        return super().step(session_id, token_ids, start_pos, sampling, step)


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    pipeline = CountingPipeline(ShardRuntime(path))
    eng = Engine(AutoTokenizer.from_pretrained(path), pipeline, eos_token_ids=set(), context_length=4096)
    eng.coalescer = Coalescer()
    yield eng
    eng.shutdown()


async def _collect(engine: Engine, request: GenerationRequest) -> tuple[str, Finished]:
    text = []
    async for event in engine.stream(request):
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            final = event
    return "".join(text), final


def _request(prompt: list[int], temperature: float = 0.0) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=12, sampling=SamplingParams(temperature=temperature, seed=1))


def test_identical_greedy_requests_run_once(engine) -> None:
    pipeline = engine.pipeline
    runs, steps = pipeline.runs, pipeline.steps
    prompt = torch.arange(10, 40).tolist()

    async def main():
        return await asyncio.gather(*[_collect(engine, _request(prompt)) for _ in range(4)])

    results = asyncio.run(main())
    assert pipeline.runs - runs == 1 and pipeline.steps - steps == 12  # one generation of 12 tokens
    texts = {text for text, _ in results}
    assert len(texts) == 1 and texts.pop()
    assert all(final.completion_tokens == 12 and final.text == results[0][0] for _, final in results)
    assert engine.coalescer.coalesced >= 3 and engine.coalescer.in_flight == 0
    # The same request alone (nothing in flight to join) gives the same text from a fresh run.
    alone, _ = asyncio.run(_collect(engine, _request(prompt)))
    assert alone == results[0][0] and pipeline.runs - runs == 2


def test_different_or_sampled_requests_are_not_coalesced(engine) -> None:
    pipeline = engine.pipeline
    runs = pipeline.runs
    a, b = torch.arange(10, 40).tolist(), torch.arange(11, 41).tolist()

    async def main():
        return await asyncio.gather(_collect(engine, _request(a)), _collect(engine, _request(b)),
                                    _collect(engine, _request(a, 0.8)), _collect(engine, _request(a, 0.8)))

    asyncio.run(main())
    assert pipeline.runs - runs == 4


def test_a_subscriber_leaving_does_not_stop_the_others(engine) -> None:
    prompt = torch.arange(50, 70).tolist()

    async def leave_early():
        async for _event in engine.stream(_request(prompt)):
            break  # the client disconnects after its first delta

    async def main():
        return await asyncio.gather(leave_early(), _collect(engine, _request(prompt)))

    _, (text, final) = asyncio.run(main())
    assert final.completion_tokens == 12 and text == final.text
