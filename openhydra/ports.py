"""Is a TCP port free to serve on? One probe for every command that binds one (the node's API and peer ports,
the HTTP DHT), so a port in use is said in one line naming the setting, before a server's bind fails deep inside
its framework with a traceback."""

from __future__ import annotations

import errno
import socket


class PortUnavailable(OSError):
    """The port cannot be bound: the message names the setting and what to do."""


def probe_port(setting: str, host: str, port: int, change: str, holder: str = "another node") -> int:
    """Bind ``host:port`` and close it again; returns the port (for 0, the free one the system picked).

    ``setting`` names the option in messages (``api.port``, ``--port``), ``change`` says how to pick another
    (``api.port=...``). A race with another process that binds in between is still possible, and then fails as it
    did before this check.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PortUnavailable(f"host {host} for {setting} does not resolve ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortUnavailable(f"{setting} {port} on {host} is in use ({holder}?): choose another with "
                                      f"{change}") from exc
            raise PortUnavailable(f"cannot bind {setting} {port} on {host}: {exc.strerror or exc}") from exc
        return int(probe.getsockname()[1])


SANIC_LOGGERS = ("sanic.root", "sanic.error", "sanic.server", "sanic.access", "sanic.websockets")


def sanic_logs_once() -> None:
    """Sanic prints its own lines (``Main ... INFO: Worker ready``); with ``logging.basicConfig`` on the root they
    would be printed a second time. Call after the app is built: building it configures these loggers."""
    import logging

    for name in SANIC_LOGGERS:
        logging.getLogger(name).propagate = False
