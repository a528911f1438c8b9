#!/usr/bin/env bash
# One-shot accelerator check for a single NVIDIA GPU with JAX (CUDA) and PyTorch installed:
#   1. the numerical tests (decoder parity incl. the bfloat16 compute path, sampler) with JAX on the GPU;
#      TESTS overrides the pytest selection (default: the parity and sampler files in full);
#   2. the generation benchmark on the GPU, side by side with transformers generate (bfloat16);
#   3. two rows without the peer for the bandwidth question: qwen3-0.6b greedy at batch 64, and at
#      batch 16 with the decode while-loop captured as a CUDA graph (XLA command buffers incl. WHILE);
#      and a GRPO-shaped row with the peer: batch 64 = 8 prompts x 8 samples (`--num-samples 8`).
# Writes logs and JSON to ${OUT:-bench_results}. Usage: bash launch/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}  # leave room for the PyTorch peer
nvidia-smi -L
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
# float32 parity needs full-precision matmuls (XLA's GPU default for float32 is TF32)
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider \
    ${TESTS:-tests/test_models_parity.py tests/test_sampling.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
PEAK_BW=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100 && echo 3.35e12 || echo 4.8e12)
BENCH=(python3 -m rwml_jax.bench.generate_bench --device gpu --peak-bw "$PEAK_BW")
timeout "${BENCH_TIMEOUT:-300}" "${BENCH[@]}" --shapes small qwen3-0.6b \
    --json "$OUT/generate_gpu.json" 2>&1 | tee "$OUT/generate_gpu.log"
timeout 120 "${BENCH[@]}" --shapes qwen3-0.6b --modes greedy --no-peer --batch 64 \
    --json "$OUT/generate_gpu_b64.json" 2>&1 | tee "$OUT/generate_gpu_b64.log"
# GRPO-shaped rollouts: 8 prompts x 8 samples, each prompt prefilled once and read once per group
timeout 180 "${BENCH[@]}" --shapes qwen3-0.6b --modes sample --batch 64 --num-samples 8 \
    --json "$OUT/generate_gpu_groups.json" 2>&1 | tee "$OUT/generate_gpu_groups.log"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
    timeout 120 "${BENCH[@]}" --shapes qwen3-0.6b --modes greedy --no-peer \
    --json "$OUT/generate_gpu_cmdbuf.json" 2>&1 | tee "$OUT/generate_gpu_cmdbuf.log"
