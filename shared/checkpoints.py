"""Policy registry: every policy version is a directory of safetensors + tokenizer + manifest.

    <root>/v3/model.safetensors   weights (tied output weight omitted)
    <root>/v3/tokenizer.json      the tokenizer the weights were trained with
    <root>/v3/manifest.json       family, config, chat template, parent version, sha256 + size
                                  of each file, metrics

Publishing writes a hidden temp directory, fsyncs every file and the directory, then renames it
into place, so a reader sees a whole version or none. Loading re-hashes every file and refuses
a missing, truncated or tampered one with a ``CheckpointError`` naming the version and file.
No pickle: weights are safetensors, imports use ``torch.load(weights_only=True)``.

The reward models' registry (``trainer/reward.py``) is a :class:`VersionDirectory` too and
publishes and verifies its versions with the same functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from shared.families import ModelConfig, PolicyModel, build_model, config_from_dict, family_of
from shared.model import PaLM, PaLMConfig
from shared.tokenizer import Tokenizer, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

FORMAT = "palmchat-policy/1"
MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE = "model.safetensors", "tokenizer.json", "manifest.json"
_VERSION_RE = re.compile(r"^v(\d+)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


POLICY = "policy version"


class CheckpointError(ValueError):
    """A version that cannot be used; the message names what it is, the version and the file."""

    def __init__(
        self, version: str, reason: str, file: str | None = None, *, kind: str = POLICY
    ) -> None:
        self.version, self.file, self.reason = version, file, reason
        where = f"{version}/{file}" if file else version
        super().__init__(f"{kind} {where}: {reason}")


@dataclass(frozen=True)
class Policy:
    """A verified, loaded policy version."""

    version: str
    model: PolicyModel
    tokenizer: Tokenizer
    manifest: dict[str, Any]

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_versions(root: Path) -> list[str]:
    """The ``vN`` directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name)
        for p in root.iterdir()
        if p.is_dir() and (m := _VERSION_RE.match(p.name))
    ]
    return [name for _, name in sorted(found)]


def commit_version_dir(root: Path, tmp: Path, manifest: dict[str, Any]) -> str:
    """Give the fully written temp dir ``tmp`` the next free ``vN`` name under ``root``:
    write its manifest, fsync every file and the directory, rename, fsync ``root``."""
    while True:
        versions = list_versions(root)
        version = f"v{int(versions[-1][1:]) + 1 if versions else 1}"
        manifest["version"] = version
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        try:
            # rename onto an existing non-empty directory fails: another publisher won the name
            os.rename(tmp, root / version)
        except OSError:
            if (root / version).exists():
                continue
            raise
        fsync_path(root)
        return version


@contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A hidden temp directory under ``root`` to write a version into; removed on the way out
    unless :func:`commit_version_dir` renamed it into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: sha256 and size of the weights and the tokenizer."""
    return {
        name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
        for name in (MODEL_FILE, TOKENIZER_FILE)
    }


class VersionDirectory:
    """``<root>/vN`` directories, one per published version."""

    kind = POLICY  # what a version is, for error messages

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        return list_versions(self.root)

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: str) -> Path:
        if not _VERSION_RE.match(version):
            raise CheckpointError(
                version, "not a version name (expected v<number>)", kind=self.kind
            )
        return self.root / version


class PolicyRegistry(VersionDirectory):
    # -- publishing --------------------------------------------------------------------------
    def publish(
        self,
        model: PolicyModel,
        tokenizer: Tokenizer,
        *,
        parent: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        recipe: Mapping[str, Any] | None = None,
    ) -> str:
        """Atomically add a new version and return its name."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        with staging_dir(self.root) as tmp:
            params = {name for name, _ in model.named_parameters()}
            # only weights are narrowed; rotary/norm buffers stay float32 (precision matters)
            state = {
                k: v.detach().to("cpu", _DTYPES[dtype] if k in params else v.dtype).contiguous()
                for k, v in model.state_dict_for_save().items()
            }
            save_file(state, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
            tokenizer.save(tmp / TOKENIZER_FILE)
            manifest = {
                "format": FORMAT,
                "parent": parent,
                "created_at": datetime.now(UTC).isoformat(),
                "family": model.family,
                "config": model.config.to_dict(),
                "chat_template": tokenizer.chat_template_kind,
                "dtype": dtype,
                "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
                "num_params": model.num_params(),
                "files": file_entries(tmp),
                "metrics": dict(metrics or {}),
                "recipe": dict(recipe or {}),
            }
            return self._commit(tmp, manifest)

    def _commit(self, tmp: Path, manifest: dict[str, Any]) -> str:
        version = commit_version_dir(self.root, tmp, manifest)
        log.info("published policy %s (parent %s)", version, manifest.get("parent"))
        return version

    def install(self, source_dir: str | Path, *, parent: str | None = None) -> str:
        """Copy a verified version directory from elsewhere (e.g. the bundled seed) in."""
        source = Path(source_dir)
        manifest = verify_version_dir(source, source.name)
        with staging_dir(self.root) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            manifest["parent"] = parent if parent is not None else manifest.get("parent")
            manifest["installed_from"] = manifest.get("version")
            return self._commit(tmp, manifest)

    def export(self, version: str, dest: str | Path, *, dtype: str = "float32") -> Path:
        """Write a verified copy of ``version`` (optionally narrowed to float16/bfloat16) to
        ``dest``, keeping its parent, metrics and recipe. ``dest`` must not exist yet."""
        dest = Path(dest)
        if dest.exists():
            raise ValueError(f"{dest} already exists")
        policy = self.load(version)
        staging = PolicyRegistry(dest.parent / f".export-{uuid.uuid4().hex}")
        try:
            name = staging.publish(
                policy.model,
                policy.tokenizer,
                parent=policy.manifest.get("parent"),
                metrics=policy.manifest.get("metrics"),
                recipe=policy.manifest.get("recipe"),
                dtype=dtype,
            )
            os.rename(staging.root / name, dest)
        finally:
            shutil.rmtree(staging.root, ignore_errors=True)
        return dest

    # -- loading -----------------------------------------------------------------------------
    def verify(self, version: str, *, deep: bool = False) -> dict[str, Any]:
        """Check every file of a version against its manifest; return the manifest.

        ``deep`` also checks that the manifest's config, the tokenizer and the weights' names
        and shapes fit together, as loading needs: the manifest itself is not hashed, so an
        edited config passes the hashes. (It builds a model skeleton on the meta device; the
        first time in a process that costs a second or two of torch imports.)"""
        directory = self.path(version)
        manifest = verify_version_dir(directory, version)
        if deep:
            _check_structure(directory, version, manifest)
        return manifest

    def manifest(self, version: str) -> dict[str, Any]:
        return read_manifest(self.path(version), version)

    def tokenizer(self, version: str) -> Tokenizer:
        """The tokenizer of ``version`` alone (a gateway that runs no model needs only it)."""
        try:
            return load_tokenizer(self.path(version) / TOKENIZER_FILE)
        except (TokenizerError, OSError) as e:
            raise CheckpointError(version, str(e), TOKENIZER_FILE) from None

    def load(
        self, version: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> Policy:
        return load_policy_dir(self.path(version), version, device=device, dtype=dtype)


def read_manifest(
    directory: Path, version: str, *, manifest_format: str = FORMAT, kind: str = POLICY
) -> dict[str, Any]:
    """The manifest of the version in ``directory``, checked to be a ``manifest_format`` one."""

    def refuse(reason: str, file: str | None = MANIFEST_FILE) -> CheckpointError:
        return CheckpointError(version, reason, file, kind=kind)

    if not directory.is_dir():
        raise refuse(f"not found in {directory.parent}", None)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise refuse("missing")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != manifest_format:
        raise refuse(f"not a {manifest_format} manifest")
    for key in ("config", "files"):
        if not isinstance(manifest.get(key), dict):
            raise refuse(f"manifest lacks {key!r}")
    return manifest


def verify_version_dir(
    directory: Path,
    version: str,
    *,
    manifest_format: str = FORMAT,
    kind: str = POLICY,
    files: tuple[str, ...] = (MODEL_FILE, TOKENIZER_FILE),
) -> dict[str, Any]:
    """Check ``files`` (the weights and the tokenizer) against the manifest (size, then
    sha256); return the manifest."""
    manifest = read_manifest(directory, version, manifest_format=manifest_format, kind=kind)
    for name in files:
        expected = manifest["files"].get(name)
        path = directory / name
        if not isinstance(expected, dict):
            raise CheckpointError(version, "not listed in the manifest", name, kind=kind)
        if not path.is_file():
            raise CheckpointError(version, "missing", name, kind=kind)
        size, matches = path.stat().st_size, sha256_file(path) == expected.get("sha256")
        if size != expected.get("bytes"):
            reason = f"truncated or resized: {size} bytes, manifest says {expected.get('bytes')}"
            raise CheckpointError(
                version, reason if matches else f"{reason}; sha256 mismatch", name, kind=kind
            )
        if not matches:
            raise CheckpointError(version, "sha256 mismatch: file was modified", name, kind=kind)
    return manifest


def _config_and_tokenizer(
    directory: Path, version: str, manifest: dict[str, Any]
) -> tuple[ModelConfig, Tokenizer]:
    try:
        config = config_from_dict(family_of(manifest), manifest["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(version, f"bad config: {e}", MANIFEST_FILE) from None
    try:
        tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    except TokenizerError as e:
        raise CheckpointError(version, str(e), TOKENIZER_FILE) from None
    if tokenizer.vocab_size > config.num_tokens:
        raise CheckpointError(
            version,
            f"tokenizer has {tokenizer.vocab_size} ids, model only {config.num_tokens}",
            TOKENIZER_FILE,
        )
    return config, tokenizer


def _check_structure(directory: Path, version: str, manifest: dict[str, Any]) -> None:
    """Refuse a version whose weights would not load into its config (read from the
    safetensors header and a model on the meta device, so nothing is materialised)."""
    config, _ = _config_and_tokenizer(directory, version, manifest)
    try:
        with safe_open(str(directory / MODEL_FILE), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(version, f"unreadable safetensors: {e}", MODEL_FILE) from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict_for_save().items()}
    if saved != expected:
        wrong = sorted(k for k in saved.keys() | expected.keys() if saved.get(k) != expected.get(k))
        raise CheckpointError(
            version,
            f"weights do not fit the manifest's config ({len(wrong)} tensors differ, e.g. "
            f"{wrong[0]}: {saved.get(wrong[0])} saved, {expected.get(wrong[0])} expected)",
            MODEL_FILE,
        )


def load_policy_dir(
    directory: Path,
    version: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Policy:
    manifest = verify_version_dir(directory, version)
    config, tokenizer = _config_and_tokenizer(directory, version, manifest)
    try:
        state = load_file(str(directory / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(version, f"unreadable safetensors: {e}", MODEL_FILE) from None
    model = build_model(config)
    try:
        model.load_saved_state({k: v.float() for k, v in state.items()})
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(version, f"weights do not fit the config: {e}", MODEL_FILE) from None
    model = model.to(device=device, dtype=dtype).eval()
    return Policy(version=version, model=model, tokenizer=tokenizer, manifest=manifest)


def config_from_palm_state_dict(
    state: Mapping[str, torch.Tensor], xpos_scale_base: int = 512, max_seq_len: int = 1024
) -> PaLMConfig:
    """Infer a PaLMConfig from a PaLM-rlhf-pytorch state dict's tensor shapes."""
    try:
        num_tokens, dim = state["token_emb.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        dim_head = state["layers.0.fn.rotary_emb.inv_freq"].shape[0] * 2
        attn_inner = state["layers.0.fn.attn_out.weight"].shape[1]
        ff_inner = state["layers.0.fn.ff_out.2.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a PaLM-rlhf-pytorch state dict: missing {e}") from None
    return PaLMConfig(
        num_tokens=int(num_tokens),
        dim=int(dim),
        depth=depth,
        heads=attn_inner // dim_head,
        dim_head=int(dim_head),
        ff_mult=ff_inner // dim,
        qk_rmsnorm="layers.0.fn.q_scale" in state,
        xpos_scale_base=xpos_scale_base,
        max_seq_len=max_seq_len,
    )


def import_palm_state_dict(
    registry: PolicyRegistry,
    path: str | Path,
    *,
    xpos_scale_base: int = 512,
    max_seq_len: int = 1024,
) -> str:
    """Publish a ``torch.save``d PaLM-rlhf-pytorch state dict as a new version (byte tokenizer)."""
    from shared.tokenizer import ByteTokenizer

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or pickled-object files
        raise ValueError(
            f"{path}: not a weights-only torch state dict ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors")
    lora = [k for k in state if k.startswith("finetune_modules.")]
    if lora:
        log.warning("dropping %d LoRA finetune tensors from %s", len(lora), path)
    state = {k: v for k, v in state.items() if not k.startswith("finetune_modules.")}
    config = config_from_palm_state_dict(state, xpos_scale_base, max_seq_len)
    model = PaLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match a PaLM of {config}: {e}") from None
    return registry.publish(
        model,
        ByteTokenizer(config.num_tokens),
        metrics={},
        recipe={"imported_from": str(path.resolve()), "source": "palm-rlhf-pytorch"},
    )
