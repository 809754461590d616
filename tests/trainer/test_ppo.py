"""PPO pieces: GAE, the per-token KL penalty, clipped losses, the adaptive KL controller, and
rollouts through the serving engine."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.ppo import (
    ActorCritic,
    AdaptiveKLController,
    FixedKLController,
    gae,
    generate_rollouts,
    kl_penalised_rewards,
    ppo_loss,
    whiten,
)


def test_gae_matches_a_hand_computed_case() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta_2 = 1 - 0.7 = 0.3                  A_2 = 0.3
    # delta_1 = 0.9 * 0.7 - 0.6 = 0.03         A_1 = 0.03 + 0.72 * 0.3 = 0.246
    # delta_0 = 0.9 * 0.6 - 0.5 = 0.04         A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    assert adv.tolist()[0] == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)


def test_gae_ignores_prompt_and_padding_positions() -> None:
    # the same episode as above, after two prompt positions and before one padding position
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 9.0, 0.5, 0.6, 0.7, 9.0]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.tolist()[0][2:5] == pytest.approx([0.21712, 0.246, 0.3], abs=1e-6)
    assert ret.tolist()[0][2:5] == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)
    assert adv[0, [0, 1, 5]].tolist() == [0.0, 0.0, 0.0]


def test_gae_with_gamma_and_lambda_one_gives_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret.tolist()[0] == pytest.approx([0.9, 0.8, 1.0], abs=1e-6)
    assert adv.tolist()[0] == pytest.approx([0.6, 0.6, 0.9], abs=1e-6)


def test_kl_penalty_is_minus_beta_log_ratio_per_token_plus_the_score_on_the_last() -> None:
    logprobs = torch.tensor([[0.0, -1.0, -0.5, -2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -0.5, -1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])  # response = positions 1..3
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0]), logprobs, ref, mask, kl_coef=0.1)
    # log ratios: 0.5, 0.0, -1.0 -> penalties -0.05, 0, +0.1; score 2.0 on the last token
    assert rewards.tolist()[0] == pytest.approx([0.0, -0.05, 0.0, 2.1, 0.0], abs=1e-6)
    assert kl.tolist() == pytest.approx([-0.5])


def _loss(logprobs, old_logprobs, advantages, **kw):
    n = logprobs.shape[1]
    zeros, mask = torch.zeros(1, n), torch.ones(1, n)
    return ppo_loss(
        logprobs,
        kw.pop("values", zeros),
        old_logprobs,
        kw.pop("old_values", zeros),
        advantages,
        kw.pop("returns", zeros),
        mask,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=kw.pop("vf_coef", 0.0),
        **kw,
    )


def test_policy_loss_is_clipped_outside_the_trust_region() -> None:
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    # ratios e^0.5 ~ 1.65 (positive advantage) and e^-0.5 ~ 0.61 (negative advantage): both
    # are past the clip range in the direction the advantage pushes, so no gradient flows
    logprobs = torch.tensor([[0.5, -0.5]], requires_grad=True)
    loss, stats = _loss(logprobs, old, adv)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, abs=1e-6)
    assert logprobs.grad.abs().max() == 0
    assert stats["clipfrac"] == 1.0


def test_policy_loss_is_not_clipped_inside_the_trust_region() -> None:
    logprobs = torch.tensor([[0.1]], requires_grad=True)
    loss, stats = _loss(logprobs, torch.zeros(1, 1), torch.tensor([[2.0]]))
    loss.backward()
    ratio = torch.exp(torch.tensor(0.1))
    assert loss.item() == pytest.approx(float(-2.0 * ratio), abs=1e-6)
    assert float(logprobs.grad) == pytest.approx(float(-2.0 * ratio), abs=1e-5)
    assert stats["clipfrac"] == 0.0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped() -> None:
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, stats = _loss(
        torch.zeros(1, 1),
        torch.zeros(1, 1),
        torch.zeros(1, 1),
        values=values,
        old_values=torch.zeros(1, 1),
        returns=torch.tensor([[1.0]]),
        vf_coef=1.0,
    )
    # unclipped error 0, clipped value 0.2 -> error 0.8: max -> 0.5 * 0.64
    assert loss.item() == pytest.approx(0.32, abs=1e-6)
    assert stats["vf_clipfrac"] == 1.0


def test_entropy_bonus_lowers_the_loss() -> None:
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))
    plain, _ = _loss(*args)
    bonus, _ = _loss(*args, entropy=torch.full((1, 2), 3.0), ent_coef=0.1)
    assert float(bonus) == pytest.approx(float(plain) - 0.3)


def test_adaptive_kl_controller_moves_beta_towards_the_target() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # error clipped to +0.2 -> beta * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(5.4, n_steps=50)  # error -0.1 -> beta * 0.95
    assert ctl.value == pytest.approx(0.095)
    fixed = FixedKLController(0.1)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.1


def test_whiten_gives_zero_mean_unit_variance_over_the_mask() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert float(w[0, :3].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[0, :3].pow(2).mean()) == pytest.approx(1.0, abs=1e-4)
    assert float(w[0, 3]) == 0.0


def test_rollouts_run_through_the_serving_engine_and_end_with_the_end_token(
    tiny_seed_dir,
) -> None:
    from shared.checkpoints import load_policy_dir

    policy = load_policy_dir(tiny_seed_dir, "v1")
    model, tok = policy.model.train(), policy.tokenizer
    prompts = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollouts = generate_rollouts(model, tok, prompts, max_new_tokens=8, seed=1)
    # the engine serves a copy: the model in training keeps its mode, weights, tied output
    # projection and gradients
    assert model.training and model.to_logits.weight is model.token_emb.weight
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(rollouts) == 3
    for r in rollouts:
        assert r.prompt_ids[-1] == tok.assistant_id
        assert 1 <= len(r.response_ids) <= 9
        assert r.truncated == (r.response_ids[-1] != tok.end_id)
    ac = ActorCritic(model)
    logits, values = ac(torch.tensor([rollouts[0].prompt_ids + rollouts[0].response_ids]))
    assert values.shape == logits.shape[:2]


def test_reward_ranked_pairs_pair_the_best_finished_reply_with_the_worst() -> None:
    from shared.bootstrap import SEED_DIR
    from shared.checkpoints import load_policy_dir
    from trainer.config import TrainerConfig
    from trainer.dpo import reward_ranked_pairs
    from trainer.reward import RewardModel

    # the bundled seed policy: it finishes its replies, so there are candidates to pair
    policy = load_policy_dir(SEED_DIR, "v1")
    model, tok = policy.model, policy.tokenizer
    torch.manual_seed(3)
    rm = RewardModel.from_policy(model).eval()
    prompts = [[{"role": "user", "content": f"What is {i} times 3?"}] for i in range(6)]
    cfg = TrainerConfig.from_flat(
        dpo_rm_samples=4, dpo_rm_min_gap=0.0, max_new_tokens=24, threads=1
    )
    pairs = reward_ranked_pairs(model, rm, tok, prompts, cfg, seed=5)
    assert pairs and len(pairs) <= len(prompts)
    assert len({json.dumps(p.prompt) for p in pairs}) == len(pairs)  # one pair per prompt
    for p in pairs:
        assert p.source == "reward_model" and p.chosen != p.rejected
        chosen, rejected = rm.score(tok, [p.prompt, p.prompt], [p.chosen, p.rejected]).tolist()
        assert chosen > rejected
    # the same seed gives the same pairs; a gap no pair reaches gives none
    again = reward_ranked_pairs(model, rm, tok, prompts, cfg, seed=5)
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in pairs]
    assert reward_ranked_pairs(model, rm, tok, prompts, cfg.replace(dpo_rm_min_gap=1e9)) == []


def test_dpo_imitates_only_replies_a_user_picked(tiny_seed_dir) -> None:
    """The RPO term (NLL of the chosen reply) applies to logged pairs only: the reward model's
    favourite among on-policy samples may be a wrong answer in the users' style."""
    from shared.checkpoints import load_policy_dir
    from trainer.config import TrainerConfig
    from trainer.dpo import PreferenceJob, train_dpo
    from trainer.feedback import Pair

    prompt = [{"role": "user", "content": "What is 1200 centimeters in meters?"}]
    cfg = TrainerConfig.from_flat(
        pref_max_steps=2, pref_batch_size=2, threads=1, dpo_sft_weight=0.5
    )

    def trained(source: str, sft: float) -> dict[str, torch.Tensor]:
        policy = load_policy_dir(tiny_seed_dir, "v1")
        ref = load_policy_dir(tiny_seed_dir, "v1").model
        pairs = [Pair(prompt, "12", "Sure! It is 12 meters.", source=source)] * 2
        job = PreferenceJob(policy.model, ref, policy.tokenizer, cfg.replace(dpo_sft_weight=sft))
        train_dpo(job, pairs)
        return {k: v.clone() for k, v in policy.model.state_dict().items()}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(trained("reward_model", 0.5), trained("reward_model", 0.0))
    assert not same(trained("ranking", 0.5), trained("ranking", 0.0))
