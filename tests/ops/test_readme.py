"""The README is a user's guide that stays true: short, every command in it one the CLI accepts
(or the compose file and CI run), its tables equal to the settings, routes and commands that
exist, its tour run for real against a live server, and its links into docs/ resolve."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from sqlmodel import Session, select

from palmchat.app import app as cli
from server.api.app import create_app
from shared.config import Settings
from shared.keys import create_key
from shared.schema import Feedback
from tests.conftest import LiveServer
from tests.ops.conftest import ROOT
from tests.reliability._world import app_routes

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)
# the framework's own pages and static files are not the product's API
NOT_DOCUMENTED = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/static/{}"}


def section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return [textwrap.dedent(body) for lang, body in FENCE.findall(text) if lang == language]


def inline_code(text: str) -> list[str]:
    """Backticked spans outside fenced blocks, whitespace (line breaks too) collapsed."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", FENCE.sub("", text))]


def palmchat_invocations(text: str) -> list[list[str]]:
    """The words after each ``palmchat`` in the README's code, table separators undone."""
    found = []
    pieces = inline_code(text) + [
        line for block in code_blocks(text, "bash") for line in block.splitlines()
    ]
    for piece in pieces:
        piece = piece.replace("\\|", " ").split("#")[0]
        for m in re.finditer(r"(?<![\w/.-])palmchat(?![\w.-])(.*)", piece):
            found.append(m.group(1).split())
    return found


def is_group(command: Any) -> bool:
    return hasattr(command, "commands")


def resolve(words: list[str]) -> tuple[list[str], Any]:
    """The command path ``words`` names and its (typer's click) command."""
    command = typer.main.get_command(cli)
    path: list[str] = []
    for word in words:
        if not is_group(command) or word not in command.commands:
            break
        command = command.commands[word]
        path.append(word)
    return path, command


def options(words: list[str]) -> list[str]:
    """``--name`` and ``-x`` options among ``words``, brackets and ``=VALUE`` stripped."""
    out = []
    for word in words:
        word = word.strip("[]").split("=")[0]
        if re.fullmatch(r"--[a-z][\w-]*|-[a-zA-Z]", word):
            out.append(word)
    return out


def leaf_commands(command: Any, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if is_group(command):
        return set().union(*(leaf_commands(c, (*path, n)) for n, c in command.commands.items()))
    return {path}


def cells(row: str) -> list[str]:
    """A markdown table row's cells (``\\|`` is a pipe inside a cell)."""
    return re.split(r"(?<!\\)\|", row)[1:-1]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_short() -> None:
    assert len(README.splitlines()) <= 300


def test_every_palmchat_command_in_the_readme_is_one_the_cli_accepts() -> None:
    invocations = palmchat_invocations(README)
    assert len(invocations) > 20
    for words in invocations:
        path, command = resolve(words)
        if is_group(command) and path:  # a group alone does nothing
            pytest.fail(f"`palmchat {' '.join(words)}` names the group {path}, not a command")
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        known |= {"--help"}
        for option in options(words[len(path) :]):
            assert option in known, (words, option)


def test_the_cli_table_lists_every_command() -> None:
    root = typer.main.get_command(cli)
    listed = set()
    for cell in (cells(line)[0] for line in section("CLI").splitlines() if "| `" in line):
        for span in re.findall(r"`([^`]+)`", cell):
            words = span.replace("\\|", " ").split()
            path, _ = resolve(words[1:] if words[0] == "palmchat" else words)
            if not path and words[0] != "palmchat":  # `keys list` after `palmchat keys create`
                continue
            listed.add(tuple(path))
    assert leaf_commands(root) - listed == set()
    assert "`palmchat --version`" in section("CLI")


def test_the_set_up_commands_are_what_ci_runs() -> None:
    install, tests = code_blocks(section("Set up"), "bash")
    steps = [s.strip() for s in install.strip().split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[1] == ". .venv/bin/activate"
    test_sh = (ROOT / "ops" / "test.sh").read_text()
    [pin] = re.findall(r"pip install -q (torch==\S+)", test_sh)
    assert steps[2:] == [f"pip install {pin}", "pip install -e .", "palmchat up"]
    assert tests.strip() == "bash ops/test.sh"
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("bash ops/test.sh")


def test_the_compose_commands_name_services_and_variables_the_compose_file_has() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    lines = [
        line for b in code_blocks(README, "bash") for line in b.splitlines() if "docker" in line
    ]
    assert lines
    for line in lines:
        words = shlex.split(line)
        start = words.index("docker")
        assert words[start + 1] == "compose", line
        for word in words[:start]:  # VAR=value prefixes
            assert "${" + word.split("=")[0] + ":-" in text, word
        if "exec" in words:
            assert words[words.index("exec") + 1] in services, line
        if "--scale" in words:
            assert words[words.index("--scale") + 1].split("=")[0] in services, line


def test_the_configuration_table_is_the_settings() -> None:
    rows = [line for line in section("Configuration").splitlines() if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`(PALMCHAT_\w+)`", row)}
    assert documented == {f"PALMCHAT_{name.upper()}" for name in Settings.model_fields}
    defaults = Settings.model_fields
    for row in rows:
        names, default = (re.findall(r"`([^`]+)`", cell) for cell in cells(row)[:2])
        for name, value in zip(names, default, strict=True):
            field = defaults[name.removeprefix("PALMCHAT_").lower()]
            if re.fullmatch(r"\d+(\.\d+)?", value):
                assert float(value) == field.default, name


def test_the_api_table_is_the_apps_routes(tmp_path: Path) -> None:
    api = section("API")
    documented: set[tuple[str, str]] = set()
    for line in api.splitlines():
        if not line.startswith("| `"):
            continue
        method = ""
        for span in re.findall(r"`([^`]+)`", cells(line)[0]):
            m = re.fullmatch(r"(?:([A-Z/]+) )?(/\S*)", span)
            if m:
                method = m.group(1) or method
                path = re.sub(r"\{[^}]*\}", "{}", m.group(2).split("?")[0])
                documented |= {(verb, path) for verb in method.split("/")}
    documented |= {("WS", p) for p in re.findall(r"`ws://HOST:PORT(/\S+?)`", api)}
    app = create_app(Settings(data_dir=tmp_path))
    served = {(m, re.sub(r"\{[^}]*\}", "{}", p)) for m, p in app_routes(app)}
    assert documented == {(m, p) for m, p in served if p not in NOT_DOCUMENTED}


def test_the_tour_runs_against_a_live_server(
    tmp_path: Path, tiny_seed_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [tour] = code_blocks(section("A five-minute tour"), "python")
    settings = Settings(data_dir=tmp_path, kv_cache_memory_mb=16)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        key = create_key(app.state.palmchat.db, "alice")
        source, n = re.subn(
            r"^BASE, KEY = .*$", f"BASE, KEY = {live.url!r}, {key!r}", tour.strip(), flags=re.M
        )
        assert n == 1
        exec(compile(source, "README tour", "exec"), {})
        with Session(app.state.palmchat.db) as session:
            votes = session.exec(select(Feedback)).all()
    version = capsys.readouterr().out.split()[0]
    assert version == tiny_seed_dir.name == "v1"
    assert [(v.rating, v.reason) for v in votes] == [(1, "right")]


def test_links_into_docs_resolve_to_files_and_headings() -> None:
    pages = {"README.md": README} | {
        f"docs/{p.name}": p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
    }
    assert {"docs/architecture.md", "docs/operations.md", "docs/benchmarks.md", "docs/loop.md",
            "docs/decisions.md"} <= set(pages)  # fmt: skip
    for name, text in pages.items():
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w.-]+\.md)(?:#([\w-]+))?\)", text):
            path = (ROOT / name).parent / target
            assert path.is_file(), (name, target)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
                assert anchor in {slug(h) for h in headings}, (name, target, anchor)


def test_code_pointers_into_decisions_name_a_heading() -> None:
    headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "decisions.md").read_text(), re.M))
    pointers = []
    for package in ("shared", "server", "trainer", "demo", "bench", "palmchat"):
        for path in (ROOT / package).rglob("*.py"):
            lines = path.read_text().splitlines()
            text = " ".join(line.strip().lstrip("#").strip() for line in lines)
            pointers += [(path, h) for h in re.findall(r'docs/decisions\.md, "([^"]+)"', text)]
    assert pointers
    for path, heading in pointers:
        assert heading in headings, (path, heading)
