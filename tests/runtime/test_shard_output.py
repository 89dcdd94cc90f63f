"""The last shard's head at a prompt's last position: the same bits as before, without the batched matmul path.

``lm_head(norm(h)[:, -1:])`` hands the head a [1, 1, D] view with [1, S, D]'s strides, which sends a bf16 Linear
down ``aten::bmm`` with a copy of the whole weight (SmolLM2: 75 ms instead of 4 ms at every prompt's last position,
the first token's latency). ``ShardRuntime._output`` gives the row a one-position step's strides."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from openhydra.runtime.shard import ShardRuntime


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_prompt_head_is_a_plain_matmul_with_the_same_bits(tiny_model_dirs, dtype) -> None:
    rt = ShardRuntime(tiny_model_dirs["llama"], 4, 8, dtype=dtype)
    h = torch.randn(1, 23, rt.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.inference_mode():
        reference = rt.modules.lm_head(rt.modules.norm(h)[:, -1:, :])[0].float()  # the former slice
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        logits = rt._output(h, all_logits=False)
    assert torch.equal(logits, reference) and logits.shape == (1, rt.vocab_size)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::bmm" not in ops, sorted(ops)  # the batched path (and its weight copy) is gone on every CPU
