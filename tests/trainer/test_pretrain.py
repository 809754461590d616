"""Pretraining / SFT: loss goes down on held-out data, training resumes, the result is published."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.checkpoints import PolicyRegistry
from tests.conftest import run_palmchat
from trainer.pretrain import PretrainConfig, pretrain, read_jsonl_conversations


def _tiny(**kw) -> PretrainConfig:
    base = dict(
        preset="tiny",
        steps=40,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        eval_every=20,
        eval_examples=64,
        train_examples=1500,
        vocab_size=400,
        max_seq_len=128,
        heldout_eval=16,
    )
    return PretrainConfig(**{**base, **kw})


def test_pretrain_on_a_tiny_config_lowers_heldout_loss_and_publishes(tmp_path: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    result = pretrain(_tiny(), registry, work_dir=tmp_path / "work")
    assert result.eval_loss < 0.6 * result.initial_eval_loss
    assert result.version == "v1"
    policy = registry.load("v1")
    metrics = policy.manifest["metrics"]["pretrain"]
    assert metrics["eval_loss"] == pytest.approx(result.eval_loss)
    assert metrics["heldout"]["n"] == 16
    assert policy.manifest["recipe"]["config"]["steps"] == 40


def test_pretrain_resumes_from_its_saved_state(tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = pretrain(_tiny(steps=20), None, work_dir=work, publish=False)
    state = json.loads((work / "state.json").read_text())
    assert state["step"] == 20
    resumed = pretrain(_tiny(steps=40), None, work_dir=work, publish=False)
    assert json.loads((work / "state.json").read_text())["step"] == 40
    # the resumed run starts where the first ended, not from scratch
    assert resumed.initial_eval_loss == pytest.approx(first.eval_loss, rel=1e-4)
    assert resumed.eval_loss < first.eval_loss


def test_pretrain_learns_from_a_users_jsonl_file(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"say {w}"},
                {"role": "assistant", "content": f"{w} {w} {w}"},
            ]
        }
        for w in ["apple", "pear", "plum", "fig", "kiwi", "lime"] * 20
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = pretrain(_tiny(data=str(data), steps=30), None, work_dir=tmp_path / "w", publish=False)
    assert result.eval_loss < 0.5 * result.initial_eval_loss


def test_bad_jsonl_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_jsonl_conversations(data)


def test_cli_pretrain_rejects_a_missing_data_file_cleanly(tmp_path: Path) -> None:
    out = run_palmchat(
        "pretrain", "--data", str(tmp_path / "none.jsonl"), "--data-dir", str(tmp_path)
    )
    assert out.returncode == 2 and "no such file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("pair", ["arithmetic", "juggling=2", "sort=-1", "sort=many"])
def test_cli_pretrain_rejects_a_bad_family_weight_cleanly(tmp_path: Path, pair: str) -> None:
    out = run_palmchat("pretrain", "--family-weight", pair, "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "FAMILY=WEIGHT" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
