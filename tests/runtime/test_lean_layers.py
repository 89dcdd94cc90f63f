"""The lean Llama layer step (runtime/lean_layers.py) and fused CPU int8/int4 projections (runtime/quant_cpu.py)
give the same bits as transformers' own layers and separate projections: logits and K/V caches, prefill and
decode, fp32 / bf16 / int8 / int4, on a tiny Llama and on real SmolLM2 weights."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from openhydra.runtime import lowbit
from openhydra.runtime import quantize as quantize_module
from openhydra.runtime import shard as shard_module
from openhydra.runtime.lean_layers import lean_supported, lean_usable, lowbit_of
from openhydra.runtime.lowbit import KernelRMSNorm
from openhydra.runtime.quant_cpu import (
    FusedProjections,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    ProjectionSlice,
    fuse_projections,
)
from openhydra.runtime.shard import ShardRuntime

KERNELS = {"int4": Int4WeightOnlyLinear, "int8": Int8WeightOnlyLinear}


class _Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.q_proj, self.k_proj = nn.Linear(64, 96, bias), nn.Linear(64, 32, bias)
        self.v_proj = nn.Linear(64, 32, bias)
        self.o_proj = nn.Linear(96, 64, bias)


@pytest.mark.parametrize("kernel", ["int4", "int8"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 40])  # int8 takes its dense prefill path above 32 rows
def test_fused_projections_equal_separate_ones(kernel, bias, rows):
    attn = _Attention(bias)
    separate = {name: KERNELS[kernel](getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj")}
    assert fuse_projections(attn, KERNELS[kernel]) == 3
    assert isinstance(attn.fused_q_proj_k_proj_v_proj, FusedProjections)
    assert isinstance(attn.q_proj, ProjectionSlice) and type(attn.o_proj) is nn.Linear  # o_proj has its own input
    x, other = torch.randn(1, rows, 64), torch.randn(1, rows, 64)
    with torch.inference_mode():
        want = {name: layer(x) for name, layer in separate.items()}
        got = {name: getattr(attn, name)(x) for name in ("q_proj", "k_proj", "v_proj")}  # transformers' order
        assert all(torch.equal(got[n], want[n]) for n in want)
        assert all(got[n].is_contiguous() for n in got)
        assert torch.equal(torch.cat(attn.fused_q_proj_k_proj_v_proj.parts(x), -1),
                           torch.cat([want[n] for n in ("q_proj", "k_proj", "v_proj")], -1))
        # Any other order or input still gives each projection of its own input: nothing stale is handed out.
        assert torch.equal(attn.k_proj(other), separate["k_proj"](other))
        assert torch.equal(attn.k_proj(x), want["k_proj"])
        assert torch.equal(attn.k_proj(x), want["k_proj"])  # the same part twice: computed again, same bits
        assert torch.equal(attn.v_proj(other), separate["v_proj"](other))
        assert torch.equal(attn.q_proj(x), want["q_proj"])


def test_fused_projections_keep_threads_apart():
    """gRPC runs sessions' steps on several threads through the same layers: a part is never another thread's."""
    attn = _Attention(False)
    separate = {name: Int4WeightOnlyLinear(getattr(attn, name)) for name in ("q_proj", "k_proj", "v_proj")}
    fuse_projections(attn, Int4WeightOnlyLinear)
    inputs = [torch.randn(1, 1, 64) for _ in range(4)]
    with torch.inference_mode():
        want = [{n: layer(x) for n, layer in separate.items()} for x in inputs]
    wrong: list[int] = []
    barrier = threading.Barrier(len(inputs))

    def run(i: int) -> None:
        with torch.inference_mode():
            barrier.wait()
            for _ in range(200):
                for name in ("q_proj", "k_proj", "v_proj"):
                    if not torch.equal(getattr(attn, name)(inputs[i]), want[i][name]):
                        wrong.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_fusion_leaves_other_siblings_alone():
    parent = nn.Module()
    parent.q_proj, parent.k_proj = nn.Linear(64, 32), nn.Linear(64, 32)  # no v_proj: not a q/k/v group
    parent.gate_proj, parent.up_proj = nn.Linear(64, 32, bias=False), nn.Linear(48, 32, bias=False)  # other inputs
    assert fuse_projections(parent, Int8WeightOnlyLinear) == 0
    assert all(type(m) is nn.Linear for m in (parent.q_proj, parent.k_proj, parent.gate_proj, parent.up_proj))


def _steps(rt: ShardRuntime, session: str, prompt: torch.Tensor, new: int) -> tuple[list[torch.Tensor], object]:
    """Prefill then ``new`` greedy decode steps; every step's logits and the session's cache."""
    out = rt.forward(session, torch.arange(prompt.numel()), input_ids=prompt)
    logits = [out]
    for i in range(new):
        token = torch.tensor([int(out.argmax())])
        out = rt.forward(session, torch.tensor([prompt.numel() + i]), input_ids=token)
        logits.append(out)
    return logits, rt._sessions.get(session).cache


def _assert_lean_equals_transformers(model_dir: Path, dtype: torch.dtype, quantization: str,
                                     monkeypatch: pytest.MonkeyPatch, new: int = 6) -> None:
    prompt = torch.randint(3, 4000, (19,), generator=torch.Generator().manual_seed(3))
    rt = ShardRuntime(model_dir, dtype=dtype, quantization=quantization)
    assert lean_supported(rt.modules.layers, rt.shard_config._attn_implementation)
    # fp32 layers on the low-bit kernel norm on it too (lean and transformers' layers alike: compared below)
    kernel_norms = quantization != "none" and dtype == torch.float32 and lowbit.kernel() is not None
    assert rt.kernel_norm_layers == (len(rt.modules.layers) if kernel_norms else 0)
    assert all(isinstance(layer.input_layernorm, KernelRMSNorm) == kernel_norms for layer in rt.modules.layers)
    lean, lean_cache = _steps(rt, "lean", prompt, new)
    with monkeypatch.context() as m:
        m.setattr(shard_module, "lean_usable", lambda *a: False)  # transformers' LlamaDecoderLayer.forward
        plain, plain_cache = _steps(rt, "plain", prompt, new)
    assert len(lean) == len(plain) == new + 1
    for step, (a, b) in enumerate(zip(lean, plain, strict=True)):
        assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max().item()}"
    for a, b in zip(lean_cache.layers, plain_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    if quantization != "none":  # fused groups unfused: the same bits again
        with monkeypatch.context() as m:
            m.setattr(quantize_module, "fuse_projections", lambda *a: 0)
            unfused = ShardRuntime(model_dir, dtype=dtype, quantization=quantization)
        assert not any(isinstance(x, FusedProjections) for x in unfused.modules.modules())
        separate, _ = _steps(unfused, "separate", prompt, new)
        assert all(torch.equal(a, b) for a, b in zip(lean, separate, strict=True))


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_is_bit_identical_on_tiny_llama(tiny_model_dirs, dtype, quantization, monkeypatch):
    _assert_lean_equals_transformers(tiny_model_dirs["llama"], dtype, quantization, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "quantization"), [(torch.float32, "none"), (torch.bfloat16, "none"),
                                                     (torch.float32, "int4")])
def test_lean_step_is_bit_identical_on_smollm2(smollm2_dir, dtype, quantization, monkeypatch):
    _assert_lean_equals_transformers(smollm2_dir, dtype, quantization, monkeypatch, new=4)


def test_one_position_steps_through_full_attention_need_no_mask(tiny_model_dirs):
    """The premise of ShardRuntime's skipping transformers' mask functions on a lean one-position step: for
    full-attention layers under sdpa they return None whatever the cache holds."""
    rt = ShardRuntime(tiny_model_dirs["llama"])
    assert rt._one_position_maskless and set(rt.layer_types) == {"full_attention"}
    for length in (1, 19, 300):
        prompt = torch.randint(3, 4000, (length,), generator=torch.Generator().manual_seed(length))
        rt.forward(f"m{length}", torch.arange(length), input_ids=prompt)
        cache = rt._sessions.get(f"m{length}").cache
        h = torch.zeros(1, 1, rt.shard_config.hidden_size)
        for fn in rt._mask_fns.values():
            assert fn(config=rt.shard_config, inputs_embeds=h, attention_mask=None, past_key_values=cache,
                      position_ids=torch.tensor([[length]])) is None
    hybrid = ShardRuntime(tiny_model_dirs["qwen3_5"])  # linear-attention layers: masks stay asked for
    assert not hybrid._one_position_maskless


def test_lean_step_only_where_it_is_that_layer(tiny_model_dirs):
    llama = ShardRuntime(tiny_model_dirs["llama"], 0, 4, dtype=torch.float32)
    assert lean_supported(llama.modules.layers, "sdpa")
    assert not lean_supported(llama.modules.layers, "eager")  # batching's rows / compaction's attention too
    handle = llama.modules.layers[2].mlp.register_forward_hook(lambda *a: None)
    assert not lean_supported(llama.modules.layers, "sdpa")
    assert not lean_usable(llama._lean, "sdpa")  # the runtime's load-time choice still sees a later hook
    handle.remove()
    assert lean_usable(llama._lean, "sdpa")
    assert lean_supported(llama.modules.layers, "sdpa")
    for family in ("qwen3", "qwen3_5"):
        other = ShardRuntime(tiny_model_dirs[family], 0, 4, dtype=torch.float32)
        assert not lean_supported(other.modules.layers, other.shard_config._attn_implementation)


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5"])
def test_kernel_norms_for_qwen_layers_in_fp32_only(tiny_model_dirs, family):
    """Qwen3's RMSNorm is Llama's formula, Qwen3.5's scales by 1 + weight: an fp32 int4 span of either norms on the
    kernel (every layer: Qwen3.5's linear-attention layers too), close to transformers' norms (within the kernel's
    activation rounding); a bf16 span keeps transformers' norms."""
    if lowbit.kernel() is None:
        pytest.skip("no low-bit kernel here")
    prompt = torch.tensor([5, 9, 300, 7, 2, 44, 1000, 3])
    rt = ShardRuntime(tiny_model_dirs[family], dtype=torch.float32, quantization="int4")
    assert rt.kernel_norm_layers == rt.num_layers
    assert all(isinstance(layer.post_attention_layernorm, KernelRMSNorm) for layer in rt.modules.layers)
    assert all(layer.input_layernorm.zero_centered == (family == "qwen3_5") for layer in rt.modules.layers)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(shard_module, "use_kernel_norms", lambda layers, dtype: 0)
        plain = ShardRuntime(tiny_model_dirs[family], dtype=torch.float32, quantization="int4")
    logits = {}
    for name, runtime in (("kernel", rt), ("transformers", plain)):  # a prompt, then 6 steps fed the same tokens
        outs = [runtime.forward("s", torch.arange(prompt.numel()), input_ids=prompt)]
        outs += [runtime.forward("s", torch.tensor([prompt.numel() + i]), input_ids=prompt[i : i + 1])
                 for i in range(6)]
        logits[name] = torch.cat(outs)
    # Its own bits, within rounding; the kernel quantizes activations to int8 per block, so a last-bit change in a
    # norm's output can move an activation by a quantization step (Qwen3.5 here: 0.3% of the logits' norm).
    difference = logits["kernel"] - logits["transformers"]
    assert 0 < difference.norm() < 0.01 * logits["transformers"].norm()
    bf16 = ShardRuntime(tiny_model_dirs[family], 0, 2, dtype=torch.bfloat16, quantization="int4")
    assert bf16.kernel_norm_layers == 0


def _assert_layer_major_verify_equals_steps(model_dir: Path, dtype: torch.dtype, quantization: str,
                                            matmul: str = "pytorch") -> None:
    """A verify of S positions layer by layer (ShardRuntime ``_verify_layer_major`` -> ``LeanLlamaLayer.verify``)
    against the same S positions decoded one at a time: logits and every layer's K/V, bit for bit. On the low-bit
    kernel the projections and the head take all S rows in one call (``rows_at_once``); so does an unquantized bf16
    span on the library's bf16 matmul (``matmul="library"``: runtime/quant_cpu.py use_bf16_kernel); else one call
    per row."""
    rt = ShardRuntime(model_dir, dtype=dtype, quantization=quantization, matmul=matmul)
    library_bf16 = matmul == "library" and dtype == torch.bfloat16 and quantization == "none"
    rows_at_once = (quantization != "none" or library_bf16) and lowbit.kernel() is not None
    assert [lean.rows_at_once for lean in rt._lean_layers] == [rows_at_once] * len(rt._lean_layers)
    assert (lowbit_of(rt.modules.lm_head) is not None) == rows_at_once
    prompt = torch.randint(3, 4000, (19,), generator=torch.Generator().manual_seed(4))
    for s in (1, 2, 3, 7):
        drafts = torch.randint(3, 4000, (s,), generator=torch.Generator().manual_seed(s))
        for session in ("verify", "steps"):
            rt.forward(session, torch.arange(19), input_ids=prompt)
        taken: list[bool] = []

        def spy(*args, original=rt._verify_layer_major, taken=taken):
            out = original(*args)
            taken.append(out is not None)
            return out

        rt._verify_layer_major = spy
        verify = rt.forward("verify", torch.arange(19, 19 + s), input_ids=drafts, all_logits=True)
        del rt._verify_layer_major
        steps = torch.cat([rt.forward("steps", torch.tensor([19 + i]), input_ids=drafts[i : i + 1]) for i in range(s)])
        assert taken == ([True] if s > 1 else [])  # layer by layer (one position is a plain decode step)
        assert torch.equal(verify, steps), f"S={s}: max |diff| {(verify - steps).abs().max().item()}"
        caches = [rt._sessions.get(x).cache for x in ("verify", "steps")]
        for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        for session in ("verify", "steps"):
            rt.close_session(session)


@pytest.mark.parametrize(("quantization", "matmul"), [("none", "pytorch"), ("none", "library"), ("int8", "pytorch"),
                                                     ("int4", "pytorch")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_major_verify_is_bit_identical_on_tiny_llama(tiny_model_dirs, dtype, quantization, matmul):
    _assert_layer_major_verify_equals_steps(tiny_model_dirs["llama"], dtype, quantization, matmul)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_major_verify_on_torch_kernels_runs_per_row(tiny_model_dirs, dtype, quantization, monkeypatch):
    """Without the low-bit kernel a verify's projections run one call per row: PyTorch's int4/int8 kernels make no
    promise that a row's bits do not depend on the row count (its int8 path changes kernel above 32 rows; its dense
    matmuls do round by row count: SmolLM2 bf16 logits moved by 0.25 when a verify's rows were taken at once)."""
    monkeypatch.setattr(lowbit, "kernel", lambda: None)
    _assert_layer_major_verify_equals_steps(tiny_model_dirs["llama"], dtype, quantization)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "quantization", "matmul"), [
    (torch.float32, "none", "pytorch"), (torch.bfloat16, "none", "pytorch"), (torch.bfloat16, "none", "library"),
    (torch.float32, "int4", "pytorch"), (torch.float32, "int8", "pytorch"), (torch.bfloat16, "int4", "pytorch")])
def test_layer_major_verify_is_bit_identical_on_smollm2(smollm2_dir, dtype, quantization, matmul):
    """Real weights, both dtypes; bf16 on PyTorch's matmuls (the default) and on the library's
    (``hardware.matmul=library``)."""
    _assert_layer_major_verify_equals_steps(smollm2_dir, dtype, quantization, matmul)
