"""Engine configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from shared.config import Settings


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs.

    ``kv_cache_memory_mb`` sizes each loaded policy's block pool (``num_blocks`` overrides it,
    for tests). ``max_batched_tokens`` bounds a prefill step as rows x longest new prompt part.
    ``max_waiting`` bounds the waiting queue; beyond it requests are refused as overloaded.
    """

    block_size: int = 16
    kv_cache_memory_mb: float = 256.0
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_batched_tokens: int = 4096
    max_waiting: int = 256
    device: str = "auto"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    num_threads: int | None = None  # CPU: torch threads; None means every core
    # CPU decode steps of 16-127 rows: None runs them on one thread or on num_threads, whichever
    # is timed faster now and then (server/engine/cpu_kernels.py); a number pins them to it
    decode_threads: int | None = None
    # fixed-shape decode steps by batch bucket (server/engine/cuda_graphs.py), recorded as CUDA
    # graphs: None means on for CUDA, off on CPU; True on CPU runs the same path eagerly
    cuda_graphs: bool | None = None
    seed: int = 0  # for requests that give no seed

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory_mb <= 0:
            raise ValueError(
                f"EngineConfig.kv_cache_memory_mb must be > 0, got {self.kv_cache_memory_mb}"
            )
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"EngineConfig.num_blocks must be >= 1, got {self.num_blocks}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"EngineConfig.dtype must be auto/float32/bfloat16/float16, got {self.dtype!r}"
            )
        for name in ("num_threads", "decode_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(
                f"EngineConfig.device must be auto, cpu or cuda[:N], got {self.device!r}"
            )

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EngineConfig:
        """The engine options that ``settings`` hold (``PALMCHAT_KV_CACHE_MEMORY_MB``,
        ``PALMCHAT_MAX_WAITING``, ``PALMCHAT_DEVICE``), ``overrides`` taking precedence."""
        values: dict[str, Any] = {
            "kv_cache_memory_mb": settings.kv_cache_memory_mb,
            "max_waiting": settings.max_waiting,
            "device": settings.device,
        }
        return cls(**{**values, **overrides})

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def graph_decode(self) -> bool:
        if self.cuda_graphs is None:
            return self.torch_device().type == "cuda"
        return self.cuda_graphs

    def threads(self) -> int:
        return self.num_threads or len(os.sched_getaffinity(0))
