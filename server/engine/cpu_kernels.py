"""CPU choices for the float32 serving copy of a policy: prepacked matmul weights, and how
many threads a step uses.

**Prepacked weights.** ``F.linear`` on a float32 CPU tensor goes to BLAS, which re-packs the
weight into its blocked layout on every call; for the few-row matmuls of decoding that packing
and a generic kernel dominate. oneDNN can pack a weight once into the layout its matmul kernel
reads (``mkldnn._reorder_linear_weight``, what PyTorch's own compiler uses for frozen CPU
graphs) and then run any number of rows against it.

Whether packing pays depends on the CPU and the row count (on some CPUs the packed kernel
loses to BLAS at a few rows). So :func:`warm_up` times both on each weight shape at a few row
counts and sets at which row counts that shape uses its packed copy (:func:`packed_row_counts`,
once per shape and thread count in a process); elsewhere the matmul goes to BLAS with the
weight stored transposed (row-major (in, out), the faster layout for few rows). See
docs/decisions.md, "CPU engine: prepacked oneDNN weights, timed per shape".

**Threads.** The engine package defaults ``OMP_WAIT_POLICY`` to PASSIVE: workers that spin
without bound collapse a second busy process on a small machine. A sleeping worker must then
be woken for every parallel op, and on a virtual machine waking an idle vCPU is slow; a decode
step is a hundred small ops, so there the second core costs more than it saves. Prefill is a
few big ops and does gain. :class:`StepThreads` gives a step every core from
:data:`PARALLEL_TOKENS` tokens on, one thread below - except wide decode steps:

**Wide decode steps.** The serving commands (``palmchat serve``, ``up``, ``demo``, ``bench
engine``, ``bench api``) let a waiting worker spin briefly before it sleeps
(``OMP_WAIT_POLICY=ACTIVE`` with ``GOMP_SPINCOUNT=2000``, which libgomp caps at 1,000 rounds
once a process holds more OpenMP threads than cores, as a server does: tens of microseconds;
the trainer keeps PASSIVE, no spin; see ``server/engine/openmp.py``): the workers then stay
awake between the ops of one step, and a wide decode step can gain from every core. Whether
that pays depends on what else runs on the cores: with a second busy process the worker is
descheduled while its master waits, and the same step takes longer than on one thread. So
decode steps of :data:`TUNED_MIN_TOKENS` rows or more run on whichever of one thread and every
core was faster when last timed (:class:`ThreadChoice`: pairs of adjacent steps, one on each,
every :data:`PROBE_EVERY` steps of that size). In a process whose workers
do not spin (PASSIVE, e.g. the trainer's) every core loses and the steps stay on one thread.
Thread count does not change the numbers: the kernels split rows and columns, never a dot
product. See docs/decisions.md, "CPU engine: threads per step".
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the row count oneDNN is told to expect when it picks a packed layout (any count runs)
PACK_ROWS_HINT = 32
# oneDNN builds a kernel per row count (slow the first time it sees one): steps up to
# this many rows - every decode batch - use the packed weights, with their kernels built at
# load (:func:`warm_up`); wider steps (prefills of arbitrary length) go to BLAS, whose per-call
# packing is small next to their own work
PACKED_MAX_ROWS = 64


def prepacked_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds with mkldnn)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight  # noqa: B018 - resolves the op or raises
        torch.ops.mkldnn._linear_pointwise  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


class PrepackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` for inference whose weight oneDNN packed once.

    ``weight`` stays (same tensor, same name) so the module's state dict is unchanged; the
    packed copy is what the forward reads."""

    in_features: int
    out_features: int
    weight: nn.Parameter
    packed: Tensor
    packed_rows: frozenset[int]

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PrepackedLinear takes bias-free linears")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach().contiguous(), PACK_ROWS_HINT
            )
            # BLAS's copy: same values, stored transposed (faster for a few rows)
            self.weight.data = self.weight.data.t().contiguous().t()
        # row counts that use the packed copy (warm_up times which do on this CPU)
        self.packed_rows = frozenset(range(1, PACKED_MAX_ROWS + 1))

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        # packed path: float32 inference at the row counts where it is the faster
        if x.requires_grad or x.dtype != torch.float32 or flat.shape[0] not in self.packed_rows:
            return F.linear(x, self.weight)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        return self.packed_matmul(flat).view(*x.shape[:-1], self.out_features)

    def packed_matmul(self, flat: Tensor) -> Tensor:
        """(rows, in) contiguous float32 -> (rows, out) with the packed copy."""
        return torch.ops.mkldnn._linear_pointwise(flat, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def prepack_linears(model: nn.Module) -> int:
    """Replace every bias-free ``nn.Linear`` of ``model`` (float32, CPU) by a
    :class:`PrepackedLinear`; returns how many. A no-op where oneDNN is missing."""
    if not prepacked_available():
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
        if child.bias is None
        and child.weight.device.type == "cpu"
        and child.weight.dtype == torch.float32
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PrepackedLinear(child))
    return len(swaps)


# tokens in a step from which its matmuls are wide enough for every core to pay off
PARALLEL_TOKENS = 128


def step_threads(tokens: int, cores: int) -> int:
    """Intra-op threads for a step computing ``tokens`` tokens, where no timing decides."""
    return cores if tokens >= PARALLEL_TOKENS else 1


# decode steps from this many rows (below PARALLEL_TOKENS) run on one thread or every core,
# whichever ThreadChoice last timed faster
TUNED_MIN_TOKENS = 16
# steps of one size class between two timings, and pairs of steps (one of each choice) per timing
PROBE_EVERY = 256
PROBE_PAIRS = 8
# every core must take at most this share of one thread's time to be chosen (one thread leaves
# the other core to the rest of the machine)
PARALLEL_MARGIN = 0.9


def tuned(tokens: int, cores: int, is_prefill: bool) -> bool:
    """Whether a step's thread count is chosen by timing (:class:`ThreadChoice`)."""
    return cores > 1 and not is_prefill and TUNED_MIN_TOKENS <= tokens < PARALLEL_TOKENS


class ThreadChoice:
    """One thread or every core, for the decode steps of one size class. Every
    :data:`PROBE_EVERY` steps it runs :data:`PROBE_PAIRS` pairs of adjacent steps, one on each
    (the order alternating, so neither always runs first), and keeps every core if the median
    of the pairs' time ratios is under :data:`PARALLEL_MARGIN`. Pairs, because one step's time
    swings widely with the machine; two adjacent steps see nearly the same machine and the
    same batch."""

    def __init__(self, cores: int) -> None:
        self.options = (1, cores)
        self.best = 1
        self.current = 1
        self.until_probe = 0  # time both on first use
        self.plan: list[int] = []
        # this timing's steps so far, in order: (threads, seconds per token)
        self.timings: list[tuple[int, float]] | None = None
        self.probes = 0

    def next(self) -> int:
        """The thread count for the next step of this size class."""
        if self.timings is None and self.until_probe <= 0:
            one, every = self.options
            pairs = [(one, every) if i % 2 == 0 else (every, one) for i in range(PROBE_PAIRS)]
            self.plan = [n for pair in pairs for n in pair]
            self.timings = []
        if self.plan:
            self.current = self.plan.pop(0)
        else:
            self.until_probe -= 1
            self.current = self.best
        return self.current

    def abandon(self) -> None:
        """A step of the timing did not finish (it raised): time both again from the start,
        rather than pair the steps wrongly."""
        self.plan, self.timings, self.until_probe = [], None, 0

    def record(self, seconds: float, tokens: int) -> None:
        """The step just run on :attr:`current` threads took ``seconds``."""
        if self.timings is None:
            return
        self.timings.append((self.current, seconds / tokens))
        if self.plan:
            return
        one, every = self.options
        pairs = [dict(self.timings[i : i + 2]) for i in range(0, len(self.timings), 2)]
        ratio = statistics.median(pair[every] / pair[one] for pair in pairs)
        self.best = every if ratio < PARALLEL_MARGIN else one
        self.timings = None
        self.until_probe = PROBE_EVERY
        self.probes += 1


# row counts at which warm_up times packed against BLAS
PROBE_ROWS = (1, 2, 4, 8, 16, 32, PACKED_MAX_ROWS)
# (in, out, threads) -> the row counts that use the packed copy
_PACKED_ROWS: dict[tuple[int, int, int], frozenset[int]] = {}


def _best_time(fn, x: Tensor, repeats: int = 7) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def packed_row_counts(module: PrepackedLinear, threads: int) -> frozenset[int]:
    """The row counts (of 1..:data:`PACKED_MAX_ROWS`) at which ``module``'s packed kernel is
    used: timed against BLAS at each of :data:`PROBE_ROWS` on ``threads`` intra-op threads (call
    with them set), packed where it is 5% faster; a row count between two probes follows the
    probe below it. Timed once per shape and thread count in a process."""
    key = (module.in_features, module.out_features, threads)
    if key not in _PACKED_ROWS:
        rows: set[int] = set()
        bounds = (*PROBE_ROWS[1:], PACKED_MAX_ROWS + 1)
        for n, upto in zip(PROBE_ROWS, bounds, strict=True):
            x = torch.randn(n, module.in_features)
            blas = _best_time(lambda x: F.linear(x, module.weight), x)
            if _best_time(module.packed_matmul, x) < 0.95 * blas:
                rows.update(range(n, upto))
        _PACKED_ROWS[key] = frozenset(rows)
    return _PACKED_ROWS[key]


def warm_up(model: nn.Module, rows: int, cores: int) -> None:
    """Pick, per weight shape, the row counts that use its packed copy
    (:func:`packed_row_counts`), then build oneDNN's kernels for those row counts up to ``rows``
    (capped at :data:`PACKED_MAX_ROWS`), each on the threads a step of that many rows runs on
    (:func:`step_threads`, and both choices where :class:`ThreadChoice` times them), so no
    request pays for them. Kernels are cached per shape and thread
    count, so later engines in the same process (a trainer's rollouts, a hot-swapped version)
    find them built."""
    shapes: dict[tuple[int, int], list[PrepackedLinear]] = {}
    for module in model.modules():
        if isinstance(module, PrepackedLinear):
            shapes.setdefault((module.in_features, module.out_features), []).append(module)
    if not shapes:
        return
    saved = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(step_threads(1, cores))
            for modules in shapes.values():
                rows_packed = packed_row_counts(modules[0], torch.get_num_threads())
                for module in modules:
                    module.packed_rows = rows_packed
            for n in range(1, min(rows, PACKED_MAX_ROWS) + 1):
                counts = {step_threads(n, cores)}
                if tuned(n, cores, is_prefill=False):
                    counts.update((1, cores))
                for threads in sorted(counts):
                    torch.set_num_threads(threads)
                    for (width, _), modules in shapes.items():
                        modules[0](torch.zeros(n, width))
    finally:
        torch.set_num_threads(saved)


class StepThreads:
    """Sets torch's intra-op threads per step, touching the setting only when it changes, and
    puts back what was there (:meth:`restore`), so code sharing the thread - a trainer that
    generates rollouts between optimiser steps - keeps its own setting. Decode steps of
    :data:`TUNED_MIN_TOKENS` rows or more take the count their size class's
    :class:`ThreadChoice` picks (or ``decode_threads`` where given); call :meth:`done` after
    each step so it can time them."""

    def __init__(self, cores: int, decode_threads: int | None = None) -> None:
        self.cores = cores
        self.decode_threads = decode_threads
        self._saved: int | None = None
        self.choices: dict[int, ThreadChoice] = {}  # by size class: tokens.bit_length()
        self._timing: tuple[ThreadChoice, int, float] | None = None

    def use(self, tokens: int, is_prefill: bool = False) -> None:
        wanted = step_threads(tokens, self.cores)
        if self._timing is not None:  # the last step never reported done: it raised
            self._timing[0].abandon()
            self._timing = None
        choice = None
        if tuned(tokens, self.cores, is_prefill):
            if self.decode_threads is not None:
                wanted = self.decode_threads
            else:
                choice = self.choices.get(tokens.bit_length())
                if choice is None:
                    choice = self.choices[tokens.bit_length()] = ThreadChoice(self.cores)
                wanted = choice.next()
        current = torch.get_num_threads()
        if wanted != current:
            if self._saved is None:
                self._saved = current
            torch.set_num_threads(wanted)
        if choice is not None:  # timed from here: the switch above is not the step's
            self._timing = (choice, tokens, time.perf_counter())

    def done(self) -> None:
        """The step announced by the last :meth:`use` has finished."""
        if self._timing is not None:
            choice, tokens, start = self._timing
            choice.record(time.perf_counter() - start, tokens)
            self._timing = None

    def timed_choices(self) -> dict[str, int]:
        """The thread count each timed size class of decode steps runs on, e.g. {"32-63": 2}."""
        return {
            f"{1 << (k - 1)}-{(1 << k) - 1}": c.best
            for k, c in sorted(self.choices.items())
            if c.probes
        }

    def restore(self) -> None:
        if self._saved is not None:
            torch.set_num_threads(self._saved)
            self._saved = None
