#!/usr/bin/env bash
# The GPU check in one call (README "GPU check"): install the carried wheels, run the GPU tests
# (tests/test_gpu.py -m gpu; they must pass), then bench/gpu_bench.py on sd15-shape at 512 px in bf16.
#
#     bash bench/gpu_check.sh              # on the GPU machine, with .whl/ carried (bench/fetch_gpu_wheels.sh)
#     bash bench/gpu_check.sh --dry_run    # on a CPU: the same steps end to end at tiny sizes (~75 CPU-seconds)
#
# Writes, as it goes, <card>-<date>.json (rewritten after every section) and gpu_check-<date>.log (everything
# printed) into $OUT when set, else bench/results/ (the dry run: $OUT, else a new temporary folder); the
# table of headline figures comes last on stdout.
# Budget, made for 8 minutes of GPU time: wheels ~15 s, tests ~45 s (stopped at 75 s), bench sections until
# BENCH_BUDGET_S (default 345 s; a section is skipped when its estimate no longer fits), hard stop at
# BENCH_BUDGET_S + 45 s: at most 8 minutes in all, about 6.5 in a normal run.
# Without a CUDA GPU (and without --dry_run) it stops within seconds with one line on stderr and writes nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-345}
WHEELS=${WHEELS:-.whl}          # carried wheel folder
GPU_BENCH_ARGS=${GPU_BENCH_ARGS:-}  # extra gpu_bench.py flags, e.g. "--only zero2,finetune_compile"
DRY_RUN=0
case "${1:-}" in
    --dry_run) DRY_RUN=1 ;;
    "") ;;
    *) echo "gpu_check.sh: error: unknown argument '$1' (only --dry_run)" >&2; exit 2 ;;
esac

if [ "$DRY_RUN" -eq 0 ] && ! reason=$("$PY" -c '
try:
    import torch
except Exception as error:
    raise SystemExit(f"torch cannot be imported ({type(error).__name__})")
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA GPU")
' 2>&1); then
    echo "gpu_check.sh: $(echo "$reason" | tail -1); run it on the GPU machine (README \"GPU check\") or with --dry_run; nothing was run or written" >&2
    exit 2
fi

if [ "$DRY_RUN" -eq 1 ]; then
    RESULTS=${OUT:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
    BENCH_FLAGS="--device cpu --preset tiny --smoke"
else
    RESULTS=${OUT:-bench/results}
    BENCH_FLAGS=""
fi
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check-$(date -u +%F).log"
exec > >(tee -a "$LOG") 2>&1
tee_pid=$!
echo "== gpu_check.sh $(date -u +%FT%TZ) $([ "$DRY_RUN" -eq 1 ] && echo '(dry run on CPU)')"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,temperature.gpu,power.draw --format=csv 2>/dev/null \
    || echo "no nvidia-smi"

# 1. The packages the image lacks, from the carried wheels (one version of each).
if [ "$DRY_RUN" -eq 0 ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "gpu_check.sh: installing the wheels of $WHEELS/ failed"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    [ "$DRY_RUN" -eq 1 ] || echo "gpu_check.sh: no $WHEELS/ here (run bench/fetch_gpu_wheels.sh and carry \".whl\"); using installed packages"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c '
import importlib
for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets", "deepspeed", "tensorboard"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as error:
        print(f"{name}: {type(error).__name__}: {error}")
'

# 2. The GPU-only tests (each skips without CUDA; on the GPU they run and must pass).
work=$(mktemp -d /tmp/gpu_check.XXXXXX)
timeout 75 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$work/pytest.log"
tests_exit=${PIPESTATUS[0]}
"$PY" -c 'import json, sys; lines = open(sys.argv[1]).read().strip().splitlines()
json.dump({"pytest_gpu_exit": int(sys.argv[2]), "pytest_gpu_summary": lines[-1] if lines else ""}, open(sys.argv[3], "w"))' \
    "$work/pytest.log" "$tests_exit" "$work/pytest.json"

# 3. The measurements: the JSON is rewritten after every section.
timeout --kill-after=10 $((BENCH_BUDGET_S + 45)) "$PY" bench/gpu_bench.py --budget_s "$BENCH_BUDGET_S" \
    --results_dir "$RESULTS" --extra "$work/pytest.json" $BENCH_FLAGS $GPU_BENCH_ARGS
bench_exit=$?
latest=$(ls -t "$RESULTS"/*.json 2>/dev/null | head -1)
if [ "$bench_exit" -ge 124 ] && [ -n "$latest" ]; then
    echo "gpu_check.sh: gpu_bench.py stopped at its time limit; the sections it finished are in $latest:"
    "$PY" bench/gpu_bench.py --table_of "$latest"
fi
rm -rf "$work"
echo "== gpu_check.sh done in ${SECONDS} s: GPU tests exit $tests_exit, gpu_bench.py exit $bench_exit; results in $RESULTS"
status=0
[ "$tests_exit" -eq 0 ] && [ "$bench_exit" -eq 0 ] || status=1
exec 1>&- 2>&-  # end tee's input, and let it finish the log before the call returns
wait "$tee_pid"
exit "$status"
