"""Faults: corrupt or truncated policy versions. The activation API refuses them (409) and the
policy watcher refuses one the database says is active; the current policy keeps serving.
Figures go to the ``faults`` section of the reliability report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from sqlmodel import select

from server.api.app import create_app
from shared.config import Settings
from shared.db import session
from shared.keys import create_key
from shared.policies import active_version, register_version
from shared.schema import Policy, utcnow
from tests.conftest import LiveServer
from tests.reliability._faults import Api, is_openai_error, wait_for


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(version_dir: Path, edit: Callable[[dict], None]) -> None:
    path = version_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "weights_byte_flipped": lambda d: _flip_byte(d / "model.safetensors"),
    "weights_truncated": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-4096]
    ),
    "weights_missing": lambda d: (d / "model.safetensors").unlink(),
    "tokenizer_edited": lambda d: (d / "tokenizer.json").write_text(
        (d / "tokenizer.json").read_text().replace('"', "'", 1)
    ),
    "manifest_not_json": lambda d: (d / "manifest.json").write_text('{"format": '),
    "manifest_missing": lambda d: (d / "manifest.json").unlink(),
    "manifest_sha_wrong": lambda d: _edit_manifest(
        d, lambda m: m["files"]["model.safetensors"].update(sha256="0" * 64)
    ),
    "manifest_config_mismatch": lambda d: _edit_manifest(
        d, lambda m: m["config"].update(dim=m["config"]["dim"] * 2)
    ),
}


def test_corrupt_checkpoints_are_refused_and_the_current_policy_keeps_serving(
    tmp_path: Path, tiny_seed_dir: Path, reliability_report
) -> None:
    settings = Settings(
        data_dir=tmp_path, policy_poll_seconds=0.2, kv_cache_memory_mb=16, rate_limit_per_minute=0
    )
    app = create_app(settings, seed_dir=tiny_seed_dir)
    state = app.state.palmchat
    registry = state.registry
    with LiveServer(app) as live:
        admin = Api(live.url, create_key(state.db, "root", admin=True))

        def serving(expected: str) -> None:
            r = admin.chat("What is 2 + 2?")
            assert r.status_code == 200 and r.json()["system_fingerprint"] == expected, r.text

        refused = {}
        for name, corrupt in CORRUPTIONS.items():
            version = registry.install(registry.path("v1"), parent="v1")
            corrupt(registry.path(version))
            r = admin.http.post(f"/v1/policies/{version}/activate")
            assert is_openai_error(r, 409), (name, r.status_code, r.text)
            assert r.json()["error"]["code"] == "policy_verification_failed"
            assert version in r.json()["error"]["message"]
            refused[name] = r.json()["error"]["message"]
            assert active_version(state.db) == "v1"
            serving("v1")

        # damaged after another process activated it: the table says serve it, the watcher
        # refuses and the current policy keeps answering
        version = registry.install(registry.path("v1"), parent="v1")
        register_version(state.db, registry, version)
        _flip_byte(registry.path(version) / "model.safetensors")
        with session(state.db) as s:
            for row in s.exec(select(Policy).where(Policy.status == "active")):
                row.status = "retired"
                s.add(row)
            target = s.get(Policy, version)
            target.status, target.activated_at = "active", utcnow()
            s.add(target)
        assert active_version(state.db) == version
        swaps = _swaps(admin)
        deadline = time.monotonic() + 10 * settings.policy_poll_seconds
        answered = 0
        while time.monotonic() < deadline:
            serving("v1")
            answered += 1
        assert state.engine.version == "v1" and _swaps(admin) == swaps

        # a sound version is still taken up, so the refusals above were the checks' doing
        good = registry.install(registry.path("v1"), parent="v1")
        r = admin.http.post(f"/v1/policies/{good}/activate")
        assert r.status_code == 200, r.text
        wait_for(lambda: admin.chat("hi").json()["system_fingerprint"] == good, 30, "hot-swap")
        assert _swaps(admin) == swaps + 1

    reliability_report.record(
        "faults",
        corrupt_checkpoints_refused=len(refused) + 1,
        corrupt_checkpoint_kinds=sorted([*refused, "watcher_refused_damaged_active_version"]),
        chats_served_while_a_corrupt_version_was_active=answered,
    )


def _swaps(api: Api) -> float:
    text = api.http.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("palmchat_policy_swaps_total"))
    return float(line.split()[-1])
