"""The MLX backend (mlx[cpu] on Linux here): same greedy tokens as PyTorch, and it chains with PyTorch spans."""

from __future__ import annotations

import json

import pytest
import torch

from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.mlx_backend import mlx_import_error, mlx_model_config
from openhydra.runtime.shard import PositionMismatchError, ShardRuntime

MLX_MISSING = mlx_import_error()
pytestmark = pytest.mark.skipif(MLX_MISSING is not None, reason=f"mlx/mlx-lm not importable: {MLX_MISSING}")

PROMPT = torch.tensor([1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 3458, 282, 7192, 314])
NEW = 16


def mlx_span(model_dir, start=0, end=None, dtype="float32"):
    from openhydra.runtime.mlx_backend import MlxShardRuntime

    return MlxShardRuntime(model_dir, start, end, dtype=dtype)


def test_rope_theta_is_lifted_from_rope_parameters(smollm2_dir):
    raw = json.loads((smollm2_dir / "config.json").read_text())
    assert "rope_theta" not in raw, "transformers 5 writes rope_theta under rope_parameters"
    assert mlx_model_config(smollm2_dir)["rope_theta"] == raw["rope_parameters"]["rope_theta"] == 100000.0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_equals_pytorch_whole_and_mixed_chains(tiny_model_dirs, family):
    model_dir = tiny_model_dirs[family]
    reference = greedy_generate([ShardRuntime(model_dir)], PROMPT, NEW)
    assert greedy_generate([mlx_span(model_dir)], PROMPT, NEW) == reference
    # MLX in the middle, first and last of chains with PyTorch spans; hidden states cross as torch tensors.
    middle = [ShardRuntime(model_dir, 0, 3), mlx_span(model_dir, 3, 6), ShardRuntime(model_dir, 6, 8)]
    assert greedy_generate(middle, PROMPT, NEW) == reference
    ends = [mlx_span(model_dir, 0, 2), ShardRuntime(model_dir, 2, 5), mlx_span(model_dir, 5, 8)]
    assert greedy_generate(ends, PROMPT, NEW, prefill_chunk=5) == reference


def test_bf16_span_chains_with_bf16_pytorch(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    reference = greedy_generate([ShardRuntime(model_dir, dtype=torch.bfloat16)], PROMPT, 8)
    mixed = [mlx_span(model_dir, 0, 4, "bfloat16"), ShardRuntime(model_dir, 4, 8, dtype=torch.bfloat16)]
    out = mixed[0].forward("s", torch.arange(PROMPT.numel()), input_ids=PROMPT)
    assert out.dtype == torch.bfloat16 and out.shape == (PROMPT.numel(), 64)  # wire: [S, D] in the span dtype
    mixed[0].close_session("s")
    tokens = greedy_generate(mixed, PROMPT, 8)
    # different bf16 kernels round differently: the first tokens must agree
    assert tokens[:4] == reference[:4]


def test_sessions_truncate_and_positions_like_shard_runtime(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    rt = mlx_span(model_dir)
    first = greedy_generate([rt], PROMPT, 6, session_id="a")
    assert rt.session_length("a") == PROMPT.numel() + 5
    rt.truncate_session("a", PROMPT.numel())  # roll back to the prompt: the next step is the first token again
    logits = rt.forward("a", torch.tensor([PROMPT.numel()]), input_ids=torch.tensor([first[0]]))
    assert int(logits.argmax()) == first[1]
    with pytest.raises(PositionMismatchError):
        rt.forward("a", torch.tensor([3]), input_ids=torch.tensor([5]))
    with pytest.raises(ValueError, match="hidden_states must be"):
        mlx_span(model_dir, 2, 4).forward("b", torch.arange(2), hidden_states=torch.zeros(2, 63))
    with pytest.raises(ValueError, match="input_ids must lie"):
        rt.forward("c", torch.arange(1), input_ids=torch.tensor([10**7]))
    rt.close_session("a")
    assert rt.session_count() == 0


def test_coordinator_side_head_matches_the_last_span(tiny_model_dirs):
    """privacy=onion samples on the coordinator with peer/head.py's runtime_head: it must work on an MLX span."""
    from openhydra.peer.head import runtime_head

    model_dir = tiny_model_dirs["qwen3"]
    hidden = ShardRuntime(model_dir, 0, 4).forward("h", torch.arange(PROMPT.numel()), input_ids=PROMPT)  # [S, D]
    on_mlx = runtime_head(mlx_span(model_dir, 4, 8))(hidden)  # [S, V]
    on_torch = runtime_head(ShardRuntime(model_dir, 4, 8))(hidden)
    assert on_mlx.shape == on_torch.shape == (PROMPT.numel(), 49152)
    assert torch.allclose(on_mlx, on_torch, atol=1e-4)
    assert torch.equal(on_mlx.argmax(-1), on_torch.argmax(-1))
    assert mlx_span(model_dir, 0, 4).modules.lm_head is None


def test_hardware_m_options_choose_mlx(tiny_model_dirs):
    from openhydra.runtime.backend import make_backend

    backend = make_backend(backend="mlx", device="gpu", dtype="float32")
    assert backend.name == "mlx" and "MLX" in backend.note
    rt = backend.load_span(tiny_model_dirs["qwen3"], 0, 8)
    assert greedy_generate([rt], PROMPT, 4) == greedy_generate([ShardRuntime(tiny_model_dirs["qwen3"])], PROMPT, 4)


def test_unsupported_families_fail_clearly(tiny_model_dirs):
    with pytest.raises(NotImplementedError, match="qwen3_5"):
        mlx_span(tiny_model_dirs["qwen3_5"])


@pytest.mark.slow
def test_smollm2_greedy_equals_pytorch(smollm2_dir):
    # SmolLM2's rope_theta is 100,000: read the mlx-lm way (top level only) it would be 10,000 and drift.
    reference = greedy_generate([ShardRuntime(smollm2_dir, 0, 15), ShardRuntime(smollm2_dir, 15, 30)], PROMPT, 10)
    mixed = greedy_generate([ShardRuntime(smollm2_dir, 0, 15), mlx_span(smollm2_dir, 15, 30)], PROMPT, 10)
    assert mixed == reference

