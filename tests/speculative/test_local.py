"""Speculative decoding through the Engine on a LocalPipeline: greedy output equals plain greedy for both
drafters, seeded sampling with point-mass drafts equals plain seeded sampling, a draft model's sampled
drafts leave the next-token distribution unchanged, stops stay exact, and a recurrent model falls back."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoTokenizer

from openhydra.router.drafters import Draft
from openhydra.router.engine import Engine, Finished, GenerationRequest
from openhydra.router.pipeline import LocalPipeline
from openhydra.router.speculative import Decoder, SpeculativeConfig, Speculator, build_drafter, target_probs
from openhydra.runtime.sampling import SamplingParams
from openhydra.runtime.shard import ShardRuntime

N = 48  # output tokens per comparison (the machine is shared: keep it short)
MESSAGES = [{"role": "user", "content": "List three colours and a number."}]


@functools.cache
def _runtime(model_dir) -> ShardRuntime:
    """One runtime per model for the whole module: every generation has its own session."""
    return ShardRuntime(model_dir)


@functools.cache
def _tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _engine(model_dir, speculator=None, eos=frozenset()) -> Engine:
    return Engine(_tokenizer(model_dir), LocalPipeline(_runtime(model_dir)),
                  eos_token_ids=set(eos), context_length=4096, speculator=speculator)


def _speculator(mode: str, draft_dir=None, **kw) -> Speculator:
    config = SpeculativeConfig(mode=mode, **kw)
    return Speculator(config, build_drafter(config, _runtime(draft_dir) if draft_dir else None, 49152))


def _run(engine: Engine, prompt: list[int], **kw) -> Finished:
    return asyncio.run(engine.complete(GenerationRequest(prompt_ids=prompt, **kw)))


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    plain = _engine(tiny_model_dirs["llama"])
    prompt = plain.chat_prompt_ids(MESSAGES)
    yield tiny_model_dirs, plain, prompt
    plain.shutdown()


@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_other", "draft_self"])
def test_greedy_speculative_equals_plain_greedy(llama, drafter):
    dirs, plain, prompt = llama
    speculator = {
        "prompt_lookup": lambda: _speculator("prompt_lookup", min_ngram=1, k=4),
        "draft_other": lambda: _speculator("draft", dirs["qwen3"], k=4),  # a different model: many rejections
        "draft_self": lambda: _speculator("draft", dirs["llama"], k=6),  # accepts everything
    }[drafter]()
    spec = _engine(dirs["llama"], speculator)
    if drafter == "prompt_lookup":  # a random model never repeats itself: put a copy of its answer in the prompt
        prompt = prompt + plain.tokenizer(_run(plain, prompt, max_tokens=16).text)["input_ids"] + prompt
    expected = _run(plain, prompt, max_tokens=N, ignore_eos=True)
    got = _run(spec, prompt, max_tokens=N, ignore_eos=True)
    assert got.text == expected.text and got.completion_tokens == expected.completion_tokens == N
    assert got.draft_tokens > 0 and speculator.stats.verify_steps > 0  # speculation really ran
    if drafter == "draft_self":
        assert got.accepted_draft_tokens == got.draft_tokens
        assert speculator.stats.verify_steps < N / 4  # several tokens per pipeline step
    else:
        assert got.accepted_draft_tokens < got.draft_tokens  # rejections: truncation really ran
    spec.shutdown()


class OracleDrafter:
    """Point-mass drafts from a known output, every third token wrong: accepts and rejections both happen."""

    name = "oracle"

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self.prompt, self.output = prompt, output

    def propose(self, session_id, history, k, sampling, step) -> Draft:
        tokens = self.output[step : step + k]
        return Draft([t if (step + i) % 3 else (t + 1) % 49152 for i, t in enumerate(tokens)])

    def close(self, session_id) -> None:
        return None


def test_seeded_sampling_with_point_mass_drafts_equals_plain(llama):
    dirs, plain, prompt = llama
    for seed in range(2):
        sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
        expected = _run(plain, prompt, max_tokens=N, sampling=sampling, ignore_eos=True)
        output = plain.tokenizer(expected.text, add_special_tokens=False)["input_ids"]
        speculator = Speculator(SpeculativeConfig(mode="prompt_lookup", k=4, min_acceptance=0.0),
                                OracleDrafter(prompt, output))
        spec = _engine(dirs["llama"], speculator)
        got = _run(spec, prompt, max_tokens=N, sampling=sampling, ignore_eos=True)
        assert got.text == expected.text  # same generator per output index: the very same tokens
        assert 0 < got.accepted_draft_tokens < got.draft_tokens
        spec.shutdown()


def test_stops_eos_and_max_tokens_are_exact_when_tokens_arrive_together(llama):
    dirs, plain, prompt = llama
    speculator = _speculator("draft", dirs["llama"], k=8)  # every verify returns up to 9 tokens
    spec = _engine(dirs["llama"], speculator)
    full = _run(plain, prompt, max_tokens=60, ignore_eos=True)
    for max_tokens in (1, 2, 7, 13):
        got = _run(spec, prompt, max_tokens=max_tokens, ignore_eos=True)
        assert (got.text, got.completion_tokens, got.finish_reason) == (
            _run(plain, prompt, max_tokens=max_tokens, ignore_eos=True).text, max_tokens, "length")
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 6]
    got = _run(spec, prompt, max_tokens=60, stop=[stop])
    assert got.finish_reason == "stop" and got.text == _run(plain, prompt, max_tokens=60, stop=[stop]).text
    assert stop not in got.text and len(got.text) < len(full.text)
    # EOS in the middle of an accepted draft: plain and speculative both stop right before it
    decoder = Decoder(plain.pipeline, "ids", prompt, SamplingParams(), max_tokens=60)
    output = [t for _ in range(60) for t in decoder.next_tokens()]
    plain.pipeline.close("ids")
    eos = {output[len(output) // 2]}
    plain_eos, spec_eos = _engine(dirs["llama"], eos=eos), _engine(dirs["llama"], speculator, eos=eos)
    a, b = _run(plain_eos, prompt, max_tokens=60), _run(spec_eos, prompt, max_tokens=60)
    assert (b.text, b.completion_tokens, b.finish_reason) == (a.text, a.completion_tokens, "stop")
    for engine in (spec, plain_eos, spec_eos):
        engine.shutdown()


def test_sampled_drafts_keep_the_next_token_distribution(llama):
    """Output index 1 is the first verified token: its law given index 0 must be the model's p (chi-square)."""
    dirs, _, prompt = llama
    prompt = prompt[-6:]  # short: 300 generations
    sampling = SamplingParams(temperature=1.0, top_k=2)
    pipeline = LocalPipeline(_runtime(dirs["llama"]))
    speculator = _speculator("draft", dirs["qwen3"], k=2)  # a different model: q and p disagree
    seen: dict[int, Counter] = {}
    for seed in range(160):
        params = sampling.model_copy(update={"seed": seed})
        decoder = Decoder(pipeline, f"s{seed}", prompt, params, max_tokens=3, speculator=speculator)
        first = decoder.next_tokens()[0]
        second = decoder.next_tokens()[0]
        seen.setdefault(first, Counter())[second] += 1
        decoder.close()
        pipeline.close(f"s{seed}")
    assert speculator.stats.drafted > 0 and 0 < speculator.stats.accepted < speculator.stats.drafted
    tested = 0
    for first, counts in seen.items():
        if sum(counts.values()) < 40:
            continue
        logits = pipeline.verify("ref", [*prompt, first], 0, sampling, 0)[-1]  # p after (prompt, first)
        pipeline.close("ref")
        p = target_probs(logits, sampling)
        support = torch.nonzero(p).flatten().tolist()
        assert set(counts) <= set(support)
        observed = [counts[t] for t in support]
        mass = sum(float(p[t]) for t in support)
        expected = [float(p[t]) / mass * sum(observed) for t in support]
        assert chisquare(observed, expected).pvalue > 0.001, (first, counts, expected)
        tested += 1
    assert tested >= 1


class BrokenDrafter:
    name = "broken"

    def propose(self, session_id, history, k, sampling, step) -> Draft:
        raise RuntimeError("draft model crashed")

    def close(self, session_id) -> None:
        return None


def test_a_failing_drafter_falls_back_to_plain_decoding(llama):
    dirs, plain, prompt = llama
    spec = _engine(dirs["llama"], Speculator(SpeculativeConfig(mode="draft"), BrokenDrafter()))
    got = _run(spec, prompt, max_tokens=12, ignore_eos=True)
    assert got.text == _run(plain, prompt, max_tokens=12, ignore_eos=True).text and got.draft_tokens == 0
    spec.shutdown()


def test_recurrent_model_falls_back_and_stays_exact(tiny_model_dirs):
    model = tiny_model_dirs["qwen3_5"]  # Gated DeltaNet layers: caches cannot be cropped
    plain = _engine(model)
    speculator = _speculator("draft", tiny_model_dirs["llama"], k=4)
    spec = _engine(model, speculator)
    assert spec.pipeline.supports_truncate is False
    prompt = plain.chat_prompt_ids(MESSAGES)
    got = _run(spec, prompt, max_tokens=20, ignore_eos=True)
    assert got.text == _run(plain, prompt, max_tokens=20, ignore_eos=True).text
    assert got.draft_tokens == 0 and speculator.stats.verify_steps == 0
    plain.shutdown()
    spec.shutdown()


@pytest.mark.slow
def test_smollm2_prompt_lookup_on_an_input_grounded_prompt(smollm2_dir):
    """Real weights, an edit task: most of the answer is copied from the prompt, so drafts are accepted."""
    torch.set_num_threads(1)
    text = ("The committee met on Tuesday to review the budget. After a long discussion, the members agreed to "
            "increase funding for the library and to postpone the decision on the new sports hall until spring.")
    messages = [{"role": "user", "content": f"Repeat this text exactly, replacing Tuesday with Friday:\n\n{text}"}]
    plain = _engine(smollm2_dir)
    speculator = _speculator("prompt_lookup", k=6)
    spec = _engine(smollm2_dir, speculator)
    prompt = plain.chat_prompt_ids(messages)
    expected = _run(plain, prompt, max_tokens=32)
    got = _run(spec, prompt, max_tokens=32)
    assert got.text == expected.text and "library" in got.text
    assert got.accepted_draft_tokens / got.draft_tokens > 0.5
    assert speculator.stats.verify_steps + speculator.stats.plain_steps < got.completion_tokens * 0.6
    plain.shutdown()
    spec.shutdown()
