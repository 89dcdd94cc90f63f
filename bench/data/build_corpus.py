"""Write the benchmark texts: English prose from the CPython standard library's docstrings.

The KV-compaction quality benchmark (docs/compaction.md) needs contexts of 1-2K tokens plus a
held-out continuation. Docstrings are real, varied technical English shipped with every Python
(PSF license), so the texts can be regenerated anywhere: ``python bench/data/build_corpus.py``.
The generated files are committed so results do not drift with the Python version.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

DOCS = {
    "doc_a": ["argparse", "textwrap", "shutil", "tempfile"],
    "doc_b": ["subprocess", "threading", "queue", "sched"],
    "doc_c": ["collections", "functools", "heapq", "bisect", "contextlib"],
    "doc_d": ["logging", "logging.handlers", "warnings"],
    "calibration": ["json", "pathlib", "difflib", "statistics", "random", "fractions", "decimal"],
}
MIN_CHARS = 120


def docstrings(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    out = [inspect.cleandoc(module.__doc__)] if module.__doc__ else []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        for target in (
            [obj, *(v for k, v in sorted(vars(obj).items()) if not k.startswith("_"))]
            if inspect.isclass(obj)
            else [obj]
        ):
            doc = inspect.getdoc(target) if callable(target) or inspect.isclass(target) else None
            if doc and len(doc) >= MIN_CHARS and doc not in out:
                out.append(doc)
    return out


def main() -> None:
    here = Path(__file__).parent
    for doc_name, modules in DOCS.items():
        text = "\n\n".join(d for m in modules for d in docstrings(m))
        (here / f"{doc_name}.txt").write_text(text + "\n")
        print(f"{doc_name}: {len(text)} chars from {', '.join(modules)}")


if __name__ == "__main__":
    main()
