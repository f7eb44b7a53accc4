#!/usr/bin/env bash
# Every GPU check of issue 7 in one call (README "GPU check"): install the carried wheels, run the
# GPU-only tests (tests/test_gpu.py -m gpu), then bench/gpu_bench.py on sd15-shape at 512 px in bf16.
#
#     bash bench/gpu_check.sh      # on the GPU machine, with .whl/ carried (bench/fetch_gpu_wheels.sh)
#
# Writes bench/results/<card>-<date>.json, and with $OUT set also $OUT/<card>-<date>.json and
# $OUT/gpu_check.log (everything printed); the table of headline figures comes last on stdout.
# Budget: wheels ~15 s, tests ~40 s (stopped at 100 s), bench sections until BENCH_BUDGET_S (default
# 360 s; a section is skipped when its estimate no longer fits, the JSON is rewritten after each one),
# hard stop at BENCH_BUDGET_S + 90 s: at most 9.5 minutes in all, about 7 in a normal run.
# Without a CUDA GPU it stops within seconds with one line on stderr and writes nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BENCH_BUDGET_S=${BENCH_BUDGET_S:-360}
WHEELS=${WHEELS:-.whl}          # carried wheel folder
GPU_BENCH_ARGS=${GPU_BENCH_ARGS:-}  # extra gpu_bench.py flags, e.g. "--only zero2,finetune_compile"

if ! reason=$("$PY" -c '
try:
    import torch
except Exception as error:
    raise SystemExit(f"torch cannot be imported ({type(error).__name__})")
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA GPU")
' 2>&1); then
    echo "gpu_check.sh: $(echo "$reason" | tail -1); run it on the GPU machine (README \"GPU check\"); nothing was run or written" >&2
    exit 2
fi

tee_pid=
if [ -n "${OUT:-}" ]; then
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
    tee_pid=$!
fi
echo "== gpu_check.sh $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,temperature.gpu,power.draw --format=csv || true

# 1. The packages the image lacks, from the carried wheels (one version of each).
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        || { echo "gpu_check.sh: installing the wheels of $WHEELS/ failed"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    echo "gpu_check.sh: no $WHEELS/ here (run bench/fetch_gpu_wheels.sh and carry \".whl\"); using installed packages"
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

# 2. The GPU-only tests (each skips without CUDA; here they run).
work=$(mktemp -d /tmp/gpu_check.XXXXXX)
timeout 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$work/pytest.log"
tests_exit=${PIPESTATUS[0]}
"$PY" -c 'import json, sys; lines = open(sys.argv[1]).read().strip().splitlines()
json.dump({"pytest_gpu_exit": int(sys.argv[2]), "pytest_gpu_summary": lines[-1] if lines else ""}, open(sys.argv[3], "w"))' \
    "$work/pytest.log" "$tests_exit" "$work/pytest.json"

# 3. The measurements.
timeout --kill-after=10 $((BENCH_BUDGET_S + 90)) "$PY" bench/gpu_bench.py --budget_s "$BENCH_BUDGET_S" --extra "$work/pytest.json" $GPU_BENCH_ARGS
bench_exit=$?
latest=$(ls -t bench/results/*.json 2>/dev/null | head -1)
if [ "$bench_exit" -ge 124 ] && [ -n "$latest" ]; then
    echo "gpu_check.sh: gpu_bench.py stopped at its time limit; the sections it finished are in $latest:"
    "$PY" bench/gpu_bench.py --table_of "$latest"
fi
rm -rf "$work"
echo "== gpu_check.sh done in ${SECONDS} s: GPU tests exit $tests_exit, gpu_bench.py exit $bench_exit"
status=0
[ "$tests_exit" -eq 0 ] && [ "$bench_exit" -eq 0 ] || status=1
exec 1>&- 2>&-  # end tee's input, and let it finish the log before the call returns
[ -z "$tee_pid" ] || wait "$tee_pid"
exit "$status"
