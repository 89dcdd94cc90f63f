"""Session behaviour of ShardRuntime: positions, isolation, eviction, truncation, input checks."""

from __future__ import annotations

import threading

import pytest
import torch

from openhydra.runtime.local_pipeline import greedy_generate, pipeline_step
from openhydra.runtime.sessions import SessionStore
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama_spans(tiny_model_dirs):
    return [ShardRuntime(tiny_model_dirs["llama"], a, b) for a, b in [(0, 3), (3, 5), (5, 8)]]


def test_attributes_describe_the_span(tiny_model_dirs) -> None:
    rt = ShardRuntime(tiny_model_dirs["qwen3_5"], 3, 5, dtype=torch.bfloat16)
    assert (rt.start, rt.end, rt.num_layers) == (3, 5, 8)
    assert not rt.is_first and not rt.is_last
    assert rt.hidden_size == 64 and rt.vocab_size == rt.config.vocab_size
    assert rt.dtype == torch.bfloat16 and rt.model_type == "qwen3_5_text"
    assert rt.layer_types == ["full_attention", "linear_attention"]
    assert rt.modules.embed_tokens is None and rt.modules.lm_head is None
    # inv_freq must stay fp32 when the weights are bf16 (casting it changes tokens).
    assert rt.modules.rotary_emb.inv_freq.dtype == torch.float32
    with pytest.raises(RuntimeError, match="not the first shard"):
        rt.embed(torch.tensor([1, 2]))


def test_invalid_span_rejected(tiny_model_dirs) -> None:
    for start, end in [(5, 5), (-1, 3), (0, 9), (6, 2)]:
        with pytest.raises(ValueError, match="span"):
            ShardRuntime(tiny_model_dirs["llama"], start, end)


def test_position_mismatch_raises_and_leaves_session_intact(llama_spans) -> None:
    first = llama_spans[0]
    prompt = _prompt(5, 0)
    first.forward("pm", torch.arange(5), input_ids=prompt)
    assert first.session_length("pm") == 5
    # Feeding the last token again (position 4 instead of 5) is the classic non-determinism bug.
    with pytest.raises(PositionMismatchError, match=r"start at 5.*got 4") as info:
        first.forward("pm", torch.tensor([4]), input_ids=prompt[-1:])
    assert (info.value.expected, info.value.got) == (5, 4)
    with pytest.raises(ValueError, match="start at 5"):
        first.forward("pm", torch.tensor([9]), input_ids=prompt[-1:])
    assert first.session_length("pm") == 5
    first.forward("pm", torch.tensor([5]), input_ids=prompt[-1:])
    assert first.session_length("pm") == 6
    first.close_session("pm")
    assert first.session_length("pm") == 0


def test_malformed_inputs_rejected(llama_spans) -> None:
    first, middle = llama_spans[0], llama_spans[1]
    with pytest.raises(ValueError, match="contiguous"):
        first.forward("bad", torch.tensor([0, 2]), input_ids=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="input_ids"):
        first.forward("bad", torch.arange(2), input_ids=torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="input_ids must lie"):
        first.forward("bad", torch.arange(1), input_ids=torch.tensor([first.vocab_size]))
    with pytest.raises(ValueError, match="hidden_states"):
        middle.forward("bad", torch.arange(2), hidden_states=torch.zeros(2, 63))
    with pytest.raises(ValueError, match="input_ids"):
        middle.forward("bad", torch.arange(1), input_ids=torch.tensor([5]))
    assert first.session_length("bad") == 0 and middle.session_length("bad") == 0


def test_interleaved_sessions_are_isolated(llama_spans) -> None:
    a, b = _prompt(9, 1), _prompt(13, 2)
    seq_a = greedy_generate(llama_spans, a, 8, session_id="seq-a")
    seq_b = greedy_generate(llama_spans, b, 8, session_id="seq-b")

    out: dict[str, list[int]] = {"a": [], "b": []}
    logits = {"a": pipeline_step(llama_spans, "int-a", a, 0), "b": pipeline_step(llama_spans, "int-b", b, 0)}
    pos = {"a": a.numel(), "b": b.numel()}
    for _ in range(8):
        for key in ("a", "b"):  # strictly alternating steps of the two sessions
            token = int(logits[key][-1].argmax())
            out[key].append(token)
            logits[key] = pipeline_step(llama_spans, f"int-{key}", torch.tensor([token]), pos[key])
            pos[key] += 1
    assert out["a"] == seq_a and out["b"] == seq_b


def test_concurrent_sessions_from_threads(llama_spans) -> None:
    prompts = [_prompt(7 + i, 10 + i) for i in range(4)]
    expected = [greedy_generate(llama_spans, p, 6, session_id=f"solo-{i}") for i, p in enumerate(prompts)]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = greedy_generate(llama_spans, prompts[i], 6, session_id=f"thread-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i in range(4)] == expected


def test_lru_cap_evicts_least_recently_used(tiny_model_dirs) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"], 0, 4, max_sessions=2)
    for sid in ("s1", "s2"):
        rt.forward(sid, torch.arange(3), input_ids=_prompt(3, 0))
    rt.forward("s1", torch.tensor([3]), input_ids=torch.tensor([7]))  # s1 now most recent
    rt.forward("s3", torch.arange(2), input_ids=_prompt(2, 0))
    assert rt.session_length("s2") == 0  # evicted
    assert rt.session_length("s1") == 4 and rt.session_length("s3") == 2
    assert rt.session_count() == 2


def test_idle_sessions_expire() -> None:
    now = [0.0]
    store = SessionStore(new_cache=dict, max_sessions=8, idle_timeout_s=10.0, clock=lambda: now[0])
    store.acquire("old").length = 3
    now[0] = 6.0
    store.acquire("fresh")
    now[0] = 12.0  # "old" idle for 12 s, "fresh" for 6 s
    assert store.get("old") is None
    assert store.get("fresh") is not None
    now[0] = 30.0
    assert store.ids() == []


def test_truncate_rolls_back_attention_cache(tiny_model_dirs) -> None:
    spans = [ShardRuntime(tiny_model_dirs["qwen3"], a, b) for a, b in [(0, 4), (4, 8)]]
    prompt = _prompt(10, 3)
    expected = greedy_generate(spans, prompt, 6, session_id="clean")

    pipeline_step(spans, "spec", prompt, 0)
    pipeline_step(spans, "spec", torch.tensor([11, 12, 13]), 10)  # three rejected draft tokens
    for rt in spans:
        rt.truncate_session("spec", 9)  # drop the drafts and the last prompt position
        assert rt.session_length("spec") == 9
    logits = pipeline_step(spans, "spec", prompt[-1:], 9)
    tokens: list[int] = []
    pos = 10
    for _ in range(6):
        token = int(logits[-1].argmax())
        tokens.append(token)
        logits = pipeline_step(spans, "spec", torch.tensor([token]), pos)
        pos += 1
    assert tokens == expected
    with pytest.raises(ValueError, match="cannot truncate"):
        spans[0].truncate_session("spec", 99)


def test_truncate_on_recurrent_layers_is_refused(tiny_model_dirs) -> None:
    linear = ShardRuntime(tiny_model_dirs["qwen3_5"], 0, 3)
    full_only = ShardRuntime(tiny_model_dirs["qwen3_5"], 3, 4)
    linear.forward("t", torch.arange(4), input_ids=_prompt(4, 0))
    with pytest.raises(NotImplementedError, match="recurrent"):
        linear.truncate_session("t", 2)
    linear.truncate_session("t", 4)  # a no-op is always fine
    full_only.forward("t", torch.arange(4), hidden_states=torch.randn(4, 64))
    full_only.truncate_session("t", 2)
    assert full_only.session_length("t") == 2
