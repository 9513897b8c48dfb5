#!/usr/bin/env bash
# Checks and benchmarks for a lent GPU, in one call of at most 10 minutes on one H200:
#   bash bench/gpu.sh
# Every stage logs to ${OUT:-bench/gpu-out}/STAGE.log and appends "STAGE rc=N seconds" to stages.txt;
# a failing stage does not stop the others. Copy the tables from the logs into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu-out}
WORK=${WORK:-/tmp/upcycle-gpu}
mkdir -p "$OUT" "$WORK"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt" || exit 1
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
PROCS=$(( GPUS >= 2 ? 2 : 1 ))

stage() {  # stage NAME COMMAND...: run, log, record rc and seconds
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( SECONDS - start ))s" | tee -a "$OUT/stages.txt"
    tail -n 25 "$OUT/$name.log"
}

# 1. correctness on CUDA: the Triton kernels natively, the fast path, torch.compile, bf16 router numerics
stage tests-cuda python -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_fast_path.py \
    tests/test_compile.py tests/test_cdmoe.py

# 2. one CDMoE layer: stock vs ours vs torch.compile vs Triton, and the memory-bandwidth roofline
stage cdmoe python bench/cdmoe.py --device cuda --compile --triton --tokens 8192 16384 --repeats 10 --warmup 3 \
    --no-write

# 3. the default experts-only step vs full fine-tuning at the Doge-20M shape (bf16 autocast on CUDA)
stage recipe-cost python bench/recipe_cost.py --device cuda --repeats 20 --warmup 5 --no-write

# 4. short bf16 runs of the shipped model grown to 1024 experts: one process, FSDP, DeepSpeed ZeRO-2
MODEL=$(python -c "from upcycle import assets; print(assets.DENSE_MODEL)")
DATA=$(python -c "import email; print(email.__path__[0])")  # the standard library's email package: Python source
[ -f "$WORK/moe/config.json" ] || python -m upcycle expand --experts 1024 "$MODEL" -o "$WORK/moe" > "$OUT/expand.log" 2>&1
RUN=(--data "$DATA" --max-steps 30 --seq-len 256 --batch-size 8 --eval-every 0 --save-every 0 --report-to none
     --force)
stage run-bf16 python -m upcycle continue-train "$WORK/moe" "${RUN[@]}" -o "$WORK/run-bf16"
stage run-bf16-triton env UPCYCLE_TRITON=1 python -m upcycle continue-train "$WORK/moe" "${RUN[@]}" \
    -o "$WORK/run-bf16-triton"
stage run-fsdp accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes "$PROCS" \
    -m upcycle continue-train "$WORK/moe" "${RUN[@]}" --expert-optimizer adamw --retain-coef 0 -o "$WORK/run-fsdp"
if python -c "import deepspeed" 2> /dev/null; then
    stage run-zero2 accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml --num_processes "$PROCS" \
        -m upcycle continue-train "$WORK/moe" "${RUN[@]}" --expert-optimizer adamw --retain-coef 0 -o "$WORK/run-zero2"
else
    echo "run-zero2 skipped: deepspeed is not installed" | tee -a "$OUT/stages.txt"
fi
for run in bf16 bf16-triton fsdp zero2; do  # final eval losses side by side
    [ -f "$WORK/run-$run/training_summary.json" ] && python -c "import json,sys; s=json.load(open(sys.argv[1])); \
print(sys.argv[2], {k: s[k] for k in s if 'loss' in k or 'tokens' in k})" "$WORK/run-$run/training_summary.json" "$run"
done | tee "$OUT/runs.txt"

# 5. two-process DDP/FSDP equal one process (needs two GPUs)
if [ "$GPUS" -ge 2 ]; then
    stage distributed python -m pytest -q -p no:cacheprovider tests/test_distributed.py
fi

# 6. with the time left: the frontier at the large size on the GPU (cached arms are skipped on rerun)
stage frontier-large timeout 240 python bench/frontier.py --size large --gpu --work "$WORK/frontier-large" \
    --methods recipe,full,recipe-retain,full-replay,lora-top --no-write
cp -r "$WORK/frontier-large/arms" "$OUT/frontier-large-arms" 2> /dev/null || true
