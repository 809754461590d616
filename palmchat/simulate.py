"""The demo world's commands: scripted users (``simulate``) and the closed-loop ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from palmchat.common import DataDir, app, built_or_fail, console, fail, setup_logging
from palmchat.train import trainer_config, trainer_overrides
from server.engine import openmp


@app.command()
def simulate(
    url: Annotated[str, typer.Option(help="Server base URL, e.g. http://127.0.0.1:8000.")],
    api_key: Annotated[
        str, typer.Option(envvar="PALMCHAT_API_KEY", help="API key the users chat with.")
    ],
    users: Annotated[int, typer.Option(min=1, help="Concurrent simulated users.")] = 4,
    minutes: Annotated[float, typer.Option(min=0.01, help="How long to run.")] = 1.0,
    max_requests: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many chats.")
    ] = None,
    preference: Annotated[
        str, typer.Option(help="What the scripted users like: courteous or concise.")
    ] = "courteous",
    rank_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of chats with n=2..4 ranked.")
    ] = 0.3,
    phrasing: Annotated[
        str, typer.Option(help="How users ask: all phrasings, or seed (as the seed was taught).")
    ] = "all",
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="JSON report.")] = Path(
        "ops/bench/results/simulate-latest.json"
    ),
) -> None:
    """Scripted users chat through the API, give thumbs and rankings; thumbs-up rate per version.

    The users speak REST, SSE and WebSocket in turn, like the clients of a real deployment.
    """
    import asyncio

    from demo.simulator import SimConfig, run_simulation

    cfg = built_or_fail(
        SimConfig,
        url=url,
        api_key=api_key,
        users=users,
        minutes=minutes,
        max_requests=max_requests,
        preference=preference,
        rank_fraction=rank_fraction,
        phrasing=phrasing,
        seed=seed,
    )
    report = asyncio.run(run_simulation(cfg, out))
    for version, row in report.per_version.items():
        typer.echo(
            f"{version}\treplies={row['replies']}\tthumbs_up_rate={row['thumbs_up_rate']:.3f}"
        )
    typer.echo(
        f"chats={report.chats} feedback={report.feedback_sent} rankings={report.rankings_sent} "
        f"errors={len(report.errors)} -> {out}"
    )
    if report.chats == 0:
        fail("no chat succeeded: " + "; ".join(report.errors[:3]))


@app.command()
def demo(
    data_dir: DataDir = None,
    preference: Annotated[
        str, typer.Option(help="What the simulated users like: courteous or concise.")
    ] = "courteous",
    minutes: Annotated[
        float, typer.Option(min=0.1, help="Loop time budget; no round starts after it.")
    ] = 30.0,
    rounds: Annotated[int, typer.Option(min=1, help="Trainer rounds at most.")] = 8,
    chats_per_round: Annotated[
        int, typer.Option(min=1, help="Feedback items the users leave before each round.")
    ] = 96,
    users: Annotated[int, typer.Option(min=1, help="Concurrent simulated users.")] = 4,
    eval_prompts: Annotated[
        int, typer.Option(min=1, help="Fresh held-out prompts each version is measured on.")
    ] = 128,
    algo: Annotated[str, typer.Option(help="Trainer algorithm: dpo, ppo or kto.")] = "dpo",
    phrasing: Annotated[
        str, typer.Option(help="How users ask: all phrasings, or seed (as the seed was taught).")
    ] = "seed",
    seed: int = 0,
    unsafe: Annotated[
        bool,
        typer.Option(
            help="Users also ask unsafe requests (served in flag mode: the policy must learn to "
            "refuse them); each version's refusal and over-refusal rates are measured."
        ),
    ] = False,
    seed_dir: Annotated[
        Path | None,
        typer.Option(help="Start from this policy version directory instead of the bundled seed."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="TrainerConfig overrides for the trainer, KEY=VALUE."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON report and PNG plot.")] = Path(
        "ops/bench/results"
    ),
) -> None:
    """Closed-loop demo on this machine: server, trainer and scripted users improve the policy.

    Runs the server, a `palmchat trainer --watch` process and scripted users who chat, thumb
    and rank through the API. Prints the thumbs-up rate of each
    policy version on fresh prompts as the trainer publishes them, and writes
    demo-<preference>-latest.json / .png under --out.

    Uses a fresh data dir (default: ./palmchat-demo-<preference>) so the demo starts from the
    seed policy; the trainer's log is <data dir>/trainer.log.
    """
    openmp.serving_process()
    setup_logging("WARNING")
    from demo.driver import DemoConfig, run_demo

    overrides = trainer_overrides(set_ or [])
    trainer_config(algo, 1, 1.0, "cpu", 0, seed, set_ or [])  # validates the overrides
    root = data_dir or Path(f"palmchat-demo-{preference}")
    if (root / "palmchat.db").exists():
        fail(f"{root} already holds a palmchat database; give a fresh --data-dir")
    cfg = built_or_fail(
        DemoConfig,
        data_dir=root,
        preference=preference,
        rounds=rounds,
        minutes=minutes,
        chats_per_round=chats_per_round,
        users=users,
        eval_prompts=eval_prompts,
        algo=algo,
        trainer_set=overrides,
        phrasing=phrasing,
        seed=seed,
        out_dir=out,
        unsafe=unsafe,
        seed_dir=seed_dir,
    )
    report = run_demo(cfg, log=console.print)
    console.print(
        f"thumbs-up rate on fresh prompts: {report.start_rate:.1%} ({report.evals[0].version}) "
        f"-> {report.best.thumbs_up_rate:.1%} ({report.best.version}), "
        f"{report.lift_points:+.1f} points in {report.loop_seconds / 60:.1f} min of loop; "
        f"probe: {report.probe['requests']} streamed requests, {report.probe['failures']} failed"
    )
    first, last = report.evals[0], report.best
    if first.unsafe_refused_rate is not None and last.unsafe_refused_rate is not None:
        console.print(
            f"unsafe requests refused: {first.unsafe_refused_rate:.1%} -> "
            f"{last.unsafe_refused_rate:.1%}; benign ones refused: {first.refused_rate:.1%} -> "
            f"{last.refused_rate:.1%}"
        )
    console.print(f"report and plot: {out}/demo-{preference}-latest.json / .png")
