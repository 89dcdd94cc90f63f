"""The weights manifest (openhydra/weights/manifest.py): content hash, tensor ranges, span selection, pinning."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from openhydra.catalog import load_catalog
from openhydra.crypto.identity import Identity
from openhydra.weights.manifest import (
    ManifestError,
    compute_manifest,
    ensure_manifest,
    read_manifest,
    sign,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


def test_every_tensor_has_its_exact_range_dtype_shape_and_hash(tiny: Path) -> None:
    manifest = compute_manifest(tiny, chunk_bytes=64 * 1024)
    entry = manifest.file("model.safetensors")
    data = (tiny / "model.safetensors").read_bytes()
    assert entry.size == len(data)
    # The pieces tile the file: header, then tensors (and any padding), no gap, no overlap.
    cursor = 0
    for piece in entry.pieces:
        assert piece.offset == cursor
        cursor += piece.length
        assert hashlib.sha256(data[piece.offset:piece.offset + piece.length]).hexdigest() == piece.sha256
    assert cursor == len(data)
    with safe_open(tiny / "model.safetensors", "pt") as f:
        names = set(f.keys())
        tensors = {p.name: p for p in entry.pieces if p.name}
        assert set(tensors) == names
        for name in list(names)[:5]:
            t = f.get_tensor(name)
            assert tensors[name].shape == list(t.shape)
            assert tensors[name].length == t.numel() * t.element_size()
    # Chunks are the unit a fetcher verifies: each hash matches its bytes.
    for chunk in manifest.chunks():
        blob = (tiny / chunk.path).read_bytes()[chunk.offset:chunk.offset + chunk.length]
        assert hashlib.sha256(blob).hexdigest() == chunk.sha256
    assert {f.path for f in manifest.files} >= {"config.json", "tokenizer.json", "model.safetensors"}


def test_span_takes_its_layers_and_the_ends_only_where_needed(tiny: Path) -> None:
    m = compute_manifest(tiny)
    first = {c.piece for c in m.chunks((0, 3)) if c.piece}
    last = {c.piece for c in m.chunks((5, 8)) if c.piece}
    assert any("embed_tokens" in n for n in first) and not any("lm_head" in n or n == "model.norm.weight"
                                                               for n in first)
    assert {n for n in first if ".layers." in n} == {n for n in first if any(f".layers.{i}." in n for i in range(3))}
    assert "model.norm.weight" in last and not any(f".layers.{i}." in n for n in last for i in range(5))
    # Two spans that tile the model fetch every byte once, plus the shared small files twice.
    shared = m.span_bytes((3, 5)) - sum(c.length for c in m.chunks((3, 5)) if c.piece)
    assert m.span_bytes((0, 3)) + m.span_bytes((3, 8)) == m.span_bytes() + shared
    assert m.span_bytes((3, 5)) < m.span_bytes() / 2  # a middle span skips embeddings and head


def test_content_hash_is_deterministic_and_changes_with_one_byte(tiny: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert compute_manifest(copy).content_hash() == compute_manifest(tiny).content_hash()
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert compute_manifest(copy).content_hash() != compute_manifest(tiny).content_hash()


def test_signature_pin_and_tamper(tiny: Path, tmp_path: Path) -> None:
    identity = Identity.generate()
    signed = sign(compute_manifest(tiny), identity)
    assert signed.check(pinned=signed.content_hash) == signed.manifest
    with pytest.raises(ManifestError, match="pinned"):
        signed.check(pinned="0" * 64)
    # A manifest edited after signing (a swapped tensor hash) no longer matches its hash.
    body = signed.manifest.model_dump()
    body["files"][0]["pieces"][0]["sha256"] = "f" * 64
    forged = signed.model_copy(update={"manifest": type(signed.manifest).model_validate(body)})
    with pytest.raises(ManifestError, match="content hash"):
        forged.check()
    # Re-hashed by the forger, the signature of the original signer does not verify.
    rehashed = forged.model_copy(update={"content_hash": forged.manifest.content_hash()})
    with pytest.raises(ManifestError, match="signature"):
        rehashed.check()
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    written = ensure_manifest(folder)
    assert read_manifest(folder) == written and written.content_hash == signed.content_hash


def test_embedded_smollm2_manifest_is_the_catalog_pin(smollm2_dir: Path) -> None:
    """The GGUF conversion is bit-deterministic, so the catalog pins the converted checkpoint's manifest."""
    pinned = load_catalog()["smollm2-135m"].manifest
    assert pinned is not None
    assert ensure_manifest(smollm2_dir).content_hash == pinned
