"""The ``discovery`` config group: one schema for every option file in ``conf/discovery/``.

``hydra.utils.instantiate(cfg.discovery)`` calls :func:`build_discovery`, which validates the keys
with :class:`DiscoveryConfig` (unknown keys are errors that name the key) and returns a started-
later :class:`~openhydra.discovery.base.Discovery`: ``off`` -> Null, ``http`` -> HTTP DHT,
``kademlia`` -> hivemind DHT, ``dual`` -> both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from openhydra.discovery.base import Discovery

BUILD_TARGET = "openhydra.discovery.config.build_discovery"


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:8468"], min_length=1)

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return urls


class KademliaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_peers: list[str] = Field(default_factory=list)  # multiaddrs with /p2p/<peer id>
    host_maddrs: list[str] = Field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] = Field(default_factory=list)
    client_mode: bool = False  # behind NAT: query the DHT without serving it
    use_ipfs: bool = False  # bootstrap through public IPFS nodes (reaches the internet)
    use_relay: bool = False
    use_auto_relay: bool = False
    auto_nat: bool = False
    nat_port_map: bool = False
    key_prefix: str = Field(default="openhydra:v1", min_length=1)
    start_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("initial_peers", "host_maddrs", "announce_maddrs")
    @classmethod
    def _multiaddrs(cls, addrs: list[str]) -> list[str]:
        for addr in addrs:
            if not addr.startswith("/"):
                raise ValueError(f"expected a multiaddr like /ip4/127.0.0.1/tcp/0, got {addr!r}")
        return addrs

    @model_validator(mode="after")
    def _ipfs_or_peers(self) -> KademliaSettings:
        if self.use_ipfs and self.initial_peers:
            raise ValueError("use_ipfs and initial_peers cannot be combined; choose one")
        return self


class DiscoveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    target: str = Field(default=BUILD_TARGET, alias="_target_")
    mode: Literal["off", "http", "kademlia", "dual"]
    announce_interval_s: float = Field(default=60.0, gt=0)  # seconds between re-announcements
    ttl_s: float = Field(default=180.0, gt=0)  # seconds a record lives without refresh
    timeout_s: float = Field(default=5.0, gt=0)  # deadline of one discovery call, seconds
    # Use unsigned records under plain peer names (privacy=off swarms with node.peer_id). Key-derived peer ids
    # are always checked against their key. A node announcing under a plain name turns this on for itself.
    allow_unsigned_names: bool = False
    relay: bool = True
    """A node running libp2p (peer.transport=libp2p|auto) that is reachable directly serves as a circuit relay for
    NATed peers (p2pd's relay v2 with its limits); false: it never relays."""
    http: HttpSettings = Field(default_factory=HttpSettings)
    kademlia: KademliaSettings = Field(default_factory=KademliaSettings)

    @model_validator(mode="after")
    def _ttl_outlives_interval(self) -> DiscoveryConfig:
        if self.ttl_s <= self.announce_interval_s:
            raise ValueError(
                f"ttl_s ({self.ttl_s}) must exceed announce_interval_s ({self.announce_interval_s}), "
                "or live peers vanish between announcements"
            )
        if self.target != BUILD_TARGET:
            raise ValueError(f"_target_ must be {BUILD_TARGET}, got {self.target!r}")
        return self

    def build(self) -> Discovery:
        from openhydra.discovery.service import (
            DualStackDiscovery,
            HttpDiscovery,
            KademliaDiscovery,
            NullDiscovery,
        )

        timing: dict[str, Any] = dict(
            announce_interval_s=self.announce_interval_s, ttl_s=self.ttl_s, timeout_s=self.timeout_s
        )
        if self.mode == "off":
            return NullDiscovery(**timing)
        timing["allow_unsigned_names"] = self.allow_unsigned_names
        http = HttpDiscovery(self.http.urls, **timing)
        kademlia = KademliaDiscovery(**self.kademlia.model_dump(), **timing)
        if self.mode == "http":
            return http
        if self.mode == "kademlia":
            return kademlia
        return DualStackDiscovery(http, kademlia, **timing)


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes for nested keys) to plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return value
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def build_discovery(**kwargs: Any) -> Discovery:
    """The ``_target_`` of every ``conf/discovery`` option."""
    return DiscoveryConfig.model_validate(_plain(kwargs)).build()
