"""``palmchat bench``: the engine and API benchmarks (JSON under ops/bench/results/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from palmchat.common import app, console, fail, setup_logging
from server.engine import openmp

bench_app = typer.Typer(
    help="Benchmarks; results are written as JSON under ops/bench/results/.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


def _checked_device(device: str | None) -> str:
    """The --device value as the benchmarks take it, or a clean usage error."""
    from bench.engine import check_device

    try:
        return check_device(device)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


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
            "machine hits all alike); each contender reports its best run and its median "
            "(the targets use the medians).",
        ),
    ] = 5,
    device: Annotated[
        str,
        typer.Option(
            help="cpu, or cuda[:N]: every contender on that GPU in bfloat16; adds the engine "
            "without CUDA graphs and batch-1 decode vs the card's bandwidth roofline "
            "(results as engine-cuda-*.json)."
        ),
    ] = "cpu",
) -> None:
    """The engine at 1/8/32/64 concurrent requests vs one at a time and vs other generators.

    The baselines run on the same weights and prompts: PaLM-rlhf-pytorch's generate and HF
    transformers' Llama generate.
    """
    openmp.serving_process()
    from bench.engine import run_engine_benchmark

    device = _checked_device(device)
    results = run_engine_benchmark(
        new_tokens=new_tokens,
        include_hf=not no_hf,
        include_reference=not no_reference,
        out_dir=out,
        repeats=repeats,
        device=device,
    )
    console.print_json(json.dumps({k: results[k] for k in ("engine", "targets") if k in results}))


@bench_app.command("deployed")
def bench_deployed(
    tiny: Annotated[
        bool, typer.Option("--tiny", help="Tiny models: every measurement in seconds on a CPU.")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda[:N] (default: cuda when there is a GPU).")
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="Interleaved rounds; every figure is their median.")
    ] = 5,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("ops/bench/results"),
) -> None:
    """~1B PaLM and Llama-family models in bfloat16: decode vs the bandwidth roofline and HF.

    Also prefill tokens/s and the time of one DPO/LoRA step (``python -m bench.deployed``
    has the finer options: batch sizes, new tokens, threads).
    """
    openmp.serving_process()
    from bench.deployed import report_table, run_deployed_benchmark

    device = _checked_device(device)
    results = run_deployed_benchmark(
        size="tiny" if tiny else "1b", device=device, repeats=repeats, out_dir=out
    )
    console.print(report_table(results))


@bench_app.command("guided")
def bench_guided(
    batch: Annotated[int, typer.Option(min=1, help="Concurrent requests.")] = 32,
    new_tokens: Annotated[int, typer.Option(min=3, help="Tokens generated per request.")] = 96,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved rounds (median).")] = 5,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("ops/bench/results"),
) -> None:
    """Constrained decoding (JSON schema, regex) vs free decoding: the masks' cost in tokens/s.

    Same engine and batch, interleaved rounds, medians."""
    openmp.serving_process()
    from bench.guided import run_guided_benchmark

    results = run_guided_benchmark(
        batch, new_tokens, repeats, out_dir=out, progress=lambda m: console.print(m)
    )
    keys = ("tokens_per_s_median", "constrained_vs_unconstrained", "every_output_valid", "targets")
    console.print_json(json.dumps({k: results[k] for k in keys}))


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
    short_rounds: Annotated[
        int,
        typer.Option(
            min=0,
            help="Interleaved rounds of the short-chat workload (the streams' count of "
            "non-streaming chats with 5-30 token answers: engine alone, API all at once, API "
            "one at a time); 0 skips it.",
        ),
    ] = 5,
    client_process: Annotated[
        bool,
        typer.Option(
            help="Run the HTTP client in a process of its own (as a deployment's clients are) "
            "rather than in the server's interpreter."
        ),
    ] = True,
    moderation_rounds: Annotated[
        int,
        typer.Option(
            min=0,
            help="Interleaved rounds of streamed chats with moderation in block mode vs off "
            "(TTFT); 0 skips it.",
        ),
    ] = 5,
    stream_rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Interleaved rounds of the long streams (engine alone, through the API with "
            "the engine in process, with the engine core in a process of its own).",
        ),
    ] = 5,
) -> None:
    """Concurrent SSE streams through uvicorn vs the engine alone (same run): tokens/s, TTFT.

    With --backend triton the same streams also go through a gateway backed by a real
    tritonserver, reported next to the in-process gateway.
    """
    openmp.serving_process()
    setup_logging("WARNING")
    from rich.markup import escape

    from bench.api import run_api_benchmark

    if backend not in ("engine", "triton"):
        fail(f"--backend must be engine or triton, got {backend!r}")
    if backend == "triton":
        try:
            from server.triton.server import pytriton_dir

            pytriton_dir()
        except Exception as e:
            fail(escape(str(e)))
    results = run_api_benchmark(
        streams,
        new_tokens,
        out_dir=out,
        backend=backend,
        short_rounds=short_rounds,
        client_process=client_process,
        moderation_rounds=moderation_rounds,
        stream_rounds=stream_rounds,
    )
    console.print_json(json.dumps(results))
