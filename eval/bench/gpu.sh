#!/usr/bin/env bash
# The GPU tables in one call: `tokensieve bench` on the real 7B configurations at full depth in bf16, and the
# kernel micro-benchmark; results (Markdown, JSON, plots naming the device, versions and date) in OUT.
#   bash eval/bench/gpu.sh [OUT]        on a lent GPU (about 10 minutes on one H100 / H200: estimated, not run yet)
#   bash eval/bench/gpu.sh --smoke      the same script on this CPU with tiny shapes: checks it, measures nothing
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--smoke" ]; then
    out=$(mktemp -d)
    python -m tokensieve bench --models tiny --repeats 1 --new-tokens 2 --dtype float32 --device cpu --out "$out"
    python -m tokensieve.kernels.bench --smoke --out "$out"
    ls "$out"
    exit 0
fi
out=${1:-eval/results/bench}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# LLaVA-1.5-7B at batch 1 and 8 (the README's table), then the other families at batch 1
python -m tokensieve bench --models llava-1.5-7b --layers 0 --vision-layers 0 --device cuda --dtype bfloat16 \
    --batch-sizes 1,8 --new-tokens 64 --repeats 3 --out "$out"
python -m tokensieve bench --models llava-next-7b,qwen2.5-vl-7b,qwen3-vl-8b,gemma-3-12b,internvl3.5-8b,smolvlm2-2.2b,llava-onevision-7b \
    --layers 0 --vision-layers 0 --device cuda --dtype bfloat16 --batch-sizes 1 --new-tokens 64 --repeats 3 --out "$out/others"
python -m tokensieve.kernels.bench --out "$out"
