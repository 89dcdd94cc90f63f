"""The early refusal of an overlong prompt never refuses one that fits: its token bound is a true lower bound.

``Engine.encode`` refuses a prompt without tokenizing it when its bytes alone prove it longer than the context
(a red team's ~1 MiB prompts cost ~1.3 s of tokenizing each, for an error). Checked here against the real
tokenizer on texts built to be as dense in bytes per token as possible (the longest vocabulary entries repeated,
whitespace runs, special tokens' text), on mixed scripts, and with a Unicode normalizer that shrinks text (NFC on
decomposed Hangul and accents); then through a real node's API.
"""

from __future__ import annotations

import random

import pytest
from tokenizers.normalizers import NFC
from transformers import AutoTokenizer

from openhydra.router.engine import Engine, PromptTooLong


def _texts(tokenizer) -> list[str]:
    rng = random.Random(7)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    decoded = [tokenizer.convert_tokens_to_string([piece]) for piece in vocab]
    longest = sorted(decoded, key=lambda t: len(t.encode("utf-8")), reverse=True)[:50]
    specials = [t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values()]
    pools = {
        "longest entries": longest,
        "whitespace": [" " * n for n in (1, 7, 16, 31, 64)] + ["\n" * n for n in (1, 2, 9)] + ["\t\t", " \n "],
        "specials": specials,
        "mixed scripts": ["hello", "Grüße", "日本語のテキスト", "🙂🙃", "مرحبا", "ща", "e\u0301", "\u1100\u1161\u11a8"],
        "words": decoded[:5000],
    }
    texts = []
    for pool in pools.values():
        for _ in range(40):
            texts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 300))))
        texts.append(pool[0] * 500)  # one entry repeated: the densest text there is for it
    texts.append("e\u0301" * 3000 + "\u1100\u1161\u11a8" * 3000)  # NFC composes these: fewer bytes after
    return texts


@pytest.mark.parametrize("normalized", [False, True], ids=["as-shipped", "nfc"])
def test_the_bound_never_exceeds_the_true_count(smollm2_dir, normalized: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if normalized:
        tokenizer.backend_tokenizer.normalizer = NFC()
    engine = Engine(tokenizer, None, eos_token_ids=set(), context_length=10**9)
    checked = 0
    for text in _texts(tokenizer):
        for options in ({}, {"add_special_tokens": False}):
            true = len(tokenizer(text, **options)["input_ids"])
            least = engine._tokens_at_least(text)
            assert least <= true, (least, true, text[:80])
            checked += 1
        if least > 0:
            tight = least
    assert checked > 400 and tight > 0, "the bound was never positive: the check above proved nothing"
    engine.shutdown()


def test_a_prompt_proved_too_long_is_refused_before_tokenizing(smollm2_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    engine = Engine(tokenizer, None, eos_token_ids=set(), context_length=4096)
    calls = []
    real = engine.tokenizer.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

    engine.tokenizer = Counting()
    with pytest.raises(PromptTooLong, match="at least"):
        engine.text_prompt_ids("word " * 200_000)
    assert not calls  # refused on its bytes alone
    assert engine.text_prompt_ids("word " * 100) and calls  # a prompt that may fit is tokenized
    engine.shutdown()
