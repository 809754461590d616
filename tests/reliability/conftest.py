"""Reliability suite: what each test held or survived is recorded into one report,
``ops/bench/results/reliability.json``, merged section by section so a partial run keeps the
figures of the tests it did not run."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.api.app import create_app
from shared.keys import create_key
from tests.conftest import LiveServer
from tests.reliability._databases import DATABASES, database_url, live_settings
from tests.reliability._fuzz import ErrorLog
from tests.reliability._world import World, open_world

REPORT_PATH = Path(__file__).resolve().parents[2] / "ops" / "bench" / "results" / "reliability.json"


class ReliabilityReport:
    """Sections of figures (``load``, ``disconnects``, ``hot_swap``, ``fuzzing``, ``isolation``,
    ``faults``...). Each test records the figures it measured; ``items_lost`` must be 0."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, section: str, **figures: Any) -> None:
        with self._lock:
            self.sections.setdefault(section, {}).update(figures)

    def write(self, path: Path = REPORT_PATH) -> None:
        if not self.sections:
            return
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = {}
        sections = report.setdefault("sections", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for name, figures in self.sections.items():
            sections[name] = {**figures, "measured_at": stamp}
        report["updated"] = stamp
        report["items_lost"] = sum(int(s.get("items_lost", 0) or 0) for s in sections.values())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def reliability_report():
    report = ReliabilityReport()
    yield report
    report.write()


@pytest.fixture(scope="module", params=DATABASES)
def world(
    request, tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path
) -> Iterator[World]:
    """The isolation tests' live server, users and bob's data, per module and database."""
    with open_world(request.param, tmp_path_factory.mktemp("isolation"), tiny_seed_dir) as w:
        yield w


@pytest.fixture(scope="session")
def fuzz_stats() -> dict[str, Counter]:
    """The fuzz figures per database, summed over every fuzz module's server."""
    return {}


@pytest.fixture(scope="module", params=DATABASES)
def fuzz_server(request, tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path, fuzz_stats):
    # rate limit off: the fuzzer sends far more than a user's burst, and 429s would hide routes
    with database_url(request.param) as url:
        settings = live_settings(tmp_path_factory.mktemp("fuzz"), url)
        app = create_app(settings, seed_dir=tiny_seed_dir)
        with ErrorLog() as errors, LiveServer(app) as live:
            live.database = request.param
            live.state = app.state.palmchat
            live.admin_key = create_key(live.state.db, "fuzz-admin", admin=True)
            live.user_key = create_key(live.state.db, "fuzz-user")
            live.ws_url = live.url.replace("http", "ws", 1) + "/v1/chat/ws"
            live.errors = errors
            live.stats = fuzz_stats.setdefault(request.param, Counter())  # for the report
            yield live


@pytest.fixture
def fuzz_report(fuzz_server, reliability_report):
    """Each test answers for the errors logged while it ran; the figures so far go to the
    report after each test, passed or not."""
    fuzz_server.errors.records.clear()
    yield
    stats = fuzz_server.stats
    stats["server_error_logs"] += len(fuzz_server.errors.records)
    reliability_report.record(
        "fuzzing" if fuzz_server.database == "sqlite" else "fuzzing_postgres",
        database=fuzz_server.database,
        schemathesis_cases=stats["schemathesis_cases"],
        schemathesis_coverage_cases=stats["schemathesis_coverage_cases"],
        schemathesis_operations=sum(k.startswith("op:") for k in stats),
        schemathesis_statuses={k[7:]: v for k, v in sorted(stats.items()) if k[:7] == "status_"},
        ws_sockets=stats["ws_sockets"],
        ws_frames=stats["ws_frames"],
        ws_error_frames=stats["ws_error"],
        ws_done_frames=stats["ws_done"],
        rest_abuse_cases=stats["rest_abuse_cases"],
        server_errors_5xx=stats["server_errors_5xx"],
        server_error_logs=stats["server_error_logs"],
    )
