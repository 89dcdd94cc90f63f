"""Pydantic schemas for the composed node config: one model per config group.

Every option file of a group is validated by that group's schema, so a typo in a YAML file or an
override fails at start with the key and the allowed values. Groups owned by other packages
(discovery, privacy, economy, compaction, verification) keep their schema next to their code and
are referenced here by import path.
"""

from __future__ import annotations

import importlib
import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class HardwareConfig(Strict):
    target: str = Field(alias="_target_")
    backend: Literal["auto", "torch", "mlx"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps", "gpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int = Field(0, ge=0, le=1024, strict=True)  # strict: "true" is not 1 thread
    quantization: Literal["none", "int8", "int4", "nf4"] = "none"
    """The span's decoder Linears: int8 (CUDA: bitsandbytes LLM.int8; CPU: weight-only int8), int4 (CPU only:
    torch's packed int4 kernel, groups of 32) or NF4 (bitsandbytes, CUDA or CPU); see runtime/quantize.py.
    Not implemented on MLX (it says so at start)."""
    matmul: Literal["pytorch", "library"] = "pytorch"
    """Unquantized bf16 on the CPU: "library" runs the decoder layers' and the head's matmuls on OpenHydra's low-bit
    library (runtime/lowbit.py Bf16Weight: the same bf16 weights, read at close to the memory's bandwidth at batch
    1; each row's bits independent of the row count, so speculative verifies and batched steps take their rows at
    once). Its greedy text is its own, not transformers' bf16 bits (the README's "Exact" is for "pytorch"); it is
    exact across a pipeline of peers that all use it. Elsewhere (fp32, quantized, GPU, no C compiler) it changes
    nothing."""
    memory_budget_gb: float | None = Field(None, gt=0)


class ModelConfig(Strict):
    name: str | None = None
    """Name clients use in requests (`model`); defaults to the folder name for local models."""
    hf_id: str | None = None
    path: str | None = None
    embedded: bool = False
    tier: Literal["embedded", "basic", "standard", "advanced", "frontier", "local"]
    memory_gb: float | None = None
    peers: int = Field(1, ge=1)
    quantization: Literal["fp32", "fp16", "bf16", "int8", "int4"] = "fp32"
    fallback: list[str] = []
    draft: str | None = None
    """Draft model for speculative=draft: a catalog option (conf/model/NAME.yaml) or a transformers folder."""
    params_b: float | None = Field(None, gt=0)
    """Parameter count in billions (auto-promotion's memory math: params x bytes per weight + overhead)."""
    num_layers: int | None = Field(None, ge=1)
    """Decoder layers (auto-promotion sizes shards with it; the checkpoint's config is what the node loads)."""
    source: Literal["auto", "swarm"] = "auto"
    """auto: path, hub or embedded, then the swarm if those fail (discovery on); swarm: fetch this span's tensors
    from peers only (openhydra/weights/fetch.py)."""
    manifest: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """Pinned content hash of the weights manifest (openhydra/weights/manifest.py): swarm fetches accept no other."""

    @model_validator(mode="after")
    def _has_a_source(self) -> ModelConfig:
        if not (self.hf_id or self.path or self.embedded or (self.source == "swarm" and self.name)):
            raise ValueError("a model needs hf_id, path or embedded=true (or source=swarm with a name)")
        return self


class ShardConfig(Strict):
    mode: Literal["full", "layers", "index", "auto"] = "full"
    start: int = Field(0, ge=0)
    end: int | None = Field(None, ge=1)
    index: int | None = Field(None, ge=0)
    total: int | None = Field(None, ge=1)
    max_layers: int | None = Field(None, ge=1)
    max_fraction: float | None = Field(None, gt=0, le=1)
    """shard=auto: hold at most this fraction of the model's layers (what auto-promotion's memory math gives)."""

    @model_validator(mode="after")
    def _consistent(self) -> ShardConfig:
        if self.mode == "layers" and (self.end is None or self.end <= self.start):
            raise ValueError(f"shard.end must be > shard.start (got start={self.start}, end={self.end})")
        if self.mode == "index" and (self.total is None or self.index is None or self.index >= self.total):
            raise ValueError(f"shard.index must be in [0, shard.total) (got {self.index} of {self.total})")
        if self.mode == "full" and (self.start != 0 or self.end is not None):
            raise ValueError(f"shard=full serves every layer: shard.start/shard.end (got {self.start}, {self.end}) "
                             f"need shard=layers")
        return self

    def span(self, num_layers: int) -> tuple[int, int]:
        """The [start, end) layer span this config selects in a model of ``num_layers`` layers."""
        if self.mode == "layers":
            end = self.end if self.end is not None else num_layers
            if end > num_layers:
                raise ValueError(f"shard.end={end} is past the model's {num_layers} layers")
            return self.start, end
        if self.mode == "index":
            assert self.index is not None and self.total is not None  # checked by the validator
            if self.total > num_layers:
                raise ValueError(f"shard.total={self.total} exceeds the model's {num_layers} layers")
            bounds = [round(i * num_layers / self.total) for i in range(self.total + 1)]
            return bounds[self.index], bounds[self.index + 1]
        return 0, num_layers


class ApiConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_header_bytes: int = Field(16384, ge=1024)
    request_timeout_s: float = Field(60, gt=0)
    response_timeout_s: float = Field(900, gt=0)
    keep_alive_timeout_s: float = Field(30, gt=0)
    default_max_tokens: int = Field(256, ge=1)
    max_tokens_limit: int = Field(8192, ge=1)
    max_concurrent_sessions: int = Field(32, ge=1, le=48)
    """Generations at once (the runtime keeps 64 sessions, some of them for other coordinators' requests: more
    generations would evict running ones)."""
    max_queued_requests: int = Field(64, ge=0)
    """Requests waiting for a generation slot when all are taken; beyond them, 503 with Retry-After."""
    queue_timeout_s: float = Field(30, gt=0)
    """How long a request waits for a slot before its 503."""
    rate_limit_requests: int = Field(120, ge=1)
    rate_limit_window_s: float = Field(60, gt=0)
    probe_rate_limit_requests: int = Field(1200, ge=1)
    """/health, /readyz, /metrics and the dashboard's poll: their own per-client budget per window, apart from the
    API's."""
    body_timeout_s: float = Field(30, gt=0)
    """From the end of a request's headers to the end of its body; then 408 and the connection closes."""
    max_connections_per_ip: int = Field(64, ge=1)
    """Open TCP connections per client address (trusted proxies are exempt); more are refused with 429."""
    trusted_proxies: list[str] = []
    """CIDRs of reverse proxies whose X-Forwarded-For is believed (the rightmost untrusted entry is the client)."""
    bearer_token: str | None = None
    """Every API request must carry ``Authorization: Bearer <token>`` (api/auth.py); at least 16 characters."""
    cors_origins: list[str] = []
    """Web origins whose pages may call this API from a browser (api/cors.py); ["*"] for any."""
    allowed_hosts: list[str] = []
    """Host names (besides IP addresses, localhost and api.host) clients may reach the API by; "*.example.org" for a
    domain's names, ["*"] for any. Without a bearer token other names are refused (DNS rebinding: api/hosts.py)."""

    @field_validator("bearer_token")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 16:
            raise ValueError(f"must be at least 16 characters (this one has {len(value)}): use a random token, e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(24))'")
        return value

    @model_validator(mode="after")
    def _limits(self) -> ApiConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"api.default_max_tokens ({self.default_max_tokens}) must be <= api.max_tokens_limit "
                             f"({self.max_tokens_limit}): every request without max_tokens would be refused")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(str(cidr).strip(), strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network (e.g. 10.0.0.0/8 or ::1/128)") from None
        return [str(c).strip() for c in value]


class NodeSection(Strict):
    data_dir: str
    model_cache_dir: str = "~/.cache/openhydra"
    """Converted models and hub downloads, shared by every node on the machine (runtime/model_cache.py)."""
    cast_weights: bool = True
    """A span computed in another dtype than its checkpoint stores: cast once into ``<model_cache_dir>/casts`` and
    memory-mapped, shared by the machine's nodes (runtime/cast_store.py); false: cast in memory at every load."""
    peer_id: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    hub_probe_timeout_s: float = Field(2.0, gt=0, le=60)
    auto_promote: bool = True
    """With hardware=auto and discovery on: recommend a bigger model once ready, write local/auto.yaml."""

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def model_cache_path(self) -> Path:
        return Path(self.model_cache_dir).expanduser()


class Libp2pSection(Strict):
    """peer.libp2p: hivemind's p2pd for peers behind NAT (peer/libp2p_transport.py)."""

    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    relays: list[str] = Field(default_factory=list)
    """Relay multiaddrs (with /p2p/<id>): a NATed peer reserves a slot on them and reaches other NATed peers
    through them. libp2p's autorelay reserves at once when it knows 4 or more relays; with fewer it waits 3 min."""
    behind_nat: bool = False
    """This node accepts no inbound connection: serve through relays (reachable: relayed) or not at all."""
    reserve_timeout_s: float = Field(30.0, gt=0)
    relay_max_circuits: int = Field(16, ge=1, le=1024)
    """As a relay (discovery.relay=true, reachable): relayed connections per peer at once."""
    relay_max_reservations: int = Field(128, ge=1, le=65536)
    relay_data_limit_mb: int = Field(4096, ge=1)
    """As a relay: bytes one relayed connection may carry each way before it is reset."""
    relay_time_limit_s: int = Field(1800, ge=1)


class PeerSection(Strict):
    transport: Literal["grpc", "libp2p", "auto"] = "grpc"
    """How other nodes reach this peer: gRPC at host:port; libp2p (hivemind's p2pd, through relays when behind
    NAT); auto: gRPC when reachable directly, else libp2p."""
    libp2p: Libp2pSection = Field(default_factory=Libp2pSection)
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    advertise_host: str | None = None
    """The host other nodes dial to reach this one, on the same ports (peer.port, peer.reply_port): a router's
    public address with those ports forwarded, a container host, a relay. Default: peer.host."""
    reply_port: int = Field(0, ge=0, le=65535)
    """Coordinator: the port the last hop of a chain delivers results to; 0: any free port. Fix it (and forward
    it) when peers reach this node through peer.advertise_host."""
    step_timeout_s: float = Field(30.0, gt=0)
    """Coordinator: the longest one message (a prefill chunk or a decode step) may take while its chain reports
    progress; each chunk of a long prompt gets its own."""
    decode_timeout_s: float = Field(5.0, gt=0)
    """Coordinator: patience before probing a chain that has not answered a step (floor of an adaptive value:
    20x the median decode latency); a hop that stopped is blamed after this plus at most one probe."""
    probe_timeout_s: float = Field(1.0, gt=0, le=30)
    """Coordinator: a hop that does not answer a liveness probe (Info) within this is blamed."""
    retain_activations_mb: float = Field(256.0, ge=0)
    """Peer: hidden states it pushed, kept per session (LRU) so that when its successor fails only the replacement
    recomputes the history (peer/rebuild.py); 0: off (every failover replays the whole chain)."""
    share_weights_mbps: float = Field(100.0, ge=0)
    """Serve this span's weights to joining peers (openhydra/weights/serve.py) at most this fast, megabits/s
    over all their streams; 0: do not share."""
    local_hop: bool = True
    """Coordinator: steps to this node's own span are handed to its peer service on the event loop they share, not
    sent through gRPC on loopback (peer/local_stream.py); every other hop, and every unary call, stays gRPC."""

    @field_validator("advertise_host")
    @classmethod
    def _a_host_only(cls, host: str | None) -> str | None:
        if host is None:
            return None
        bare = host.strip()
        if not bare or any(c in bare for c in "/ ") or (":" in bare and not bare.startswith("[")):
            raise ValueError(f"{host!r} is not a host name or address (no port, no scheme: the ports stay "
                             "peer.port and peer.reply_port; IPv6 in brackets)")
        return bare


# Groups validated by schemas that live with the code that uses them.
EXTERNAL_GROUP_SCHEMAS: dict[str, str] = {
    "discovery": "openhydra.discovery.config:DiscoveryConfig",
    "privacy": "openhydra.crypto.config:PrivacyConfig",
    "economy": "openhydra.economy.config:EconomyConfig",
    "compaction": "openhydra.runtime.compaction.config:CompactionConfig",
    "verification": "openhydra.verification.config:VerificationConfig",
    "speculative": "openhydra.router.speculative_config:SpeculativeConfig",
    "serving": "openhydra.runtime.serving:ServingConfig",
}


def group_schema(group: str) -> type[BaseModel]:
    module_name, _, attr = EXTERNAL_GROUP_SCHEMAS[group].partition(":")
    return getattr(importlib.import_module(module_name), attr)


class NodeConfig(Strict):
    action: Literal["serve", "check", "promote", "demote", "dht"] = "serve"
    node: NodeSection
    peer: PeerSection
    hardware: HardwareConfig
    model: ModelConfig
    shard: ShardConfig
    api: ApiConfig
    discovery: dict[str, Any]
    privacy: dict[str, Any]
    economy: dict[str, Any]
    compaction: dict[str, Any]
    verification: dict[str, Any]
    speculative: dict[str, Any] = {}
    serving: dict[str, Any] = {}

    @property
    def joins_swarm(self) -> bool:
        """Whether the node will work with peers: a span short of the whole model, or discovery on (what
        ``Node.in_swarm`` says once built; the command line checks ports and the model folder by it before)."""
        return self.shard.mode != "full" or (self.discovery.get("_target_") is not None
                                             and self.discovery.get("mode", "off") != "off")

    @model_validator(mode="after")
    def _span_fits_the_model(self) -> NodeConfig:
        """A span past a catalog model's layers is refused now, not after minutes of loading (its layer count is in
        the catalog; a local folder's is known only once read)."""
        if self.model.num_layers is not None and self.shard.mode in ("layers", "index"):
            try:
                self.shard.span(self.model.num_layers)
            except ValueError as exc:
                raise ValueError(f"{exc} ({self.model.name})") from None
        return self

    @field_validator("speculative")
    @classmethod
    def _draft_model_set(cls, speculative: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        model = info.data.get("model")
        if (speculative or {}).get("mode") == "draft" and model is not None and not model.draft:
            raise ValueError("mode=draft needs a draft model: set model.draft=<catalog option or model folder>")
        return speculative
