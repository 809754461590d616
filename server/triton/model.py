"""The palmchat policy as a Triton Python-backend model in decoupled mode.

Triton loads one instance of this class per model version (= policy version); each runs this
project's engine (:class:`~server.engine.AsyncEngine`: continuous batching over the paged KV
cache) inside the Python-backend stub process. ``execute`` only hands each request to the
instance's event loop and returns: every request then streams its deltas back through its
response sender while the engine batches it with whatever else is running, so requests of
any length come and go independently. A request whose client went away (gRPC stream
cancelled) is aborted in the engine within ``CANCEL_POLL_S``.

Model config parameters: ``registry_dir`` (required) and ``engine_config`` (the engine's
options as JSON; see :mod:`server.triton.protocol`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import threading
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Triton stub)

from server.engine import AsyncEngine, DeltaStream, EngineOverloaded, LLMEngine  # noqa: E402
from server.triton.protocol import (  # noqa: E402
    ENGINE_PARAMETER,
    INVALID_PREFIX,
    OVERLOADED_PREFIX,
    bytes_tensor,
    config_from_json,
    delta_to_arrays,
    params_from_json,
    stats_to_json,
    text_of,
)
from shared.checkpoints import PolicyRegistry  # noqa: E402
from shared.tokenizer import apply_chat_template  # noqa: E402

log = logging.getLogger("palmchat.triton")
CANCEL_POLL_S = 0.05
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _input(request: Any, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _response(arrays: dict[str, Any]) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(name, value) for name, value in arrays.items()]
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.version = f"v{args['model_version']}"
        registry = PolicyRegistry(params["registry_dir"])
        config = config_from_json(params.get(ENGINE_PARAMETER, ""))
        engine = LLMEngine.from_registry(registry, self.version, config)
        self.tokenizer = engine.current.policy.tokenizer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name=f"palmchat-triton-{self.version}", daemon=True
        )
        self.thread.start()
        self.engine = self._on_loop(self._make_engine(engine))
        self.ids = itertools.count()
        self.active: set[concurrent.futures.Future[None]] = set()
        log.info("palmchat %s ready in Triton", self.version)

    @staticmethod
    async def _make_engine(engine: LLMEngine) -> AsyncEngine:
        return AsyncEngine(engine)

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            # read everything now and keep no reference to ``request``: Triton releases a
            # decoupled request (and can unload this version) once its Python object is gone
            inputs = {
                "params": text_of(_input(request, "PARAMS")),
                "prompt": _input(request, "PROMPT_IDS"),
                "messages": text_of(_input(request, "MESSAGES")),
            }
            request_id = request.request_id()
            sender = request.get_response_sender()
            future = asyncio.run_coroutine_threadsafe(
                self._serve(inputs, request_id, sender), self.loop
            )
            self.active.add(future)
            future.add_done_callback(self.active.discard)
        return None

    async def _serve(self, inputs: dict[str, Any], request_id: str, sender: Any) -> None:
        final_sent = False

        def send(arrays: dict[str, Any] | None, final: bool, error: str | None = None) -> None:
            nonlocal final_sent
            if final_sent:
                return
            if error is not None:
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                response = _response(arrays) if arrays is not None else None
            final_sent = final
            if response is None:
                sender.send(flags=FINAL)
            else:
                sender.send(response, flags=FINAL if final else 0)

        try:
            await self._run(inputs, request_id, sender, send)
        except Exception as exc:  # never leave a request without its final response
            log.exception("request failed")
            with contextlib.suppress(Exception):
                send(None, True, error=f"internal error: {exc}")
        finally:
            if not final_sent:
                with contextlib.suppress(Exception):
                    send(None, True)

    async def _run(self, inputs: dict[str, Any], request_id: str, sender: Any, send) -> None:
        try:
            params_text = inputs["params"]
            if params_text and json.loads(params_text) == {"stats": True}:
                stats = self.engine.stats()
                arrays = {"TEXT": bytes_tensor(stats_to_json(stats))}
                arrays["POLICY_VERSION"] = bytes_tensor(self.version)
                send(arrays, True)
                return
            params = params_from_json(params_text)
            prompt = inputs["prompt"]
            if prompt is not None and prompt.size:
                prompt_ids = [int(t) for t in prompt.reshape(-1)]
            else:
                messages = json.loads(inputs["messages"] or "[]")
                if not messages:
                    raise ValueError("give PROMPT_IDS or MESSAGES")
                prompt_ids = apply_chat_template(self.tokenizer, messages)
        except (ValueError, TypeError, KeyError) as e:
            send(None, True, error=f"{INVALID_PREFIX}{e}")
            return
        engine_id = f"{request_id or 'triton'}-{next(self.ids)}"
        stream: DeltaStream | None = None
        watcher: asyncio.Task | None = None
        open_candidates = params.n
        try:
            stream = self.engine.generate(prompt_ids, params, request_id=engine_id)
            watcher = asyncio.get_running_loop().create_task(_cancel_when_gone(sender, stream))
            async for delta in stream:
                if delta.finished:
                    open_candidates -= 1
                if _cancelled(sender):
                    stream.cancel()
                    continue
                send(delta_to_arrays(delta), open_candidates == 0)
        except EngineOverloaded as e:
            send(None, True, error=f"{OVERLOADED_PREFIX}{e}")
        except ValueError as e:  # refused by the engine (e.g. the prompt is too long)
            send(None, True, error=f"{INVALID_PREFIX}{e}")
        finally:
            if watcher is not None:
                watcher.cancel()
            if stream is not None:
                stream.cancel()

    def finalize(self) -> None:
        """Unload: Triton calls this once the version's in-flight requests are done."""
        with contextlib.suppress(Exception):
            for future in list(self.active):
                future.result(timeout=30)
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        log.info("palmchat %s unloaded", self.version)


async def _cancel_when_gone(sender: Any, stream: DeltaStream) -> None:
    while not _cancelled(sender):
        await asyncio.sleep(CANCEL_POLL_S)
    stream.cancel()


def _cancelled(sender: Any) -> bool:
    """The client cancelled the request (its gRPC stream was cancelled or closed)."""
    with contextlib.suppress(Exception):
        return bool(sender.is_cancelled())
    return False
