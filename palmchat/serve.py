"""Serving commands: ``up``, ``serve``, ``triton`` and the terminal ``chat``."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from palmchat.common import (
    DataDir,
    Host,
    Port,
    app,
    built_or_fail,
    console,
    fail,
    settings_for,
    setup_logging,
)
from server.engine import openmp

if TYPE_CHECKING:
    from shared.config import Settings


def _serve(
    settings: Settings,
    *,
    auth: bool,
    backend: Literal["engine", "process", "triton"] = "engine",
    triton_url: str | None = None,
) -> None:
    import uvicorn

    from server.api.app import create_app

    try:
        app = create_app(settings, auth=auth, backend=backend, triton_url=triton_url)
    except ValueError as e:
        fail(str(e))

    class Server(uvicorn.Server):
        """Says where it serves once the port is bound (port 0 names the one it got)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]
                console.print(
                    f"serving on http://{settings.host}:{port} (docs at /docs, metrics at /metrics)"
                )

    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )
    Server(config).run()


def _with_address(settings: Settings, host: str | None, port: int | None) -> Settings:
    updates = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    return settings.model_copy(update=updates)


@app.command()
def up(
    data_dir: DataDir = None,
    host: Host = None,
    port: Port = None,
    demo_: Annotated[
        bool,
        typer.Option(
            "--demo",
            help="Instead of serving: run the closed-loop demo (server + trainer + simulated "
            "users) in a fresh data dir (--data-dir, default ./palmchat-demo-courteous) on a "
            "free loopback port; same as `palmchat demo` with its defaults.",
        ),
    ] = False,
) -> None:
    """Start palmchat with the embedded defaults: SQLite + registry in the data dir, seed policy.

    Runs the database migrations, installs the bundled seed policy on first run, creates and
    prints a first admin API key, then serves the API, WebSocket and metrics.
    """
    openmp.serving_process()
    if demo_:
        from palmchat.simulate import demo

        demo(data_dir=data_dir)
        return
    setup_logging()
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.keys import create_key, has_admin_key

    settings = _with_address(settings_for(data_dir), host, port)
    try:
        prepared = prepare(settings)
        prepared.registry.verify(prepared.active_version)
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"data dir: {settings.data_dir.resolve()}")
    console.print(f"database: {settings.database_url}")
    console.print(f"active policy: {prepared.active_version}")
    if not has_admin_key(prepared.engine):
        key = create_key(prepared.engine, "admin", admin=True)
        console.print(f"first admin API key (shown once, store it): {key}")
    _serve(settings, auth=True)


@app.command()
def serve(
    data_dir: DataDir = None,
    host: Host = None,
    port: Port = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Skip API keys (only allowed on a loopback host).")
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="engine: run the policy in this process; process: run the engine core in a "
            "process of its own (the gateway's event loop and the step loop then do not share "
            "one interpreter); triton: use a Triton Inference Server (see `palmchat triton`) "
            "over gRPC streaming."
        ),
    ] = "engine",
    triton_url: Annotated[
        str,
        typer.Option(help="HOST:PORT of Triton's gRPC endpoint (with --backend triton)."),
    ] = "127.0.0.1:8001",
) -> None:
    """Run the API server (OpenAI-compatible REST + SSE, WebSocket, feedback, /metrics).

    With --backend triton the gateway runs no model: each chat is a gRPC stream to the
    `palmchat` model of the Triton server at --triton-url, and activating or rolling back a
    policy loads that version in Triton through its model-control API.
    """
    openmp.serving_process()
    setup_logging()
    if backend not in ("engine", "process", "triton"):
        fail(f"--backend must be engine, process or triton, got {backend!r}")
    host_part, sep, port_part = triton_url.rpartition(":")
    if backend == "triton" and (not sep or not host_part or not port_part.isdigit()):
        fail(f"--triton-url must be HOST:PORT, got {triton_url!r}")
    settings = _with_address(settings_for(data_dir), host, port)
    if backend == "triton":
        _serve(settings, auth=not no_auth, backend="triton", triton_url=triton_url)
    else:
        _serve(settings, auth=not no_auth, backend="process" if backend == "process" else "engine")


@app.command()
def triton(
    data_dir: DataDir = None,
    host: Annotated[str, typer.Option(help="Address Triton binds (gRPC and HTTP).")] = (
        "127.0.0.1"
    ),
    grpc_port: Annotated[int, typer.Option(help="gRPC port (what --triton-url names).")] = 8001,
    http_port: Annotated[int, typer.Option(help="HTTP/REST port (health, model control).")] = 8002,
    metrics_port: Annotated[
        int, typer.Option(min=0, help="Triton's own Prometheus metrics port (0 = off).")
    ] = 0,
    version: Annotated[
        str | None, typer.Option(help="Policy version to load (default: the active one).")
    ] = None,
    kv_cache_memory_mb: Annotated[
        float | None, typer.Option(help="KV-cache pool per loaded version (default: settings).")
    ] = None,
    num_threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads of the engine (default: all cores).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Model repository + backend files (default: <data dir>/triton)."),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="Append tritonserver's log here (default: stdout).")
    ] = None,
) -> None:
    """Start a Triton Inference Server that serves the policy (needs the triton extra).

    Runs the tritonserver binary of the nvidia-pytriton wheel (CPU or GPU) with the palmchat
    model: this project's engine (continuous batching, paged KV cache) inside Triton's Python
    backend, in decoupled mode (one request, a stream of token responses). Policy version vN
    is Triton model version N; it loads the active version (or --version) through the
    model-control API, and gateways started with `palmchat serve --backend triton
    --triton-url HOST:PORT` load later versions the same way. Ctrl-C stops it.
    """
    setup_logging()
    import signal
    import time

    from rich.markup import escape

    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError

    try:
        from server.triton.server import TritonServer, TritonUnavailable, pytriton_dir

        pytriton_dir()
    except Exception as e:  # the extra is missing
        fail(escape(str(e)))
    settings = settings_for(data_dir)
    try:
        prepared = prepare(settings)
        version = version or prepared.active_version
        prepared.registry.verify(version)
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
    from server.engine import EngineConfig

    given = {"kv_cache_memory_mb": kv_cache_memory_mb, "num_threads": num_threads}
    engine = built_or_fail(
        EngineConfig.from_settings, settings=settings, **{k: v for k, v in given.items() if v}
    )
    server = TritonServer(
        settings.registry_dir,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port or None,
        workdir=workdir or settings.data_dir / "triton",
        engine=engine,
        log_file=log_file,
        inherit_output=log_file is None,
    )

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # also when started with SIGINT ignored (nohup, &)
    console.print(f"starting tritonserver with policy {version} (loading takes a while)...")
    try:
        server.start(version)
    except TritonUnavailable as e:
        fail(escape(str(e)))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print(
        f"Triton serves palmchat {version} on gRPC {server.url} (HTTP {host}:{http_port}); "
        f"gateway: palmchat serve --backend triton --triton-url {server.url}"
    )
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        fail("tritonserver exited")
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()


def _remote_replier(
    url: str, api_key: str | None, params: dict[str, Any]
) -> Callable[[list[dict], Callable[[str], None]], str]:
    """Reply function that chats with a running server over its WebSocket, streaming deltas."""
    import json as _json

    from websockets.sync.client import connect

    ws_url = url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        ws = connect(f"{ws_url}/v1/chat/ws", additional_headers=headers, open_timeout=10)
        hello = _json.loads(ws.recv(timeout=10))
    except (OSError, TimeoutError) as e:
        fail(f"cannot reach {url}: {e}")
    if hello.get("type") != "ready":
        fail(hello.get("error", {}).get("message", f"unexpected reply {hello}"))

    def reply(history: list[dict], out) -> str:
        ws.send(_json.dumps({"type": "chat", "request_id": "cli", "messages": history, **params}))
        text = ""
        while True:
            frame = _json.loads(ws.recv())
            if frame["type"] == "delta":
                text += frame["content"]
                out(frame["content"])
            elif frame["type"] == "done":
                return text
            elif frame["type"] == "error":
                fail(frame["error"]["message"])

    return reply


@app.command()
def chat(
    data_dir: DataDir = None,
    url: Annotated[
        str | None, typer.Option(help="Chat with a running server (e.g. http://127.0.0.1:8000).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="PALMCHAT_API_KEY", help="Key for --url.")
    ] = None,
    version: Annotated[
        str | None, typer.Option(help="Local policy version (default: the active one).")
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 128,
    system: Annotated[str | None, typer.Option(help="Optional system message.")] = None,
    message: Annotated[
        list[str] | None, typer.Option("--message", "-m", help="Send these and exit (no prompt).")
    ] = None,
) -> None:
    """Terminal chat: with a local policy, or with a server over its WebSocket (--url).

    Type /reset to start over, /quit or Ctrl-D to leave.
    """
    if url:
        params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        replier = _remote_replier(url, api_key, params)
        banner = f"server {url}"
    else:
        from server.engine import SamplingParams
        from server.engine.offline import generate
        from shared.bootstrap import prepare
        from shared.checkpoints import CheckpointError
        from shared.tokenizer import apply_chat_template

        try:
            prepared = prepare(settings_for(data_dir))
            policy = prepared.registry.load(version or prepared.active_version)
        except (CheckpointError, FileNotFoundError) as e:
            fail(str(e))
        banner = f"policy {policy.version}"
        turns = itertools.count()  # a new seed each turn: asking again samples again

        def replier(history: list[dict], out) -> str:
            prompt = apply_chat_template(policy.tokenizer, history, add_generation_prompt=True)
            params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
            done = generate(policy.model, policy.tokenizer, [prompt], params, seed=next(turns))
            text = done[0].text
            out(text)
            return text

    history: list[dict] = [{"role": "system", "content": system}] if system else []
    scripted = list(message or [])
    if message is None:
        console.print(f"[dim]{banner}; /reset, /quit[/dim]")
    while True:
        if message is not None:
            if not scripted:
                return
            text = scripted.pop(0)
        else:
            try:
                text = console.input("[bold]you>[/bold] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
        if text.strip() in {"/quit", "/exit"}:
            return
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": text})
        console.print("[bold cyan]palm>[/bold cyan] ", end="")
        reply = replier(history, lambda piece: console.print(piece, end="", markup=False))
        console.print()
        history.append({"role": "assistant", "content": reply})
