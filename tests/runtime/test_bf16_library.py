"""bf16 on the low-bit library (``hardware.matmul=library``, ``hardware=cpu_fast``): runtime/lowbit.py Bf16Weight,
runtime/kernels/lowbit.c ``oh_matmul_bf16``, runtime/quant_cpu.py use_bf16_kernel / use_bf16_head.

What it promises, checked here: the kernel computes x @ W^T with fp32 chains rounded to bf16 once; a row's bits do
not depend on the row count (up to ``BF16_KERNEL_ROWS`` where PyTorch has bf16 dot products, else any), the other
rows, the thread count or the build (AVX-512 or AVX2); longer inputs there get PyTorch's own bits; a span on it
keeps exactness across a pipeline of peers that all run it, in batched steps and in speculative verifies; its
quality is bf16's. Its bits are not PyTorch's bf16 matmul's, so it is not the default (the README's "Exact" promise
is transformers' bits)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openhydra.runtime import lowbit
from openhydra.runtime.batching import _Pending, forward_batch
from openhydra.runtime.lean_layers import lowbit_of
from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.quant_cpu import Bf16KernelLinear, Bf16PackedEmbedding
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing.threads import torch_threads


@pytest.fixture(scope="module")
def lib(lowbit_library):
    """The library of one build (tests/conftest.py ``lowbit_library``: native and AVX2)."""
    return lowbit_library


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 30  # an outlier input channel
    return w.to(torch.bfloat16)


@pytest.mark.parametrize(("n", "k"), [(37, 5), (16, 64), (200, 576), (1536, 576), (576, 1536)])
def test_the_kernel_is_an_fp32_chain_rounded_once(lib, n, k):
    """Each output: fp32 multiply-adds over k in order (a bf16 product is exact in fp32), rounded to bf16 at the end;
    fp32 in gives fp32 out. Checked against that formula written in PyTorch, bit for bit."""
    w = _weight(n, k)
    weight = lowbit.Bf16Weight.of(w, lib)
    x = (torch.randn(3, k, generator=torch.Generator().manual_seed(1)) * 2).to(torch.bfloat16)
    expected = torch.zeros(3, n)
    wf, xf = w.float(), x.float()
    for i in range(k):  # one rounding per step: fma(w, x, acc) with an exact product is acc + w * x rounded
        expected = expected + xf[:, i : i + 1] * wf[:, i]
    assert torch.equal(weight.matmul(x), expected.to(torch.bfloat16))
    assert torch.equal(weight.matmul(xf), expected)  # fp32 rows: the same chain, not rounded
    assert torch.equal(weight.dense(), w)


def test_a_rows_bits_do_not_depend_on_the_row_count_threads_or_build(lib):
    w = _weight(1000, 576, seed=2)
    weight = lowbit.Bf16Weight.of(w, lib)
    x = torch.randn(lowbit.BF16_KERNEL_ROWS, 576, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    alone = torch.cat([weight.matmul(x[i : i + 1]) for i in range(x.shape[0])])
    for rows in (2, 5, 7, 13, lowbit.BF16_KERNEL_ROWS):
        assert torch.equal(weight.matmul(x[:rows]), alone[:rows]), rows
    with torch_threads(2):
        assert torch.equal(weight.matmul(x), alone)
    if lowbit.kernel() is not None and lib is not lowbit.kernel():  # the AVX2 build against this machine's own
        assert torch.equal(lowbit.Bf16Weight.of(w, lowbit.kernel()).matmul(x), alone)


def test_longer_inputs_run_where_they_are_faster(lib):
    """Past ``max_rows`` rows (a prefill's chunks) the weight is unpacked and PyTorch multiplies: its bits. Without a
    limit (None: CPUs whose PyTorch has no bf16 dot products) the library takes every row count, each row with the
    bits it gets alone."""
    w = _weight(300, 576, seed=4)
    x = torch.randn(1, lowbit.BF16_KERNEL_ROWS + 9, 576, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    limited = lowbit.Bf16Weight(lowbit.pack_bf16(w), 576, 300, lib, max_rows=lowbit.BF16_KERNEL_ROWS)
    assert torch.equal(limited.matmul(x), torch.nn.functional.linear(x, w))
    within = x[:, : lowbit.BF16_KERNEL_ROWS]
    assert torch.equal(limited.matmul(within), limited.on_library(within))
    unlimited = lowbit.Bf16Weight(limited.rows, 576, 300, lib, max_rows=None)
    alone = torch.cat([unlimited.matmul(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1)
    assert torch.equal(unlimited.matmul(x), alone)
    assert not torch.equal(alone, limited.matmul(x))  # two arithmetics: the test tells them apart


def test_the_row_limit_is_there_only_where_pytorch_has_bf16_dot_products(lib, monkeypatch):
    """``bf16_kernel_rows``: BF16_KERNEL_ROWS on a CPU with avx512_bf16 or amx_bf16 and the library's AVX-512 path
    (PyTorch's bf16 GEMM is faster there on long inputs); None elsewhere (AVX2: PyTorch converts bf16 to fp32 and
    the library was faster at every row count, bench/bench_bf16_rows.py). The weight and the span follow it."""
    limit = lowbit.BF16_KERNEL_ROWS if lib.oh_available() == 2 else None  # the AVX2 build: never a limit
    for flags, expected in ((frozenset({"avx2", "avx512f", "avx512_bf16"}), limit),
                            (frozenset({"avx2", "amx_bf16"}), limit),
                            (frozenset({"avx2", "avx512f", "avx512_vnni"}), None), (frozenset({"avx2"}), None)):
        monkeypatch.setattr(lowbit, "cpuinfo_flags", lambda flags=flags: flags)
        assert lowbit.bf16_kernel_rows(lib) == expected, flags
        assert lowbit.Bf16Weight.of(_weight(32, 64), lib).max_rows == expected


def test_bad_input_is_refused_clearly(lib):
    weight = lowbit.Bf16Weight.of(_weight(32, 64), lib)
    with pytest.raises(ValueError, match=r"needs a CPU tensor \[\.\.\., 64\]"):
        weight.matmul(torch.zeros(2, 65, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="expected bf16"):
        lowbit.Bf16Weight(torch.zeros(2, 64, 16), 64, 32, lib)


def _library_runtime(model_dir, *span, **kwargs) -> ShardRuntime:
    if lowbit.kernel() is None:
        pytest.skip("no low-bit library on this machine")
    return ShardRuntime(model_dir, *span, dtype=torch.bfloat16, matmul="library", **kwargs)


def _with_row_limit(rt: ShardRuntime, limit: int | None) -> ShardRuntime:
    """``rt`` as a CPU whose ``lowbit.bf16_kernel_rows`` gives ``limit`` would have loaded it: every weight's limit
    and the span's ``independent_rows`` (the same tests on any machine)."""
    for m in rt.modules.modules():
        if isinstance(m, Bf16KernelLinear):
            m.lowbit.max_rows = limit
    rt.independent_rows = limit
    return rt


def test_a_span_loads_on_the_library_and_says_so(tiny_model_dirs):
    """Every decoder Linear and the head on the library (an untied table stays PyTorch's; a tied one: the SmolLM2
    test below); the span announces its own arithmetic (verification pairs it only with peers computing alike).
    fp32, quantized and matmul=pytorch spans are unchanged."""
    rt = _library_runtime(tiny_model_dirs["llama"])
    linears = [m for m in rt.modules.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and isinstance(rt.modules.lm_head, Bf16KernelLinear)
    assert type(rt.modules.embed_tokens) is torch.nn.Embedding  # the tiny models do not tie it
    assert rt.numerics == "pytorch-bf16-lowbit1" and rt.rows_independent
    assert rt.independent_rows == lowbit.bf16_kernel_rows(lowbit.kernel())  # 64 here, None on an AVX2 CPU
    assert all(lean.rows_at_once for lean in rt._lean_layers)
    plain = ShardRuntime(tiny_model_dirs["llama"], dtype=torch.bfloat16)
    ids = torch.tensor([[5, 77, 4000, 3]])
    assert torch.equal(rt.embed(ids), plain.embed(ids))  # the table's values, exactly
    assert rt.parameter_count >= plain.parameter_count  # the same weights (rows padded to 16)
    for other in (ShardRuntime(tiny_model_dirs["llama"], dtype=torch.float32, matmul="library"),
                  ShardRuntime(tiny_model_dirs["llama"], dtype=torch.bfloat16, matmul="library", quantization="int4"),
                  plain):
        assert not any(isinstance(m, Bf16KernelLinear) for m in other.modules.modules())
    assert plain.numerics == "pytorch"


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_5"])
def test_a_pipeline_on_the_library_equals_one_node_on_it(tiny_model_dirs, family):
    """Three spans on the library give one node's greedy tokens (its bits: the same operations per row), with a
    chunked prefill too, and Qwen3.5's recurrent layers. The prompt is longer than BF16_KERNEL_ROWS: its prefill runs
    past the row limit where there is one, on the library where there is none."""
    model_dir = tiny_model_dirs[family]
    prompt = torch.randint(3, 4000, (lowbit.BF16_KERNEL_ROWS + 23,), generator=torch.Generator().manual_seed(5))
    whole = [_library_runtime(model_dir)]
    spans = [_library_runtime(model_dir, a, b) for a, b in ((0, 3), (3, 5), (5, 8))]
    for chunk in (None, 7):
        expected = greedy_generate(whole, prompt, 10, session_id=f"w{chunk}", prefill_chunk=chunk)
        assert greedy_generate(spans, prompt, 10, session_id=f"s{chunk}", prefill_chunk=chunk) == expected


def test_a_batch_past_the_librarys_rows_is_padded(tiny_model_dirs, monkeypatch):
    """Rows independent up to ``independent_rows`` (tests/runtime/test_batching.py: a batch within them runs its
    live rows only, each with the bits it gets alone); a batcher whose fixed row count exceeds that is padded as
    PyTorch's matmuls are, whose rounding depends on the row count. Without a limit (a CPU whose PyTorch has no bf16
    dot products: lowbit.bf16_kernel_rows) the live rows only, whatever the batcher's row count."""
    from openhydra.runtime import batching

    rt = _library_runtime(tiny_model_dirs["llama"])
    seen: list[int] = []
    original = batching._run_layers_batched
    monkeypatch.setattr(batching, "_run_layers_batched",
                        lambda runtime, sessions, h, rows, positions=None: seen.append(rows) or original(
                            runtime, sessions, h, rows, positions))
    prompts = [torch.randint(3, 4000, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 17)]
    for i, p in enumerate(prompts):
        rt.forward(f"s{i}", torch.arange(p.numel()), input_ids=p)
    rows = lowbit.BF16_KERNEL_ROWS + 1
    for step, limit in enumerate((lowbit.BF16_KERNEL_ROWS, None)):
        _with_row_limit(rt, limit)
        forward_batch(rt, [_Pending(f"s{i}", p.numel() + step, torch.tensor([9 + i]), None, False)
                           for i, p in enumerate(prompts)], rows=rows)
    assert seen == [rows, len(prompts)]


def test_the_onion_coordinators_head_computes_as_the_last_span(tiny_model_dirs):
    """Under privacy=onion the coordinator applies the final norm and head itself (peer/head.py): on the library
    where the last span's head is, so sampling there gives the last span's logits."""
    from openhydra.peer.head import load_head

    rt = _library_runtime(tiny_model_dirs["llama"], 5, 8)
    hidden = (torch.randn(1, 64) * 3).to(torch.bfloat16)
    head = load_head(tiny_model_dirs["llama"], torch.bfloat16, "library")
    with torch.inference_mode():
        expected = rt.modules.lm_head(rt.modules.norm(hidden.unsqueeze(0)))[0].float()
    assert torch.equal(head(hidden), expected)


@pytest.mark.slow
def test_smollm2_on_the_library_is_exact_across_peers_and_as_good_as_bf16(smollm2_dir):
    """Real weights: three spans equal one node on the library (greedy tokens and the verify bits), and its
    next-token choices agree with fp32's as often as PyTorch's bf16 matmul's do (teacher-forced decode steps over a
    held-out text; bf16 itself agrees ~95%)."""
    from transformers import AutoTokenizer

    whole = _library_runtime(smollm2_dir)
    assert isinstance(whole.modules.embed_tokens, Bf16PackedEmbedding)  # tied: lookups in the packed head
    assert whole.modules.embed_tokens.weight is whole.modules.lm_head.weight  # one table in memory
    spans = [_library_runtime(smollm2_dir, a, b) for a, b in ((0, 10), (10, 20), (20, 30))]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = ("The river rose slowly through the night, and by morning the lower fields were under water. Farmers "
            "moved their animals to the hills, and the village school opened its doors to families whose houses")
    ids = torch.tensor(tokenizer(text)["input_ids"])
    assert greedy_generate(spans, ids[:12], 24, session_id="s") == greedy_generate([whole], ids[:12], 24,
                                                                                   session_id="w")
    references = {"fp32": ShardRuntime(smollm2_dir, dtype=torch.float32),
                  "bf16": ShardRuntime(smollm2_dir, dtype=torch.bfloat16), "library": whole}
    choices = {}
    for name, rt in references.items():
        rt.forward(name, torch.arange(8), input_ids=ids[:8])
        choices[name] = [int(rt.forward(name, torch.tensor([i]), input_ids=ids[i : i + 1])[-1].argmax())
                         for i in range(8, ids.numel())]
    agree = {name: sum(a == b for a, b in zip(choices[name], choices["fp32"], strict=True)) / len(choices["fp32"])
             for name in ("bf16", "library")}
    assert agree["library"] >= min(0.9, agree["bf16"] - 0.05), agree
    assert lowbit_of(whole.modules.lm_head) is not None


@pytest.mark.slow
def test_library_spans_with_and_without_the_row_limit_do_not_accuse_each_other(smollm2_dir):
    """An AVX-512 BF16 peer (PyTorch's bf16 matmul past 64 rows) and an AVX2 peer (the library for every row count)
    announce the same arithmetic, so audits pair them. Real weights, a held-out text's prefill of more than 64
    positions: every position's top-k answer, compared as audits compare (verification/compare.py at the configured
    bf16 tolerance, greedy), agrees or is a near-tie, never a disagreement. Within the limit both give the same bits."""
    from transformers import AutoTokenizer

    from openhydra.verification.compare import Answer, Verdict, compare
    from openhydra.verification.config import VerificationConfig

    config = VerificationConfig()
    tol, k = config.tolerance.bfloat16, config.top_k
    limited = _with_row_limit(_library_runtime(smollm2_dir), lowbit.BF16_KERNEL_ROWS)
    unlimited = _with_row_limit(_library_runtime(smollm2_dir), None)
    text = (Path(__file__).resolve().parents[2] / "bench" / "data" / "heldout.txt").read_text()
    ids = torch.tensor(AutoTokenizer.from_pretrained(smollm2_dir)(text)["input_ids"][:160])
    assert ids.numel() > 2 * lowbit.BF16_KERNEL_ROWS
    answers = {}
    for name, rt in (("limited", limited), ("unlimited", unlimited)):
        logprobs = torch.log_softmax(rt.forward(name, torch.arange(ids.numel()), input_ids=ids,
                                                all_logits=True).float(), -1)
        top = logprobs.topk(k, -1)
        answers[name] = [Answer(int(i[0]), tuple(i.tolist()), tuple(v.tolist()))
                         for i, v in zip(top.indices, top.values, strict=True)]
    verdicts = [compare(a, b, tol, greedy=True) for a, b in zip(answers["limited"], answers["unlimited"], strict=True)]
    assert not [v for v in verdicts if v.verdict is Verdict.DISAGREE], [v for v in verdicts if v.verdict is
                                                                         Verdict.DISAGREE][:3]
    worst = max(v.max_diff for v in verdicts)
    print(f"\n{len(verdicts)} positions: max |d log p| {worst:.3f} (tolerance {tol}), "
          f"{sum(v.verdict is Verdict.INCONCLUSIVE for v in verdicts)} near-ties")
    assert worst < tol / 1.5  # a margin, not just under the line
    assert any(v.max_diff > 0 for v in verdicts)  # the two arithmetics do differ on a long prefill
    short = ids[: lowbit.BF16_KERNEL_ROWS]  # within the limit both run the library: the same bits, then and after
    outs = [(rt.forward(f"{name}-short", torch.arange(short.numel()), input_ids=short, all_logits=True),
             rt.forward(f"{name}-short", torch.tensor([short.numel()]), input_ids=torch.tensor([42])))
            for name, rt in (("limited", limited), ("unlimited", unlimited))]
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
