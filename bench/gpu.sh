#!/usr/bin/env bash
# Benchmarks for a lent GPU, in one call (see bench/RESULTS.md for the CPU rows they extend).
#   bash bench/gpu.sh            # ~10 minutes on one H200; every stage is cached under $WORK and skipped on rerun
# Writes results under ${OUT:-bench/gpu-out}/ (RESULTS.md sections, plots) for copying back.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-out}
WORK=${WORK:-/tmp/upcycle-gpu}
mkdir -p "$OUT" "$WORK"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. cost of the default experts-only step vs full fine-tuning, Doge-20M shape
python bench/recipe_cost.py --device cuda --repeats 20 --warmup 5 --no-write | tee "$OUT/recipe_cost.md"

# 2. the frontier at the large size (dense start pretrained on domain A inside the bench, cached)
python bench/frontier.py --size large --gpu --work "$WORK/frontier-large" \
    --methods experts-top,full,experts-top-retain,full-replay,lora-top,experts,lora-r8,lora-r32 --steps 150 \
    --no-write | tee "$OUT/frontier-large.md"

# 3. two-process FSDP equals one process (needs two GPUs; skipped on one)
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    python -m pytest -q tests/test_distributed.py | tee "$OUT/distributed.txt"
fi
