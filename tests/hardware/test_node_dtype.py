"""Real node processes report the dtype they chose and why, in GET /v1/network/status and in the start banner,
and which kernel multiplies their int4 weights."""

from __future__ import annotations

import re

import httpx
import pytest

from openhydra.hardware.dtype import cpu_flags, native_bf16_flags
from openhydra.testing.processes import NodeProcess, start_all

MEASURED = re.compile(r"measured bf16/fp32 prefill matmul [\d.]+x (slower|faster), "
                      r"decode matmul [\d.]+x (slower|faster)")


@pytest.mark.slow
def test_nodes_report_dtype_and_reason(tiny_model_dirs, tmp_path):
    base = ["model=local", f"model.path={tiny_model_dirs['llama']}", "api.rate_limit_requests=100000"]
    auto = NodeProcess([*base, "hardware=cpu", f"node.data_dir={tmp_path / 'auto'}"],
                       log_path=tmp_path / "auto.log")
    forced = NodeProcess([*base, "hardware=cpu", "hardware.dtype=bfloat16", f"node.data_dir={tmp_path / 'bf16'}"],
                         log_path=tmp_path / "bf16.log")
    int4 = NodeProcess([*base, "hardware=cpu_int4", f"node.data_dir={tmp_path / 'int4'}"],
                       log_path=tmp_path / "int4.log")
    fast = NodeProcess([*base, "hardware=cpu_fast", f"node.data_dir={tmp_path / 'fast'}"],
                       log_path=tmp_path / "fast.log")
    nodes = (auto, forced, int4, fast)
    try:
        start_all(list(nodes))
        statuses = [httpx.get(n.url + "/v1/network/status", timeout=10).json()["model"] for n in nodes]
        logs = [n.log_text() for n in nodes]
        answer = httpx.post(fast.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-llama-8l", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True})
    finally:
        for node in nodes:
            node.stop()

    chosen, explicit, quantized, library = statuses
    # hardware=cpu_fast: bf16 on the low-bit library's bf16 matmul where it runs, else PyTorch's (said nowhere)
    from openhydra.runtime import lowbit

    assert library["dtype"] == "bfloat16" and "matmul=library" in logs[3]
    assert library["kernel"] == (None if lowbit.kernel() is None else f"bf16 on the low-bit library ({lowbit.isa()})")
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text
    # which kernel multiplies the 4-bit weights: OpenHydra's own where this CPU runs it (runtime/lowbit.py)
    expected_kernel = ("PyTorch's int4/int8 kernels" if lowbit.kernel() is None
                       else f"low-bit kernel ({lowbit.isa()}), with its norms and attention")  # fp32: all three
    assert quantized["kernel"] == expected_kernel and chosen["kernel"] is None
    assert quantized["dtype"] == "float32" and f"(int8/int4 weights: {expected_kernel})" in logs[2]
    native = native_bf16_flags(cpu_flags())
    if native:  # e.g. Zen 4 / Sapphire Rapids: no measurement needed
        assert chosen["dtype"] == "bfloat16" and chosen["dtype_reason"].startswith("native bf16 on this CPU")
    else:  # this CPU measured: bf16 only if it won both shapes
        verdicts = MEASURED.search(chosen["dtype_reason"])
        assert verdicts is not None, chosen
        expected = "bfloat16" if verdicts.groups() == ("faster", "faster") else "float32"
        assert chosen["dtype"] == expected and chosen["dtype_reason"].startswith("no native bf16 (")
    banner = f"quantization=none; {chosen['dtype']}: {chosen['dtype_reason']}"
    assert banner in logs[0]  # the start banner's hardware line
    assert f"hardware: dtype {chosen['dtype']}: {chosen['dtype_reason']}" in logs[0]

    assert explicit["dtype"] == "bfloat16" and explicit["dtype_reason"] == "set by hardware.dtype"
    assert "quantization=none; bfloat16: set by hardware.dtype" in logs[1]
