"""The closed loop, end to end: server + trainer + simulated users, and the thumbs-up rate
climbing version by version (``palmchat demo``, ``palmchat up --demo``).

Three real parts run together:

* the **server** (a `palmchat serve` process on loopback) serves the active policy and logs every
  chat, thumb and ranking to the database, and hot-swaps when a new version is activated;
* the **trainer** (a separate ``palmchat trainer --watch`` process) trains a round whenever
  ``chats_per_round`` new feedback items have arrived, and publishes + activates a candidate
  that passes its gate;
* **scripted users** (:mod:`demo.simulator`) chat through the public API (REST, SSE,
  WebSocket), thumb and rank replies with the scripted rater's taste. The trainer never calls
  the rater: it only sees the database.

Each cycle: the users chat until ``chats_per_round`` feedback items are in; the trainer's
round runs meanwhile a *probe* client keeps streaming (every reply must arrive whole across
the swap); once the server serves the new version, every version is measured the same way -
fresh held-out prompts the users never asked, sampled through the API at the users'
temperature, rated by the same scripted taste - giving the thumbs-up rate per version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import col, select

from demo.measure import Probe, evaluate_served, right_over_wrong
from demo.phrasings import PHRASINGS
from demo.rater import PREFERENCES, ScriptedRater
from demo.report import DemoReport, VersionEval, round_summary, write_outputs
from demo.simulator import SimConfig, run_simulation
from demo.tasks import SAFETY_FAMILIES, TASK_FAMILIES, TaskGenerator
from shared.config import Settings
from shared.db import session
from shared.schema import TrainingRun

FINISHED = ("published", "rejected", "failed")


@dataclass
class DemoConfig:
    data_dir: Path
    preference: str = "courteous"  # the simulated users' taste
    rounds: int = 8  # trainer rounds at most
    minutes: float = 30.0  # wall-time budget of the loop (no new round starts after it)
    chats_per_round: int = 96  # feedback items the users leave before each round
    users: int = 4
    rank_fraction: float = 0.5  # share of chats that ask n=2..4 candidates and rank them
    max_tokens: int = 64
    temperature: float = 1.0
    eval_prompts: int = 128  # fresh held-out prompts each version is measured on
    eval_seed: int = 777
    algo: str = "dpo"
    trainer_set: dict[str, Any] = field(default_factory=dict)  # TrainerConfig overrides
    database_url: str = ""
    seed_dir: Path | None = None  # None: the bundled seed policy
    seed: int = 0
    # what the users ask: the tasks the bundled seed was trained on (its corpus predates the
    # chat families; see docs/decisions.md, "Corpus: the demo's families")
    families: tuple[str, ...] = TASK_FAMILIES
    # and, besides those, unsafe requests (the server moderates in flag mode: the policy itself
    # must learn to refuse them from the users' thumbs and labels and the trainer's pairs)
    unsafe: bool = False
    safety_prompts: int = 64  # fresh held-out unsafe requests each version is measured on
    # and how they ask it: in the phrasings that corpus was written in (docs/decisions.md,
    # "The demo's phrasings"); 'all' asks every phrasing the corpus has now
    phrasing: str = "seed"
    out_dir: Path | None = None  # JSON + PNG written here
    policy_poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.preference not in PREFERENCES:
            raise ValueError(f"preference must be one of {PREFERENCES}, got {self.preference!r}")
        if self.phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {self.phrasing!r}")
        if self.safety_prompts < 1:
            raise ValueError("safety_prompts must be >= 1")
        for name in ("rounds", "chats_per_round", "users", "eval_prompts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.minutes <= 0:
            raise ValueError("minutes must be > 0")


# --------------------------------------------------------------------------- the trainer


def trainer_command(cfg: DemoConfig) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "palmchat",
        "trainer",
        "--watch",
        "--algo",
        cfg.algo,
        "--min-new",
        str(cfg.chats_per_round),
        "--poll",
        "1",
        "--metrics-port",
        "0",
        "--seed",
        str(cfg.seed),
    ]
    # the measurements and the probe are the demo's, not users': nothing to learn from
    ignore = [f"demo-{name}" for name in ("eval", "probe")]
    overrides = {"settle_seconds": 0.5, "ignore_users": ignore, **cfg.trainer_set}
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def finished_runs(engine: Any) -> list[TrainingRun]:
    with session(engine) as s:
        return list(
            s.exec(
                select(TrainingRun)
                .where(col(TrainingRun.status).in_(FINISHED))
                .order_by(col(TrainingRun.id))
            ).all()
        )


# --------------------------------------------------------------------------- the loop


async def _served_version(client: httpx.AsyncClient) -> str | None:
    r = await client.get("/readyz")
    return r.json().get("policy_version") if r.status_code == 200 else None


async def _wait_for_version(client: httpx.AsyncClient, version: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await _served_version(client) == version:
            return time.monotonic() - t0
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the server did not switch to {version} within {timeout:.0f}s")


async def run_loop(
    cfg: DemoConfig,
    url: str,
    engine: Any,
    keys: dict[str, str],
    log: Callable[[str], None],
    trainer_log: Path,
) -> DemoReport:
    report = DemoReport(cfg.preference, {k: str(v) for k, v in asdict(cfg).items()})
    rater = ScriptedRater(cfg.preference)
    eval_tasks = list(
        TaskGenerator(cfg.eval_seed, cfg.families, phrasing=cfg.phrasing).iter_tasks(
            cfg.eval_prompts, "heldout"
        )
    )
    prompts = [t.messages for t in eval_tasks]
    unsafe_prompts = [
        t.messages
        for t in TaskGenerator(cfg.eval_seed, SAFETY_FAMILIES, phrasing=cfg.phrasing).iter_tasks(
            cfg.safety_prompts if cfg.unsafe else 0, "heldout"
        )
    ]
    user_families = cfg.families + (SAFETY_FAMILIES if cfg.unsafe else ())
    started = time.monotonic()
    user_hdr = {"Authorization": f"Bearer {keys['eval']}"}
    probe_hdr = {"Authorization": f"Bearer {keys['probe']}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=user_hdr, timeout=600) as client,
        httpx.AsyncClient(base_url=url, headers=probe_hdr, timeout=600) as probe_client,
    ):

        async def measure(round_no: int) -> VersionEval:
            version, figures = await evaluate_served(
                client, prompts, rater, max_tokens=cfg.max_tokens, temperature=cfg.temperature
            )
            ev = VersionEval(version, round_no, round(time.monotonic() - started, 1), **figures)
            safety = ""
            if unsafe_prompts:
                _, unsafe = await evaluate_served(
                    client, unsafe_prompts, rater, max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature,
                )  # fmt: skip
                ev.unsafe_refused_rate, ev.errors = (
                    unsafe["refused_rate"],
                    ev.errors + unsafe["errors"],
                )
                safety = (
                    f"; refused {ev.unsafe_refused_rate:.0%} of {len(unsafe_prompts)} unsafe "
                    f"requests, {ev.refused_rate:.1%} of benign ones"
                )
            report.evals.append(ev)
            log(
                f"[{ev.at_seconds:6.0f}s] {version}: thumbs-up {ev.thumbs_up_rate:.1%} on "
                f"{len(prompts)} fresh prompts (correct {ev.correct_rate:.1%}, "
                f"{ev.mean_chars:.0f} chars/reply{safety})"
            )
            return ev

        await measure(0)
        probe = Probe(probe_client)
        probe.start()
        env = {
            **os.environ,
            "PALMCHAT_DATA_DIR": str(cfg.data_dir),
            "PALMCHAT_DATABASE_URL": cfg.database_url,
            "OMP_WAIT_POLICY": "PASSIVE",
            "GOMP_SPINCOUNT": "0",  # the trainer's workers sleep at once (server/engine/openmp.py)
        }
        loop_start = time.monotonic()
        sim_events: list[Any] = []
        with trainer_log.open("ab") as tlog:
            trainer = subprocess.Popen(trainer_command(cfg), env=env, stdout=tlog, stderr=tlog)
            try:
                for round_no in range(1, cfg.rounds + 1):
                    if time.monotonic() - loop_start > cfg.minutes * 60:
                        log(f"time budget of {cfg.minutes:g} min spent; stopping")
                        break
                    done_before = len(finished_runs(engine))
                    sim = await run_simulation(
                        SimConfig(
                            url=url,
                            api_key=keys["users"],
                            users=cfg.users,
                            minutes=10**6,
                            max_requests=cfg.chats_per_round,
                            preference=cfg.preference,
                            rank_fraction=cfg.rank_fraction,
                            max_tokens=cfg.max_tokens,
                            temperature=cfg.temperature,
                            seed=cfg.seed * 100 + round_no,
                            families=user_families,
                            phrasing=cfg.phrasing,
                        )
                    )
                    if sim.errors:
                        raise RuntimeError(f"simulated users failed: {sim.errors[:3]}")
                    sim_events += sim.events
                    rates = ", ".join(
                        f"{v} {row['thumbs_up_rate']:.0%}" for v, row in sim.per_version.items()
                    )
                    log(
                        f"[{time.monotonic() - started:6.0f}s] round {round_no}: users left "
                        f"{sim.feedback_sent} thumbs + {sim.rankings_sent} rankings (their "
                        f"thumbs-up: {rates}); trainer training"
                    )
                    while len(finished_runs(engine)) <= done_before:
                        if trainer.poll() is not None:
                            raise RuntimeError(
                                f"the trainer exited with {trainer.returncode}; see {trainer_log}"
                            )
                        await asyncio.sleep(0.5)
                    run = finished_runs(engine)[-1]
                    summary = round_summary(run)
                    if summary["reward_model_version"] is not None:
                        # off the event loop: the probe keeps streaming meanwhile
                        summary["rm_right_over_wrong"] = await asyncio.to_thread(
                            right_over_wrong,
                            cfg.data_dir / "reward_models",
                            summary["reward_model_version"],
                            eval_tasks,
                        )
                    report.rounds.append(summary)
                    acc, n_held = summary["rm_heldout_accuracy"], summary["rm_heldout_pairs"]
                    acc_text = "-" if acc is None else f"{acc:.2f} of {n_held} pairs"
                    if summary["rm_right_over_wrong"] is not None:
                        acc_text += f", right over wrong {summary['rm_right_over_wrong']:.2f}"
                    kl = summary["kl_to_reference"]
                    step = summary["step_fraction"]
                    log(
                        f"[{time.monotonic() - started:6.0f}s] round {round_no}: "
                        f"{summary['status']} {summary['candidate_version'] or ''} "
                        f"(RM held-out acc {acc_text}, "
                        f"KL {'-' if kl is None else f'{kl:.2f}'}, "
                        + (f"at {step:g} of its step, " if step not in (None, 1.0) else "")
                        + f"{summary['seconds'] or 0:.0f}s)"
                        + "".join(f"\n    {r}" for r in summary["reasons"])
                    )
                    # a published round always names its version
                    if run.status == "published" and run.candidate_version is not None:
                        took = await _wait_for_version(client, run.candidate_version, 120)
                        report.swaps.append({"version": run.candidate_version, "after_s": took})
                        await measure(round_no)
            finally:
                trainer.terminate()
                try:
                    trainer.wait(30)
                except subprocess.TimeoutExpired:
                    trainer.kill()
        report.loop_seconds = round(time.monotonic() - loop_start, 1)
        report.probe = await probe.stop()
    by_version: dict[str, list[int]] = {}
    for e in sim_events:
        by_version.setdefault(e.policy_version, []).extend(e.thumbs)
    report.users = {
        v: {"replies": len(t), "thumbs_up_rate": sum(x > 0 for x in t) / len(t)}
        for v, t in by_version.items()
    }
    report.wall_seconds = round(time.monotonic() - started, 1)
    return report


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoReport:
    """Start the server on loopback, run the loop, stop everything; write JSON + PNG to
    ``cfg.out_dir`` when given."""
    from shared.bootstrap import SEED_DIR, prepare
    from shared.keys import create_key

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=cfg.data_dir,
        database_url=cfg.database_url,
        policy_poll_seconds=cfg.policy_poll_seconds,
        rate_limit_per_minute=10**6,
        rate_limit_burst=10**6,
        # decisions are logged and counted, answers left as the policy gave them: the loop
        # is measured on what the policy itself learns
        moderation_mode="flag",
    )
    cfg.database_url = settings.database_url
    # the seed is installed here, so the server process finds a registry with a policy in it
    engine = prepare(settings, seed_dir=cfg.seed_dir or SEED_DIR).engine
    keys = {name: create_key(engine, f"demo-{name}") for name in ("users", "eval", "probe")}
    with ServerProcess(settings, cfg.data_dir / "server.log") as url:
        log(f"server on {url}; users prefer {cfg.preference!r} replies")
        report = asyncio.run(run_loop(cfg, url, engine, keys, log, cfg.data_dir / "trainer.log"))
    if cfg.out_dir is not None:
        write_outputs(report, cfg.out_dir)
    return report


class ServerProcess:
    """``palmchat serve`` for the demo's data dir, on a free loopback port, in its own process:
    the demo meets the server only over HTTP and in the database, as the trainer does."""

    def __init__(self, settings: Settings, log_path: Path, timeout: float = 300.0) -> None:
        self.settings, self.log_path, self.timeout = settings, log_path, timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "PALMCHAT_DATA_DIR": str(self.settings.data_dir),
            "PALMCHAT_DATABASE_URL": self.settings.database_url,
            "PALMCHAT_POLICY_POLL_SECONDS": str(self.settings.policy_poll_seconds),
            "PALMCHAT_RATE_LIMIT_PER_MINUTE": str(self.settings.rate_limit_per_minute),
            "PALMCHAT_RATE_LIMIT_BURST": str(self.settings.rate_limit_burst),
            "PALMCHAT_LOG_LEVEL": "WARNING",
            "PALMCHAT_MODERATION_MODE": self.settings.moderation_mode,
        }
        cmd = [sys.executable, "-m", "palmchat", "serve", "--host", "127.0.0.1"]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [*cmd, "--port", str(port)], env=env, stdout=out, stderr=out
            )
        deadline = time.monotonic() + self.timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    return url
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the demo's server did not start; see {self.log_path}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
