"""Lean peers (issue 17 item 4): a peer holds its span's weights as views of the mapped checkpoint, no out-of-span
tensors, no private copy of the embedding table for coordinator-side embedding, and skips imports it never uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openhydra.peer.embedding import load_embedder
from openhydra.runtime.residency import smaps_breakdown, tensor_residency
from openhydra.runtime.shard import ShardRuntime
from openhydra.runtime.weights import CheckpointIndex


def _layer_bytes(model_dir: Path, start: int, end: int) -> int:
    index = CheckpointIndex.open(model_dir)
    names = [n for i in range(start, end) for n in index.layer_tensor_names(i).values()]
    return index.tensor_bytes(names)


def test_middle_span_holds_only_its_layers_mapped(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["llama"]
    rt = ShardRuntime(model_dir, 2, 5, dtype=torch.float32)
    assert rt.modules.embed_tokens is None and rt.modules.lm_head is None and rt.modules.norm is None
    held = tensor_residency(rt.modules)
    # Exactly layers [2,5), all views of the mapped checkpoint; private: only rotary inv_freq (computed).
    assert held.mapped_bytes == _layer_bytes(model_dir, 2, 5)
    assert held.private_bytes < 4096
    assert [Path(f).name for f in held.mapped_files] == ["model.safetensors"]


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_a_quantized_span_keeps_no_view_of_the_checkpoint(tiny_model_dirs: dict[str, Path], quantization: str) -> None:
    """Quantizing reads every weight of the span, so the checkpoint's mapping has all its pages resident; one view
    left in the span (a norm vector) kept the whole mapping, and those pages, alive (SmolLM2 cpu_int4: 627 MiB of
    RSS for 92 MiB of weights). Every tensor of a quantized span is its own memory (runtime/shard_layers.py
    ``own_copies``), and still computes what the views did."""
    model_dir = tiny_model_dirs["llama"]
    rt = ShardRuntime(model_dir, dtype=torch.float32, quantization=quantization)
    held = tensor_residency(rt.modules)
    assert held.mapped_bytes == 0 and held.mapped_files == [], held
    assert held.private_bytes > 0
    plain = ShardRuntime(model_dir, dtype=torch.float32)  # an unquantized span keeps its views: shared pages
    assert tensor_residency(plain.modules).private_bytes < 4096
    norms = [(name, p) for name, p in rt.modules.named_parameters() if "norm" in name]
    assert norms
    for name, param in norms:
        assert torch.equal(param, plain.modules.get_parameter(name)), name


def test_own_copies_copies_small_leftovers_and_keeps_large_views() -> None:
    """The rule of ``own_copies`` on a stand-in span whose "file" tensors are known by identity: after quantizing
    freed most view bytes, small leftovers are copied (the mapping can go); leftovers that are a large share stay
    views (a private copy would cost more than the mapping's pages). A tied Parameter is copied once and stays
    tied."""
    from torch import nn

    from openhydra.runtime.shard_layers import FileViews, own_copies

    def span(big_norm: bool) -> tuple[nn.Module, FileViews]:
        root = nn.Module()
        root.norm = nn.Parameter(torch.ones(1000 if big_norm else 10))
        root.head = nn.Module()
        root.head.weight = root.norm  # tied
        root.linear = nn.Parameter(torch.ones(1000))  # stands for a weight quantizing replaces
        root.computed = nn.Parameter(torch.ones(5))  # not from the file
        views = FileViews.of(root, {root.norm.data_ptr(), root.linear.data_ptr()})
        del root.linear  # "quantized": its view is gone
        return root, views

    root, views = span(big_norm=False)
    before = root.norm.data_ptr()
    assert own_copies(root, views) == 1
    assert root.norm.data_ptr() != before and root.head.weight is root.norm
    root, views = span(big_norm=True)  # 1000 elements left against 1000 freed: over COPY_AT_MOST (1/8)
    before = root.norm.data_ptr()
    assert own_copies(root, views) == 0 and root.norm.data_ptr() == before


def test_coordinator_embedding_table_is_mapped_in_any_dtype(tiny_model_dirs: dict[str, Path]) -> None:
    model_dir = tiny_model_dirs["llama"]
    index = CheckpointIndex.open(model_dir)
    stored = index.read_as_stored(index.source_name("embed_tokens.weight"))
    ids = torch.tensor([0, 5, 17, stored.shape[0] - 1, 5])
    for dtype in (torch.float32, torch.bfloat16):
        embed = load_embedder(model_dir, dtype)
        table = getattr(embed, "table", None)
        if table is None:  # an embedder that is a closure over its table
            table = next(c.cell_contents for c in embed.__closure__ if isinstance(c.cell_contents, torch.Tensor))
        held = tensor_residency([table])
        assert held.private_bytes == 0, f"{dtype}: the coordinator copied the embedding table"
        assert held.mapped_bytes == stored.numel() * stored.element_size()
        out = embed(ids)
        assert out.dtype == dtype
        # Bit for bit what a table cast to ``dtype`` first gives (the first shard's own embedding).
        assert torch.equal(out, torch.nn.functional.embedding(ids, stored.to(dtype)))


def test_weight_pages_counted_as_weights() -> None:
    parts = smaps_breakdown()
    assert parts["total"].rss >= parts["anonymous"].rss + parts["libraries"].rss + parts["weights"].rss
    assert parts["libraries"].rss > 0 and parts["anonymous"].uss > 0


_NODE_IMPORTS = """
import json, sys
from openhydra.runtime.lean_imports import skip_unused_optional_imports
changed = skip_unused_optional_imports()
import torch
from openhydra.runtime.shard import ShardRuntime
rt = ShardRuntime(sys.argv[1], 0, 2, dtype=torch.float32)
rt.forward("s", torch.arange(3), input_ids=torch.tensor([1, 2, 3]))
print(json.dumps({"changed": changed, "scipy": "scipy" in sys.modules}))
"""


def test_node_process_does_not_import_scipy(tiny_model_dirs: dict[str, Path]) -> None:
    """What ``openhydra-node`` does first (cli.run): transformers' loss functions no longer pull SciPy in."""
    out = subprocess.run([sys.executable, "-c", _NODE_IMPORTS, str(tiny_model_dirs["llama"])], capture_output=True,
                         text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"changed": ["is_scipy_available"], "scipy": False}


def test_openhydra_node_process_does_not_import_scipy(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A real ``openhydra-node action=check`` (fresh interpreter, not the test fork server, whose preloaded modeling
    code would hide an import made too early): its import log lists no SciPy module, and it still generates."""
    from openhydra.testing import TEST_CACHE_ROOT

    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPROFILEIMPORTTIME": "1",
           "OPENHYDRA_CACHE": str(TEST_CACHE_ROOT), "OPENHYDRA_CONFIG_DIR": str(tmp_path / "config"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-m", "openhydra.cli", "action=check", "model=local",
         f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", f"node.data_dir={tmp_path / 'data'}",
         "api.port=0", "privacy.pow_difficulty_bits=0"],
        capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0 and "check ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert {"torch", "transformers", "openhydra.build"} <= set(imported)  # the log covers the node's imports
    assert not [m for m in imported if m == "scipy" or m.startswith("scipy.")]
