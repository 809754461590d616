"""The moderation classifier both processes use: the trainer trains and publishes it, servers
load it to answer ``POST /v1/moderations`` and to check chat input and output.

A small model of its own, not the policy's trunk: hashed word and character n-grams
(fastText-style) averaged into one vector, then a two-layer head with one sigmoid per OpenAI
moderation category. It scores a message in well under a millisecond on a CPU, so checking
every request and every streamed reply costs little beside generation (docs/decisions.md,
"Moderation classifier"). Versions live under ``<data_dir>/moderation/vN`` with the same
manifest, sha256 and atomic publish as policy versions.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from shared.checkpoints import (
    MODEL_FILE,
    CheckpointError,
    VersionDirectory,
    commit_version_dir,
    sha256_file,
    staging_dir,
    verify_version_dir,
)

# OpenAI's moderation categories, in the order of its API reference
CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip
FORMAT = "palmchat-moderation-1"
_WORD_RE = re.compile(r"[a-z0-9']+")
MIN_KNOWN_WORDS = 0.6  # share of a text's words seen in training before it can be flagged
MIN_WORDS = 2  # and how many of three letters or more: one is too little to judge
# a reply needs more: it is checked again and again as it streams, and an untrained policy's
# noise must not be cut off
MIN_REPLY_WORDS = 3
# the refusal a blocked request gets, and the reply the trainer prefers for a flagged request:
# polite, and one text, so users and the reward model see a single refusal to rate
REFUSAL_REPLY = "Sorry, I can't help with that. Let me know if I can help with something else."
# a reply that declines to help ("I can't help with that"); declining for lack of data ("I
# can't check the weather") is not one
_REFUSAL_RE = re.compile(
    r"\b(?:can't|cannot|can not|won't|will not)\s+(?:help|assist)\s+(?:you\s+)?with"
    r"\s+(?:that|this)\b",
    re.IGNORECASE,
)


def is_refusal(reply: str) -> bool:
    """Whether ``reply`` declines to help, as an unsafe request should be answered."""
    return _REFUSAL_RE.search(reply) is not None


@dataclass(frozen=True)
class FeatureConfig:
    """How a text becomes hashed n-gram ids: word 1..``word_ngrams``-grams and character
    ``char_min``..``char_max``-grams of each word (with boundary marks), in ``buckets``."""

    buckets: int = 1 << 15
    word_ngrams: int = 2
    char_min: int = 3
    char_max: int = 5
    max_chars: int = 4000  # a longer text is scored on its first and last 2,000 characters

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        return cls(**{k: int(data[k]) for k in cls().__dict__ if k in data})


def features(text: str, config: FeatureConfig) -> list[int]:
    """The bucket ids of ``text``'s n-grams (crc32: the same on every machine and run)."""
    if len(text) > config.max_chars:
        half = config.max_chars // 2
        text = text[:half] + " " + text[-half:]
    words = _WORD_RE.findall(text.lower())
    grams: list[str] = []
    for n in range(1, config.word_ngrams + 1):
        grams.extend("w " + " ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    ids = [zlib.crc32(g.encode()) % config.buckets for g in grams]
    for word in words:
        ids.extend(_char_buckets(word, config.char_min, config.char_max, config.buckets))
    return ids or [0]


@functools.lru_cache(maxsize=1 << 16)
def _char_buckets(word: str, char_min: int, char_max: int, buckets: int) -> tuple[int, ...]:
    """The bucket ids of one word's character n-grams (cached: chat words repeat)."""
    marked = f"<{word}>"
    return tuple(
        zlib.crc32(("c " + marked[i : i + n]).encode()) % buckets
        for n in range(char_min, char_max + 1)
        for i in range(len(marked) - n + 1)
    )


class ModerationModel(nn.Module):
    known: Tensor  # a buffer: which buckets training text reached

    def __init__(self, config: FeatureConfig, dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.config = config
        self.dim, self.hidden = dim, hidden
        self.embed = nn.EmbeddingBag(config.buckets, dim, mode="mean")
        # buckets some training text reached: any other is a gram never seen, whose bucket
        # holds only other grams' collisions, so it is dropped rather than read as evidence
        self.register_buffer("known", torch.ones(config.buckets, dtype=torch.bool))
        self._known: list[bool] | None = None
        self.vocabulary: set[str] = set()  # the words of the training texts
        self.head = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, len(CATEGORIES))
        )

    def batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids: list[int] = []
        offsets: list[int] = []
        if self._known is None:  # a Python list: indexing the tensor per gram is slow
            self._known = self.known.tolist()
        known = self._known
        for text in texts:
            offsets.append(len(ids))
            grams = [g for g in features(text, self.config) if known[g]]
            ids.extend(grams or [0])  # nothing known: bucket 0, which training keeps empty
        return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)

    def known_word_share(self, text: str, min_words: int = 0) -> float:
        """The share of ``text``'s words of three letters or more that training text
        contained (0 with fewer than ``MIN_WORDS`` of them)."""
        words = _WORD_RE.findall(text.lower())
        if not words:
            return 0.0
        words = [w for w in words if len(w) >= 3]  # "a", "do", "my" say little
        known = sum(w in self.vocabulary for w in words)
        return known / len(words) if known >= (min_words or MIN_WORDS) else 0.0

    def learn_vocabulary(self, texts: Sequence[str]) -> None:
        """Mark the buckets ``texts`` reach as known (bucket 0 stays unknown)."""
        seen = torch.zeros_like(self.known)
        for text in texts:
            seen[torch.tensor(features(text, self.config), dtype=torch.long)] = True
        seen[0] = False
        self.known.copy_(seen)
        self._known = None
        self.vocabulary = {w for text in texts for w in _WORD_RE.findall(text.lower())}

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        """Logits, one row per text and one column per category."""
        return self.head(self.embed(ids, offsets))

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str]) -> Tensor:
        return torch.sigmoid(self(*self.batch(texts)))


@dataclass(frozen=True)
class Verdict:
    """One text's moderation result, in the shape of OpenAI's ``results[]`` item."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]

    @property
    def flagged_categories(self) -> list[str]:
        return [c for c in CATEGORIES if self.categories.get(c)]


class Classifier:
    """A loaded version: scores texts and applies its per-category thresholds."""

    def __init__(self, model: ModerationModel, thresholds: dict[str, float], version: str) -> None:
        self.model = model.eval()
        self.thresholds = {c: float(thresholds.get(c, 0.5)) for c in CATEGORIES}
        self.version = version

    def classify(self, texts: Sequence[str], min_words: int = 0) -> list[Verdict]:
        """Verdicts; ``min_words`` (default ``MIN_WORDS``) known words a text needs to be
        judged at all."""
        if not texts:
            return []
        probs = self.model.probabilities(texts).tolist()
        out = []
        for text, row in zip(texts, probs, strict=True):
            scores = {c: round(float(p), 6) for c, p in zip(CATEGORIES, row, strict=True)}
            # a text mostly of words it never saw (noise, another language) is not judged
            judged = self.model.known_word_share(text, min_words) >= MIN_KNOWN_WORDS
            cats = {c: judged and scores[c] >= self.thresholds[c] for c in CATEGORIES}
            out.append(Verdict(any(cats.values()), cats, scores))
        return out


class ModerationRegistry(VersionDirectory):
    """Versioned moderation classifiers: ``<root>/vN/{model.safetensors, manifest.json}`` (the
    manifest's ``config`` is the feature and layer shape), published atomically and verified
    by sha256 like policy versions."""

    kind = "moderation classifier"
    files = (MODEL_FILE,)

    def publish(
        self,
        model: ModerationModel,
        *,
        thresholds: dict[str, float] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> str:
        with staging_dir(self.root) as tmp:
            state = {
                k: v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()
            }
            save_file(state, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
            manifest = {
                "format": FORMAT,
                "created_at": datetime.now(UTC).isoformat(),
                "categories": list(CATEGORIES),
                "config": {"dim": model.dim, "hidden": model.hidden, **model.config.to_dict()},
                "vocabulary": sorted(model.vocabulary),
                "thresholds": {c: float((thresholds or {}).get(c, 0.5)) for c in CATEGORIES},
                "files": {
                    name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                    for name in self.files
                },
                "metrics": dict(metrics or {}),
            }
            return commit_version_dir(self.root, tmp, manifest)

    def install(self, source_dir: Path) -> str:
        """Copy a published version directory (e.g. the bundled one) in as the next version."""
        version = source_dir.name
        manifest = verify_version_dir(
            source_dir, version, manifest_format=FORMAT, kind=self.kind, files=self.files
        )
        with staging_dir(self.root) as tmp:
            for name in self.files:
                (tmp / name).write_bytes((source_dir / name).read_bytes())
            return commit_version_dir(self.root, tmp, dict(manifest))

    def load(self, version: str | None = None) -> Classifier:
        """The verified version (default: the latest); :class:`CheckpointError` when there is
        none or a file is damaged."""
        version = version or self.latest()
        if version is None:
            raise CheckpointError("", f"no moderation classifier in {self.root}", kind=self.kind)
        path = self.path(version)
        manifest = verify_version_dir(
            path, version, manifest_format=FORMAT, kind=self.kind, files=self.files
        )
        if list(manifest.get("categories", ())) != list(CATEGORIES):
            raise CheckpointError(version, "categories differ from this palmchat's", kind=self.kind)
        shape = manifest["config"]
        model = ModerationModel(
            FeatureConfig.from_dict(shape), dim=int(shape["dim"]), hidden=int(shape["hidden"])
        )
        model.load_state_dict(load_file(str(path / MODEL_FILE)))
        model._known = None
        model.vocabulary = set(manifest.get("vocabulary", ()))
        return Classifier(model, manifest.get("thresholds", {}), version)

    def manifest(self, version: str) -> dict[str, Any]:
        return verify_version_dir(
            self.path(version), version, manifest_format=FORMAT, kind=self.kind, files=self.files
        )
