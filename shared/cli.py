"""The ``palmchat`` command line: one entry point for the server, the trainer and operators.

Every command explains itself with ``--help``. Heavy imports (torch, the server) happen inside
the commands so ``palmchat --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="palmchat: serve a PaLM chat policy, collect feedback, and improve it with RLHF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
policies_app = typer.Typer(help="List, verify and import policy versions.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(policies_app, name="policies")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

console = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data directory (default: $PALMCHAT_DATA_DIR or ./palmchat-data)."
    ),
]


def _settings(data_dir: Path | None = None):
    from shared.config import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def up(data_dir: DataDir = None) -> None:
    """Start palmchat with the embedded defaults: SQLite + registry in the data dir, seed policy.

    Runs the database migrations, installs the bundled seed policy on first run, loads and
    verifies the active policy, and answers a smoke-test prompt.
    """
    _logging()
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.generate import generate_replies

    settings = _settings(data_dir)
    try:
        prepared = prepare(settings)
        policy = prepared.registry.load(prepared.active_version)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    reply = generate_replies(
        policy.model, policy.tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]]
    )[0]
    console.print(f"data dir: {settings.data_dir.resolve()}")
    console.print(f"database: {settings.database_url}")
    console.print(f"active policy: {policy.version} ({policy.model.num_params():,} parameters)")
    console.print(f"smoke test: 'What is 2 + 3?' -> {reply!r}")
    from shared.keys import create_key, has_admin_key

    if not has_admin_key(prepared.engine):
        key = create_key(prepared.engine, "admin", admin=True)
        console.print(f"first admin API key (shown once, store it): {key}")
    console.print("Talk to it with: palmchat chat")


@app.command()
def chat(
    data_dir: DataDir = None,
    version: Annotated[
        str | None, typer.Option(help="Policy version (default: the active one).")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 128,
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    message: Annotated[
        list[str] | None, typer.Option("--message", "-m", help="Send these and exit (no prompt).")
    ] = None,
) -> None:
    """Terminal chat with a local policy. Type /reset to start over, /quit or Ctrl-D to leave."""
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.generate import generate_replies

    settings = _settings(data_dir)
    try:
        prepared = prepare(settings)
        policy = prepared.registry.load(version or prepared.active_version)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    scripted = list(message or [])
    if not scripted:
        console.print(f"[dim]policy {policy.version}; /reset, /quit[/dim]")
    while True:
        if message is not None:
            if not scripted:
                return
            text = scripted.pop(0)
        else:
            try:
                text = console.input("[bold]you>[/bold] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
        if text.strip() in {"/quit", "/exit"}:
            return
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": text})
        reply = generate_replies(
            policy.model,
            policy.tokenizer,
            [history],
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
        )[0]
        history.append({"role": "assistant", "content": reply})
        console.print(f"[bold cyan]palm>[/bold cyan] {reply}", highlight=False, markup=False)


@app.command()
def pretrain(
    data_dir: DataDir = None,
    preset: Annotated[str, typer.Option(help="Model size preset: tiny, small, base.")] = "small",
    steps: Annotated[int, typer.Option(min=1)] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-3,
    warmup: Annotated[int, typer.Option(min=0)] = 100,
    vocab_size: Annotated[int, typer.Option(min=261)] = 2048,
    max_seq_len: Annotated[int, typer.Option(min=16)] = 256,
    seed: int = 0,
    data: Annotated[
        Path | None,
        typer.Option(help='JSONL of {"messages": [...]}; default: synthetic chat tasks.'),
    ] = None,
    train_examples: Annotated[
        int, typer.Option(min=1, help="Synthetic conversations to draw.")
    ] = 40000,
    eval_every: Annotated[int, typer.Option(min=1)] = 200,
    work_dir: Annotated[
        Path | None, typer.Option(help="Resumable state (default: <data>/pretrain).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dim: Annotated[int | None, typer.Option(help="Override the preset's width.")] = None,
    depth: Annotated[int | None, typer.Option(help="Override the preset's depth.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish the result to the registry.")] = True,
) -> None:
    """Pretrain / SFT a policy (loss on assistant tokens) and publish it to the registry."""
    _logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)  # eval lines also reach non-tty logs
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from shared.checkpoints import PolicyRegistry
    from trainer.pretrain import PretrainConfig
    from trainer.pretrain import pretrain as run

    if data is not None and not data.is_file():
        _fail(f"{data}: no such file")
    overrides = {k: v for k, v in (("dim", dim), ("depth", depth)) if v is not None}
    try:
        cfg = PretrainConfig(
            preset=preset,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup,
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            seed=seed,
            data=str(data) if data else None,
            train_examples=train_examples,
            eval_every=eval_every,
            model_overrides=overrides,
        )
    except ValueError as e:
        _fail(str(e))
    settings = _settings(data_dir)
    with Progress(
        TextColumn("pretrain"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("pretrain", total=steps, info="")

        def progress(step: int, m: dict[str, float]) -> None:
            bar.update(
                task,
                completed=step,
                info=f"loss {m['loss']:.3f} eval {m['eval_loss']:.3f} "
                f"lr {m['lr']:.2e} {m['tok_s']:.0f} tok/s",
            )

        try:
            result = run(
                cfg,
                PolicyRegistry(settings.registry_dir),
                work_dir=work_dir or settings.data_dir / "pretrain",
                device=device,
                progress=progress,
                publish=publish,
            )
        except ValueError as e:
            _fail(str(e))
    console.print_json(json.dumps(result.__dict__))


@policies_app.command("list")
def policies_list(data_dir: DataDir = None) -> None:
    """List versions with status, parent, feedback count and thumbs-up rate."""
    from shared.bootstrap import prepare
    from shared.policies import list_policies

    prepared = prepare(_settings(data_dir))
    for p in list_policies(prepared.engine, prepared.registry):
        rate = "-" if p["thumbs_up_rate"] is None else f"{p['thumbs_up_rate']:.2f}"
        typer.echo(
            f"{p['version']}\t{p['status']}\tparent={p['parent']}\t"
            f"feedback={p['feedback_count']}\tup_rate={rate}"
        )


@policies_app.command("activate")
def policies_activate(
    version: Annotated[str, typer.Argument(help="Version to serve, e.g. v3.")],
    data_dir: DataDir = None,
) -> None:
    """Make VERSION the active policy (running servers hot-swap to it within seconds)."""
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.policies import activate
    from shared.store import NotFound

    prepared = prepare(_settings(data_dir))
    try:
        previous = activate(prepared.engine, prepared.registry, version)
    except (CheckpointError, NotFound) as e:
        _fail(str(e))
    typer.echo(f"active: {version} (was {previous or version})")


@policies_app.command("rollback")
def policies_rollback(data_dir: DataDir = None) -> None:
    """Re-activate the previously active version."""
    from shared.bootstrap import prepare
    from shared.policies import rollback
    from shared.store import NotFound

    prepared = prepare(_settings(data_dir))
    try:
        old, new = rollback(prepared.engine, prepared.registry)
    except NotFound as e:
        _fail(str(e))
    typer.echo(f"active: {new} (was {old})")


@policies_app.command("verify")
def policies_verify(
    version: Annotated[str, typer.Argument(help="Version to check, e.g. v3.")],
    data_dir: DataDir = None,
) -> None:
    """Re-hash a version's files against its manifest and load it."""
    from shared.checkpoints import CheckpointError, PolicyRegistry

    registry = PolicyRegistry(_settings(data_dir).registry_dir)
    try:
        policy = registry.load(version)
    except CheckpointError as e:
        _fail(str(e))
    params, kind = policy.model.num_params(), policy.tokenizer.kind
    console.print(f"{version}: ok ({params:,} parameters, {kind} tokenizer)")


@policies_app.command("import-palm")
def policies_import_palm(
    path: Annotated[Path, typer.Argument(help="A torch.save'd palm_rlhf_pytorch.PaLM state_dict.")],
    data_dir: DataDir = None,
    xpos_scale_base: Annotated[int, typer.Option(help="The model's rotary_xpos_scale_base.")] = 512,
    max_seq_len: Annotated[int, typer.Option(min=1, help="Context length to serve with.")] = 1024,
) -> None:
    """Import a PaLM-rlhf-pytorch checkpoint as a new version with the byte tokenizer.

    The file is read with torch.load(weights_only=True): no code in it is ever run.
    """
    from shared.checkpoints import PolicyRegistry, import_palm_state_dict
    from shared.db import init_db
    from shared.policies import register_version

    settings = _settings(data_dir)
    registry = PolicyRegistry(settings.registry_dir)
    try:
        version = import_palm_state_dict(
            registry, path, xpos_scale_base=xpos_scale_base, max_seq_len=max_seq_len
        )
    except ValueError as e:
        _fail(str(e))
    register_version(init_db(settings.database_url), registry, version, status="candidate")
    console.print(f"imported {path} as {version} (status candidate)")


@policies_app.command("export")
def policies_export(
    version: Annotated[str, typer.Argument(help="Version to export, e.g. v3.")],
    dest: Annotated[Path, typer.Argument(help="Directory to create with the version's files.")],
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 weights.")] = "float32",
    data_dir: DataDir = None,
) -> None:
    """Copy a verified version out of the registry (backups; the bundled seed is made this way)."""
    from shared.checkpoints import CheckpointError, PolicyRegistry

    registry = PolicyRegistry(_settings(data_dir).registry_dir)
    try:
        path = registry.export(version, dest, dtype=dtype)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"exported {version} to {path} ({dtype})")


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Run the Alembic migrations on $PALMCHAT_DATABASE_URL (default: SQLite in the data dir)."""
    from shared.db import DatabaseError, current_revision, upgrade

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(settings.database_url, revision)
        console.print(f"database at revision {current_revision(settings.database_url)}")
    except DatabaseError as e:
        _fail(str(e))


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="User name the key belongs to (created if new).")],
    admin: Annotated[bool, typer.Option("--admin", help="Give the key the admin role.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it. Only its hash is stored: it cannot be shown again."""
    from shared.db import DatabaseError, init_db
    from shared.keys import create_key

    settings = _settings(data_dir)
    try:
        key = create_key(init_db(settings.database_url), user, admin=admin)
    except (ValueError, DatabaseError) as e:
        _fail(str(e))
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys by user and display prefix (the keys themselves are not stored)."""
    from shared.db import init_db
    from shared.keys import list_keys

    for user, prefix, is_admin, revoked in list_keys(init_db(_settings(data_dir).database_url)):
        flags = ",".join(f for f, on in (("admin", is_admin), ("revoked", revoked)) if on)
        typer.echo(f"{user}\t{prefix}\t{flags}")


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[
        str, typer.Argument(help="The key, or its 8-character prefix from `keys list`.")
    ],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key; it stops working at once."""
    from shared.db import init_db
    from shared.keys import revoke_key

    try:
        n = revoke_key(init_db(_settings(data_dir).database_url), prefix)
    except ValueError as e:
        _fail(str(e))
    if n == 0:
        _fail(f"no live key with prefix {prefix[:8]!r}")
    typer.echo(f"revoked {n} key(s)")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
