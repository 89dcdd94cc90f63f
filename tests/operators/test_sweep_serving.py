"""``openhydra-node -m`` over spans starts every job at once (Hydra's own launcher ran the second node only after the
first was stopped): real processes, an HTTP DHT, the ``openai`` client through both spans, Ctrl-C passed to every
job, a failed job reported while the other serves, and a SIGKILLed launcher leaves no node behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from omegaconf import OmegaConf

from openhydra.sweep import Job, _relay, collision_overrides, run_jobs, shared_identity
from openhydra.testing.processes import DhtProcess, NodeProcess, consecutive_free_ports, start_sweep, sweep_overrides
from openhydra.testing.wait import wait_until

REPO = Path(__file__).resolve().parents[2]


def _cfg(**keys) -> object:
    base = {"action": "serve", "api": {"port": 8080}, "peer": {"port": 50051, "reply_port": 0},
            "node": {"data_dir": "~/.openhydra"}}
    cfg = OmegaConf.create(base)
    for dotted, value in keys.items():
        OmegaConf.update(cfg, dotted.replace("__", "."), value)
    return cfg


def test_jobs_that_would_share_a_port_or_data_dir_get_the_next_ones() -> None:
    extra = collision_overrides([_cfg(), _cfg(), _cfg()])
    assert extra[0] == []
    assert extra[1] == ["api.port=8081", "peer.port=50052", "node.data_dir='~/.openhydra/job-1'"]
    assert extra[2] == ["api.port=8082", "peer.port=50053", "node.data_dir='~/.openhydra/job-2'"]
    # values the sweep already sets apart, and port 0 (any free port), are left alone
    apart = collision_overrides([_cfg(api__port=9000, node__data_dir="/a", peer__port=0),
                                 _cfg(api__port=9001, node__data_dir="/b", peer__port=0)])
    assert apart == [[], []]
    # the DHT bootstrap table has no peer port to move
    assert collision_overrides([_cfg(action="dht", node__data_dir="/d"), _cfg(action="dht", api__port=8090)]) == [
        [], []]
    # a path the override grammar would parse stays one quoted string
    assert collision_overrides([_cfg(node__data_dir="/x/it's"), _cfg(node__data_dir="/x/it's")])[1][-1] == (
        "node.data_dir='/x/it\\'s/job-1'")


def test_a_moved_port_never_lands_on_a_port_another_job_names_or_was_given() -> None:
    # api.port next to peer.port: job 1's API must not take job 0's peer port (found in review)
    extra = collision_overrides([_cfg(api__port=9000, peer__port=9001)] * 3)
    assert extra == [[], ["api.port=9002", "peer.port=9003", "node.data_dir='~/.openhydra/job-1'"],
                     ["api.port=9004", "peer.port=9005", "node.data_dir='~/.openhydra/job-2'"]]
    # a cartesian sweep of api.port=8080,8081 over two other values: four jobs, four API ports
    ports = [8080, 8081, 8080, 8081]
    extra = collision_overrides([_cfg(api__port=p, peer__port=0, node__data_dir=f"/d{i}")
                                 for i, p in enumerate(ports)])
    assert extra == [[], [], ["api.port=8082"], ["api.port=8083"]]


def test_one_data_dir_spelled_two_ways_is_one_and_a_shared_identity_key_is_refused() -> None:
    home = os.path.expanduser("~")
    extra = collision_overrides([_cfg(node__data_dir="~/oh"), _cfg(node__data_dir=f"{home}/oh", api__port=1,
                                                                    peer__port=2)])
    assert extra[1] == [f"node.data_dir='{home}/oh/job-1'"]
    assert shared_identity([_cfg(privacy={"identity_path": "/k/id.key"}),
                            _cfg(privacy={"identity_path": "/k/job-1/id.key"})]) is None
    clash = shared_identity([_cfg(privacy={"identity_path": "/k/id.key"})] * 2)
    assert clash is not None and clash.startswith("jobs #0 and #1 would share privacy.identity_path=/k/id.key")


def test_each_line_is_prefixed_with_its_job_and_progress_bars_keep_their_carriage_returns() -> None:
    out, job = io.BytesIO(), Job(index=3, overrides=[], main=lambda: 0)
    _relay(job, b"hello\nwor", out)
    assert out.getvalue() == b"[#3] hello\n" and job.pending == b"wor"
    _relay(job, b"ld\n\r 50%\r100%\n", out)
    assert out.getvalue() == b"[#3] hello\n[#3] world\n[#3]  50%\r[#3] 100%\n" and job.pending == b""
    out = io.BytesIO()
    _relay(job, b"windows\r", out)  # a \r\n split between two reads is one line ending
    _relay(job, b"\nnext\r\n", out)
    assert out.getvalue() == b"[#3] windows\r\n[#3] next\r\n"


def _sweep(model, dht: DhtProcess, data_dir, port: int) -> NodeProcess:
    return NodeProcess([*sweep_overrides(model, dht.url, data_dir, 2), "privacy=off"], port=port,
                       log_path=data_dir.parent / f"sweep-{port}.log")


def _listening(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz?scope=node", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _peer_ids(dht: DhtProcess, model_id: str) -> list[str]:
    answer = httpx.get(dht.url + "/v1/peers", params={"model_id": model_id}, timeout=5).json()
    return sorted(p["peer_id"] for p in answer["peers"])


@pytest.fixture
def swarm(tiny_model_dirs):
    """The tiny llama, an HTTP DHT and a port P with P + 1 free too (the sweep's job 1 serves on P + 1)."""
    with DhtProcess() as dht:
        yield tiny_model_dirs["llama"], dht, consecutive_free_ports(2)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_serves_every_span_at_once_and_ctrl_c_stops_them_all(swarm, tmp_path):
    model, dht, port = swarm
    launcher = _sweep(model, dht, tmp_path / "data", port)
    try:
        start_sweep(launcher, 2, timeout_s=300)  # both jobs ready (a launcher that exits fails it, with its log)
        log = launcher.log_text()
        assert "forked from this process" in log, log[-3000:]
        assert f"api.port={port + 1}" in log and "job-1" in log
        # two identities (job 1 has its own data dir), both announced
        ids = wait_until(lambda: len(_peer_ids(dht, model.name)) == 2 and _peer_ids(dht, model.name), 60, 0.3,
                         "both jobs announced")
        assert len(set(ids)) == 2
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        reply = wait_until(lambda: client.chat.completions.create(
            model=model.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0),
            120, 0.5, "a completion through both jobs' spans", ignore=openai.APIError)
        assert reply.usage.completion_tokens == 4
        route = httpx.get(f"http://127.0.0.1:{port}/v1/network/status", timeout=10).json()
        assert route["model"]["span"] == [0, 4], route["model"]
        second = httpx.get(f"http://127.0.0.1:{port + 1}/v1/network/status", timeout=10).json()
        assert second["model"]["span"] == [4, 8], second["model"]

        os.kill(launcher.proc.pid, signal.SIGINT)  # Ctrl-C reaches the launcher; it passes it on once
        assert launcher.proc.wait(timeout=60) == 0, launcher.log_text()[-3000:]
        log = launcher.log_text()
        assert log.count("shutdown complete") == 2 and "[#0] shutdown complete" in log
        assert "[#1] shutdown complete" in log
        assert not _listening(port) and not _listening(port + 1)
    finally:
        launcher.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_job_is_reported_the_other_serves_and_a_killed_launcher_leaves_no_node(swarm, tmp_path):
    model, dht, port = swarm
    blocker = socket.socket()  # job 1's API port (port + 1) is taken
    blocker.bind(("127.0.0.1", port + 1))
    blocker.listen()
    launcher = _sweep(model, dht, tmp_path / "data", port)
    launcher.start()
    jobs: list[psutil.Process] = []
    try:
        wait_until(lambda: "job #1" in launcher.log_text(), 300, 0.3, "job 1's failure reported")
        log = launcher.log_text()
        assert "1 job(s) still running" in log, log[-3000:]
        assert f"[#1] openhydra-node: cannot start: api.port {port + 1}" in log, log[-3000:]
        wait_until(lambda: _listening(port), 300, 0.3, "job 0 ready")
        jobs = psutil.Process(launcher.proc.pid).children()
        assert len(jobs) == 1
        launcher.kill(signal.SIGKILL)
        wait_until(lambda: not jobs[0].is_running() or jobs[0].status() == psutil.STATUS_ZOMBIE, 60, 0.2,
                   "job 0 ended with its launcher")
        assert not _listening(port)
    finally:
        blocker.close()
        launcher.stop()
        for job in jobs:  # nothing of this test may outlive it
            if job.is_running():
                job.kill()


def _fork_probe(scenario: str, tmp_path) -> dict:
    """tests/operators/sweep_fork_probe.py: forked jobs run from a fresh single-threaded interpreter, as the launcher
    runs them (forking this threaded pytest worker could deadlock a child on a lock another thread held)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.operators.sweep_fork_probe", scenario, str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forked_jobs_report_their_output_and_exit_status(tmp_path) -> None:
    """Also: a job does not run the launcher's exit handlers (a forked pytest worker ran its fork-server client's,
    which shut the socket the worker shares with its fork server, and the session's nodes could not be waited for)."""
    probe = _fork_probe("output", tmp_path)
    assert probe["statuses"] == [3, 1, 1] and not probe["ran_in_job"]
    text = probe["text"]
    assert "[#0] the job's own exit handler\n" in text
    assert "[#0] one\n[#0] two\n" in text and "[#0] to stderr\n" in text
    assert "[#1] a one-line reason\n" in text
    assert "[#2] RuntimeError: boom\n" in text and "[#2] Traceback" in text
    assert "job #0 (a=1) ended with status 3" in text and "job #2 (a=3) ended with status 1" in text


def test_a_signal_the_launcher_ignores_stays_ignored_in_its_jobs(tmp_path) -> None:
    """nohup: a single node ignores SIGHUP and survives the logout; so do a sweep's jobs (found in review)."""
    assert _fork_probe("nohup", tmp_path) == {"statuses": [0], "still_ignored": True}


def test_sigint_stops_the_jobs_of_a_launcher_that_inherited_it_ignored(tmp_path) -> None:
    """A sweep started in the background of a script inherits SIGINT ignored; ``kill -INT`` still stops its jobs,
    as it stops a single node started the same way (an operator's probe: the jobs served on)."""
    probe = _fork_probe("background", tmp_path)
    # stopped by the signal it was passed (0: the sweep's clean stop), not after sleeping its 30 s out
    assert probe["statuses"] == [0] and probe["seconds"] < 20, probe


def test_jobs_run_as_fresh_processes_where_forking_is_unsafe(tmp_path) -> None:
    """The fallback: each job is ``python -m openhydra.cli`` with its overrides (here quick ones), and with the
    launcher's ``--config-dir``, whose recipes a job's overrides may name (before, it was not passed on)."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\napi:\n  port: 8099\n")
    jobs = [Job(index=0, overrides=["--version"], main=lambda: 0),
            Job(index=1, overrides=["hardware=tpu"], main=lambda: 0),
            Job(index=2, overrides=["+recipe=mine", "--cfg", "job"], main=lambda: 0,
                flags=[f"--config-dir={tmp_path}"])]
    out = io.BytesIO()
    assert run_jobs(jobs, fork=False, out=out) == [0, 2, 0]
    text = out.getvalue().decode()
    assert "[#0] openhydra-node " in text
    assert "[#1] openhydra-node: config error: hardware=tpu is not an option" in text, text
    assert "job #1 (hardware=tpu) ended with status 2" in text
    assert "[#2]   port: 8099" in text, text


def test_a_sweep_that_mixes_serving_and_ending_jobs_is_one_line_of_error(tmp_path) -> None:
    env = {**os.environ, "OPENHYDRA_HOME": str(tmp_path / "home"), "OPENHYDRA_CONFIG_DIR": str(tmp_path / "cfg")}
    out = subprocess.run([sys.executable, "-m", "openhydra.cli", "-m", "action=serve,check", "hardware=cpu"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        "openhydra-node: config error: a sweep's jobs either all serve (serve or dht: they run at once) or none "
        "does (they run one after another); this one mixes them")
    assert "Traceback" not in out.stderr


def test_a_job_started_as_a_fresh_process_ends_with_its_launcher() -> None:
    """The fallback's jobs are not forked, so they set the parent-death signal themselves (``openhydra-node`` calls
    die_with_launcher first): a launcher killed with SIGKILL leaves no job behind there either."""
    job = ("import time; from openhydra.sweep import die_with_launcher; die_with_launcher(); print('up', flush=True);"
           " time.sleep(600)")
    launcher_code = (
        "import os, subprocess, sys, time\n"
        f"job = subprocess.Popen([sys.executable, '-c', {job!r}], env={{**os.environ, "
        "'OPENHYDRA_SWEEP_LAUNCHER': str(os.getpid())}, stdout=subprocess.PIPE, text=True)\n"
        "assert job.stdout.readline() == 'up\\n'\n"
        "print(job.pid, flush=True)\n"
        "time.sleep(600)\n")
    launcher = subprocess.Popen([sys.executable, "-c", launcher_code], stdout=subprocess.PIPE, text=True)
    try:
        job_pid = int(launcher.stdout.readline())
        child = psutil.Process(job_pid)
        assert child.is_running()
        launcher.kill()
        launcher.wait(timeout=10)
        wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 30, 0.1,
                   "the job ended with its launcher")
    finally:
        launcher.kill()
        with contextlib.suppress(psutil.NoSuchProcess, NameError):
            child.kill()
