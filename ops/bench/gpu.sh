#!/usr/bin/env bash
# One GPU session in one command: the CUDA-graph engine tests on CPU and CUDA, then
# `python -m bench.engine --device cuda` (engine, HF Llama, PaLM-rlhf-pytorch on the GPU,
# bandwidth roofline). Results land in $OUT (default ops/bench/results). Wheels for packages the
# GPU machine lacks (pydantic, palm-rlhf-pytorch and their needs) are installed from .whl/ if
# that folder exists.
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
echo "== tests (CPU and CUDA)"
timeout 240 python3 -m pytest -q -p no:cacheprovider --confcutdir=tests/server/engine \
    tests/server/engine/test_cuda_graphs.py 2>&1 | tee "$OUT/gpu-tests.txt" | tail -25
echo "== benchmark"
timeout 360 python3 -m bench.engine --device cuda --repeats 3 $reference --out "$OUT" \
    2>&1 | tee "$OUT/gpu-bench.txt" | tail -80
