"""The cost of one K/V append (runtime/kv_layer.py ``AppendLayer.update``) as a batched decode step pays it.

A batched step of R rows appends one position to each row's session cache in every layer: R x layers calls (8 x 30
for SmolLM2), a few microseconds each, all Python and small torch calls. Arms, interleaved per trial, 1 thread:
- ``now``: ``AppendLayer.update``;
- ``before``: the update of commit 6d83565, kept below (``_EarlierAppendLayer``): the same buffer and views, its
  checks read from the buffers and its views made by indexing on every call.
Per trial and arm: ``--rows`` caches of SmolLM2's K/V shape (3 heads of 64) starting at ``--positions``, then
``--appends`` rounds of one append per cache; the median time per append. Both arms' caches must end bit-equal.

    OMP_NUM_THREADS=1 python bench/bench_kv_update.py [--trials 7] [--rows 8] [--appends 400] [--positions 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import plot_trials, print_table

from openhydra.runtime.kv_layer import AppendLayer
from openhydra.testing.machine import announce


class _EarlierAppendLayer(AppendLayer):
    """``AppendLayer.update`` as of commit 6d83565 (the arm to compare against; its other methods are today's)."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        if keys is not self._views[0] or values is not self._views[1]:
            held = 0 if keys.numel() == 0 else keys.shape[-2]
            if not (self._is_prefix_view(keys, self._key_buffer) and self._is_prefix_view(values, self._value_buffer)):
                self._rehome(keys, values, held, held + key_states.shape[-2], key_states, value_states)
        else:
            held = keys.shape[-2]
        end = held + key_states.shape[-2]
        buffer_k, buffer_v = self._key_buffer, self._value_buffer
        if (end > buffer_k.shape[-2] or buffer_k.shape[:2] != key_states.shape[:2]
                or buffer_k.shape[-1] != key_states.shape[-1] or buffer_v.shape[-1] != value_states.shape[-1]
                or buffer_k.dtype != key_states.dtype):
            self._rehome(keys, values, held, end, key_states, value_states)
            buffer_k, buffer_v = self._key_buffer, self._value_buffer
        buffer_k[:, :, held:end].copy_(key_states)
        buffer_v[:, :, held:end].copy_(value_states)
        self.keys, self.values = buffer_k[:, :, :end], buffer_v[:, :, :end]
        self._views = (self.keys, self.values)
        return self.keys, self.values


def per_append_us(kind: type, args: argparse.Namespace, seed: int) -> tuple[float, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(args.rows):
        layer = kind()
        layer.update(torch.randn(1, 3, args.positions, 64, generator=generator),
                     torch.randn(1, 3, args.positions, 64, generator=generator))
        layers.append(layer)
    new_k = torch.randn(args.appends, args.rows, 3, 1, 64, generator=generator)
    new_v = torch.randn(args.appends, args.rows, 3, 1, 64, generator=generator)
    times = []
    for step in range(args.appends):
        keys, values = new_k[step], new_v[step]
        began = time.perf_counter()
        for r, layer in enumerate(layers):  # as LeanLlamaLayer.step_rows calls it
            layer.update(keys[r : r + 1], values[r : r + 1])
        times.append((time.perf_counter() - began) / args.rows)
    return statistics.median(times) * 1e6, [t for layer in layers for t in (layer.keys, layer.values)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--appends", type=int, default=400)
    parser.add_argument("--positions", type=int, default=50)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parent.parent / "docs" / "img"
                                              / "bench_kv_update.png"))
    args = parser.parse_args()
    announce()
    torch.set_num_threads(1)
    arms = {"before": _EarlierAppendLayer, "now": AppendLayer}
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for trial in range(args.trials):
        order = list(arms) if trial % 2 == 0 else list(reversed(arms))
        caches = {}
        for name in order:
            rates[name].append((timed := per_append_us(arms[name], args, seed=trial))[0])
            caches[name] = timed[1]
            print(f"trial {trial} {name:6s} {rates[name][-1]:.2f} us per append", flush=True)
        if not all(torch.equal(a, b) for a, b in zip(caches["before"], caches["now"], strict=True)):
            raise SystemExit(f"trial {trial}: the two arms' caches differ")
    print_table(rates, metric="median us per append")
    before, now = statistics.median(rates["before"]), statistics.median(rates["now"])
    per_trial = statistics.median(b / n for b, n in zip(rates["before"], rates["now"], strict=True))
    print(f"\nbefore / now = {before / now:.2f} (per-trial {per_trial:.2f}); per batched step of {args.rows} rows x 30 "
          f"layers: {before * args.rows * 30 / 1e3:.2f} -> {now * args.rows * 30 / 1e3:.2f} ms  "
          f"[rows={args.rows}, appends={args.appends}, positions={args.positions}, trials={args.trials}]")
    plot_trials(rates, f"K/V append, {args.rows} rows: before / now = {before / now:.2f}", args.plot,
                ylabel="us per append")


if __name__ == "__main__":
    sys.exit(main())
