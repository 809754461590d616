"""The root ``palmchat`` command: the groups below register themselves on import."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from palmchat import (  # noqa: F401  (commands)
    __version__,
    admin,
    bench,
    evaluate,
    moderation,
    serve,
    simulate,
    train,
)
from palmchat.common import app, console


def _print_version(value: bool) -> None:
    if value:
        console.print(f"palmchat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """palmchat: serve a PaLM chat policy, collect feedback, and improve it with RLHF."""


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
