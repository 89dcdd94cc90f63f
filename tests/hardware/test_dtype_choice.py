"""hardware.dtype=auto on the CPU (openhydra/hardware/dtype.py): flags and measurements handed in, then the real
backend with this machine's flags and a real load under a memory budget."""

from __future__ import annotations

import pytest
import torch

from openhydra.hardware import dtype as hwdtype
from openhydra.hardware.cpuinfo import parse_cpuinfo, parse_cpuinfo_flags
from openhydra.hardware.detect import GIB
from openhydra.hardware.dtype import (
    Bf16Measurement,
    DtypeChoice,
    choose_cpu_dtype,
    fit_to_memory,
    needed_bytes,
    span_parameter_count,
)
from openhydra.runtime.backend import make_backend

AVX2_ONLY = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"})
# DESIGN §4, AVX2-only EPYC: bf16 prefill ~6x slower, decode ~1.1x faster.
EPYC = Bf16Measurement(prefill_fp32_s=0.002, prefill_bf16_s=0.0122, decode_fp32_s=0.0033, decode_bf16_s=0.003,
                       threads=1)
BF16_WINS = Bf16Measurement(prefill_fp32_s=0.002, prefill_bf16_s=0.001, decode_fp32_s=0.004, decode_bf16_s=0.002,
                            threads=2)


class Measure:
    """A measurement stand-in that counts its calls (the decision must only measure when flags don't decide)."""

    def __init__(self, result: Bf16Measurement) -> None:
        self.result, self.calls = result, 0

    def __call__(self) -> Bf16Measurement:
        self.calls += 1
        return self.result


@pytest.mark.parametrize(("flags", "named"), [(AVX512_BF16, "avx512_bf16"), (SAPPHIRE_RAPIDS, "amx_bf16"),
                                              (frozenset({"fp", "asimd", "bf16"}), "bf16")])
def test_native_bf16_flag_picks_bf16_without_measuring(flags, named):
    measure = Measure(EPYC)
    choice = choose_cpu_dtype("auto", flags, measure)
    assert choice.dtype == "bfloat16" and choice.automatic
    assert f"native bf16 on this CPU ({named}" in choice.reason
    assert measure.calls == 0 and choice.measurement is None


def test_no_flag_and_slower_bf16_picks_fp32_and_says_why():
    measure = Measure(EPYC)
    choice = choose_cpu_dtype("auto", AVX2_ONLY, measure)
    assert measure.calls == 1
    assert choice.dtype == "float32" and choice.measurement == EPYC
    assert choice.reason == ("no native bf16 (avx2 only); measured bf16/fp32 prefill matmul 6.10x slower, "
                             "decode matmul 1.10x faster (1 thread(s))")
    assert choice.line().startswith("float32: no native bf16 (avx2 only)")


def test_bf16_faster_on_both_shapes_picks_bf16_even_without_a_flag():
    choice = choose_cpu_dtype("auto", frozenset({"avx2", "avx512f"}), Measure(BF16_WINS))
    assert choice.dtype == "bfloat16"
    assert "avx512 without bf16" in choice.reason and "prefill matmul 2.00x faster" in choice.reason


def test_unknown_flags_still_measure():
    choice = choose_cpu_dtype("auto", None, Measure(EPYC))
    assert choice.dtype == "float32" and choice.reason.startswith("flags unknown; measured")


@pytest.mark.parametrize(("requested", "flags"), [("bfloat16", AVX2_ONLY), ("float32", AVX512_BF16),
                                                  ("float16", AVX2_ONLY)])
def test_explicit_dtype_is_honoured(requested, flags):
    measure = Measure(EPYC)
    choice = choose_cpu_dtype(requested, flags, measure)
    assert choice.dtype == requested and choice.reason == "set by hardware.dtype" and not choice.automatic
    assert measure.calls == 0


def test_memory_too_small_for_fp32_falls_back_to_bf16_with_the_reason():
    measured = choose_cpu_dtype("auto", AVX2_ONLY, Measure(EPYC))
    params = 1_000_000_000  # 1B: fp32 needs ~5.0 GiB, bf16 ~2.7 GiB with the overheads
    assert needed_bytes(params, 4) > 4 * GIB > needed_bytes(params, 2)
    fitted = fit_to_memory(measured, params, 4 * GIB)
    assert fitted.dtype == "bfloat16" and fitted.automatic
    assert ("float32 weights need 5.0 GiB and the memory budget is 4.0 GiB; bfloat16 needs 2.7 GiB (fits)"
            in fitted.reason)
    assert measured.reason in fitted.reason  # the measurement stays visible
    assert fit_to_memory(measured, params, 6 * GIB) == measured  # fp32 fits: unchanged
    assert "may not fit either" in fit_to_memory(measured, params, 1 * GIB).reason
    explicit = DtypeChoice(dtype="float32", reason="set by hardware.dtype", automatic=False)
    assert fit_to_memory(explicit, params, 1 * GIB) == explicit  # the user's fp32 is kept


def test_cpuinfo_flags_parse_x86_and_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 AVX512F avx512_bf16\nbugs\t\t: x\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo_flags(x86) == frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
    assert "bf16" in parse_cpuinfo_flags(arm)
    assert parse_cpuinfo_flags("processor\t: 0\n") is None
    assert hwdtype.native_bf16_flags(parse_cpuinfo_flags(x86)) == ["avx512_bf16"]


def test_cpuinfo_keeps_each_keys_first_value():
    """Two CPUs: the first one's lines count; ARM's trailing Hardware line is found after the per-CPU blocks."""
    x86 = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon A\nflags\t\t: avx2\n\n"
           "processor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon B\nflags\t\t: avx2 avx512f\n")
    fields = parse_cpuinfo(x86)
    assert (fields["vendor_id"], fields["model name"], parse_cpuinfo_flags(x86)) == ("GenuineIntel", "Xeon A",
                                                                                        frozenset({"avx2"}))
    arm = "processor\t: 0\nFeatures\t: fp asimd\n\nprocessor\t: 1\nFeatures\t: fp\n\nHardware\t: BCM2835\n"
    assert parse_cpuinfo(arm)["hardware"] == "BCM2835"
    assert parse_cpuinfo_flags(arm) == frozenset({"fp", "asimd"})


def test_real_measurement_on_this_cpu():
    measured = hwdtype.measure_bf16_vs_fp32(1)
    assert measured.threads == 1
    assert min(measured.prefill_fp32_s, measured.prefill_bf16_s, measured.decode_fp32_s, measured.decode_bf16_s) > 0
    assert hwdtype.measure_bf16_vs_fp32(1) is measured  # once per process and thread count
    assert measured.bf16_faster == (measured.prefill_ratio < 1 and measured.decode_ratio < 1)


def test_span_parameter_count_matches_the_loaded_span(tiny_model_dirs):
    from openhydra.runtime.shard import ShardRuntime

    model_dir = tiny_model_dirs["llama"]
    for start, end in ((0, None), (3, 6), (6, 8)):
        runtime = ShardRuntime(model_dir, start, end, dtype=torch.float32)
        assert span_parameter_count(model_dir, start, end) == runtime.parameter_count, (start, end)


def test_a_node_reports_its_models_count_whatever_it_holds_and_how(tiny_model_dirs):
    """/api/show and the dashboard: the checkpoint's count, not an int4 span's packed elements (audit, 2026-12-06:
    SmolLM2-135M on cpu_int4 said "96M")."""
    from openhydra.node import model_parameter_count
    from openhydra.runtime.shard import ShardRuntime

    model_dir = tiny_model_dirs["llama"]
    runtime = ShardRuntime(model_dir, 3, 6, dtype=torch.float32, quantization="int4")
    assert runtime.parameter_count != span_parameter_count(model_dir, 3, 6)  # packed: what the bug reported
    assert model_parameter_count(model_dir, runtime) == span_parameter_count(model_dir, 0, None)


def test_backend_on_an_avx2_cpu_picks_fp32_and_says_so(monkeypatch):
    monkeypatch.setattr(hwdtype, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(hwdtype, "measure_bf16_vs_fp32", lambda threads: EPYC)
    backend = make_backend(backend="torch", device="cpu", dtype="auto", threads=1)
    assert backend.dtype == torch.float32
    assert backend.describe().endswith("; float32: no native bf16 (avx2 only); measured bf16/fp32 prefill matmul "
                                       "6.10x slower, decode matmul 1.10x faster (1 thread(s))")
    explicit = make_backend(backend="torch", device="cpu", dtype="bfloat16", threads=1)
    assert explicit.dtype == torch.bfloat16 and explicit.dtype_reason == "set by hardware.dtype"
    monkeypatch.setattr(hwdtype, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    assert make_backend(backend="torch", device="cpu", dtype="auto", threads=1).dtype == torch.bfloat16


def test_backend_loads_bf16_when_fp32_exceeds_the_memory_budget(monkeypatch, tiny_model_dirs):
    monkeypatch.setattr(hwdtype, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(hwdtype, "measure_bf16_vs_fp32", lambda threads: EPYC)
    model_dir = tiny_model_dirs["llama"]
    params = span_parameter_count(model_dir, 0, None)
    budget_gb = (needed_bytes(params, 4) + needed_bytes(params, 2)) / 2 / GIB  # bf16 fits, fp32 does not
    backend = make_backend(backend="torch", device="cpu", dtype="auto", threads=1, memory_budget_gb=budget_gb)
    assert backend.dtype == torch.float32  # before the span is known
    runtime = backend.load_span(model_dir, 0, None)
    assert runtime.dtype == torch.bfloat16 and backend.dtype == torch.bfloat16
    assert "float32 would be faster, but this span's float32 weights need" in backend.dtype_reason
    assert "(fits) [no native bf16 (avx2 only); measured" in backend.dtype_reason
    roomy = make_backend(backend="torch", device="cpu", dtype="auto", threads=1, memory_budget_gb=64.0)
    assert roomy.load_span(model_dir, 0, None).dtype == torch.float32


def test_int4_weights_keep_the_rest_of_the_layer_in_float32_even_with_native_bf16():
    """bench/bench_cpu_dtype.py --quantization int4: fp32 decodes 1.2x faster, prefill equal (the kernel is bf16)."""
    flags = frozenset({"avx2", "avx512f", "avx512_bf16"})
    measure = Measure(BF16_WINS)
    choice = choose_cpu_dtype("auto", flags, measure, quantization="int4")
    assert choice.dtype == "float32" and choice.automatic and "int4" in choice.reason
    assert measure.calls == 0
    assert choose_cpu_dtype("auto", flags, measure, quantization="int8").dtype == "bfloat16"  # its prefill is dense
    # ... unless OpenHydra's low-bit kernel runs here (runtime/lowbit.py): it reads fp32 directly, prefill included
    on_lowbit = choose_cpu_dtype("auto", flags, measure, quantization="int8", lowbit_kernel=True)
    assert on_lowbit.dtype == "float32" and "low-bit kernel" in on_lowbit.reason
    assert choose_cpu_dtype("bfloat16", flags, measure, quantization="int4").dtype == "bfloat16"  # as set
