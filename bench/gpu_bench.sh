#!/usr/bin/env bash
# The GPU benchmark (NVIDIA, MLX CUDA): this runtime against mlx_lm.server and vllm-mlx, each a real process,
# plus raw mlx-lm in-process references (stream_generate, BatchGenerator), in one run; prints the ratio tables.
# It runs where the GPU is, from the project root, with the GPU kit (../shared/gpu-kit: a trimmed MLX CUDA
# build, the servers' wheels, a Qwen3 tokenizer, the client and the summarizer) copied to .gpu/:
#   mkdir -p .gpu && cp -r ../shared/gpu-kit/. .gpu/   (and keep .gpu/ out of git)
#   bash bench/gpu_bench.sh [OUT_DIR]          # SERVERS=project,mlxlm,vllm REFS=stream,batch,engine DEADLINE=450
# The model is random-weight, Qwen3-4B-shaped, 4-bit (built by the kit), so token counts are exact and the
# answers are plain letters; ratios compare servers within this one run only.
set -uo pipefail
OUT_DIR=${1:-gpu-results}
KIT=${KIT:-.gpu}
if [ ! -f "$KIT/scripts/dev_setup.sh" ]; then
    echo "gpu_bench: no GPU kit in $KIT (copy ../shared/gpu-kit there first)" >&2
    exit 2
fi
export G=$KIT
# shellcheck disable=SC1091
source "$KIT/scripts/dev_setup.sh" qwen3-4b
python3 "$KIT/scripts/run.py" --model /tmp/gbm/qwen3-4b --config /tmp/gbm/qwen3-4b.yaml --out "$OUT_DIR" \
    --servers "${SERVERS:-project,mlxlm,vllm}" --refs "${REFS:-stream,batch,engine}" \
    --deadline "${DEADLINE:-450}" ${RUN_ARGS:-}
python3 "$KIT/scripts/summarize.py" "$OUT_DIR"
