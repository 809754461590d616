"""Reliability suite: what each test held or survived is recorded into one report,
``ops/bench/results/reliability.json``, merged section by section so a partial run keeps the
figures of the tests it did not run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability._databases import DATABASES
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
