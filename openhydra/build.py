"""The only place that instantiates components from config.

Shared objects are built once here and handed to the objects that need them; components never read
the global config. `build_node` returns a `Node` whose model loads in the background, so the API
answers /health and /readyz (503) while weights are fetched, converted and loaded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from openhydra.api.app import create_app
from openhydra.api.state import NodeState, ServedModel
from openhydra.catalog import resolve_model
from openhydra.config.schema import NodeConfig
from openhydra.router.engine import Engine
from openhydra.router.pipeline import LocalPipeline

log = logging.getLogger(__name__)


def _eos_ids(tokenizer, model_dir) -> set[int]:
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@dataclass
class Node:
    cfg: NodeConfig
    raw_cfg: DictConfig
    state: NodeState = field(default_factory=NodeState)
    app: object = None
    backend: object = None

    def load_model(self) -> None:
        """Resolve, fetch/convert and load the model; fills `state` (or `state.load_error`)."""
        state, cfg = self.state, self.cfg
        started = time.perf_counter()
        try:
            state.loading_stage = "resolving model source"
            choice = resolve_model(cfg.model, cfg.node.data_path, cfg.node.hub_probe_timeout_s)
            state.requested_model = choice.requested_name
            state.loading_stage = f"loading {choice.api_name} from {choice.path}"
            log.info("loading %s from %s (%s)", choice.api_name, choice.source, self.backend.describe())
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(choice.path)
            runtime = self.backend.load_span(choice.path, 0, None)
            span = (runtime.start, runtime.end)
            context = int(getattr(runtime.config, "max_position_embeddings", 4096) or 4096)
            engine = Engine(
                tokenizer,
                LocalPipeline(runtime),
                eos_token_ids=_eos_ids(tokenizer, choice.path),
                context_length=context,
                max_concurrent_sessions=cfg.api.max_concurrent_sessions,
            )
            aliases = [choice.requested_name] if choice.requested_name != choice.api_name else []
            state.model = ServedModel(
                id=choice.api_name,
                aliases=aliases,
                source=choice.source,
                family=str(runtime.model_type),
                parameter_count=int(getattr(runtime, "parameter_count", 0) or 0),
                dtype=str(runtime.dtype).removeprefix("torch."),
                context_length=context,
                num_layers=runtime.num_layers,
                span=span,
                degradation_reason=choice.degradation_reason,
            )
            state.engine = engine
            state.loading_stage = "ready"
            log.info("ready: %s layers [%d, %d) in %.1f s", choice.api_name, *span, time.perf_counter() - started)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            state.loading_stage = "failed"
            log.error("model load failed: %s", state.load_error)


def build_node(cfg: NodeConfig, raw: DictConfig) -> Node:
    logging.getLogger().setLevel(cfg.node.log_level)
    node = Node(cfg=cfg, raw_cfg=raw)
    node.backend = instantiate(raw.hardware)
    node.app = create_app(node.state, cfg.api)
    torch.set_grad_enabled(False)
    return node
