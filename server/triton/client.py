"""The gateway's side of the Triton backend: the same surface as the in-process
:class:`~server.engine.AsyncEngine` (``generate`` → async stream of :class:`Delta`,
``version``, ``stats()``, ``load_policy``), spoken over Triton's gRPC streaming API with
``tritonclient.grpc.aio``.

* Each request is its own bidirectional gRPC stream to the decoupled ``palmchat`` model,
  pinned to the Triton model version of the policy this gateway serves; closing or cancelling
  the stream cancels the gRPC call, Triton marks the request cancelled and the engine inside
  Triton aborts it.
* ``load_policy(vN)`` loads Triton model version N through the model-control API while the
  version now serving stays loaded (``version_policy: specific [N, current]``): streams in
  flight finish on the old version, new ones go to the new version once it is ready. The
  version before that is unloaded by Triton after its last request is done.
* The tokenizer and context length come from the shared policy registry (the gateway builds
  prompts, counts tokens and validates ``max_tokens`` exactly as with the in-process engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from server.engine import (
    Delta,
    DeltaStream,
    EngineConfig,
    EngineOverloaded,
    EngineStats,
    SamplingParams,
)
from server.triton.protocol import (
    INVALID_PREFIX,
    MODEL_NAME,
    OVERLOADED_PREFIX,
    bytes_tensor,
    delta_from_arrays,
    params_to_json,
    stats_from_json,
    text_of,
    version_number,
)
from server.triton.server import engine_parameters, load_request
from shared.checkpoints import PolicyRegistry
from shared.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.5


class TritonError(RuntimeError):
    """Triton answered with an error that is not overload or a bad request."""


def _error(message: str) -> Exception:
    if message.startswith(OVERLOADED_PREFIX):
        return EngineOverloaded(message[len(OVERLOADED_PREFIX) :])
    if message.startswith(INVALID_PREFIX):
        return ValueError(message[len(INVALID_PREFIX) :])
    return TritonError(f"triton: {message}")


def _inputs(grpcclient: Any, prompt_ids: Sequence[int] | None, params_json: str) -> list[Any]:
    inputs = []
    if prompt_ids is not None:
        ids = np.asarray(list(prompt_ids), dtype=np.int32)
        tensor = grpcclient.InferInput("PROMPT_IDS", [len(ids)], "INT32")
        tensor.set_data_from_numpy(ids)
        inputs.append(tensor)
    params = grpcclient.InferInput("PARAMS", [1], "BYTES")
    params.set_data_from_numpy(bytes_tensor(params_json))
    inputs.append(params)
    return inputs


class TritonStream(DeltaStream):
    """One request's deltas over its own gRPC stream; cancelling cancels the call (and so the
    request)."""

    def __init__(
        self,
        backend: TritonBackend,
        request_id: str,
        model_version: str,
        inputs: list[Any],
        n: int,
    ) -> None:
        self.request_id = request_id
        self._open = n
        self._done = asyncio.Event()
        self._closed = False

        async def requests():
            yield {
                "model_name": backend.model_name,
                "model_version": model_version,
                "inputs": inputs,
                "request_id": request_id,
            }
            await self._done.wait()  # keep our half open until the last response is in

        self._call = backend.client.stream_infer(requests())

    async def __anext__(self) -> Delta:
        if self._open == 0 or self._closed:
            raise StopAsyncIteration
        try:
            result, error = await self._call.__anext__()
        except asyncio.CancelledError:
            self.cancel()
            raise
        except StopAsyncIteration:
            self._finish()
            raise TritonError("triton closed the stream before the request finished") from None
        except Exception as exc:  # grpc errors: server gone, call cancelled, ...
            self._finish()
            raise TritonError(f"triton stream failed: {exc}") from exc
        if error is not None:
            self._finish()
            raise _error(error.message())
        delta = delta_from_arrays(self.request_id, result.as_numpy)
        if delta.finished:
            self._open -= 1
            if self._open == 0:
                self._done.set()
        return delta

    def _finish(self) -> None:
        self._open = 0
        self._done.set()

    def cancel(self) -> None:
        """Stop generating: cancels the gRPC call; Triton aborts the request."""
        if self._open and not self._closed:
            self._closed = True
            self._done.set()
            with contextlib.suppress(Exception):
                self._call.cancel()


class TritonBackend:
    """What the gateway needs from a serving backend, backed by a Triton server at ``url``
    (``HOST:PORT`` of its gRPC endpoint). Call :meth:`connect` on the event loop that will
    use it (the gRPC channel belongs to that loop)."""

    def __init__(
        self,
        url: str,
        registry: PolicyRegistry,
        *,
        model_name: str = MODEL_NAME,
        load_timeout_s: float = 600.0,
        engine: EngineConfig | None = None,
    ) -> None:
        self.url = url
        self.registry = registry
        self.model_name = model_name
        self.load_timeout_s = load_timeout_s
        self.engine = engine or EngineConfig()  # for a Triton that has no version loaded yet
        self.client: Any = None
        self._version: str | None = None
        self._tokenizer: Tokenizer | None = None
        self._max_seq_len = 0
        self._ids = itertools.count()
        self._stats = EngineStats()
        self._stats_task: asyncio.Task | None = None
        self._swap = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------------
    async def connect(self, version: str | None, timeout: float = 120.0) -> TritonBackend:
        """Wait for Triton, then serve ``version``: adopt it if Triton already has it ready,
        else load it (``None``: whatever version Triton serves, the highest if several)."""
        import tritonclient.grpc.aio as aioclient

        self.client = aioclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.client.is_server_live(client_timeout=5):
                    break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise TritonError(f"Triton at {self.url} is not reachable: {exc}") from None
            await asyncio.sleep(0.25)
        ready = await self.ready_versions()
        while not ready and await self._loading() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)  # `palmchat triton` is still loading its first version
            ready = await self.ready_versions()
        if version is None:
            if not ready:
                raise TritonError(f"Triton at {self.url} serves no {self.model_name} version")
            version = f"v{max(ready)}"
        if version_number(version) in ready:
            self._adopt(version)
        else:
            await self.load_policy(version)
        await self._refresh_stats()
        self._stats_task = asyncio.get_running_loop().create_task(self._poll_stats())
        return self

    async def aclose(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self.client is not None:
            await self.client.close()
            self.client = None

    def shutdown(self) -> None:
        """Sync close, for callers without a loop at hand (the channel closes with the loop)."""
        if self._stats_task is not None:
            self._stats_task.cancel()

    # -- what serving.py uses ---------------------------------------------------------------
    @property
    def version(self) -> str:
        if self._version is None:
            raise TritonError("not connected to Triton yet")
        return self._version

    @property
    def tokenizer(self) -> Tokenizer:
        """The serving version's tokenizer, read from the shared registry."""
        if self._tokenizer is None:
            raise TritonError("not connected to Triton yet")
        return self._tokenizer

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        version: str | None = None,
    ) -> TritonStream:
        """Start a request on Triton (must be called on the connected loop); iterate the
        returned stream. Overload shows up as :class:`EngineOverloaded` from the stream.
        Only the serving version can be named (no version is served beside it here)."""
        import tritonclient.grpc as grpcclient

        if version is not None and version != self.version:
            raise ValueError(f"policy {version} is not being served")
        params = params or SamplingParams()
        request_id = request_id or f"treq-{next(self._ids)}"
        inputs = _inputs(grpcclient, prompt_ids, params_to_json(params))
        model_version = str(version_number(self.version))
        return TritonStream(self, request_id, model_version, inputs, params.n)

    def stats(self) -> EngineStats:
        """The engine stats of the serving version inside Triton, as of at most
        ``STATS_INTERVAL_S`` ago (a background task polls them)."""
        return self._stats

    @property
    def serving_beside(self) -> frozenset[str]:
        return frozenset()

    async def release(self, version: str) -> None:
        """Nothing is served beside the current version through Triton."""

    async def load_policy(self, version: str, *, beside: bool = False) -> str:
        """Serve ``version``: load it as Triton model version N next to the serving one, then
        send new requests to it. A bad version raises ``CheckpointError`` (the registry's
        files) or :class:`TritonError` (Triton could not load it); the current one stays.
        Serving a version beside the current one (a canary) is not supported here."""
        if beside:
            raise NotImplementedError("canary rollouts are not supported with --backend triton")
        async with self._swap:
            if version == self._version:
                return version
            tokenizer, context = await asyncio.to_thread(self._policy_files, version)
            keep = [self._version] if self._version and self._version != version else []
            parameters = await self._parameters()
            config, files = load_request([version, *keep], parameters)
            try:
                await self.client.load_model(
                    self.model_name, config=config, files=files, client_timeout=self.load_timeout_s
                )
            except Exception as exc:
                raise TritonError(f"Triton could not load {version}: {exc}") from None
            self._version, self._tokenizer, self._max_seq_len = version, tokenizer, context
            log.info("Triton serves %s (kept loaded: %s)", version, keep or "-")
            return version

    # -- helpers ----------------------------------------------------------------------------
    async def ready_versions(self) -> list[int]:
        try:
            meta = await self.client.get_model_metadata(self.model_name, as_json=True)
        except Exception:
            return []
        ready = []
        for v in meta.get("versions", []):
            with contextlib.suppress(Exception):
                if await self.client.is_model_ready(self.model_name, v):
                    ready.append(int(v))
        return ready

    async def _loading(self) -> bool:
        try:
            index = await self.client.get_model_repository_index(as_json=True)
        except Exception:
            return False
        return any(
            m.get("name") == self.model_name and m.get("state") == "LOADING"
            for m in index.get("models", [])
        )

    def _adopt(self, version: str) -> None:
        self._tokenizer, self._max_seq_len = self._policy_files(version)
        self._version = version

    def _policy_files(self, version: str) -> tuple[Tokenizer, int]:
        manifest = self.registry.manifest(version)
        return self.registry.tokenizer(version), int(manifest["config"]["max_seq_len"])

    async def _parameters(self) -> dict[str, Any]:
        """The model config parameters Triton runs with now (its registry path, engine
        settings); the gateway's own registry path when nothing is loaded yet."""
        try:
            config = await self.client.get_model_config(self.model_name, as_json=True)
            params = config.get("config", {}).get("parameters", {})
            values = {k: v.get("string_value", "") for k, v in params.items()}
            if values.get("registry_dir"):
                return values
        except Exception:
            pass
        return engine_parameters(self.registry.root, self.engine)

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            await self._refresh_stats()

    async def _refresh_stats(self) -> None:
        import tritonclient.grpc as grpcclient

        try:
            inputs = _inputs(grpcclient, None, '{"stats": true}')
            stream = TritonStream(self, "stats", str(version_number(self.version)), inputs, 1)
            call = stream._call
            try:
                result, error = await asyncio.wait_for(call.__anext__(), 10)
            finally:
                stream._done.set()
            if error is None:
                self._stats = stats_from_json(text_of(result.as_numpy("TEXT")))
        except Exception as exc:  # metrics must never fail a scrape
            log.debug("engine stats from Triton: %s", exc)
