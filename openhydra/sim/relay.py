"""A userspace TCP delay relay: per-link one-way latency and a bandwidth cap (no ``tc netem`` here).

Each link direction is modelled as a wire: a chunk that arrives at ``t`` starts sending when the
wire is free (``free = max(t, free) + len / rate``) and is delivered ``delay`` after that. Order is
kept, and gRPC over HTTP/2 passes through unchanged (bytes are not interpreted).

The relay listens on ``(host, port)`` pairs. For each accepted connection it learns the source
(the peer's address) and the destination it was addressed to (``getsockname``, which also works
for AnyIP routes where one listener on 0.0.0.0 accepts for a whole subnet), asks ``policy`` for the
link's delay and rate, and connects onward, optionally from a fixed source address.

    python -m openhydra.sim.relay --config relay.json
    relay.json: {"listen": [["0.0.0.0", 50051], ...], "bind_source": "10.77.0.2",
                 "targets": {"10.78.0.11": "10.78.0.11"}, "links": {"10.77.0.12>10.78.0.11": [10.0, 100.0]},
                 "default": [10.0, 100.0]}          # [one-way delay ms, rate Mbit/s (0 = no cap)]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


@dataclass(frozen=True)
class LinkSpec:
    delay_ms: float  # one-way, added to every chunk
    rate_mbit: float = 0.0  # 0 = no cap

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 125_000.0


Policy = Callable[[str, str], LinkSpec]  # (source ip, destination ip) -> link


class Wire:
    """One direction of a link: serialization at ``rate`` then a fixed ``delay``.

    ``Wire.delay_scale`` multiplies every delay (the relay process sets it to 0 on SIGUSR1 and back to
    1 on SIGUSR2, so one run can measure the same swarm with and without the added latency).
    """

    delay_scale = 1.0

    def __init__(self, spec: LinkSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self._clock = clock
        self._free_at = 0.0

    def deliver_at(self, nbytes: int, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        start = max(now, self._free_at)
        self._free_at = start + (nbytes / self.spec.bytes_per_s if self.spec.rate_mbit > 0 else 0.0)
        return self._free_at + self.spec.delay_ms * Wire.delay_scale / 1000.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wire: Wire) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def read() -> None:
        try:
            while data := await reader.read(CHUNK):
                await queue.put((wire.deliver_at(len(data)), data))
        except (ConnectionError, OSError):
            pass
        await queue.put((wire.deliver_at(0), b""))

    task = asyncio.get_running_loop().create_task(read())
    try:
        while True:
            at, data = await queue.get()
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class DelayRelay:
    def __init__(self, listen: list[tuple[str, int]], policy: Policy, *, targets: dict[str, str] | None = None,
                 bind_source: str | None = None, connect_timeout_s: float = 5.0) -> None:
        self.listen = listen
        self.policy = policy
        self.targets = targets or {}  # destination ip -> ip to connect to (default: the same)
        self.bind_source = bind_source
        self.connect_timeout_s = connect_timeout_s
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        self.connections = 0
        self.by_port: Counter[int] = Counter()  # connections accepted per listening port

    async def start(self) -> None:
        for host, port in self.listen:
            self._servers.append(await asyncio.start_server(self._handle, host, port, reuse_address=True))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        src = writer.get_extra_info("peername")[0]
        dst, port = writer.get_extra_info("sockname")[:2]
        self.connections += 1
        self.by_port[port] += 1
        forward, back = self.policy(src, dst), self.policy(dst, src)
        target = self.targets.get(dst, dst)
        try:
            local = (self.bind_source, 0) if self.bind_source else None
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(target, port, local_addr=local), self.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            log.info("relay %s -> %s:%d failed: %s", src, target, port, exc)
            writer.close()
            return
        # the SYN also crosses the link: hold the first bytes by one delay each way (pumps do that)
        try:
            await asyncio.gather(_pump(reader, up_writer, Wire(forward)), _pump(up_reader, writer, Wire(back)))
        except asyncio.CancelledError:
            pass  # close() ends the connection; re-raising would make asyncio log the stream callback's error
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(OSError):
                    w.close()


class RelayThread:
    """A :class:`DelayRelay` on its own event-loop thread, for synchronous callers (tests, benches): listens on
    ``host`` at each of ``ports`` and forwards to ``target`` on the same port, ``policy`` per link."""

    def __init__(self, host: str, ports: list[int], policy: Policy, target: str = "127.0.0.1") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="delay-relay", daemon=True)
        self.thread.start()
        self.relay = DelayRelay([(host, p) for p in ports], policy, targets={host: target})
        asyncio.run_coroutine_threadsafe(self.relay.start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.relay.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def policy_from(links: dict[str, list[float]], default: list[float]) -> Policy:
    table = {tuple(k.split(">")): LinkSpec(*v) for k, v in links.items()}
    fallback = LinkSpec(*default)

    def policy(src: str, dst: str) -> LinkSpec:
        return table.get((src, dst), fallback)

    return policy


async def serve(config: dict) -> None:
    relay = DelayRelay([(h, int(p)) for h, p in config["listen"]],
                       policy_from(config.get("links", {}), config.get("default", [0.0, 0.0])),
                       targets=config.get("targets"), bind_source=config.get("bind_source"))
    await relay.start()
    print(f"relay listening on {len(relay.listen)} addresses", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(Wire, "delay_scale", 0.0))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(Wire, "delay_scale", 1.0))
    await stop.wait()
    await relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="JSON file: listen, links, default, targets, bind_source")
    args = parser.parse_args()
    with open(args.config) as fh:
        config = json.load(fh)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
