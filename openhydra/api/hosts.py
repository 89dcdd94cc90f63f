"""Which names the node's API answers to (``api.allowed_hosts``): a defence against DNS rebinding.

A web page on ``attacker.example`` can make its own name resolve to 127.0.0.1 after the page loaded; the browser
then sends the page's requests to the node on loopback as *same-origin* requests (``Host`` and ``Origin`` both
``attacker.example``), so neither CORS nor the cross-origin write check (api/cors.py) stops them, and a node
without a bearer token answers. A red team that had read the code drained a node's HYDRA this way (a channel to
itself, a signed update, a close). A browser always names the page's host in ``Host``, so the node refuses a name
it does not know: it answers IP addresses (a rebinding page cannot make its name one), ``localhost`` and
``*.localhost``, the name ``api.host`` binds to, and the names in ``api.allowed_hosts`` (``["*"]``: any, for a node
behind a proxy that checks names itself). Not checked: a node with ``api.bearer_token`` (a page cannot send the
token), and GET/HEAD of the public probe paths (``/health``, ``/readyz``, ``/metrics``, the dashboard page: they
hold no data, and a Prometheus in a container scrapes by service name).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from sanic import Request

from openhydra.api.errors import APIError

READ_METHODS = frozenset({"GET", "HEAD"})


def host_name(header: str) -> str:
    """The name of a ``Host`` header, lower case, without port, brackets or a trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):  # [v6]:port
        return value[1:].split("]", 1)[0]
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        value = name
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    def __init__(self, allowed: Iterable[str], bind_host: str, token_set: bool, public_paths: Iterable[str]) -> None:
        names = {host_name(a) for a in allowed if a.strip()}
        self.any = "*" in names or token_set
        self.suffixes = (*(n[1:] for n in names if n.startswith("*.")), ".localhost")
        self.names = {n for n in names if not n.startswith("*")} | {"localhost"}
        bind = host_name(bind_host)
        if bind and not _is_ip(bind):
            self.names.add(bind)
        self.public_paths = frozenset(public_paths)

    def allowed(self, header: str | None) -> bool:
        if self.any or header is None:  # no Host: not a browser (HTTP/1.0 tools)
            return True
        name = host_name(header)
        return _is_ip(name) or name in self.names or name.endswith(self.suffixes)

    def refuse_unknown_host(self, request: Request) -> None:
        """403 ``host_not_allowed`` for a request naming a host this node does not answer to."""
        if request.method in READ_METHODS and request.path in self.public_paths:
            return
        header = request.headers.get("host")
        if not self.allowed(header):
            name = host_name(header or "")[:100]
            raise APIError(403, f"this node does not answer to the host name {name!r} (a defence against DNS "
                                f"rebinding): use its IP address or localhost, or allow the name with "
                                f"api.allowed_hosts=[{name}]", type="permission_error", code="host_not_allowed")
