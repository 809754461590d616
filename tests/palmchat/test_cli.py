"""The command line as an operator meets it on day one: version, clean refusals, tables with a
header row, and a server that says where it listens only once it does."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import typer
from typer.testing import CliRunner

from palmchat import __version__
from palmchat.app import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _commands(group: typer.Typer, prefix: str = "") -> dict[str, typer.models.CommandInfo]:
    found = {f"{prefix}{c.name or c.callback.__name__}": c for c in group.registered_commands}
    for sub in group.registered_groups:
        found |= _commands(sub.typer_instance, f"{prefix}{sub.name} ")
    return found


def test_version_prints_the_installed_version() -> None:
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0
    assert out.output.strip() == f"palmchat {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", __version__)


def test_every_command_has_a_one_line_summary_in_the_help_list() -> None:
    commands = _commands(app)
    assert {"up", "serve", "chat", "trainer", "policies list", "keys list", "bench api"} <= set(
        commands
    )
    for name, command in commands.items():
        doc = inspect.getdoc(command.callback) or ""
        summary = doc.split("\n\n")[0]
        assert summary and "\n" not in summary, f"`palmchat {name}` summary wraps: {summary!r}"
        assert runner.invoke(app, [*name.split(), "--help"]).exit_code == 0, name


def test_a_port_out_of_range_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    out = runner.invoke(app, ["serve", "--data-dir", str(tmp_path), "--port", "99999"])
    assert out.exit_code == 2
    assert "--port" in out.output and "65535" in out.output and "Traceback" not in out.output
    env = {**os.environ, "PALMCHAT_PORT": "99999", "PALMCHAT_DATA_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "palmchat", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "PALMCHAT_PORT" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_list_commands_print_a_header_row(tmp_path: Path) -> None:
    dd = ["--data-dir", str(tmp_path)]
    assert runner.invoke(app, ["keys", "create", "--user", "dana", *dd]).exit_code == 0
    keys = runner.invoke(app, ["keys", "list", *dd]).output.splitlines()
    assert keys[0].split("\t") == ["USER", "PREFIX", "FLAGS"]
    assert keys[1].startswith("dana\tpc-")
    policies = runner.invoke(app, ["policies", "list", *dd]).output.splitlines()
    assert policies[0].split("\t") == ["VERSION", "STATUS", "PARENT", "FEEDBACK", "UP_RATE"]
    assert policies[1].split("\t")[:2] == ["v1", "active"]


def test_up_migrates_once_quietly_and_names_the_port_it_bound(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "palmchat", "up", "--data-dir", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving on" in line:
                break
        url = re.search(r"serving on (http://\S+)", lines[-1])
        assert url, "".join(lines)
        assert not url.group(1).endswith(":0"), "it printed the requested port, not the bound one"
        # printed after binding: the port answers at once
        assert httpx.get(f"{url.group(1)}/readyz", timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    text = "".join(lines)
    assert "alembic.runtime.plugins" not in text
    assert text.count("migrating ") == 1, text


def test_a_canary_is_started_promoted_and_refused_from_the_command_line(tmp_path: Path) -> None:
    from shared.checkpoints import PolicyRegistry
    from shared.config import Settings

    dd = ["--data-dir", str(tmp_path)]
    assert runner.invoke(app, ["policies", "list", *dd]).exit_code == 0  # installs the seed
    registry = PolicyRegistry(Settings(data_dir=tmp_path).registry_dir)
    v2 = registry.install(registry.path("v1"), parent="v1")
    v3 = registry.install(registry.path("v1"), parent="v1")

    done = runner.invoke(app, ["policies", "canary", v2, "--share", "0.2", *dd])
    assert done.exit_code == 0 and f"canary: {v2} for 20% of users" in done.output
    rows = runner.invoke(app, ["policies", "list", *dd]).output.splitlines()
    assert [r.split("\t")[:2] for r in rows[1:3]] == [["v1", "active"], [v2, "canary"]]
    refused = runner.invoke(app, ["policies", "canary", v3, *dd])
    assert refused.exit_code == 2 and f"{v2} is already in canary" in refused.output
    done = runner.invoke(app, ["policies", "promote", v2, "--reason", "better", *dd])
    assert done.exit_code == 0 and f"active: {v2} (was v1)" in done.output
    assert runner.invoke(app, ["policies", "canary", v3, "--share", "0.5", *dd]).exit_code == 0
    assert f"rejected: {v3}" in runner.invoke(app, ["policies", "abort", v3, *dd]).output
    refused = runner.invoke(app, ["policies", "promote", v3, *dd])
    assert refused.exit_code == 2 and "not in canary" in refused.output
    assert "Traceback" not in refused.output
