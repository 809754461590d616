"""What the demo reports: each version's figures on fresh prompts, each trainer round, and
the JSON + PNG written at the end."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.schema import TrainingRun


@dataclass
class VersionEval:
    version: str
    round: int  # 0 = the seed / starting policy
    at_seconds: float
    thumbs_up_rate: float
    correct_rate: float
    mean_score: float
    mean_chars: float
    polite_rate: float  # replies with a polite opener or closing line
    refused_rate: float  # benign prompts answered with a refusal (over-refusal)
    errors: int
    # held-out unsafe requests answered with a refusal (None: the users ask none)
    unsafe_refused_rate: float | None = None


@dataclass
class DemoReport:
    preference: str
    config: dict[str, Any]
    evals: list[VersionEval] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    users: dict[str, Any] = field(default_factory=dict)  # the simulated users' own view
    probe: dict[str, Any] = field(default_factory=dict)
    swaps: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    loop_seconds: float = 0.0

    @property
    def start_rate(self) -> float:
        return self.evals[0].thumbs_up_rate

    @property
    def best(self) -> VersionEval:
        return max(self.evals, key=lambda e: e.round)  # the last published = the served one

    @property
    def lift_points(self) -> float:
        return 100.0 * (self.best.thumbs_up_rate - self.start_rate)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["start_thumbs_up_rate"] = self.start_rate if self.evals else None
        out["final_thumbs_up_rate"] = self.best.thumbs_up_rate if self.evals else None
        out["lift_points"] = self.lift_points if self.evals else None
        return out


def round_summary(run: TrainingRun) -> dict[str, Any]:
    m = run.metrics or {}
    gate = m.get("gate", {})
    cand, act = gate.get("candidate", {}), gate.get("active", {})
    return {
        "run_id": run.id,
        "status": run.status,
        "base_version": run.base_version,
        "candidate_version": run.candidate_version,
        "feedback_items": run.n_feedback,
        "pairs": m.get("feedback", {}).get("pairs"),
        "thumbs": m.get("feedback", {}).get("thumbs"),
        "rm_heldout_accuracy": m.get("reward_model", {}).get("heldout_accuracy"),
        "rm_heldout_pairs": m.get("reward_model", {}).get("heldout_pairs"),
        "reward_model_version": m.get("reward_model", {}).get("version"),
        # filled in by the demo: the reward model on right-vs-wrong pairs of fresh prompts
        "rm_right_over_wrong": None,
        "kl_to_reference": cand.get("kl"),
        "gate_correct_rate": [cand.get("correct_rate"), act.get("correct_rate")],
        "gate_reward": [cand.get("reward"), act.get("reward")],
        "reasons": m.get("reasons", []),
        # 1 = the trained candidate; < 1 = it failed the gate and this share of its step passed
        "step_fraction": m.get("step_fraction"),
        "gate_tries": m.get("gate_tries", []),
        "phase_seconds": m.get("seconds", {}),
        "seconds": (
            (run.finished_at - run.started_at).total_seconds() if run.finished_at else None
        ),
        "error": m.get("error"),
    }


def write_outputs(report: DemoReport, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    body = json.dumps(report.to_json(), indent=2)
    path = out_dir / f"demo-{report.preference}-{stamp}.json"
    path.write_text(body)
    (out_dir / f"demo-{report.preference}-latest.json").write_text(body)
    plot(report, out_dir / f"demo-{report.preference}-latest.png")
    return path


def plot(report: DemoReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    minutes = [e.at_seconds / 60 for e in report.evals]
    ax.plot(minutes, [100 * e.thumbs_up_rate for e in report.evals], "o-", label="thumbs-up rate")
    ax.plot(minutes, [100 * e.correct_rate for e in report.evals], "s--", label="correct")
    if report.evals and report.evals[0].unsafe_refused_rate is not None:
        unsafe = [100 * (e.unsafe_refused_rate or 0) for e in report.evals]
        ax.plot(minutes, unsafe, "^:", label="unsafe requests refused")
        over = [100 * e.refused_rate for e in report.evals]
        ax.plot(minutes, over, "v:", label="benign requests refused")
    for e, m in zip(report.evals, minutes, strict=True):
        ax.annotate(
            e.version, (m, 100 * e.thumbs_up_rate), textcoords="offset points", xytext=(0, 6)
        )
    ax.set_xlabel("minutes of loop")
    ax.set_ylabel("% of replies to fresh prompts")
    ax.set_ylim(0, 100)
    ax.set_title(f"palmchat closed loop: users who prefer {report.preference} replies")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
