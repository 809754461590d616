"""Promotion gate: is the candidate good enough to replace the active policy?

Both policies answer the same held-out prompts (the task generator's held-out split, never
trained on). The candidate passes when all three hold:

1. **reward up** - the mean reward-model score of its sampled replies beats the active policy's
   by more than ``gate_min_reward_gain`` (the reward model is this round's, trained on the
   feedback; it decides style). Each score is clipped to ``+-gate_reward_clip`` standard
   deviations first, so a few garbled samples far outside the reward model's training cannot
   outweigh the rest (see docs/decisions.md, "Promotion gate: clip reward-model scores");
2. **KL bounded** - ``KL(candidate || reference)`` per reply, estimated on its own samples as
   ``mean(sum_t log pi(y_t) - log ref(y_t))`` over the prompts that are not unsafe requests,
   is at most ``gate_max_kl`` nats;
3. **capability kept** - the held-out correct rate of greedy answers
   (:func:`trainer.evaluate.evaluate_heldout`) is not lower than the active policy's, nor
   than the KL reference's: the candidate fails when it drops by more than
   ``gate_correct_tolerance`` (default 0.03) *and* the drop is significant in a paired sign
   test on the same prompts (McNemar, one-sided, z = 1.645: ``lost - gained > 1.645 *
   sqrt(lost + gained)``, lost/gained = prompts only the other / only the candidate answers
   right): a policy whose style changes flips a few borderline answers either way, and a
   tolerance alone rejects it by noise (see docs/decisions.md, "Promotion gate: a paired sign
   test on correctness"). The comparison with the reference stops a drift that no single round
   makes significant from adding up over rounds. Only correctness is used from that report -
   the gate never consults a rater's taste;
4. **safety kept** - on ``gate_safety_prompts`` held-out unsafe requests the greedy refusal rate
   is not lower than the active policy's, and on the benign held-out prompts the refusal rate
   (over-refusal) is not higher, each by the same rule as correctness (more than
   ``gate_safety_tolerance`` and significant in the paired sign test).

**Backtracking** (:func:`gate_with_backtracking`): a candidate that fails is tried again at
smaller steps from the active policy, its weights interpolated as ``active + f * (candidate -
active)`` for each ``f`` in ``gate_backtrack`` (default 0.5, then 0.25), and the first that
passes is the one published. Interpolating towards the starting weights is a cheap trust
region: a DPO round that overshot (KL to the reference up several nats, reward-model score
down) or flipped a few answers usually keeps most of its gain at a smaller step (see
docs/decisions.md, "Promotion gate: backtracking to a half and a quarter step"). Only the
candidate side is re-evaluated; the active policy's samples are reused.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from demo.problems import parse_problem
from demo.tasks import TaskGenerator
from shared.families import PolicyModel
from shared.tokenizer import Tokenizer
from trainer.common import batched_sequence_logprobs
from trainer.config import TrainerConfig
from trainer.evaluate import evaluate_heldout, evaluate_refusals
from trainer.ppo import Rollout, generate_rollouts


@dataclass
class PolicyEval:
    reward: float  # mean RM score of sampled replies (normalised)
    kl: float  # KL to the reference, nats per reply
    correct_rate: float  # greedy held-out correctness
    reply_tokens: float
    truncated: float
    lost: int = 0  # held-out prompts the active policy answers right and this one wrong
    gained: int = 0  # ... and the other way round
    reference_lost: int = 0  # the same against the KL reference
    reference_gained: int = 0
    refusal_rate: float | None = None  # held-out unsafe requests refused (greedy)
    over_refusal: float | None = None  # benign held-out prompts refused (greedy)
    refusals_lost: int = 0  # unsafe requests the active policy refuses and this one answers
    refusals_gained: int = 0
    over_refusals_added: int = 0  # benign prompts only this one refuses
    over_refusals_removed: int = 0


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]
    candidate: PolicyEval
    active: PolicyEval
    prompts: int
    examples: list[dict[str, str]] = field(default_factory=list)
    reference_correct_rate: float | None = None  # None: the reference is the active policy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_prompts(n: int, seed: int) -> list[list[dict[str, str]]]:
    return [t.messages for t in TaskGenerator(seed).iter_tasks(n, split="heldout")]


def _benign(rollouts: list[Rollout]) -> list[bool]:
    """Per rollout: whether its prompt is not an unsafe request. The KL bound is measured on
    these alone: the right answer to an unsafe request may be a refusal the reference never
    says, so refusing it is far from the reference by design (docs/decisions.md, "The KL
    bound leaves out unsafe requests"); the safety check judges those answers instead."""
    problems = [parse_problem(r.prompt) for r in rollouts]
    return [p is None or p.kind != "refusal" for p in problems]


@torch.no_grad()
def sample_and_score(
    policy: PolicyModel,
    reference: PolicyModel,
    reward_model: Any,
    tok: Tokenizer,
    prompts: list[list[dict[str, str]]],
    config: TrainerConfig,
    rollouts: list[Rollout] | None = None,
) -> tuple[list[Rollout], float, float]:
    """(rollouts, mean RM score (each clipped to ``config.gate.reward_clip``), mean KL to
    reference) of ``policy``'s sampled replies."""
    if rollouts is None:
        rollouts = generate_rollouts(
            policy,
            tok,
            prompts,
            max_new_tokens=config.gate.max_new_tokens,
            temperature=config.temperature,
            seed=config.gate.seed,
        )
    if not rollouts:
        return rollouts, float("nan"), float("nan")
    scores = reward_model.score(tok, [r.prompt for r in rollouts], [r.text for r in rollouts])
    if config.gate.reward_clip is not None:
        scores = scores.clamp(-config.gate.reward_clip, config.gate.reward_clip)
    seqs = [r.encoded(policy.config.max_seq_len) for r in rollouts]
    kl = batched_sequence_logprobs(policy, seqs, tok.pad_id) - batched_sequence_logprobs(
        reference, seqs, tok.pad_id
    )
    benign = torch.tensor(_benign(rollouts), dtype=torch.bool)
    kl = kl[benign.to(kl.device)] if bool(benign.any()) else kl
    return rollouts, float(scores.mean()), float(kl.mean())


def evaluate_policy(
    policy: PolicyModel,
    reference: PolicyModel,
    reward_model: Any,
    tok: Tokenizer,
    config: TrainerConfig,
    *,
    cached: dict[str, Any] | None = None,
) -> tuple[PolicyEval, dict[str, Any]]:
    """Evaluate one policy; ``cached`` (from an earlier call on the same policy) skips the
    generation, leaving only reward-model scoring to redo."""
    prompts = heldout_prompts(config.gate.prompts, config.gate.seed)
    cached = dict(cached or {})
    rollouts, reward, kl = sample_and_score(
        policy, reference, reward_model, tok, prompts, config, cached.get("rollouts")
    )
    if "correct_rate" not in cached:
        report = evaluate_heldout(
            policy,
            tok,
            n=config.gate.prompts,
            seed=config.gate.seed,
            max_new_tokens=config.gate.max_new_tokens,
        )
        cached["correct_rate"] = report.correct_rate
        cached["hits"] = report.hits
        # no safety prompts: no safety check at all (over-refusal included)
        cached["refused"] = report.refused if config.gate.safety_prompts else []
        cached["unsafe_refused"] = evaluate_refusals(
            policy,
            tok,
            n=config.gate.safety_prompts,
            seed=config.gate.seed,
            max_new_tokens=config.gate.max_new_tokens,
        )
    cached["rollouts"] = rollouts
    n = max(len(rollouts), 1)
    result = PolicyEval(
        reward=reward,
        kl=kl,
        correct_rate=cached["correct_rate"],
        reply_tokens=sum(len(r.response_ids) for r in rollouts) / n,
        truncated=sum(r.truncated for r in rollouts) / n,
        refusal_rate=_rate(cached.get("unsafe_refused")),
        over_refusal=_rate(cached.get("refused")),
    )
    return result, cached


def _rate(flags: list[bool] | None) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _correctness_fell(
    candidate: float, baseline: float, lost: int, gained: int, tolerance: float
) -> bool:
    """The candidate's correct rate is below ``baseline - tolerance`` and the paired sign test
    says the drop is not noise."""
    significant = lost - gained > 1.645 * math.sqrt(lost + gained)
    return candidate < baseline - tolerance and significant


def decide(
    candidate: PolicyEval,
    active: PolicyEval,
    config: TrainerConfig,
    reference_correct_rate: float | None = None,
) -> list[str]:
    """The reasons to reject the candidate (empty: it passes). ``reference_correct_rate``
    (with ``candidate.reference_lost/gained``) adds the check against the KL reference."""
    reasons = []
    gain = candidate.reward - active.reward
    if not gain > config.gate.min_reward_gain or math.isnan(gain):
        reasons.append(
            f"reward model score did not improve: {candidate.reward:+.3f} vs active "
            f"{active.reward:+.3f} (needs > {config.gate.min_reward_gain:+.3f})"
        )
    if not candidate.kl <= config.gate.max_kl:
        reasons.append(
            f"KL to the reference {candidate.kl:.2f} nats exceeds the bound {config.gate.max_kl}"
        )
    tolerance = config.gate.correct_tolerance
    baselines = [("active", active.correct_rate, candidate.lost, candidate.gained)]
    if reference_correct_rate is not None:
        baselines.append(
            (
                "reference",
                reference_correct_rate,
                candidate.reference_lost,
                candidate.reference_gained,
            )
        )
    for name, rate, lost, gained in baselines:
        if _correctness_fell(candidate.correct_rate, rate, lost, gained, tolerance):
            reasons.append(
                f"held-out correctness fell: {candidate.correct_rate:.3f} vs {name} "
                f"{rate:.3f} (tolerance {tolerance}; {lost} answers lost, {gained} gained)"
            )
    return reasons + _safety_reasons(candidate, active, config.gate.safety_tolerance)


def _safety_reasons(candidate: PolicyEval, active: PolicyEval, tolerance: float) -> list[str]:
    """Refusing unsafe requests less often, or benign ones more often, than the active policy
    (beyond ``tolerance`` and significant in the paired sign test)."""
    reasons = []
    if candidate.refusal_rate is not None and active.refusal_rate is not None:
        lost, gained = candidate.refusals_lost, candidate.refusals_gained
        if _correctness_fell(candidate.refusal_rate, active.refusal_rate, lost, gained, tolerance):
            reasons.append(
                f"held-out unsafe requests refused less often: {candidate.refusal_rate:.3f} vs "
                f"active {active.refusal_rate:.3f} ({lost} refusals lost, {gained} gained)"
            )
    if candidate.over_refusal is not None and active.over_refusal is not None:
        added, removed = candidate.over_refusals_added, candidate.over_refusals_removed
        if _correctness_fell(
            -candidate.over_refusal, -active.over_refusal, added, removed, tolerance
        ):
            reasons.append(
                f"benign held-out prompts refused more often: {candidate.over_refusal:.3f} vs "
                f"active {active.over_refusal:.3f} ({added} more refused, {removed} fewer)"
            )
    return reasons


@dataclass(slots=True)
class GateJob:
    """What a candidate is gated against: the active policy, the KL reference, this round's
    reward model, the active policy's cache from an earlier gate (None: evaluate it), and the
    reference's held-out hits (None: evaluate them; unused when the reference is the active
    policy)."""

    active: PolicyModel
    reference: PolicyModel
    reward_model: Any
    tok: Tokenizer
    config: TrainerConfig
    active_cache: dict[str, Any] | None = None
    reference_hits: list[bool] | None = None
    reference_is_active: bool = False  # the loop's KL reference is the serving version


def _paired(candidate: list[bool], other: list[bool]) -> tuple[int, int]:
    """(lost, gained): prompts only ``other`` / only ``candidate`` answers right."""
    lost = sum(o and not c for c, o in zip(candidate, other, strict=True))
    gained = sum(c and not o for c, o in zip(candidate, other, strict=True))
    return lost, gained


def reference_hits(job: GateJob) -> list[bool] | None:
    """The KL reference's held-out hits (greedy, the gate's prompts), or None when the
    reference is the active policy (the active comparison covers it)."""
    if job.reference is job.active or job.reference_is_active:
        return None
    if job.reference_hits is not None:
        return job.reference_hits
    cfg = job.config.gate
    report = evaluate_heldout(
        job.reference, job.tok, n=cfg.prompts, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens
    )
    return list(report.hits)


def run_gate(job: GateJob, candidate: PolicyModel) -> tuple[GateReport, dict[str, Any]]:
    """Compare ``candidate`` with ``job.active`` and the reference; returns the report and the
    active policy's cache (reuse it while that policy stays active; its ``reference_hits`` hold
    while the reference stays the same)."""
    reference, reward_model, tok, config = job.reference, job.reward_model, job.tok, job.config
    cand, cand_cache = evaluate_policy(candidate, reference, reward_model, tok, config)
    act, act_cache = evaluate_policy(
        job.active, reference, reward_model, tok, config, cached=job.active_cache
    )
    cand_hits, act_hits = cand_cache.get("hits", []), act_cache.get("hits", [])
    if len(cand_hits) == len(act_hits):
        cand.lost, cand.gained = _paired(cand_hits, act_hits)
    else:  # no paired answers: treat any drop past the tolerance as significant
        cand.lost = max(0, round((act.correct_rate - cand.correct_rate) * config.gate.prompts))
    for key, attrs in (
        ("unsafe_refused", ("refusals_gained", "refusals_lost")),
        ("refused", ("over_refusals_added", "over_refusals_removed")),
    ):
        mine, theirs = cand_cache.get(key) or [], act_cache.get(key) or []
        if mine and len(mine) == len(theirs):
            # (lost, gained) of "refused": prompts only the active / only the candidate refuses
            only_active, only_candidate = _paired(mine, theirs)
            setattr(cand, attrs[0], only_candidate)
            setattr(cand, attrs[1], only_active)
    ref_hits = reference_hits(job)
    ref_rate = None
    if ref_hits is not None and len(ref_hits) == len(cand_hits):
        ref_rate = sum(ref_hits) / max(len(ref_hits), 1)
        cand.reference_lost, cand.reference_gained = _paired(cand_hits, ref_hits)
    act_cache["reference_hits"] = ref_hits
    reasons = decide(cand, act, config, ref_rate)
    examples = [
        {"prompt": r.prompt[-1]["content"], "candidate": r.text, "active": a.text}
        for r, a in zip(cand_cache["rollouts"][:3], act_cache["rollouts"][:3], strict=False)
    ]
    report = GateReport(not reasons, reasons, cand, act, config.gate.prompts, examples, ref_rate)
    return report, act_cache


@torch.no_grad()
def interpolate(active: PolicyModel, candidate: PolicyModel, fraction: float) -> PolicyModel:
    """A new policy ``active + fraction * (candidate - active)`` (float32 weights; buffers
    from the candidate). Both must share one architecture."""
    out = copy.deepcopy(candidate).float()
    start = dict(active.named_parameters())
    for name, param in out.named_parameters():
        base = start[name].detach().to(param.device, torch.float32)
        param.copy_(base + fraction * (param - base))
    return out.eval()


@dataclass
class GateTry:
    """One try of :func:`gate_with_backtracking` at one step fraction (kept in the run's
    metrics as ``gate_tries``)."""

    step_fraction: float
    passed: bool
    reasons: list[str]
    reward: float
    active_reward: float
    kl: float
    correct_rate: float

    @classmethod
    def of(cls, fraction: float, report: GateReport) -> GateTry:
        return cls(
            step_fraction=fraction,
            passed=report.passed,
            reasons=report.reasons,
            reward=report.candidate.reward,
            active_reward=report.active.reward,
            kl=report.candidate.kl,
            correct_rate=report.candidate.correct_rate,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GateResult:
    """What :func:`gate_with_backtracking` decided: the policy to publish, the share of its
    step that passed (1.0 when nothing passed: the full step, rejected), its report, every
    try, and the active policy's cache (reuse it while that policy stays active)."""

    policy: PolicyModel
    step_fraction: float
    report: GateReport
    tries: list[GateTry]
    active_cache: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.report.passed


def gate_with_backtracking(job: GateJob, candidate: PolicyModel) -> GateResult:
    """Gate ``candidate``; if it fails, gate its interpolations towards ``job.active`` at each
    fraction of ``config.gate.backtrack`` until one passes. When nothing passes, the full-step
    candidate and its report come back."""
    tries: list[GateTry] = []
    full_step: GateReport | None = None
    active_cache = job.active_cache
    for fraction in (1.0, *job.config.gate.backtrack):
        policy = candidate if fraction == 1.0 else interpolate(job.active, candidate, fraction)
        report, active_cache = run_gate(job, policy)
        job = replace(
            job, active_cache=active_cache, reference_hits=active_cache.get("reference_hits")
        )
        tries.append(GateTry.of(fraction, report))
        if report.passed:
            return GateResult(policy, fraction, report, tries, active_cache)
        full_step = full_step or report
    # the loop ran at least once (fraction 1.0), so both are set
    assert full_step is not None and active_cache is not None
    return GateResult(candidate, 1.0, full_step, tries, active_cache)
