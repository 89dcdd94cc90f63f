"""Per-layer, per-KV-head token budgets (phase 3 of Attention Matching, arXiv:2602.16284).

File format (written by ``scripts/head_budget_optimizer.py``)::

    {"format": "openhydra-kv-budgets/1", "unit": "fraction" | "tokens",
     "layers": {"3": [0.31, 0.55, 0.12], ...}, "meta": {...}}

``layers`` maps a (global) decoder-layer index to one entry per KV head. ``unit: tokens`` entries
are exact kept-token counts (capped at the layer length); ``fraction`` entries are multiplied by the
layer length and rounded. Layers the file does not name use the uniform ``ratio``. A shard holding
global layers [a, b) uses ``budgets.shifted(a)`` so its local index i reads entry a + i.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FORMAT = "openhydra-kv-budgets/1"


@dataclass(frozen=True)
class HeadBudgets:
    unit: Literal["fraction", "tokens"]
    layers: dict[int, list[float]] = field(default_factory=dict)
    meta: dict[str, object] = field(default_factory=dict)

    def for_layer(self, layer_idx: int, num_kv_heads: int, length: int, ratio: float) -> list[int]:
        """Kept tokens per KV head for one layer holding ``length`` tokens."""
        entry = self.layers.get(layer_idx)
        if entry is None:
            return [uniform_budget(length, ratio)] * num_kv_heads
        if len(entry) != num_kv_heads:
            raise ValueError(f"budgets for layer {layer_idx} list {len(entry)} heads, the layer has {num_kv_heads}")
        if self.unit == "tokens":
            return [max(1, min(length, int(b))) for b in entry]
        return [max(1, min(length, round(float(f) * length))) for f in entry]

    def shifted(self, layer_offset: int) -> HeadBudgets:
        """The view of a shard whose local layer 0 is global layer ``layer_offset``."""
        layers = {i - layer_offset: v for i, v in self.layers.items() if i >= layer_offset}
        return HeadBudgets(self.unit, layers, self.meta)

    def to_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "unit": self.unit,
            "layers": {str(k): v for k, v in sorted(self.layers.items())},
            **({"meta": self.meta} if self.meta else {}),
        }


def uniform_budget(length: int, ratio: float) -> int:
    return max(1, min(length, round(length * ratio)))


def load_budgets(path: str | Path) -> HeadBudgets:
    """Read and validate a budgets file; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read KV budgets file {path}: {err}") from err
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: 'format' must be {FORMAT!r}, got {raw.get('format')!r}")
    unit = raw.get("unit")
    if unit not in ("fraction", "tokens"):
        raise ValueError(f"{path}: 'unit' must be 'fraction' or 'tokens', got {unit!r}")
    layers: dict[int, list[float]] = {}
    for key, heads in dict(raw.get("layers", {})).items():
        bad = not isinstance(heads, list) or not heads
        if bad or any(not isinstance(b, (int, float)) or b <= 0 for b in heads):
            raise ValueError(f"{path}: layers[{key!r}] must be a non-empty list of positive numbers")
        if unit == "fraction" and any(b > 1 for b in heads):
            raise ValueError(f"{path}: layers[{key!r}] fractions must be <= 1")
        layers[int(key)] = [float(b) if unit == "fraction" else int(b) for b in heads]
    return HeadBudgets(unit, layers, dict(raw.get("meta", {})))


def save_budgets(budgets: HeadBudgets, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(budgets.to_json(), indent=1) + "\n")
