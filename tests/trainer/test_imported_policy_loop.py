"""A Hugging Face Llama-family checkpoint goes the whole loop through the public surfaces:
``palmchat policies import-hf --activate``, served by the API with its own chat template,
thumbs and rankings through the REST API, a DPO/LoRA trainer round that publishes a new
version of the same family, and the running server hot-swapping to it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import torch
from trainer_helpers import tiny_config

from demo.tasks import TaskGenerator
from shared.config import Settings
from tests.conftest import live_app, run_palmchat
from tests.hf_checkpoints import make_checkpoint
from trainer.context import TrainerContext
from trainer.loop import OnlineTrainer
from trainer.lora import has_lora


def test_imported_qwen2_is_served_rated_trained_and_hot_swapped(
    tmp_path: Path, tiny_seed_dir: Path
) -> None:
    checkpoint = make_checkpoint(tmp_path / "hf", "qwen2", seed=4)
    data = tmp_path / "data"
    done = run_palmchat(
        "policies", "import-hf", str(checkpoint), "--activate", "--data-dir", str(data)
    )
    assert done.returncode == 0, done.stderr
    assert "as v1 (status active)" in done.stdout

    # flag, as the demo's loop runs: the first task is an unsafe request, and the loop must see
    # (and be rated on) what the policy itself answers
    with live_app(data, tiny_seed_dir, user="alice", moderation_mode="flag") as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.key, max_retries=0)
        rest = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {live.key}"})
        tasks = list(TaskGenerator(0).iter_tasks(8, split="train"))
        for task in tasks:
            answer = client.chat.completions.create(
                model="palmchat", messages=task.messages, n=2, max_tokens=10, temperature=1.0
            )
            assert answer.system_fingerprint == "v1"  # the imported policy, not the seed
            for choice in answer.choices:
                assert "<|im_start|>" not in (choice.message.content or "")
                rating = 1 if choice.index == 0 else -1
                r = rest.post(
                    "/v1/feedback",
                    json={
                        "completion_id": answer.id,
                        "choice_index": choice.index,
                        "rating": rating,
                    },
                )
                assert r.status_code == 200, r.text
            r = rest.post("/v1/rankings", json={"completion_id": answer.id, "ranking": [0, 1]})
            assert r.status_code == 200, r.text

        ctx = TrainerContext.from_settings(Settings(data_dir=data))
        # LoRA by size, as for a policy over 100M parameters (the threshold lowered to fit)
        cfg = tiny_config(algo="dpo", lora_auto_params=1_000, gate_min_reward_gain=-1e9)
        result = OnlineTrainer(ctx, cfg).run_round(force=True)
        assert result.status == "published", result.reasons
        assert (result.base_version, result.candidate_version) == ("v1", "v2")
        manifest = ctx.registry.manifest("v2")
        assert manifest["parent"] == "v1" and manifest["recipe"]["trainer"]["lora_rank"] == 16
        published, imported = ctx.registry.load("v2"), ctx.registry.load("v1")
        # the LoRA update merged into a plain model of the same family, with the same template
        assert published.model.family == "llama" and not has_lora(published.model)
        assert published.tokenizer.chat_template == imported.tokenizer.chat_template
        before = imported.model.state_dict()
        after = published.model.state_dict()
        changed = [name for name, w in after.items() if not torch.equal(w, before[name])]
        assert changed and all(".layers." in f".{n}" for n in changed)  # blocks only, via LoRA

        deadline = time.monotonic() + 60
        while True:  # the server follows the activation through the database
            answer = client.chat.completions.create(
                model="palmchat", messages=tasks[0].messages, max_tokens=5
            )
            if answer.system_fingerprint == "v2":
                break
            assert time.monotonic() < deadline, "the server never swapped to v2"
            time.sleep(0.5)
        assert answer.choices[0].finish_reason in ("stop", "length")
