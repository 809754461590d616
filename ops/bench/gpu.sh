#!/usr/bin/env bash
# One GPU session in one command, within 10 minutes on one GPU: the engine's tests on CUDA, then
# `python -m bench.engine --device cuda` (engine, HF Llama, PaLM-rlhf-pytorch on the GPU,
# bandwidth roofline), then `python -m bench.deployed --device cuda` (~1B PaLM and Llama models in
# bfloat16: batch-1 decode vs the roofline, batch 1-64 vs HF transformers, prefill, a DPO/LoRA
# step). Results land in $OUT (default ops/bench/results). Wheels for packages the GPU machine
# lacks (pydantic, palm-rlhf-pytorch, sqlalchemy/sqlmodel/alembic for the trainer, and their
# needs) are installed from .whl/ if that folder exists.
set -u
OUT=${OUT:-ops/bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
reference=""
python3 -c "import palm_rlhf_pytorch" || reference="--no-reference"
# timeouts: 140 + 160 + 240 s, leaving a minute of the 10 for installs and imports
echo "== tests (the engine's, on CUDA where a test does not pin the CPU)"
timeout 140 python3 -m pytest -q -p no:cacheprovider --confcutdir=tests/server/engine \
    tests/server/engine 2>&1 | tee "$OUT/gpu-tests.txt" | tail -25
echo "== benchmark"
timeout 160 python3 -m bench.engine --device cuda --repeats 3 $reference --out "$OUT" \
    2>&1 | tee "$OUT/gpu-bench.txt" | tail -80
echo "== deployed sizes (~1B parameters)"
timeout 240 python3 -m bench.deployed --device cuda --repeats 3 --out "$OUT" \
    2>&1 | tee "$OUT/gpu-deployed.txt" | tail -40
