"""A minimal HTTP/1.1 client over a raw socket: sends exactly the bytes given (no client library would send
a header byte 0xff, a NUL in the request line or a Content-Length it does not honour) and reads the answer."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    status: int | None
    """None when the server closed the connection without a status line."""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""
    elapsed_s: float = 0.0
    error: str | None = None
    """The socket error that ended the read, if any (reset, timeout)."""

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        line, _, rest = data.partition(b"\r\n")
        size = int(line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def parse(raw: bytes) -> RawResponse:
    while raw.startswith(b"HTTP/1.1 1"):  # interim responses (100 Continue) precede the answer
        raw = raw.partition(b"\r\n\r\n")[2]
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        return RawResponse(status=None, raw=raw)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(status=status, headers=headers, body=body, raw=raw)


def connect(port: int, source: str | None = None, timeout_s: float = 30.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port``, from ``source`` (another loopback address, e.g. 127.0.0.2)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout_s,
                                    source_address=(source, 0) if source else None)


def read_all(sock: socket.socket) -> tuple[bytes, str | None]:
    """Everything until the server closes (or the socket's timeout / a reset ends the read)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except OSError as exc:  # reset, timeout
        return out, type(exc).__name__
    return out, None


def exchange(port: int, data: bytes, *, source: str | None = None, timeout_s: float = 30.0) -> RawResponse:
    """Send ``data`` on a new connection and read until the server closes it (send ``Connection: close``)."""
    with connect(port, source, timeout_s) as sock:
        started = time.monotonic()
        try:
            sock.sendall(data)
        except OSError as exc:  # the server answered and closed before taking everything (e.g. a 413)
            raw, error = read_all(sock)
            response = parse(raw)
            response.error = type(exc).__name__
            return response
        raw, error = read_all(sock)
        response = parse(raw)
        response.elapsed_s = time.monotonic() - started
        response.error = error
        return response


def request_bytes(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                  *, extra_header_lines: bytes = b"", content_length: int | None = None) -> bytes:
    """A well-formed request (``Connection: close``) unless ``extra_header_lines`` / ``content_length`` say
    otherwise."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None or content_length is not None:
        lines.append(f"Content-Length: {len(body or b'') if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n").encode() + extra_header_lines + b"\r\n" + (body or b"")
