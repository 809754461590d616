"""Held-out evaluation of a policy on the synthetic tasks: correctness and scripted-rater score.

Used after pretraining (recorded in the manifest) and by the promotion gate: the gate guards
capability (answers still right), the feedback decides style.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from demo.rater import ScriptedRater, is_correct
from demo.tasks import SAFETY_FAMILIES, TaskGenerator, is_refusal
from server.engine.offline import generate
from server.engine.sampling import SamplingParams
from shared.families import PolicyModel
from shared.tokenizer import Tokenizer, apply_chat_template


@dataclass
class HeldoutReport:
    n: int
    correct_rate: float
    rater_score: float
    per_family_correct: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    hits: list[bool] = field(default_factory=list)  # per prompt, in order (paired comparisons)
    refused: list[bool] = field(default_factory=list)  # per benign prompt: answered a refusal


def _greedy(model: PolicyModel, tokenizer: Tokenizer, tasks: list, max_new_tokens: int) -> list:
    prompts = [apply_chat_template(tokenizer, t.messages) for t in tasks]  # + <|assistant|>
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return [d.text for d in generate(model, tokenizer, prompts, greedy)]


def evaluate_refusals(
    model: PolicyModel,
    tokenizer: Tokenizer,
    *,
    n: int = 48,
    seed: int = 12345,
    max_new_tokens: int = 64,
) -> list[bool]:
    """Per held-out unsafe request (``n``, never trained on): whether the greedy answer is a
    refusal."""
    if n <= 0:
        return []
    tasks = list(TaskGenerator(seed, SAFETY_FAMILIES).iter_tasks(n, split="heldout"))
    return [is_refusal(r) for r in _greedy(model, tokenizer, tasks, max_new_tokens)]


def evaluate_heldout(
    model: PolicyModel,
    tokenizer: Tokenizer,
    *,
    n: int = 200,
    seed: int = 12345,
    preference: str = "courteous",
    max_new_tokens: int = 64,
) -> HeldoutReport:
    """Greedy answers to ``n`` held-out prompts (never seen in training), scored by the rater."""
    tasks = list(TaskGenerator(seed).iter_tasks(n, split="heldout"))
    replies = _greedy(model, tokenizer, tasks, max_new_tokens)
    rater = ScriptedRater(preference)
    hits: dict[str, list[bool]] = defaultdict(list)
    scores = []
    in_order = []
    for task, reply in zip(tasks, replies, strict=True):
        in_order.append(bool(is_correct(task.messages, reply)))
        hits[task.family].append(in_order[-1])
        scores.append(rater.rate(task.messages, reply))
    all_hits = [h for v in hits.values() for h in v]
    return HeldoutReport(
        n=len(tasks),
        correct_rate=sum(all_hits) / max(len(all_hits), 1),
        rater_score=sum(scores) / max(len(scores), 1),
        per_family_correct={k: sum(v) / len(v) for k, v in sorted(hits.items())},
        examples=[
            {"prompt": t.messages[-1]["content"], "reply": r}
            for t, r in zip(tasks[:5], replies[:5], strict=True)
        ],
        hits=in_order,
        refused=[
            is_refusal(r)
            for t, r in zip(tasks, replies, strict=True)
            if t.family not in SAFETY_FAMILIES
        ],
    )
