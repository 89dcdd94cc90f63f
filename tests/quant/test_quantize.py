"""Quantized shards (hardware.quantization): they load, chain with unquantized spans, agree with fp32, shrink.

Agreement is teacher-forced top-1: the fp32 model's greedy continuation is fed to both models in one
pass, and we count the positions where the quantized model's argmax equals fp32's. Measured on real
SmolLM2-135M (4 prompts x 32 tokens, this machine): bf16 0.955, int8 weight-only (bf16 activations)
0.939, NF4 0.773, torch dynamic int8 (activations quantized too) 0.561, which is why the CPU int8
route is weight-only. Thresholds below sit under those with a margin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from openhydra.runtime.backend import BackendUnavailable, make_backend
from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.quantize import Int8WeightOnlyLinear, QuantizationUnavailable, method_for
from openhydra.runtime.shard import ShardRuntime

PROMPT = torch.tensor([1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 7192, 314])


def top1_agreement(reference: ShardRuntime, candidates: list[ShardRuntime], prompt: torch.Tensor,
                   new_tokens: int) -> list[float]:
    continuation = greedy_generate([reference], prompt, new_tokens, session_id="ref")
    reference.close_session("ref")
    seq = torch.cat([prompt, torch.tensor(continuation)])
    positions = torch.arange(seq.numel())
    picks = []
    for rt in (reference, *candidates):
        logits = rt.forward("tf", positions, input_ids=seq, all_logits=True)  # [S, V]
        rt.close_session("tf")
        picks.append(logits[prompt.numel() - 1 :].argmax(-1))
    return [(picks[0] == p).float().mean().item() for p in picks[1:]]


def test_method_per_device():
    assert method_for("none", "cpu") == "none"
    assert method_for("int8", "cpu") == "int8_weight_only"
    assert method_for("nf4", "cpu") == "bnb_nf4"
    assert method_for("int8", "cuda:0") == "bnb_int8"
    assert method_for("nf4", "cuda") == "bnb_nf4"
    with pytest.raises(QuantizationUnavailable, match="mps"):
        method_for("int8", "mps")
    assert method_for("int4", "cpu") == "int4_weight_only"  # tests/quant/test_int_kernels.py
    with pytest.raises(QuantizationUnavailable, match="nf4"):
        method_for("int4", "cuda")
    with pytest.raises(ValueError, match="int2"):
        method_for("int2", "cpu")


def test_int8_linear_matches_dense_within_rounding():
    torch.manual_seed(0)
    dense = nn.Linear(64, 96, bias=True)
    q = Int8WeightOnlyLinear(dense)
    for rows in (1, 3, 9):  # int8 kernel for decode-sized inputs, dequantized matmul for prefill
        x = torch.randn(1, rows, 64)
        ref = dense(x)
        out = q(x.bfloat16()).float()
        assert out.shape == ref.shape
        # int8 rounding (<= scale/2 per weight) plus bf16 (and, on the low-bit kernel, int8) activations
        assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    # per-row int8, or on the low-bit kernel (runtime/lowbit.py) blocks of 32 as unsigned bytes in its layout
    assert q.weight.dtype == (torch.int8 if q.lowbit is None else torch.uint8)


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_5"])
def test_quantized_span_chains_with_fp32_spans(tiny_model_dirs, family):
    model_dir = tiny_model_dirs[family]
    fp32 = ShardRuntime(model_dir)
    middle_fp32 = ShardRuntime(model_dir, 3, 6)
    middle_int8 = ShardRuntime(model_dir, 3, 6, dtype=torch.bfloat16, quantization="int8")
    linears = [m for m in middle_int8.modules.layers.modules() if isinstance(m, nn.Linear)]
    assert not linears, "every Linear of the span's layers is quantized"
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in middle_int8.modules.modules()) >= 3 * 4
    # int8 weights + bf16 scales/norms: well under half of the fp32 span's bytes
    assert middle_int8.loaded_bytes < 0.4 * middle_fp32.loaded_bytes
    chain = [ShardRuntime(model_dir, 0, 3), middle_int8, ShardRuntime(model_dir, 6, 8)]
    tokens = greedy_generate(chain, PROMPT, 12)
    assert len(tokens) == 12 and all(0 <= t < fp32.vocab_size for t in tokens)
    reference = greedy_generate([fp32], PROMPT, 12)
    assert tokens[:4] == reference[:4]  # random tiny models: one int8 span keeps the first tokens


def test_backend_quantization_reaches_the_runtime(tiny_model_dirs):
    backend = make_backend(backend="torch", device="cpu", dtype="bfloat16", threads=1, quantization="int8")
    assert backend.note is None and backend.quantization == "int8"
    rt = backend.load_span(tiny_model_dirs["llama"], 0, 8)
    assert rt.quantization == "int8"
    assert any(isinstance(m, Int8WeightOnlyLinear) for m in rt.modules.layers.modules())
    nf4 = make_backend(backend="torch", device="cpu", dtype="bfloat16", threads=1, quantization="nf4")
    assert nf4.load_span(tiny_model_dirs["llama"], 6, 8).loaded_bytes > 0


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs Apple MPS to reach the quantization check")
def test_quantization_on_mps_is_refused_clearly():
    with pytest.raises(BackendUnavailable, match="quantization=int8"):
        make_backend(backend="torch", device="mps", quantization="int8")


@pytest.mark.slow
def test_smollm2_int8_agreement_and_memory(smollm2_dir):
    fp32 = ShardRuntime(smollm2_dir)
    int8 = ShardRuntime(smollm2_dir, dtype=torch.bfloat16, quantization="int8")
    # SmolLM2's 135M parameters: embeddings (tied head) stay bf16, the 30 layers go int8.
    assert int8.loaded_bytes < 0.65 * (fp32.loaded_bytes // 2)
    (agreement,) = top1_agreement(fp32, [int8], PROMPT, 20)
    print(f"top-1 agreement with fp32: int8 {agreement:.3f}; MB fp32 {fp32.loaded_bytes / 1e6:.0f} "
          f"int8 {int8.loaded_bytes / 1e6:.0f}")
    assert agreement >= 0.85
