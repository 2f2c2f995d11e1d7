#!/usr/bin/env bash
# The GPU checks as one prepared script, so that scarce GPU time goes to the checks, not to
# typing them: the CUDA tests, the truncated-SVD test, bench/grid.py and bench/memory.py with
# --device cuda (ViT-B/32 tower, T = 8: factorization seconds, grid seconds, peak GPU memory),
# and the pipeline on the demo zoo with `device: cuda` when a zoo is at .demo/zoo.
#
# Usage: bench/gpu_check.sh [--dry-run]
#   --dry-run  the same steps on CPU at a small size (T = 2), to check the script beforehand
# Environment: PY (default .venv/bin/python, made by `make setup` when missing), OUT (default
# ./gpu-check): every step's log lands there, with summary.txt holding the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda TASKS=8 MEMORY_TASKS=2,4,8
if [[ "${1:-}" == "--dry-run" ]]; then
    DEVICE=cpu TASKS=2 MEMORY_TASKS=2
fi
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export DO_NOT_TRACK=1 AWS_EC2_METADATA_DISABLED=true PREFECT_SERVER_ANALYTICS_ENABLED=false
[[ -x "$PY" ]] || make setup
summary="$OUT/summary.txt"
: >"$summary"

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record the outcome
    local name=$1
    shift
    local started=$SECONDS status=0
    echo "== $name: $*" | tee -a "$summary"
    "$@" >"$OUT/$name.log" 2>&1 || status=$?
    echo "   exit $status after $((SECONDS - started)) s" | tee -a "$summary"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   /' >>"$summary"
}

if [[ "$DEVICE" == cuda ]]; then
    step device nvidia-smi
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
fi
step cuda-tests "$PY" -m pytest -q -rs -p no:randomly tests/test_svd.py tests/test_methods.py \
    -k "cuda or device or fast_factorization"
step grid "$PY" bench/grid.py --device "$DEVICE" --tasks "$TASKS" --workdir "$OUT/towers"
step memory "$PY" bench/memory.py --device "$DEVICE" --methods cart --tasks "$MEMORY_TASKS" \
    --workdir "$OUT/towers"
if [[ -f .demo/zoo/zoo.json && -f .demo/spec.yaml ]]; then
    sed "s/^device: .*/device: $DEVICE/" .demo/spec.yaml >"$OUT/spec.yaml"
    grep -q "^device:" "$OUT/spec.yaml" || echo "device: $DEVICE" >>"$OUT/spec.yaml"
    step pipeline "$PY" -m mergeflow run "$OUT/spec.yaml"
else
    echo "== pipeline: skipped, no demo zoo at .demo/zoo (run make demo first)" | tee -a "$summary"
fi
rm -rf "$OUT/towers"
echo "figures and logs: $OUT/ (summary.txt)"
