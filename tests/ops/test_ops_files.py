"""The ops/ files hold together: compose, Dockerfile, Prometheus config, Grafana provisioning and
dashboard, and the hardened systemd unit (checked with the real `promtool` and `systemd-analyze`).

Docker is not available here, so the compose file is checked structurally; the dashboard's queries
are run against a real Prometheus in test_prometheus.py.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from openhydra.api.metrics import ApiMetrics
from openhydra.metrics import METRICS
from openhydra.verification.metrics import VerificationMetrics
from tests.ops.dashboard import OPS, load_dashboard, metric_names, panel_queries, sample_names

UNIT = OPS / "systemd" / "openhydra-node.service"


def _compose() -> dict:
    return yaml.safe_load((OPS / "docker-compose.yml").read_text())


def _published(service: dict) -> dict[int, str]:
    """container port -> host binding, from "host_ip:host_port:container_port" entries."""
    out = {}
    for entry in service.get("ports", []):
        *host, container = str(entry).split(":")
        out[int(container)] = ":".join(host)
    return out


def test_compose_runs_node_prometheus_grafana_on_the_spec_ports():
    compose = _compose()
    services = compose["services"]
    assert set(services) >= {"node", "prometheus", "grafana"}
    assert _published(services["node"])[8080] == "127.0.0.1:8080"
    assert _published(services["prometheus"])[9090] == "127.0.0.1:9090"
    assert _published(services["grafana"])[3000] == "127.0.0.1:3000"
    env = services["grafana"]["environment"]
    assert (env["GF_SECURITY_ADMIN_USER"], env["GF_SECURITY_ADMIN_PASSWORD"]) == ("admin", "openhydra")
    build = services["node"]["build"]
    assert (OPS / build["context"] / build["dockerfile"]).resolve() == (OPS / "Dockerfile").resolve()
    assert "api.host=0.0.0.0" in services["node"]["command"]  # reachable from the prometheus container
    for service in services.values():  # every bind mount points at a file or folder of ops/
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (OPS / source).exists(), volume
            else:
                assert source in compose["volumes"], volume


def test_dockerfile_pins_cpu_torch_first_and_drops_root():
    text = (OPS / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    torch_line = next(i for i, line in enumerate(lines) if '"torch==2.13.0"' in line)
    assert "--index-url" in lines[torch_line] and lines[torch_line].rstrip().endswith("/whl/cpu")
    assert torch_line < next(i for i, line in enumerate(lines) if "pip install ." in line)
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user == ["openhydra"]
    for copied in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (OPS.parent / copied).exists(), copied


def test_prometheus_config_scrapes_the_node_and_passes_promtool():
    config = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "openhydra"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["node:8080"]
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus package)")
    check = subprocess.run(["promtool", "check", "config", str(OPS / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_grafana_provisioning_matches_the_compose_mounts_and_the_dashboard():
    compose = _compose()
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    datasources = yaml.safe_load((OPS / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((OPS / "grafana/provisioning/dashboards/openhydra.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = load_dashboard()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "openhydra"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == ds["uid"] for t in panel["targets"]), panel["title"]
            assert panel["targets"], panel["title"]


def _registry_families(*registries) -> set[tuple[str, str]]:
    return {(m.name, m.type) for r in registries for m in r.collect()}


def test_dashboard_covers_every_area_and_queries_only_metrics_the_code_defines():
    exported = sample_names(_registry_families(ApiMetrics().registry, METRICS.registry,
                                               VerificationMetrics().registry))
    used: set[str] = set()
    for title, expr in panel_queries(load_dashboard()):
        names = metric_names(expr)
        assert names, f"{title}: {expr}"
        assert names <= exported, f"{title}: unknown metric(s) {sorted(names - exported)}"
        used |= names
    for area in ("openhydra_http_requests_total", "openhydra_tokens_generated_total",
                 "openhydra_pipeline_step_duration_seconds_bucket", "openhydra_pipeline_hop_errors_total",
                 "openhydra_peer_step_duration_seconds_bucket", "openhydra_peer_steps_total",
                 "openhydra_pipeline_failovers_total", "openhydra_pipeline_peer_bans_total",
                 "openhydra_pipeline_replays_total", "openhydra_verification_audits_total",
                 "openhydra_verification_failures_total", "openhydra_ledger_settlements_total",
                 "openhydra_ledger_credits_earned_total", "openhydra_ledger_errors_total"):
        assert area in used, area


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, allow_no_value=True)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_is_hardened():
    service = _unit()["Service"]
    assert service["User"] == "openhydra" and service["Group"] == "openhydra"
    expected = {"ProtectSystem": "strict", "PrivateTmp": "yes", "NoNewPrivileges": "yes", "ProtectHome": "yes",
                "CapabilityBoundingSet": "", "AmbientCapabilities": "", "Restart": "on-failure",
                "RestrictSUIDSGID": "yes", "PrivateDevices": "yes", "ReadWritePaths": "/var/lib/openhydra"}
    for key, value in expected.items():
        assert service[key] == value, key
    assert "OPENHYDRA_HOME=/var/lib/openhydra" in UNIT.read_text()  # the only writable path is the data dir
    assert "api.host=127.0.0.1" in service["ExecStart"]


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's openhydra-node: `verify` checks the binary exists."""
    node = Path(sys.executable).parent / "openhydra-node"
    if not node.exists():
        pytest.skip(f"{node} not installed")
    path = tmp_path / "openhydra-node.service"
    path.write_text(UNIT.read_text().replace("/opt/openhydra/venv/bin/openhydra-node", str(node)))
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_and_security_score(verifiable_unit: Path):
    verify = subprocess.run(["systemd-analyze", "verify", str(verifiable_unit)], capture_output=True, text=True,
                            timeout=60)
    complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if verifiable_unit.name in line]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    # exposure 0 (locked down) .. 10 (unprotected); systemd's threshold is in tenths. "OK" is below 4.0.
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=25",
                               str(verifiable_unit)], capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout).group(1))
    assert exposure <= 2.5


def test_every_bench_prints_the_machine_and_its_load() -> None:
    """A figure without its machine and load did not reproduce (docs/benchmarks.md): every bench script with a
    ``main`` calls ``announce()`` or prints ``machine_banner()`` (openhydra/testing/machine.py), itself or through
    bench/common.py's ``whole_model_bench()``, which calls ``announce()``."""
    bench = Path(__file__).resolve().parents[2] / "bench"
    scripts = [p for p in sorted(bench.glob("*.py")) if re.search(r"^def main\(", p.read_text(), re.M)]
    assert len(scripts) >= 30
    silent = [p.name for p in scripts
              if not re.search(r"\bannounce\(\)|machine_banner\(\)|whole_model_bench\(", p.read_text())]
    assert re.search(r"^    announce\(\)", (bench / "common.py").read_text(), re.M)  # inside whole_model_bench
    assert silent == [], f"benches that do not print the machine they ran on: {silent}"
