"""`openhydra-node`: compose the config with Hydra, validate it, build the node, serve.

Config errors end with one line on stderr naming the key and the allowed values, and exit code 2;
Hydra's own flags (--help, --cfg job, -m) work as usual.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from openhydra import answer_version
from openhydra.config.load import ConfigError, conf_dir, explain_hydra_error, validate

if TYPE_CHECKING:
    from openhydra.config.schema import NodeConfig

log = logging.getLogger("openhydra")

_HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                     "--resolve", "-p", "--package"}
_HYDRA_PRINT_FLAGS = {"--cfg", "-c", "--resolve", "-p", "--package"}
_MAX_PREFLIGHT_COMBINATIONS = 64
_STREAM_GRACE_S = 3.0  # on Ctrl-C / SIGTERM: how long running streams may finish before they are ended


def _fail(message: str, what: str = "config error") -> None:
    print(f"openhydra-node: {what}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _check_data_dir(path: Path) -> None:
    """node.data_dir must be a directory this user can write (identity key, ledger): said now, in one line."""
    if path.exists() and not path.is_dir():
        _fail(f"node.data_dir {path} is not a directory (set OPENHYDRA_HOME or node.data_dir)", "cannot start")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"node.data_dir {path} cannot be created: {exc.strerror or exc} (set OPENHYDRA_HOME or node.data_dir)",
              "cannot start")
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(f"node.data_dir {path} is not writable by this user (set OPENHYDRA_HOME or node.data_dir)",
              "cannot start")


_held_locks: dict[Path, object] = {}  # open lock files: released when the process exits


def _lock_data_dir(path: Path) -> None:
    """One running node per data dir: two would share an identity (one peer id announced twice) and a ledger.
    The jobs of a ``-m`` sweep run one after another in this process and keep its lock."""
    import fcntl

    path = path.resolve()
    if path in _held_locks:
        return
    handle = open(path / "node.lock", "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        _fail(f"node.data_dir {path} is in use by a running node ({holder}); give each node its own "
              f"(OPENHYDRA_HOME or node.data_dir)", "cannot start")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _held_locks[path] = handle


def _check_port(key: str, host: str, port: int) -> int:
    """``key`` (api.port, peer.port) free on ``host``, or one line naming it and exit 2; returns the port (for 0, the
    free one the system picked)."""
    from openhydra.ports import PortUnavailable, probe_port

    try:
        return probe_port(key, host, port, change=f"{key}=...")
    except PortUnavailable as exc:
        _fail(str(exc), "cannot start")
        raise  # unreachable: _fail exits


def _hosts_overlap(a: str, b: str) -> bool:
    """Whether servers on hosts ``a`` and ``b`` would contend for one port (the same address, or a wildcard)."""
    wildcard = {"0.0.0.0", "::", "[::]", ""}
    return a == b or a in wildcard or b in wildcard


def _without_overridden_promotion(argv: list[str]) -> list[str]:
    """``argv`` plus ``~local`` when the saved promotion exists and the command line chooses what it decides (model,
    span, quantization: hardware/promote.py chosen_over_promotion); said in one line."""
    from openhydra.config.load import user_config_dir
    from openhydra.hardware.promote import chosen_over_promotion, current_override, override_path

    path = override_path(user_config_dir())
    overrides = _user_overrides(argv)
    chosen = chosen_over_promotion(overrides)
    if not chosen or not path.is_file() or "~local" in argv:
        return argv
    try:
        target = current_override(path.parent.parent)
    except Exception:  # a broken file: it is not composed anyway, so it cannot fail this start
        target = "?"
    print(f"openhydra-node: not applying the saved promotion to {target} ({path}): "
          f"the command line chooses {' '.join(chosen)}; openhydra-node --demote or deleting the file removes it",
          file=sys.stderr, flush=True)
    at = argv.index(overrides[0])  # among the overrides: argparse takes one run of them, not two
    return [*argv[:at], "~local", *argv[at:]]


def _user_overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if ((not a.startswith("-") and "=" in a) or a.startswith("~"))
            and not a.startswith(("hydra.", "hydra/"))]


def _config_dirs(argv: list[str]) -> list[Path]:
    """The folder Hydra's ``--config-dir``/``-cd`` adds to the search path (its recipes and options compose), read
    by Hydra's own argument parser, so it is the one ``hydra.main`` uses (the last, when several are given)."""
    from hydra._internal.utils import get_args_parser

    value = get_args_parser().parse_known_args(argv)[0].config_dir
    if value is None:
        return []
    folder = Path(value).expanduser().absolute()
    if not value or not folder.is_dir():
        name = next((a.split("=")[0] for a in reversed(argv) if a.split("=")[0] in ("--config-dir", "-cd")),
                    "--config-dir")
        _fail(f"{name} {value or '(no folder given)'}: not a folder (it adds a folder of recipes and group "
              "options to the config's search path)")
    return [folder]


def preflight(argv: list[str], validate_config: bool = True) -> list[str]:
    """Compose (and validate) every combination the command line asks for, so errors come as one line. With
    ``validate_config`` False, a config that composes but would not start is returned as its problems instead."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from openhydra.config.load import also_search

    extra = _config_dirs(argv)
    also_search(extra)
    overrides = _user_overrides(argv)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        _fail(f"cannot parse overrides: {str(exc).splitlines()[0]}")
    choices = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            choices.append([text])
    problems: list[str] = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="openhydra-node"):
        search_path = GlobalHydra.instance().config_loader().get_search_path()
        for folder in extra:  # where hydra.main puts a --config-dir (hydra/_internal/utils.py run_hydra)
            search_path.prepend(provider="command-line", path=f"file://{folder}",
                                anchor=SearchPathQuery(provider="schema"))
        for combo in itertools.islice(itertools.product(*choices), _MAX_PREFLIGHT_COMBINATIONS):
            try:
                cfg = compose(config_name="config", overrides=list(combo))
            except Exception as exc:
                _fail(explain_hydra_error(exc) + _from_override())
            try:
                validate(cfg)
            except ConfigError as exc:
                if validate_config:
                    _fail(str(exc) + _from_override())
                problems.append(str(exc))
    return problems


def _from_override() -> str:
    """Where an error may come from besides the command line: the override auto-promotion wrote, named, with the
    way to remove it (the error would otherwise read as if the user had typed it)."""
    from openhydra.config.load import user_config_dir
    from openhydra.hardware.promote import override_path

    path = override_path(user_config_dir())
    if not path.is_file():
        return ""
    return f" (the saved override {path} applies too: fix or delete it if the error is in it)"


def _check_before_building(node_cfg: NodeConfig) -> None:
    """What the config alone shows will not start, named before the imports that building a node takes (seconds):
    a Postgres economy without a server URL, a missing model folder on a node alone, ports in use."""
    from openhydra.config.schema import group_schema

    economy = group_schema("economy").model_validate(node_cfg.economy)
    if economy.enabled:
        try:
            economy.resolved_db_url()
        except ConfigError as exc:
            _fail(str(exc))
    if node_cfg.action == "serve":
        # api.port=0: any free port, as peer.reply_port 0 (Sanic itself would take 8000)
        node_cfg.api.port = _check_port("api.port", node_cfg.api.host, node_cfg.api.port)
    model_path = node_cfg.model.path
    if (node_cfg.action == "serve" and model_path and not node_cfg.joins_swarm  # action=check: a failed check
            and not Path(model_path).expanduser().exists()):
        # with discovery on, source=auto may still fetch the span from peers (openhydra/weights/); alone, never
        _fail(f"model.path {model_path} does not exist (a transformers folder: config.json, safetensors, tokenizer)",
              "cannot start")
    if node_cfg.joins_swarm and node_cfg.peer.transport != "libp2p":
        _check_port("peer.port", node_cfg.peer.host, node_cfg.peer.port)
        api, peer = node_cfg.api, node_cfg.peer
        if node_cfg.action == "serve" and peer.port == api.port and _hosts_overlap(api.host, peer.host):
            _fail(f"api.port and peer.port are both {api.port}: the HTTP API and the peer's gRPC server each need a "
                  "port of their own (change one: api.port=... or peer.port=...)", "cannot start")


def run(cfg: DictConfig) -> None:
    try:
        node_cfg = validate(cfg)
    except ConfigError as exc:
        _fail(str(exc))
    if node_cfg.action in ("promote", "demote"):  # write or step down the local override, then exit
        from openhydra.hardware.auto import run_action

        raise SystemExit(run_action(node_cfg.action, node_cfg))
    if node_cfg.action == "dht":  # a bootstrap host: only the HTTP DHT table, no model
        _serve_dht(node_cfg)
        return
    _check_data_dir(node_cfg.node.data_path)
    if node_cfg.action in ("serve", "check"):
        _lock_data_dir(node_cfg.node.data_path)
    _check_before_building(node_cfg)  # said in a second: building imports torch and the model code first
    from openhydra.build import build_node
    from openhydra.crypto.identity import IdentityError
    from openhydra.economy.errors import LedgerUnavailable
    from openhydra.runtime.backend import BackendUnavailable

    try:
        node = build_node(node_cfg, cfg)
    except Exception as exc:  # instantiate() wraps the backend's own error in an InstantiationException
        reason = exc if isinstance(exc, BackendUnavailable | IdentityError) else exc.__cause__
        if isinstance(reason, BackendUnavailable):
            _fail(str(reason))
        if isinstance(reason, IdentityError | LedgerUnavailable):
            _fail(str(reason), "cannot start")
        if isinstance(reason, ConfigError):
            _fail(str(reason))
        raise
    if node_cfg.action == "check":
        node.load_model()
        _check(node)
        return
    _serve(node)


_failed_checks: list[str] = []
"""A ``-m`` sweep's failed checks: every job runs, and the sweep exits 1 at the end if any failed."""


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # not under Hydra (tests call run() directly)
        return False


def _check(node) -> None:
    state = node.state
    if not state.ready:
        print(f"openhydra-node: check failed: {state.load_error}", file=sys.stderr)
        if _multirun():  # the sweep's other jobs still run (node_main exits 1 after them)
            _failed_checks.append(str(state.load_error))
            node.shutdown()
            return
        raise SystemExit(1)
    import asyncio

    from openhydra.router.engine import GenerationRequest

    engine = state.engine
    final = asyncio.run(engine.complete(GenerationRequest(engine.chat_prompt_ids(
        [{"role": "user", "content": "Say hello."}]), max_tokens=4)))
    node.shutdown()
    print(f"check ok: model={state.model.id} layers=[{state.model.span[0]}, {state.model.span[1]}) "
          f"backend={node.backend.describe()} tokens={final.completion_tokens} text={final.text!r}")


def _span_text(shard) -> str:
    if shard.mode == "full":
        return "all layers"
    if shard.mode == "layers":
        return f"layers [{shard.start}, {shard.end if shard.end is not None else 'end'})"
    if shard.mode == "index":
        return f"shard {shard.index} of {shard.total}"
    return "auto (the span the swarm covers least)"


def _banner(node) -> str:
    cfg = node.cfg
    from openhydra.config.load import user_config_dir

    identity = getattr(node.identity, "path", None) or (cfg.privacy or {}).get("identity_path") or "none"
    admission = ""
    if node.in_swarm:  # what joining costs (crypto/membership.py); a lone node admits no one
        from openhydra.crypto.config import PrivacyConfig
        from openhydra.peer.node_privacy import admission_text

        admission = f"  admission  {admission_text(PrivacyConfig.model_validate(cfg.privacy or {}))}\n"
    return (
        f"OpenHydra node\n"
        f"  API        http://{cfg.api.host}:{cfg.api.port}  (OpenAI /v1, Ollama /api, /health, /metrics)\n"
        f"{_open_api_warning(cfg.api)}"
        f"  model      {cfg.model.name or cfg.model.path or cfg.model.hf_id}, {_span_text(cfg.shard)} "
        f"(loading in the background; GET /readyz turns 200 when ready)\n"
        f"  hardware   {node.backend.describe()}\n"
        f"  data dir   {cfg.node.data_path}   identity {identity}\n"
        f"{admission}"
        f"  reach      peer.transport={cfg.peer.transport} (reachable: direct|relayed|unreachable, with the reason, in "
        f"the log and /v1/network/status once joined)\n"
        f"  config     {conf_dir()} + {user_config_dir()}\n"
        f"  stop       Ctrl-C (withdraws from the DHT, ends streams, closes the ledger)"
    )


def _open_api_warning(api) -> str:
    """A banner line when the API listens beyond loopback without a bearer token (a red team noticed nothing said
    so): anyone who reaches the port chats through the node, spends its credits and moves its HYDRA."""
    import ipaddress

    if api.bearer_token or api.host == "localhost":
        return ""
    try:
        if ipaddress.ip_address(api.host).is_loopback:
            return ""
    except ValueError:
        pass  # a host name: not known to be loopback
    return (f"  WARNING    the API listens on {api.host} without api.bearer_token: anyone who can reach port "
            f"{api.port} can use this node, spend its credits and move its HYDRA (set api.bearer_token, or "
            f"api.host=127.0.0.1)\n")


def _serve_dht(cfg) -> None:
    """action=dht: the HTTP DHT table on api.host:api.port, plus a Kademlia DHT node when discovery says so."""
    from openhydra.discovery.config import DiscoveryConfig
    from openhydra.discovery.http_dht_server import create_app

    discovery = DiscoveryConfig.model_validate(cfg.discovery)
    cfg.api.port = _check_port("api.port", cfg.api.host, cfg.api.port)
    app = create_app(allow_unsigned_names=discovery.allow_unsigned_names)  # plain peer names: dev swarms only
    from openhydra.ports import sanic_logs_once

    sanic_logs_once()
    url = f"http://{cfg.api.host}:{cfg.api.port}"
    kademlia, background = None, None
    lines = [f"OpenHydra DHT bootstrap host\n  DHT        {url}  (nodes join with discovery=http "
             f"discovery.http.urls=[{url}])"]
    if discovery.mode in ("kademlia", "dual"):  # a long-lived Kademlia peer others bootstrap from
        from openhydra.node import BackgroundLoop

        kademlia = discovery.build()
        kademlia = getattr(kademlia, "kademlia", kademlia)  # dual: its Kademlia half
        background = BackgroundLoop()
        background.run(kademlia.start(), timeout=60)
        lines.append(f"  kademlia   {' '.join(kademlia.visible_maddrs)}  (discovery.kademlia.initial_peers=[...])")
    lines.append(f"  config     {conf_dir()}")
    print("\n".join(lines), flush=True)
    try:
        app.run(host=cfg.api.host, port=cfg.api.port, single_process=True, motd=False, access_log=False)
    finally:
        if background is not None:
            background.run(kademlia.stop(), timeout=30)
            background.stop()
    log.info("shutdown complete")


def _serve(node) -> None:
    app, cfg = node.app, node.cfg

    from openhydra.ports import sanic_logs_once

    sanic_logs_once()  # after the app is built

    failed: list[str] = []

    @app.after_server_start
    async def _start_loading(app_) -> None:
        loop = asyncio.get_running_loop()

        def load() -> None:
            node.load_model()
            if node.fatal_error:  # e.g. peer.port taken meanwhile: stop rather than answer 503 for ever
                failed.append(node.fatal_error)
                loop.call_soon_threadsafe(app_.stop)

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    @app.before_server_stop
    async def _stop(app_) -> None:
        log.info("shutting down: withdrawing from the DHT, ending streams, closing the ledger")
        if node.background is not None and node.announcer is not None:  # first, so no new requests route here
            try:
                node.background.run(node.announcer.stop(withdraw=True), timeout=10)
                log.info("withdrew the announcement")
            except Exception as exc:  # the record still expires after its TTL
                log.warning("could not withdraw the announcement: %s", exc)
        engine = node.state.engine
        if engine is not None and engine.active_sessions:  # let short streams finish; longer ones get an error event
            log.info("waiting up to %.0f s for %d stream(s) to finish", _STREAM_GRACE_S, len(engine.active_sessions))
            deadline = time.monotonic() + _STREAM_GRACE_S
            while engine.active_sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        node.shutdown()
        log.info("shutdown complete")

    print(_banner(node), flush=True)
    app.run(host=cfg.api.host, port=cfg.api.port, single_process=True, motd=False, access_log=False)
    if failed:
        _fail(failed[0], "cannot start")


def node_main() -> None:
    from openhydra.sweep import die_with_launcher

    die_with_launcher()  # a sweep's job started as a fresh process ends with its launcher (openhydra/sweep.py)
    from openhydra.runtime.malloc import limit_arenas

    limit_arenas()  # before torch, gRPC or Sanic start a thread: fewer glibc arenas, less heap growth (issue 15)
    from openhydra.runtime.compute_lane import set_spin_default

    set_spin_default()  # before torch loads libgomp: the compute lane's workers sleep soon after a step
    argv = sys.argv[1:]
    if answer_version("openhydra-node", argv):  # `python -m openhydra.cli` (the console scripts: openhydra/launch.py)
        return
    from openhydra.runtime.lean_imports import skip_unused_optional_imports

    # First: before anything imports transformers' modeling code (building the node does).
    skip_unused_optional_imports()  # issue 17, lean peers: no SciPy for transformers' losses (~20 MiB)
    for flag, action in (("--promote", "action=promote"), ("--demote", "action=demote")):
        if flag in argv:  # the hand-run form of auto-promotion; Hydra itself knows no such flag
            argv = [action if a == flag else a for a in argv]
            sys.argv = [sys.argv[0], *argv]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = [a for a in argv if a.split("=")[0] in ("-m", "--multirun", "--cfg", "-c", "--info", "-i",
                                                     "--shell-completion", "-sc")]
    if len(modes) > 1:  # Hydra raises a ValueError with a traceback for this
        _fail(f"{' and '.join(modes)} cannot be combined: choose one (a -m sweep runs its jobs; --cfg prints one "
              "job's config)")
    argv = _without_overridden_promotion(argv)
    sys.argv = [sys.argv[0], *argv]  # what hydra.main parses
    info = [a for a in argv if a.split("=")[0] in _HYDRA_INFO_FLAGS]
    problems: list[str] = []
    if not info:
        preflight(argv)
    elif all(a.split("=")[0] in _HYDRA_PRINT_FLAGS for a in info):  # printing the config: composing must work
        problems = preflight(argv, validate_config=False)  # a config missing a value may still be inspected
    import hydra

    main = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(run)
    main()
    for problem in problems:  # after the config it printed (an operator's probe: it printed an invalid one silently)
        print(f"openhydra-node: note: this config would not start: {problem}", file=sys.stderr)
    if _failed_checks:
        print(f"openhydra-node: {len(_failed_checks)} check(s) of the sweep failed", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    node_main()
