"""The `openhydra-node` command line as a user meets it: help, --cfg, one-line errors, -m sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures

import pytest


def node_cli(*args: str, timeout: float = 120, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``openhydra-node ARGS`` in a child process; ``env`` entries set to None are removed from its environment."""
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "OPENHYDRA_THREADS": "1", **(env or {})}
    env = {k: v for k, v in merged.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "openhydra.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_lists_groups_and_options():
    out = node_cli("--help")
    assert out.returncode == 0
    for line in ("hardware: auto, cpu, cpu_fast, cpu_int4, cpu_int8, cuda, cuda_int8, cuda_nf4, m1, m2, m3, m4, rocm",
                 "model: llama3.1-8b, local, qwen0.8b", "shard: auto, full",
                 "economy:", "privacy:", "verification:", "compaction:", "discovery:", "api: default"):
        assert line in out.stdout


def test_cfg_job_prints_the_composed_config():
    out = node_cli("hardware=cpu", "model=smollm2-135m", "api.port=8081", "--cfg", "job")
    assert out.returncode == 0
    assert "port: 8081" in out.stdout and "SmolLM2-135M-Instruct" in out.stdout and "device: cpu" in out.stdout


def test_cfg_job_prints_a_config_that_would_not_start_and_says_why():
    """Printing must work for a config missing a value (to inspect it), but silence read as 'valid' (an operator's
    probe): the print is followed by one note on stderr, and the exit status stays 0 (the print worked)."""
    out = node_cli("api.port=99999", "--cfg", "job")
    assert out.returncode == 0 and "port: 99999" in out.stdout, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("openhydra-node: note: this config would not start: api.port: "
                                                   "Input should be less than or equal to 65535 (got 99999)")


def test_a_sweep_and_cfg_together_are_one_line():
    out = node_cli("-m", "model=smollm2-135m,qwen0.8b", "--cfg", "job")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("openhydra-node: config error: -m and --cfg cannot be combined"), last


def test_cfg_job_with_a_wrong_key_is_one_line_too():
    out = node_cli("discovery.bootstrap=x", "--cfg", "job")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "full_key" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "openhydra-node: config error: discovery.bootstrap is not a config key; keys under discovery: "
        "allow_unsigned_names, announce_interval_s, http, kademlia, mode, relay, target, timeout_s, ttl_s")
    assert node_cli("model=local", "--cfg", "job").returncode == 0  # not validated: a missing value may be inspected


def test_a_key_of_another_option_of_its_group_says_which_options_have_it():
    out = node_cli("model=smollm2-135m", "discovery=off", "discovery.http.urls=[http://x]", "action=check")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "openhydra-node: config error: discovery.http.urls is not a key of the discovery option this config uses; "
        "discovery=http has it")


def test_version():
    out = node_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("openhydra-node ")


@pytest.mark.parametrize("command", ["openhydra-node", "openhydra-dht", "openhydra-sim", "openhydra-bench"])
def test_every_installed_command_prints_openhydras_version(command):
    """The console scripts as installed (openhydra/launch.py): OpenHydra's version, not Hydra's or an argparse
    error."""
    from pathlib import Path

    from openhydra import __version__

    out = subprocess.run([str(Path(sys.executable).parent / command), "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"{command} {__version__}", (out.stdout, out.stderr)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["hardware=tpu"], ["hardware=tpu", "allowed: auto, cpu, cpu_fast, cpu_int4, cpu_int8, cuda, cuda_int8, "
                                            "cuda_nf4, m1, m2, m3, m4, rocm"]),
        (["model=gpt5"], ["model=gpt5", "qwen0.8b", "smollm2-135m"]),
        (["api.prot=1"], ["api.prot", "port"]),
        (["nonsense=1"], ["nonsense", "hardware"]),
        (["api.port=abc"], ["api.port", "integer"]),
        (["hardware.dtype=float8"], ["hardware.dtype", "bfloat16"]),
        (["shard=layers"], ["shard.end"]),
        (["-m", "hardware=cpu,tpu", "action=check"], ["hardware=tpu", "allowed"]),
        # found by an audit of the CLI (2026-12-06): each of these failed late, or not at all
        (["model=smollm2-135m", "shard=layers", "shard.end=40"], ["shard.end=40", "30 layers"]),
        (["model=smollm2-135m", "shard=index", "shard.total=31", "shard.index=0"], ["shard.total=31"]),
        (["shard=full", "shard.end=5"], ["shard=full", "shard=layers"]),
        (["api.default_max_tokens=9000", "api.max_tokens_limit=100"], ["api.default_max_tokens", "9000"]),
        (["hardware.threads=true"], ["hardware.threads", "integer"]),
        (["recipe=laptop"], ["+recipe=", "laptop"]),
    ],
)
def test_bad_overrides_end_with_one_clear_line(args, fragments):
    out = node_cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_a_typo_in_a_recipe_name_lists_the_users_own_recipes_too(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "my-box.yaml").write_text("# @package _global_\napi:\n  port: 8099\n")
    out = node_cli("+recipe=my-bx", env={"OPENHYDRA_CONFIG_DIR": str(tmp_path)})
    assert out.returncode == 2 and "allowed: auditor, bootstrap, gpu-shard, laptop, my-box," in out.stderr, out.stderr


def test_a_config_dir_on_the_command_line_adds_its_recipes(tmp_path):
    """Hydra's --config-dir: before, the node's own check of the command line did not search it and refused the
    folder's recipes ('recipe=mine is not an option') before Hydra could compose them (an operator's probe)."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\napi:\n  port: 8099\n")
    with futures.ThreadPoolExecutor(3) as pool:
        shown, typo, missing = pool.map(lambda args: node_cli(*args), [
            ("--config-dir", str(tmp_path), "+recipe=mine", "--cfg", "job"),
            (f"--config-dir={tmp_path}", "+recipe=mne"),
            ("-cd", str(tmp_path / "nowhere"), "+recipe=mine"),
        ])
    assert shown.returncode == 0 and "port: 8099" in shown.stdout, shown.stderr[-2000:]
    assert typo.returncode == 2 and "allowed: auditor, bootstrap, gpu-shard, laptop, mine," in typo.stderr, typo.stderr
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1] == (
        f"openhydra-node: config error: -cd {tmp_path / 'nowhere'}: not a folder (it adds a folder of recipes and "
        "group options to the config's search path)"), missing.stderr


def test_a_recipe_whose_secret_is_not_in_the_environment_says_which_variable():
    """Before: OmegaConf's own 'KeyError raised while resolving interpolation' text (an operator's probe)."""
    out = node_cli("+recipe=private-swarm", env={"OPENHYDRA_SWARM_SECRET": None})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("openhydra-node: config error: privacy.swarm_secret: needs the "
                                                   "environment variable OPENHYDRA_SWARM_SECRET, which is not set "
                                                   "(export it)"), out.stderr


def test_multirun_sweep_runs_every_job(tiny_model_dirs, tmp_path):
    out = node_cli("-m", "action=check", "model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu",
                   "hardware.dtype=float32,bfloat16", f"node.data_dir={tmp_path}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    checks = [line for line in out.stdout.splitlines() if line.startswith("check ok:")]
    assert len(checks) == 2
    assert "float32" in checks[0] and "bfloat16" in checks[1]


# ---- what fails at start says so in one line, exit 2 (CLI audit, 2026-12-06) -------------------------------------


def _one_line_exit_2(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("openhydra-node: cannot start: "), last
    for fragment in fragments:
        assert fragment in last, last


def _tiny(tiny_model_dirs) -> list[str]:
    return ["model=local", f"model.path={tiny_model_dirs['llama']}", "hardware=cpu"]


def test_an_api_port_in_use_is_named(tiny_model_dirs, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={tmp_path}", f"api.port={port}")
    _one_line_exit_2(out, f"api.port {port}", "in use")


def test_a_peer_port_in_use_is_named_before_loading(tiny_model_dirs, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={tmp_path}", "shard=layers", "shard.end=4",
                       f"peer.port={port}", "action=check")
    _one_line_exit_2(out, f"peer.port {port}", "in use")


def test_the_api_and_the_peer_cannot_share_a_port(tiny_model_dirs, tmp_path):
    """Both free, but the same: before, the node loaded the model, failed to bind its peer and exited with two
    tracebacks (an operator's probe)."""
    from openhydra.testing.processes import free_port

    port = free_port()
    out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={tmp_path}", "shard=layers", "shard.end=4",
                   f"api.port={port}", f"peer.port={port}")
    _one_line_exit_2(out, f"api.port and peer.port are both {port}")


def test_a_model_path_that_does_not_exist_is_one_line_on_a_node_alone(tmp_path):
    """Alone (no discovery), such a node can never load: before, it kept running with /health 200 and /readyz
    'failed' (an operator's probe); with discovery on, source=auto may still fetch the span from peers."""
    missing = tmp_path / "no-such-model"
    out = node_cli("model=local", f"model.path={missing}", "hardware=cpu", f"node.data_dir={tmp_path / 'd'}")
    _one_line_exit_2(out, f"model.path {missing} does not exist")


@pytest.mark.parametrize("case", ["missing-model", "postgres-without-url", "api-port-taken"])
def test_what_the_config_shows_will_not_start_is_named_before_torch_is_imported(tmp_path, case):
    """A typo answered in seconds, not after the imports a node's build takes (torch, transformers' model code):
    the schemas the command line is validated with import no torch, and what the config alone shows cannot start
    (a missing model folder on a node alone, a Postgres economy without a server URL, a port in use) is checked
    before building. The child's own import log (PYTHONPROFILEIMPORTTIME) says what it imported."""
    import socket

    args = ["model=local", "hardware=cpu", f"node.data_dir={tmp_path / 'd'}"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if case == "missing-model":
            args += [f"model.path={tmp_path / 'no-such-model'}"]
            fragment = "does not exist"
        elif case == "postgres-without-url":
            args += [f"model.path={tmp_path}", "economy=postgres"]
            fragment = "economy=postgres needs a server"
        else:
            args += [f"model.path={tmp_path}", "api.host=127.0.0.1", f"api.port={taken.getsockname()[1]}"]
            fragment = "api.port"
        out = node_cli(*args, env={"PYTHONPROFILEIMPORTTIME": "1", "OPENHYDRA_PG_URL": None})
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    said = [line for line in lines if not line.startswith("import time:")]
    assert fragment in said[-1] and said[-1].startswith("openhydra-node: "), said[-1]
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "sqlmodel" in imported or "hydra" in imported, "no import log: the check below would pass vacuously"
    heavy = sorted(m for m in imported if m == "torch" or m.startswith("transformers.models."))
    assert not heavy, f"imported before the error was named: {heavy[:5]}"

def test_two_peer_servers_cannot_share_a_port():
    """gRPC lets a second server bind a served port by default (SO_REUSEPORT): the kernel then splits connections
    between two peers answering as one address. The peers' server options turn that off."""
    import grpc

    from openhydra.peer.outbound import SERVER_OPTIONS

    first = grpc.server(futures.ThreadPoolExecutor(1), options=SERVER_OPTIONS)
    port = first.add_insecure_port("127.0.0.1:0")
    first.start()
    try:
        second = grpc.server(futures.ThreadPoolExecutor(1), options=SERVER_OPTIONS)
        with pytest.raises(RuntimeError, match="bind"):
            second.add_insecure_port(f"127.0.0.1:{port}")
    finally:
        first.stop(0)


def test_a_peer_whose_port_was_taken_after_the_check_says_so(tiny_model_dirs):
    """The race the start-up check cannot close: the peer server's own bind fails with CannotBind, which the node
    turns into its exit (node.load_model sets fatal_error; cli._serve stops and exits 2)."""
    from openhydra.peer.server import CannotBind, PeerServer
    from openhydra.runtime.shard import ShardRuntime

    runtime = ShardRuntime(tiny_model_dirs["llama"], 0, 4)
    first = PeerServer(runtime)
    port = int(first.start().rsplit(":", 1)[1])
    try:
        with pytest.raises(CannotBind, match=f"peer.port {port}"):
            PeerServer(runtime, port=port).start()
    finally:
        first.stop()


@pytest.mark.parametrize("case", ["file", "identity"])
def test_a_bad_data_dir_or_identity_key_is_named(tiny_model_dirs, tmp_path, case):
    if case == "file":
        data = tmp_path / "not-a-dir"
        data.write_text("x")
        fragments = [str(data), "not a directory"]
    else:
        data = tmp_path / "home"
        data.mkdir()
        (data / "identity.key").write_text("garbage, not a key")
        (data / "identity.key").chmod(0o600)
        fragments = ["identity.key"]
    out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={data}", "action=check")
    _one_line_exit_2(out, *fragments)


@pytest.mark.parametrize("case", ["no-url", "unreachable"])
def test_a_postgres_economy_without_a_server_is_named(tiny_model_dirs, tmp_path, case):
    """economy=postgres with no URL is a config error; with a URL nobody answers, the start fails in one line that
    names the server but not the password."""
    from openhydra.testing.processes import free_port

    port = free_port()  # nothing listens there
    args = ["economy=postgres"] if case == "no-url" else [
        "economy=postgres", f"economy.db_url=postgresql://nobody:s3cret@127.0.0.1:{port}/ledger"]
    out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={tmp_path / 'home'}", "action=check", *args,
                   env={"OPENHYDRA_PG_URL": None})
    if case == "no-url":
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("openhydra-node: config error: economy=postgres needs a server"), last
    else:
        _one_line_exit_2(out, "cannot open the ledger database", f"127.0.0.1:{port}")
        assert "s3cret" not in out.stderr


_DEFAULT_SIGINT_THEN_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                             "os.execv(sys.argv[1], sys.argv[1:])")


def _as_from_a_terminal(argv: list[str]) -> list[str]:
    """``argv`` as a shell in a terminal starts it: SIGINT at its default action, even where this test runner
    inherited it ignored (a background job, as CI may run us). Reset in a small Python that then execs ``argv``, not
    in a ``preexec_fn``: a preexec_fn makes subprocess fork() this process, which has used gRPC, and gRPC's fork
    handler then restarts its poller in the child, whose epoll descriptor the child closes before its exec
    (grpc/grpc#43055): the child aborts ("epoll_wait error: Bad file descriptor", status -6) before it ever runs
    the node, 3 of 300 such forks here. That was the node "aborted at start" of three CI runs."""
    return [sys.executable, "-c", _DEFAULT_SIGINT_THEN_EXEC, *argv]


def test_ctrl_c_while_the_node_is_still_starting_ends_it_quietly(tmp_path):
    """Ctrl-C in the first seconds (torch, transformers and Hydra importing) ends the installed console script with
    one line and exit status 130, not a KeyboardInterrupt traceback from wherever the import was; once it serves,
    Ctrl-C is its graceful stop (status 0). Repeated at several moments of the imports: a Ctrl-C that landed inside
    an import's callback was once swallowed (the node served on: 1 of 45 interrupted starts in a loop), which fails
    here as a node that does not end."""
    import signal
    import time
    from pathlib import Path

    script = Path(sys.executable).parent / "openhydra-node"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENHYDRA_HOME": str(tmp_path / "home")}
    outcomes = []
    for after_s in (0.0, 0.0, 0.1, 0.2, 0.3):  # after libtorch is mapped: still importing
        proc = subprocess.Popen(_as_from_a_terminal([str(script), "hardware=cpu", "api.port=0"]),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                maps = Path(f"/proc/{proc.pid}/maps").read_text()
                if "libtorch" in maps or proc.poll() is not None:
                    break
                time.sleep(0.01)
            time.sleep(after_s)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert "Traceback" not in out and "Exception ignored" not in out, (after_s, out[-2000:])
        if proc.returncode == 130:  # interrupted while starting
            assert out.strip().splitlines()[-1] == "openhydra-node: interrupted", (after_s, out[-2000:])
        else:  # it was already serving: the graceful stop
            assert proc.returncode == 0 and "OpenHydra node" in out, (after_s, proc.returncode, out[-2000:])
        outcomes.append(proc.returncode)
    assert outcomes[:2] == [130, 130], outcomes  # at once after torch began loading, it was still starting


def test_ctrl_c_while_serving_is_the_graceful_stop(tmp_path):
    """Once the console script serves, Ctrl-C is the node's own graceful stop (it withdraws from the DHT, ends streams,
    closes the ledger; status 0), not the start-up handler's immediate exit (openhydra/launch.py): the server
    replaced that handler when it started. The other Ctrl-C tests run the node without the console script."""
    import signal
    import time
    from pathlib import Path

    script = Path(sys.executable).parent / "openhydra-node"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENHYDRA_HOME": str(tmp_path / "home")}
    log = tmp_path / "node.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(_as_from_a_terminal([str(script), "hardware=cpu", "api.port=0"]), stdout=sink,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while "\nready: " not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "\nready: " in log.read_text(), log.read_text()[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0 and "Traceback" not in text, (proc.returncode, text[-2000:])
    assert "shutdown complete" in text and "openhydra-node: interrupted" not in text, text[-2000:]


def test_the_dht_names_a_port_in_use_and_logs_each_line_once(tmp_path):
    import socket
    import time
    from pathlib import Path

    script = str(Path(sys.executable).parent / "openhydra-dht")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([script, "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"openhydra-dht: cannot start: --port {port} on 127.0.0.1 is in use (another DHT?): choose another with "
        "--port PORT")

    log = tmp_path / "dht.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([script, "--port", "0"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "Worker ready" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert text.count("Worker ready") == 1, text  # Sanic's line, not again through the root logger
    listening = text.splitlines()[0]
    assert listening.startswith("openhydra-dht listening on http://127.0.0.1:") and not listening.endswith(":0"), text


def test_action_dht_serves_the_table_on_a_free_port_and_logs_each_line_once(tmp_path):
    """``openhydra-node action=dht api.port=0``: the bootstrap host on the port the system picked (the banner names
    it), answering the table's API; Sanic's lines once each."""
    import re
    import time

    import httpx

    log = tmp_path / "dht.log"
    env = {**os.environ, "OPENHYDRA_HOME": str(tmp_path / "home")}
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "openhydra.cli", "action=dht", "api.port=0"], stdout=sink,
                                stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "Worker ready" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        text = log.read_text()
        url = re.search(r"DHT +(http://127\.0\.0\.1:\d+)", text)
        assert url and not url.group(1).endswith(":0"), text
        response = httpx.get(url.group(1) + "/v1/models", timeout=10)
        assert response.status_code == 200 and response.json() == {"models": {}}, response.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert log.read_text().count("Worker ready") == 1, log.read_text()


def test_a_sweep_runs_every_job_when_one_check_fails(tiny_model_dirs, tmp_path):
    missing = tmp_path / "no-model-here"
    out = node_cli("-m", "action=check", "model=local", f"model.path={missing},{tiny_model_dirs['llama']}",
                   "hardware=cpu", f"node.data_dir={tmp_path / 'home'}", timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert sum(line.startswith("check ok:") for line in out.stdout.splitlines()) == 1  # the second job ran
    assert "check failed" in out.stderr and "1 check(s) of the sweep failed" in out.stderr


def test_an_error_in_the_saved_override_names_the_file(tmp_path):
    saved = tmp_path / "local" / "auto.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text("# @package _global_\nhardware:\n  threadz: 2\n")
    out = node_cli("api.port=8089", env={"OPENHYDRA_CONFIG_DIR": str(tmp_path)})
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert "threadz" in line and str(saved) in line, line


def test_a_data_dir_serves_one_running_node(tiny_model_dirs, tmp_path):
    """Two nodes on one data dir would announce one identity twice and write one ledger (CLI audit, 2026-12-06)."""
    from openhydra.testing.processes import NodeProcess

    data = tmp_path / "home"
    with NodeProcess([*_tiny(tiny_model_dirs), f"node.data_dir={data}"]) as node:
        out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={data}", "action=check")
        _one_line_exit_2(out, str(data), "in use by a running node", f"pid {node.proc.pid}")
    out = node_cli(*_tiny(tiny_model_dirs), f"node.data_dir={data}", "action=check")  # free again once it stopped
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_banner_warns_when_the_api_is_open_beyond_loopback_without_a_token():
    from openhydra.cli import _open_api_warning
    from openhydra.config.schema import ApiConfig

    assert _open_api_warning(ApiConfig(host="127.0.0.1")) == _open_api_warning(ApiConfig(host="::1")) == ""
    assert _open_api_warning(ApiConfig(host="localhost")) == ""
    assert _open_api_warning(ApiConfig(host="0.0.0.0", bearer_token="t" * 16)) == ""
    line = _open_api_warning(ApiConfig(host="0.0.0.0", port=8080))
    assert line.startswith("  WARNING    the API listens on 0.0.0.0 without api.bearer_token: anyone who can reach "
                           "port 8080 can use this node")
