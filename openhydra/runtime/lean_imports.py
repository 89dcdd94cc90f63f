"""Keep a node process from importing optional packages that transformers pulls in and a node never uses.

Importing a model's modeling code imports ``transformers.modeling_utils``, which imports, among others, its loss
functions (``transformers.loss``: the object-detection losses import ``scipy.optimize``, ~380 modules, when SciPy
is installed). A peer computes no loss, yet each of its processes paid ~20 MiB of private memory for it (measured
with bench/bench_peer_memory.py; ~290 MiB of a peer's ~360 MiB private memory is imports, torch alone ~136 MiB).
transformers treats SciPy as optional: it asks ``is_scipy_available()`` first and skips the import without it.

:func:`skip_unused_optional_imports` makes that check answer False in this process, before the modeling code is
first imported (``openhydra-node`` calls it first thing; later it is a no-op). Anything that imports SciPy itself
(hivemind, for discovery=kademlia) still gets it. Not skipped: ``kernels`` (~1.5 MiB; transformers' GGUF loader
consults it when the embedded model is converted) and ``accelerate`` (~3 MiB; device maps).
``OPENHYDRA_LEAN_IMPORTS=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

UNUSED_OPTIONAL = ("is_scipy_available",)
"""transformers' availability checks of optional packages a node does not use (SciPy: only its losses)."""


def _unavailable(*_args, **_kwargs) -> bool:
    return False


def skip_unused_optional_imports() -> list[str]:
    """Make transformers see :data:`UNUSED_OPTIONAL` packages as absent; the checks changed (empty if off or
    too late: ``transformers.modeling_utils`` already imported)."""
    if os.environ.get("OPENHYDRA_LEAN_IMPORTS", "1") == "0":
        return []
    if "transformers.modeling_utils" in sys.modules:
        log.debug("transformers.modeling_utils is already imported: optional imports not skipped")
        return []
    import transformers.utils as utils
    import transformers.utils.import_utils as import_utils

    changed = []
    for name in UNUSED_OPTIONAL:
        # Modules bind the check from transformers.utils when they are imported: replace it in both places.
        if hasattr(import_utils, name):
            setattr(import_utils, name, _unavailable)
            if hasattr(utils, name):
                setattr(utils, name, _unavailable)
            changed.append(name)
    return changed
