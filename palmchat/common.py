"""What every command group shares: the root Typer app, consoles, common options, errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from server.engine import openmp  # noqa: F401  (OMP_WAIT_POLICY defaults before torch loads)

if TYPE_CHECKING:
    from shared.config import Settings

T = TypeVar("T")

app = typer.Typer(
    help="palmchat: serve a PaLM chat policy, collect feedback, and improve it with RLHF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data directory (default: $PALMCHAT_DATA_DIR or ./palmchat-data)."
    ),
]
Host = Annotated[
    str | None, typer.Option(help="Bind address (default $PALMCHAT_HOST or 127.0.0.1).")
]
Port = Annotated[
    int | None,
    typer.Option(min=0, max=65535, help="TCP port (default $PALMCHAT_PORT or 8000; 0: any)."),
]


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def built_or_fail(factory: Callable[..., T], **options: Any) -> T:
    """``factory(**options)``, with a bad option value reported as a clean CLI error."""
    try:
        return factory(**options)
    except (TypeError, ValueError) as e:
        fail(str(e))


def settings_for(data_dir: Path | None = None) -> Settings:
    """The settings from the environment, with ``--data-dir`` over ``$PALMCHAT_DATA_DIR``."""
    from pydantic import ValidationError

    from shared.config import Settings

    try:
        return Settings(data_dir=data_dir) if data_dir is not None else Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"PALMCHAT_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors()
        )
        fail(f"invalid settings: {problems}")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # alembic narrates its plugins and each step at INFO; shared.db says what it migrates
    logging.getLogger("alembic").setLevel(logging.WARNING)
