"""A model manifest: every file, tensor and chunk of a checkpoint folder, with its SHA-256 (issue 19).

A checkpoint folder (``config.json``, tokenizer files, ``*.safetensors``) is described piece by piece:

* a safetensors file is its header (``[0, 8 + n)``) followed by its tensors, each with name, dtype, shape,
  absolute byte range and SHA-256 (gaps, if a writer left any, are unnamed pieces so the file is covered);
* any other file (config, tokenizer, chat template) is one unnamed piece;
* every piece is cut into chunks of ``chunk_bytes`` and each chunk has its own SHA-256: the unit a fetcher
  verifies, retries elsewhere and resumes by.

The manifest is identified by its **content hash**: SHA-256 of the canonical JSON of the body (sorted keys,
compact), so a catalog entry that pins it (``model.manifest``) pins every byte of the weights. A manifest may
also carry an Ed25519 signature of that hash by the node that computed it (who vouches for it); the pin is
what a fetcher trusts, the signature says who published an unpinned one.

Which pieces a layer span needs (:func:`span_needs`): its decoder layers, the embeddings on the first span
(and on the last when the head is tied to them), the final norm and head on the last, headers and small
files always; vision towers and MTP heads (Qwen3.5) never, since a text shard does not load them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import struct
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

MANIFEST_FILE = "openhydra-manifest.json"
FORMAT = "openhydra-manifest/1"
CHUNK_BYTES = 1 << 20
"""1 MiB: small enough that a bad chunk costs little to refetch, large enough that gRPC overhead is noise."""
MAX_HEADER_BYTES = 100 << 20
# Written next to the weights by the cache and the fetcher; never part of the weights themselves.
EXCLUDED = {MANIFEST_FILE, "openhydra-source.json", ".openhydra-fetch.log"}
_SHA256 = r"^[0-9a-f]{64}$"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NEVER = re.compile(r"(^|\.)(visual|vision_tower|mtp)\.|^mtp\.")


class ManifestError(ValueError):
    """A folder cannot be described, or a manifest does not match what it claims."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Piece(Strict):
    """A byte range of one file: a tensor (``name`` set) or a header / whole small file / gap (``name`` empty)."""

    name: str = ""
    offset: int = Field(ge=0)
    length: int = Field(ge=0)
    dtype: str | None = None
    shape: list[int] | None = None
    sha256: str = Field(pattern=_SHA256)
    chunks: list[str]
    """SHA-256 of each ``chunk_bytes`` slice of the piece, in order (the last one may be shorter)."""

    @field_validator("chunks")
    @classmethod
    def _hex(cls, chunks: list[str]) -> list[str]:
        for c in chunks:
            if not re.match(_SHA256, c):
                raise ValueError(f"chunk hash {c!r} is not 64 lowercase hex digits")
        return chunks


class FileEntry(Strict):
    path: str
    size: int = Field(ge=0)
    pieces: list[Piece]

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        p = PurePosixPath(path)
        if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in path or "\0" in path:
            raise ValueError(f"manifest file path must be relative and inside the folder, got {path!r}")
        return path


class Chunk(Strict):
    """The unit of transfer and verification: ``length`` bytes at ``offset`` of ``path``."""

    path: str
    offset: int
    length: int
    sha256: str
    piece: str
    """The piece's tensor name ('' for headers and small files): for logs."""

    @property
    def key(self) -> str:
        return f"{self.path}@{self.offset}"

    def matches(self, data: bytes) -> bool:
        """``data`` are this chunk's bytes (its SHA-256)."""
        return hashlib.sha256(data).hexdigest() == self.sha256

    def intact_in(self, fd: int) -> bool:
        """The open file ``fd`` (this chunk's ``path``) holds this chunk's bytes at its offset."""
        return self.matches(os.pread(fd, self.length, self.offset))


class Manifest(Strict):
    format: Literal["openhydra-manifest/1"] = FORMAT
    model_type: str
    num_layers: int = Field(ge=1)
    tie_word_embeddings: bool
    chunk_bytes: int = Field(ge=4096)
    files: list[FileEntry]

    def content_hash(self) -> str:
        return hashlib.sha256(canonical_bytes(self)).hexdigest()

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise ManifestError(f"{path!r} is not in the manifest")

    def chunks(self, span: tuple[int, int] | None = None) -> list[Chunk]:
        """Every chunk (``span=None``) or the chunks a node serving layers ``span`` needs, in file order."""
        out: list[Chunk] = []
        for entry in self.files:
            for piece in entry.pieces:
                if span is not None and not span_needs(piece.name, span, self.num_layers, self.tie_word_embeddings):
                    continue
                for i, digest in enumerate(piece.chunks):
                    offset = piece.offset + i * self.chunk_bytes
                    length = min(self.chunk_bytes, piece.offset + piece.length - offset)
                    out.append(Chunk(path=entry.path, offset=offset, length=length, sha256=digest, piece=piece.name))
        return out

    def span_bytes(self, span: tuple[int, int] | None = None) -> int:
        return sum(c.length for c in self.chunks(span))


class SignedManifest(Strict):
    """What goes on disk and over the wire: the manifest, its hash, and who vouches for it (optional)."""

    manifest: Manifest
    content_hash: str = Field(pattern=_SHA256)
    signer: str | None = None
    """Base64 Ed25519 public key of the node that computed it."""
    signature: str | None = None
    """Base64 Ed25519 signature of ``content_hash`` (its ASCII bytes)."""

    def check(self, pinned: str | None = None) -> Manifest:
        """The manifest, after checking its hash (and the pin and signature when present)."""
        actual = self.manifest.content_hash()
        if actual != self.content_hash:
            raise ManifestError(f"manifest content hash is {actual}, but it claims {self.content_hash}")
        if pinned is not None and actual != pinned:
            raise ManifestError(f"manifest {actual} is not the pinned {pinned} (model.manifest)")
        if self.signature is not None or self.signer is not None:
            from openhydra.crypto.identity import verify_signature

            try:
                key, sig = base64.b64decode(self.signer or ""), base64.b64decode(self.signature or "")
            except ValueError as exc:
                raise ManifestError("manifest signer/signature is not base64") from exc
            if not verify_signature(key, sig, actual.encode()):
                raise ManifestError("manifest signature does not verify")
        return self.manifest


def canonical_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def span_needs(name: str, span: tuple[int, int], num_layers: int, tied: bool) -> bool:
    """Whether a node serving layers ``[start, end)`` of ``num_layers`` loads the piece called ``name``."""
    if not name:
        return True  # a header or a small file (config, tokenizer)
    if _NEVER.search(name):
        return False
    start, end = span
    is_first, is_last = start == 0, end == num_layers
    layer = layer_of(name)
    if layer is not None:
        return start <= layer < end
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return is_first or (is_last and tied)
    if "lm_head" in name or name.rsplit(".", 2)[-2:-1] == ["norm"]:
        return is_last
    return True  # anything else outside the layers (rare): every span takes it


def _hash_range(f, offset: int, length: int, chunk_bytes: int) -> tuple[str, list[str]]:
    whole = hashlib.sha256()
    chunks: list[str] = []
    f.seek(offset)
    remaining = length
    while remaining > 0 or not chunks:
        data = f.read(min(chunk_bytes, remaining))
        if len(data) != min(chunk_bytes, remaining):
            raise ManifestError(f"short read at {offset + length - remaining} of {f.name}")
        digest = hashlib.sha256(data).hexdigest()
        chunks.append(digest)
        if length > chunk_bytes:
            whole.update(data)
        remaining -= len(data)
        if length == 0:
            break
    return (chunks[0] if length <= chunk_bytes else whole.hexdigest()), chunks


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict]]:
    """(data start, {tensor name: {dtype, shape, data_offsets}}) from a safetensors file's header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ManifestError(f"{path} is too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ManifestError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def _file_pieces(path: Path, chunk_bytes: int) -> list[Piece]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if path.suffix != ".safetensors":
            digest, chunks = _hash_range(f, 0, size, chunk_bytes)
            return [Piece(offset=0, length=size, sha256=digest, chunks=chunks)]
        data_start, tensors = safetensors_layout(path)
        digest, chunks = _hash_range(f, 0, data_start, chunk_bytes)
        pieces = [Piece(offset=0, length=data_start, sha256=digest, chunks=chunks)]
        cursor = data_start
        for name, info in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, stop = (data_start + int(x) for x in info["data_offsets"])
            if begin < cursor or stop < begin:
                raise ManifestError(f"{path}: tensor {name} overlaps the previous one")
            if begin > cursor:  # padding a writer left: covered, so the rebuilt file is byte-identical
                digest, chunks = _hash_range(f, cursor, begin - cursor, chunk_bytes)
                pieces.append(Piece(offset=cursor, length=begin - cursor, sha256=digest, chunks=chunks))
            digest, chunks = _hash_range(f, begin, stop - begin, chunk_bytes)
            pieces.append(Piece(name=name, offset=begin, length=stop - begin, dtype=info["dtype"],
                                shape=[int(s) for s in info["shape"]], sha256=digest, chunks=chunks))
            cursor = stop
        if cursor != size:
            digest, chunks = _hash_range(f, cursor, size - cursor, chunk_bytes)
            pieces.append(Piece(offset=cursor, length=size - cursor, sha256=digest, chunks=chunks))
    return pieces


def compute_manifest(folder: Path, chunk_bytes: int = CHUNK_BYTES) -> Manifest:
    """Describe ``folder`` (reads and hashes every byte once)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or config
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in EXCLUDED or rel.startswith(".") or rel.endswith(".lock"):
            continue
        files.append(FileEntry(path=rel, size=path.stat().st_size, pieces=_file_pieces(path, chunk_bytes)))
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return Manifest(model_type=str(config.get("model_type", "unknown")), num_layers=int(text["num_hidden_layers"]),
                    tie_word_embeddings=tied, chunk_bytes=chunk_bytes, files=files)


def sign(manifest: Manifest, identity=None) -> SignedManifest:
    digest = manifest.content_hash()
    if identity is None:
        return SignedManifest(manifest=manifest, content_hash=digest)
    return SignedManifest(manifest=manifest, content_hash=digest,
                          signer=base64.b64encode(identity.public_key_bytes).decode(),
                          signature=base64.b64encode(identity.sign(digest.encode())).decode())


def write_manifest(folder: Path, signed: SignedManifest) -> Path:
    out = Path(folder) / MANIFEST_FILE
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tmp.write_text(signed.model_dump_json(indent=1))
    tmp.replace(out)
    return out


def read_manifest(folder: Path) -> SignedManifest | None:
    try:
        return SignedManifest.model_validate_json((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_manifest(folder: Path, identity=None) -> SignedManifest:
    """The folder's manifest: read it if present and consistent with the files' sizes, else compute and write it.

    Computing reads every byte once (~1 s per GB with SHA-NI); the cache does it at conversion time, so a node
    serving the embedded model finds it ready.
    """
    folder = Path(folder)
    existing = read_manifest(folder)
    if existing is not None:
        try:
            manifest = existing.check()
            if all((folder / f.path).is_file() and (folder / f.path).stat().st_size == f.size for f in manifest.files):
                return existing
        except ManifestError as exc:
            log.warning("recomputing %s: %s", folder / MANIFEST_FILE, exc)
    signed = sign(compute_manifest(folder), identity)
    try:
        write_manifest(folder, signed)
    except OSError as exc:  # a read-only folder still gets served; the manifest lives in memory
        log.warning("could not write %s: %s", folder / MANIFEST_FILE, exc)
    return signed


def main(argv: list[str] | None = None) -> int:
    """``python -m openhydra.weights.manifest FOLDER``: compute (or read) a folder's manifest; print its hash."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m openhydra.weights.manifest", description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--recompute", action="store_true", help="ignore an existing manifest file")
    args = parser.parse_args(argv)
    signed = sign(compute_manifest(args.folder)) if args.recompute else ensure_manifest(args.folder)
    m = signed.manifest
    print(json.dumps({"content_hash": signed.content_hash, "files": len(m.files), "chunks": len(m.chunks()),
                      "bytes": m.span_bytes(), "num_layers": m.num_layers}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
