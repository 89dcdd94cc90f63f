"""Weights cast once into the model cache and mapped (runtime/cast_store.py): the same bits as a cast in memory, one
file per span and dtype, found, reused, replaced when damaged or stale, and never a reason for a load to fail."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openhydra.runtime import cast_store
from openhydra.runtime.residency import TensorResidency, tensor_residency
from openhydra.runtime.shard import ShardRuntime
from openhydra.testing.processes import NodeProcess, start_all
from openhydra.testing.tiny import FAMILIES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def casts(tmp_path: Path):
    root = tmp_path / "casts"
    cast_store.configure(root)
    yield root
    cast_store.configure(None)


def _load(model_dir: Path, span: tuple[int, int | None], dtype: torch.dtype, root: Path | None,
          **kwargs) -> ShardRuntime:
    previous = cast_store.current()
    cast_store.configure(root)
    try:
        return ShardRuntime(model_dir, span[0], span[1], dtype=dtype, **kwargs)
    finally:
        cast_store.configure(previous)


def _assert_same_bits(a: ShardRuntime, b: ShardRuntime) -> None:
    sa, sb = a.modules.state_dict(), b.modules.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def _cast_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors")) if root.exists() else []


def _parameters_mapped_from(rt: ShardRuntime, root: Path) -> tuple[TensorResidency, list[str]]:
    """Where the span's parameters live, and the files under ``root`` they are views of."""
    held = tensor_residency(list(rt.modules.parameters()))
    return held, [f for f in held.mapped_files if f.startswith(str(root))]


def _logits(rt: ShardRuntime, session: str) -> torch.Tensor:
    """A 12-position step's output: from token ids on a first span, from fixed hidden states elsewhere."""
    if rt.is_first:
        out = rt.forward(session, torch.arange(12), input_ids=torch.arange(40, 52))
    else:
        hidden = torch.randn(12, rt.hidden_size, generator=torch.Generator().manual_seed(0)).to(rt.dtype)
        out = rt.forward(session, torch.arange(12), hidden_states=hidden)
    rt.close_session(session)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("span", [(0, 8), (0, 3), (3, 6), (6, 8)])
def test_a_span_read_from_its_cast_file_holds_the_same_bits_mapped(tiny_model_dirs, casts, family, span):
    model_dir = tiny_model_dirs[family]
    in_memory = _load(model_dir, span, torch.bfloat16, None)
    kept = _load(model_dir, span, torch.bfloat16, casts)
    _assert_same_bits(kept, in_memory)
    assert torch.equal(_logits(kept, "a"), _logits(in_memory, "b"))
    # every parameter cast to bf16 is a view of the cast file; those the model keeps in fp32 stay views of the
    # checkpoint (stored fp32, no cast); none is a private copy
    held, files = _parameters_mapped_from(kept, casts)
    assert held.private_bytes == 0, held
    assert len(files) == 1, held.mapped_files
    assert tensor_residency(list(in_memory.modules.parameters())).private_bytes > 0
    with safe_open(files[0], framework="pt") as f:
        record = json.loads(f.metadata()[cast_store.STAMP_KEY])
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}  # noqa: SIM118
    assert record["dtype"] == "bfloat16" and record["source"] == str((model_dir / "model.safetensors").resolve())


def test_a_bf16_checkpoint_served_in_fp32_is_cast_up_once(tiny_model_dirs, casts, tmp_path):
    src = tiny_model_dirs["llama"]
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(src, bf16_dir)
    with safe_open(src / "model.safetensors", framework="pt") as f:
        save_file({n: f.get_tensor(n).to(torch.bfloat16) for n in f.keys()}, bf16_dir / "model.safetensors")  # noqa: SIM118
    in_memory = _load(bf16_dir, (2, 8), torch.float32, None)
    kept = _load(bf16_dir, (2, 8), torch.float32, casts)
    _assert_same_bits(kept, in_memory)
    assert {p.dtype for p in kept.modules.parameters()} == {torch.float32}
    held, files = _parameters_mapped_from(kept, casts)
    assert held.private_bytes == 0 and len(files) == 1


def test_the_second_load_maps_the_file_the_first_wrote(tiny_model_dirs, casts):
    model_dir = tiny_model_dirs["qwen3"]
    first = _load(model_dir, (0, 4), torch.bfloat16, casts)
    [written] = _cast_files(casts)
    stamp = written.stat().st_mtime_ns
    second = _load(model_dir, (0, 4), torch.bfloat16, casts)
    assert _cast_files(casts) == [written] and written.stat().st_mtime_ns == stamp  # nothing written again
    _assert_same_bits(first, second)
    assert _parameters_mapped_from(second, casts)[1] == [str(written)]
    other_span = _load(model_dir, (4, 8), torch.bfloat16, casts)  # another span: a file of its own
    assert len(_cast_files(casts)) == 2
    assert _parameters_mapped_from(other_span, casts)[1] != [str(written)]


def test_a_damaged_cast_file_is_written_again(tiny_model_dirs, casts, caplog):
    model_dir = tiny_model_dirs["llama"]
    reference = _load(model_dir, (0, 8), torch.bfloat16, None)
    _load(model_dir, (0, 8), torch.bfloat16, casts)
    [written] = _cast_files(casts)
    for damage in ("truncate", "replace"):
        if damage == "truncate":
            with open(written, "r+b") as f:
                f.truncate(written.stat().st_size // 2)
        else:  # a valid safetensors file that is not this cast (another tool wrote there)
            save_file({"x": torch.zeros(3)}, written)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="openhydra.runtime.cast_store"):
            again = _load(model_dir, (0, 8), torch.bfloat16, casts)
        assert "is not used" in caplog.text and "writing it again" in caplog.text, damage
        _assert_same_bits(again, reference)
        assert _parameters_mapped_from(again, casts)[0].private_bytes == 0
        assert _cast_files(casts) == [written]


def test_a_changed_source_gets_a_new_cast_and_the_old_one_goes(tiny_model_dirs, casts, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    _load(model_dir, (0, 8), torch.bfloat16, casts)
    [old] = _cast_files(casts)
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        tensors = {n: f.get_tensor(n).clone() for n in f.keys()}  # noqa: SIM118
    name = next(n for n in tensors if n.endswith("layers.0.mlp.up_proj.weight"))
    tensors[name] *= 2
    save_file(tensors, model_dir / "model.safetensors")  # a new conversion or download of the folder
    kept = _load(model_dir, (0, 8), torch.bfloat16, casts)
    reference = _load(model_dir, (0, 8), torch.bfloat16, None)
    _assert_same_bits(kept, reference)  # the new weights, not the old cast
    [new] = _cast_files(casts)
    assert new != old and not old.exists()


def test_without_disk_space_or_a_writable_cache_the_load_casts_in_memory(tiny_model_dirs, tmp_path, monkeypatch,
                                                                          caplog):
    model_dir = tiny_model_dirs["llama"]
    reference = _load(model_dir, (0, 8), torch.bfloat16, None)
    full = tmp_path / "full"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(cast_store.shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=cast_store.MIN_FREE_BYTES // 2))
    with caplog.at_level(logging.WARNING, logger="openhydra.runtime.cast_store"):
        kept = _load(model_dir, (0, 8), torch.bfloat16, full)
    assert "not keeping a bfloat16 copy" in caplog.text and "casting in memory" in caplog.text
    assert _cast_files(full) == []
    _assert_same_bits(kept, reference)
    monkeypatch.undo()

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openhydra.runtime.cast_store"):
        kept = _load(model_dir, (0, 8), torch.bfloat16, not_a_folder / "casts")
    assert "could not use cast file" in caplog.text
    _assert_same_bits(kept, reference)


def test_quantized_and_library_spans_write_no_cast_file(tiny_model_dirs, casts):
    model_dir = tiny_model_dirs["llama"]
    _load(model_dir, (0, 8), torch.float32, casts, quantization="int8")
    _load(model_dir, (0, 8), torch.bfloat16, casts, matmul="library")
    _load(model_dir, (0, 8), torch.float32, casts)  # the checkpoint's own dtype: nothing to cast
    assert _cast_files(casts) == []


def _doubled(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        return {n: f.get_tensor(n).clone() * 2 for n in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("when", ["after the stamp", "after the open", "while casting"])
def test_a_source_replaced_while_it_loads_is_never_kept_under_the_new_files_stamp(tiny_model_dirs, casts, tmp_path,
                                                                                    monkeypatch, when):
    """A new conversion renamed into place between the load's stamp and its open, after its open, or while the cast
    is written: the cast holds the file the load read; kept, it would serve those weights for the new file."""
    from openhydra.runtime import weights

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    source = model_dir / "model.safetensors"
    doubled = _doubled(model_dir)

    def replace() -> None:
        save_file(doubled, model_dir / "next.safetensors")
        (model_dir / "next.safetensors").replace(source)

    real_open, real_stamp = weights.open_safetensors, weights._stamp_before_opening
    replaced, armed = [], []

    def stamp_then_replace(path):
        stamp = real_stamp(path)
        if Path(path).parent == model_dir and not replaced:  # never the shared test model
            if when == "after the stamp":
                replace()
                replaced.append(path)
            armed.append(path)  # the next open is the read's
        return stamp

    @contextmanager
    def open_then_replace(path):
        with real_open(path) as handle:
            if when == "after the open" and armed and not replaced:
                replace()
                replaced.append(path)
            yield handle

    monkeypatch.setattr(weights, "_stamp_before_opening", stamp_then_replace)
    monkeypatch.setattr(weights, "open_safetensors", open_then_replace)
    if when == "while casting":
        import safetensors.torch as st

        real = st.save_file

        def save_then_replace(*args, **kwargs):
            real(*args, **kwargs)
            if not replaced:
                replace()
                replaced.append(args[1])

        monkeypatch.setattr(st, "save_file", save_then_replace)
    _load(model_dir, (0, 8), torch.bfloat16, casts)
    assert replaced
    monkeypatch.undo()
    kept = _load(model_dir, (0, 8), torch.bfloat16, casts)  # a later load of the new file
    _assert_same_bits(kept, _load(model_dir, (0, 8), torch.bfloat16, None))
    assert all(t.abs().sum() > 0 for t in doubled.values())


def test_a_source_removed_while_it_is_read_is_read_from_its_open_mapping(tiny_model_dirs, casts, tmp_path,
                                                                          monkeypatch, caplog):
    from openhydra.runtime import weights

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    index = weights.CheckpointIndex.open(model_dir)
    name = "model.layers.0.mlp.up_proj.weight"
    real_open = weights.open_safetensors

    @contextmanager
    def open_then_unlink(path):
        with real_open(path) as handle:
            Path(path).unlink()  # a repair clearing the folder: the open mapping still reads
            yield handle

    monkeypatch.setattr(weights, "open_safetensors", open_then_unlink)
    with caplog.at_level(logging.WARNING, logger="openhydra.runtime.cast_store"):
        got = index.read({"w": name}, {"w": torch.bfloat16}, keep_casts=True)["w"]
    assert not (model_dir / "model.safetensors").exists()
    with safe_open(tiny_model_dirs["llama"] / "model.safetensors", framework="pt") as f:
        assert torch.equal(got, f.get_tensor(name).to(torch.bfloat16))
    assert "casting in memory" in caplog.text and _cast_files(casts) == []


def test_leftovers_and_foreign_files_are_cleared_under_locks_never_by_pid(tiny_model_dirs, casts, tmp_path):
    """A writer killed in another PID namespace (pid 1 there, alive here) leaves a span-sized partial; a file whose
    stamp is JSON but not an object, or one that is not a cast at all, sits in the folder; old versions leave lock
    files. None of it stops the cast, and what nobody holds goes."""
    from openhydra.runtime.model_cache import cache_lock, lock_path_for

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    _load(model_dir, (0, 8), torch.bfloat16, casts)
    [first] = _cast_files(casts)
    folder = first.parent
    (folder / (first.name + ".partial-1")).write_bytes(b"\0" * 4096)
    save_file({"x": torch.zeros(1)}, folder / "foreign.safetensors", metadata={cast_store.STAMP_KEY: "[1]"})
    (folder / "notes.txt").write_text("an operator's file")
    save_file(_doubled(model_dir), model_dir / "model.safetensors")  # a new version of the source
    held = folder / "other-span.safetensors"
    held.write_bytes(b"")
    with cache_lock(held, "a writer at work", deadline_s=0):
        (folder / (held.name + ".partial-99")).write_bytes(b"\0")
        kept = _load(model_dir, (0, 8), torch.bfloat16, casts)
        [new] = [p for p in _cast_files(casts) if p.name.startswith("bfloat16-")]
        assert new != first and not first.exists() and not lock_path_for(first).exists()
        assert not (folder / (first.name + ".partial-1")).exists()
        assert (folder / (held.name + ".partial-99")).exists()  # its writer holds its lock: left alone
    assert (folder / "notes.txt").exists()
    _assert_same_bits(kept, _load(model_dir, (0, 8), torch.bfloat16, None))
    _, mapped = _parameters_mapped_from(kept, casts)
    assert mapped == [str(new)]


def test_a_load_waits_for_a_stuck_writer_only_so_long(tiny_model_dirs, casts, monkeypatch, caplog):
    from openhydra.runtime.model_cache import cache_lock

    model_dir = tiny_model_dirs["llama"]
    source = model_dir / "model.safetensors"
    names = ["model.layers.0.mlp.up_proj.weight"]
    path, _ = cast_store.cast_path(casts, source, torch.bfloat16, names)
    path.parent.mkdir(parents=True)
    monkeypatch.setattr(cast_store, "LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(cast_store, "LOCK_WAIT_BYTES_PER_S", float("inf"))
    reference = _load(model_dir, (0, 8), torch.bfloat16, None)
    with caplog.at_level(logging.WARNING, logger="openhydra.runtime.cast_store"):
        from openhydra.runtime.weights import CheckpointIndex

        index = CheckpointIndex.open(model_dir)
        with cache_lock(path, "a stopped writer"):
            got = index.read({"w": names[0]}, {"w": torch.bfloat16}, keep_casts=True)
    assert "TimeoutError" in caplog.text and "casting in memory" in caplog.text
    assert torch.equal(got["w"], reference.modules.state_dict()["layers.0.mlp.up_proj.weight"])


CHILD = """
import hashlib, logging, sys, torch
logging.basicConfig(level=logging.INFO)
from pathlib import Path
from openhydra.runtime import cast_store
from openhydra.runtime.shard import ShardRuntime
cast_store.configure(Path(sys.argv[2]))
rt = ShardRuntime(sys.argv[1], dtype=torch.bfloat16)
digest = hashlib.sha256()
for name, t in sorted(rt.modules.state_dict().items()):
    digest.update(name.encode()); digest.update(t.float().numpy().tobytes())
print(digest.hexdigest())
"""


@pytest.mark.slow
def test_processes_loading_at_once_write_one_file_and_agree(smollm2_dir, tmp_path):
    root = tmp_path / "casts"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(smollm2_dir), str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    [written] = _cast_files(root)
    logs = "".join(err for _, err in results)
    assert logs.count("weights: kept") == 1, logs[-3000:]  # one writer; the others mapped its file
    assert not list(root.rglob("*.partial-*"))
    reference = _load(smollm2_dir, (0, None), torch.bfloat16, None)
    kept = _load(smollm2_dir, (0, None), torch.bfloat16, root)
    _assert_same_bits(kept, reference)
    assert _parameters_mapped_from(kept, root)[1] == [str(written)]


@pytest.mark.slow
def test_a_node_serves_from_the_cast_file_unless_told_not_to(tiny_model_dirs, tmp_path):
    """Through the node as users start it: bf16 weights of an fp32 checkpoint, mapped from the node's model cache, and
    the same greedy answer as a node told ``node.cast_weights=false``, which writes no file."""
    common = ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu", "hardware.dtype=bfloat16",
              "discovery=off"]
    caches = {flag: tmp_path / f"cache-{flag}" for flag in ("true", "false")}
    nodes = {flag: NodeProcess([*common, f"node.model_cache_dir={caches[flag]}", f"node.cast_weights={flag}"])
             for flag in caches}
    answers = {}
    try:
        start_all(list(nodes.values()))
        for flag, node in nodes.items():
            reply = httpx.post(f"{node.url}/v1/chat/completions", timeout=120, json={
                "model": tiny_model_dirs["llama"].name, "max_tokens": 12, "temperature": 0,
                "messages": [{"role": "user", "content": "Count to ten."}]})
            assert reply.status_code == 200, reply.text
            answers[flag] = reply.json()["choices"][0]["message"]["content"]
            maps = Path(f"/proc/{node.proc.pid}/maps").read_text()
            assert (str(caches[flag] / "casts") in maps) == (flag == "true"), flag
    finally:
        for node in nodes.values():
            node.stop()
    assert answers["true"] == answers["false"]
    assert len(_cast_files(caches["true"] / "casts")) == 1
    assert not (caches["false"] / "casts").exists()
