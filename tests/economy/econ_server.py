"""A minimal Sanic app around the economy routes, run as a real server by test_routes.py.

    python -m tests.economy.econ_server PORT KEY_FILE DB_URL MODE

MODE is ``hydra`` or ``off``. The app renders APIError the way the node's app does.
"""

from __future__ import annotations

import sys

from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from openhydra.api.errors import APIError
from openhydra.api.routes_economy import economy_status, register_economy_routes
from openhydra.crypto.identity import Identity
from openhydra.economy.factory import build_economy


def make_app(key_file: str, db_url: str, mode: str) -> Sanic:
    identity = Identity.load_or_create(key_file)
    economy = build_economy(identity, db_url=db_url, hydra=True, enabled=(mode != "off"))
    app = Sanic("econ_test")

    @app.exception(APIError)
    async def _api_error(request: Request, exc: APIError) -> HTTPResponse:
        return json(exc.body(), status=exc.status, headers=exc.headers)

    async def status(request: Request) -> HTTPResponse:
        return json({"economy": economy_status(economy)})

    app.add_route(status, "/v1/network/status", methods=["GET"])
    register_economy_routes(app, economy)
    return app


if __name__ == "__main__":
    port, key_file, db_url, mode = sys.argv[1:5]
    make_app(key_file, db_url, mode).run(
        host="127.0.0.1", port=int(port), single_process=True, access_log=False, motd=False
    )
