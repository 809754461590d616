"""Helpers for the online trainer's tests: a tiny round config, and logged feedback.

Feedback is made the way users make it - completions logged with ``log_completion``, thumbs
and rankings recorded with ``record_feedback`` / ``record_ranking`` - and rated by the
scripted rater, which only the tests call: the trainer sees nothing but the database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from demo.rater import ScriptedRater
from demo.tasks import TaskGenerator
from server.engine import SamplingParams
from server.engine.offline import generate
from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import session
from shared.schema import User
from shared.store import LoggedChoice, log_completion
from shared.tokenizer import apply_chat_template
from shared.votes import record_feedback, record_ranking
from trainer.config import TrainerConfig
from trainer.loop import TrainerContext


def tiny_config(**overrides) -> TrainerConfig:
    """A round that takes seconds on a tiny model."""
    base = dict(
        settle_seconds=0.0,
        min_new_feedback=8,
        rm_epochs=1,
        rm_max_steps=3,
        rm_batch_size=8,
        ppo_iterations=1,
        ppo_rollouts=8,
        ppo_epochs=1,
        ppo_minibatch=4,
        value_warmup_steps=1,
        max_new_tokens=12,
        pref_max_steps=3,
        pref_batch_size=8,
        dpo_rm_prompts=4,
        gate_prompts=6,
        gate_safety_prompts=4,
        gate_max_new_tokens=12,
        threads=1,
    )
    return TrainerConfig.from_flat(**{**base, **overrides})


@dataclass
class DataDir:
    settings: Settings
    ctx: TrainerContext
    user_id: int

    @property
    def root(self) -> Path:
        return self.settings.data_dir


def make_data_dir(root: Path, seed_dir: Path) -> DataDir:
    """A data dir under ``root`` holding the policy at ``seed_dir`` and one simulated user."""
    settings = Settings(data_dir=root)
    PolicyRegistry(settings.registry_dir).install(seed_dir)
    ctx = TrainerContext.from_settings(settings)
    with session(ctx.engine) as s:
        user = User(name="sim")
        s.add(user)
        s.flush()
        user_id = user.id
    return DataDir(settings, ctx, user_id)


def add_feedback(
    dd: DataDir,
    n_prompts: int = 8,
    n_candidates: int = 2,
    seed: int = 0,
    version: str = "v1",
    rank: bool = True,
) -> list[str]:
    """Sample candidates from ``version``, log them, thumb every one and rank each set.
    Returns the completion ids."""
    policy = dd.ctx.registry.load(version)
    rater = ScriptedRater("courteous")
    tasks = list(TaskGenerator(seed).iter_tasks(n_prompts, split="train"))
    convs = [t.messages for t in tasks for _ in range(n_candidates)]
    prompts = [apply_chat_template(policy.tokenizer, c, add_generation_prompt=True) for c in convs]
    params = SamplingParams(temperature=1.0, max_tokens=12)
    replies = [d.text for d in generate(policy.model, policy.tokenizer, prompts, params, seed=seed)]
    ids = []
    for i, task in enumerate(tasks):
        cands = replies[i * n_candidates : (i + 1) * n_candidates]
        # the scripted users write courteous replies of their own now and then, so that the
        # random tiny policy's feedback has a clear preference in it
        cands[0] = task.replies["courteous"]
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        log_completion(
            dd.ctx.engine,
            user_id=dd.user_id,
            completion_id=cid,
            messages=task.messages,
            choices=[LoggedChoice(j, r, "stop", None) for j, r in enumerate(cands)],
            prompt_tokens=None,
            policy_version=version,
            sampling_params={"temperature": 1.0},
            latency_ms=None,
        )
        for j, reply in enumerate(cands):
            record_feedback(
                dd.ctx.engine,
                user_id=dd.user_id,
                completion_id=cid,
                choice_index=j,
                rating=rater.thumb(task.messages, reply),
            )
        if rank and n_candidates >= 2:
            order = rater.rank(task.messages, cands)
            record_ranking(dd.ctx.engine, user_id=dd.user_id, completion_id=cid, ranking=order)
        ids.append(cid)
    return ids
