"""The host names the API answers to (api/hosts.py): IP addresses, localhost, api.host and api.allowed_hosts."""

from __future__ import annotations

import pytest

from openhydra.api.hosts import HostCheck, host_name


@pytest.mark.parametrize(("header", "name"), [
    ("127.0.0.1:8080", "127.0.0.1"), ("[::1]:8080", "::1"), ("::1", "::1"), ("LocalHost.:80", "localhost"),
    ("Example.ORG", "example.org"), ("[fe80::1]", "fe80::1"),
])
def test_host_name(header, name):
    assert host_name(header) == name


def test_names_the_node_answers_to():
    check = HostCheck(["*.example.org", "node"], "mybox.lan", token_set=False, public_paths=())
    for ok in ("10.0.0.5:8080", "[::1]:8080", "localhost", "a.localhost:1", "a.example.org", "node:8080",
               "mybox.lan:8080", None):
        assert check.allowed(ok), ok
    for refused in ("example.org", "evil.com", "node.evil.com", "localhost.evil.com", "127.0.0.1.nip.io"):
        assert not check.allowed(refused), refused
    assert HostCheck(["*"], "127.0.0.1", False, ()).allowed("anything.example")
    # with a bearer token a page cannot authenticate whatever name it uses: not checked
    assert HostCheck([], "127.0.0.1", True, ()).allowed("rebind.attacker.example")
