"""ops/prometheus.yml and ops/alerts.yml: promtool checks, rule unit tests, and a real
Prometheus scraping a real server (and the trainer's metrics) and answering queries."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.ops.conftest import OPS
from tests.ops.metric_names import grafana_to_promql

pytestmark = pytest.mark.slow

DASHBOARD = OPS / "grafana" / "dashboards" / "palmchat.json"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_promtool_accepts_the_config_and_the_rules(promtool: str) -> None:
    out = run([promtool, "check", "config", str(OPS / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 rule files found" in out.stdout
    out = run([promtool, "check", "rules", str(OPS / "alerts.yml")])
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    out = run([promtool, "test", "rules", str(OPS / "alerts.test.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_rule_tests_catch_a_changed_threshold(promtool: str, tmp_path: Path) -> None:
    rules = (OPS / "alerts.yml").read_text()
    assert "palmchat_num_requests_waiting > 32" in rules
    (tmp_path / "alerts.yml").write_text(
        rules.replace("palmchat_num_requests_waiting > 32", "palmchat_num_requests_waiting > 64")
    )
    (tmp_path / "alerts.test.yml").write_text((OPS / "alerts.test.yml").read_text())
    out = run([promtool, "test", "rules", str(tmp_path / "alerts.test.yml")])
    assert out.returncode != 0 and "PalmchatQueueBackingUp" in out.stdout + out.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((OPS / "alerts.test.yml").read_text())
    fired = {
        t["alertname"]
        for case in tests["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert alerts == fired
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in ("page", "warn", "info"), rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.fixture
def trainer_metrics_port():
    """The trainer's metrics (trainer/metrics.py, if it exists yet) served on a free port."""
    try:
        from trainer.metrics import TrainerMetrics
    except ImportError:
        yield None
        return
    from prometheus_client import start_http_server

    metrics = TrainerMetrics()
    metrics.kl.set(0.25)
    metrics.rounds.labels("published").inc()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    yield port
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_real_prometheus_scrapes_the_server_and_answers_queries(
    prometheus_bin: str, metrics_server, trainer_metrics_port, tmp_path: Path
) -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(OPS / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"palmchat", "palmchat-trainer"}
    gateway = jobs["palmchat"]
    assert gateway["metrics_path"] == "/metrics"
    gateway.pop("dns_sd_configs")
    gateway["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_server.port}"]}]
    trainer_port = trainer_metrics_port or free_port()  # nothing there: the target is down
    jobs["palmchat-trainer"]["static_configs"] = [{"targets": [f"127.0.0.1:{trainer_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus_bin,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200, (expr, r.text)
        body = r.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def eventually(check, what: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
            try:
                value = check()
            except (httpx.HTTPError, AssertionError):
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.25)

    try:
        eventually(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, "ready")
        # a palmchat metric, read back through the query API after a scrape of the server
        [info] = eventually(lambda: query('palmchat_policy_info{job="palmchat"}'), "a scrape")
        assert info["metric"]["version"] == "v1"
        assert info["metric"]["instance"] == f"127.0.0.1:{metrics_server.port}"
        [requests] = query('sum(palmchat_requests_total{job="palmchat",status="2xx"})')
        assert float(requests["value"][1]) >= 1
        if trainer_metrics_port:
            [kl] = eventually(lambda: query('palmchat_trainer_kl{job="palmchat-trainer"}'), "kl")
            assert float(kl["value"][1]) == 0.25
        else:
            down = query('up{job="palmchat-trainer"} == 0')
            assert len(down) == 1

        # every rule loads and evaluates without error against real data
        spec = yaml.safe_load((OPS / "alerts.yml").read_text())
        n_rules = sum(len(g["rules"]) for g in spec["groups"])

        def rules_ok():
            groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules]
            if len(rules) == n_rules and all(h == "ok" for _, h, _ in bad):
                return rules
            return None

        eventually(rules_ok, "all rules evaluated healthy")

        # every dashboard query is valid PromQL for this Prometheus
        dashboard = json.loads(DASHBOARD.read_text())
        exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
        exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
        assert len(exprs) > 20
        for expr in exprs:
            query(grafana_to_promql(expr))
        [tokens] = [p for p in dashboard["panels"] if p["title"] == "Tokens / s"]
        assert eventually(
            lambda: query(grafana_to_promql(tokens["targets"][0]["expr"])), "tokens/s data"
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
