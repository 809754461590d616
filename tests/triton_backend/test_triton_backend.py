"""The gateway with ``--backend triton`` against a real tritonserver on loopback (CPU).

One Triton server (the binary from the nvidia-pytriton wheel) runs the palmchat model for
the module; a gateway uses it over gRPC streaming, and a second gateway runs the in-process
engine on the same weights for reference. Skipped when the triton extra is not installed,
except under CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from server.api.app import create_app
from server.engine import EngineConfig
from shared.config import Settings
from shared.keys import create_key
from tests.conftest import LiveServer

pytestmark = pytest.mark.slow

try:
    from server.triton.server import TritonServer, TritonUnavailable, free_port, pytriton_dir

    pytriton_dir()
    MISSING = None
except Exception as exc:  # the extra is not installed
    MISSING = str(exc)

MESSAGES = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Reverse the word apple."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
]


@pytest.fixture(scope="module")
def triton_gateway(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    if MISSING:
        if os.environ.get("CI"):
            pytest.fail(f"the triton extra must be installed in CI: {MISSING}")
        pytest.skip(f"triton extra not installed: {MISSING}")
    root = tmp_path_factory.mktemp("triton")
    settings = Settings(data_dir=root / "data", kv_cache_memory_mb=16, rate_limit_per_minute=0)
    log_file = root / "tritonserver.log"
    triton = TritonServer(
        settings.registry_dir,
        grpc_port=free_port(),
        http_port=free_port(),
        workdir=root / "work",
        engine=EngineConfig.from_settings(settings),
        log_file=log_file,
    )
    app = create_app(
        settings, seed_dir=tiny_seed_dir, backend="triton", triton_url=triton.url
    )  # installs and activates the seed as v1 in the registry Triton reads
    try:
        triton.start("v1")
    except TritonUnavailable:
        print(log_file.read_text()[-4000:])
        raise
    try:
        with LiveServer(app) as live:
            live.state = app.state.palmchat
            live.key = create_key(live.state.db, "alice")
            live.admin = create_key(live.state.db, "root", admin=True)
            live.triton = triton
            yield live
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory, tiny_seed_dir: Path):
    settings = Settings(data_dir=tmp_path_factory.mktemp("ref"), kv_cache_memory_mb=16)
    app = create_app(settings, seed_dir=tiny_seed_dir)
    with LiveServer(app) as live:
        live.key = create_key(app.state.palmchat.db, "bob")
        yield live


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.key, max_retries=0)


def _answer(client: openai.OpenAI, messages, **kw) -> dict:
    r = client.chat.completions.create(model="palmchat", messages=messages, **kw)
    return {
        "fingerprint": r.system_fingerprint,
        "usage": (r.usage.prompt_tokens, r.usage.completion_tokens),
        "choices": [
            (
                c.message.content,
                c.finish_reason,
                [(t.token, round(t.logprob, 4)) for t in c.logprobs.content]
                if c.logprobs
                else None,
            )
            for c in r.choices
        ],
    }


def _metric(server, name: str) -> float:
    """A gauge or counter of the engine inside Triton (polled by the gateway every 0.5 s)."""
    time.sleep(1.0)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def test_greedy_answers_equal_the_in_process_engine(triton_gateway, in_process) -> None:
    remote, local = _client(triton_gateway), _client(in_process)
    for messages in MESSAGES:
        kw = dict(max_tokens=40, temperature=0, logprobs=True, top_logprobs=2)
        got, want = _answer(remote, messages, **kw), _answer(local, messages, **kw)
        assert got == want and got["fingerprint"] == "v1"
    # seeded sampling with n > 1 goes through the same engine: same candidates
    kw = dict(max_tokens=12, temperature=0.8, seed=3, n=2)
    assert _answer(remote, MESSAGES[0], **kw) == _answer(local, MESSAGES[0], **kw)
    # streaming gives the same text as the non-streamed answer
    chunks = remote.chat.completions.create(
        model="palmchat", messages=MESSAGES[1], max_tokens=40, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _answer(local, MESSAGES[1], max_tokens=40, temperature=0)["choices"][0][0]


def test_models_and_errors_match_the_in_process_api(triton_gateway) -> None:
    client = _client(triton_gateway)
    assert [m.id for m in client.models.list()] == ["palmchat", "v1"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="palmchat", messages=MESSAGES[0], max_tokens=10**6)


def test_streaming_arrives_token_by_token(triton_gateway) -> None:
    # at the gRPC level: one decoupled response per generated token, the last one final
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    from server.engine import SamplingParams
    from server.triton.protocol import bytes_tensor, params_to_json

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton_gateway.triton.url)
    prompt = grpcclient.InferInput("MESSAGES", [1], "BYTES")
    prompt.set_data_from_numpy(bytes_tensor(json.dumps(MESSAGES[0])))
    params = grpcclient.InferInput("PARAMS", [1], "BYTES")
    sampling = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    params.set_data_from_numpy(bytes_tensor(params_to_json(sampling)))
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("palmchat", [prompt, params], model_version="1")
        tokens, arrivals = [], []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            arrivals.append(time.perf_counter())
            tokens.append(result.as_numpy("TOKEN_IDS").tolist())
            if result.as_numpy("FINISH_REASON")[0]:
                break
    finally:
        client.stop_stream()
        client.close()
    assert [len(t) for t in tokens] == [1] * 24
    assert np.all(np.diff(arrivals) >= 0) and arrivals[-1] > arrivals[0]

    # through the gateway: one SSE chunk per token, each with its own logprob
    body = {
        "model": "palmchat",
        "messages": MESSAGES[0],
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    per_chunk, usage = [], None
    headers = {"Authorization": f"Bearer {triton_gateway.key}"}
    url = f"{triton_gateway.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                per_chunk.append(len(chunk["choices"][0]["logprobs"]["content"]))
    assert usage["completion_tokens"] == 40
    # (a token whose text is held back, e.g. half a UTF-8 character, joins the next chunk)
    assert len(per_chunk) >= 35 and per_chunk.count(1) >= 30


def test_cancel_stops_generation_inside_triton(triton_gateway) -> None:
    before = _metric(triton_gateway, "palmchat_generation_tokens_total")
    body = {
        "model": "palmchat",
        "messages": MESSAGES[1],
        "max_tokens": 230,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {triton_gateway.key}"}
    url = f"{triton_gateway.url}/v1/chat/completions"
    seen = 0
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                seen += 1
                if seen == 3:
                    break  # the client goes away after three tokens
    # the engine inside Triton stops: nothing running, and far fewer than 230 tokens made
    deadline = time.monotonic() + 30
    while True:
        running = _metric(triton_gateway, "palmchat_num_requests_running")
        generated = _metric(triton_gateway, "palmchat_generation_tokens_total")
        if running == 0 and generated > before:
            break
        assert time.monotonic() < deadline, "Triton kept generating after the client left"
    after = _metric(triton_gateway, "palmchat_generation_tokens_total")
    assert after == generated  # stopped for good
    assert after - before < 200, f"generated {after - before} tokens of a cancelled request"


def test_version_switch_under_traffic_drops_nothing(triton_gateway) -> None:
    server = triton_gateway
    registry = server.state.registry
    v2 = registry.install(registry.path("v1"), parent="v1")
    results: list[tuple[str, int, str, float, float]] = []
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        client = _client(server)
        while not stop.is_set():
            start = time.monotonic()
            try:
                stream = client.chat.completions.create(
                    model="palmchat",
                    messages=MESSAGES[2],
                    max_tokens=60,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                chunks = list(stream)
                usage = chunks[-1].usage
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
                fingerprint = chunks[0].system_fingerprint
                results.append(
                    (fingerprint, usage.completion_tokens, finish, start, time.monotonic())
                )
            except Exception as exc:  # a dropped stream
                errors.append(repr(exc))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        while len(results) < 3 and not errors:
            time.sleep(0.05)
        admin = {"Authorization": f"Bearer {server.admin}"}
        switch_started = time.monotonic()
        r = httpx.post(f"{server.url}/v1/policies/{v2}/activate", headers=admin, timeout=300)
        assert r.status_code == 200, r.text
        switched = time.monotonic()
        deadline = switched + 60
        while sum(1 for f, *_ in results if f == v2) < 3 and not errors:
            assert time.monotonic() < deadline, "no answers from the new version"
            time.sleep(0.05)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert not errors, errors
    assert all(tokens == 60 and finish == "length" for _, tokens, finish, *_ in results)
    during = [x for x in results if x[3] < switched and x[4] > switch_started]
    assert during, "no stream was in flight while the new version loaded"
    assert {f for f, *_ in results} == {"v1", v2}
    assert all(f == v2 for f, _, _, start, _ in results if start > switched + 0.5)
    versions = triton_gateway.triton  # Triton now has both versions ready
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(versions.url)
    try:
        assert client.is_model_ready("palmchat", "2") and client.is_model_ready("palmchat", "1")
    finally:
        client.close()
