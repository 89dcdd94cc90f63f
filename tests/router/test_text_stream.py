"""Stop strings across token boundaries, incremental detokenization, and seeded sampling."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openhydra.router.detokenize import IncrementalDetokenizer, StopMatcher
from openhydra.runtime.sampling import SamplingParams, sample

pieces = st.lists(st.text(alphabet="ab\n .", min_size=0, max_size=4), min_size=0, max_size=30)
stops = st.lists(st.text(alphabet="ab\n .", min_size=1, max_size=4), min_size=0, max_size=3)


@settings(max_examples=400, deadline=None)
@given(pieces, stops)
def test_stop_matcher_emits_exactly_the_text_before_the_first_stop(chunks, stop_list):
    matcher = StopMatcher(stop_list)
    emitted, hit = "", False
    for chunk in chunks:
        out, hit = matcher.feed(chunk)
        emitted += out
        if hit:
            break
    if not hit:
        emitted += matcher.flush()
    full = "".join(chunks)
    positions = [full.find(s) for s in stop_list if s in full]
    expected = full[: min(positions)] if positions else full
    assert emitted == expected
    assert not any(s in emitted for s in stop_list)


def test_detokenizer_round_trips_multibyte_text(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Grüße aus Zürich — 東京タワー 🗼 and plain words, with  two spaces."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # never a broken half character


def test_sampling_is_a_function_of_seed_and_step():
    torch.manual_seed(0)
    logits = torch.randn(1000)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=42)
    draws = [sample(logits, params, step) for step in range(20)]
    assert draws == [sample(logits, params, step) for step in range(20)]
    assert len(set(draws)) > 3
    assert sample(logits, SamplingParams(), 0) == int(torch.argmax(logits))


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0, -10.0])
    top_k = {sample(logits, SamplingParams(temperature=1.0, top_k=2, seed=s), 0) for s in range(200)}
    assert top_k == {0, 1}
    top_p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5, seed=s), 0) for s in range(200)}
    assert top_p == {0}
