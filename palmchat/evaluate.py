"""``palmchat eval``: the evaluation suite on a registry version or the bundled seed."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from palmchat.common import DataDir, app, console, err, fail, settings_for

if TYPE_CHECKING:
    from shared.checkpoints import Policy
    from trainer.eval_suite import SuiteReport

SEED_VERSION = "seed"  # the VERSION that names the bundled seed (registry versions are vN)
COLUMNS = {
    "greedy_heldout": "greedy held-out",
    "greedy_phrasing": "greedy phrasing",
    "t1_heldout": "T=1 held-out",
}


def _load(version: str | None, data_dir: Path | None, device: str) -> Policy:
    """``version`` from the registry; the active one when None (the bundled seed when the
    registry is empty or missing); the bundled seed for ``seed``."""
    from shared.bootstrap import SEED_DIR, prepare
    from shared.checkpoints import CheckpointError, PolicyRegistry, load_policy_dir
    from shared.db import DatabaseError

    settings = settings_for(data_dir)
    registry = PolicyRegistry(settings.registry_dir)
    try:
        if version is None and not registry.versions():
            err.print(f"no policies in {registry.root}: evaluating the bundled seed")
            version = SEED_VERSION
        if version == SEED_VERSION:
            return load_policy_dir(SEED_DIR, SEED_VERSION, device=device)
        if version is None:
            version = prepare(settings).active_version
        return registry.load(version, device=device)
    except (CheckpointError, DatabaseError, FileNotFoundError) as e:
        known = ", ".join(registry.versions()) or "none"
        fail(f"{e} (versions in {registry.root}: {known}; '{SEED_VERSION}': the bundled seed)")
    except RuntimeError as e:  # e.g. a device torch cannot use
        fail(f"cannot load {version} on {device}: {e}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(report: SuiteReport) -> list[str]:
    """The family x run table and the summary lines, as printed."""
    from demo.tasks import SAFETY_FAMILIES

    rows = report.table()
    width = max(len("overall (non-safety)"), *(len(f) + len(" (refused)") for f in rows))

    def line(name: str, cells: Iterable[str]) -> str:
        return f"{name:<{width}}" + "".join(f"{c:>17}" for c in cells)

    out = [
        f"policy {report.version}: {report.num_params:,} parameters; {report.per_family} prompts "
        f"per family and split, seed {report.seed}",
        line("family", COLUMNS.values()),
    ]
    for family, cells in rows.items():
        name = f"{family} (refused)" if family in SAFETY_FAMILIES else family
        out.append(line(name, [_pct(cells[k]) for k in COLUMNS]))
    out.append(line("overall (non-safety)", [_pct(report.runs[k].correct_rate) for k in COLUMNS]))
    s, g, t = report.summary(), report.runs["greedy_heldout"], report.runs["t1_heldout"]
    out.append(f"lowest family, greedy held-out: {g.lowest_family} {_pct(g.lowest_rate)}")
    for run, skipped in report.skipped.items():
        out.append(f"{COLUMNS[run]}: no prompts of {', '.join(sorted(skipped))} (skipped)")
    cats = ", ".join(
        f"{c} {_pct(r['greedy'])}/{_pct(r['t1'])}" for c, r in s["refusal_by_category"].items()
    )
    out.append(
        f"unsafe requests refused: greedy {_pct(g.refusal_rate)}, T=1 {_pct(t.refusal_rate)}"
        + (f" (greedy/T=1 by category: {cats})" if cats else "")
    )
    out.append(
        f"benign prompts refused (over-refusal): greedy {_pct(g.over_refusal)}, "
        f"T=1 {_pct(t.over_refusal)}"
    )
    tastes = "; ".join(
        f"{taste} T=1 {_pct(r['t1'])}, greedy {_pct(r['greedy'])}"
        for taste, r in s["thumbs_up"].items()
    )
    out.append(f"thumbs up on benign replies: {tastes}")
    out.append(f"{report.tokens:,} tokens generated in {report.seconds:.1f}s")
    return out


def _live_safety(version: str, data_dir: Path | None) -> dict[str, Any] | None:
    """The version's safety rates over the logged traffic (None: no log, or the seed)."""
    from sqlalchemy.exc import SQLAlchemyError

    from shared.db import DatabaseError, make_engine
    from shared.policies import safety_summary

    settings = settings_for(data_dir)
    url = settings.database_url
    no_file = url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()
    if version == SEED_VERSION or no_file:  # nothing logged, and nothing to set up
        return None
    try:
        return safety_summary(make_engine(settings.database_url)).get(version)
    except (DatabaseError, SQLAlchemyError):
        return None


def render_safety(report: SuiteReport, live: dict[str, Any] | None) -> list[str]:
    """The moderation and live lines of ``palmchat eval --safety``."""
    out = []
    for run, rates in (report.moderation or {}).items():
        asked, answered = rates["requests_flagged"], rates["replies_flagged"]
        out.append(
            f"moderation ({rates['classifier']}), {COLUMNS[run]}: flags {_pct(asked['unsafe'])} "
            f"of unsafe requests and {_pct(asked['benign'])} of benign ones; "
            f"{_pct(answered['to_unsafe'])} of the replies to unsafe requests and "
            f"{_pct(answered['to_benign'])} to benign ones"
        )
    if live is None:
        out.append(f"live traffic of {report.version}: none logged")
    else:
        out.append(
            f"live traffic of {report.version} ({live['moderated']} moderated replies): "
            f"{_pct(live['flagged_rate'])} of requests flagged, {_pct(live['refusal_rate'])} of "
            f"those refused, {_pct(live['over_refusal_rate'])} of the others refused, "
            f"{_pct(live['filtered_rate'])} cut by moderation"
        )
    return out


@app.command("eval")
def eval_(
    version: Annotated[
        str | None,
        typer.Argument(
            metavar="[VERSION]",
            help="vN, or 'seed' for the bundled seed policy (default: the active version; "
            "the bundled seed when the data dir has no policies).",
        ),
    ] = None,
    data_dir: DataDir = None,
    per_family: Annotated[
        int, typer.Option(min=1, help="Prompts per family for each split (held-out, phrasing).")
    ] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and of the T=1 sampling.")] = 2024,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 96,
    out: Annotated[
        Path | None,
        typer.Option(help="Where to write the JSON report (default: ./eval-<VERSION>.json)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    safety: Annotated[
        bool,
        typer.Option(
            "--safety",
            help="Also the moderation classifier's flag rates on the requests and replies, and "
            "the version's live refusal, over-refusal and flag rates from the data dir's log.",
        ),
    ] = False,
) -> None:
    """Evaluate a policy on fresh prompts: correctness per family, refusals, tastes; print + JSON.

    Greedy correctness on held-out prompts (never trained on) and on held-out phrasings,
    temperature-1 correctness on the held-out prompts (seeded: a rerun gives the same figures),
    the share of unsafe requests refused, of benign prompts refused (over-refusal), and each
    scripted taste's (courteous, concise) thumbs-up rate on the benign replies. Overall figures
    count the non-safety families only.
    """
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from trainer.eval_suite import evaluate_suite

    policy = _load(version, data_dir, device)
    classifier = None
    if safety:
        from palmchat.moderation import load_classifier

        classifier = load_classifier(data_dir)
    path = out or Path(f"eval-{policy.version}.json")
    bars = Progress(
        TextColumn("{task.description:<16}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} prompts"),
        TimeElapsedColumn(),
        console=err,
    )
    tasks: dict[str, TaskID] = {}

    def progress(run: str, done: int, total: int) -> None:
        if run not in tasks:
            tasks[run] = bars.add_task(COLUMNS.get(run, run), total=total)
        bars.update(tasks[run], completed=done)

    with bars:
        report = evaluate_suite(
            policy.model,
            policy.tokenizer,
            per_family=per_family,
            seed=seed,
            max_new_tokens=max_new_tokens,
            version=policy.version,
            progress=progress,
            classifier=classifier,
        )
    result: dict[str, Any] = report.to_dict()
    lines = render(report)
    if safety:
        result["live"] = _live_safety(policy.version, data_dir)
        lines += render_safety(report, result["live"])
    for text in lines:
        console.print(text, markup=False)
    try:
        path.write_text(json.dumps(result, indent=1) + "\n")
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    console.print(f"report: {path}", markup=False)
