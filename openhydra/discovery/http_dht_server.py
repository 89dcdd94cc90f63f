"""``openhydra-dht``: the HTTP DHT bootstrap server (``openhydra-dht --host 127.0.0.1 --port 8468``).

A small rendezvous table, not a real DHT: peers announce themselves, coordinators look peers up by
model. Records are strict :class:`PeerAnnouncement` JSON; bad ones get 400 with the error schema.

- ``POST|PUT /v1/announce``: body = one record. 200 ``{"ok": true, "expires_in_s": ttl}``.
- ``GET /v1/peers?model_id=M``: 200 ``{"model_id": M, "peers": [record, ...], "withdrawn": {peer_id: withdrawn_at}}``
  (live records, and the peers that withdrew since their last record: a reader drops its own copies of those).
- ``DELETE /v1/peers``: withdraw; body = a signed :class:`~openhydra.discovery.ownership.Withdrawal`.
  200 ``{"removed": bool}``. (``?model_id=M&peer_id=P`` without a body: only for unsigned names.)
- ``GET /v1/models``: ``{"models": {model_id: peer count}}``. ``GET /health``: liveness.
- ``GET /metrics``: Prometheus text, ``openhydra_dht_refused_total{reason=...}`` and the table size;
  ``GET /v1/status``: the same as JSON.

Only a peer id's owner writes under it (ownership.py): a record or withdrawal for a key-derived peer id
must be signed by that key (401 unsigned, 403 bad signature or key of another peer id), and be newer than
what the table holds (409 stale: replay or rollback). Unsigned records under plain names (``alice``) are
refused unless the server runs with ``--allow-unsigned-names`` (development swarms with ``privacy=off``).
Records expire ``ttl_s`` after they arrive (server clock); the table is bounded (503 when full), and so is what one
address may keep in it (``--max-peers-per-source``, 256 peers per IPv4 address or IPv6 /64; 429 beyond).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra.api.errors import ErrorBody, ErrorDetail
from openhydra.discovery.ownership import (
    ERROR_TYPE,
    REASONS,
    RecordRefused,
    Withdrawal,
    check_announcement,
    check_withdrawal,
)
from openhydra.discovery.records import PeerAnnouncement
from openhydra.discovery.store import AnnouncementStore, SourceQuota, StaleRecord, StoreFull, StoreLimits, source_of

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # one record is well under 4 KB


def _error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> HTTPResponse:
    kind = ERROR_TYPE.get(status, "invalid_request_error") if status < 500 else "service_unavailable"
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return json(body.model_dump(), status=status, headers=headers)


def _validation_error(exc: ValidationError) -> HTTPResponse:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return _error(400, f"{param or 'record'}: {first['msg']}", param=param, code="invalid_record")


def _refused(exc: RecordRefused, refused: dict[str, int]) -> HTTPResponse:
    refused[exc.reason] += 1
    logger.info("refused: %s", exc)
    return _error(exc.status, str(exc), code=exc.code)


def create_app(
    store: AnnouncementStore | None = None, name: str = "openhydra_dht", *, allow_unsigned_names: bool = False
) -> Sanic:
    store = AnnouncementStore() if store is None else store
    app = Sanic(name)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.store = store
    refused: dict[str, int] = dict.fromkeys(REASONS, 0)  # writes refused by ownership rules, by reason
    app.ctx.refused = refused
    quota_refused = [0]  # new peers refused because their source keeps max_peers_per_source others

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return json({"status": "ok", "records": len(store)})

    @app.get("/v1/status")
    async def status(request: Request) -> HTTPResponse:
        return json({"records": len(store), "allow_unsigned_names": allow_unsigned_names, "refused": refused,
                     "refused_source_quota": quota_refused[0],
                     "max_peers_per_source": store.limits.max_peers_per_source})

    @app.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        lines = [
            "# HELP openhydra_dht_refused_total Announcements and withdrawals refused: unsigned, signed by another "
            "key than the peer id's, bad signature, or stale (replay/rollback).",
            "# TYPE openhydra_dht_refused_total counter",
            *(f'openhydra_dht_refused_total{{reason="{r}"}} {n}' for r, n in refused.items()),
            "# HELP openhydra_dht_source_quota_refused_total New peers refused: their address already keeps "
            "max_peers_per_source others in the table.",
            "# TYPE openhydra_dht_source_quota_refused_total counter",
            f"openhydra_dht_source_quota_refused_total {quota_refused[0]}",
            "# HELP openhydra_dht_records Live records in the table.",
            "# TYPE openhydra_dht_records gauge",
            f"openhydra_dht_records {len(store)}",
        ]
        return HTTPResponse("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.route("/v1/announce", methods=["POST", "PUT"])
    async def announce(request: Request) -> HTTPResponse:
        try:
            record = PeerAnnouncement.model_validate_json(request.body or b"")
        except ValidationError as exc:
            return _validation_error(exc)
        try:
            check_announcement(record, allow_unsigned_names=allow_unsigned_names)
            ttl = store.put(record, source=source_of(request.ip) if request.ip else None)
        except RecordRefused as exc:
            return _refused(exc, refused)
        except StaleRecord as exc:
            return _refused(RecordRefused("stale", str(exc)), refused)
        except SourceQuota as exc:
            quota_refused[0] += 1
            return _error(429, str(exc), code="too_many_peers_from_source", headers={"Retry-After": "60"})
        except StoreFull as exc:
            return _error(503, str(exc), code="store_full", headers={"Retry-After": "30"})
        return json({"ok": True, "expires_in_s": ttl})

    @app.get("/v1/peers")
    async def peers(request: Request) -> HTTPResponse:
        model_id = request.args.get("model_id")
        if not model_id:
            return _error(400, "query parameter model_id is required", param="model_id")
        records = store.get(model_id)
        return json({"model_id": model_id, "peers": [r.to_wire() for r in records],
                     "withdrawn": store.withdrawn(model_id)})

    @app.delete("/v1/peers", ignore_body=False)
    async def withdraw(request: Request) -> HTTPResponse:
        if request.body:
            try:
                withdrawal = Withdrawal.model_validate_json(request.body)
            except ValidationError as exc:
                return _validation_error(exc)
        else:  # the unsigned form: query parameters, accepted only for plain names on a permissive server
            model_id, peer_id = request.args.get("model_id"), request.args.get("peer_id")
            if not model_id or not peer_id:
                return _error(
                    400,
                    "a signed withdrawal body (or query parameters model_id and peer_id) is required",
                    param="model_id" if not model_id else "peer_id",
                )
            try:
                withdrawal = Withdrawal(peer_id=peer_id, model_id=model_id, withdrawn_at=1.0, expires_at=1.0)
            except ValidationError as exc:
                return _validation_error(exc)
        try:
            check_withdrawal(withdrawal, allow_unsigned_names=allow_unsigned_names)
            if withdrawal.signature is None:  # an unowned name: no order to keep
                return json({"removed": store.remove(withdrawal.model_id, withdrawal.peer_id)})
            return json({"removed": store.withdraw(withdrawal.model_id, withdrawal.peer_id, withdrawal.withdrawn_at)})
        except RecordRefused as exc:
            return _refused(exc, refused)
        except StaleRecord as exc:
            return _refused(RecordRefused("stale", str(exc)), refused)

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        return json({"models": store.models()})

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openhydra-dht", description="OpenHydra HTTP DHT bootstrap server")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8468, help="port to listen on (default 8468)")
    parser.add_argument("--max-records", type=int, default=StoreLimits.max_records)
    parser.add_argument("--max-per-model", type=int, default=StoreLimits.max_per_model)
    parser.add_argument("--max-ttl-s", type=float, default=StoreLimits.max_ttl_s)
    parser.add_argument("--max-peers-per-source", type=int, default=StoreLimits.max_peers_per_source,
                        help="peers one address (an IPv6 /64) may keep in the table (default %(default)s); more "
                        "are refused with 429 until some expire")
    parser.add_argument(
        "--allow-unsigned-names",
        action="store_true",
        help="also accept unsigned records under plain peer names (privacy=off development swarms); "
        "key-derived peer ids always need their owner's signature",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_records < 1 or args.max_per_model < 1 or args.max_ttl_s <= 0 or args.max_peers_per_source < 1:
        parser.error("--max-records, --max-per-model, --max-ttl-s and --max-peers-per-source must be positive")
    logging.basicConfig(level=args.log_level.upper())
    from openhydra.ports import PortUnavailable, probe_port

    try:
        args.port = probe_port("--port", args.host, args.port, change="--port PORT", holder="another DHT")
    except PortUnavailable as exc:
        parser.exit(2, f"openhydra-dht: cannot start: {exc}\n")
    limits = StoreLimits(max_records=args.max_records, max_per_model=args.max_per_model, max_ttl_s=args.max_ttl_s,
                         max_peers_per_source=args.max_peers_per_source)
    app = create_app(AnnouncementStore(limits), allow_unsigned_names=args.allow_unsigned_names)
    from openhydra.ports import sanic_logs_once

    sanic_logs_once()  # after the app is built
    print(f"openhydra-dht listening on http://{args.host}:{args.port}", flush=True)
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, motd=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
