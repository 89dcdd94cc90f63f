"""The discovery config group: every option composes, validates and instantiates to a Discovery."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pydantic import ValidationError

from openhydra.discovery.config import DiscoveryConfig, build_discovery
from openhydra.discovery.service import (
    Discovery,
    DualStackDiscovery,
    HttpDiscovery,
    KademliaDiscovery,
    NullDiscovery,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPECTED = {"off": NullDiscovery, "http": HttpDiscovery, "kademlia": KademliaDiscovery, "dual": DualStackDiscovery}


@pytest.mark.parametrize("option", sorted(EXPECTED))
def test_every_option_composes_and_instantiates(option):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+discovery={option}"])
    d = instantiate(cfg.discovery)
    assert isinstance(d, Discovery) and type(d) is EXPECTED[option]
    assert d.announce_interval_s == 60 and d.ttl_s == 180
    if option in ("kademlia", "dual"):
        kad = d if option == "kademlia" else d.kademlia
        assert kad.dht is None  # nothing starts until start()
        assert kad._dht_kwargs["host_maddrs"] == ["/ip4/127.0.0.1/tcp/0"]
        assert not any(kad._dht_kwargs[f] for f in ("use_relay", "auto_nat", "nat_port_map", "use_ipfs"))
    if option in ("http", "dual"):
        http = d if option == "http" else d.http
        assert http.urls == ["http://127.0.0.1:8468"]


def test_overrides_reach_the_objects():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            overrides=[
                "+discovery=dual",
                "discovery.announce_interval_s=5",
                "discovery.ttl_s=15",
                "discovery.kademlia.initial_peers=[/ip4/127.0.0.1/tcp/4001/p2p/QmX]",
            ]
        )
    d = instantiate(cfg.discovery)
    assert d.kademlia.initial_peers == ["/ip4/127.0.0.1/tcp/4001/p2p/QmX"]
    assert d.announce_interval_s == 5 and d.http.ttl_s == 15


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"mode": "http", "urlz": []}, "urlz"),
        ({"mode": "carrier-pigeon"}, "mode"),
        ({"mode": "http", "http": {"urls": ["ftp://x"]}}, "http.urls"),
        ({"mode": "http", "http": {"urls": []}}, "http.urls"),
        ({"mode": "kademlia", "kademlia": {"host_maddrs": ["127.0.0.1:1"]}}, "kademlia.host_maddrs"),
        ({"mode": "kademlia", "kademlia": {"use_ipfs": True, "initial_peers": ["/ip4/1.2.3.4/tcp/1"]}}, "use_ipfs"),
        ({"mode": "http", "announce_interval_s": 60, "ttl_s": 30}, "ttl_s"),
        ({"mode": "off", "timeout_s": 0}, "timeout_s"),
    ],
)
def test_bad_config_names_the_key(kwargs, needle):
    with pytest.raises(ValidationError) as info:
        build_discovery(**kwargs)
    assert needle in str(info.value)


def test_target_alias():
    cfg = DiscoveryConfig.model_validate({"_target_": "openhydra.discovery.config.build_discovery", "mode": "off"})
    assert cfg.target.endswith("build_discovery")
