"""Operator commands: ``policies``, ``db`` and ``keys``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from palmchat.common import DataDir, app, console, fail, settings_for

policies_app = typer.Typer(help="List, verify and import policy versions.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(policies_app, name="policies")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")


@policies_app.command("list")
def policies_list(data_dir: DataDir = None) -> None:
    """List versions with status, parent, feedback count and thumbs-up rate."""
    from shared.bootstrap import prepare
    from shared.policies import list_policies

    prepared = prepare(settings_for(data_dir))
    typer.echo("VERSION\tSTATUS\tPARENT\tFEEDBACK\tUP_RATE")
    for p in list_policies(prepared.engine, prepared.registry):
        rate = "-" if p["thumbs_up_rate"] is None else f"{p['thumbs_up_rate']:.2f}"
        typer.echo(
            f"{p['version']}\t{p['status']}\t{p['parent'] or '-'}\t{p['feedback_count']}\t{rate}"
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

    prepared = prepare(settings_for(data_dir))
    try:
        previous = activate(prepared.engine, prepared.registry, version)
    except (CheckpointError, NotFound) as e:
        fail(str(e))
    typer.echo(f"active: {version} (was {previous or version})")


@policies_app.command("rollback")
def policies_rollback(data_dir: DataDir = None) -> None:
    """Re-activate the previously active version."""
    from shared.bootstrap import prepare
    from shared.policies import rollback
    from shared.store import NotFound

    prepared = prepare(settings_for(data_dir))
    try:
        old, new = rollback(prepared.engine, prepared.registry)
    except NotFound as e:
        fail(str(e))
    typer.echo(f"active: {new} (was {old})")


@policies_app.command("canary")
def policies_canary(
    version: Annotated[str, typer.Argument(help="Version to roll out, e.g. v3.")],
    share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of users served VERSION (0 < share < 1).")
    ] = 0.1,
    data_dir: DataDir = None,
) -> None:
    """Serve VERSION to a share of users beside the active version (a canary rollout).

    Each user stays on one version; run again with another share to change it. Running
    servers follow within seconds."""
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.rollout.state import start_canary
    from shared.store import Invalid, NotFound

    prepared = prepare(settings_for(data_dir))
    try:
        canary = start_canary(prepared.engine, prepared.registry, version, share)
    except (CheckpointError, NotFound, Invalid) as e:
        fail(str(e))
    typer.echo(f"canary: {canary.version} for {canary.share:.0%} of users")


@policies_app.command("promote")
def policies_promote(
    version: Annotated[str, typer.Argument(help="The canary version to make active.")],
    reason: Annotated[str, typer.Option(help="Why, recorded with the decision.")] = "",
    data_dir: DataDir = None,
) -> None:
    """End VERSION's canary by making it the active version (the old one is retired)."""
    previous = _end_canary("promote", version, reason, data_dir)
    typer.echo(f"active: {version} (was {previous or version})")


@policies_app.command("abort")
def policies_abort(
    version: Annotated[str, typer.Argument(help="The canary version to reject.")],
    reason: Annotated[str, typer.Option(help="Why, recorded with the decision.")] = "",
    data_dir: DataDir = None,
) -> None:
    """End VERSION's canary: it is rejected and every user gets the active version again."""
    _end_canary("abort", version, reason, data_dir)
    typer.echo(f"rejected: {version}")


def _end_canary(action: str, version: str, reason: str, data_dir: Path | None) -> str | None:
    from shared.bootstrap import prepare
    from shared.rollout.state import abort_canary, promote_canary
    from shared.store import Invalid, NotFound

    prepared = prepare(settings_for(data_dir))
    end = promote_canary if action == "promote" else abort_canary
    try:
        return end(prepared.engine, version, {"by": "cli", "reason": reason})
    except (NotFound, Invalid) as e:
        fail(str(e))


@policies_app.command("verify")
def policies_verify(
    version: Annotated[str, typer.Argument(help="Version to check, e.g. v3.")],
    data_dir: DataDir = None,
) -> None:
    """Re-hash a version's files against its manifest and load it."""
    from shared.checkpoints import CheckpointError, PolicyRegistry

    registry = PolicyRegistry(settings_for(data_dir).registry_dir)
    try:
        policy = registry.load(version)
    except CheckpointError as e:
        fail(str(e))
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

    settings = settings_for(data_dir)
    registry = PolicyRegistry(settings.registry_dir)
    try:
        version = import_palm_state_dict(
            registry, path, xpos_scale_base=xpos_scale_base, max_seq_len=max_seq_len
        )
    except ValueError as e:
        fail(str(e))
    register_version(init_db(settings.database_url), registry, version, status="candidate")
    console.print(f"imported {path} as {version} (status candidate)")


@policies_app.command("import-hf")
def policies_import_hf(
    directory: Annotated[
        Path, typer.Argument(help="A local Hugging Face checkpoint directory (save_pretrained's).")
    ],
    activate_it: Annotated[
        bool, typer.Option("--activate", help="Serve it now (running servers hot-swap to it).")
    ] = False,
    max_seq_len: Annotated[
        int | None,
        typer.Option(min=1, help="Context to serve with (default: the model's, at most 4096)."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Import a Llama, Mistral or Qwen2 checkpoint (safetensors) with its chat template.

    Reads config.json, the safetensors weights (sharded or not), tokenizer.json,
    tokenizer_config.json (or chat_template.jinja) and generation_config.json. Pickled .bin
    weights are refused, never loaded; nothing is downloaded.
    """
    from shared.checkpoints import CheckpointError, PolicyRegistry
    from shared.db import init_db
    from shared.hf_import import ImportRefused, import_hf_checkpoint
    from shared.policies import activate, register_version

    settings = settings_for(data_dir)
    registry = PolicyRegistry(settings.registry_dir)
    try:
        version = import_hf_checkpoint(registry, directory, max_seq_len=max_seq_len)
    except ImportRefused as e:
        fail(str(e))
    engine = init_db(settings.database_url)
    register_version(engine, registry, version, status="candidate")
    manifest = registry.manifest(version)
    what = f"{manifest['recipe']['architecture']}, {manifest['num_params']:,} parameters"
    if activate_it:
        try:
            activate(engine, registry, version)
        except CheckpointError as e:
            fail(str(e))
    status = "active" if activate_it else "candidate"
    console.print(f"imported {directory} ({what}) as {version} (status {status})")


@policies_app.command("export")
def policies_export(
    version: Annotated[str, typer.Argument(help="Version to export, e.g. v3.")],
    dest: Annotated[Path, typer.Argument(help="Directory to create with the version's files.")],
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 weights.")] = "float32",
    data_dir: DataDir = None,
) -> None:
    """Copy a verified version out of the registry (backups; the bundled seed is made this way)."""
    from shared.checkpoints import CheckpointError, PolicyRegistry

    registry = PolicyRegistry(settings_for(data_dir).registry_dir)
    try:
        path = registry.export(version, dest, dtype=dtype)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    typer.echo(f"exported {version} to {path} ({dtype})")


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Run the Alembic migrations on $PALMCHAT_DATABASE_URL (default: SQLite in the data dir)."""
    from shared.db import DatabaseError, current_revision, upgrade

    settings = settings_for(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(settings.database_url, revision)
        console.print(f"database at revision {current_revision(settings.database_url)}")
    except DatabaseError as e:
        fail(str(e))


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="User name the key belongs to (created if new).")],
    admin: Annotated[bool, typer.Option("--admin", help="Give the key the admin role.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it. Only its hash is stored: it cannot be shown again."""
    from shared.db import DatabaseError, init_db
    from shared.keys import create_key

    settings = settings_for(data_dir)
    try:
        key = create_key(init_db(settings.database_url), user, admin=admin)
    except (ValueError, DatabaseError) as e:
        fail(str(e))
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys by user and display prefix (the keys themselves are not stored)."""
    from shared.db import init_db
    from shared.keys import list_keys

    typer.echo("USER\tPREFIX\tFLAGS")
    for user, prefix, is_admin, revoked in list_keys(init_db(settings_for(data_dir).database_url)):
        flags = ",".join(f for f, on in (("admin", is_admin), ("revoked", revoked)) if on)
        typer.echo(f"{user}\t{prefix}\t{flags or '-'}")


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
        n = revoke_key(init_db(settings_for(data_dir).database_url), prefix)
    except ValueError as e:
        fail(str(e))
    if n == 0:
        fail(f"no live key with prefix {prefix[:8]!r}")
    typer.echo(f"revoked {n} key(s)")
