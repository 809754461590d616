"""``palmchat moderation``: train, publish and try the moderation classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from palmchat.common import DataDir, app, console, err, fail, settings_for

if TYPE_CHECKING:
    from shared.moderation import Classifier

moderation = typer.Typer(
    help="Train, publish and try the moderation classifier.", no_args_is_help=True
)
app.add_typer(moderation, name="moderation")


@moderation.command()
def train(
    data_dir: DataDir = None,
    examples: Annotated[int, typer.Option(min=100, help="Synthetic training examples.")] = 40_000,
    epochs: Annotated[int, typer.Option(min=1)] = 4,
    seed: int = 0,
    user_labels: Annotated[
        bool, typer.Option(help="Also train on the safety labels users gave (from the DB).")
    ] = True,
    export: Annotated[
        Path | None,
        typer.Option(help="Write the version directory here instead of publishing it."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Train the moderation classifier, report held-out precision and recall, publish it.

    Trains on the synthetic safety corpus and the safety labels users gave; servers load the
    published version within PALMCHAT_POLICY_POLL_SECONDS."""
    import tempfile

    from shared.bootstrap import prepare
    from shared.moderation import ModerationRegistry
    from trainer.moderation import ModerationTrainConfig, build_classifier, label_examples

    settings = settings_for(data_dir)
    extra = []
    if user_labels and export is None:
        extra = label_examples(prepare(settings).engine)
        console.print(f"{len(extra)} examples from users' labels")
    config = ModerationTrainConfig(examples=examples, epochs=epochs, seed=seed)
    model, report = build_classifier(
        config,
        extra,
        progress=lambda m: err.print(f"epoch {m['epoch']}/{epochs}: loss {m['loss']:.4f}"),
    )
    _print_report(report)
    if export is not None:
        if (export / "manifest.json").exists():
            fail(f"{export} already holds a classifier; remove it first")
        with tempfile.TemporaryDirectory() as tmp:
            registry = ModerationRegistry(tmp)
            version = registry.publish(model, metrics=_summary(report))
            shutil.copytree(registry.path(version), export, dirs_exist_ok=True)
        console.print(f"wrote {export}")
    else:
        version = ModerationRegistry(settings.moderation_dir).publish(
            model, metrics=_summary(report)
        )
        console.print(f"published moderation classifier {version} to {settings.moderation_dir}")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2, sort_keys=True))


def _summary(report: dict) -> dict:
    return {k: v for k, v in report.items() if not isinstance(v, dict)} | {
        "per_category": report["per_category"]
    }


def _print_report(report: dict) -> None:
    for kind in ("unsafe", "benign"):
        console.print(
            f"held-out {kind} flagged: {report[f'{kind}_flagged']:.1%} "
            f"(requests {report[f'request_{kind}_flagged']:.1%}, "
            f"replies {report[f'reply_{kind}_flagged']:.1%})"
        )
    console.print(f"{'category':<24} {'precision':>9} {'recall':>7} {'support':>8}")
    for c, m in report["per_category"].items():
        console.print(f"{c:<24} {m['precision']:>9.3f} {m['recall']:>7.3f} {int(m['support']):>8}")


def load_classifier(data_dir: Path | None) -> Classifier:
    """The data dir's latest moderation classifier (the bundled one if it has none); a clean
    CLI error if it cannot be loaded."""
    from shared.bootstrap import SEED_MODERATION_DIR
    from shared.checkpoints import CheckpointError
    from shared.moderation import ModerationRegistry

    registry = ModerationRegistry(settings_for(data_dir).moderation_dir)
    try:
        if registry.latest() is None:
            return ModerationRegistry(SEED_MODERATION_DIR.parent).load(SEED_MODERATION_DIR.name)
        return registry.load()
    except CheckpointError as e:
        fail(str(e))


@moderation.command()
def check(
    text: Annotated[list[str], typer.Argument(help="Texts to classify.")],
    data_dir: DataDir = None,
) -> None:
    """Classify texts with the data dir's latest classifier (the bundled one if none)."""

    classifier = load_classifier(data_dir)
    for t, v in zip(text, classifier.classify(text), strict=True):
        cats = ", ".join(v.flagged_categories) or "-"
        console.print(f"{'FLAGGED' if v.flagged else 'ok':<8} {cats:<40} {t}")
