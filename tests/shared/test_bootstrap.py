"""First run of a data dir: migrations, seed policy installed and marked active, idempotent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from sqlmodel import select

from shared.bootstrap import SEED_DIR, prepare
from shared.checkpoints import PolicyRegistry
from shared.config import Settings
from shared.db import session
from shared.model import PaLM, PaLMConfig
from shared.schema import Policy
from shared.tokenizer import ByteTokenizer
from tests.conftest import PALMCHAT, free_port, run_palmchat


def _seed(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    registry = PolicyRegistry(tmp_path / "seed-src")
    version = registry.publish(
        PaLM(PaLMConfig.from_name("tiny", num_tokens=300)), ByteTokenizer(300)
    )
    return registry.path(version)


def test_prepare_installs_the_seed_once_and_marks_it_active(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    seed = _seed(tmp_path)
    first = prepare(settings, seed_dir=seed)
    assert first.active_version == "v1" and first.registry.versions() == ["v1"]
    second = prepare(settings, seed_dir=seed)
    assert second.active_version == "v1" and second.registry.versions() == ["v1"]
    with session(second.engine) as s:
        rows = s.exec(select(Policy)).all()
    assert [(r.version, r.status) for r in rows] == [("v1", "active")]
    assert (tmp_path / "data" / "palmchat.db").is_file()


def test_bundled_seed_policy_installs_as_a_verified_version(tmp_path: Path) -> None:
    prepared = prepare(Settings(data_dir=tmp_path))
    manifest = prepared.registry.verify(prepared.active_version)
    assert manifest["num_params"] > 1_000_000
    assert manifest["tokenizer"]["kind"] == "bpe"
    assert manifest["metrics"]["pretrain"]["heldout"]["n"] >= 100
    assert SEED_DIR.is_dir()


def test_up_on_a_fresh_data_dir_serves_the_seed_policy(tmp_path: Path) -> None:
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [*PALMCHAT, "up", "--data-dir", str(tmp_path / "fresh"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        key = None
        for line in proc.stdout:
            if "first admin API key" in line:
                key = line.rsplit(" ", 1)[1].strip()
            if "serving on" in line:
                break
        assert key and key.startswith("pc-")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        r = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            json={
                "model": "palmchat",
                "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["system_fingerprint"] == "v1"
        assert "Paris" in body["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_command_answers_from_the_terminal(tmp_path: Path) -> None:
    chat = run_palmchat(
        "chat", "--data-dir", str(tmp_path), "-m", "What is the capital of Japan?", timeout=300
    )
    assert chat.returncode == 0, chat.stderr
    assert "Tokyo" in chat.stdout.split("palm>", 1)[1]
