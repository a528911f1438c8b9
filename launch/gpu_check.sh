#!/usr/bin/env bash
# One-shot accelerator check for a single NVIDIA GPU with JAX (CUDA) and PyTorch installed, in priority order
# (each step has its own timeout, so a slow step cannot eat the others' time):
#   1. numerical tests with JAX on the GPU: every training attention kernel against the XLA path (cuDNN flash
#      attention in bfloat16 included), decoder parity (incl. the bfloat16 compute path), the sampler;
#      TESTS overrides the pytest selection;
#   2. decode throughput and HBM fraction for qwen3-0.6b (bfloat16, greedy, 128 + 128 tokens) at batch 16, 64
#      and 256, with transformers generate at batch 64 as the peer;
#   3. the GRPO update (and the whole iteration) at the paper's world-model shapes: 8 prompts x 8 samples,
#      2,048-token prompts, 512-token completions, bfloat16, qwen3-0.6b and qwen3-1.7b, MFU against the GPU's
#      bfloat16 dense peak, TRL's GRPOTrainer on the same GPU as the peer;
#   4. (STEPS with 4, or CMDBUF=1) the decode while-loop captured as a CUDA graph (XLA command buffers incl. WHILE).
# Writes logs and JSON to ${OUT:-bench_results}. Usage: bash launch/gpu_check.sh; STEPS picks steps (default
# "1 2 3"; e.g. STEPS="1 2" then STEPS=3 to fit a 10-minute command limit: ~4 + ~5 + ~8 minutes at most).
set -uo pipefail
OUT=${OUT:-bench_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}  # leave room for the PyTorch peer
nvidia-smi -L
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in  # HBM bandwidth (bytes/s) and dense bfloat16 matmul peak (TFLOP/s) from the data sheets
  *H100*) PEAK_BW=3.35e12 PEAK_TFLOPS=989 ;;
  *H200*) PEAK_BW=4.8e12 PEAK_TFLOPS=989 ;;
  *A100*) PEAK_BW=2.0e12 PEAK_TFLOPS=312 ;;
  *) PEAK_BW=${PEAK_BW:-4.8e12} PEAK_TFLOPS=${PEAK_TFLOPS:-989} ;;
esac
echo "GPU $GPU: peak bandwidth $PEAK_BW B/s, bfloat16 peak $PEAK_TFLOPS TFLOP/s"
STEPS=" ${STEPS:-1 2 3} "
step() { [[ "$STEPS" == *" $1 "* ]]; }

# 1. float32 parity needs full-precision matmuls (XLA's GPU default for float32 is TF32)
step 1 && JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
    ${TESTS:-tests/test_attention_kernels.py tests/test_models_parity.py tests/test_sampling.py} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25

# 2. decode at rollout batch sizes
BENCH=(python3 -m rwml_jax.bench.generate_bench --device gpu --peak-bw "$PEAK_BW" --shapes qwen3-0.6b --modes greedy)
step 2 && for B in 16 64 256; do
  PEER=(--no-peer); [ "$B" = 64 ] && PEER=()
  timeout "${DECODE_TIMEOUT:-100}" "${BENCH[@]}" --batch "$B" "${PEER[@]}" \
      --json "$OUT/generate_gpu_b$B.json" 2>&1 | tee "$OUT/generate_gpu_b$B.log"
done

# 3. the GRPO update at the paper's shapes, with TRL
GRPO=(python3 -m rwml_jax.bench.grpo_bench --device gpu --dtype bfloat16 --prompt-len 2048 --completion-len 512
      --peak-tflops "$PEAK_TFLOPS" --steps 2 --warmup 1)
step 3 && for S in qwen3-0.6b qwen3-1.7b; do
  timeout "${GRPO_TIMEOUT:-240}" "${GRPO[@]}" --shapes "$S" --json "$OUT/grpo_gpu_$S.json" 2>&1 \
      | tee "$OUT/grpo_gpu_$S.log"
done

# 4. optional: CUDA graphs for the decode loop
if step 4 || [ "${CMDBUF:-0}" = 1 ]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
      timeout 120 "${BENCH[@]}" --no-peer --json "$OUT/generate_gpu_cmdbuf.json" 2>&1 | tee "$OUT/generate_gpu_cmdbuf.log"
fi
