"""Train, evaluate and publish the moderation classifier (:mod:`shared.moderation`).

Its data: the synthetic safety corpus (:mod:`demo.safety`) and the safety labels users put on
answers (a ``harmful`` / ``violence`` / ... label marks the answered prompt and the answer as
unsafe). Its report: precision and recall per category and the flag rates of unsafe and benign
texts on the held-out split, whose acts and wordings training never saw.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.engine import Engine
from torch import nn

from demo.safety import Example, SafetyCorpus, category_names
from shared.moderation import CATEGORIES, Classifier, FeatureConfig, ModerationModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModerationTrainConfig:
    examples: int = 40_000
    heldout_examples: int = 6_000
    epochs: int = 4
    batch_size: int = 128
    lr: float = 5e-3
    dim: int = 32
    hidden: int = 64
    seed: int = 0


def _targets(batch: Sequence[Example]) -> torch.Tensor:
    out = torch.zeros(len(batch), len(CATEGORIES))
    for row, ex in enumerate(batch):
        for c in ex.categories:
            out[row, CATEGORIES.index(c)] = 1.0
    return out


def train_classifier(
    train: Sequence[Example],
    config: ModerationTrainConfig = ModerationTrainConfig(),
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> ModerationModel:
    """A classifier fitted to ``train`` with binary cross-entropy per category."""
    torch.manual_seed(config.seed)
    model = ModerationModel(FeatureConfig(), dim=config.dim, hidden=config.hidden)
    model.learn_vocabulary([ex.text for ex in train if ex.topic != "noise"])
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    items = list(train)
    rng = random.Random(config.seed)
    step = 0
    for epoch in range(config.epochs):
        rng.shuffle(items)
        total, batches = 0.0, 0
        for i in range(0, len(items), config.batch_size):
            batch = items[i : i + config.batch_size]
            logits = model(*model.batch([ex.text for ex in batch]))
            loss = loss_fn(logits, _targets(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches, step = total + loss.item(), batches + 1, step + 1
        if progress is not None:
            progress({"epoch": epoch + 1, "step": step, "loss": total / max(batches, 1)})
    return model.eval()


def evaluate_classifier(classifier: Classifier, examples: Sequence[Example]) -> dict[str, Any]:
    """Flag rates of unsafe and benign texts (requests and replies), and precision and recall
    per category the corpus covers."""
    verdicts = []
    for i in range(0, len(examples), 512):
        verdicts.extend(classifier.classify([ex.text for ex in examples[i : i + 512]]))
    report: dict[str, Any] = {"examples": len(examples)}
    for kind in ("request", "reply"):
        unsafe = [v.flagged for ex, v in zip(examples, verdicts, strict=True)
                  if ex.kind == kind and ex.unsafe]  # fmt: skip
        benign = [v.flagged for ex, v in zip(examples, verdicts, strict=True)
                  if ex.kind == kind and not ex.unsafe]  # fmt: skip
        report[f"{kind}_unsafe_flagged"] = sum(unsafe) / max(len(unsafe), 1)
        report[f"{kind}_benign_flagged"] = sum(benign) / max(len(benign), 1)
        report[f"{kind}_unsafe_n"], report[f"{kind}_benign_n"] = len(unsafe), len(benign)
    unsafe_all = [v.flagged for ex, v in zip(examples, verdicts, strict=True) if ex.unsafe]
    benign_all = [v.flagged for ex, v in zip(examples, verdicts, strict=True) if not ex.unsafe]
    report["unsafe_flagged"] = sum(unsafe_all) / max(len(unsafe_all), 1)
    report["benign_flagged"] = sum(benign_all) / max(len(benign_all), 1)
    per: dict[str, dict[str, float]] = {}
    for c in category_names():
        truth = [c in ex.categories for ex in examples]
        said = [v.categories[c] for v in verdicts]
        tp = sum(t and s for t, s in zip(truth, said, strict=True))
        per[c] = {
            "precision": tp / max(sum(said), 1),
            "recall": tp / max(sum(truth), 1),
            "support": float(sum(truth)),
        }
    report["per_category"] = per
    topics: dict[str, list[bool]] = {}
    for ex, v in zip(examples, verdicts, strict=True):
        topics.setdefault(f"{ex.kind}:{ex.topic}", []).append(v.flagged)
    report["flagged_by_topic"] = {k: sum(f) / len(f) for k, f in sorted(topics.items())}
    return report


def build_classifier(
    config: ModerationTrainConfig = ModerationTrainConfig(),
    extra: Sequence[Example] = (),
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[ModerationModel, dict[str, Any]]:
    """Train on the corpus's train split plus ``extra`` (examples from user labels) and report
    on its held-out split."""
    started = time.perf_counter()
    train = list(SafetyCorpus("train", config.seed).examples(config.examples)) + list(extra)
    model = train_classifier(train, config, progress)
    heldout = list(SafetyCorpus("heldout", config.seed).examples(config.heldout_examples))
    report = evaluate_classifier(Classifier(model, {}, "candidate"), heldout)
    report["train_examples"] = len(train)
    report["user_label_examples"] = len(extra)
    report["seconds"] = time.perf_counter() - started
    return model, report


# what a user's label says about the answered request and the answer
_LABEL_CATEGORIES: dict[str, tuple[str, ...]] = {
    "harmful": ("illicit",),
    "hate_speech": ("hate",),
    "sexual_content": ("sexual",),
    "violence": ("violence",),
}


def label_examples(db: Engine) -> list[Example]:
    """Training examples from users' safety labels: a reply labelled harmful (hate_speech,
    sexual_content, violence) and the request it answered are unsafe, in the categories its
    moderation check flagged, else the label's; a request whose refusal a user labelled
    ``refusal_was_wrong`` is benign."""
    from sqlmodel import Session, select

    from shared.schema import Label, Message

    out: list[Example] = []
    with Session(db) as s:
        rows = s.exec(select(Label, Message).where(Label.message_id == Message.id)).all()
        for label, reply in rows:
            prompt = s.get(Message, reply.parent_id) if reply.parent_id is not None else None
            if label.label == "refusal_was_wrong":
                if prompt is not None:
                    out.append(Example(prompt.content, (), "request", "user_label"))
                continue
            if label.label not in _LABEL_CATEGORIES:
                continue
            flagged = ((reply.moderation or {}).get("output") or {}).get("categories") or []
            cats = tuple(c for c in CATEGORIES if c in flagged) or _LABEL_CATEGORIES[label.label]
            out.append(Example(reply.content, cats, "reply", "user_label"))
            if prompt is not None:
                out.append(Example(prompt.content, cats, "request", "user_label"))
    return out
