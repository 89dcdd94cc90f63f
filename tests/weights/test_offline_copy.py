"""A catalog model downloaded earlier is served while the hub cannot be reached (a laptop on a plane, an air-gapped
box): the copy in the model cache's hub folder, if whole. Before, an unreachable hub meant the fallback model even
with the weights on disk, and auto-promotion counted such a model as unobtainable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openhydra.catalog import load_catalog, resolve_model
from openhydra.config.schema import ModelConfig
from openhydra.hardware.auto import _obtainable
from openhydra.runtime.source import downloaded_snapshot

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub probe answers 'unreachable' at once


def downloaded(cache_root: Path, hf_id: str, source: Path, commit: str = COMMIT) -> Path:
    """``source``'s files laid out as huggingface_hub's snapshot_download leaves them under ``<cache>/hub``: files in
    ``snapshots/<commit>`` linked to ``blobs/``, ``refs/main`` naming the commit, and the repository's listing in
    ``trees/`` (which names files fetch_from_hub does not download, such as README.md)."""
    repo = cache_root / "hub" / ("models--" + hf_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{commit[:8]}-{i}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{commit}.json").write_text(json.dumps(
        [{"path": f.name, "type": "file"} for f in source.iterdir()] + [{"path": "README.md", "type": "file"}]))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_a_whole_copy_is_served_offline_and_an_incomplete_one_is_named(tmp_path, tiny_model_dirs) -> None:
    model = ModelConfig(name="big", hf_id="example/big", tier="standard", fallback=["smollm2-135m"])
    assert downloaded_snapshot("example/big", tmp_path) == (None, "no copy downloaded earlier")
    snapshot = downloaded(tmp_path, "example/big", tiny_model_dirs["llama"])
    choice = resolve_model(model, tmp_path)
    assert choice.path == snapshot and choice.api_name == "big" and choice.degradation_reason is None
    assert "the copy downloaded earlier" in choice.source

    os.unlink(os.path.realpath(snapshot / "model.safetensors"))  # an interrupted download: a link to no blob
    folder, why = downloaded_snapshot("example/big", tmp_path)
    assert folder is None and why == f"the copy downloaded earlier is incomplete ({snapshot} has no model.safetensors)"
    choice = resolve_model(model, tmp_path)  # the fallback, saying why
    assert choice.degradation_reason is not None and f"{snapshot} has no model.safetensors" in (
        choice.degradation_reason)


def test_a_copy_without_its_tokenizer_is_incomplete(tmp_path, tiny_model_dirs) -> None:
    snapshot = downloaded(tmp_path, "example/big", tiny_model_dirs["llama"])
    (snapshot / "tokenizer.json").unlink()
    assert downloaded_snapshot("example/big", tmp_path)[1].endswith(f"{snapshot} has no tokenizer.json)")


def test_an_interrupted_update_leaves_the_earlier_whole_copy_in_service(tmp_path, tiny_model_dirs) -> None:
    """huggingface_hub moves refs/main to the new commit before the new files arrive."""
    older = downloaded(tmp_path, "example/big", tiny_model_dirs["llama"], commit="a" * 40)
    newer = downloaded(tmp_path, "example/big", tiny_model_dirs["llama"], commit="b" * 40)
    os.unlink(os.path.realpath(newer / "model.safetensors"))
    assert (tmp_path / "hub" / "models--example--big" / "refs" / "main").read_text() == "b" * 40
    assert downloaded_snapshot("example/big", tmp_path) == (older, "")


def test_a_sharded_copy_needs_every_file_its_index_names(tmp_path, tiny_model_dirs) -> None:
    snapshot = downloaded(tmp_path, "example/sharded", tiny_model_dirs["llama"])
    (snapshot / "model.safetensors").rename(snapshot / "model-00001-of-00002.safetensors")  # the link, renamed
    (snapshot / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    folder, why = downloaded_snapshot("example/sharded", tmp_path)
    assert folder is None and why.endswith("has no model-00002-of-00002.safetensors)")


def test_promotion_counts_a_copy_on_disk_as_obtainable(tmp_path, tiny_model_dirs) -> None:
    entry = load_catalog()["qwen2b"]
    model_id = entry.name
    assert not _obtainable(model_id, {}, 0.1, entry.hf_id, tmp_path)
    downloaded(tmp_path, entry.hf_id, tiny_model_dirs["qwen3_5"])
    assert _obtainable(model_id, {}, 0.1, entry.hf_id, tmp_path)


@pytest.mark.slow
def test_an_offline_node_serves_the_catalog_model_it_downloaded_before(tmp_path, tiny_model_dirs) -> None:
    """The real node, `model=qwen0.8b` (Qwen/Qwen3.5-0.8B), offline, with a (tiny, same-architecture) copy in its
    model cache: it loads that copy, not the embedded fallback."""
    downloaded(tmp_path / "cache", load_catalog()["qwen0.8b"].hf_id, tiny_model_dirs["qwen3_5"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENHYDRA_CACHE": str(tmp_path / "cache"),
           "OPENHYDRA_HOME": str(tmp_path / "home"), "OPENHYDRA_CONFIG_DIR": str(tmp_path / "config"),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "openhydra.cli", "model=qwen0.8b", "hardware=cpu", "action=check"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "check ok: model=openhydra-qwen3.5-0.8b" in out.stdout, out.stdout[-3000:]
    assert "the copy downloaded earlier" in out.stdout + out.stderr
    assert "degraded" not in out.stdout + out.stderr
