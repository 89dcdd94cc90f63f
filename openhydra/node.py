"""One node's lifecycle: load its span, serve it to peers over gRPC, announce it, coordinate requests.

A node with every layer and discovery off is a plain local server (LocalPipeline). Any other node is
part of a swarm: its peer server holds a span, an announcer keeps its record alive in discovery, and
its coordinator runs requests through a chain of peers (SwarmPipeline), unless this node itself holds
the whole model, in which case it serves locally and still offers its layers to others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from openhydra.api.state import NodeState, ServedModel
from openhydra.catalog import ModelChoice, resolve_model
from openhydra.config.schema import NodeConfig
from openhydra.router.engine import Engine
from openhydra.router.pipeline import LocalPipeline
from openhydra.runtime.model_cache import ConversionError
from openhydra.runtime.source import ModelSourceError
from openhydra.runtime.source_format import source_fields
from openhydra.runtime.weights import CheckpointError
from openhydra.weights.manifest import ManifestError

log = logging.getLogger(__name__)

_EXPLAINED_LOAD_ERRORS = (CheckpointError, ConversionError, ManifestError, ModelSourceError)
"""Load failures whose message names the file and the fix: logged as one line, without a traceback."""


def eos_token_ids(tokenizer, model_dir: Path) -> set[int]:
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


def _served_quantization(backend) -> str | None:
    quantization = getattr(backend, "quantization", "none")
    return None if quantization in (None, "none") else str(quantization)


def _kernel_summary(runtime) -> str | None:
    """What multiplies a torch span's CPU int8/int4 weights, or its bf16 ones under hardware.matmul=library
    (runtime/quant_cpu.py), None for other spans; "... with its norms and attention" where the low-bit library runs
    those too (runtime/kernel_attention.py)."""
    modules = getattr(runtime, "modules", None)
    library = getattr(runtime, "bf16_kernel", False)
    if (getattr(runtime, "quantization", "none") in (None, "none") and not library) or modules is None:
        return None
    from openhydra.runtime.quant_cpu import kernel_summary

    summary = kernel_summary(modules)
    if summary and getattr(runtime, "kernel_attention", False):
        summary += ", with its norms and attention"
    return summary


def model_parameter_count(model_dir: Path, runtime=None) -> int:
    """The whole model's parameter count from its checkpoint's headers (what /api/show and the dashboard report):
    not the span's, and not its packed int4/int8 tensors' element count. The span's own count where the checkpoint
    cannot say (a backend that reads another format); 0 where there is no span either (a fallback model served
    through the swarm from a folder without weights)."""
    from openhydra.hardware.dtype import span_parameter_count

    try:
        return span_parameter_count(model_dir, 0, None)
    except Exception as exc:  # a count for display only: never fail the node for it
        log.debug("no parameter count from %s (%s); reporting the span's", model_dir, exc)
        return int(runtime.parameter_count) if runtime is not None else 0


def model_num_layers(model_dir: Path) -> tuple[int, int]:
    """(decoder layers, context length) from a checkpoint's config, without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = getattr(config, "text_config", None) or config
    return int(text.num_hidden_layers), int(getattr(text, "max_position_embeddings", 4096) or 4096)


class _EconomyStatus:
    """The economy section of /v1/network/status."""

    def __init__(self, economy) -> None:
        self.economy = economy

    def network_status(self) -> dict:
        from openhydra.api.routes_economy import economy_status

        return economy_status(self.economy)


class BackgroundLoop:
    """An asyncio loop on its own thread for discovery and announcements (their APIs are async)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="node-background", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@dataclass
class Node:
    cfg: NodeConfig
    backend: object
    discovery: object
    identity: object
    economy: object = None
    state: NodeState = field(default_factory=NodeState)
    app: object = None
    peer_server: object = None
    announcer: object = None
    swarm: object = None
    own_view: object = None
    """discovery/own_view.OwnView: the coordinator's lookups, with this node's own span in them."""
    stake_holder: object = None
    """economy/remote_stake.StakeHolder: holds in this node's ledger the stake other peers announce (HYDRA on)."""
    background: BackgroundLoop | None = None
    span: tuple[int, int] | None = None
    fatal_error: str | None = None
    """Why the node cannot serve at all (its peer port cannot be bound): openhydra-node exits with it."""
    privacy: object = None
    _admission_privacy: object = None
    """The NodePrivacy built before the model loads, so the join proof of work is solved meanwhile."""
    swarm_spans: dict = field(default_factory=dict)
    """Folders fetched from the swarm -> the span they were fetched for (openhydra/weights/node_hook.py)."""
    _fallback_swarms: list = field(default_factory=list)
    _fallback_settlers: list = field(default_factory=list)
    _view_refresh_stop: threading.Event = field(default_factory=threading.Event)
    _view_refresh: threading.Thread | None = None
    transport: object = None
    """peer/libp2p_transport.Libp2pTransport when peer.transport is libp2p or auto (None: gRPC only)."""
    reachability: object = None
    """Its Reachability (direct, relayed, unreachable and why); for transport=grpc, direct by assumption."""

    @property
    def in_swarm(self) -> bool:
        from openhydra.discovery.service import NullDiscovery

        has_discovery = self.discovery is not None and not isinstance(self.discovery, NullDiscovery)
        return self.cfg.shard.mode != "full" or has_discovery

    # -- loading -------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Resolve, fetch/convert and load; fills `state` (or `state.load_error`). Runs in a thread."""
        state, cfg = self.state, self.cfg
        started = time.perf_counter()
        try:
            if self.in_swarm:
                self._prepare_admission()
            state.loading_stage = "resolving model source"
            from openhydra.weights.node_hook import swarm_fetch_for  # weights from the swarm (issue 19)

            choice = resolve_model(cfg.model, cfg.node.model_cache_path, cfg.node.hub_probe_timeout_s,
                                   swarm_fetch=swarm_fetch_for(self) if self.in_swarm else None,
                                   prefer_swarm=cfg.shard.mode != "full")  # a shard (auto-promotion): its span only
            state.requested_model = choice.requested_name
            num_layers, context = model_num_layers(choice.path)
            self.span = self.swarm_spans.get(choice.path) or self._choose_span(choice, num_layers)
            first, end = self.span
            state.loading_stage = f"loading {choice.api_name} layers [{first}, {end}) from {choice.path}"
            log.info("loading %s layers [%d, %d) of %d from %s (%s)", choice.api_name, *self.span, num_layers,
                     choice.source, self.backend.describe())
            from transformers import AutoTokenizer

            from openhydra.router.coalesce import Coalescer
            from openhydra.runtime.serving import ServingConfig, ServingStatus, apply_serving

            tokenizer = AutoTokenizer.from_pretrained(choice.path)
            runtime = self.backend.load_span(choice.path, *self.span)
            serving = ServingConfig.parse(cfg.serving)  # prefix cache, continuous batching, coalescing
            apply_serving(serving, runtime)
            if self.in_swarm:
                self._join_swarm(choice, runtime, num_layers)
                if serving.prefix_cache.enabled:  # new sessions reuse prompt prefixes the peers hold
                    from openhydra.router.prefix_plan import PrefixPlanner

                    self.swarm.prefix = PrefixPlanner(serving.prefix_cache.block)
            pipeline = (LocalPipeline(runtime, prefix_block=serving.prefix_cache.block)
                        if runtime.is_first and runtime.is_last else self.swarm)
            speculator = self._speculator(choice, pipeline)
            engine = Engine(tokenizer, pipeline, eos_token_ids=eos_token_ids(tokenizer, choice.path),
                            context_length=context, max_concurrent_sessions=cfg.api.max_concurrent_sessions,
                            max_queued_requests=cfg.api.max_queued_requests, queue_timeout_s=cfg.api.queue_timeout_s,
                            speculator=speculator, decode_ahead=serving.decode_ahead)
            engine.coalescer = Coalescer() if serving.coalesce else None
            planner = getattr(self.swarm, "prefix", None) if pipeline is self.swarm else pipeline
            self.state.extra["serving"] = ServingStatus(runtime, engine.coalescer, planner)
            if self.economy is not None and getattr(self.economy, "enabled", False):
                self.state.extra["economy"] = _EconomyStatus(self.economy)
                if runtime.is_first and runtime.is_last:
                    engine.on_finish = lambda final: self._settle_local(choice.api_name, num_layers, final)
            aliases = [choice.requested_name] if choice.requested_name != choice.api_name else []
            state.model = ServedModel(
                id=choice.api_name, aliases=aliases, source=choice.source, family=str(runtime.model_type),
                parameter_count=model_parameter_count(choice.path, runtime), weight_bytes=runtime.loaded_bytes,
                dtype=str(runtime.dtype).removeprefix("torch."), context_length=context, num_layers=num_layers,
                span=self.span, degradation_reason=choice.degradation_reason,
                dtype_reason=getattr(self.backend, "dtype_reason", None), kernel=_kernel_summary(runtime),
                served_quantization=_served_quantization(self.backend), **source_fields(choice.path),
            )
            state.engine = engine
            if self.swarm is not None:
                self._install_degrader(choice, runtime)
            if pipeline is self.swarm:  # /readyz: ready when a chain of peers covers the model, not only our span
                state.route_check = self._route_readiness
            state.loading_stage = "ready"
            kernel = f" (int8/int4 weights: {state.model.kernel})" if state.model.kernel else ""
            log.info("ready: %s layers [%d, %d) in %.1f s%s", choice.api_name, *self.span,
                     time.perf_counter() - started, kernel)
            from openhydra.hardware.auto import maybe_promote_node

            maybe_promote_node(self)  # hardware=auto in a swarm: recommend a bigger model for the next start
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            state.loading_stage = "failed"
            from openhydra.peer.server import CannotBind

            if isinstance(exc, CannotBind):  # no retry or other model fixes this: the node stops (cli.py)
                self.fatal_error = str(exc)
                log.error("cannot serve: %s", exc)
                return
            if isinstance(exc, _EXPLAINED_LOAD_ERRORS):  # the message says what is wrong and what to do
                log.error("model load failed: %s", state.load_error)
            else:  # a bug or something unforeseen: the traceback is what a report needs
                log.exception("model load failed: %s", state.load_error)

    def _speculator(self, choice: ModelChoice, pipeline):
        """Speculative decoding at this coordinator (speculative group; router/speculative.py), or None."""
        from openhydra.catalog import model_source
        from openhydra.router.speculative import speculator_for_node

        def load_draft(entry):
            path, source = model_source(entry, self.cfg.node.model_cache_path, self.cfg.node.hub_probe_timeout_s)
            log.info("draft model for speculative decoding: %s", source)
            return self.backend.load_span(path, 0, None)

        swarm = pipeline if pipeline is self.swarm else None
        speculator = speculator_for_node(
            self.cfg.speculative, self.cfg.model, choice.path, pipeline, load_draft,
            onion=bool(swarm is not None and swarm.client.privacy.onion),
            audited=bool(swarm is not None and swarm.verifier is not None),
        )
        if speculator is not None:
            self.state.extra["speculative"] = speculator  # /metrics and /v1/network/status
        return speculator

    def _choose_span(self, choice: ModelChoice, num_layers: int) -> tuple[int, int]:
        shard = self.cfg.shard
        if shard.mode != "auto":
            return shard.span(num_layers)
        from openhydra.router.spans import choose_span

        self._ensure_background()
        records = self.background.run(self.discovery.lookup(choice.api_name))
        max_layers = shard.max_layers or num_layers
        if shard.max_fraction is not None:  # auto-promotion sized the span by memory (hardware/promote.py)
            max_layers = min(max_layers, max(1, int(shard.max_fraction * num_layers)))
        span = choose_span(records, num_layers, max_layers, model_id=choice.api_name)
        log.info("shard=auto: %d peers announced; serving the least covered span [%d, %d)", len(records), *span)
        return span

    def _settle_local(self, model_id: str, num_layers: int, final) -> None:
        """This node ran every layer: it is the only peer of the settlement, and signs it itself."""
        from openhydra.economy.receipts import build_settlement

        tokens = final.prompt_tokens + final.completion_tokens
        settlement = build_settlement(uuid.uuid4().hex, model_id, tokens, [(self.economy.identity, num_layers)])
        self.economy.settle(settlement)

    # -- swarm ---------------------------------------------------------------------------------------
    def _ensure_background(self) -> None:
        if self.background is None:
            self.background = BackgroundLoop()
            self.background.run(self.discovery.start(), timeout=60)

    def _prepare_admission(self) -> None:
        """Build the privacy hook and start this window's join proof of work (membership.py: a niced child
        process) now, so it is solved while the model loads; the first announcement waits for it."""
        from openhydra.peer.node_privacy import node_privacy

        self._admission_privacy = node_privacy(self.cfg.privacy, self.identity)
        peer_id = self.cfg.node.peer_id or getattr(self.identity, "peer_id", None)
        if peer_id:
            self._admission_privacy.membership.prepare(peer_id)

    def _join_swarm(self, choice: ModelChoice, runtime, num_layers: int) -> None:
        from openhydra.discovery.announcer import Announcer
        from openhydra.discovery.own_view import OwnView
        from openhydra.discovery.records import PeerAnnouncement
        from openhydra.peer.client import PeerChainClient
        from openhydra.peer.node_privacy import node_privacy
        from openhydra.peer.server import PeerServer
        from openhydra.router.swarm import SwarmPipeline
        from openhydra.verification.config import VerificationConfig
        from openhydra.verification.factory import build_verifier
        from openhydra.verification.faults import FaultyRuntime

        cfg = self.cfg
        self._ensure_background()
        vcfg = VerificationConfig.model_validate(cfg.verification or {})  # verification hook
        if vcfg.fault.mode != "none":  # a dishonest peer on purpose (tests, demos)
            runtime = FaultyRuntime(runtime, vcfg.fault)
        privacy = self._admission_privacy or node_privacy(cfg.privacy, self.identity)  # privacy hook: keys, signing
        from openhydra.economy.peer_settlement import PeerSettlement  # settlement hook: sign what we served

        signer = self.identity or getattr(self.economy, "identity", None)  # privacy=off: the economy's key
        settlement = (PeerSettlement(signer, self.economy, choice.api_name, (runtime.start, runtime.end),
                                     model_layers=runtime.num_layers)
                      if signer is not None else None)
        hop_address = self._start_transport()  # reachability hook: libp2p, relays (peer/libp2p_transport.py)
        self.peer_server = PeerServer(runtime, cfg.peer.host, cfg.peer.port, model_id=choice.api_name,
                                      static_key=privacy.static, require_encryption=privacy.encrypt,
                                      swarm_token=privacy.membership.token, settlement=settlement,
                                      retain_bytes=int(cfg.peer.retain_activations_mb * (1 << 20)),
                                      advertise_address=hop_address, advertise_host=cfg.peer.advertise_host)
        privacy.install_verifier(self.discovery)
        from openhydra.weights.node_hook import share_weights  # weights from the swarm: serve this span's tensors

        self.peer_server.weights = share_weights(choice.path, (runtime.start, runtime.end),
                                                 cfg.peer.share_weights_mbps, self.identity)
        weights_manifest = self.peer_server.weights.content_hash if self.peer_server.weights else None
        grpc_address = self.peer_server.start()
        if self.transport is not None:
            self.transport.serve(grpc_address)  # calls arriving over libp2p replay into our gRPC server
        grpc_address = self.peer_server.hop_address  # what discovery announces and routes name
        p2p_maddrs, reachable = self._p2p_record_fields()
        peer_id = cfg.node.peer_id or self.identity.peer_id
        if hasattr(self.discovery, "set_identity"):  # discovery hook: only the owner withdraws its record
            self.discovery.set_identity(privacy.identity)
            if peer_id != getattr(privacy.identity, "peer_id", None):  # a plain name (privacy=off): unsigned swarm
                self.discovery.set_allow_unsigned_names(True)
        dtype = str(runtime.dtype).removeprefix("torch.")
        instance = uuid.uuid4().hex  # this process: a restart is a new instance of the same peer id
        staking = self.identity is not None and bool(getattr(self.economy, "hydra_enabled", False))

        def make_record(now: float, ttl_s: float) -> PeerAnnouncement:
            engine = self.state.engine
            return privacy.sign(PeerAnnouncement(
                peer_id=peer_id, model_id=choice.api_name, start=runtime.start, end=runtime.end,
                total_layers=num_layers, grpc_address=grpc_address,
                api_address=f"{cfg.api.host}:{cfg.api.port}", dtype=dtype,
                backend=getattr(runtime, "numerics", "pytorch"),  # what audits match peers on
                active_sessions=len(engine.active_sessions) if engine else 0, announced_at=now, ttl_s=ttl_s,
                instance=instance, weights_manifest=weights_manifest, p2p_maddrs=p2p_maddrs, reachable=reachable,
                stake_micro=self._own_stake() if staking else None,  # held by the coordinators (remote_stake.py)
            ))

        if privacy.membership.difficulty_bits:  # the join proof of work (solved while the model loaded)
            waited = time.perf_counter()
            privacy.membership.wait(peer_id)
            log.info("proof of work for %s ready (%d bits; waited %.2f s for it after loading)", peer_id,
                     privacy.membership.difficulty_bits, time.perf_counter() - waited)
        self.announcer = Announcer(self.discovery, make_record)
        if getattr(self.reachability, "reachable", "direct") == "unreachable":  # nobody could use the span
            log.warning("not announcing layers [%d, %d): unreachable (%s)", runtime.start, runtime.end,
                        self.reachability.reason)
        else:
            try:
                self.background.run(self.announcer.announce_once(), timeout=30)
            except Exception as exc:  # the DHT may come up after us: the announcer keeps retrying
                log.warning("first announcement failed (%s); retrying in the background", exc)
            self.background.loop.call_soon_threadsafe(self.announcer.start)
        log.info("peer %s serving layers [%d, %d) at %s, announced to %s", peer_id, runtime.start, runtime.end,
                 grpc_address, type(self.discovery).__name__)
        maddrs = self.kademlia_maddrs()
        if maddrs:
            log.info("kademlia DHT reachable at %s (other nodes: discovery.kademlia.initial_peers=[...])",
                     " ".join(maddrs))

        def fetch() -> list[PeerAnnouncement]:
            return self.background.run(self.discovery.lookup(choice.api_name), timeout=15)

        def own() -> PeerAnnouncement | None:  # this node's span, while it announces it (discovery/own_view.py)
            announcer = self.announcer
            return make_record(time.time(), announcer.ttl_s) if announcer is not None and announcer.running else None

        self.own_view = view = OwnView(fetch, own, peer_id, max_keep_s=self.announcer.ttl_s,
                                       withdrawn=lambda: self.discovery.withdrawn(choice.api_name))
        if staking:  # the stake other peers announce, held in this node's ledger (economy/remote_stake.py)
            from openhydra.economy.remote_stake import StakeHolder

            self.stake_holder = StakeHolder(self.economy, peer_id)
        self._start_view_refresh(view, self.announcer.interval_s / 2)

        def lookup() -> list[PeerAnnouncement]:
            records = view()
            if self.transport is not None:  # how to reach libp2p peers: the addresses their records announce
                from openhydra.peer.libp2p_transport import p2p_peer_of

                for r in records:
                    if r.p2p_maddrs and p2p_peer_of(r.grpc_address):
                        self.transport.learn(p2p_peer_of(r.grpc_address), r.p2p_maddrs)
                    elif r.p2p_maddrs:  # transport=auto, reachable directly: libp2p if its gRPC port refuses us
                        self.transport.learn_fallback(r.grpc_address, r.p2p_maddrs)
            return records

        verifier = None  # verification hook: reputation routing + audits (verification=off: none)
        if vcfg.enabled:
            economy = self.economy if getattr(self.economy, "enabled", False) else None
            verifier = build_verifier(vcfg, cfg.node.data_path, stake_of=getattr(economy, "stake_of", None),
                                      slash=getattr(economy, "slash", None))
            self.state.extra["reputation"] = verifier
            if vcfg.referee:  # a third opinion on a span with too few peers to decide a vote
                verifier.referee = self._referee(choice, privacy, peer_id, num_layers, vcfg.referee_keep_s)
            if self.identity is not None:  # slash evidence: signed, spread and applied through discovery
                from openhydra.verification.evidence import attach_evidence

                attach_evidence(verifier, self.discovery, self.identity, lambda: make_record(time.time(), 3600.0),
                                privacy.sign, self.background.loop, choice.api_name)
        client = PeerChainClient([], reply_host=cfg.peer.host, reply_port=cfg.peer.reply_port,
                                 advertise_host=cfg.peer.advertise_host, tunables=self._client_tunables(),
                                 loop=self.peer_server.loop,  # one loop for the process's gRPC (PeerChainClient)
                                 **privacy.client_options(runtime, choice.path,
                                                          lambda: self.swarm.peers() if self.swarm else []))
        client.local_addresses.add(grpc_address)  # this process's own peer: a slow probe answer is our own load
        if cfg.peer.local_hop:  # steps to our own span skip gRPC on loopback (peer/local_stream.py)
            client.serve_locally(grpc_address, self.peer_server.service)
        settler = None  # settlement hook: every session through the swarm is settled (economy/swarm_settlement.py)
        if getattr(self.economy, "enabled", False):
            from openhydra.economy.swarm_settlement import SwarmSettler

            settler = SwarmSettler(self.economy, client, choice.api_name,
                                   free_tier_tokens_per_day=self.economy.config.free_tier_tokens_per_day)
            self.state.extra["settlement"] = settler
        self.swarm = SwarmPipeline(choice.api_name, num_layers, lookup, client,
                                   score=verifier.score if verifier else None, verifier=verifier,
                                   on_failover=verifier.on_hop_failure if verifier else None,
                                   on_session_end=settler.submit if settler else None,
                                   # onion routing makes no direct call to a middle hop: bans alone, as before
                                   probe=None if client.privacy.onion else client.answers)
        self.privacy = privacy
        self.state.extra["swarm"] = self
        self.state.extra["privacy"] = privacy.status(self.peer_server, self.swarm)  # /metrics + status

    def _referee(self, choice: ModelChoice, privacy, peer_id: str, num_layers: int, keep_s: float):
        """verification/referee.py: this coordinator serves a disputed span itself, from its model folder, on a port
        of its own (never announced), with this node's keys, so a tied vote has a third voter."""
        from openhydra.discovery.records import PeerAnnouncement
        from openhydra.peer.server import PeerServer
        from openhydra.runtime.shard import ShardRuntime
        from openhydra.verification.referee import Referee, load_span

        cfg, backend = self.cfg, self.backend

        def load(span: tuple[int, int], dtype: str) -> ShardRuntime:
            return load_span(choice.path, span, dtype, device=getattr(backend, "device", "cpu"),  # MLX: torch, CPU
                             quantization=getattr(backend, "quantization", "none"),
                             matmul=getattr(backend, "matmul", "pytorch"))

        def serve(runtime: ShardRuntime) -> PeerServer:
            return PeerServer(runtime, cfg.peer.host, 0, model_id=choice.api_name, static_key=privacy.static,
                              require_encryption=privacy.encrypt, swarm_token=privacy.membership.token,
                              advertise_host=cfg.peer.advertise_host)

        def record(runtime: ShardRuntime, address: str) -> PeerAnnouncement:
            return privacy.sign(PeerAnnouncement(
                peer_id=peer_id, model_id=choice.api_name, start=runtime.start, end=runtime.end,
                total_layers=num_layers, grpc_address=address, dtype=str(runtime.dtype).removeprefix("torch."),
                backend=getattr(runtime, "numerics", "pytorch"), announced_at=time.time(), ttl_s=keep_s))

        return Referee(load, serve, record, keep_s=keep_s)

    # -- reachability (peer/libp2p_transport.py) --------------------------------------------------------
    def _start_transport(self) -> str | None:
        """Start libp2p when peer.transport asks for it and find out how others reach us; the hop address to
        announce when that is not our gRPC address (``<libp2p id>.p2p:1``), else None."""
        from openhydra.peer.libp2p_transport import Reachability

        peer = self.cfg.peer
        if peer.transport == "grpc":
            self.reachability = Reachability(reachable="direct", transport="grpc",
                                             reason=f"transport=grpc: assumed reachable at {peer.host}:{peer.port} "
                                                    "(not checked)")
            return None
        from openhydra.peer import libp2p_transport as lt

        relay = bool((self.cfg.discovery or {}).get("relay", True)) and not peer.libp2p.behind_nat
        settings = lt.Libp2pSettings(**peer.libp2p.model_dump(), relay_service=relay)
        self.transport = lt.Libp2pTransport(settings)
        self.transport.start()
        lt.install(self.transport)  # every ChannelPool dials ``*.p2p`` hop addresses through it
        self.reachability = self.transport.wait_reachable().model_copy(update={"transport": peer.transport})
        log.info("reachable: %s (%s); libp2p %s %s", self.reachability.reachable, self.reachability.reason,
                 self.transport.peer_id, " ".join(self.reachability.relayed_maddrs or self.reachability.maddrs))
        if peer.transport == "libp2p" or self.reachability.reachable != "direct":
            return lt.p2p_address(self.transport.peer_id)
        return None

    def _p2p_record_fields(self) -> tuple[list[str] | None, str | None]:
        reach = self.reachability
        if self.transport is None or reach is None or reach.reachable == "unreachable":
            return None, None
        direct = [m for m in reach.maddrs if "/ip4/127." not in m] if reach.reachable == "direct" else []
        return (direct + list(reach.relayed_maddrs))[:16] or None, reach.reachable

    def reachability_status(self) -> dict:
        """The reachability section of /v1/network/status: ours, and the path to each libp2p peer we talk to."""
        out = self.reachability.model_dump() if self.reachability is not None else {"reachable": "unknown"}
        if self.transport is not None:
            out["libp2p_paths"] = self.transport.paths()
            out["libp2p_calls"] = dict(self.transport.calls)
        return out

    def hop_paths(self, chain_peer_ids: list[str], paths: dict | None = None) -> list[dict]:
        """Per hop of a chain, as this node sees it: gRPC, or the libp2p connection (direct or relayed)."""
        from openhydra.peer.libp2p_transport import p2p_peer_of

        records = {r.peer_id: r for r in self.swarm.peers()} if self.swarm is not None else {}
        if paths is None:
            paths = self.transport.paths() if self.transport is not None else {}
        out = []
        for pid in chain_peer_ids:
            address = records[pid].grpc_address if pid in records else ""
            libp2p_id = p2p_peer_of(address) if address else None
            out.append({"peer_id": pid, "address": address,
                        "path": paths.get(libp2p_id, "not connected") if libp2p_id else "grpc"})
        return out

    def _route_readiness(self):
        """``GET /readyz`` of a node that routes through peers: would a request find a chain now (its own model's, or
        the fallback the degrader would serve)? Over the last lookup (at most ``lookup_ttl_s`` old); builds nothing."""
        from openhydra.api.state import RouteReadiness

        assert self.swarm is not None
        degrader = self.state.degrader
        if degrader is not None:
            picked = degrader.covered()
            if picked is not None:
                return RouteReadiness(True, served=picked[0], degradation_reason=picked[1])
        covered, holes = self.swarm.route_report()
        return RouteReadiness(covered, served=self.swarm.model_id if covered else None, holes=holes)

    # -- degradation to a smaller covered model ---------------------------------------------------------
    def _install_degrader(self, choice: ModelChoice, runtime) -> None:
        """Per request: this model if the swarm covers it, else the nearest smaller covered fallback."""
        from openhydra.catalog import api_name, fallback_entries
        from openhydra.router.degrade import ModelDegrader

        chain = [(api_name(entry), entry) for _, entry in fallback_entries(self.cfg.model)]
        names = [name for name, _ in chain]
        if choice.api_name in names:  # already serving a fallback: only smaller ones remain
            chain = chain[names.index(choice.api_name) + 1 :]
        entries = {name: entry for name, entry in chain if name != choice.api_name}
        if not entries:
            return
        holds_all = runtime.is_first and runtime.is_last
        self.state.degrader = ModelDegrader(
            choice.api_name, (self.state.model, self.state.engine),
            None if holds_all else self.swarm.coverage_map, list(entries), self._lookup_model,
            lambda model_id, _cmap: self._build_fallback(model_id, entries[model_id]),
            banned=self.swarm.avoided,
        )
        log.info("degradation chain when %s lacks coverage: %s", choice.api_name, ", ".join(entries))

    def _start_view_refresh(self, view, every_s: float) -> None:
        """Keep ``view`` (discovery/own_view.py) at most ``every_s`` old even when no request comes to this node, so it
        knows the swarm when the DHT goes down. A daemon thread: a lookup blocks on the background loop."""
        stop = self._view_refresh_stop

        def run() -> None:
            while not stop.wait(every_s):
                view.refresh_if_idle(every_s)
                if self.stake_holder is not None:
                    self.stake_holder.sync(view())

        self._view_refresh = threading.Thread(target=run, name="own-view-refresh", daemon=True)
        self._view_refresh.start()

    def _own_stake(self) -> int | None:
        """The stake to announce (economy/remote_stake.py); None at 0: a record without the field stays readable by
        nodes that predate it, and coordinators read a missing stake as 0."""
        try:
            return int(self.economy.stake_of(self.economy.peer_id)) or None
        except Exception as exc:  # a busy ledger: announce no stake this time rather than no record
            log.warning("stake not announced this time: %s", exc)
            return None

    def _client_tunables(self):
        from openhydra.peer.client import ClientTunables

        return ClientTunables(step_timeout_s=self.cfg.peer.step_timeout_s,
                              decode_timeout_s=self.cfg.peer.decode_timeout_s,
                              probe_timeout_s=self.cfg.peer.probe_timeout_s)

    def _lookup_model(self, model_id: str) -> list:
        return self.background.run(self.discovery.lookup(model_id), timeout=15)

    def _build_fallback(self, model_id: str, entry) -> tuple:
        """A coordinator for a model this node holds no layers of: tokenizer, embeddings, a chain client."""
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from openhydra.catalog import model_source
        from openhydra.peer.client import PeerChainClient
        from openhydra.router.swarm import SwarmPipeline
        from openhydra.runtime.serving import ServingConfig

        cfg = self.cfg
        path, source = model_source(entry, cfg.node.model_cache_path, cfg.node.hub_probe_timeout_s)
        num_layers, context = model_num_layers(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        swarm: SwarmPipeline | None = None
        options = self.privacy.client_options(None, path, lambda: swarm.peers() if swarm else [],
                                              dtype=torch.float32)
        # Its own reply port: the node's fixed peer.reply_port (if any) belongs to its primary model's client.
        client = PeerChainClient([], reply_host=cfg.peer.host, advertise_host=cfg.peer.advertise_host,
                                 tunables=self._client_tunables(), **options,
                                 loop=self.peer_server.loop if self.peer_server is not None else None)
        settler = None  # degraded requests are settled like any other (economy/swarm_settlement.py)
        primary_settler = self.state.extra.get("settlement")
        if primary_settler is not None:
            from openhydra.economy.swarm_settlement import SwarmSettler

            settler = SwarmSettler(self.economy, client, model_id)
            settler.free_tier = primary_settler.free_tier  # one free tier per node, whatever the model
            self._fallback_settlers.append(settler)
        swarm = SwarmPipeline(model_id, num_layers, lambda: self._lookup_model(model_id), client,
                              bans=self.swarm.bans, on_session_end=settler.submit if settler else None)
        engine = Engine(tokenizer, swarm, eos_token_ids=eos_token_ids(tokenizer, path), context_length=context,
                        max_concurrent_sessions=cfg.api.max_concurrent_sessions,
                        decode_ahead=ServingConfig.parse(cfg.serving).decode_ahead)
        text_config = AutoConfig.from_pretrained(path)
        served = ServedModel(id=model_id, aliases=[], source=source, parameter_count=model_parameter_count(path),
                             dtype="float32",
                             family=str(getattr(text_config, "model_type", "unknown")), context_length=context,
                             num_layers=num_layers, span=(0, 0), **source_fields(path))
        self._fallback_swarms.append(swarm)
        return served, engine

    def kademlia_maddrs(self) -> list[str]:
        """This node's Kademlia DHT multiaddrs (what others put in discovery.kademlia.initial_peers)."""
        kademlia = getattr(self.discovery, "kademlia", self.discovery)
        try:
            return list(kademlia.visible_maddrs) if hasattr(kademlia, "visible_maddrs") else []
        except Exception:  # not started
            return []

    def network_status(self) -> dict:
        status: dict = {"peer": None, "pipeline": None}
        maddrs = self.kademlia_maddrs()
        if maddrs:
            status["kademlia_maddrs"] = maddrs
        if self.peer_server is not None:
            status["peer"] = {"grpc_address": self.peer_server.hop_address, "span": list(self.span or ())}
            if self.peer_server.weights is not None:
                status["peer"]["weights"] = self.peer_server.weights.status()
        status["reachability"] = self.reachability_status()
        if self.swarm is not None:
            status["pipeline"] = self.swarm.status()
            paths = status["reachability"].get("libp2p_paths", {})
            status["pipeline"]["hop_paths"] = {sid: self.hop_paths(ids, paths)
                                               for sid, ids in status["pipeline"].get("sessions", {}).items()}
            if self.state.degrader is not None:
                status["degradation"] = self.state.degrader.status()
            probation = set(status["pipeline"]["on_probation"])
            status["peers"] = [
                {"peer_id": r.peer_id, "span": [r.start, r.end], "grpc_address": r.grpc_address,
                 "api_address": r.api_address, "dtype": r.dtype, "load": r.load,
                 "throughput_tps": r.throughput_tps, "age_s": round(time.time() - r.announced_at, 1),
                 "banned": self.swarm.bans.is_banned(r.peer_id), "on_probation": r.peer_id in probation,
                 "instance": r.instance}
                for r in self.swarm.peers()
            ]
        if self.own_view is not None:  # after the lookups above: the state they left
            status["discovery"] = self.own_view.status()
        return status

    # -- shutdown ------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._view_refresh_stop.set()  # no lookups while the node winds down; one in flight ends before discovery
        if self._view_refresh is not None:
            self._view_refresh.join(timeout=5.0)
        if self._admission_privacy is not None:
            self._admission_privacy.membership.close()  # a proof still being solved is no longer needed
        if self.state.engine is not None:
            self.state.engine.shutdown()
        for settler in self._fallback_settlers:  # they still call the peers: before the clients close
            settler.shutdown()
        for swarm in self._fallback_swarms:
            swarm.client.shutdown()
        if "settlement" in self.state.extra:
            self.state.extra["settlement"].shutdown()  # finish queued settlements before the ledger closes
        if self.economy is not None and hasattr(self.economy, "close"):
            self.economy.close()  # flushes and closes the ledger
        if self.background is not None:
            if self.announcer is not None:
                try:
                    self.background.run(self.announcer.stop(withdraw=True), timeout=10)
                except Exception as exc:
                    log.warning("could not withdraw the announcement: %s", exc)
            try:
                self.background.run(self.discovery.stop(), timeout=10)
            except Exception as exc:
                log.debug("discovery stop: %s", exc)
            self.background.stop()
        if self.swarm is not None and getattr(self.swarm, "verifier", None) is not None:  # verification hook
            self.swarm.verifier.shutdown()  # its audits call the peers: before the client's loop stops
        if self.swarm is not None and getattr(self.swarm.client, "shares_loop", False):
            self.swarm.client.shutdown()  # its reply server and streams live on the peer server's loop
        if self.peer_server is not None:
            self.peer_server.stop()
        if self.transport is not None:
            self.transport.stop()
