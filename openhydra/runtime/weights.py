"""Reading only the tensors a shard needs from a safetensors checkpoint.

A checkpoint is either one ``model.safetensors`` or several files listed by
``model.safetensors.index.json`` (``weight_map``: tensor name -> file). Text decoders are stored under
different prefixes: ``model.layers.N`` for plain causal LMs, ``model.language_model.layers.N`` for
Qwen3.5 (whose checkpoints also carry ``model.visual.*`` and ``mtp.*`` tensors that a text shard
never reads). :class:`CheckpointIndex` hides both differences behind *canonical* names
(``layers.N.…``, ``embed_tokens.weight``, ``norm.weight``, ``lm_head.weight``).

Tensors are opened with ``safetensors.safe_open`` one file at a time and read one tensor at a time,
so a shard never holds more than its own weights (plus one tensor in flight) in memory.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Where the decoder stack lives, most specific first ("model.language_model." before "model.").
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "transformer.", "")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight", "model.language_model.lm_head.weight")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


class CheckpointError(RuntimeError):
    """The checkpoint folder is missing files or tensors that the shard needs, or a file is damaged."""


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """``safe_open`` whose failures name the file and what to do: a truncated or overwritten file (an
    interrupted copy or download, a full disk) raises :class:`CheckpointError`, not the library's bare error."""
    from safetensors import SafetensorError

    try:
        handle = safe_open(path, framework="pt")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path} is missing: the checkpoint folder is incomplete") from exc
    except (SafetensorError, OSError) as exc:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"{path} ({size:,} bytes) is damaged or not a safetensors file ({exc}): an interrupted copy or download? "
            "Replace it with an intact copy; a file in OpenHydra's model cache is fetched or converted anew once "
            "deleted") from exc
    with handle as f:
        yield f


@dataclass(frozen=True)
class CheckpointIndex:
    """Tensor name -> file, plus the prefix under which the text decoder is stored."""

    root: Path
    weight_map: dict[str, str]
    text_prefix: str

    @classmethod
    def open(cls, model_dir: str | Path) -> CheckpointIndex:
        root = Path(model_dir)
        index_path = root / INDEX_FILE
        if index_path.exists():
            weight_map = dict(json.loads(index_path.read_text())["weight_map"])
        elif (root / SINGLE_FILE).exists():
            with open_safetensors(root / SINGLE_FILE) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise CheckpointError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        return cls(root=root, weight_map=weight_map, text_prefix=_detect_prefix(weight_map))

    def source_name(self, canonical: str) -> str | None:
        """The checkpoint's name for a canonical tensor name, or None if the checkpoint lacks it."""
        if canonical == "lm_head.weight":
            return next((n for n in HEAD_NAMES if n in self.weight_map), None)
        name = self.text_prefix + canonical
        return name if name in self.weight_map else None

    def head_is_tied(self, declared: bool) -> bool:
        """Whether the LM head is the embedding table: the config says so (``declared``), or the checkpoint simply
        has no separate head (multimodal releases may state tying only in their top-level config, which the text
        config does not carry)."""
        return declared or self.source_name("lm_head.weight") is None

    def layer_tensor_names(self, layer: int) -> dict[str, str]:
        """Suffix within the layer (``mlp.up_proj.weight``) -> checkpoint name, for one global layer."""
        head = f"{self.text_prefix}layers.{layer}."
        return {name[len(head) :]: name for name in self.weight_map if name.startswith(head)}

    def read(self, names: dict[str, str], dtype_for: dict[str, torch.dtype],
             mapped: set[str] | None = None, keep_casts: bool = False) -> dict[str, torch.Tensor]:
        """Read ``{target: checkpoint_name}`` grouped by file; each tensor cast to ``dtype_for[target]``.

        ``mapped`` (if given) receives the targets that are views of a file's mapping, nothing copied: those stored
        in their own dtype and, with ``keep_casts``, those cast once into the model cache's cast file
        (runtime/cast_store.py) where one is configured; the others are cast copies."""
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for target, source in names.items():
            if source not in self.weight_map:
                raise CheckpointError(f"tensor {source!r} is not in the checkpoint at {self.root}")
            by_file[self.weight_map[source]].append((target, source))
        out: dict[str, torch.Tensor] = {}
        # Loading a large span takes a while: show it (tqdm writes to stderr, i.e. the node's log).
        progress = tqdm(total=len(names), desc=f"loading {self.root.name}", unit="tensor",
                        disable=len(names) < 64, mininterval=1.0)
        for filename, pairs in by_file.items():
            opened = _stamp_before_opening(self.root / filename) if keep_casts else None
            with open_safetensors(self.root / filename) as f:
                cast = self._kept_casts(filename, f, pairs, dtype_for, opened) if opened is not None else {}
                for target, source in pairs:
                    kept = cast.get((source, dtype_for[target]))
                    stored = kept if kept is not None else f.get_tensor(source)
                    out[target] = stored.to(dtype_for[target])
                    if mapped is not None and out[target] is stored:
                        mapped.add(target)
                    progress.update()
        progress.close()
        return out

    def _kept_casts(self, filename: str, f, pairs: list[tuple[str, str]], dtype_for: dict[str, torch.dtype],
                    opened: dict[str, object]) -> dict[tuple[str, torch.dtype], torch.Tensor]:
        """(checkpoint name, dtype) -> the tensor cast to that dtype, mapped from the cast store, for the tensors of
        one file that the read casts; empty where the store is off or cannot be used. ``opened``: the file's stamp
        taken before ``f`` was opened."""
        from openhydra.runtime import cast_store

        wanted: dict[torch.dtype, set[str]] = defaultdict(set)
        for target, source in pairs:
            if f.get_slice(source).get_dtype() != _SAFETENSORS_DTYPE.get(dtype_for[target]):
                wanted[dtype_for[target]].add(source)
        out: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        for dtype, sources in wanted.items():
            kept = cast_store.cast_tensors(self.root / filename, sorted(sources), dtype, f.get_tensor, opened)
            out.update({(name, dtype): tensor for name, tensor in (kept or {}).items()})
        return out

    def read_as_stored(self, source: str) -> torch.Tensor:
        """One tensor in the dtype the file stores it in: a view of the file's mapping, nothing copied (its pages
        are the page cache's, shared by every process on the machine that maps the file, resident once touched)."""
        if source not in self.weight_map:
            raise CheckpointError(f"tensor {source!r} is not in the checkpoint at {self.root}")
        with open_safetensors(self.root / self.weight_map[source]) as f:
            return f.get_tensor(source)

    def tensor_bytes(self, names: Iterable[str]) -> int:
        """Bytes the named tensors take on disk (from the safetensors headers, nothing is read)."""
        total = 0
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.weight_map[name]].append(name)
        for filename, group in by_file.items():
            with open_safetensors(self.root / filename) as f:
                for name in group:
                    sl = f.get_slice(name)
                    numel = 1
                    for dim in sl.get_shape():
                        numel *= dim
                    total += numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return total


def _stamp_before_opening(path: Path) -> dict[str, object] | None:
    """The cast store's stamp of ``path`` (what the cast of a read will record), taken before the read opens it; None
    where there is no store, or the file cannot be stamped (the read then casts in memory, or fails as it would)."""
    from openhydra.runtime import cast_store

    if cast_store.current() is None:
        return None
    try:
        return cast_store.source_stamp(path)
    except OSError:
        return None


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _detect_prefix(weight_map: dict[str, str]) -> str:
    for prefix in TEXT_PREFIXES:
        if any(name.startswith(f"{prefix}layers.") for name in weight_map):
            return prefix
    raise CheckpointError("no decoder layers found: expected tensors named like 'model.layers.0.…'")


def split_layer_name(canonical: str) -> tuple[int, str] | None:
    """``layers.12.mlp.up_proj.weight`` -> ``(12, 'mlp.up_proj.weight')``; None for non-layer names."""
    match = _LAYER_RE.match(canonical)
    return (int(match.group(1)), match.group(2)) if match else None
