"""Training commands: ``pretrain`` (pretrain / SFT a policy) and the online ``trainer``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from palmchat.common import (
    DataDir,
    app,
    built_or_fail,
    console,
    err,
    fail,
    settings_for,
    setup_logging,
)

if TYPE_CHECKING:
    from trainer.config import TrainerConfig


def _family_weights(pairs: list[str]) -> dict[str, float] | None:
    """``["arithmetic=3", ...]`` as a dict (None when empty); a clean error otherwise."""
    from demo.tasks import FAMILIES

    weights: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or name not in FAMILIES or not weight >= 0:
            fail(
                f"--family-weight {pair!r}: expected FAMILY=WEIGHT with a weight >= 0 and "
                f"FAMILY one of {', '.join(FAMILIES)}"
            )
        weights[name] = weight
    return weights or None


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
    family_weight: Annotated[
        list[str] | None,
        typer.Option(
            help="Synthetic data: FAMILY=WEIGHT draws a family more or less often (others "
            "weigh 1); repeat for several."
        ),
    ] = None,
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
    setup_logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)  # eval lines also reach non-tty logs
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from shared.checkpoints import PolicyRegistry
    from trainer.pretrain import PretrainConfig
    from trainer.pretrain import pretrain as run

    if data is not None and not data.is_file():
        fail(f"{data}: no such file")
    overrides = {k: v for k, v in (("dim", dim), ("depth", depth)) if v is not None}
    weights = _family_weights(family_weight or [])
    cfg = built_or_fail(
        PretrainConfig,
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
        family_weights=weights,
        eval_every=eval_every,
        model_overrides=overrides,
    )
    settings = settings_for(data_dir)
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
            fail(str(e))
    console.print_json(json.dumps(result.__dict__))


def trainer_overrides(settings: list[str]) -> dict:
    """``--set KEY=VALUE`` items as TrainerConfig's flat fields (VALUE read as JSON when it
    is)."""
    from trainer.config import TrainerConfig

    fields = set(TrainerConfig.flat_names())
    values: dict = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            fail(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def trainer_config(
    algo: str,
    min_new: int,
    poll: float,
    device: str,
    lora_rank: int,
    seed: int,
    settings: list[str],
) -> TrainerConfig:
    from trainer.config import TrainerConfig

    values: dict = dict(
        algo=algo, min_new_feedback=min_new, poll_seconds=poll, device=device,
        lora_rank=lora_rank, seed=seed,
    )  # fmt: skip
    values.update(trainer_overrides(settings))
    return built_or_fail(TrainerConfig.from_flat, **values)


@app.command()
def trainer(
    data_dir: DataDir = None,
    once: Annotated[bool, typer.Option("--once", help="Run one round now, then exit.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Poll and train whenever --min-new items arrived.")
    ] = False,
    algo: Annotated[str, typer.Option(help="Policy update: dpo, ppo or kto.")] = "dpo",
    min_new: Annotated[
        int,
        typer.Option(
            min=1,
            help="--watch: new feedback items (thumbs, rankings, labels) that trigger a round.",
        ),
    ] = 32,
    poll: Annotated[float, typer.Option(min=0.1, help="--watch: seconds between polls.")] = 10.0,
    max_rounds: Annotated[
        int | None, typer.Option(min=1, help="--watch: stop after this many rounds.")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(min=0, help="Trainer /metrics port on $PALMCHAT_HOST (0 = off).")
    ] = 9101,
    device: Annotated[
        str, typer.Option(help="cpu or cuda (each torchrun rank its own GPU).")
    ] = "cpu",
    lora_rank: Annotated[
        int,
        typer.Option(
            min=-1,
            help="LoRA rank; 0 = full fine-tuning; -1 = by size (rank 16 over 100M parameters).",
        ),
    ] = -1,
    seed: int = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any TrainerConfig field, e.g. --set ppo_iterations=2."),
    ] = None,
) -> None:
    """Online RLHF trainer: learn from the feedback in the database, publish better policies.

    Each round trains a reward model on thumbs and rankings, improves the active policy
    (DPO, PPO or KTO), gates the candidate against the active policy on held-out prompts
    (reward up, KL to the reference bounded, correctness kept) and publishes + activates it or
    records it as rejected. Running servers hot-swap to the new version. Safe to kill at any
    point. Runs under `torchrun --nproc_per_node=N -m palmchat trainer ...` with DDP.
    """
    setup_logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)
    if once == watch:
        fail("give exactly one of --once and --watch")
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from shared.checkpoints import CheckpointError
    from trainer.common import close_distributed, init_distributed
    from trainer.loop import OnlineTrainer
    from trainer.metrics import TrainerMetrics
    from trainer.round import RoundResult

    cfg = trainer_config(algo, min_new, poll, device, lora_rank, seed, set_ or [])
    settings = settings_for(data_dir)
    info = init_distributed(cfg.device)
    metrics = TrainerMetrics()
    if info.is_main and metrics_port:
        try:
            metrics.serve(metrics_port, addr=settings.host)
        except OSError as e:
            fail(f"cannot serve trainer metrics on port {metrics_port}: {e}")
    bars = Progress(
        TextColumn("{task.description:<13}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not info.is_main,
    )
    tasks: dict[str, TaskID] = {}

    def progress(phase: str, done: int, total: int, text: str) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total, info="")
        bars.update(tasks[phase], completed=done, total=total, info=text)

    def report(result: RoundResult) -> None:
        for task_id in tasks.values():
            bars.remove_task(task_id)
        tasks.clear()
        if not info.is_main:
            return
        if result.status == "skipped":
            console.print(f"round skipped: {'; '.join(result.reasons)}")
            return
        gate = result.metrics.get("gate", {})
        cand, act = gate.get("candidate", {}), gate.get("active", {})
        acc, n_held = result.rm_accuracy, result.rm_heldout_pairs
        console.print(
            f"round {result.run_id} [{cfg.algo}] {result.status}: "
            f"{result.candidate_version or '-'} (parent {result.base_version}), "
            f"{result.n_feedback} new items, RM held-out acc "
            f"{'-' if acc is None else f'{acc:.3f} of {n_held} pairs'}, "
            f"reward {cand.get('reward', 0):+.3f} vs "
            f"{act.get('reward', 0):+.3f}, KL {cand.get('kl', 0):.2f}, correct "
            f"{cand.get('correct_rate', 0):.3f} vs {act.get('correct_rate', 0):.3f}, "
            f"{result.seconds:.0f}s"
            + (
                f", published at {result.metrics['step_fraction']:g} of its step"
                if result.status == "published" and result.metrics.get("step_fraction", 1.0) != 1.0
                else ""
            )
        )
        for reason in result.reasons:
            console.print(f"  rejected: {reason}")

    try:
        with bars:
            runner = OnlineTrainer(settings, cfg, progress=progress, metrics=metrics, info=info)
            if once:
                result = runner.run_round(force=True)
                report(result)
                if info.is_main:
                    console.print_json(json.dumps(result.to_dict(), default=str))
            else:
                if info.is_main:
                    console.print(
                        f"trainer watching (algo {cfg.algo}, min {cfg.min_new_feedback} new "
                        f"items, poll {cfg.poll_seconds}s"
                        + (f", metrics on :{metrics_port}/metrics)" if metrics_port else ")")
                    )
                try:
                    runner.watch(max_rounds=max_rounds, on_round=report)
                except KeyboardInterrupt:
                    console.print("trainer stopped")
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
    finally:
        close_distributed(info)
