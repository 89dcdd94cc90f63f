"""The only place that instantiates components from config.

Shared objects (backend, identity, discovery) are built once here and handed to the objects that need
them; components never read the global config. The model loads later, in the background, so the API
answers /health and /readyz (503) while weights are fetched, converted and loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from openhydra.api.app import create_app
from openhydra.config.schema import NodeConfig
from openhydra.node import Node
from openhydra.runtime import cast_store

log = logging.getLogger(__name__)


def _has_target(node: DictConfig) -> bool:
    return OmegaConf.select(node, "_target_") is not None


def build_node(cfg: NodeConfig, raw: DictConfig) -> Node:
    logging.getLogger().setLevel(cfg.node.log_level)
    torch.set_grad_enabled(False)
    # weights in the runtime's dtype, cast once per machine and mapped (runtime/cast_store.py)
    cast_store.configure(cfg.node.model_cache_path / "casts" if cfg.node.cast_weights else None)
    backend = instantiate(raw.hardware)
    if _has_target(raw.compaction):  # KV compaction of every span this node loads (runtime/compaction/)
        backend.compaction = instantiate(raw.compaction)
    privacy = instantiate(raw.privacy) if _has_target(raw.privacy) else None
    identity = None
    if privacy is not None and getattr(privacy, "identity_path", None):
        from openhydra.crypto.identity import Identity

        identity = Identity.load_or_create(Path(privacy.identity_path).expanduser())
        log.info("identity: peer id %s (key at %s)", identity.peer_id, privacy.identity_path)
    discovery = instantiate(raw.discovery) if _has_target(raw.discovery) else None
    economy = instantiate(raw.economy, identity=identity) if _has_target(raw.economy) else None
    node = Node(cfg=cfg, backend=backend, discovery=discovery, identity=identity, economy=economy)
    node.app = create_app(node.state, cfg.api)
    if economy is not None:
        from openhydra.api.routes_economy import register_economy_routes

        register_economy_routes(node.app, economy)
    return node
