"""How a model's weights were stored at their source, for ``/api/show`` (``details.quantization_level``).

The node serves every model from a safetensors folder in some dtype (``hardware.dtype``), but that says
nothing of where the weights came from: the embedded SmolLM2 is a Q4_1 GGUF dequantized on conversion, so
its served bf16 weights carry Q4_1's rounding. This module reads the source's own record of it:
- a folder converted from a GGUF (model_cache's completion marker names the file): the GGUF's
  ``general.file_type`` (llama.cpp's ``LLAMA_FTYPE``, e.g. ``Q4_1``), else its most common tensor type;
- any other safetensors folder: the dtype holding most of the weights (``BF16``, ``F32``, ...), or the
  checkpoint's ``quantization_config`` method when it has one (``GPTQ``, ``AWQ``, ...).

The GGUF header is parsed by hand up to the key needed (the full ``gguf.GGUFReader`` maps every tensor and
takes seconds on the real file); the safetensors headers are the JSON at the front of each file.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from openhydra.runtime.model_cache import COMPLETE_MARKER

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_FILE_TYPE_KEY = "general.file_type"
# GGUF metadata value types -> struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class SourceFormat:
    format: str
    """'gguf' or 'safetensors'."""
    quantization: str
    """As Ollama spells it: 'Q4_1', 'Q8_0', 'F16', 'BF16', 'F32', ..."""


def _read(f: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _skip_value(f: BinaryIO, value_type: int) -> None:
    if value_type in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[value_type]), 1)
    elif value_type == _STRING:
        f.seek(int(_read(f, "<Q")), 1)
    elif value_type == _ARRAY:
        item_type, count = int(_read(f, "<I")), int(_read(f, "<Q"))
        if item_type in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    else:
        raise ValueError(f"unknown GGUF value type {value_type}")


def gguf_file_type(path: Path) -> str | None:
    """The GGUF's ``general.file_type`` as a name (``MOSTLY_Q4_1`` -> ``Q4_1``), or None without one."""
    import gguf

    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        _version, _tensors, kv_count = _read(f, "<I"), _read(f, "<Q"), int(_read(f, "<Q"))
        for _ in range(kv_count):
            key = f.read(int(_read(f, "<Q"))).decode("utf-8", "replace")
            value_type = int(_read(f, "<I"))
            if key == _FILE_TYPE_KEY and value_type in _SCALARS:
                code = int(_read(f, _SCALARS[value_type]))
                try:
                    name = gguf.LlamaFileType(code).name
                except ValueError:
                    return f"FTYPE_{code}"
                return name.removeprefix("MOSTLY_").removeprefix("ALL_")
            _skip_value(f, value_type)
    return None


def _gguf_tensor_type(path: Path) -> str:
    """The most common quantized tensor type (when a GGUF has no file type key; slow, rare)."""
    import gguf

    reader = gguf.GGUFReader(path)
    counts = Counter(t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in ("F32", "F16"))
    if counts:
        return counts.most_common(1)[0][0]
    return Counter(t.tensor_type.name for t in reader.tensors).most_common(1)[0][0]


def safetensors_dtype(folder: Path) -> str | None:
    """The dtype holding the most weights across the folder's ``*.safetensors`` headers (``BF16``, ``F32``)."""
    weights: Counter[str] = Counter()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int(_read(f, "<Q"))))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                weights[info["dtype"]] += count
    return weights.most_common(1)[0][0] if weights else None


def source_format(folder: Path) -> SourceFormat:
    """How the weights now in ``folder`` were stored where they came from (see the module docstring)."""
    folder = Path(folder)
    try:
        origin = json.loads((folder / COMPLETE_MARKER).read_text()).get("from")
    except (OSError, ValueError):
        origin = None
    if isinstance(origin, str) and origin.endswith(".gguf") and Path(origin).exists():
        return SourceFormat("gguf", gguf_file_type(Path(origin)) or _gguf_tensor_type(Path(origin)))
    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        quant = {}
    if quant.get("quant_method"):
        bits = quant.get("bits")
        return SourceFormat("safetensors", str(quant["quant_method"]).upper() + (f"-{bits}BIT" if bits else ""))
    return SourceFormat("safetensors", safetensors_dtype(folder) or "unknown")


def source_fields(folder: Path) -> dict[str, str | None]:
    """``weights_format`` and ``quantization`` for a ServedModel; unknown (never an error) if unreadable."""
    try:
        found = source_format(folder)
    except (OSError, ValueError, KeyError, struct.error) as exc:
        log.warning("could not tell how the weights in %s were stored: %s", folder, exc)
        return {"weights_format": "safetensors", "quantization": None}
    return {"weights_format": found.format, "quantization": found.quantization}
