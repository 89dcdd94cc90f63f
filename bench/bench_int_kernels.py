"""CPU low-bit matmul candidates on SmolLM2's real decode shapes: time per token and error vs fp32.

    OMP_NUM_THREADS=1 python bench/bench_int_kernels.py [--trials 5] [--passes 3]

One "token" = one batch-1 matmul through every Linear of SmolLM2-135M's 30 decoder layers (q, k, v, o,
gate, up, down: the real weights, so the 60+ MB stream through the caches as in decode) plus the tied
head (49152 x 576). Arms, interleaved trial by trial, 1 thread:

- ``fp32`` / ``bf16``: dense ``F.linear``;
- ``int8``: torch's weight-only ``_weight_int8pack_mm`` (int8 weights, per-row scales, bf16 activations);
- ``int4-gN``: torch's ``_weight_int4pack_mm_for_cpu`` (4-bit weights packed by
  ``_convert_weight_to_int4pack_for_cpu``, asymmetric groups of N along K, bf16 activations); torchao's
  CPU int4 layout (``Int4CPULayout``) calls this same op;
- ``int4-g32-fp16``: the same with fp16 activations and scales (fp16 keeps GGUF's fp16 block scales exactly);
- ``lowbit-int4`` / ``lowbit-int8``: OpenHydra's own kernel (runtime/lowbit.py, AVX-512 VNNI or AVX2): Q4_1- /
  Q8_0-style blocks of 32 with fp16 scales times activations quantized to int8 per block of 32 (llama.cpp's scheme),
  fp32 in and out (no casts); what ``hardware=cpu_int4`` / ``cpu_int8`` run where the CPU has either;
- ``bnb-nf4`` / ``bnb-int8``: bitsandbytes 0.50 CPU ``Linear4bit`` / ``Linear8bitLt``;
- ``fbgemm-dyn-int8``: ``torch.ao`` dynamic int8 (activations quantized per tensor too).

Error: max |y - y_fp32| / max |y_fp32| over the layers, for a random activation vector scaled like
SmolLM2's hidden states (with outlier channels), averaged over layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_trials, run_interleaved

from openhydra.testing.machine import announce

LAYER_KEYS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")


def load_weights(model_dir: Path) -> list:
    from safetensors.torch import load_file

    tensors = load_file(str(model_dir / "model.safetensors"))
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})
    weights = [tensors[f"model.layers.{i}.{key}.weight"].float() for i in layers for key in LAYER_KEYS]
    weights.append(tensors["model.embed_tokens.weight"].float())  # the tied head
    return weights


def make_arm(name: str, weights: list) -> list[Callable]:
    """One callable per matrix: takes the fp32 activation [1, K], returns [1, N] (any dtype)."""
    from unittest import mock

    import torch
    from torch import nn

    from openhydra.runtime import lowbit
    from openhydra.runtime.quant_cpu import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    torch_kernels = mock.patch.object(lowbit, "kernel", lambda: None)  # the torch arms: PyTorch's kernels

    def linear_of(w: torch.Tensor) -> nn.Linear:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w.clone(), requires_grad=False)
        return lin

    calls: list[Callable] = []
    for w in weights:
        if name == "fp32":
            calls.append(lambda x, w=w: torch.nn.functional.linear(x, w))
        elif name == "bf16":
            wb = w.bfloat16()
            calls.append(lambda x, wb=wb: torch.nn.functional.linear(x.bfloat16(), wb))
        elif name == "int8":
            with torch_kernels:
                q8 = Int8WeightOnlyLinear(linear_of(w), torch.bfloat16)
            calls.append(lambda x, q=q8: q(x.bfloat16()))
        elif name.startswith("int4"):
            group = int(name.split("-")[1][1:])
            dtype = torch.float16 if name.endswith("fp16") else torch.bfloat16
            with torch_kernels:
                q4 = Int4WeightOnlyLinear(linear_of(w), dtype, group_size=group, kernel_dtype=dtype)
            calls.append(lambda x, q=q4, dtype=dtype: q(x.to(dtype)))
        elif name.startswith("lowbit-"):
            if lowbit.kernel() is None:
                raise SystemExit("lowbit arms: this CPU has no AVX-512 VNNI (or no C compiler)")
            kind = Int4WeightOnlyLinear if name == "lowbit-int4" else Int8WeightOnlyLinear  # head included, as above
            layer = kind(linear_of(w))
            assert layer.lowbit is not None
            calls.append(layer.lowbit.matmul)
        elif name.startswith("bnb"):
            import bitsandbytes as bnb

            if name == "bnb-nf4":
                mod = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.bfloat16,
                                        quant_type="nf4", device="meta")
                mod.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
            else:
                mod = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False,
                                          threshold=6.0, device="meta")
                mod.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
            mod = mod.to("cpu")
            calls.append(lambda x, m=mod: m(x.bfloat16() if name == "bnb-nf4" else x))
        elif name == "fbgemm-dyn-int8":
            mod = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear_of(w)), {nn.Linear}, dtype=torch.qint8)
            calls.append(lambda x, m=mod: m(x))
        else:
            raise ValueError(name)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3, help="tokens per trial and arm")
    parser.add_argument("--arms", default="fp32,bf16,int8,int4-g32,int4-g64,int4-g32-fp16,bnb-nf4,"
                        "bnb-int8,fbgemm-dyn-int8,lowbit-int8,lowbit-int4")
    parser.add_argument("--plot", default="docs/img/bench_int_kernels.png")
    args = parser.parse_args()
    announce()  # the machine, its load and the versions, printed with the result

    import torch

    torch.set_num_threads(1)
    from openhydra.runtime.source import embedded_model_dir
    from openhydra.testing import TEST_CACHE_ROOT

    model_dir = Path(args.model_dir) if args.model_dir else embedded_model_dir(TEST_CACHE_ROOT)
    weights = load_weights(model_dir)
    torch.manual_seed(0)
    # hidden-state-like activations: unit scale plus a few large outlier channels (as SmolLM2's have)
    xs = {}
    for w in weights:
        x = torch.randn(1, w.shape[1])
        x[0, torch.randint(0, w.shape[1], (4,))] *= 30
        xs.setdefault(w.shape[1], x)
    names = args.arms.split(",")
    arms = {name: make_arm(name, weights) for name in names}

    errors: dict[str, float] = {}
    for name, calls in arms.items():
        rel = []
        for w, call in zip(weights, calls, strict=True):
            x = xs[w.shape[1]]
            ref = torch.nn.functional.linear(x, w)
            rel.append(((call(x).float() - ref).abs().max() / ref.abs().max()).item())
        errors[name] = statistics.mean(rel)

    def timed(name: str) -> Callable[[], float]:
        calls = arms[name]
        inputs = [xs[w.shape[1]] for w in weights]

        def arm() -> float:
            started = time.perf_counter()
            for _ in range(args.passes):
                for call, x in zip(calls, inputs, strict=True):
                    call(x)
            return (time.perf_counter() - started) / args.passes * 1e3

        return arm

    load = os.getloadavg()
    rates = run_interleaved({name: timed(name) for name in names}, args.trials, unit="ms/token")
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load average {load} -> {os.getloadavg()}")
    print("\n| arm | ms per token (all matmuls) | x fp32 speed | rel. error vs fp32 |\n|---|---|---|---|")
    for name in names:
        print(f"| {name} | {med[name]:.2f} | {med['fp32'] / med[name]:.2f} | {errors[name]:.4f} |"
              if "fp32" in med else f"| {name} | {med[name]:.2f} | - | {errors[name]:.4f} |")
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    plot_trials(rates, "SmolLM2 decode matmuls per token, 1 thread (interleaved)", args.plot, ylabel="ms / token")
    print(json.dumps({"ms_per_token": med, "rel_error": errors, "loadavg": load}))


if __name__ == "__main__":
    main()
