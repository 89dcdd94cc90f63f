"""Faulty runtimes lie the way their mode says, deterministically, on a real ShardRuntime."""

from __future__ import annotations

import pytest
import torch

from openhydra.runtime.shard import ShardRuntime
from openhydra.verification.config import FaultConfig
from openhydra.verification.faults import FaultyRuntime

PROMPT = torch.tensor([11, 52, 733, 94, 3000, 17])


def _run(rt, session: str, decode: list[int]) -> list[torch.Tensor]:
    outs = [rt.forward(session, torch.arange(len(PROMPT)), input_ids=PROMPT)]
    pos = len(PROMPT)
    for token in decode:
        outs.append(rt.forward(session, torch.tensor([pos]), input_ids=torch.tensor([token])))
        pos += 1
    return outs


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def test_perturb_changes_outputs_and_colluders_lie_identically(llama) -> None:
    honest = _run(ShardRuntime(llama, 0, 4), "s", [5, 6])
    liar_a = _run(FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="perturb", seed=3)), "s", [5, 6])
    liar_b = _run(FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="perturb", seed=3)), "other", [5, 6])
    for h, a, b in zip(honest, liar_a, liar_b, strict=True):
        rel = float((a - h).pow(2).mean().sqrt() / h.pow(2).mean().sqrt())
        assert 0.03 < rel < 0.08  # magnitude 0.05 of the output RMS
        assert torch.equal(a, b)  # same seed, same positions: the same lie (collusion)


def test_perturb_rate_lies_on_a_fraction_of_steps(llama) -> None:
    rt = FaultyRuntime(ShardRuntime(llama, 0, 2), FaultConfig(mode="perturb", rate=0.3))
    _run(rt, "s", list(range(3, 203)))
    assert 0.2 * 201 < rt.lies < 0.4 * 201


def test_wrong_token_changes_the_greedy_token_on_the_last_span(llama) -> None:
    honest = ShardRuntime(llama, 4, 8)
    liar = FaultyRuntime(ShardRuntime(llama, 4, 8), FaultConfig(mode="wrong_token"))
    h = torch.randn(6, honest.hidden_size, generator=torch.Generator().manual_seed(0))
    good = honest.forward("s", torch.arange(6), hidden_states=h)
    bad = liar.forward("s", torch.arange(6), hidden_states=h)
    assert int(bad.argmax()) != int(good.argmax())
    with pytest.raises(ValueError, match="last span"):
        FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="wrong_token"))


def test_stale_cache_is_honest_on_prefill_and_wrong_on_decode(llama) -> None:
    honest = _run(ShardRuntime(llama, 0, 4), "s", [5, 6, 7])
    lazy_rt = FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="stale_cache"))
    lazy = _run(lazy_rt, "s", [5, 6, 7])
    # The prefill and the first decode step (cache = the prompt either way) are honest; later ones not.
    assert torch.equal(honest[0], lazy[0]) and torch.equal(honest[1], lazy[1])
    assert not torch.allclose(honest[2], lazy[2], atol=1e-4)
    assert not torch.allclose(honest[3], lazy[3], atol=1e-4)
    assert lazy_rt.session_length("s") == len(PROMPT)  # the cache never grew past the prompt


def test_stale_cache_refuses_recurrent_layers(tiny_model_dirs) -> None:
    with pytest.raises(ValueError, match="attention-only"):
        FaultyRuntime(ShardRuntime(tiny_model_dirs["qwen3_5"], 0, 8), FaultConfig(mode="stale_cache"))


def test_an_informant_is_honest_and_tips_off_a_dodging_liar(llama, tmp_path) -> None:
    tips = str(tmp_path / "tips")
    with pytest.raises(ValueError, match="tip_off"):
        FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="informant"))
    honest = _run(ShardRuntime(llama, 0, 4), "user", [5, 6])
    informant = FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="informant", tip_off=tips))
    assert all(torch.equal(a, b) for a, b in zip(_run(informant, "user", [5, 6]), honest, strict=True))
    assert list((tmp_path / "tips").iterdir()) == []  # a first sight is a user session: nothing to tell
    assert all(torch.equal(a, b) for a, b in zip(_run(informant, "shadow", [5, 6]), honest, strict=True))
    assert len(list((tmp_path / "tips").iterdir())) == 1 and informant.dodged == 3  # the repeat is marked

    liar = FaultConfig(mode="perturb", magnitude=1.0, dodge_audits=True, tip_off=tips)
    downstream = ShardRuntime(llama, 4, 8)
    hidden = honest[0]  # the shadow's first message: inputs this liar never saw, so alone it would lie
    plain = downstream.forward("x", torch.arange(len(PROMPT)), hidden_states=hidden)
    tipped = FaultyRuntime(ShardRuntime(llama, 4, 8), liar)
    assert torch.equal(tipped.forward("shadow", torch.arange(len(PROMPT)), hidden_states=hidden), plain)
    assert tipped.dodged == 1 and tipped.lies == 0
    alone = FaultyRuntime(ShardRuntime(llama, 4, 8), liar.model_copy(update={"tip_off": None}))
    assert not torch.equal(alone.forward("shadow", torch.arange(len(PROMPT)), hidden_states=hidden), plain)


def test_a_curious_last_span_answers_honestly_and_reads_the_greedy_token(llama, tmp_path) -> None:
    with pytest.raises(ValueError, match="last span"):
        FaultyRuntime(ShardRuntime(llama, 0, 4), FaultConfig(mode="curious", spy_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="spy_dir"):
        FaultyRuntime(ShardRuntime(llama, 4, 8), FaultConfig(mode="curious"))
    upstream, honest = ShardRuntime(llama, 0, 4), ShardRuntime(llama, 4, 8)
    curious = FaultyRuntime(ShardRuntime(llama, 4, 8), FaultConfig(mode="curious", spy_dir=str(tmp_path / "spy")))
    hidden = upstream.forward("s", torch.arange(len(PROMPT)), input_ids=PROMPT)
    kwargs = {"hidden_states": hidden, "return_hidden": True}
    returned = curious.forward("s", torch.arange(len(PROMPT)), **kwargs)
    assert torch.equal(returned, honest.forward("s", torch.arange(len(PROMPT)), **kwargs))  # honest answers
    logits = honest.forward("t", torch.arange(len(PROMPT)), hidden_states=hidden)  # what the coordinator computes
    (spied,) = list((tmp_path / "spy").iterdir())
    assert spied.read_text() == f"{len(PROMPT)} {int(logits[-1].argmax())}\n"
