"""Greedy output does not depend on earlier or concurrent requests (issue #15): with the prefix cache and the
decode batcher on, every request gets exactly the token ids of a cold run on its own, in bf16 and fp32.

- prefix pairs: pairs of prompts sharing a long system prompt, in both orders (one pair per system prompt, 10
  orders, per model and dtype; all 20 pairs with OPENHYDRA_EXACTNESS_FULL=1); the second request of each order
  hits the cache and must equal the cold run (the prefix cache's tree cleared, same runtime);
- concurrency: 8 streams at once (decode steps batched, blocks shared as they are stored, each stream's next step
  queued by the batcher as soon as its token is sampled: runtime/step_chain.py) equal each stream run alone.
Tiny random Llama / Qwen3 / Qwen3.5-hybrid checkpoints, and real SmolLM2-135M weights (slow).
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from openhydra.router.pipeline import LocalPipeline
from openhydra.runtime.batching import DecodeBatcher
from openhydra.runtime.prefix_cache import PrefixCache
from openhydra.runtime.shard import ShardRuntime
from tests.runtime.test_prefix_cache import _generate

BLOCK = 32  # the serving default
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

SYSTEMS = [
    "You are a careful maritime historian. Answer in plain words, give dates where you know them, say when "
    "you are unsure, and never invent sources. Keep answers short: two or three sentences at most, no lists.",
    "You are a patient science teacher for curious twelve-year-olds. Explain with one everyday comparison, "
    "avoid jargon, define any technical word you must use, and end with a question that invites them to think.",
    "You are the assistant of a small public library. Be friendly and precise. If a question is about a "
    "device or an instrument, say what it measures or does, who used it, and one thing that replaced it.",
    "You are a concise encyclopedia. Reply with facts only, in complete sentences, without greetings or "
    "closing remarks. Prefer the most common meaning of a word. Mention the century when it was invented.",
    "You write answers for a museum audio guide. Speak to visitors directly, keep a calm tone, describe how "
    "the object was used at sea or on land, and keep it under sixty words so it fits one audio stop.",
]
QUESTIONS = ["What is a lighthouse for?", "What is a sextant?", "How does a compass work?",
             "What is a barometer?", "Why do ships have anchors?"]
# 20 pairs, each sharing its system prompt: consecutive questions under every system prompt.
PAIRS = [((s, QUESTIONS[q]), (s, QUESTIONS[q + 1])) for s in range(len(SYSTEMS)) for q in range(len(QUESTIONS) - 1)]

CI_PAIRS = PAIRS[:: len(QUESTIONS) - 1]  # one pair per system prompt


def _full() -> bool:
    return os.environ.get("OPENHYDRA_EXACTNESS_FULL") == "1"


def _prompts(tokenizer) -> dict[tuple[int, str], list[int]]:
    out = {}
    for s, system in enumerate(SYSTEMS):
        for question in QUESTIONS:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            out[(s, question)] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return out


def _serving_runtime(model_dir, dtype: torch.dtype, quantization: str = "none") -> ShardRuntime:
    """What ``serving=batched`` installs (prefix cache + an 8-row batcher), on one process."""
    rt = ShardRuntime(model_dir, dtype=dtype, quantization=quantization)
    rt.prefix_cache = PrefixCache(rt.layer_types, 256 << 20, BLOCK)
    rt.batcher = DecodeBatcher(rt, max_batch=8, window_ms=20.0)
    return rt


def check_prefix_pairs(rt: ShardRuntime, prompts: dict, n: int, pairs: list = PAIRS) -> None:
    """Each order (first, second): the cache is cleared, the first request runs cold and fills it, the second
    hits it and must equal its own cold run, which is the first request of the reverse order (every prompt
    runs cold as a first request, so no separate cold pass is needed: a third fewer prefills)."""
    pipe = LocalPipeline(rt, prefix_block=BLOCK)
    cold: dict = {}
    warm = []
    for a, b in pairs:
        for first, second in ((a, b), (b, a)):
            rt.prefix_cache.clear()
            reused = pipe.reused_positions
            got_first = _generate(pipe, "first", prompts[first], n)
            assert pipe.reused_positions == reused, "a request after clear() reused a cached prefix"
            assert cold.setdefault(first, got_first) == got_first, f"two cold runs of {first} differ"
            got = _generate(pipe, "second", prompts[second], n)
            assert pipe.reused_positions - reused >= BLOCK, "the second request did not hit the prefix cache"
            warm.append((first, second, got))
    mismatches = [(first, second, got, cold[second]) for first, second, got in warm if got != cold[second]]
    assert not mismatches, f"{len(mismatches)} of {2 * len(pairs)} orders differ from cold: {mismatches[:2]}"


def check_concurrent_streams(rt: ShardRuntime, prompts: list[list[int]], n: int) -> None:
    pipe = LocalPipeline(rt, prefix_block=BLOCK)
    alone = []
    for i, prompt in enumerate(prompts):
        rt.prefix_cache.clear()
        alone.append(_generate(pipe, f"alone{i}", prompt, n))
    rt.prefix_cache.clear()
    got: list[list[int] | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            barrier.wait()
            got[i] = _generate(pipe, f"together{i}", prompts[i], n, chained=True)
        except BaseException as exc:  # reported below
            errors.append(exc)

    steps_before = rt.batcher.stats.steps
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert got == alone
    assert rt.batcher.stats.max_seen >= 4  # steps really ran together
    if pipe.chains_steps:  # decode steps after forwards of several sessions were queued by the batcher before
        stats = pipe.chain_stats  # they were asked for (runtime/step_chain.py), and none was left over
        assert len(prompts) * (n - 2) <= stats.asked <= len(prompts) * (n - 1)
        assert stats.found > 0 and stats.settled == 0
    else:  # recurrent layers: no chains (a step queued ahead could not be cut)
        assert rt.is_recurrent and pipe.chain_stats is None
    assert rt.batcher.stats.steps - steps_before >= len(prompts) * (n - 1) // 2


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_5"])
def test_tiny_prefix_pairs_and_streams_are_exact(tiny_model_dirs, tokenizer, family, dtype) -> None:
    """One pair per system prompt (10 orders) per family and dtype, 60 orders in all; OPENHYDRA_EXACTNESS_FULL=1
    runs all 20 pairs of each (the suite's time goes to the real-weights test below)."""
    rt = _serving_runtime(tiny_model_dirs[family], DTYPES[dtype])
    try:
        prompts = _prompts(tokenizer)
        check_prefix_pairs(rt, prompts, 6, PAIRS if _full() else CI_PAIRS)
        check_concurrent_streams(rt, [prompts[(s % len(SYSTEMS), QUESTIONS[(s + s // 5) % 5])] for s in range(8)], 10)
    finally:
        rt.batcher.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~130 prefills of ~90 tokens on a shared 2-core runner
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_smollm2_prefix_pairs_and_streams_are_exact(smollm2_dir, tokenizer, dtype) -> None:
    """CI runs one pair per system prompt (5 pairs, 10 orders) to stay within its time;
    OPENHYDRA_EXACTNESS_FULL=1 runs all 20 pairs (40 orders), which passed in bf16 and fp32 on 2026-12-03
    (29 and 8.6 min at load 10-22)."""
    _check_smollm2(_serving_runtime(smollm2_dir, DTYPES[dtype]), tokenizer, first_question=1)


def _check_smollm2(rt: ShardRuntime, tokenizer, first_question: int) -> None:
    """The prefix pairs (one per system prompt, or all with OPENHYDRA_EXACTNESS_FULL=1) and 8 concurrent streams of
    12 tokens, their questions starting at ``first_question`` (so the callers' streams differ)."""
    try:
        prompts = _prompts(tokenizer)
        check_prefix_pairs(rt, prompts, 6, PAIRS if _full() else CI_PAIRS)
        streams = [prompts[(s % len(SYSTEMS), QUESTIONS[(s + first_question + s // 5) % 5])] for s in range(8)]
        check_concurrent_streams(rt, streams, 12)
    finally:
        rt.batcher.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_smollm2_quantized_prefix_pairs_and_streams_are_exact(smollm2_dir, tokenizer, quantization) -> None:
    """hardware=cpu_int4 / cpu_int8 (fp32 runtime, their default) on OpenHydra's low-bit kernel: a row's bits do not
    depend on the rows it is multiplied with (runtime/lowbit.py), so prefix-cache hits (a prefill of the rest only)
    and batched decode give the cold, single-stream tokens. Claimed only there: on PyTorch's kernels (the fallback)
    int8 multiplies prefills of over 32 rows densely and fewer rows on its kernel, so a row's bits can depend on the
    row count (this test passed with OPENHYDRA_LOWBIT=0 once, 2026-12-05, which is not a guarantee)."""
    from openhydra.runtime import lowbit

    if lowbit.kernel() is None:
        pytest.skip("PyTorch's int4/int8 kernels here: exactness is claimed on the low-bit kernel only")
    _check_smollm2(_serving_runtime(smollm2_dir, torch.float32, quantization), tokenizer, first_question=2)
