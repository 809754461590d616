"""The ``palmchat`` command line: one entry point for the server, the trainer and operators.

Every command explains itself with ``--help``. Heavy imports (torch, the server) happen inside
the commands so ``palmchat --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

# Spinning OpenMP workers steal the cores from everything else on a shared CPU box and can make
# every op many times slower; must be set before torch is imported (none of the above does).
_OWN_WAIT_POLICY = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ...but a worker that sleeps between the ops of one step must be woken for each (tens of
# microseconds on a VM). Serving processes let a waiting worker spin this many rounds (tens of
# microseconds) first, so a wide decode step can use every core; the engine times whether that
# pays on the machine as it is (server/engine/cpu_kernels.py) and else stays on one thread.
SERVING_SPIN_COUNT = "2000"


def _serving_process() -> None:
    """Called by the commands that serve, before anything imports torch. OpenMP waits ACTIVE,
    bounded by ``GOMP_SPINCOUNT`` (2,000 rounds unless set): with PASSIVE, libgomp drops the
    spin to 0 once the process holds more OpenMP threads than cores, which a server always
    does (a team for the thread that built the engine, one for the engine's step thread);
    ACTIVE keeps min(1,000, GOMP_SPINCOUNT) rounds then. An operator's OMP_WAIT_POLICY, and
    their GOMP_SPINCOUNT (0: no spin), stand. KMP_BLOCKTIME bounds the same for an Intel
    OpenMP build of torch (1 ms)."""
    if not _OWN_WAIT_POLICY:
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", SERVING_SPIN_COUNT)
    os.environ.setdefault("KMP_BLOCKTIME", "1")


app = typer.Typer(
    help="palmchat: serve a PaLM chat policy, collect feedback, and improve it with RLHF.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
policies_app = typer.Typer(help="List, verify and import policy versions.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
bench_app = typer.Typer(
    help="Benchmarks; results are written as JSON under ops/bench/results/.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")
app.add_typer(policies_app, name="policies")
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")

console = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="Data directory (default: $PALMCHAT_DATA_DIR or ./palmchat-data)."
    ),
]


def _settings(data_dir: Path | None = None):
    from shared.config import Settings

    return Settings(data_dir=data_dir) if data_dir is not None else Settings()


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def _logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


Host = Annotated[
    str | None, typer.Option(help="Bind address (default $PALMCHAT_HOST or 127.0.0.1).")
]
Port = Annotated[int | None, typer.Option(help="Port (default $PALMCHAT_PORT or 8000).")]


def _serve(settings, *, auth: bool, **extras) -> None:
    import uvicorn

    from server.api.app import create_app

    try:
        app = create_app(settings, auth=auth, **extras)
    except ValueError as e:
        _fail(str(e))
    console.print(
        f"serving on http://{settings.host}:{settings.port} (docs at /docs, metrics at /metrics)"
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())


def _with_address(settings, host: str | None, port: int | None):
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
            "users) in the data dir; same as `palmchat demo` with its defaults.",
        ),
    ] = False,
) -> None:
    """Start palmchat with the embedded defaults: SQLite + registry in the data dir, seed policy.

    Runs the database migrations, installs the bundled seed policy on first run, creates and
    prints a first admin API key, then serves the API, WebSocket and metrics.
    """
    _serving_process()
    if demo_:
        demo(data_dir=data_dir)
        return
    _logging()
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.keys import create_key, has_admin_key

    settings = _with_address(_settings(data_dir), host, port)
    try:
        prepared = prepare(settings)
        prepared.registry.verify(prepared.active_version)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
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
            help="engine: run the policy in this process; triton: use a Triton Inference "
            "Server (see `palmchat triton`) over gRPC streaming."
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
    _serving_process()
    _logging()
    if backend not in ("engine", "triton"):
        _fail(f"--backend must be engine or triton, got {backend!r}")
    host_part, sep, port_part = triton_url.rpartition(":")
    if backend == "triton" and (not sep or not host_part or not port_part.isdigit()):
        _fail(f"--triton-url must be HOST:PORT, got {triton_url!r}")
    extras = {"backend": "triton", "triton_url": triton_url} if backend == "triton" else {}
    _serve(_with_address(_settings(data_dir), host, port), auth=not no_auth, **extras)


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
    _logging()
    import signal
    import time

    from rich.markup import escape

    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError

    try:
        from server.triton.server import TritonServer, TritonUnavailable, pytriton_dir

        pytriton_dir()
    except Exception as e:  # the extra is missing
        _fail(escape(str(e)))
    settings = _settings(data_dir)
    try:
        prepared = prepare(settings)
        version = version or prepared.active_version
        prepared.registry.verify(version)
    except (CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    engine: dict = {
        "kv_cache_memory_mb": kv_cache_memory_mb or settings.kv_cache_memory_mb,
        "max_waiting": settings.max_waiting,
        "device": settings.device,
    }
    if num_threads:
        engine["num_threads"] = num_threads
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
        _fail(escape(str(e)))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print(
        f"Triton serves palmchat {version} on gRPC {server.url} (HTTP {host}:{http_port}); "
        f"gateway: palmchat serve --backend triton --triton-url {server.url}"
    )
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(0.5)
        _fail("tritonserver exited")
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()


def _remote_replier(url: str, api_key: str | None, params: dict):
    """Reply function that chats with a running server over its WebSocket, streaming deltas."""
    import json as _json

    from websockets.sync.client import connect

    ws_url = url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        ws = connect(f"{ws_url}/v1/chat/ws", additional_headers=headers, open_timeout=10)
        hello = _json.loads(ws.recv(timeout=10))
    except (OSError, TimeoutError) as e:
        _fail(f"cannot reach {url}: {e}")
    if hello.get("type") != "ready":
        _fail(hello.get("error", {}).get("message", f"unexpected reply {hello}"))

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
                _fail(frame["error"]["message"])

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
        from shared.bootstrap import prepare
        from shared.checkpoints import CheckpointError
        from shared.generate import generate_replies

        try:
            prepared = prepare(_settings(data_dir))
            policy = prepared.registry.load(version or prepared.active_version)
        except (CheckpointError, FileNotFoundError) as e:
            _fail(str(e))
        banner = f"policy {policy.version}"

        def replier(history: list[dict], out) -> str:
            text = generate_replies(
                policy.model,
                policy.tokenizer,
                [history],
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
            )[0]
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


@app.command()
def pretrain(
    data_dir: DataDir = None,
    preset: Annotated[str, typer.Option(help="Model size preset: tiny, small, base.")] = "small",
    steps: Annotated[int, typer.Option(min=1)] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-3,
    warmup: Annotated[int, typer.Option(min=0)] = 100,
    vocab_size: Annotated[int, typer.Option(min=261)] = 2048,
    max_seq_len: Annotated[int, typer.Option(min=16)] = 256,
    seed: int = 0,
    data: Annotated[
        Path | None,
        typer.Option(help='JSONL of {"messages": [...]}; default: synthetic chat tasks.'),
    ] = None,
    train_examples: Annotated[
        int, typer.Option(min=1, help="Synthetic conversations to draw.")
    ] = 40000,
    eval_every: Annotated[int, typer.Option(min=1)] = 200,
    work_dir: Annotated[
        Path | None, typer.Option(help="Resumable state (default: <data>/pretrain).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N].")] = "cpu",
    dim: Annotated[int | None, typer.Option(help="Override the preset's width.")] = None,
    depth: Annotated[int | None, typer.Option(help="Override the preset's depth.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish the result to the registry.")] = True,
) -> None:
    """Pretrain / SFT a policy (loss on assistant tokens) and publish it to the registry."""
    _logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)  # eval lines also reach non-tty logs
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from shared.checkpoints import PolicyRegistry
    from trainer.pretrain import PretrainConfig
    from trainer.pretrain import pretrain as run

    if data is not None and not data.is_file():
        _fail(f"{data}: no such file")
    overrides = {k: v for k, v in (("dim", dim), ("depth", depth)) if v is not None}
    try:
        cfg = PretrainConfig(
            preset=preset,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            warmup_steps=warmup,
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            seed=seed,
            data=str(data) if data else None,
            train_examples=train_examples,
            eval_every=eval_every,
            model_overrides=overrides,
        )
    except ValueError as e:
        _fail(str(e))
    settings = _settings(data_dir)
    with Progress(
        TextColumn("pretrain"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("pretrain", total=steps, info="")

        def progress(step: int, m: dict[str, float]) -> None:
            bar.update(
                task,
                completed=step,
                info=f"loss {m['loss']:.3f} eval {m['eval_loss']:.3f} "
                f"lr {m['lr']:.2e} {m['tok_s']:.0f} tok/s",
            )

        try:
            result = run(
                cfg,
                PolicyRegistry(settings.registry_dir),
                work_dir=work_dir or settings.data_dir / "pretrain",
                device=device,
                progress=progress,
                publish=publish,
            )
        except ValueError as e:
            _fail(str(e))
    console.print_json(json.dumps(result.__dict__))


def _trainer_overrides(settings: list[str]) -> dict:
    """``--set KEY=VALUE`` items as TrainerConfig fields (VALUE read as JSON when it is)."""
    import dataclasses

    from trainer.config import TrainerConfig

    fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    values: dict = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            _fail(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def _trainer_config(
    algo: str,
    min_new: int,
    poll: float,
    device: str,
    lora_rank: int,
    seed: int,
    settings: list[str],
):
    from trainer.config import TrainerConfig

    values: dict = dict(
        algo=algo, min_new_feedback=min_new, poll_seconds=poll, device=device,
        lora_rank=lora_rank, seed=seed,
    )  # fmt: skip
    values.update(_trainer_overrides(settings))
    try:
        return TrainerConfig(**values)
    except (TypeError, ValueError) as e:
        _fail(str(e))


@app.command()
def trainer(
    data_dir: DataDir = None,
    once: Annotated[bool, typer.Option("--once", help="Run one round now, then exit.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Poll and train whenever --min-new items arrived.")
    ] = False,
    algo: Annotated[str, typer.Option(help="Policy update: dpo, ppo or kto.")] = "dpo",
    min_new: Annotated[
        int, typer.Option(min=1, help="--watch: new feedback items that trigger a round.")
    ] = 32,
    poll: Annotated[float, typer.Option(min=0.1, help="--watch: seconds between polls.")] = 10.0,
    max_rounds: Annotated[
        int | None, typer.Option(min=1, help="--watch: stop after this many rounds.")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(min=0, help="Trainer /metrics port on $PALMCHAT_HOST (0 = off).")
    ] = 9101,
    device: Annotated[
        str, typer.Option(help="cpu or cuda (each torchrun rank its own GPU).")
    ] = "cpu",
    lora_rank: Annotated[int, typer.Option(min=0, help="LoRA rank (0 = full fine-tuning).")] = 0,
    seed: int = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any TrainerConfig field, e.g. --set ppo_iterations=2."),
    ] = None,
) -> None:
    """Online RLHF trainer: learn from the feedback in the database, publish better policies.

    Each round trains a reward model on thumbs and rankings, improves the active policy
    (DPO, PPO or KTO), gates the candidate against the active policy on held-out prompts
    (reward up, KL to the reference bounded, correctness kept) and publishes + activates it or
    records it as rejected. Running servers hot-swap to the new version. Safe to kill at any
    point. Runs under `torchrun --nproc_per_node=N -m shared.cli trainer ...` with DDP.
    """
    _logging("WARNING")
    logging.getLogger("trainer").setLevel(logging.INFO)
    if once == watch:
        _fail("give exactly one of --once and --watch")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from shared.checkpoints import CheckpointError
    from trainer.common import init_distributed
    from trainer.loop import OnlineTrainer, RoundResult
    from trainer.metrics import TrainerMetrics

    cfg = _trainer_config(algo, min_new, poll, device, lora_rank, seed, set_ or [])
    settings = _settings(data_dir)
    info = init_distributed(cfg.device)
    metrics = TrainerMetrics()
    if info.is_main and metrics_port:
        try:
            metrics.serve(metrics_port, addr=settings.host)
        except OSError as e:
            _fail(f"cannot serve trainer metrics on port {metrics_port}: {e}")
    bars = Progress(
        TextColumn("{task.description:<13}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not info.is_main,
    )
    tasks: dict[str, int] = {}

    def progress(phase: str, done: int, total: int, text: str) -> None:
        if phase not in tasks:
            tasks[phase] = bars.add_task(phase, total=total, info="")
        bars.update(tasks[phase], completed=done, total=total, info=text)

    def report(result: RoundResult) -> None:
        for task_id in tasks.values():
            bars.remove_task(task_id)
        tasks.clear()
        if not info.is_main:
            return
        if result.status == "skipped":
            console.print(f"round skipped: {'; '.join(result.reasons)}")
            return
        gate = result.metrics.get("gate", {})
        cand, act = gate.get("candidate", {}), gate.get("active", {})
        acc, n_held = result.rm_accuracy, result.rm_heldout_pairs
        console.print(
            f"round {result.run_id} [{cfg.algo}] {result.status}: "
            f"{result.candidate_version or '-'} (parent {result.base_version}), "
            f"{result.n_feedback} new items, RM held-out acc "
            f"{'-' if acc is None else f'{acc:.3f} of {n_held} pairs'}, "
            f"reward {cand.get('reward', 0):+.3f} vs "
            f"{act.get('reward', 0):+.3f}, KL {cand.get('kl', 0):.2f}, correct "
            f"{cand.get('correct_rate', 0):.3f} vs {act.get('correct_rate', 0):.3f}, "
            f"{result.seconds:.0f}s"
            + (
                f", published at {result.metrics['step_fraction']:g} of its step"
                if result.status == "published" and result.metrics.get("step_fraction", 1.0) != 1.0
                else ""
            )
        )
        for reason in result.reasons:
            console.print(f"  rejected: {reason}")

    try:
        with bars:
            runner = OnlineTrainer(settings, cfg, progress=progress, metrics=metrics, info=info)
            if once:
                result = runner.run_round(force=True)
                report(result)
                if info.is_main:
                    console.print_json(json.dumps(result.to_dict(), default=str))
            else:
                if info.is_main:
                    console.print(
                        f"trainer watching (algo {cfg.algo}, min {cfg.min_new_feedback} new "
                        f"items, poll {cfg.poll_seconds}s"
                        + (f", metrics on :{metrics_port}/metrics)" if metrics_port else ")")
                    )
                try:
                    runner.watch(max_rounds=max_rounds, on_round=report)
                except KeyboardInterrupt:
                    console.print("trainer stopped")
    except (CheckpointError, FileNotFoundError) as e:
        _fail(str(e))


@policies_app.command("list")
def policies_list(data_dir: DataDir = None) -> None:
    """List versions with status, parent, feedback count and thumbs-up rate."""
    from shared.bootstrap import prepare
    from shared.policies import list_policies

    prepared = prepare(_settings(data_dir))
    for p in list_policies(prepared.engine, prepared.registry):
        rate = "-" if p["thumbs_up_rate"] is None else f"{p['thumbs_up_rate']:.2f}"
        typer.echo(
            f"{p['version']}\t{p['status']}\tparent={p['parent']}\t"
            f"feedback={p['feedback_count']}\tup_rate={rate}"
        )


@policies_app.command("activate")
def policies_activate(
    version: Annotated[str, typer.Argument(help="Version to serve, e.g. v3.")],
    data_dir: DataDir = None,
) -> None:
    """Make VERSION the active policy (running servers hot-swap to it within seconds)."""
    from shared.bootstrap import prepare
    from shared.checkpoints import CheckpointError
    from shared.policies import activate
    from shared.store import NotFound

    prepared = prepare(_settings(data_dir))
    try:
        previous = activate(prepared.engine, prepared.registry, version)
    except (CheckpointError, NotFound) as e:
        _fail(str(e))
    typer.echo(f"active: {version} (was {previous or version})")


@policies_app.command("rollback")
def policies_rollback(data_dir: DataDir = None) -> None:
    """Re-activate the previously active version."""
    from shared.bootstrap import prepare
    from shared.policies import rollback
    from shared.store import NotFound

    prepared = prepare(_settings(data_dir))
    try:
        old, new = rollback(prepared.engine, prepared.registry)
    except NotFound as e:
        _fail(str(e))
    typer.echo(f"active: {new} (was {old})")


@policies_app.command("verify")
def policies_verify(
    version: Annotated[str, typer.Argument(help="Version to check, e.g. v3.")],
    data_dir: DataDir = None,
) -> None:
    """Re-hash a version's files against its manifest and load it."""
    from shared.checkpoints import CheckpointError, PolicyRegistry

    registry = PolicyRegistry(_settings(data_dir).registry_dir)
    try:
        policy = registry.load(version)
    except CheckpointError as e:
        _fail(str(e))
    params, kind = policy.model.num_params(), policy.tokenizer.kind
    console.print(f"{version}: ok ({params:,} parameters, {kind} tokenizer)")


@policies_app.command("import-palm")
def policies_import_palm(
    path: Annotated[Path, typer.Argument(help="A torch.save'd palm_rlhf_pytorch.PaLM state_dict.")],
    data_dir: DataDir = None,
    xpos_scale_base: Annotated[int, typer.Option(help="The model's rotary_xpos_scale_base.")] = 512,
    max_seq_len: Annotated[int, typer.Option(min=1, help="Context length to serve with.")] = 1024,
) -> None:
    """Import a PaLM-rlhf-pytorch checkpoint as a new version with the byte tokenizer.

    The file is read with torch.load(weights_only=True): no code in it is ever run.
    """
    from shared.checkpoints import PolicyRegistry, import_palm_state_dict
    from shared.db import init_db
    from shared.policies import register_version

    settings = _settings(data_dir)
    registry = PolicyRegistry(settings.registry_dir)
    try:
        version = import_palm_state_dict(
            registry, path, xpos_scale_base=xpos_scale_base, max_seq_len=max_seq_len
        )
    except ValueError as e:
        _fail(str(e))
    register_version(init_db(settings.database_url), registry, version, status="candidate")
    console.print(f"imported {path} as {version} (status candidate)")


@policies_app.command("export")
def policies_export(
    version: Annotated[str, typer.Argument(help="Version to export, e.g. v3.")],
    dest: Annotated[Path, typer.Argument(help="Directory to create with the version's files.")],
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16 weights.")] = "float32",
    data_dir: DataDir = None,
) -> None:
    """Copy a verified version out of the registry (backups; the bundled seed is made this way)."""
    from shared.checkpoints import CheckpointError, PolicyRegistry

    registry = PolicyRegistry(_settings(data_dir).registry_dir)
    try:
        path = registry.export(version, dest, dtype=dtype)
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"exported {version} to {path} ({dtype})")


@db_app.command("upgrade")
def db_upgrade(
    data_dir: DataDir = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Run the Alembic migrations on $PALMCHAT_DATABASE_URL (default: SQLite in the data dir)."""
    from shared.db import DatabaseError, current_revision, upgrade

    settings = _settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        upgrade(settings.database_url, revision)
        console.print(f"database at revision {current_revision(settings.database_url)}")
    except DatabaseError as e:
        _fail(str(e))


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="User name the key belongs to (created if new).")],
    admin: Annotated[bool, typer.Option("--admin", help="Give the key the admin role.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print it. Only its hash is stored: it cannot be shown again."""
    from shared.db import DatabaseError, init_db
    from shared.keys import create_key

    settings = _settings(data_dir)
    try:
        key = create_key(init_db(settings.database_url), user, admin=admin)
    except (ValueError, DatabaseError) as e:
        _fail(str(e))
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: DataDir = None) -> None:
    """List keys by user and display prefix (the keys themselves are not stored)."""
    from shared.db import init_db
    from shared.keys import list_keys

    for user, prefix, is_admin, revoked in list_keys(init_db(_settings(data_dir).database_url)):
        flags = ",".join(f for f, on in (("admin", is_admin), ("revoked", revoked)) if on)
        typer.echo(f"{user}\t{prefix}\t{flags}")


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[
        str, typer.Argument(help="The key, or its 8-character prefix from `keys list`.")
    ],
    data_dir: DataDir = None,
) -> None:
    """Revoke a key; it stops working at once."""
    from shared.db import init_db
    from shared.keys import revoke_key

    try:
        n = revoke_key(init_db(_settings(data_dir).database_url), prefix)
    except ValueError as e:
        _fail(str(e))
    if n == 0:
        _fail(f"no live key with prefix {prefix[:8]!r}")
    typer.echo(f"revoked {n} key(s)")


@app.command()
def simulate(
    url: Annotated[str, typer.Option(help="Server base URL, e.g. http://127.0.0.1:8000.")],
    api_key: Annotated[
        str, typer.Option(envvar="PALMCHAT_API_KEY", help="API key the users chat with.")
    ],
    users: Annotated[int, typer.Option(min=1, help="Concurrent simulated users.")] = 4,
    minutes: Annotated[float, typer.Option(min=0.01, help="How long to run.")] = 1.0,
    max_requests: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many chats.")
    ] = None,
    preference: Annotated[
        str, typer.Option(help="What the scripted users like: courteous or concise.")
    ] = "courteous",
    rank_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of chats with n=2..4 ranked.")
    ] = 0.3,
    seed: int = 0,
    out: Annotated[Path, typer.Option(help="JSON report.")] = Path(
        "ops/bench/results/simulate-latest.json"
    ),
) -> None:
    """Scripted users chat through the API (REST, SSE, WebSocket), give thumbs and rankings, and
    report the thumbs-up rate per policy version."""
    import asyncio

    from shared.simulator import SimConfig, run_simulation

    try:
        cfg = SimConfig(
            url=url,
            api_key=api_key,
            users=users,
            minutes=minutes,
            max_requests=max_requests,
            preference=preference,
            rank_fraction=rank_fraction,
            seed=seed,
        )
    except ValueError as e:
        _fail(str(e))
    report = asyncio.run(run_simulation(cfg, out))
    for version, row in report.per_version.items():
        typer.echo(
            f"{version}\treplies={row['replies']}\tthumbs_up_rate={row['thumbs_up_rate']:.3f}"
        )
    typer.echo(
        f"chats={report.chats} feedback={report.feedback_sent} rankings={report.rankings_sent} "
        f"errors={len(report.errors)} -> {out}"
    )
    if report.chats == 0:
        _fail("no chat succeeded: " + "; ".join(report.errors[:3]))


@app.command()
def demo(
    data_dir: DataDir = None,
    preference: Annotated[
        str, typer.Option(help="What the simulated users like: courteous or concise.")
    ] = "courteous",
    minutes: Annotated[
        float, typer.Option(min=0.1, help="Loop time budget; no round starts after it.")
    ] = 30.0,
    rounds: Annotated[int, typer.Option(min=1, help="Trainer rounds at most.")] = 8,
    chats_per_round: Annotated[
        int, typer.Option(min=1, help="Feedback items the users leave before each round.")
    ] = 96,
    users: Annotated[int, typer.Option(min=1, help="Concurrent simulated users.")] = 4,
    eval_prompts: Annotated[
        int, typer.Option(min=1, help="Fresh held-out prompts each version is measured on.")
    ] = 128,
    algo: Annotated[str, typer.Option(help="Trainer algorithm: dpo, ppo or kto.")] = "dpo",
    seed: int = 0,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="TrainerConfig overrides for the trainer, KEY=VALUE."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON report and PNG plot.")] = Path(
        "ops/bench/results"
    ),
) -> None:
    """Closed-loop demo on this machine: the server, a `palmchat trainer --watch` process and
    scripted users who chat, thumb and rank through the API. Prints the thumbs-up rate of each
    policy version on fresh prompts as the trainer publishes them, and writes
    demo-<preference>-latest.json / .png under --out.

    Uses a fresh data dir (default: ./palmchat-demo-<preference>) so the demo starts from the
    seed policy; the trainer's log is <data dir>/trainer.log.
    """
    _serving_process()
    _logging("WARNING")
    from trainer.demo import DemoConfig, run_demo

    overrides = _trainer_overrides(set_ or [])
    _trainer_config(algo, 1, 1.0, "cpu", 0, seed, set_ or [])  # validates the overrides
    root = data_dir or Path(f"palmchat-demo-{preference}")
    if (root / "palmchat.db").exists():
        _fail(f"{root} already holds a palmchat database; give a fresh --data-dir")
    try:
        cfg = DemoConfig(
            data_dir=root,
            preference=preference,
            rounds=rounds,
            minutes=minutes,
            chats_per_round=chats_per_round,
            users=users,
            eval_prompts=eval_prompts,
            algo=algo,
            trainer_set=overrides,
            seed=seed,
            out_dir=out,
        )
    except ValueError as e:
        _fail(str(e))
    report = run_demo(cfg, log=console.print)
    console.print(
        f"thumbs-up rate on fresh prompts: {report.start_rate:.1%} ({report.evals[0].version}) "
        f"-> {report.best.thumbs_up_rate:.1%} ({report.best.version}), "
        f"{report.lift_points:+.1f} points in {report.loop_seconds / 60:.1f} min of loop; "
        f"probe: {report.probe['requests']} streamed requests, {report.probe['failures']} failed"
    )
    console.print(f"report and plot: {out}/demo-{preference}-latest.json / .png")


@bench_app.command("engine")
def bench_engine(
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per request.")] = 256,
    no_hf: Annotated[bool, typer.Option("--no-hf", help="Skip HF transformers' Llama.")] = False,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Skip PaLM-rlhf-pytorch's generate.")
    ] = False,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("ops/bench/results"),
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Rounds: each runs every contender once (interleaved, so a slow spell of the "
            "machine hits all alike); each contender reports its best run.",
        ),
    ] = 3,
    device: Annotated[
        str,
        typer.Option(
            help="cpu, or cuda[:N]: every contender on that GPU in bfloat16; adds the engine "
            "without CUDA graphs and batch-1 decode vs the card's bandwidth roofline "
            "(results as engine-cuda-*.json)."
        ),
    ] = "cpu",
) -> None:
    """This engine at 1/8/32/64 concurrent requests vs one-at-a-time, PaLM-rlhf-pytorch's
    generate and HF transformers' Llama generate, on the same weights and prompts."""
    _serving_process()
    from server.engine.bench import run_engine_benchmark

    if not device.startswith(("cpu", "cuda")):
        raise typer.BadParameter(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("--device cuda: this machine's PyTorch sees no CUDA GPU")
    results = run_engine_benchmark(
        new_tokens=new_tokens,
        include_hf=not no_hf,
        include_reference=not no_reference,
        out_dir=out,
        repeats=repeats,
        device=device,
    )
    console.print_json(json.dumps({k: results[k] for k in ("engine", "targets") if k in results}))


@bench_app.command("api")
def bench_api(
    streams: Annotated[int, typer.Option(min=1, help="Concurrent SSE streams.")] = 32,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens per stream.")] = 128,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("ops/bench/results"),
    backend: Annotated[
        str,
        typer.Option(
            help="engine: engine alone vs the API; triton: also through a gateway whose "
            "backend is a tritonserver on loopback (needs the triton extra)."
        ),
    ] = "engine",
) -> None:
    """Concurrent SSE streams through uvicorn vs the engine alone (same run): tokens/s, TTFT.

    With --backend triton the same streams also go through a gateway backed by a real
    tritonserver, reported next to the in-process gateway.
    """
    _serving_process()
    _logging("WARNING")
    from rich.markup import escape

    from server.api.bench import run_api_benchmark

    if backend not in ("engine", "triton"):
        _fail(f"--backend must be engine or triton, got {backend!r}")
    if backend == "triton":
        try:
            from server.triton.server import pytriton_dir

            pytriton_dir()
        except Exception as e:
            _fail(escape(str(e)))
    results = run_api_benchmark(streams, new_tokens, out_dir=out, backend=backend)
    console.print_json(json.dumps(results))


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
