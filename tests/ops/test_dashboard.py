"""The Grafana dashboard and the alert rules name only metrics that exist: the server's
/metrics for gateway panels, trainer/metrics.py for the panels in the "Trainer" row."""

from __future__ import annotations

import importlib.util
import json

import httpx
import pytest
import yaml

from tests.ops.conftest import OPS
from tests.ops.metric_names import exposed_names, metric_names

DASHBOARD = OPS / "grafana" / "dashboards" / "palmchat.json"
PROMETHEUS_BUILTINS = {"up"}
TRAINER_ROW = "Trainer"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels_by_row(dashboard: dict) -> list[tuple[str, dict]]:
    """(row title, panel) for every non-row panel, in order (rows may also nest panels)."""
    out, row = [], ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            out += [(row, p) for p in panel.get("panels", [])]
        else:
            out.append((row, panel))
    return out


def panel_metrics(panel: dict) -> set[str]:
    return set().union(*(metric_names(t["expr"]) for t in panel["targets"]))


def missing_metrics(
    dashboard: dict, server: set[str] | None, trainer: set[str] | None
) -> list[str]:
    """Panels whose metrics are not exposed: gateway panels against the server's names,
    trainer-row panels against the trainer's (None: those panels are not checked)."""
    problems = []
    for row, panel in panels_by_row(dashboard):
        names = panel_metrics(panel) - PROMETHEUS_BUILTINS
        known = trainer if row == TRAINER_ROW else server
        if known is None:
            continue
        for name in sorted(names - known):
            problems.append(f"{panel['title']!r} ({row}): {name}")
    return problems


def trainer_names() -> set[str] | None:
    """Sample names of trainer/metrics.py's registry (None while that file does not exist)."""
    if importlib.util.find_spec("trainer.metrics") is None:
        return None
    from prometheus_client import generate_latest

    from trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics()
    metrics.rounds.labels("published").inc()  # a labelled counter has no sample before use
    return exposed_names(generate_latest(metrics.registry).decode())


@pytest.fixture(scope="module")
def server_names(metrics_server) -> set[str]:
    r = httpx.get(f"{metrics_server.url}/metrics", timeout=10)
    r.raise_for_status()
    return exposed_names(r.text)


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "palmchat" and dashboard["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "instance"}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Engine", "Feedback and policy", TRAINER_ROW]
    cells = set()
    for _, panel in panels_by_row(dashboard):
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert panel["description"]
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        for x in range(pos["x"], pos["x"] + pos["w"]):  # no two panels overlap
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def test_every_gateway_panel_metric_is_in_the_server_metrics(server_names: set[str]) -> None:
    dashboard = load_dashboard()
    assert missing_metrics(dashboard, server_names, trainer=None) == []
    used = set().union(
        *(panel_metrics(p) for row, p in panels_by_row(dashboard) if row != TRAINER_ROW)
    )
    # the panels cover the README's metrics
    for family in (
        "palmchat_requests_total",
        "palmchat_time_to_first_token_seconds_bucket",
        "palmchat_inter_token_latency_seconds_bucket",
        "palmchat_e2e_request_latency_seconds_bucket",
        "palmchat_request_queue_time_seconds_bucket",
        "palmchat_num_requests_running",
        "palmchat_num_requests_waiting",
        "palmchat_kv_cache_usage_perc",
        "palmchat_prefix_cache_hits_total",
        "palmchat_prefix_cache_queries_total",
        "palmchat_prompt_tokens_total",
        "palmchat_generation_tokens_total",
        "palmchat_preemptions_total",
        "palmchat_feedback_total",
        "palmchat_policy_info",
        "palmchat_policy_swaps_total",
    ):
        assert family in used, family


def test_trainer_panels_use_the_trainer_metrics() -> None:
    dashboard = load_dashboard()
    trainer_panels = [p for row, p in panels_by_row(dashboard) if row == TRAINER_ROW]
    for row, panel in panels_by_row(dashboard):
        uses_trainer = any(n.startswith("palmchat_trainer_") for n in panel_metrics(panel))
        assert uses_trainer == (row == TRAINER_ROW and panel["title"] != "Targets up"), panel
    names = trainer_names()
    if names is None:
        pytest.skip("trainer/metrics.py does not exist yet: trainer panels not checked")
    assert missing_metrics(dashboard, None, names) == []
    used = set().union(*(panel_metrics(p) for p in trainer_panels))
    for needed in ("rounds_total", "reward_mean", "rm_accuracy", "kl",
                   "last_publish_timestamp_seconds", "feedback_lag_seconds"):  # fmt: skip
        assert f"palmchat_trainer_{needed}" in used


def test_the_check_reports_an_unknown_metric(server_names: set[str]) -> None:
    dashboard = load_dashboard()
    dashboard["panels"][1]["targets"][0]["expr"] = "rate(palmchat_requests_totl[5m])"
    assert missing_metrics(dashboard, server_names, trainer=None) == [
        f"{dashboard['panels'][1]['title']!r} (Traffic): palmchat_requests_totl"
    ]


def test_alert_rules_use_existing_metrics_and_the_dashboard_shows_them(
    server_names: set[str],
) -> None:
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    all_rules = [r for g in rules["groups"] for r in g["rules"]]
    recorded = {r["record"]: metric_names(r["expr"]) for r in all_rules if "record" in r}
    dashboard = load_dashboard()
    shown = set().union(*(panel_metrics(p) for _, p in panels_by_row(dashboard)))
    descriptions = " ".join(p["description"] for _, p in panels_by_row(dashboard))
    trainer = trainer_names()
    for rule in all_rules:
        names = metric_names(rule["expr"])
        for name in list(names):
            names |= recorded.get(name, set())
        names -= set(recorded) | PROMETHEUS_BUILTINS
        for name in names:
            if name.startswith("palmchat_trainer_"):
                assert trainer is None or name in trainer, (rule.get("alert"), name)
            else:
                assert name in server_names, (rule.get("alert") or rule["record"], name)
            assert name in shown, f"no dashboard panel shows {name}"
        if "alert" in rule:
            assert rule["alert"] in descriptions, f"no panel mentions {rule['alert']}"
