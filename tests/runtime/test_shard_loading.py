"""Loading only a span's tensors: sharded checkpoints, Qwen3.5 layout, and the bytes a shard holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openhydra.runtime.local_pipeline import greedy_generate
from openhydra.runtime.shard import ShardRuntime
from openhydra.runtime.weights import CheckpointError, CheckpointIndex


def _as_qwen35_release(src: Path, dst: Path, drop_head: bool = False) -> Path:
    """Rewrite a tiny qwen3_5_text checkpoint the way real Qwen3.5 releases are laid out.

    Composite ``qwen3_5`` config with a ``text_config``, text weights under ``model.language_model.``,
    extra ``model.visual.*``/``mtp.*`` tensors, weights split over two files plus an index. The
    visual/mtp tensors are listed in a file that does not exist: opening it would fail the load.
    """
    dst.mkdir(parents=True, exist_ok=True)
    text = json.loads((src / "config.json").read_text())
    text["model_type"] = "qwen3_5_text"
    (dst / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen3_5",
                "architectures": ["Qwen3_5ForConditionalGeneration"],
                "text_config": text,
                "tie_word_embeddings": False,
            }
        )
    )
    with safe_open(src / "model.safetensors", framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    renamed = {
        (name if name == "lm_head.weight" else name.replace("model.", "model.language_model.", 1)): t
        for name, t in tensors.items()
        if not (drop_head and name == "lm_head.weight")
    }
    first = {k: v for k, v in renamed.items() if ".layers." in k and int(k.split(".layers.")[1].split(".")[0]) < 4}
    second = {k: v for k, v in renamed.items() if k not in first}
    save_file(first, dst / "model-00001-of-00002.safetensors")
    save_file(second, dst / "model-00002-of-00002.safetensors")
    weight_map = dict.fromkeys(first, "model-00001-of-00002.safetensors")
    weight_map.update(dict.fromkeys(second, "model-00002-of-00002.safetensors"))
    weight_map.update(
        {
            "model.visual.blocks.0.attn.qkv.weight": "missing-visual.safetensors",
            "mtp.fc.weight": "missing-visual.safetensors",
        }
    )
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / extra, dst / extra)
    return dst


def test_qwen35_release_layout_matches_flat_checkpoint(tiny_model_dirs, tmp_path: Path) -> None:
    flat = tiny_model_dirs["qwen3_5"]
    release = _as_qwen35_release(flat, tmp_path / "qwen35-release")
    index = CheckpointIndex.open(release)
    assert index.text_prefix == "model.language_model."

    prompt = torch.randint(3, 4000, (11,), generator=torch.Generator().manual_seed(4))
    splits = [(0, 2), (2, 5), (5, 8)]
    expected = greedy_generate([ShardRuntime(flat, a, b) for a, b in splits], prompt, 12)
    spans = [ShardRuntime(release, a, b) for a, b in splits]
    assert spans[0].model_type == "qwen3_5_text" and spans[0].num_layers == 8
    assert greedy_generate(spans, prompt, 12) == expected


def test_release_without_head_ties_it_to_the_embeddings(tiny_model_dirs, tmp_path: Path) -> None:
    release = _as_qwen35_release(tiny_model_dirs["qwen3_5"], tmp_path / "headless", drop_head=True)
    last = ShardRuntime(release, 5, 8)
    with safe_open(tiny_model_dirs["qwen3_5"] / "model.safetensors", framework="pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(last.modules.lm_head.weight, embed)
    assert last.forward("s", torch.arange(2), hidden_states=torch.randn(2, 64)).shape == (1, embed.shape[0])


def test_missing_tensor_is_a_clear_error(tiny_model_dirs, tmp_path: Path) -> None:
    src = tiny_model_dirs["qwen3"]
    dst = tmp_path / "broken"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    with safe_open(src / "model.safetensors", framework="pt") as f:
        kept = {n: f.get_tensor(n) for n in f.keys() if "layers.6.mlp" not in n}  # noqa: SIM118
    save_file(kept, dst / "model.safetensors")
    ShardRuntime(dst, 0, 6)  # the span that does not need layer 6 loads fine
    with pytest.raises(CheckpointError, match=r"layers\.6\.mlp"):
        ShardRuntime(dst, 6, 8)


def test_a_truncated_checkpoint_is_a_clear_error(tiny_model_dirs, tmp_path: Path) -> None:
    """A half-written model.safetensors (an interrupted copy, a full disk) names the file and what to do, as a
    CheckpointError the node logs in one line, instead of the library's bare deserialisation error."""
    src = tiny_model_dirs["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors .* is damaged") as info:
        CheckpointIndex.open(broken)
    assert str(broken) in str(info.value) and "intact copy" in str(info.value)
    (broken / "model.safetensors").unlink()
    index_file = broken / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"weight_map": {"model.layers.0.x": "part-1.safetensors"}}))
    index = CheckpointIndex.open(broken)
    with pytest.raises(CheckpointError, match=r"part-1\.safetensors is missing"):
        index.read_as_stored("model.layers.0.x")


@pytest.mark.slow
def test_a_third_of_smollm2_holds_a_third_of_the_layer_bytes(smollm2_dir: Path) -> None:
    index = CheckpointIndex.open(smollm2_dir)
    full_bytes = index.tensor_bytes(index.weight_map)  # fp32 on disk
    embed_bytes = index.tensor_bytes(["model.embed_tokens.weight"])
    layer_bytes = full_bytes - embed_bytes - index.tensor_bytes(["model.norm.weight"])

    spans = [ShardRuntime(smollm2_dir, a, b) for a, b in [(0, 10), (10, 20), (20, 30)]]
    middle = spans[1]
    expected_middle = index.tensor_bytes(n for layer in range(10, 20) for n in index.layer_tensor_names(layer).values())
    assert middle.loaded_bytes == expected_middle
    assert abs(middle.loaded_bytes / layer_bytes - 1 / 3) < 0.01
    assert middle.loaded_bytes < 0.3 * full_bytes
    # First holds embeddings, last holds norm + the (tied) head: the embeddings are counted twice overall.
    assert sum(rt.loaded_bytes for rt in spans) == full_bytes + embed_bytes
    whole = ShardRuntime(smollm2_dir)
    assert whole.loaded_bytes == full_bytes  # tied head shares the embedding tensor
    assert whole.modules.lm_head.weight is whole.modules.embed_tokens.weight


@pytest.mark.slow
def test_bf16_shard_halves_the_bytes(smollm2_dir: Path) -> None:
    fp32 = ShardRuntime(smollm2_dir, 10, 20)
    bf16 = ShardRuntime(smollm2_dir, 10, 20, dtype=torch.bfloat16)
    assert bf16.loaded_bytes * 2 == fp32.loaded_bytes
    assert all(p.dtype == torch.bfloat16 for p in bf16.modules.parameters())
