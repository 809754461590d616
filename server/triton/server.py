"""Start and stop a real ``tritonserver`` (the binary shipped in the ``nvidia-pytriton`` wheel)
that serves the palmchat policy with :mod:`server.triton.model`.

The server runs in explicit model-control mode over an empty model repository: every load,
the first one included, goes through Triton's model-control API with the model config and
the model's ``model.py`` sent in the request (see :func:`load_policy_versions`). That is the
same call the gateway makes when an admin activates or rolls back a version or the trainer
publishes one, so a policy never needs to be copied into a model repository by hand.

The Python-backend stub embeds ``libpython3.X.so``; it must be the running interpreter's (in
``sysconfig.get_config_var("LIBDIR")``), not an older system copy, so ``LD_LIBRARY_PATH`` puts
that directory first. ``PYTHONPATH`` gives the stub this interpreter's site-packages and the
project, so the model imports torch and ``server.engine`` exactly as the gateway would.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.config import EngineConfig
from server.triton.protocol import (
    ENGINE_PARAMETER,
    MODEL_NAME,
    config_to_json,
    model_config,
    version_number,
)

log = logging.getLogger(__name__)

MODEL_PY = (
    b'"""The palmchat policy: see server/triton/model.py."""\n\n'
    b"from server.triton.model import TritonPythonModel  # noqa: F401\n"
)
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class TritonUnavailable(RuntimeError):
    """The triton extra is not installed, or the server could not start."""


def pytriton_dir() -> Path:
    """Where the ``nvidia-pytriton`` wheel keeps ``tritonserver`` (without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable(
            "the Triton backend needs the triton extra: pip install -e '.[triton]' "
            "(nvidia-pytriton ships the tritonserver binary)"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "tritonserver" / "bin" / "tritonserver").is_file():
        raise TritonUnavailable(f"no tritonserver binary under {root}")
    return root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stub_environment(libs_dir: Path) -> dict[str, str]:
    """The environment for tritonserver and its Python-backend stubs."""
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    lib_path = [p for p in (libdir, str(libs_dir), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = ":".join(lib_path)
    py_path = [str(PROJECT_ROOT), *site.getsitepackages(), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = ":".join(p for p in py_path if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@dataclass
class TritonServer:
    """One ``tritonserver`` process serving the ``palmchat`` model over gRPC (and HTTP).

    ``engine`` is what the engine inside Triton runs with (sent as a model config parameter).
    """

    registry_dir: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int | None = None
    workdir: Path | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    log_verbose: int = 0
    log_file: Path | None = None
    inherit_output: bool = False  # tritonserver logs to our stdout (when no log_file)
    process: subprocess.Popen | None = field(default=None, init=False)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        """``HOST:PORT`` of the gRPC endpoint (what ``--triton-url`` takes)."""
        return f"{self.host}:{self.grpc_port}"

    def parameters(self) -> dict[str, Any]:
        return engine_parameters(self.registry_dir, self.engine)

    def _prepare(self) -> tuple[list[str], dict[str, str]]:
        root = pytriton_dir()
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="palmchat-triton-")
            self.workdir = Path(self._tmp.name)
        work = Path(self.workdir)
        repository = work / "models"
        repository.mkdir(parents=True, exist_ok=True)
        backends = work / "backends"
        python_backend = backends / "python"
        if python_backend.exists():
            shutil.rmtree(python_backend)
        shutil.copytree(root / "tritonserver" / "backends" / "python", python_backend)
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stubs = root / "tritonserver" / "python_backend_stubs"
        stub = stubs / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonUnavailable(f"nvidia-pytriton has no Python-backend stub for {version}")
        shutil.copy2(stub, python_backend / "triton_python_backend_stub")
        shm_prefix = f"palmchat-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        args = [
            str(root / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
        ]
        if self.metrics_port:
            args += ["--allow-metrics=true", f"--metrics-port={self.metrics_port}"]
        else:
            args += ["--allow-metrics=false"]
        return args, stub_environment(root.parent / "nvidia_pytriton.libs")

    def start(self, version: str | None = None, timeout: float = 120.0) -> TritonServer:
        """Start tritonserver; with ``version``, load that policy version and wait for it."""
        args, env = self._prepare()
        out: Any = None if self.inherit_output else subprocess.DEVNULL
        if self.log_file:
            out = open(self.log_file, "ab")  # noqa: SIM115  (closed once the child has it)
        self.process = subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        if self.log_file:
            out.close()
        try:
            self.wait_live(timeout)
            if version is not None:
                load_policy_versions(self.url, [version], self.parameters(), timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_live(self, timeout: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise TritonUnavailable(
                        f"tritonserver exited with code {self.process.returncode}"
                        + (f"; see {self.log_file}" if self.log_file else "")
                    )
                with contextlib.suppress(Exception):
                    if client.is_server_live():
                        return
                if time.monotonic() > deadline:
                    raise TritonUnavailable(f"tritonserver not live on {self.url} in {timeout}s")
                time.sleep(0.2)
        finally:
            client.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGINT (Triton drains in-flight requests), then SIGKILL after ``timeout``."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started it dies (Linux), so a killed
    ``palmchat triton`` or test run never leaves a tritonserver behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def engine_parameters(registry_dir: Path, engine: EngineConfig) -> dict[str, str]:
    """The model config parameters of the palmchat model: where its policies are, how its
    engine runs."""
    return {
        "registry_dir": str(Path(registry_dir).resolve()),
        ENGINE_PARAMETER: config_to_json(engine),
    }


def load_request(versions: list[str], parameters: dict[str, Any]) -> tuple[str, dict[str, bytes]]:
    """The model-control ``load`` arguments that make Triton serve exactly ``versions``."""
    config = model_config(versions, parameters)
    files = {f"file:{version_number(v)}/model.py": MODEL_PY for v in versions}
    return json.dumps(config), files


def load_policy_versions(
    url: str, versions: list[str], parameters: dict[str, Any], timeout: float = 120.0
) -> None:
    """Load ``versions`` of the palmchat model through the model-control API (blocking)."""
    import tritonclient.grpc as grpcclient

    config, files = load_request(versions, parameters)
    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(MODEL_NAME, config=config, files=files, client_timeout=timeout)
    finally:
        client.close()
