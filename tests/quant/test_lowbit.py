"""OpenHydra's low-bit CPU kernel (runtime/lowbit.py, runtime/kernels/lowbit.c): it builds where the CPU has AVX-512
VNNI or AVX2, it computes exactly its stated formula (int8 activations per block of 32 times the 4- or 8-bit blocks),
a row's bits do not depend on its batch or the thread count, and the node falls back to PyTorch's kernels when it
cannot build or is switched off. The kernel tests run on the build for this machine ("native") and on an AVX2 build
(``-march=x86-64-v3``, which any AVX2 CPU runs): on an AVX-512 machine that covers both paths, and checks that they
give the same bits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from openhydra.runtime import lowbit
from openhydra.runtime.quant_cpu import quantize_int4_groups
from openhydra.testing.threads import torch_threads


@pytest.fixture(scope="module")
def lib(lowbit_library):
    """The kernel library of one build (tests/conftest.py ``lowbit_library``: native and AVX2)."""
    return lowbit_library


def _weights(bits: int, n: int, k: int, lib, seed: int = 0) -> lowbit.LowBitWeight:
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    w[:, 5] *= 20  # an outlier input channel, as real models have
    if bits == 4:
        return lowbit.LowBitWeight.int4(*quantize_int4_groups(w, 32), lib)
    return lowbit.LowBitWeight.int8(*lowbit.quantize_blocks8(w), lib)


def _quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies by: each block of 32 rounded (half to even) to int8 steps of max|x| / 127."""
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // 32, 32)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv[..., None]) * d[..., None]).reshape(rows, k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 128, 192, 576, 1536])  # a lone pair, quads, quads and a lone pair
def test_kernel_computes_its_formula(bits, k, lib):
    w = _weights(bits, 37, k, lib)  # an odd row count: no tiling assumption
    x = torch.randn(5, k)
    x[1, 32:64] = 0  # an all-zero block (scale 0)
    x[2] *= 1e3
    out = w.matmul(x).double()
    xq, deq = _quantized_activations(x).double(), w.dequantized().double()
    ref = xq @ deq.T
    bound = xq.abs() @ deq.abs().T  # fp32 rounding of d * sx and of the accumulation, relative to the terms
    assert ((out - ref).abs() <= 2e-6 * bound + 1e-30).all()
    # and close to the unquantized activations' product: the int8 rounding of x, a few 1e-3
    exact = x.double() @ deq.T
    assert ((out - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)).max() < 2e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_a_rows_bits_do_not_depend_on_its_batch_or_the_threads(bits, lib):
    w = _weights(bits, 301, 576, lib, seed=1)
    x = torch.randn(19, 576)  # on AVX-512 two passes of 8 rows (one accumulator per row) and one of 3 (two each)
    whole = w.matmul(x)
    for i in range(19):
        assert torch.equal(w.matmul(x[i : i + 1]), whole[i : i + 1])
    for rows in (4, 5, 8, 9):
        assert torch.equal(w.matmul(x[:rows]), whole[:rows])
    x, batch = x[:7], whole[:7]
    with torch_threads(2):
        assert torch.equal(w.matmul(x), batch)
    assert torch.equal(w.matmul(x.reshape(7, 1, 576)), batch.reshape(7, 1, 301))  # leading dims kept


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_in_and_out_is_the_fp32_result_rounded(bits, lib):
    w = _weights(bits, 64, 576, lib, seed=2)
    x = torch.randn(3, 576).bfloat16()
    out = w.matmul(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, w.matmul(x.float()).bfloat16())  # the kernel's rounding is torch's cast
    half = w.matmul(x.half())  # other dtypes go through fp32
    assert half.dtype == torch.float16 and torch.equal(half, w.matmul(x.half().float()).half())


def test_shapes_the_kernel_does_not_take_stay_on_torch(monkeypatch):
    assert lowbit.supported(576) and lowbit.supported(lowbit.MAX_K)
    assert not lowbit.supported(96) and not lowbit.supported(lowbit.MAX_K + 64) and not lowbit.supported(0)
    if lowbit.kernel() is None:
        return
    from torch import nn

    from openhydra.runtime.quant_cpu import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    odd = nn.Linear(96, 16, bias=False)  # 3 blocks of 32: not whole pairs
    assert Int4WeightOnlyLinear(odd).lowbit is None and Int8WeightOnlyLinear(odd).lowbit is None
    x = torch.randn(2, 96)
    assert torch.allclose(Int4WeightOnlyLinear(odd)(x), odd(x), rtol=0.1, atol=0.1)
    from openhydra.runtime.quant_cpu import int4_supported

    assert int4_supported(96, 16) and not int4_supported(96, 8)  # N % 16: such a Linear goes int8 instead


@pytest.mark.parametrize("bits", [4, 8])
def test_the_groups_layout_round_trips(bits, lib):
    """Packed for this build's group size (16 rows on AVX-512, 8 on AVX2) and read back per row: the codes, fp16
    scales and minimums that went in, for an N that is not a multiple of the group."""
    n, k = 37, 192
    torch.manual_seed(3)
    if bits == 4:
        q, scale, minimum = torch.randint(0, 16, (n, k)), torch.rand(n, k // 32), torch.randn(n, k // 32)
        w = lowbit.LowBitWeight.int4(q, scale, minimum, lib)
    else:
        q, scale, minimum = torch.randint(-127, 128, (n, k)), torch.rand(n, k // 32), None
        w = lowbit.LowBitWeight.int8(q, scale, lib)
    assert w.group == lib.oh_group_rows() == {2: 16, 1: 8}[lib.oh_available()]
    assert w.rows.shape[0] == -(-n // w.group)
    codes, scales, minimums = w.rows_of(torch.arange(n))
    assert torch.equal(codes, q.to(torch.int16)) and torch.equal(scales, scale.half().float())
    assert minimums is None if bits == 8 else torch.equal(minimums, minimum.half().float())
    picked = w.rows_of(torch.tensor([[5, 36], [0, 17]]))[0]  # any index shape, as an embedding lookup
    assert torch.equal(picked, q.to(torch.int16)[torch.tensor([[5, 36], [0, 17]])])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_avx2_build_gives_the_avx512_builds_bits(bits, dtype, tmp_path):
    """The AVX2 path computes the AVX-512 VNNI path's integers and then the same float operations in the same
    order, so peers on either kind of CPU give the same bits (and a verifier re-executing a step gets them)."""
    if lowbit.kernel() is None or lowbit.kernel().oh_available() != 2:
        pytest.skip("needs a CPU with AVX-512 VNNI to run both paths")
    avx2 = lowbit.open_library(lowbit._build(tmp_path, march="x86-64-v3"))
    assert avx2 is not None and avx2.oh_available() == 1
    torch.manual_seed(4)
    w = torch.randn(301, 1536) * 0.05
    w[:, 7] *= 30
    x = torch.randn(9, 1536).to(dtype)
    x[3, 64:96] = 0
    x[4] *= 1e3
    if bits == 4:
        q, scale, minimum = quantize_int4_groups(w, 32)
        outs = [lowbit.LowBitWeight.int4(q, scale, minimum, lib).matmul(x) for lib in (lowbit.kernel(), avx2)]
    else:
        q, d = lowbit.quantize_blocks8(w)
        outs = [lowbit.LowBitWeight.int8(q, d, lib).matmul(x) for lib in (lowbit.kernel(), avx2)]
    assert torch.equal(outs[0], outs[1])


def test_q8_0_blocks_are_lossless():
    """A tensor dequantized from GGUF Q8_0 (w = q * d per block of 32, d = max|w| / 127, d in fp16) gives back its
    codes and scales."""
    torch.manual_seed(3)
    codes = torch.randint(-127, 128, (16, 4, 32))
    codes[..., 0] = 127  # llama.cpp's quantizer maps each block's largest magnitude to +-127
    d = (torch.rand(16, 4) * 0.01 + 1e-3).half().float()
    weight = (codes * d[..., None]).reshape(16, 128)
    q, scale = lowbit.quantize_blocks8(weight)
    assert torch.equal(q.reshape(16, 4, 32), codes.to(torch.int8))
    assert torch.equal(scale.half().float(), d)


def test_fp16_fits():
    assert lowbit.fp16_fits(torch.tensor([1e-3, 0.0, 2.0]), torch.tensor([-1e-9, 0.5]))
    assert not lowbit.fp16_fits(torch.tensor([1e-6]))  # below fp16's normal range: too few bits left
    assert not lowbit.fp16_fits(torch.tensor([1e5]))  # overflows fp16
    assert not lowbit.fp16_fits(torch.tensor([1e-3]), torch.tensor([7e4]))


def test_switched_off_or_without_a_compiler_the_node_uses_torch(monkeypatch, tmp_path):
    monkeypatch.setenv(lowbit.ENV_SWITCH, "0")
    assert lowbit._load() is None
    monkeypatch.delenv(lowbit.ENV_SWITCH)
    monkeypatch.setattr(lowbit, "_compiler", lambda: None)
    assert lowbit._build(tmp_path) is None
    assert not list(tmp_path.rglob("*.so"))


def test_a_compiler_that_fails_leaves_no_library(monkeypatch, tmp_path):
    failing = tmp_path / "cc-that-fails"
    failing.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\necho boom >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert lowbit._build(tmp_path / "cache") is None
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_an_unwritable_cache_falls_back(tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    assert lowbit._build(blocked) is None  # kernels/ cannot be created under a file: PyTorch's kernels, no crash


@pytest.mark.skipif(not (lowbit._compiler() and lowbit.runnable_here()), reason="no C compiler or no AVX2 here")
def test_a_compiler_without_openmp_builds_the_one_thread_kernel(monkeypatch, tmp_path):
    real = lowbit._compiler()
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = -fopenmp ] && exit 1; done\nexec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    built = lowbit._build(tmp_path / "cache")
    assert built is not None
    lib = lowbit.open_library(built)
    w = _weights(4, 40, 576, lib)
    x = torch.randn(3, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # asks for 2: without OpenMP it runs on one, with the same bits
        assert torch.equal(w.matmul(x), _weights(4, 40, 576, lowbit.kernel() or lib).matmul(x))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not (lowbit._compiler() and lowbit.runnable_here()), reason="no C compiler or no AVX2 here")
def test_the_kernel_builds_once_per_machine_and_is_reused(tmp_path):
    built = lowbit._build(tmp_path)
    assert built is not None and built.parent == tmp_path / "kernels"
    stamp = built.stat().st_mtime_ns
    assert lowbit._build(tmp_path) == built and built.stat().st_mtime_ns == stamp  # cached: not rebuilt
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built.name]  # no scratch left behind


def test_the_kernel_is_used_where_this_cpu_can_run_it():
    """On a machine with AVX-512 VNNI or AVX2 and a C compiler (CI's kind), the node must not silently fall back."""
    runnable = (lowbit._compiler() is not None and lowbit.runnable_here()
                and os.environ.get(lowbit.ENV_SWITCH, "1") != "0")
    assert (lowbit.kernel() is not None) == runnable
    if runnable:
        flags = set(lowbit._cpu_flags().split())
        assert lowbit.isa() == ("avx512-vnni" if "avx512_vnni" in flags else "avx2")
    assert lowbit.runnable_here({"avx2", "fma", "f16c"}) and lowbit.runnable_here({"avx512_vnni"})
    assert not lowbit.runnable_here({"avx2", "fma"}) and not lowbit.runnable_here({"neon"})
    assert Path(lowbit.SOURCE).is_file()


def _rms_norm(k: int, seed: int = 0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(seed)
    norm = LlamaRMSNorm(k, eps=1e-5).eval()
    norm.weight.data = torch.randn(k) * 0.5 + 1.0
    return norm


@pytest.mark.parametrize("k", [576, 64, 37])
def test_kernel_rms_norm_is_transformers_norm_to_rounding_and_rows_are_independent(lib, k):
    """KernelRMSNorm (lowbit.c oh_rms_norm): transformers' RMSNorm but for the order of the sum of squares, so within
    a few ulps of it; a row's bits do not depend on the other rows of a call, nor on the call's shape."""
    norm = _rms_norm(k)
    kernel = lowbit.KernelRMSNorm(norm, lib)
    assert not kernel.training  # the lean step runs only on modules in eval mode
    torch.manual_seed(1)
    x = torch.randn(2, 7, k) * 3
    x[0, 2] *= 1e4  # a large row
    x[1, 3] = 0  # a zero row: eps keeps it finite
    got = kernel(x)
    assert got.dtype == torch.float32 and got.shape == x.shape and torch.isfinite(got).all()
    with torch.no_grad():
        torch.testing.assert_close(got, norm(x), rtol=2e-6, atol=1e-6)
    alone = torch.stack([torch.stack([kernel(x[b, s : s + 1])[0] for s in range(7)]) for b in range(2)])
    assert torch.equal(got, alone)
    assert torch.equal(kernel(x[:, ::2]), got[:, ::2])  # a strided view is read as its values
    with pytest.raises(ValueError, match="fp32"):
        kernel(x.to(torch.bfloat16))


def test_kernel_rms_norm_zero_centered_is_qwen3_5s_norm_to_rounding(lib):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

    torch.manual_seed(5)
    norm = Qwen3_5RMSNorm(64, eps=1e-6).eval()
    norm.weight.data = torch.randn(64) * 0.3  # stored as an offset from 1
    kernel = lowbit.KernelRMSNorm(norm, lib, zero_centered=True)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), norm(x), rtol=2e-6, atol=1e-6)
    assert kernel.variance_epsilon == 1e-6 and kernel.weight is norm.weight  # the checkpoint's tensor, as stored


def test_kernel_rms_norm_gives_the_same_bits_on_both_builds(tmp_path):
    if lowbit.kernel() is None or lowbit.kernel().oh_available() != 2:
        pytest.skip("needs a CPU with AVX-512 VNNI to run both builds")
    avx2 = lowbit.open_library(lowbit._build(tmp_path, march="x86-64-v3"))
    for k in (576, 37, 4097):  # whole chunks of 16, and tails
        norm = _rms_norm(k, seed=2)
        x = torch.randn(33, k) * 2
        x[5] *= 1e-18
        outs = [lowbit.KernelRMSNorm(norm, library)(x) for library in (lowbit.kernel(), avx2)]
        assert torch.equal(outs[0], outs[1]), k


# ---- attention (runtime/lowbit.py attention; runtime/kernel_attention.py uses it) ---------------------------------


def _reference_attention(q, k, v, mask, scale, causal):
    """softmax(q k^T * scale) v in float64, [B, S, Hq, D]; rows without a visible key are zeros."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale  # [B, H, S, T]
    visible = torch.ones(scores.shape, dtype=torch.bool)
    if causal:
        visible &= torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        visible &= mask
    weights = torch.where(visible, scores, -torch.inf).softmax(-1).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2)


ATTENTION_CASES = [  # B, Hq, Hkv, S, T, D, causal, mask
    (1, 9, 3, 1, 50, 64, False, False),  # SmolLM2's decode step
    (2, 9, 3, 7, 7, 64, True, False),  # a prefill, two batch rows
    (1, 8, 2, 5, 12, 256, False, True),  # Qwen3.5's head size, a boolean mask shared by the heads
    (1, 4, 4, 3, 40, 32, False, True),
    (1, 4, 2, 6, 6, 80, True, False),  # a head size of 5 blocks of 16
    (1, 9, 3, 1, 1000, 64, False, False),  # a long cache
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: "B{}H{}-{}S{}T{}D{}{}{}".format(
    *c[:6], "-causal" if c[6] else "", "-mask" if c[7] else ""))
def test_kernel_attention_computes_softmax_attention(case, lib):
    batch, heads, kv_heads, rows, positions, dim, causal, masked = case
    torch.manual_seed(5)
    q, k, v = torch.randn(batch, heads, rows, dim), torch.randn(batch, kv_heads, positions, dim), \
        torch.randn(batch, kv_heads, positions, dim)
    q[..., 3] *= 8  # peaked scores: a softmax far from uniform
    mask = torch.rand(batch, 1, rows, positions) > 0.3 if masked else None
    out = lowbit.attention(lib, q, k, v, mask, dim**-0.5, causal)
    assert out.shape == (batch, rows, heads, dim) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference_attention(q, k, v, mask, dim**-0.5, causal),
                               rtol=1e-5, atol=2e-6)


def test_kernel_attention_rows_are_independent_of_their_call(lib):
    """A query row's bits do not depend on the call: alone or among a prefill's rows, another batch row, every head or
    one, read through a cache view with spare positions or from a contiguous copy, on one thread or two."""
    torch.manual_seed(6)
    q = torch.randn(2, 6, 9, 64)
    cache_k, cache_v = torch.randn(2, 3, 16, 64), torch.randn(2, 3, 16, 64)  # 16 slots, 9 used: strided views
    k, v = cache_k[:, :, :9], cache_v[:, :, :9]
    prefill = lowbit.attention(lib, q, k, v, None, 0.125, True)  # [2, 9, 6, 64]
    for s in (0, 4, 8):  # row s of the prefill = a decode step at position s over keys 0..s
        step = lowbit.attention(lib, q[:1, :, s : s + 1], k[:1, :, : s + 1].contiguous(), v[:1, :, : s + 1], None,
                                0.125, False)
        assert torch.equal(step[0, 0], prefill[0, s])
    verify = lowbit.attention(lib, q[:1, :, 5:], k[:1], v[:1], None, 0.125, True, past=5)  # rows 5..8 after 5 cached
    assert torch.equal(verify[0], prefill[0, 5:])
    head = lowbit.attention(lib, q[1:, 4:5], k[1:, 2:3], v[1:, 2:3], None, 0.125, True)  # one head of batch row 1
    assert torch.equal(head[0, :, 0], prefill[1, :, 4])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(lowbit.attention(lib, q, k, v, None, 0.125, True), prefill)
    finally:
        torch.set_num_threads(threads)


def test_kernel_attention_masks_by_skipping(lib):
    """A masked key adds nothing (skipped, not weighted e^-inf): a mask equal to causality gives causality's bits,
    and a row that sees no key gets zeros."""
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 4, 5, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    causal_mask = torch.ones(5, 5, dtype=torch.bool).tril().view(1, 1, 5, 5)
    assert torch.equal(lowbit.attention(lib, q, k, v, causal_mask, 0.2, False),
                       lowbit.attention(lib, q, k, v, None, 0.2, True))
    blind = causal_mask.clone()
    blind[..., 2, :] = False
    out = lowbit.attention(lib, q, k, v, blind, 0.2, False)
    assert torch.equal(out[0, 2], torch.zeros(4, 32)) and out[0, 3].abs().sum() > 0


def test_kernel_attention_refuses_what_it_does_not_compute(lib):
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="fp32"):
        lowbit.attention(lib, q.bfloat16(), k.bfloat16(), k.bfloat16(), None, 0.1, False)
    with pytest.raises(ValueError, match="bool CPU mask"):
        lowbit.attention(lib, q, k, k, torch.zeros(1, 1, 1, 8), 0.1, False)
    with pytest.raises(RuntimeError, match="failed"):  # a head size that is not a multiple of 16
        lowbit.attention(lib, torch.randn(1, 4, 1, 40), torch.randn(1, 2, 8, 40), torch.randn(1, 2, 8, 40), None,
                         0.1, False)
    with pytest.raises(RuntimeError, match="failed"):  # query heads not a multiple of the key heads
        lowbit.attention(lib, torch.randn(1, 3, 1, 64), k, k, None, 0.1, False)


def test_kernel_attention_gives_the_same_bits_on_both_builds(tmp_path):
    if lowbit.kernel() is None or lowbit.kernel().oh_available() != 2:
        pytest.skip("needs a CPU with AVX-512 VNNI to run both builds")
    avx2 = lowbit.open_library(lowbit._build(tmp_path, march="x86-64-v3"))
    torch.manual_seed(8)
    for batch, heads, kv_heads, rows, positions, dim, causal, masked in ATTENTION_CASES:
        q, k, v = torch.randn(batch, heads, rows, dim), torch.randn(batch, kv_heads, positions, dim), \
            torch.randn(batch, kv_heads, positions, dim)
        mask = torch.rand(batch, 1, rows, positions) > 0.3 if masked else None
        outs = [lowbit.attention(library, q, k, v, mask, dim**-0.5, causal) for library in (lowbit.kernel(), avx2)]
        assert torch.equal(outs[0], outs[1]), (batch, heads, rows, positions, dim)


def test_kernel_attention_rows_give_each_row_its_own_bits(lib):
    """A batched step's rows in one call (``attention_rows``), each over its own cache view (its own length and
    spare capacity): each row has the bits ``attention`` gives it alone; rows past the caches are zeros."""
    torch.manual_seed(9)
    lengths = (5, 40, 17)
    caches = [(torch.randn(1, 3, n + 7, 64), torch.randn(1, 3, n + 7, 64)) for n in lengths]  # spare positions
    keys = [k[:, :, :n] for (k, _), n in zip(caches, lengths, strict=True)]
    values = [v[:, :, :n] for (_, v), n in zip(caches, lengths, strict=True)]
    fused = torch.randn(4, 12, 1, 64)  # q of 9 heads and k of 3, as the lean step's rotated projection
    query = fused[:, :9]
    out = lowbit.attention_rows(lib, query, keys, values, 0.125)
    assert out.shape == (4, 1, 9, 64)
    for r in range(3):
        assert torch.equal(out[r], lowbit.attention(lib, query[r : r + 1], keys[r], values[r], None, 0.125, False)[0])
    assert torch.equal(out[3], torch.zeros(1, 9, 64))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(lowbit.attention_rows(lib, query, keys, values, 0.125), out)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="rows"):
        lowbit.attention_rows(lib, query, keys, values[:2], 0.125)


def _filled_layers(lengths: tuple[int, ...], seed: int) -> list:
    """AppendLayers holding ``lengths`` random positions (3 heads of 64), as sessions' caches after their prefills."""
    from openhydra.runtime.kv_layer import AppendLayer

    generator = torch.Generator().manual_seed(seed)
    layers = []
    for n in lengths:
        layer = AppendLayer()
        layer.update(torch.randn(1, 3, n, 64, generator=generator), torch.randn(1, 3, n, 64, generator=generator))
        layers.append(layer)
    return layers


@pytest.mark.parametrize("threads", [1, 2])
def test_appends_in_the_library_call_have_the_bits_of_update_then_attention_rows(lib, threads):
    """``append_attention_rows`` (a batched step's appends and attention in one call) against each row's
    ``AppendLayer.update`` followed by ``attention_rows``: the same outputs and the same caches, over several steps,
    including a cache whose buffer is full (it moves to a bigger one first) and a padding row."""
    ours, theirs = _filled_layers((5, 40, 5), seed=3), _filled_layers((5, 40, 5), seed=3)
    capacity = ours[2]._capacity
    torch.manual_seed(10)
    for _ in range(capacity - 6):  # the third cache one position short of its buffer: the second step must grow it
        k, v = torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
        ours[2].update(k, v)
        theirs[2].update(k, v)
    lengths = (5, 40, capacity - 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for step in range(3):
            projected = torch.randn(4, 15, 1, 64)  # q 9 heads, k 3, v 3: the lean step's fused projection
            qk, value = projected[:, :12], projected[:, 12:]  # both views of it, as there (not contiguous)
            out = lowbit.append_attention_rows(lib, qk, 9, value, ours, 0.125)
            cached = [layer.update(qk[r : r + 1, 9:], value[r : r + 1]) for r, layer in enumerate(theirs)]
            expected = lowbit.attention_rows(lib, qk[:, :9], [c[0] for c in cached], [c[1] for c in cached], 0.125)
            assert torch.equal(out, expected), step
            assert torch.equal(out[3], torch.zeros(1, 9, 64))
            for a, b, n in zip(ours, theirs, lengths, strict=True):
                assert a.keys.shape[2] == n + step + 1 and torch.equal(a.keys, b.keys) and torch.equal(a.values,
                                                                                                        b.values)
    finally:
        torch.set_num_threads(before)
    assert ours[2]._capacity > capacity  # the full cache did grow, and kept its positions (checked above)


def test_appends_in_the_library_call_refuse_what_they_do_not_compute(lib):
    layers = _filled_layers((4,), seed=5)
    projected = torch.randn(2, 15, 1, 64)
    with pytest.raises(ValueError, match="append attention rows"):
        lowbit.append_attention_rows(lib, projected[:, :12].bfloat16(), 9, projected[:, 12:].bfloat16(), layers,
                                     0.125)
    with pytest.raises(ValueError, match="append attention rows"):
        lowbit.append_attention_rows(lib, projected[:, :12], 9, projected[:, 12:14], layers, 0.125)  # 2 kv heads
    with pytest.raises(ValueError, match="append attention rows"):
        lowbit.append_attention_rows(lib, projected[:1, :12], 9, projected[:1, 12:], layers * 2, 0.125)
    assert layers[0].keys.shape[2] == 4  # nothing appended by a refused call


def test_a_batched_step_appends_in_the_library_only_where_it_can():
    """The lean batched step hands its appends to the library when every row's cache is an AppendLayer of its own;
    a verify's rows sharing one session's layer, or another kind of layer, append through ``update`` in order."""
    from transformers.cache_utils import DynamicLayer

    from openhydra.runtime.lean_layers import appends_in_library

    layers = _filled_layers((3, 4), seed=6)
    assert appends_in_library(layers)
    assert not appends_in_library([layers[0], layers[0]])
    assert not appends_in_library([layers[0], DynamicLayer()])
