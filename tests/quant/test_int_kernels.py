"""CPU int8/int4 weight-only layers (runtime/quant_cpu.py): close to their dequantized weights, lossless on
GGUF Q4_1 blocks, served through hardware=cpu_int8 / cpu_int4 by the real config and loading code. Every layer
test runs on both backends: OpenHydra's low-bit kernel (runtime/lowbit.py, where this CPU has AVX-512 VNNI; its
own tests are tests/quant/test_lowbit.py) and PyTorch's kernels (the fallback everywhere else).

Tolerances. PyTorch's kernels compute in bf16, so against ``x @ W_deq.T`` in fp32 the only error is bf16 rounding
of the activations and of the products' accumulation; the low-bit kernel rounds the activations to int8 per block
of 32 (half a step of max/127, 4e-3 of the block's largest value). Relative 2e-2 of the output's largest value is
~3x what we measure on either (bf16 has 8 mantissa bits, 2^-8 = 4e-3 per element, partly cancelling over K).

Agreement thresholds (teacher-forced top-1 vs fp32, as tests/quant/test_quantize.py). On real SmolLM2-135M and
the first 256 tokens of bench/data/heldout.txt, measured here: int8 0.934 (ppl 37.99), int4 0.965 (ppl 37.68), fp32
ppl 37.61. int4 re-quantizes the GGUF's own Q4_1 codes (fp32 here is that same Q4_1 model dequantized), which is why
it agrees better than per-row int8. The thresholds (0.85 and 0.80: int4 on a model that was not Q4_1 to begin with
would round every weight) leave a margin for near-tied logits; perplexity must stay within 10% (int8) / 20% (int4).
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from openhydra.config.load import conf_dir, validate
from openhydra.runtime import lowbit
from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.quant_cpu import (
    FusedProjections,
    Int4WeightOnlyLinear,
    Int8Embedding,
    Int8WeightOnlyLinear,
    quantize_int4_groups,
    quantize_int8_rows,
)
from openhydra.runtime.quantize import method_for, module_bytes
from openhydra.runtime.shard import ShardRuntime

PROMPT = torch.tensor([1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 7192, 314])
REL_TOL = 2e-2


@pytest.fixture(params=["lowbit", "torch"])
def backend(request, monkeypatch) -> str:
    """Each layer test once on the low-bit kernel (skipped where this CPU cannot run it) and once on PyTorch's."""
    if request.param == "lowbit" and lowbit.kernel() is None:
        pytest.skip("no AVX-512 VNNI or no C compiler here: the node uses PyTorch's kernels")
    if request.param == "torch":
        monkeypatch.setattr(lowbit, "kernel", lambda: None)
    return request.param


def _dense(k: int, n: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("rows", [1, 3, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_its_dequantized_weight(rows, dtype, backend):
    dense = _dense(192, 80)  # K = 3 pairs of blocks: one quad and a lone pair on the low-bit kernel
    q, scale, minimum = quantize_int4_groups(dense.weight, 32)
    w_deq = (q.reshape(80, 6, 32).float() * scale[..., None] + minimum[..., None]).reshape(80, 192)
    layer = Int4WeightOnlyLinear(dense)
    assert (layer.lowbit is not None) == (backend == "lowbit")
    if backend == "lowbit":  # 4-bit codes and an fp16 scale and minimum per block of 32: 5 bits per weight
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 80 * (192 // 2 + 4 * 192 // 32)
    else:
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 80 * 192 // 2  # 4 bits per weight
    x = torch.randn(2, rows, 192)
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == (2, rows, 80)
    ref = nn.functional.linear(x, w_deq, dense.bias)
    assert _rel_err(out, ref) < REL_TOL
    # and against the original fp32 weights: 4-bit rounding, at most half a step per weight
    assert (layer.dequantized() - dense.weight).abs().max() <= scale.max() * 0.5 + 1e-2


@pytest.mark.parametrize("rows", [1, 4, 9, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_its_dequantized_weight(rows, dtype, backend):
    dense = _dense(64, 48, seed=1)
    layer = Int8WeightOnlyLinear(dense)
    if backend == "lowbit":  # GGUF Q8_0: blocks of 32 along K, an fp16 scale each, in the kernel's layout
        q, d = lowbit.quantize_blocks8(dense.weight)
        w_deq = (q.reshape(48, 2, 32).float() * d.half().float()[..., None]).reshape(48, 64)
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 48 * (64 + 2 * 2)  # codes, fp16 scales
        assert torch.equal(layer.lowbit.block_scales(), d.half().float())
    else:
        q, scales = quantize_int8_rows(dense.weight)
        w_deq = q.float() * scales[:, None]
        assert layer.weight.dtype == torch.int8
    assert torch.allclose(layer.dequantized(), w_deq, rtol=1e-2, atol=1e-6)
    x = torch.randn(1, rows, 64)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    ref = nn.functional.linear(x, w_deq, dense.bias)
    assert _rel_err(out, ref) < REL_TOL


def test_int4_is_lossless_on_gguf_q4_1_blocks(backend):
    """A tensor dequantized from Q4_1 (w = m + q*d per block of 32) re-quantizes to the same codes."""
    torch.manual_seed(2)
    n, k = 64, 128
    codes = torch.randint(0, 16, (n, k // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's quantizer maps each block's min to 0 and max to 15
    d = torch.rand(n, k // 32) * 0.02 + 1e-3
    m = -torch.rand(n, k // 32) * 0.1
    weight = (m[..., None] + codes * d[..., None]).reshape(n, k)
    q, _, _ = quantize_int4_groups(weight, 32)
    assert torch.equal(q.reshape(n, k // 32, 32), codes.to(torch.int32))
    layer = Int4WeightOnlyLinear(_linear_with(weight))
    if backend == "torch":  # only the block scale and min are rounded (to bf16): relative error of a few 1e-3
        assert _rel_err(layer.dequantized(), weight) < 1e-2
    else:  # the low-bit kernel keeps them in fp16, as GGUF stores them: Q4_1's own values, to fp32 rounding
        gguf = (m.half().float()[..., None] + codes * d.half().float()[..., None]).reshape(n, k)
        layer = Int4WeightOnlyLinear(_linear_with(gguf))
        assert _rel_err(layer.dequantized(), gguf) < 1e-6


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return lin


def test_tied_int8_embedding_and_head_share_one_tensor(tiny_model_dirs, backend):
    rt = ShardRuntime(tiny_model_dirs["llama"], dtype=torch.float32, quantization="int4")
    assert isinstance(rt.modules.embed_tokens, Int8Embedding)
    assert isinstance(rt.modules.lm_head, Int8WeightOnlyLinear)
    if rt.shard_config.tie_word_embeddings:
        assert rt.modules.lm_head.weight is rt.modules.embed_tokens.weight
    fp32 = ShardRuntime(tiny_model_dirs["llama"])
    emb_ref = fp32.modules.embed_tokens(PROMPT)
    assert _rel_err(rt.modules.embed_tokens(PROMPT), emb_ref) < REL_TOL


def test_method_names():
    assert method_for("int4", "cpu") == "int4_weight_only"
    assert method_for("int8", "cpu") == "int8_weight_only"


def _backend_for(option: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hardware={option}", "hardware.threads=1"])
    node = validate(cfg)
    assert node.hardware.quantization == option.removeprefix("cpu_")
    return instantiate(cfg.hardware)  # the same call openhydra/build.py makes


@pytest.mark.parametrize("option", ["cpu_int8", "cpu_int4"])
def test_config_option_loads_a_quantized_shard_that_generates(tiny_model_dirs, option, backend):
    backend = _backend_for(option)
    kind = Int4WeightOnlyLinear if option == "cpu_int4" else Int8WeightOnlyLinear
    model_dir = tiny_model_dirs["llama"]
    full = backend.load_span(model_dir, 0, 8)
    assert not [m for m in full.modules.layers.modules() if type(m) is nn.Linear]
    # Per layer: q/k/v as one fused kernel, gate/up as one, o_proj and down_proj alone (runtime/quant_cpu.py).
    assert sum(isinstance(m, kind) for m in full.modules.layers.modules()) == 8 * 4
    assert sum(isinstance(m, FusedProjections) for m in full.modules.layers.modules()) == 8 * 2
    fp32 = ShardRuntime(model_dir)
    # layers: int8 = 8 bits + a bf16 scale per row or an fp16 scale per 32 (~0.26 of fp32); int4 = 4 bits + a
    # 16-bit scale and zero per 32 weights (5/32 = 0.16 of fp32). The tiny model is mostly its int8 embedding table.
    layers_ratio = module_bytes(full.modules.layers) / module_bytes(fp32.modules.layers)
    assert layers_ratio < (0.27 if option == "cpu_int8" else 0.17)
    assert full.loaded_bytes < 0.3 * fp32.loaded_bytes
    chain = [backend.load_span(model_dir, 0, 4), backend.load_span(model_dir, 4, 8)]
    tokens = greedy_generate(chain, PROMPT, 12)
    assert tokens == greedy_generate([full], PROMPT, 12)  # split spans = the whole model, same kernels
    reference = greedy_generate([fp32], PROMPT, 12)
    # Random tiny weights: logits are nearly flat, yet 4/8-bit weights keep the first greedy tokens.
    assert tokens[:3] == reference[:3]


def top1_agreement_and_ppl(rt: ShardRuntime, reference_picks: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    logits = rt.forward("tf", torch.arange(ids.numel()), input_ids=ids, all_logits=True)  # [S, V]
    rt.close_session("tf")
    nll = nn.functional.cross_entropy(logits[:-1].float(), ids[1:])
    return (logits.argmax(-1) == reference_picks).float().mean().item(), math.exp(nll.item())


@pytest.mark.slow
def test_smollm2_int8_int4_agreement_and_perplexity(smollm2_dir):
    from pathlib import Path

    from transformers import AutoTokenizer

    text = (Path(__file__).resolve().parents[2] / "bench" / "data" / "heldout.txt").read_text()
    ids = torch.tensor(AutoTokenizer.from_pretrained(smollm2_dir)(text)["input_ids"][:256])
    fp32 = ShardRuntime(smollm2_dir)
    ref_logits = fp32.forward("tf", torch.arange(ids.numel()), input_ids=ids, all_logits=True)
    fp32.close_session("tf")
    ref_picks = ref_logits.argmax(-1)
    ref_ppl = math.exp(nn.functional.cross_entropy(ref_logits[:-1].float(), ids[1:]).item())
    results = {}
    for q in ("int8", "int4"):
        rt = ShardRuntime(smollm2_dir, dtype=torch.float32, quantization=q)
        results[q] = (*top1_agreement_and_ppl(rt, ref_picks, ids), rt.loaded_bytes)
        del rt
    print(f"fp32 ppl {ref_ppl:.2f}; " + "; ".join(f"{q}: agreement {a:.3f} ppl {p:.2f} MB {b / 1e6:.0f}"
                                                  for q, (a, p, b) in results.items()))
    assert results["int8"][0] >= 0.85 and results["int8"][1] <= 1.10 * ref_ppl
    assert results["int4"][0] >= 0.80 and results["int4"][1] <= 1.20 * ref_ppl
    assert results["int4"][2] < 0.2 * fp32.loaded_bytes  # 4-bit layers + int8 head: ~95 MB of 538 MB
