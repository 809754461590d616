"""How the engine's OpenMP workers wait between ops; set before torch is imported.

Workers that spin while they wait collapse throughput when the cores are shared,
e.g. with a trainer on the same machine, so every process that imports the engine defaults to
``OMP_WAIT_POLICY=PASSIVE``. A serving process calls :func:`serving_process` first: its workers
spin a bounded number of rounds, so a wide decode step can use every core; the engine then times
whether that pays on the machine as it is (``server/engine/cpu_kernels.py``). See
docs/decisions.md, "OpenMP wait policy". This module must not import torch.
"""

from __future__ import annotations

import os

# whether the operator chose a policy, read before the default below is filled in
_OPERATOR_WAIT_POLICY = "OMP_WAIT_POLICY" in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# rounds a waiting worker spins (tens of microseconds) before it sleeps
SERVING_SPIN_COUNT = "2000"


def serving_process() -> None:
    """Call before anything imports torch in a process that serves.

    OpenMP waits ACTIVE, bounded by ``GOMP_SPINCOUNT`` (2,000 rounds unless set): with PASSIVE,
    libgomp drops the spin to 0 once the process holds more OpenMP threads than cores, which a
    server always does (a team for the thread that built the engine, one for the engine's step
    thread); ACTIVE keeps min(1,000, GOMP_SPINCOUNT) rounds then. An operator's
    OMP_WAIT_POLICY, and their GOMP_SPINCOUNT (0: no spin), stand. KMP_BLOCKTIME bounds the same
    for an Intel OpenMP build of torch (1 ms).
    """
    if not _OPERATOR_WAIT_POLICY:
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", SERVING_SPIN_COUNT)
    os.environ.setdefault("KMP_BLOCKTIME", "1")
