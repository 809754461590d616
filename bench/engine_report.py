"""The benchmark report: issue 4's targets, the table docs/benchmarks.md shows, JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def targets(r: dict[str, Any]) -> dict[str, Any]:
    def tps(section: str, key: str) -> float | None:
        value = r.get(section, {}).get(key)
        if not isinstance(value, dict):
            return None
        median = value.get("median_tokens_per_s")
        return float(value["tokens_per_s"] if median is None else median)

    out: dict[str, Any] = {}
    for name in ("engine", "engine_async"):
        b1, b32 = tps(name, "1"), tps(name, "32")
        seq = r["one_at_a_time"]["tokens_per_s"]
        checks = {"batch32_vs_one_at_a_time": (b32 / seq if b32 else None, 12.0)}
        if (hf1 := tps("hf_llama", "1")) and b1:
            checks["batch1_vs_hf"] = (b1 / hf1, 1.5)
        if (hf32 := tps("hf_llama", "32")) and b32:
            checks["batch32_vs_hf"] = (b32 / hf32, 1.5)
        if (ref := tps("palm_rlhf_pytorch", "1")) and b1:
            checks["batch1_vs_palm_rlhf_pytorch"] = (b1 / ref, 6.0)
        out[name] = {
            k: {"ratio": round(v, 2), "target": t, "met": v >= t}
            for k, (v, t) in checks.items()
            if v is not None
        }
    if (pct := r.get("roofline", {}).get("engine_batch1_pct_of_roofline")) is not None:
        out["batch1_pct_of_bandwidth_bound"] = {"ratio": pct, "target": 50, "met": pct >= 50}
    ratio = r["prefix_cache"]["ratio"]
    out["prefix_cache_n4_vs_1"] = {"ratio": ratio, "target": "< 1.5", "met": ratio < 1.5}
    return out


def markdown_table(r: dict[str, Any]) -> str:
    """The table of docs/benchmarks.md: generated tokens/s by concurrency for every contender."""

    def cell(section: str, key: str) -> str:
        value = r.get(section, {}).get(key)
        return f"{value['tokens_per_s']:,.0f}" if isinstance(value, dict) else "-"

    keys = sorted({k for s in ("engine", "hf_llama") for k in r.get(s, {}) if k.isdigit()}, key=int)
    rows = [
        ("palmchat engine (continuous batching)", "engine"),
        ("palmchat engine via AsyncEngine streams", "engine_async"),
        ("palmchat engine without CUDA graphs", "engine_eager"),
        ("palmchat engine, decode steps on one thread", "engine_one_thread"),
        ("HF transformers Llama `generate` (same size, random weights)", "hf_llama"),
        ("PaLM-rlhf-pytorch `generate` (same weights, no KV cache)", "palm_rlhf_pytorch"),
    ]
    lines = [
        "| generated tokens/s | " + " | ".join(f"{k} concurrent" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for label, section in rows:
        if section in r:
            lines.append(f"| {label} | " + " | ".join(cell(section, k) for k in keys) + " |")
    one = r["one_at_a_time"]["tokens_per_s"]
    lines.append(
        f"| palmchat engine, one request at a time | {one:,.0f} |" + " |" * (len(keys) - 1)
    )
    return "\n".join(lines)


def write_results(
    results: dict[str, Any], out_dir: Path, name: str = "engine", plot: bool = True
) -> Path:
    """``{name}-{time}.json``, and the same as ``{name}-latest.json`` (with its PNG plot of
    the engine's contenders when ``plot``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["created_at"].replace(":", "").replace("+0000", "")
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"{name}-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    if plot:
        _plot(results, out_dir / f"{name}-latest.png")
    return path


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (
        ("engine", "palmchat engine"),
        ("engine_async", "engine (async front)"),
        ("engine_eager", "engine without CUDA graphs"),
        ("engine_one_thread", "engine, decode on one thread"),
        ("hf_llama", "HF transformers Llama"),
    ):
        points = sorted(
            (int(k), v["tokens_per_s"]) for k, v in r.get(name, {}).items() if isinstance(v, dict)
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    for name, label in (("one_at_a_time", "engine, one at a time"),):
        ax.axhline(r[name]["tokens_per_s"], ls="--", color="gray", label=label)
    if "palm_rlhf_pytorch" in r:
        ax.axhline(
            r["palm_rlhf_pytorch"]["1"]["tokens_per_s"],
            ls=":",
            color="red",
            label="PaLM-rlhf-pytorch generate (batch 1)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (batch)")
    ax.set_ylabel("generated tokens / s")
    where = r["machine"].get("gpu") or f"{r['machine']['cpu_threads']} CPU threads"
    ax.set_title(
        f"{r['model']['params'] / 1e6:.1f}M params, {r['new_tokens']} new tokens, {where}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
