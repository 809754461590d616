"""Policy registry: atomic publish, verified load, corrupt versions refused, PaLM import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.checkpoints import CheckpointError, PolicyRegistry, import_palm_state_dict
from shared.model import PaLM, PaLMConfig
from shared.tokenizer import ByteTokenizer


@pytest.fixture
def model() -> PaLM:
    torch.manual_seed(0)
    return PaLM(PaLMConfig.from_name("tiny", num_tokens=300)).eval()


def test_publish_then_load_gives_identical_logits_and_manifest(tmp_path: Path, model: PaLM) -> None:
    registry = PolicyRegistry(tmp_path)
    version = registry.publish(model, ByteTokenizer(300), metrics={"eval_loss": 1.5})
    assert version == "v1"
    files = sorted(p.name for p in (tmp_path / version).iterdir())
    assert files == ["manifest.json", "model.safetensors", "tokenizer.json"]
    policy = registry.load(version)
    tokens = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(policy.model(tokens), model(tokens))
    assert policy.manifest["metrics"] == {"eval_loss": 1.5}
    assert policy.manifest["parent"] is None
    assert set(policy.manifest["files"]) == {"model.safetensors", "tokenizer.json"}
    assert policy.tokenizer.kind == "byte"


def test_versions_are_numbered_and_record_their_parent(tmp_path: Path, model: PaLM) -> None:
    registry = PolicyRegistry(tmp_path)
    first = registry.publish(model, ByteTokenizer(300))
    second = registry.publish(model, ByteTokenizer(300), parent=first)
    assert registry.versions() == ["v1", "v2"] and registry.latest() == "v2"
    assert registry.manifest(second)["parent"] == "v1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_no_pickle_in_a_version(tmp_path: Path, model: PaLM) -> None:
    version = PolicyRegistry(tmp_path).publish(model, ByteTokenizer(300))
    for path in (tmp_path / version).iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"


@pytest.mark.parametrize(
    "damage, file, reason",
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors", "missing"),
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors", "truncated"),
        (lambda d: _flip_byte(d / "model.safetensors"), "model.safetensors", "sha256"),
        (lambda d: _flip_byte(d / "tokenizer.json"), "tokenizer.json", "sha256"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json", "JSON"),
        (lambda d: (d / "manifest.json").unlink(), "manifest.json", "missing"),
    ],
    ids=[
        "missing-weights",
        "truncated-weights",
        "tampered-weights",
        "tampered-tokenizer",
        "corrupt-manifest",
        "missing-manifest",
    ],
)
def test_damaged_version_is_refused_naming_version_and_file(
    tmp_path: Path, model: PaLM, damage, file: str, reason: str
) -> None:
    registry = PolicyRegistry(tmp_path)
    good = registry.publish(model, ByteTokenizer(300))
    bad = registry.publish(model, ByteTokenizer(300))
    damage(tmp_path / bad)
    with pytest.raises(CheckpointError) as info:
        registry.load(bad)
    assert info.value.version == bad and info.value.file == file
    assert reason in str(info.value) and f"{bad}/{file}" in str(info.value)
    registry.load(good)  # the other version is unaffected


def test_unknown_version_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="v9: not found"):
        PolicyRegistry(tmp_path).load("v9")
    with pytest.raises(CheckpointError, match="not a version name"):
        PolicyRegistry(tmp_path).load("../etc")


def test_half_written_publish_leaves_no_visible_version(tmp_path: Path, model: PaLM) -> None:
    class Exploding(ByteTokenizer):
        def save(self, path):  # the publisher dies midway through writing the version
            raise RuntimeError("disk full")

    registry = PolicyRegistry(tmp_path)
    with pytest.raises(RuntimeError):
        registry.publish(model, Exploding(300))
    assert registry.versions() == []
    assert list(tmp_path.iterdir()) == []


def test_float16_publish_keeps_rotary_buffers_exact(tmp_path: Path, model: PaLM) -> None:
    registry = PolicyRegistry(tmp_path)
    policy = registry.load(registry.publish(model, ByteTokenizer(300), dtype="float16"))
    inv = "layers.0.fn.rotary_emb.inv_freq"
    assert torch.equal(policy.model.state_dict()[inv], model.state_dict()[inv])
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (policy.model(tokens) - model(tokens)).abs().max() < 1e-2


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))


def test_import_palm_state_dict_produces_a_loadable_version(tmp_path: Path) -> None:
    palm_rlhf = pytest.importorskip("palm_rlhf_pytorch")
    torch.manual_seed(3)
    ref = palm_rlhf.PaLM(num_tokens=256, dim=64, depth=2, heads=4, dim_head=16).eval()
    path = tmp_path / "palm.pt"
    torch.save(ref.state_dict(), path)
    registry = PolicyRegistry(tmp_path / "registry")
    version = import_palm_state_dict(registry, path)
    policy = registry.load(version)
    assert policy.tokenizer.kind == "byte" and policy.config.heads == 4 and policy.config.depth == 2
    tokens = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (policy.model(tokens) - ref(tokens)).abs().max().item() <= 1e-5


def test_import_refuses_a_pickled_object_file(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"token_emb.weight": torch.zeros(2, 2), "obj": Path("/")}, path)
    with pytest.raises(ValueError, match="weights-only"):
        import_palm_state_dict(PolicyRegistry(tmp_path / "r"), path)


def test_cli_import_palm_then_verify(tmp_path: Path) -> None:
    palm_rlhf = pytest.importorskip("palm_rlhf_pytorch")
    ref = palm_rlhf.PaLM(num_tokens=300, dim=32, depth=1, heads=2, dim_head=16)
    torch.save(ref.state_dict(), tmp_path / "palm.pt")
    data = tmp_path / "data"
    cli = [sys.executable, "-m", "palmchat"]
    out = subprocess.run(
        [*cli, "policies", "import-palm", str(tmp_path / "palm.pt"), "--data-dir", str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    version = out.stdout.split(" as ")[1].split()[0]
    ok = subprocess.run(
        [*cli, "policies", "verify", version, "--data-dir", str(data)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "ok" in ok.stdout
    manifest = json.loads((data / "policies" / version / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
    (data / "policies" / version / "manifest.json").write_text(json.dumps(manifest))
    bad = subprocess.run(
        [*cli, "policies", "verify", version, "--data-dir", str(data)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "sha256 mismatch" in bad.stderr and "Traceback" not in bad.stderr


def test_export_writes_a_verified_copy_that_installs_as_a_new_version(
    tmp_path: Path, model: PaLM
) -> None:
    registry = PolicyRegistry(tmp_path / "a")
    version = registry.publish(model, ByteTokenizer(300), metrics={"m": 1})
    out = registry.export(version, tmp_path / "copy", dtype="float16")
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    other = PolicyRegistry(tmp_path / "b")
    installed = other.install(out)
    policy = other.load(installed)
    assert policy.manifest["metrics"] == {"m": 1} and policy.manifest["dtype"] == "float16"
    with pytest.raises(ValueError, match="exists"):
        registry.export(version, out)
