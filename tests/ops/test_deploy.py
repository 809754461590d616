"""Static checks of the deployment files (no Docker daemon here): the Dockerfile, the compose
file, the load balancer and Grafana provisioning agree with each other, with the CLI and
settings they run, and with ops/prometheus.yml; the README's Operations section covers them."""

from __future__ import annotations

import re
import shlex

import yaml
from typer.testing import CliRunner

from palmchat.app import app as cli
from shared.config import Settings
from tests.ops.conftest import OPS, ROOT

COMPOSE = ROOT / "docker-compose.yml"


def dockerfile_stages() -> list[dict]:
    """[{name, base, instructions: [(KEYWORD, args)]}] with continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    stages: list[dict] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            stages.append({"base": m.group(1), "name": m.group(2), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args.strip()))
    return stages


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def assert_cli_accepts(command: list[str]) -> None:
    """``command`` is a palmchat sub-command whose every option its --help lists."""
    assert command[0] == "palmchat", command
    help_text = CliRunner().invoke(cli, [command[1], "--help"], terminal_width=200)
    assert help_text.exit_code == 0, help_text.output
    for option in command[2:]:
        if option.startswith("--"):
            assert option in help_text.output, (command, option)


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, runtime = stages[0], stages[-1]
    assert builder["name"] == "builder" and runtime["name"] == "runtime"
    assert runtime["base"] != "builder"
    ins = runtime["instructions"]
    kinds = [k for k, _ in ins]

    def args(keyword: str) -> list[str]:
        return [a for k, a in ins if k == keyword]

    # what the builder made is copied, not rebuilt
    assert any(a.startswith("--from=builder") and "/opt/venv" in a for a in args("COPY"))
    # an unprivileged user, created in the image, runs everything after USER
    [user] = args("USER")
    name = user.split(":")[0]
    assert name not in ("root", "0")
    assert any("useradd" in a and name in a for a in args("RUN"))
    assert kinds.index("USER") < kinds.index("CMD")
    # HEALTHCHECK probes /healthz on the port the server listens on
    [health] = args("HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    env = " ".join(args("ENV"))
    assert "PALMCHAT_HOST=0.0.0.0" in env and "PALMCHAT_PORT=8000" in env
    assert "8000" in " ".join(args("EXPOSE"))
    # the web page's files are in the image and found through PYTHONPATH
    assert "PYTHONPATH=/app" in env
    assert any("/app/server" in a for a in args("COPY"))
    assert args("CMD") == ['["palmchat", "up"]']


def test_the_build_context_has_what_the_dockerfile_copies() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for must in (".git", ".venv", "palmchat-data", "test-artifacts", ".env"):
        assert must in ignored
    builder = dockerfile_stages()[0]
    for keyword, arg in builder["instructions"]:
        if keyword != "COPY" or arg.startswith("--from"):
            continue
        *sources, _dest = shlex.split(arg)
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src not in ignored and src.rstrip("/") not in ignored, src
    assert (ROOT / "server" / "web" / "index.html").is_file()


def test_compose_runs_the_stack_with_commands_the_cli_has() -> None:
    spec = compose()
    services = spec["services"]
    assert {"gateway", "trainer", "postgres", "prometheus", "grafana", "triton"} <= set(services)
    assert services["triton"]["profiles"] == ["triton"]
    settings_vars = {f"PALMCHAT_{name.upper()}" for name in Settings.model_fields}
    for name in ("gateway", "trainer", "triton"):
        svc = services[name]
        assert {k: svc["build"][k] for k in ("context", "dockerfile")} == {
            "context": ".",
            "dockerfile": "Dockerfile",
        }
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert "palmchat-data:/data" in svc["volumes"]
        env = svc["environment"]
        assert set(env) <= settings_vars, set(env) - settings_vars  # no misspelt settings
        url = env["PALMCHAT_DATABASE_URL"]
        assert re.match(r"postgresql://palmchat:.+@postgres:5432/palmchat$", url)
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert_cli_accepts(svc["command"])
    assert services["gateway"]["command"] == ["palmchat", "up"]
    assert services["gateway"]["environment"]["PALMCHAT_HOST"] == "0.0.0.0"
    assert "/readyz" in " ".join(services["gateway"]["healthcheck"]["test"])
    assert services["trainer"]["healthcheck"] == {"disable": True}  # it serves no /healthz
    # Triton is optional: its own image (the triton extra) and a command the CLI has
    triton = services["triton"]
    assert triton["build"]["args"]["EXTRAS"] == "postgres,triton"
    assert "ARG EXTRAS=postgres" in (ROOT / "Dockerfile").read_text()
    assert "triton = [" in (ROOT / "pyproject.toml").read_text()
    assert_cli_accepts(triton["command"])
    assert "gateway" not in triton["depends_on"]  # the override makes gateways wait for it
    override = yaml.safe_load((OPS / "compose.triton.yml").read_text())["services"]
    command = override["gateway"]["command"]
    assert_cli_accepts(command)
    assert command[command.index("--triton-url") + 1] == "triton:8001"
    assert "--grpc-port" in triton["command"]
    assert triton["command"][triton["command"].index("--grpc-port") + 1] == "8001"
    pg = services["postgres"]["environment"]
    assert pg["POSTGRES_USER"] == "palmchat" and pg["POSTGRES_DB"] == "palmchat"
    assert set(spec["volumes"]) >= {"palmchat-data", "postgres-data", "prometheus-data"}


def test_compose_mounts_exist_and_match_prometheus_and_grafana_configs() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), (name, volume)
    prom = services["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"] if v.startswith("./"))
    assert mounts["./ops/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, in both places
        assert f"./ops/{rule_file}" in mounts
        assert mounts[f"./ops/{rule_file}"] == f"/etc/prometheus/{rule_file}"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    [sd] = jobs["palmchat"]["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd["port"] == 8000
    [target] = jobs["palmchat-trainer"]["static_configs"][0]["targets"]
    host, port = target.split(":")
    sidecar = services["trainer-metrics"]
    assert host == "trainer" and sidecar["network_mode"] == "service:trainer"
    assert sidecar["command"] == [f"TCP-LISTEN:{port},fork,reuseaddr", "TCP:127.0.0.1:9101"]
    assert "9101" in services["trainer"]["command"]

    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = OPS / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards/palmchat.yml").read_text())["providers"]
    assert mounts["./ops/grafana/dashboards"] == providers[0]["options"]["path"]
    assert (OPS / "grafana/dashboards/palmchat.json").is_file()
    [ds] = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in services["prometheus"]["ports"])


def test_the_load_balancer_passes_websockets_and_streams_to_the_gateways() -> None:
    services = compose()["services"]
    lb = services["lb"]
    assert "./ops/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in lb["volumes"]
    assert any(p.endswith(":8080") for p in lb["ports"])
    conf = (OPS / "nginx.conf").read_text()
    assert "listen 8080;" in conf and "http://gateway:8000" in conf
    assert "resolver 127.0.0.11" in conf  # re-resolves, so scaled replicas are picked up
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_buffering off;" in conf
    assert conf.count("{") == conf.count("}")
    assert "ports" not in services["gateway"]  # scaled replicas must not fight for a port


def test_readme_operations_section_covers_alerts_metrics_and_procedures() -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Operations\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README has no '## Operations' section"
    ops = m.group(1)
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] in ops, rule["alert"]
    for metric in (
        "requests_total", "time_to_first_token_seconds", "inter_token_latency_seconds",
        "e2e_request_latency_seconds", "request_queue_time_seconds", "num_requests_running",
        "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total",
        "prompt_tokens_total", "generation_tokens_total", "preemptions_total", "feedback_total",
        "policy_info", "policy_swaps_total", "trainer_rounds_total", "trainer_reward_mean",
        "trainer_rm_accuracy", "trainer_kl", "trainer_last_publish_timestamp_seconds",
        "trainer_feedback_lag_seconds", "decode_threads",
    ):  # fmt: skip
        assert f"palmchat_{metric}" in ops or f"`{metric}`" in ops, metric
    for topic in ("PostgreSQL", "--scale gateway", "pg_dump", "keys revoke", "keys create",
                  "backup", "docker compose"):  # fmt: skip
        assert topic.lower() in ops.lower(), topic
    assert re.search(r"^## Web page\n", readme, re.M)
