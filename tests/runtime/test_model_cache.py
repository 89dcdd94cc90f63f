"""One model cache per machine: racing nodes convert once, a killed conversion is never trusted, and the
conversion's memory stays in a child process.

The racing and killing tests convert a tiny random Llama GGUF that carries SmolLM2's real tokenizer
(openhydra/testing/tiny_gguf.py): the same transformers GGUF path as the embedded model, in seconds rather
than minutes. The memory test converts the real embedded SmolLM2 GGUF.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from openhydra.runtime.model_cache import (
    COMPLETE_MARKER,
    ConversionError,
    cache_lock,
    is_complete,
    main,
    materialize_gguf,
    untrusted_because,
    verify,
)
from openhydra.runtime.source import embedded_gguf_path, embedded_target
from openhydra.testing import TEST_CACHE_ROOT
from openhydra.testing.processes import NodeProcess, free_port
from openhydra.testing.tiny_gguf import build_tiny_gguf

pytestmark = pytest.mark.slow  # each test starts converter processes (several seconds of imports each)

CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def tiny_gguf() -> Path:
    return build_tiny_gguf(TEST_CACHE_ROOT / "tiny-gguf" / "tiny-llama-2l.gguf", embedded_gguf_path())


def start_materializer(gguf: Path, target: Path, log_path: Path) -> subprocess.Popen:
    """A separate process materialising ``target``, as a node starting up would (its log in ``log_path``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "openhydra.runtime.model_cache", "--gguf", str(gguf), "--target", str(target)],
        stdout=subprocess.PIPE, stderr=log_path.open("w"), env=CHILD_ENV, text=True,
    )


def assert_valid_tiny_folder(folder: Path, gguf: Path) -> None:
    """The folder loads with transformers, and its weights are the GGUF's."""
    import gguf as gguf_lib
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert is_complete(folder)
    assert json.loads((folder / COMPLETE_MARKER).read_text())["from"] == str(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reader = gguf_lib.GGUFReader(gguf)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert torch.equal(model.get_input_embeddings().weight, torch.from_numpy(embedding.data.copy()))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_three_racing_processes_convert_once(tiny_gguf: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "models" / "tiny-llama"
    logs = [tmp_path / f"node{i}.log" for i in range(3)]
    # Hold the lock while the three start, so all three are certainly contending when it is released.
    with cache_lock(target, "holding the lock for the test"):
        procs = [start_materializer(tiny_gguf, target, log) for log in logs]
        wait_until(lambda: all("waiting for another process" in log.read_text() for log in logs), 120,
                   "all three processes to log that they wait for the lock")
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    texts = [log.read_text() for log in logs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], texts
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert sum(r["converted"] for r in results) == 1, results
    assert {r["path"] for r in results} == {str(target)}
    # Exactly one converter child ran (its own log line), and the two others reused its folder.
    assert sum(text.count(f"converting {tiny_gguf} into") for text in texts) == 1, texts
    assert sum("reusing" in text for text in texts) == 2, texts
    assert list(target.parent.glob("tiny-llama.partial*")) == []
    assert_valid_tiny_folder(target, tiny_gguf)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_conversion_is_not_trusted_and_the_next_start_converts(tiny_gguf: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "models" / "tiny-llama"
    proc = start_materializer(tiny_gguf, target, tmp_path / "killed.log")
    node = psutil.Process(proc.pid)
    # Midway: the converter child is running and has created its partial folder, but has not finished.
    converter = wait_until(lambda: any(target.parent.glob("tiny-llama.partial-*")) and node.children(), 120,
                           "the converter child and its partial folder")[0]
    proc.kill()  # the node dies (SIGKILL: no cleanup of its own runs)
    proc.wait(timeout=30)
    wait_until(lambda: _gone(converter), 60, "the orphaned converter to exit once its parent is gone")
    assert not target.exists()
    assert not is_complete(target)
    leftovers = list(target.parent.glob("tiny-llama.partial-*"))
    assert leftovers and not any(is_complete(p) for p in leftovers)
    # A folder at the target without the completion marker (as a non-atomic writer would leave) is not trusted.
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"half")
    assert not is_complete(target)

    result = materialize_gguf(tiny_gguf, target)
    assert result.converted
    assert list(target.parent.glob("tiny-llama.partial*")) == []
    assert_valid_tiny_folder(target, tiny_gguf)
    assert not materialize_gguf(tiny_gguf, target).converted  # and now it is reused as it is


def _tensor_range(folder: Path, name: str) -> tuple[int, int]:
    from openhydra.weights.manifest import read_manifest

    piece = next(p for f in read_manifest(folder).manifest.files for p in f.pieces if p.name == name)
    return piece.offset, piece.length


def test_a_damaged_folder_is_found_named_and_converted_again(tiny_gguf: Path, tmp_path: Path, capsys) -> None:
    """A flipped byte is found by --verify, which names the tensor; a truncated file is found at the next start
    (sizes against the manifest) and converted again; --verify --repair converts a folder with a flipped byte."""
    target = tmp_path / "cache" / "models" / "tiny-llama"
    assert materialize_gguf(tiny_gguf, target).converted
    weights = target / "model.safetensors"
    assert verify(target, progress=False) == []
    offset, length = _tensor_range(target, "model.layers.1.mlp.down_proj.weight")
    with open(weights, "r+b") as f:  # one flipped bit inside a tensor: the size is unchanged
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x01]))
    assert is_complete(target)  # sizes alone cannot see it
    damaged = verify(target, progress=False)
    assert len(damaged) == 1 and "model.layers.1.mlp.down_proj.weight" in damaged[0], damaged

    assert main(["--gguf", str(tiny_gguf), "--target", str(target), "--verify"]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["intact"] is False and report["damaged_count"] == 1
    assert main(["--gguf", str(tiny_gguf), "--target", str(target), "--verify", "--repair"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["repaired"] is True
    assert verify(target, progress=False) == []

    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # an interrupted copy or a full disk
        f.truncate(size // 2)
    reason = untrusted_because(target)
    assert reason is not None and "model.safetensors" in reason and f"{size:,}" in reason, reason
    assert not is_complete(target)
    result = materialize_gguf(tiny_gguf, target)
    assert result.converted  # the next start converts it again instead of loading half a file
    assert verify(target, progress=False) == []
    assert_valid_tiny_folder(target, tiny_gguf)

    (target / "config.json").unlink()
    assert untrusted_because(target) == "it has no config.json or no weights"
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(SystemExit, match="was converted from"):  # never another file's conversion in its place
        main(["--gguf", str(other), "--target", str(target), "--verify", "--repair"])
    (target / COMPLETE_MARKER).unlink()  # not this cache's conversion (a hub download, a folder of one's own)
    with pytest.raises(SystemExit, match="no completion marker naming the GGUF"):
        main(["--target", str(target), "--verify", "--repair"])
    assert (target / "model.safetensors").exists()  # nothing was deleted


def test_failed_conversion_raises_and_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    target = tmp_path / "cache" / "models" / "broken"
    with pytest.raises(ConversionError, match="exited with"):
        materialize_gguf(bad, target)
    assert not target.exists()
    assert list(target.parent.glob("broken.partial*")) == []
    with cache_lock(target, "checking the lock was released") as waited_s:
        assert waited_s < 1.0


def test_conversion_memory_stays_out_of_the_serving_process(smollm2_dir: Path, tmp_path: Path) -> None:
    """Real embedded SmolLM2: the parent's RSS does not grow by the converted model."""
    from safetensors import safe_open

    me = psutil.Process()
    gc.collect()
    rss_before = me.memory_info().rss
    started = time.monotonic()
    result = materialize_gguf(embedded_gguf_path(), embedded_target(tmp_path))
    elapsed = time.monotonic() - started
    rss_after = me.memory_info().rss
    weights = result.path / "model.safetensors"
    size = weights.stat().st_size
    delta = rss_after - rss_before
    print(f"\nconverted embedded SmolLM2 in {elapsed:.1f} s (child {result.convert_s:.1f} s); parent RSS "
          f"{rss_before / 1e6:.0f} -> {rss_after / 1e6:.0f} MB (delta {delta / 1e6:+.1f} MB); converter child peak "
          f"RSS {result.child_peak_rss_bytes / 1e6:.0f} MB; model.safetensors {size / 1e6:.0f} MB")
    assert result.converted
    assert delta < size / 20, f"parent RSS grew by {delta / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
    assert result.child_peak_rss_bytes > size  # the model was held, by the child
    # The same weights as the session's SmolLM2 folder (converted by the same code path).
    with safe_open(weights, framework="pt") as fresh, safe_open(smollm2_dir / "model.safetensors",
                                                                framework="pt") as cached:
        names = set(fresh.keys())
        assert names == set(cached.keys())
        for name in sorted(names):
            assert torch.equal(fresh.get_tensor(name), cached.get_tensor(name)), name


def test_three_nodes_started_together_convert_once(tmp_path: Path) -> None:
    """The README's case: three real nodes on one machine, each with its own data_dir, one shared model cache.

    One converts the embedded SmolLM2 (in a child process), the other two wait and reuse its folder, and the
    node that converted holds no more memory than the ones that did not (it held ~240 MB more when the
    conversion ran inside the node).
    """
    cache = tmp_path / "cache"
    nodes = [NodeProcess(["model=smollm2-135m", "hardware=cpu", "hardware.dtype=float32", "shard=full",
                          f"node.data_dir={tmp_path / f'node{i}'}", f"peer.port={free_port()}"],
                         log_path=tmp_path / f"node{i}.log", env={"OPENHYDRA_CACHE": str(cache)})
             for i in range(3)]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready(timeout_s=900)
        texts = [node.log_text() for node in nodes]
        converters = [i for i, text in enumerate(texts) if "in a child process (once per machine" in text]
        assert len(converters) == 1, texts
        assert sum(text.count("openhydra.runtime.convert_gguf: converting") for text in texts) == 1
        others = [i for i in range(3) if i not in converters]
        assert all("reusing" in texts[i] for i in others), [texts[i] for i in others]
        assert is_complete(embedded_target(cache))
        rss = [psutil.Process(node.proc.pid).memory_info().rss for node in nodes]
        extra = rss[converters[0]] - max(rss[i] for i in others)
        print(f"\nnode RSS after ready: {[f'{r / 1e6:.0f} MB' for r in rss]} (node {converters[0]} converted; "
              f"it holds {extra / 1e6:+.0f} MB more than the largest of the others); cache marker: "
              f"{(embedded_target(cache) / COMPLETE_MARKER).read_text()}")
        assert extra < 100e6, f"the converting node holds {extra / 1e6:.0f} MB more than the others"
    finally:
        for node in nodes:
            node.stop()


def test_conversion_is_independent_of_the_transformers_release_and_older_caches_catch_up(
        tiny_gguf: Path, tmp_path: Path) -> None:
    """The configs carry no ``transformers_version`` (the one byte that changed between releases, so the catalog's
    manifest pin held on one release only). A folder converted before that is brought to the same bytes on its next
    use: stamps dropped, manifest and marker recomputed, once."""
    from openhydra.runtime.model_cache import is_stamped
    from openhydra.weights.manifest import ensure_manifest

    target = tmp_path / "cache" / "models" / "tiny-llama"
    fresh = materialize_gguf(tiny_gguf, target)
    assert fresh.converted and not is_stamped(target)
    for name in ("config.json", "generation_config.json"):
        assert "transformers_version" not in json.loads((target / name).read_text())
    pinned = ensure_manifest(target).content_hash
    assert json.loads((target / "openhydra-source.json").read_text())["manifest"] == pinned
    # An older conversion: the stamp as transformers writes it, and the manifest computed over it.
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "transformers_version": "5.24.0"}, indent=2))
    (target / "openhydra-manifest.json").unlink()
    stale = ensure_manifest(target).content_hash
    marker = json.loads((target / "openhydra-source.json").read_text())
    (target / "openhydra-source.json").write_text(json.dumps({**marker, "manifest": stale}))
    assert stale != pinned and is_stamped(target)
    again = materialize_gguf(tiny_gguf, target)
    assert not again.converted and not is_stamped(target)
    assert ensure_manifest(target).content_hash == pinned
    assert json.loads((target / "openhydra-source.json").read_text())["manifest"] == pinned
    mtime = (target / "config.json").stat().st_mtime_ns
    assert not materialize_gguf(tiny_gguf, target).converted  # up to date: nothing rewritten
    assert (target / "config.json").stat().st_mtime_ns == mtime
