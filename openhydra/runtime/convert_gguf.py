"""GGUF file -> transformers folder (fp32 safetensors, config, tokenizer). Runs in a child process.

``python -m openhydra.runtime.convert_gguf --gguf FILE --out DIR`` is started by
:func:`openhydra.runtime.model_cache.materialize_gguf`, which holds the cache lock, gives it a fresh
temporary ``DIR`` and renames it into place only after this process exits 0. Running here rather than
in the node keeps the dequantized model (hundreds of MB that the allocator would not hand back) out of
the serving process. The process exits as soon as its parent dies (its stdin, a pipe from the parent,
reaches end of file), so a killed node leaves no orphan writing into the cache.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("openhydra.runtime.convert_gguf")

EXIT_PARENT_GONE = 70


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into ``out`` (which must exist and be empty): weights as fp32, plus tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _parse_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers dequantizes the quantized tensors to float; keep fp32 so no precision is lost twice,
        # and each runtime casts to its configured dtype on load.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the dequantized weights are plain tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    drop_version_stamps(out)


VERSION_STAMPED = ("config.json", "generation_config.json")


def version_stamped(folder: Path) -> list[tuple[Path, dict]]:
    """The folder's configs that carry a ``transformers_version`` stamp, parsed."""
    stamped = []
    for name in VERSION_STAMPED:
        path = Path(folder) / name
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and "transformers_version" in config:
            stamped.append((path, config))
    return stamped


def drop_version_stamps(folder: Path) -> bool:
    """Remove ``transformers_version`` from the folder's configs; True if a file changed.

    The catalog pins a converted checkpoint's manifest (weights/manifest.py) so that peers serving it to each
    other agree on its bytes, and this stamp was the only byte that changed with the transformers release:
    SmolLM2 converted under 5.24.0 and 5.25.0 gave different manifests with identical weights and tokenizer.
    Nothing reads it back (transformers only writes it)."""
    stamped = version_stamped(folder)
    for path, config in stamped:
        del config["transformers_version"]
        write_json_atomic(path, config, indent=2, sort_keys=True)
    return bool(stamped)


def write_json_atomic(path: Path, value: object, **dumps: object) -> None:
    """``path`` holds ``value`` as JSON, replaced in one rename (readers see the old file or the new one)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, **dumps) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def _parse_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (tokenizer, config, weights; 6.5 s each for SmolLM2's 49k-token
    vocabulary on one core) and builds gguf's tensor-name table once per tensor (397 times, 7 s). Both are pure
    functions of their arguments and read-only after: within this one-shot conversion each is built once: 1.7x faster
    (bench/bench_convert.py; docs/benchmarks.md). transformers imports both names from ``gguf`` at call time, so the
    module attributes are what it uses."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    cached_reader = functools.lru_cache(maxsize=4)(lambda path, mode="r": reader(path, mode))
    gguf.GGUFReader = lambda path, mode="r": cached_reader(os.fspath(path), mode)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _exit_when_parent_dies() -> None:
    """The parent keeps our stdin open and never writes: end of file means it is gone."""

    def watch() -> None:
        # os.read on the raw descriptor: a daemon thread blocked in sys.stdin's buffered reader would make
        # interpreter shutdown abort ("could not acquire lock for <stdin>").
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openhydra.runtime.convert_gguf", description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True, help="the GGUF file to convert")
    parser.add_argument("--out", type=Path, required=True, help="an empty folder to write into")
    parser.add_argument("--watch-parent", action="store_true", help="exit when stdin closes (parent died)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.watch_parent:
        _exit_when_parent_dies()
    # The folder exists from the start so that a conversion in progress is visible in the cache.
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (pid %d)", args.gguf, args.out, os.getpid())
    convert_gguf(args.gguf, args.out)
    log.info("converted %s", args.gguf.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
