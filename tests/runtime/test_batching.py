"""Continuous batching: 8 concurrent sessions of different lengths give exactly their unbatched outputs."""

from __future__ import annotations

import threading

import pytest
import torch

from openhydra.runtime.batching import DecodeBatcher, _Pending, forward_batch
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime

STEPS = 12


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(seed))


PROMPTS = [_ids(n, seed) for seed, n in enumerate([3, 17, 5, 40, 1, 26, 9, 61])]


def _greedy(rt: ShardRuntime, sid: str, prompt: torch.Tensor, batcher: DecodeBatcher | None) -> list[int]:
    logits = rt.forward(sid, torch.arange(prompt.numel()), input_ids=prompt)  # prefill alone
    pos, out = prompt.numel(), []
    for _ in range(STEPS):
        token = int(logits[-1].argmax())
        out.append(token)
        ids = torch.tensor([token])
        if batcher is None:
            logits = rt.forward(sid, torch.tensor([pos]), input_ids=ids)
        else:
            logits = batcher.forward(sid, pos, input_ids=ids)
        pos += 1
    rt.close_session(sid)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_5"])
def test_eight_concurrent_sessions_match_unbatched(tiny_model_dirs, family) -> None:
    rt = ShardRuntime(tiny_model_dirs[family])
    expected = [_greedy(rt, f"solo{i}", p, None) for i, p in enumerate(PROMPTS)]
    batcher = DecodeBatcher(rt, max_batch=8, window_ms=20.0)
    got: list[list[int] | None] = [None] * len(PROMPTS)
    barrier = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        barrier.wait()
        got[i] = _greedy(rt, f"b{i}", PROMPTS[i], batcher)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    batcher.close()
    assert got == expected
    assert batcher.stats.max_seen >= 4  # steps really were batched (Qwen3.5: stacked recurrent states too)
    assert batcher.stats.steps > batcher.stats.fallback_steps


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_batched_logits_and_hidden_states_match(tiny_model_dirs, family) -> None:
    """Per row: the same logits (float rounding) and caches as unbatched; a middle span's hidden states too."""
    rt, ref = ShardRuntime(tiny_model_dirs[family]), ShardRuntime(tiny_model_dirs[family])
    mid, mid_ref = ShardRuntime(tiny_model_dirs[family], 2, 5), ShardRuntime(tiny_model_dirs[family], 2, 5)
    items, mid_items, expected, mid_expected = [], [], [], []
    for i, p in enumerate(PROMPTS[:5]):
        for r in (rt, ref):
            r.forward(f"s{i}", torch.arange(p.numel()), input_ids=p)
        hidden = torch.randn(p.numel(), 64, generator=torch.Generator().manual_seed(i))
        for r in (mid, mid_ref):
            r.forward(f"s{i}", torch.arange(p.numel()), hidden_states=hidden)
        nxt = torch.tensor([7 + i])
        step_h = torch.randn(1, 64, generator=torch.Generator().manual_seed(50 + i))
        expected.append(ref.forward(f"s{i}", torch.tensor([p.numel()]), input_ids=nxt))
        mid_expected.append(mid_ref.forward(f"s{i}", torch.tensor([p.numel()]), hidden_states=step_h))
        items.append(_Pending(f"s{i}", p.numel(), nxt, None, False))
        mid_items.append(_Pending(f"s{i}", p.numel(), None, step_h, False))
    for got, want in [(forward_batch(rt, items), expected), (forward_batch(mid, mid_items), mid_expected)]:
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert rt.session_length("s3") == PROMPTS[3].numel() + 1
    # The caches moved on exactly as unbatched ones: the next (unbatched) step agrees too.
    for i, p in enumerate(PROMPTS[:5]):
        nxt, at = torch.tensor([11]), torch.tensor([p.numel() + 1])
        torch.testing.assert_close(rt.forward(f"s{i}", at, input_ids=nxt), ref.forward(f"s{i}", at, input_ids=nxt),
                                   rtol=0, atol=1e-5)


def test_a_bad_step_fails_alone(tiny_model_dirs) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"])
    for i in range(3):
        rt.forward(f"s{i}", torch.arange(4), input_ids=PROMPTS[7][:4])
    items = [_Pending("s0", 4, torch.tensor([5]), None, False), _Pending("s1", 9, torch.tensor([5]), None, False),
             _Pending("s2", 4, torch.tensor([10**6]), None, False)]
    out = forward_batch(rt, items)
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (1, rt.vocab_size)
    assert isinstance(out[1], PositionMismatchError) and out[1].expected == 4
    assert isinstance(out[2], ValueError) and "input_ids" in str(out[2])
    assert [rt.session_length(f"s{i}") for i in range(3)] == [5, 4, 4]


def test_peers_batch_concurrent_sessions_over_grpc(tiny_model_dirs) -> None:
    """Three gRPC peers with batchers: concurrent sessions' decode steps are batched on every hop, exactly."""
    from openhydra.peer.client import ClientTunables, PeerChainClient
    from openhydra.peer.messages import HopSpec
    from openhydra.peer.server import PeerServer
    from openhydra.runtime.sampling import SamplingParams

    splits = [(0, 3), (3, 5), (5, 8)]
    runtimes = [ShardRuntime(tiny_model_dirs["qwen3"], a, b) for a, b in splits]
    servers = [PeerServer(rt) for rt in runtimes]
    route = [HopSpec(address=s.start(), start=a, end=b) for s, (a, b) in zip(servers, splits, strict=True)]
    client = PeerChainClient(route, tunables=ClientTunables(step_timeout_s=60.0))

    def generate(sid: str, prompt: torch.Tensor) -> list[int]:
        tokens, feed, pos = [], prompt.tolist(), 0
        for step in range(STEPS):
            tokens.append(client.step(sid, feed, pos, SamplingParams(), step))
            pos, feed = pos + len(feed), [tokens[-1]]
        client.close(sid)
        return tokens

    try:
        expected = [generate(f"solo{i}", p) for i, p in enumerate(PROMPTS)]
        for rt in runtimes:
            rt.batcher = DecodeBatcher(rt, max_batch=8, window_ms=20.0)
        got: list[list[int] | None] = [None] * len(PROMPTS)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, generate(f"b{i}", PROMPTS[i])))
                   for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == expected
        assert all(rt.batcher.stats.max_seen >= 2 and rt.batcher.stats.batches > 0 for rt in runtimes)
    finally:
        client.shutdown()
        for s in servers:
            s.stop()
        for rt in runtimes:
            if rt.batcher is not None:
                rt.batcher.close()


@pytest.mark.parametrize(("quantization", "dtype", "matmul"), [
    ("int4", torch.float32, "pytorch"), ("int4", torch.bfloat16, "pytorch"), ("int8", torch.float32, "pytorch"),
    ("int8", torch.bfloat16, "pytorch"), ("none", torch.bfloat16, "library")])
def test_on_the_low_bit_kernel_a_batch_is_not_padded_and_keeps_the_unbatched_bits(tiny_model_dirs, quantization,
                                                                                  dtype, matmul, monkeypatch) -> None:
    """The low-bit kernel's rows do not depend on the row count (runtime/lowbit.py), so a batched step there runs
    only its live rows (no zero rows up to max_batch), and a lone row runs as the runtime's own (lean) step: a lone
    stream on a batched node costs what it costs on an unbatched one. Each row keeps the bits it gets alone in the
    batcher, which are also those of an unbatched node's step. So do bf16 spans on the library's bf16 matmul
    (``matmul="library"``), within its 64 rows."""
    from openhydra.runtime import batching, lowbit

    if lowbit.kernel() is None:
        pytest.skip("no low-bit kernel on this machine")
    rt = ShardRuntime(tiny_model_dirs["llama"], dtype=dtype, quantization=quantization, matmul=matmul)
    assert rt.rows_independent
    seen_rows: list[int] = []
    original = batching._run_layers_batched

    def spy(runtime, sessions, h, rows, positions=None):
        seen_rows.append(rows)
        return original(runtime, sessions, h, rows, positions)

    monkeypatch.setattr(batching, "_run_layers_batched", spy)
    prompts = PROMPTS[:4]
    for prefix in ("solo", "batch", "alone"):
        for i, p in enumerate(prompts):
            rt.forward(f"{prefix}{i}", torch.arange(p.numel()), input_ids=p)
    nxt = [torch.tensor([7 + i]) for i in range(len(prompts))]
    solo = [rt.forward(f"solo{i}", torch.tensor([p.numel()]), input_ids=nxt[i]) for i, p in enumerate(prompts)]
    batched = forward_batch(rt, [_Pending(f"batch{i}", p.numel(), nxt[i], None, False)
                                 for i, p in enumerate(prompts)], rows=8)
    alone = [forward_batch(rt, [_Pending(f"alone{i}", p.numel(), nxt[i], None, False)], rows=8)[0]
             for i, p in enumerate(prompts)]
    assert seen_rows == [4]  # live rows only, though the batcher's fixed count is 8; a lone row runs as rt's step
    for b, a, s in zip(batched, alone, solo, strict=True):
        assert torch.equal(b, a) and torch.equal(b, s)


def test_spans_with_row_count_dependent_matmuls_stay_padded(tiny_model_dirs, monkeypatch) -> None:
    """Dense matmuls, PyTorch's int4/int8 kernels and recurrent layers keep the fixed, padded row count."""
    from openhydra.runtime import lowbit

    assert not ShardRuntime(tiny_model_dirs["llama"]).rows_independent  # dense Linears
    if lowbit.kernel() is not None:
        assert not ShardRuntime(tiny_model_dirs["qwen3_5"], quantization="int4").rows_independent  # recurrent layers
    monkeypatch.setattr(lowbit, "kernel", lambda: None)
    assert not ShardRuntime(tiny_model_dirs["llama"], quantization="int4").rows_independent  # torch's kernels


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_a_batching_runtime_keeps_the_lean_step_for_its_own_steps(tiny_model_dirs, quantization) -> None:
    """Continuous batching points the span's attention at its rows attention, which is sdpa for every step but its
    own batched forwards: the runtime's own steps (a lone row, a fallback, a verify) keep the lean step, with the
    bits of a runtime that never batched."""
    from openhydra.runtime.batching import use_rows_attention
    from openhydra.runtime.lean_layers import lean_usable

    rt, ref = (ShardRuntime(tiny_model_dirs["llama"], quantization=quantization) for _ in range(2))
    use_rows_attention(rt)
    attention = rt.shard_config._attn_implementation
    assert attention != "sdpa" and lean_usable(rt._lean, attention)
    taken = []
    for layer in rt._lean_layers:
        original = layer.step
        layer.step = lambda *a, original=original: taken.append(1) or original(*a)
    p = PROMPTS[3]
    for r in (rt, ref):
        r.forward("s", torch.arange(p.numel()), input_ids=p)
    for pos in range(p.numel(), p.numel() + 4):
        nxt = torch.tensor([pos % 97 + 3])
        assert torch.equal(rt.forward("s", torch.tensor([pos]), input_ids=nxt),
                           ref.forward("s", torch.tensor([pos]), input_ids=nxt))
    assert taken  # the lean step ran


def _batched_steps(model_dir, dtype: torch.dtype, quantization: str, lean: bool) -> list[torch.Tensor]:
    """Three batched steps of five sessions of different lengths (forward_batch, max_batch 8), then every layer's
    keys and values of each session."""
    rt = ShardRuntime(model_dir, dtype=dtype, quantization=quantization)
    if not lean:
        rt._lean = None  # transformers' layers with the rows attention
    prompts = PROMPTS[:5]
    for i, p in enumerate(prompts):
        rt.forward(f"s{i}", torch.arange(p.numel()), input_ids=p)
    out: list[torch.Tensor] = []
    for step in range(3):
        out += forward_batch(rt, [_Pending(f"s{i}", p.numel() + step, torch.tensor([7 + i + step]), None, False)
                                  for i, p in enumerate(prompts)], rows=8)
    for i in range(len(prompts)):
        for layer in rt._sessions.get(f"s{i}").cache.layers:
            out += [layer.keys, layer.values]
    return out


def _assert_lean_batched_steps_are_transformers(model_dir, dtype, quantization) -> None:
    lean, plain = (_batched_steps(model_dir, dtype, quantization, flag) for flag in (True, False))
    assert len(lean) == len(plain) and all(torch.equal(a, b) for a, b in zip(lean, plain, strict=True))


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_batched_steps_have_the_bits_of_transformers_layers(tiny_model_dirs, dtype, quantization) -> None:
    """A batched step through lean Llama layers (LeanLlamaLayer.step_rows) gives the logits and K/V that transformers'
    layers with the rows attention give, padded (dense) or not (the low-bit kernel)."""
    _assert_lean_batched_steps_are_transformers(tiny_model_dirs["llama"], dtype, quantization)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "quantization"), [(torch.bfloat16, "none"), (torch.float32, "int4")])
def test_lean_batched_steps_have_the_bits_of_transformers_layers_on_smollm2(smollm2_dir, dtype, quantization) -> None:
    _assert_lean_batched_steps_are_transformers(smollm2_dir, dtype, quantization)
