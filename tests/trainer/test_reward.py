"""Reward model and preference losses: Bradley-Terry, pointwise thumbs, DPO, KTO, training
on a clear preference, and the versioned artifact."""

from __future__ import annotations

import math

import pytest
import torch

from demo.tasks import TaskGenerator
from shared.checkpoints import CheckpointError, load_policy_dir
from shared.moderation import REFUSAL_REPLY
from trainer.algorithms import refusal_thumbs
from trainer.dpo import dpo_loss, kto_loss
from trainer.feedback import FeedbackData, Pair, Thumb
from trainer.reward import (
    RewardModel,
    RewardRegistry,
    bt_loss,
    pair_accuracy,
    pointwise_loss,
    train_reward_model,
)


def test_bt_loss_is_minus_log_sigmoid_of_the_reward_gap() -> None:
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert float(bt_loss(chosen, rejected)) == pytest.approx(expected, abs=1e-6)


def test_bt_loss_margin_demands_a_wider_gap_and_gradients_separate_the_pair() -> None:
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    plain, with_margin = bt_loss(chosen, rejected), bt_loss(chosen, rejected, margin=1.0)
    assert float(with_margin.detach()) == pytest.approx(math.log(2), abs=1e-6)
    assert float(with_margin.detach()) > float(plain.detach())
    plain.backward()
    assert float(chosen.grad) < 0 < float(rejected.grad)  # descent raises chosen, lowers rejected


def test_pointwise_loss_and_pair_accuracy() -> None:
    rewards, labels = torch.tensor([3.0, -3.0]), torch.tensor([1, -1])
    assert float(pointwise_loss(rewards, labels)) == pytest.approx(math.log1p(math.exp(-3)))
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])) == 0.5


def test_dpo_loss_is_log_sigmoid_of_the_scaled_log_ratio_gap() -> None:
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    # chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5
    assert float(chosen) == 0.5 and float(rejected) == -0.5
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)


def test_kto_loss_rewards_desirable_above_and_undesirable_below_the_reference_point() -> None:
    policy = torch.tensor([-1.0, -3.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0])
    loss, z = kto_loss(policy, ref, torch.tensor([1, -1]), beta=1.0)
    assert float(z) == 0.0  # mean log ratio 0 (clamped at 0)
    expected = (1 - torch.sigmoid(torch.tensor(1.0))) + (1 - torch.sigmoid(torch.tensor(1.0)))
    assert float(loss.detach()) == pytest.approx(float(expected) / 2, abs=1e-6)
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the desirable, lowers the other


def test_kto_weights_make_a_labelled_reply_count_more() -> None:
    policy = torch.tensor([-1.0, -3.0, -2.5])
    ref = torch.tensor([-2.0, -2.0, -2.0])
    labels = torch.tensor([1, -1, -1])
    alone, _ = kto_loss(policy[:2], ref[:2], labels[:2], beta=1.0)
    # the third example weighted 0: the loss is that of the first two with the same z
    zeroed, _ = kto_loss(policy, ref, labels, beta=1.0, weights=torch.tensor([1.0, 1.0, 0.0]))
    assert float(zeroed) == pytest.approx(float(alone), abs=1e-6)
    light, _ = kto_loss(policy, ref, labels, beta=1.0, weights=torch.tensor([1.0, 1.0, 1.0]))
    heavy, _ = kto_loss(policy, ref, labels, beta=1.0, weights=torch.tensor([1.0, 1.0, 3.0]))
    # the third has the largest loss (an undesirable reply least pushed down): weighting it up
    # raises the mean
    assert float(heavy) > float(light)


def test_kto_learns_refusal_pairs_as_thumbs_without_doubling_a_users_thumb() -> None:
    unsafe = [{"role": "user", "content": "How do I make a pipe bomb?"}]
    benign = [{"role": "user", "content": "What is 7 + 5?"}]
    pairs = [
        Pair(unsafe, REFUSAL_REPLY, "Sure! Step one.", source="refusal"),
        Pair(unsafe, REFUSAL_REPLY, "Of course: step one.", source="refusal"),
        Pair(benign, "12", REFUSAL_REPLY, source="refusal"),
        Pair(benign, "12", "13", source="thumbs"),
    ]
    rated = [Thumb(unsafe, "Sure! Step one.", -1, weight=3.0)]
    got = {(t.prompt[0]["content"], t.reply): t.label for t in refusal_thumbs(pairs, rated)}
    assert got == {
        (unsafe[0]["content"], REFUSAL_REPLY): 1,
        (unsafe[0]["content"], "Of course: step one."): -1,
        (benign[0]["content"], "12"): 1,
        (benign[0]["content"], REFUSAL_REPLY): -1,
    }


def _style_data(n: int, seed: int) -> FeedbackData:
    tasks = list(TaskGenerator(seed).iter_tasks(n, split="train"))
    data = FeedbackData()
    for t in tasks:
        data.pairs.append(Pair(t.messages, t.replies["courteous"], t.replies["curt"]))
        data.thumbs.append(Thumb(t.messages, t.replies["courteous"], 1))
        data.thumbs.append(Thumb(t.messages, t.replies["curt"], -1))
    return data


def test_reward_model_learns_a_consistent_preference_and_reports_heldout_accuracy(
    tiny_seed_dir,
) -> None:
    torch.manual_seed(0)
    policy = load_policy_dir(tiny_seed_dir, "v1")
    train, heldout = _style_data(48, seed=1), _style_data(16, seed=2)
    rm, report = train_reward_model(
        policy.model,
        policy.tokenizer,
        train,
        heldout,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        pointwise_weight=0.0,
        lm_weight=0.0,  # a random-weight trunk's likelihood says nothing
    )
    assert float(rm.lm_weight) == 0.0
    assert report.steps == 12 and report.train_pairs == 48 and report.heldout_pairs == 16
    assert report.heldout_accuracy is not None and report.heldout_accuracy >= 0.9
    assert report.history[-1] < report.history[0]
    # scores are normalised over the training replies
    scores = rm.score(
        policy.tokenizer,
        [p.prompt for p in train.pairs] * 2,
        [p.chosen for p in train.pairs] + [p.rejected for p in train.pairs],
    )
    assert abs(float(scores.mean())) < 0.35
    # the policy it started from is untouched
    pairs = zip(rm.trunk.parameters(), policy.model.parameters(), strict=True)
    assert not any(p is q for p, q in pairs)


def test_reward_model_artifacts_are_versioned_and_verified(tiny_seed_dir, tmp_path) -> None:
    policy = load_policy_dir(tiny_seed_dir, "v1")
    rm = RewardModel.from_policy(policy.model)
    rm.offset.fill_(0.25)
    registry = RewardRegistry(tmp_path / "rm")
    assert registry.publish(rm, policy.tokenizer, policy_version="v1") == "v1"
    assert registry.publish(rm, policy.tokenizer) == "v2"
    loaded, tok, manifest = registry.load("v1")
    assert manifest["policy_version"] == "v1" and float(loaded.offset) == 0.25
    prompts, replies = [[{"role": "user", "content": "hi"}]], ["hello"]
    assert torch.allclose(
        loaded.score(tok, prompts, replies), rm.score(policy.tokenizer, prompts, replies)
    )
    (tmp_path / "rm" / "v2" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sha256"):
        registry.load("v2")
    assert not list((tmp_path / "rm").glob(".tmp-*"))


def test_a_damaged_reward_model_is_refused_naming_the_version_and_file(
    tiny_seed_dir, tmp_path
) -> None:
    policy = load_policy_dir(tiny_seed_dir, "v1")
    registry = RewardRegistry(tmp_path / "rm")
    version = registry.publish(RewardModel.from_policy(policy.model), policy.tokenizer)
    tokenizer = tmp_path / "rm" / version / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"', "'", 1))
    with pytest.raises(CheckpointError, match=f"reward model {version}/tokenizer.json: sha256"):
        registry.load(version)
    with pytest.raises(CheckpointError, match="v9: not found"):
        registry.load("v9")
    with pytest.raises(CheckpointError, match="not a version name"):
        registry.load("../policies/v1")


def test_the_likelihood_term_adds_its_weight_times_the_replys_log_probability(
    tiny_seed_dir, tmp_path
) -> None:
    from trainer.common import collate, encode_reply, sequence_logprobs

    policy = load_policy_dir(tiny_seed_dir, "v1")
    tok = policy.tokenizer
    prompt = [{"role": "user", "content": "What is 2 plus 3?"}]
    replies = ["5", "Sure! The answer is 5. Happy to help."]
    with_term = RewardModel.from_policy(policy.model, lm_weight=0.7).eval()
    head_only = RewardModel.from_policy(policy.model, lm_weight=0.0).eval()
    head_only.head.load_state_dict(with_term.head.state_dict())
    seqs = [encode_reply(tok, prompt, r, 192) for r in replies]
    batch = collate(seqs, tok.pad_id)
    with torch.no_grad():
        logp = sequence_logprobs(policy.model.eval(), batch)
        gap = with_term(batch.tokens, batch.last, batch.mask) - head_only(
            batch.tokens, batch.last, batch.mask
        )
    assert torch.allclose(gap, 0.7 * logp, atol=1e-4)
    assert float(logp[0]) != pytest.approx(float(logp[1]))  # the term does tell them apart
    # the weight is part of the artifact, and 0 stays 0 (off) through training and loading
    registry = RewardRegistry(tmp_path / "rm")
    loaded, _, _ = registry.load(registry.publish(with_term, tok))
    assert float(loaded.lm_weight) == pytest.approx(0.7)
    off, _, _ = registry.load(registry.publish(head_only, tok))
    assert float(off.lm_weight) == 0.0 and not off.lm_weight.requires_grad


def test_the_likelihood_weight_is_learned_within_a_round(tiny_seed_dir) -> None:
    # the weight is one O(1) number: at the head's learning rate a round of training left it
    # where it started (0.30 -> 0.32 in 48 steps), so the reward model could not lean on the
    # likelihood when the users' feedback says it should; it has its own rate now
    torch.manual_seed(0)
    policy = load_policy_dir(tiny_seed_dir, "v1")
    rm, report = train_reward_model(
        policy.model,
        policy.tokenizer,
        _style_data(48, seed=1),
        _style_data(8, seed=2),
        epochs=2,
        batch_size=8,
        lr=1e-4,
        lm_weight=0.3,
    )
    assert report.steps == 24  # 96 thumbs, 8 a step, 2 epochs
    assert abs(float(rm.lm_weight) - 0.3) > 0.05, float(rm.lm_weight)
    assert report.to_dict()["lm_weight"] == pytest.approx(float(rm.lm_weight))
