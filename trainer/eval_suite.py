"""The evaluation suite behind ``palmchat eval``: what a policy gets right, refuses and pleases.

On fresh prompts of every task family it measures greedy correctness on held-out prompts
(``"heldout"``: never trained on, in trained phrasings) and on held-out phrasings
(``"phrasing"``), temperature-1 correctness on the held-out prompts (seeded, so a rerun gives
the same figures), the refusal rate on unsafe requests, over-refusal on benign ones and the
scripted tastes' thumbs-up rates. :func:`score_replies` scores given replies (no model), so the
figures can be checked on the corpus's own replies.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from demo.problems import parse_problem
from demo.rater import ScriptedRater
from demo.tasks import FAMILIES, SAFETY_FAMILIES, Task, TaskGenerator, is_correct, is_refusal
from server.engine.offline import generate
from server.engine.sampling import SamplingParams
from shared.families import PolicyModel
from shared.moderation import MIN_REPLY_WORDS, MIN_WORDS, Classifier
from shared.tokenizer import Tokenizer, apply_chat_template

# the simulated users' tastes; "correct" is correctness itself, reported on its own
TASTES: tuple[str, ...] = ("courteous", "concise")
# name of each measured run: (split, temperature)
RUNS: dict[str, tuple[str, float]] = {
    "greedy_heldout": ("heldout", 0.0),
    "greedy_phrasing": ("phrasing", 0.0),
    "t1_heldout": ("heldout", 1.0),
}
CHUNK = 128  # prompts per engine batch: fixed, so seeded sampling repeats exactly
EXAMPLES_PER_FAMILY = 2

Progress = Callable[[str, int, int], None]  # (run name, prompts done, prompts in the run)


def _rate(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


@dataclass
class ReplyScores:
    """Scores of one reply per task. Rates are None where no task counts towards them."""

    n: int
    counts: dict[str, int]  # tasks per family
    per_family: dict[str, float]  # correct per family (for a safety family: refused)
    correct_rate: float | None  # over the non-safety families
    lowest_family: str | None  # the non-safety family with the lowest correct rate
    lowest_rate: float | None
    refusal_rate: float | None  # safety tasks answered with a refusal
    refusal_by_category: dict[str, float]
    over_refusal: float | None  # benign (non-safety) tasks answered with a refusal
    thumbs_up: dict[str, float] = field(default_factory=dict)  # taste -> share, benign tasks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_replies(
    tasks: Sequence[Task], replies: Sequence[str], *, tastes: Sequence[str] = TASTES
) -> ReplyScores:
    """Score ``replies[i]`` as the answer to ``tasks[i]`` (text only, no model)."""
    if len(tasks) != len(replies):
        raise ValueError(f"{len(tasks)} tasks but {len(replies)} replies")
    raters = {t: ScriptedRater(t) for t in tastes}
    correct: dict[str, list[bool]] = defaultdict(list)
    refused: dict[str, list[bool]] = defaultdict(list)  # safety tasks, by category
    benign_refused: list[bool] = []
    thumbs: dict[str, list[bool]] = {t: [] for t in tastes}
    for task, reply in zip(tasks, replies, strict=True):
        correct[task.family].append(is_correct(task.messages, reply) is True)
        if task.family in SAFETY_FAMILIES:
            problem = parse_problem(task.messages)
            refused[problem.category if problem else ""].append(is_refusal(reply))
            continue
        benign_refused.append(is_refusal(reply))
        for taste, rater in raters.items():
            thumbs[taste].append(rater.thumb(task.messages, reply) == 1)
    per_family = {f: sum(h) / len(h) for f, h in sorted(correct.items())}
    benign = {f: r for f, r in per_family.items() if f not in SAFETY_FAMILIES}
    lowest = min(benign, key=lambda f: (benign[f], f)) if benign else None
    all_refused = [r for hits in refused.values() for r in hits]
    return ReplyScores(
        n=len(tasks),
        counts={f: len(h) for f, h in sorted(correct.items())},
        per_family=per_family,
        correct_rate=_rate([h for f, hs in correct.items() if f in benign for h in hs]),
        lowest_family=lowest,
        lowest_rate=None if lowest is None else benign[lowest],
        refusal_rate=_rate(all_refused),
        refusal_by_category={c: sum(h) / len(h) for c, h in sorted(refused.items())},
        over_refusal=_rate(benign_refused),
        thumbs_up={t: sum(h) / len(h) for t, h in thumbs.items() if h},
    )


@dataclass
class SuiteReport:
    """Every run's scores plus what was measured: see :func:`evaluate_suite`."""

    version: str | None
    num_params: int
    per_family: int
    seed: int
    max_new_tokens: int
    runs: dict[str, ReplyScores]
    skipped: dict[str, dict[str, str]]  # run -> family -> why it has no prompts there
    examples: dict[str, list[dict[str, Any]]]  # family -> a few prompts with their replies
    tokens: int  # generated, all runs together
    seconds: float
    # with a classifier (``palmchat eval --safety``): the shares of the held-out requests and of
    # the policy's replies to them that moderation flags, unsafe and benign apart
    moderation: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The headline figures (correctness over the non-safety families)."""
        g, p, t = (self.runs[k] for k in RUNS)
        return {
            "greedy_heldout_correct": g.correct_rate,
            "greedy_heldout_lowest": {"family": g.lowest_family, "correct": g.lowest_rate},
            "greedy_phrasing_correct": p.correct_rate,
            "t1_heldout_correct": t.correct_rate,
            "refusal": {"greedy": g.refusal_rate, "t1": t.refusal_rate},
            "refusal_by_category": {
                c: {"greedy": r, "t1": t.refusal_by_category.get(c)}
                for c, r in g.refusal_by_category.items()
            },
            "over_refusal": {"greedy": g.over_refusal, "t1": t.over_refusal},
            "thumbs_up": {
                taste: {"greedy": g.thumbs_up.get(taste), "t1": t.thumbs_up.get(taste)}
                for taste in t.thumbs_up
            },
        }

    def table(self) -> dict[str, dict[str, float | None]]:
        """Family -> run -> correct rate (None where the run has no prompts of it)."""
        seen = {f for s in self.runs.values() for f in s.per_family}
        ordered = [f for f in FAMILIES if f in seen] + sorted(seen - set(FAMILIES))
        return {f: {k: s.per_family.get(f) for k, s in self.runs.items()} for f in ordered}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "num_params": self.num_params,
            "per_family": self.per_family,
            "seed": self.seed,
            "max_new_tokens": self.max_new_tokens,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "summary": self.summary(),
            "families": self.table(),
            "runs": {k: s.to_dict() for k, s in self.runs.items()},
            "skipped": self.skipped,
            "examples": self.examples,
            **({"moderation": self.moderation} if self.moderation is not None else {}),
        }


def suite_tasks(
    per_family: int, seed: int, split: str, families: Sequence[str] = FAMILIES
) -> tuple[list[Task], dict[str, str]]:
    """``per_family`` fresh tasks of each family from ``split``, and the families skipped
    (no prompts in that split) with why. Each family draws from its own seeded stream, so
    adding a family leaves the others' prompts unchanged."""
    tasks: list[Task] = []
    skipped: dict[str, str] = {}
    for family in families:
        stream = TaskGenerator(zlib.crc32(f"eval-{seed}-{split}-{family}".encode()))
        try:
            tasks += list(stream.iter_tasks(per_family, split=split, family=family))
        except RuntimeError as e:  # the family has no prompts in this split
            skipped[family] = str(e)
    return tasks, skipped


def _replies(
    model: PolicyModel,
    tokenizer: Tokenizer,
    tasks: Sequence[Task],
    params: SamplingParams,
    seed: int,
    report: Callable[[int], None],
) -> tuple[list[str], int]:
    """The replies to ``tasks`` in fixed-size batches, and the tokens generated."""
    prompts = [apply_chat_template(tokenizer, t.messages) for t in tasks]
    replies: list[str] = []
    tokens = 0
    for start in range(0, len(prompts), CHUNK):
        done = generate(model, tokenizer, prompts[start : start + CHUNK], params, seed=seed + start)
        replies += [d.text for d in done]
        tokens += sum(len(d.token_ids) for d in done)
        report(len(replies))
    return replies, tokens


def evaluate_suite(
    model: PolicyModel,
    tokenizer: Tokenizer,
    *,
    per_family: int = 40,
    seed: int = 2024,
    max_new_tokens: int = 96,
    families: Sequence[str] | None = None,
    version: str | None = None,
    progress: Progress | None = None,
    classifier: Classifier | None = None,
) -> SuiteReport:
    """Greedy and temperature-1 replies of ``model`` to ``per_family`` fresh prompts per family
    and split (see the module docstring), scored by :func:`score_replies`; with a moderation
    ``classifier``, its flag rates too (:func:`moderation_rates`)."""
    if per_family < 1:
        raise ValueError(f"per_family must be >= 1, got {per_family}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    families = tuple(families or FAMILIES)
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; expected some of {FAMILIES}")
    started = time.perf_counter()
    by_split = {s: suite_tasks(per_family, seed, s, families) for s in ("heldout", "phrasing")}
    runs: dict[str, ReplyScores] = {}
    replies: dict[str, list[str]] = {}
    tokens = 0
    for name, (split, temperature) in RUNS.items():
        tasks = by_split[split][0]
        params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens)

        def report(done: int, name: str = name, total: int = len(tasks)) -> None:
            if progress is not None:
                progress(name, done, total)

        replies[name], used = _replies(model, tokenizer, tasks, params, seed, report)
        tokens += used
        runs[name] = score_replies(tasks, replies[name])
    return SuiteReport(
        version=version,
        num_params=model.num_params(),
        per_family=per_family,
        seed=seed,
        max_new_tokens=max_new_tokens,
        runs=runs,
        skipped={k: by_split[split][1] for k, (split, _) in RUNS.items() if by_split[split][1]},
        examples=_examples(by_split, replies),
        tokens=tokens,
        seconds=time.perf_counter() - started,
        moderation=(
            None
            if classifier is None
            else {
                run: moderation_rates(by_split[RUNS[run][0]][0], replies[run], classifier)
                for run in ("greedy_heldout", "t1_heldout")
            }
        ),
    )


def moderation_rates(
    tasks: Sequence[Task], replies: Sequence[str], classifier: Classifier
) -> dict[str, Any]:
    """The shares of unsafe and of benign requests that ``classifier`` flags (as the serving
    hook checks a request), and of the replies to each (as it checks a finished reply)."""
    requests = [t.messages[-1]["content"] for t in tasks]
    asked = classifier.classify(requests, MIN_WORDS)
    answered = classifier.classify(list(replies), MIN_REPLY_WORDS)
    unsafe = [t.family in SAFETY_FAMILIES for t in tasks]

    def share(verdicts: list[Any], want_unsafe: bool) -> float | None:
        picked = [v.flagged for v, u in zip(verdicts, unsafe, strict=True) if u == want_unsafe]
        return _rate(picked)

    return {
        "classifier": classifier.version,
        "requests_flagged": {"unsafe": share(asked, True), "benign": share(asked, False)},
        "replies_flagged": {
            "to_unsafe": share(answered, True),
            "to_benign": share(answered, False),
        },
    }


def _examples(
    by_split: dict[str, tuple[list[Task], dict[str, str]]], replies: dict[str, list[str]]
) -> dict[str, list[dict[str, Any]]]:
    """The first few held-out prompts of each family with the greedy and T=1 replies, and
    the first held-out phrasing with its greedy reply."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for split, runs, limit in (
        ("heldout", ("greedy_heldout", "t1_heldout"), EXAMPLES_PER_FAMILY),
        ("phrasing", ("greedy_phrasing",), 1),
    ):
        for i, task in enumerate(by_split[split][0]):
            if sum(e["split"] == split for e in out[task.family]) >= limit:
                continue
            example: dict[str, Any] = {"split": split, "messages": task.messages}
            for run in runs:
                reply = replies[run][i]
                example[run] = {"reply": reply, "correct": is_correct(task.messages, reply)}
            out[task.family].append(example)
    return dict(out)
