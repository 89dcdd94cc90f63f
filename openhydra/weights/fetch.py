"""Fetching a span's weights from peers: parallel, verified chunk by chunk, resumable, with progress (issue 19).

:class:`SpanFetcher` fills a checkpoint folder with exactly the chunks a node serving layers ``span`` loads
(manifest.Manifest.chunks): files are created at their full size (sparse), each chunk is written at its own
offset, so the result is a normal checkpoint folder whose safetensors headers describe every tensor and whose
span tensors are byte-identical to the source. What it does:

* **Parallel.** One worker per source peer (``streams_per_source`` each); a worker takes the next pending run
  of contiguous chunks that its peer's span serves and streams it with FetchWeights.
* **Verified.** Every chunk's SHA-256 is checked against the manifest before it is written. A mismatch bans the
  peer for this fetch, reports it (``on_bad_peer``, wired to the reputation store as a verification ``fail``),
  and puts the rest of the run back for the other peers. RPC errors retry elsewhere; a peer that fails
  ``MAX_PEER_ERRORS`` times is dropped.
* **Resumable.** Each verified chunk is appended to ``.openhydra-fetch.log`` after its bytes are written. A new
  fetch re-hashes the logged chunks on disk (a local read, no network) and fetches only the rest.
* **Progress.** Bytes, rate and ETA in the log every ``progress_every_s`` and through ``on_progress``.

:func:`fetch_span` is the node's entry point: find peers announcing the model's weights in discovery, get
the manifest (checked against the catalog pin), let the caller choose the span, fetch it into the shared model
cache (under the cache's file lock) and return the folder, reused by the next start without any network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from pydantic import BaseModel

from openhydra.crypto.membership import RPC_METADATA_KEY
from openhydra.peer.proto import peer_pb2 as pb
from openhydra.peer.proto import peer_pb2_grpc as pb_grpc
from openhydra.weights.manifest import (
    MANIFEST_FILE,
    Chunk,
    Manifest,
    ManifestError,
    SignedManifest,
    read_manifest,
    span_needs,
    write_manifest,
)

log = logging.getLogger(__name__)

FETCH_LOG = ".openhydra-fetch.log"
SOURCE_MARKER = "openhydra-source.json"
RUN_BYTES = 8 << 20
"""Contiguous chunks asked for in one FetchWeights call (fewer calls; a bad peer costs at most this)."""
MAX_PEER_ERRORS = 3
RPC_TIMEOUT_S = 120.0
GRPC_OPTIONS = [("grpc.max_receive_message_length", 8 << 20)]


class FetchError(RuntimeError):
    """The span could not be fetched (no peer serves it, every peer failed, or no manifest)."""


@dataclass(frozen=True)
class Source:
    peer_id: str
    address: str
    span: tuple[int, int]


@dataclass
class FetchReport:
    total_chunks: int = 0
    total_bytes: int = 0
    resumed_chunks: int = 0
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    mismatches: int = 0
    rpc_errors: int = 0
    seconds: float = 0.0
    bad_peers: list[str] = field(default_factory=list)
    bytes_by_peer: dict[str, int] = field(default_factory=dict)

    @property
    def rate_mb_s(self) -> float:
        return self.fetched_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class SourceRecord(BaseModel):
    """The completion marker of a swarm-fetched folder (the model cache trusts a folder only with a marker)."""

    origin: str = "swarm"
    manifest: str
    spans: list[tuple[int, int]]


def fetched_manifest(folder: Path) -> SignedManifest | None:
    """The manifest a swarm-fetched folder was checked against (None for a folder that was not fetched)."""
    if not (Path(folder) / FETCH_LOG).exists():
        return None
    return read_manifest(folder)


def _read_log(folder: Path, content_hash: str) -> set[str]:
    try:
        lines = (folder / FETCH_LOG).read_text().splitlines()
    except OSError:
        return set()
    if not lines or lines[0] != f"manifest {content_hash}":
        return set()
    return set(lines[1:])


def verified_on_disk(folder: Path, manifest: Manifest, content_hash: str, chunks: list[Chunk]) -> set[str]:
    """Keys of ``chunks`` the fetch log lists AND whose bytes on disk still hash right."""
    logged = _read_log(folder, content_hash)
    good: set[str] = set()
    for chunk in chunks:
        if chunk.key not in logged:
            continue
        try:
            with open(folder / chunk.path, "rb") as f:
                intact = chunk.intact_in(f.fileno())
        except OSError:
            continue
        if intact:
            good.add(chunk.key)
    return good


def covers(folder: Path, signed: SignedManifest, span: tuple[int, int]) -> bool:
    """Whether a fetched folder already holds (per its log) every chunk ``span`` needs: reuse, no network."""
    logged = _read_log(folder, signed.content_hash)
    return bool(logged) and all(c.key in logged for c in signed.manifest.chunks(span))


class SpanFetcher:
    def __init__(self, folder: Path, signed: SignedManifest, span: tuple[int, int], sources: list[Source], *,
                 pinned: str | None = None, on_bad_peer: Callable[[str, str], None] | None = None,
                 on_progress: Callable[[str], None] | None = None, streams_per_source: int = 1,
                 progress_every_s: float = 2.0, swarm_token: str | None = None) -> None:
        self.manifest = signed.check(pinned)
        self.signed = signed
        self.folder = Path(folder)
        self.span = span
        self.sources = sources
        self.on_bad_peer = on_bad_peer
        self.on_progress = on_progress
        self.streams_per_source = streams_per_source
        self.progress_every_s = progress_every_s
        self.metadata = [(RPC_METADATA_KEY, swarm_token)] if swarm_token else None
        self.report = FetchReport()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._pending: list[list[Chunk]] = []
        self._in_flight = 0
        self._banned: set[str] = set()
        self._errors: Counter[str] = Counter()
        self._log_file = None
        self._fds: dict[str, int] = {}
        self._resumed_bytes = 0

    # -- planning ------------------------------------------------------------------------------------
    def _serves(self, source: Source, chunk: Chunk) -> bool:
        m = self.manifest
        return span_needs(chunk.piece, source.span, m.num_layers, m.tie_word_embeddings)

    def _runs(self, chunks: list[Chunk]) -> list[list[Chunk]]:
        """Group consecutive chunks of one file that the same peers serve, up to RUN_BYTES."""
        runs: list[list[Chunk]] = []
        key = None
        for chunk in chunks:
            servers = frozenset(s.peer_id for s in self.sources if self._serves(s, chunk))
            current = runs[-1] if runs else None
            if (current is not None and key == servers and current[-1].path == chunk.path
                    and current[-1].offset + current[-1].length == chunk.offset
                    and sum(c.length for c in current) + chunk.length <= RUN_BYTES):
                current.append(chunk)
            else:
                runs.append([chunk])
                key = servers
        return runs

    # -- running -------------------------------------------------------------------------------------
    def run(self) -> FetchReport:
        started = time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)
        chunks = self.manifest.chunks(self.span)
        self.report.total_chunks = len(chunks)
        self.report.total_bytes = sum(c.length for c in chunks)
        done = verified_on_disk(self.folder, self.manifest, self.signed.content_hash, chunks)
        self.report.resumed_chunks = len(done)
        self._resumed_bytes = sum(c.length for c in chunks if c.key in done)
        todo = [c for c in chunks if c.key not in done]
        unserved = [c for c in todo if not any(self._serves(s, c) for s in self.sources)]
        if unserved:
            raise FetchError(f"no peer serves {unserved[0].piece or unserved[0].path} (and {len(unserved) - 1} more "
                             f"chunks) of layers {list(self.span)}; peers: "
                             + ", ".join(f"{s.peer_id} {list(s.span)}" for s in self.sources))
        self._open_files(fresh_log=not done)
        self._pending = self._runs(todo)
        log.info("fetching layers %s: %d chunks, %.1f MB from %d peers (%d chunks, %.1f MB already verified here)",
                 list(self.span), len(todo), sum(c.length for c in todo) / 1e6, len(self.sources), len(done),
                 sum(c.length for c in chunks if c.key in done) / 1e6)
        workers = [threading.Thread(target=self._worker, args=(s,), name=f"weights-{s.peer_id[:12]}", daemon=True)
                   for s in self.sources for _ in range(self.streams_per_source)]
        for w in workers:
            w.start()
        try:
            while not self._done.wait(self.progress_every_s):
                self._progress(started)
                if not any(w.is_alive() for w in workers):
                    break
            for w in workers:
                w.join()
        finally:
            self._close_files()
        self.report.seconds = time.monotonic() - started
        with self._lock:
            left = sum(len(r) for r in self._pending)
        if left:
            raise FetchError(f"{left} chunks of layers {list(self.span)} could not be fetched: every peer that serves "
                             f"them failed or sent bad bytes (bad: {self.report.bad_peers or 'none'})")
        self._progress(started, final=True)
        return self.report

    def _open_files(self, fresh_log: bool) -> None:
        for entry in self.manifest.files:
            path = self.folder / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size != entry.size:
                os.ftruncate(fd, entry.size)  # sparse: only the span's chunks ever take space
            self._fds[entry.path] = fd
        log_path = self.folder / FETCH_LOG
        if fresh_log or not log_path.exists():
            log_path.write_text(f"manifest {self.signed.content_hash}\n")
        self._log_file = open(log_path, "a")  # noqa: SIM115 - closed in _close_files

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _take(self, source: Source) -> list[Chunk] | None:
        """The next run this peer can serve; None when nothing is left for it (or it is banned)."""
        while True:
            with self._lock:
                if source.peer_id in self._banned:
                    return None
                for i, run in enumerate(self._pending):
                    if self._serves(source, run[0]):
                        self._in_flight += 1
                        return self._pending.pop(i)
                if self._in_flight == 0:
                    if not self._pending:
                        self._done.set()
                    return None
            # Others are still working on runs that may come back (a bad or failing peer): wait for them.
            if self._done.wait(0.05):
                return None

    def _give_back(self, rest: list[Chunk]) -> None:
        with self._lock:
            self._in_flight -= 1
            if rest:
                self._pending.insert(0, rest)
            elif not self._pending and self._in_flight == 0:
                self._done.set()
            alive = [s for s in self.sources if s.peer_id not in self._banned]
            if rest and not any(self._serves(s, rest[0]) for s in alive):
                self._done.set()  # nobody left to serve it: run() reports what is missing

    def _worker(self, source: Source) -> None:
        channel = grpc.insecure_channel(source.address, options=GRPC_OPTIONS)
        stub = pb_grpc.PeerStub(channel)
        try:
            while (run := self._take(source)) is not None:
                rest = self._fetch_run(stub, source, run)
                self._give_back(rest)
        finally:
            channel.close()

    def _fetch_run(self, stub: pb_grpc.PeerStub, source: Source, run: list[Chunk]) -> list[Chunk]:
        """Stream ``run`` from ``source``; returns the chunks not verified (empty when all went well)."""
        first, last = run[0], run[-1]
        request = pb.WeightsRequest(manifest_hash=self.signed.content_hash, path=first.path, offset=first.offset,
                                    length=last.offset + last.length - first.offset)
        buffer = bytearray()
        index = 0
        try:
            for message in stub.FetchWeights(request, timeout=RPC_TIMEOUT_S, metadata=self.metadata):
                if message.offset != first.offset + sum(c.length for c in run[:index]) + len(buffer):
                    raise grpc.RpcError(f"out-of-order data from {source.address}")
                buffer += message.data
                while index < len(run) and len(buffer) >= run[index].length:
                    chunk = run[index]
                    data = bytes(buffer[:chunk.length])
                    del buffer[:chunk.length]
                    if not chunk.matches(data):
                        self._bad_peer(source, chunk)
                        return run[index:]
                    self._write(chunk, data, source)
                    index += 1
            if index < len(run):
                raise grpc.RpcError(f"{source.address} ended the stream after {index} of {len(run)} chunks")
            return []
        except grpc.RpcError as exc:
            with self._lock:
                self.report.rpc_errors += 1
                self._errors[source.peer_id] += 1
                if self._errors[source.peer_id] >= MAX_PEER_ERRORS:
                    self._banned.add(source.peer_id)
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            log.warning("weights from %s (%s) failed after %d of %d chunks: %s", source.peer_id, source.address,
                        index, len(run), detail)
            return run[index:]

    def _bad_peer(self, source: Source, chunk: Chunk) -> None:
        detail = (f"weights chunk {chunk.path}@{chunk.offset} ({chunk.piece or 'header/file'}) does not match "
                  f"manifest {self.signed.content_hash[:16]}")
        log.warning("peer %s at %s sent bad bytes: %s; banned for this fetch and reported", source.peer_id,
                    source.address, detail)
        with self._lock:
            self.report.mismatches += 1
            self._banned.add(source.peer_id)
            if source.peer_id not in self.report.bad_peers:
                self.report.bad_peers.append(source.peer_id)
        if self.on_bad_peer is not None:
            try:
                self.on_bad_peer(source.peer_id, detail)
            except Exception as exc:  # reporting must not stop the fetch
                log.warning("could not report bad peer %s: %s", source.peer_id, exc)

    def _write(self, chunk: Chunk, data: bytes, source: Source) -> None:
        os.pwrite(self._fds[chunk.path], data, chunk.offset)
        with self._lock:  # after the bytes: a logged chunk is on disk (page cache; resume re-hashes it anyway)
            self._log_file.write(chunk.key + "\n")
            self._log_file.flush()
            self.report.fetched_chunks += 1
            self.report.fetched_bytes += chunk.length
            self.report.bytes_by_peer[source.peer_id] = self.report.bytes_by_peer.get(source.peer_id, 0) + chunk.length

    def _progress(self, started: float, final: bool = False) -> None:
        r = self.report
        elapsed = max(time.monotonic() - started, 1e-6)
        have = r.fetched_bytes + self._resumed_bytes
        rate = r.fetched_bytes / elapsed
        eta = max(r.total_bytes - have, 0) / rate if rate > 0 else float("inf")
        line = (f"weights for layers {list(self.span)}: {have / 1e6:.1f} / {r.total_bytes / 1e6:.1f} MB, "
                f"{rate / 1e6:.1f} MB/s, " + ("done" if final else f"ETA {eta:.0f} s")
                + f", {len(self.sources) - len(self._banned)} of {len(self.sources)} peers")
        log.info("%s", line)
        if self.on_progress is not None:
            self.on_progress(line)


# -- finding sources and the manifest -----------------------------------------------------------------------

def sources_from_records(records: list, content_hash: str) -> list[Source]:
    """Peers whose discovery record announces this manifest (PeerAnnouncement.weights_manifest)."""
    out, seen = [], set()
    for r in records:
        if getattr(r, "weights_manifest", None) == content_hash and r.peer_id not in seen:
            seen.add(r.peer_id)
            out.append(Source(r.peer_id, r.grpc_address, (r.start, r.end)))
    return out


def get_manifest(sources: list[Source], content_hash: str, pinned: str | None, swarm_token: str | None = None,
                 on_bad_peer: Callable[[str, str], None] | None = None) -> SignedManifest:
    """The manifest from the first peer that sends one matching ``content_hash`` (and the pin)."""
    errors = []
    metadata = [(RPC_METADATA_KEY, swarm_token)] if swarm_token else None
    for source in sources:
        with grpc.insecure_channel(source.address, options=GRPC_OPTIONS) as channel:
            try:
                blob = b"".join(m.data for m in pb_grpc.PeerStub(channel).FetchWeights(
                    pb.WeightsRequest(manifest_hash=content_hash, path=MANIFEST_FILE), timeout=30,
                    metadata=metadata))
                signed = SignedManifest.model_validate_json(blob)
                if signed.content_hash != content_hash:
                    raise ManifestError(f"sent manifest {signed.content_hash}, asked for {content_hash}")
                signed.check(pinned)
                return signed
            except grpc.RpcError as exc:
                errors.append(f"{source.peer_id}: {exc.code().name} {exc.details()}")
            except (ValueError, ManifestError) as exc:
                errors.append(f"{source.peer_id}: {exc}")
                if on_bad_peer is not None:
                    on_bad_peer(source.peer_id, f"bad weights manifest: {exc}")
    raise FetchError("no peer sent a valid manifest: " + "; ".join(errors))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80] or "model"


def swarm_folder(cache_root: Path, model_id: str, content_hash: str) -> Path:
    """Where a model's weights fetched from the swarm live in the shared model cache."""
    return Path(cache_root).expanduser() / "models" / "swarm" / f"{_safe_name(model_id)}-{content_hash[:16]}"


def fetch_span(model_id: str, records: list, pinned: str | None, choose_span: Callable[[int], tuple[int, int]],
               cache_root: Path, *, on_bad_peer: Callable[[str, str], None] | None = None,
               on_progress: Callable[[str], None] | None = None, swarm_token: str | None = None
               ) -> tuple[Path, tuple[int, int], SignedManifest]:
    """Fetch the span ``choose_span(num_layers)`` of ``model_id`` from the peers in ``records``.

    Returns (folder, span, manifest). With ``pinned`` (the catalog's ``model.manifest``) only that manifest is
    accepted; without it, the manifest most peers announce is used, and the log says it is unpinned.
    """
    from openhydra.runtime.model_cache import cache_lock

    if pinned is not None:  # the next start: a folder fetched before, holding this span, needs no network
        folder = swarm_folder(cache_root, model_id, pinned)
        local = read_manifest(folder)
        if local is not None and local.content_hash == pinned and (folder / SOURCE_MARKER).exists():
            local.check(pinned)
            span = choose_span(local.manifest.num_layers)
            if covers(folder, local, span):
                log.info("reusing %s: layers [%d, %d) of %s were fetched and verified before", folder, *span, model_id)
                return folder, span, local
    announced = Counter(r.weights_manifest for r in records if getattr(r, "weights_manifest", None))
    if pinned is not None:
        if pinned not in announced:
            raise FetchError(f"no peer of {model_id} shares the pinned weights manifest {pinned[:16]} "
                             f"(announced: {dict(announced) or 'none'})")
        content_hash = pinned
    elif announced:
        content_hash = announced.most_common(1)[0][0]
        log.warning("model.manifest is not pinned: fetching the manifest %s that %d of %d sharing peers announce",
                    content_hash[:16], announced[content_hash], sum(announced.values()))
    else:
        raise FetchError(f"no peer of {model_id} shares its weights ({len(records)} peers found)")
    sources = sources_from_records(records, content_hash)
    signed = get_manifest(sources, content_hash, pinned, swarm_token, on_bad_peer)
    span = choose_span(signed.manifest.num_layers)
    folder = swarm_folder(cache_root, model_id, content_hash)
    with cache_lock(folder, f"fetching {model_id} layers {list(span)} from the swarm"):
        if covers(folder, signed, span):
            log.info("reusing %s: layers [%d, %d) of %s were fetched and verified before", folder, *span, model_id)
            return folder, span, signed
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, signed)
        fetcher = SpanFetcher(folder, signed, span, sources, pinned=pinned, on_bad_peer=on_bad_peer,
                              on_progress=on_progress, swarm_token=swarm_token)
        report = fetcher.run()
        marker = folder / SOURCE_MARKER
        try:
            spans = SourceRecord.model_validate_json(marker.read_text()).spans
        except (OSError, ValueError):
            spans = []
        record = SourceRecord(manifest=content_hash, spans=sorted({*map(tuple, spans), span}))
        marker.write_text(record.model_dump_json())
    log.info("fetched layers %s of %s into %s: %.1f MB in %.1f s (%.1f MB/s), %d chunks resumed, %d bad peers",
             list(span), model_id, folder, report.fetched_bytes / 1e6, report.seconds, report.rate_mb_s,
             report.resumed_chunks, len(report.bad_peers))
    return folder, span, signed


def main(argv: list[str] | None = None) -> int:
    """``python -m openhydra.weights.fetch``: fetch a span from given peers (benchmarks, tests, operators)."""
    parser = argparse.ArgumentParser(prog="python -m openhydra.weights.fetch", description=main.__doc__)
    parser.add_argument("--source", action="append", required=True,
                        help="peer_id=host:port[=start:end] (span defaults to the requested one)")
    parser.add_argument("--manifest", required=True, help="the content hash to fetch (pinned)")
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--streams-per-source", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    span = (args.start, args.end)
    sources = []
    for text in args.source:
        parts = text.split("=")
        peer_span = tuple(int(x) for x in parts[2].split(":")) if len(parts) > 2 else span
        sources.append(Source(parts[0], parts[1], peer_span))  # type: ignore[arg-type]
    signed = get_manifest(sources, args.manifest, args.manifest)
    args.out.mkdir(parents=True, exist_ok=True)
    write_manifest(args.out, signed)
    report = SpanFetcher(args.out, signed, span, sources, pinned=args.manifest,
                         streams_per_source=args.streams_per_source).run()
    print(json.dumps({**report.__dict__, "rate_mb_s": report.rate_mb_s}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
