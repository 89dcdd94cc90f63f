"""``openhydra-dht``: the HTTP DHT bootstrap server (``openhydra-dht --host 127.0.0.1 --port 8468``).

A small rendezvous table, not a real DHT: peers announce themselves, coordinators look peers up by
model. Records are strict :class:`PeerAnnouncement` JSON; bad ones get 400 with the error schema.

- ``POST|PUT /v1/announce``: body = one record. 200 ``{"ok": true, "expires_in_s": ttl}``.
- ``GET /v1/peers?model_id=M``: 200 ``{"model_id": M, "peers": [record, ...]}`` (live records).
- ``DELETE /v1/peers?model_id=M&peer_id=P``: withdraw. 200 ``{"removed": bool}``.
- ``GET /v1/models``: ``{"models": {model_id: peer count}}``. ``GET /health``: liveness.

Records expire ``ttl_s`` after they arrive (server clock); the table is bounded (503 when full).
Announce and withdraw are not authenticated here: signed records are the security layer's part.
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
from openhydra.discovery.records import PeerAnnouncement
from openhydra.discovery.store import AnnouncementStore, StoreFull, StoreLimits

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
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return json(body.model_dump(), status=status, headers=headers)


def _validation_error(exc: ValidationError) -> HTTPResponse:
    first = exc.errors(include_url=False)[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return _error(400, f"{param or 'record'}: {first['msg']}", param=param, code="invalid_record")


def create_app(store: AnnouncementStore | None = None, name: str = "openhydra_dht") -> Sanic:
    store = AnnouncementStore() if store is None else store
    app = Sanic(name)
    app.config.REQUEST_MAX_SIZE = MAX_BODY_BYTES
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.store = store

    @app.get("/health")
    async def health(request: Request) -> HTTPResponse:
        return json({"status": "ok", "records": len(store)})

    @app.route("/v1/announce", methods=["POST", "PUT"])
    async def announce(request: Request) -> HTTPResponse:
        try:
            record = PeerAnnouncement.model_validate_json(request.body or b"")
        except ValidationError as exc:
            return _validation_error(exc)
        try:
            ttl = store.put(record)
        except StoreFull as exc:
            return _error(503, str(exc), code="store_full", headers={"Retry-After": "30"})
        return json({"ok": True, "expires_in_s": ttl})

    @app.get("/v1/peers")
    async def peers(request: Request) -> HTTPResponse:
        model_id = request.args.get("model_id")
        if not model_id:
            return _error(400, "query parameter model_id is required", param="model_id")
        records = store.get(model_id)
        return json({"model_id": model_id, "peers": [r.to_wire() for r in records]})

    @app.delete("/v1/peers")
    async def withdraw(request: Request) -> HTTPResponse:
        model_id, peer_id = request.args.get("model_id"), request.args.get("peer_id")
        if not model_id or not peer_id:
            return _error(
                400,
                "query parameters model_id and peer_id are required",
                param="model_id" if not model_id else "peer_id",
            )
        return json({"removed": store.remove(model_id, peer_id)})

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
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_records < 1 or args.max_per_model < 1 or args.max_ttl_s <= 0:
        parser.error("--max-records, --max-per-model and --max-ttl-s must be positive")
    logging.basicConfig(level=args.log_level.upper())
    limits = StoreLimits(max_records=args.max_records, max_per_model=args.max_per_model, max_ttl_s=args.max_ttl_s)
    app = create_app(AnnouncementStore(limits))
    print(f"openhydra-dht listening on http://{args.host}:{args.port}", flush=True)
    app.run(host=args.host, port=args.port, single_process=True, access_log=False, motd=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
