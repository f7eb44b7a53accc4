#!/usr/bin/env bash
# `make demo`: the whole study on the built-in default, on a CPU, in minutes.
#   1 setup       .venv with the pinned requirements (make setup; reused when installed)
#   2 base model  tiny SD pipeline whose VAE never saw the study images   -> $DEMO_DIR/base
#   3 dataset     Twemoji with controlled duplication (factors 1..64)      -> $DEMO_DIR/data
#   4 train       accelerate launch train/finetune.py --config $DEMO_CONFIG -> $DEMO_DIR/run
#   5 evaluate    eval/evaluate_checkpoints.py on the base model and every checkpoint,
#                 which also writes report.md and headline.md             -> $DEMO_DIR/run/eval
#   (the default demo only) headline.md -> docs/demo_headline.md and the README's marked block
# The arguments of stages 2, 3 and 5 are the `# base_model:`, `# dataset:` and `# evaluate:`
# header lines of the config, so one YAML file describes the whole experiment.
# Base model and dataset are reused when they were built with the same arguments; the run is
# trained afresh. Environment: DEMO_CONFIG (configs/demo_cpu.yaml), DEMO_DIR (runs/demo),
# OMP_NUM_THREADS (2), DEMO_STAGES (the stages to run, default all five; data_scripts/arena.sh runs
# "setup dataset base_model").
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${DEMO_CONFIG:-configs/demo_cpu.yaml}
DIR=${DEMO_DIR:-runs/demo}
PY=.venv/bin/python
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
TIMINGS=()

header() {  # the value of a `# NAME:` header line of the config (empty when absent)
  sed -n "s/^# $1: *//p" "$CONFIG" | head -n 1
}

cpu_seconds() {  # user + sys CPU seconds of the finished children of this script (/proc: cutime + cstime)
  [[ -r /proc/$$/stat ]] || { echo n/a; return; }  # no /proc (macOS): CPU time not reported
  awk -v tick="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.1f", ($14 + $15) / tick }' "/proc/$$/stat"
}

stage() {  # stage NAME COMMAND...: run it, print and record its wall and CPU time
  local name=$1 start=$EPOCHREALTIME cpu0 wall cpu
  shift
  cpu0=$(cpu_seconds)
  echo "[demo] == $name"
  "$@"
  wall=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  cpu=n/a
  [[ $cpu0 == n/a ]] || cpu=$(awk -v a="$cpu0" -v b="$(cpu_seconds)" 'BEGIN { printf "%.1f", b - a }')
  echo "[demo] $name: ${wall} s wall, ${cpu} s CPU (user+sys)"
  TIMINGS+=("$name $wall $cpu")
}

cached() {  # cached FOLDER MARKER ARGS: true when FOLDER/MARKER exists and was built with ARGS
  [[ -f "$1/$2" && -f "$1.args" && "$(cat "$1.args")" == "$3" ]]
}

setup() {
  if ${MAKE:-make} --no-print-directory -q setup; then
    echo "[demo] reusing .venv (the pinned requirements are installed)"
  else
    ${MAKE:-make} --no-print-directory setup
  fi
}

base_model() {
  local args
  args="--preset tiny $(header base_model) --exclude_dataset $DIR/data"
  if cached "$DIR/base" model_index.json "$args"; then
    echo "[demo] reusing base model $DIR/base (built with the same arguments; delete it to rebuild)"
    return
  fi
  rm -f "$DIR/base.args"
  # shellcheck disable=SC2086  # the header line is a list of flags
  $PY data_scripts/make_base_model.py --output_dir "$DIR/base" --overwrite $args
  echo "$args" > "$DIR/base.args"
}

dataset() {
  local args
  args=$(header dataset)
  if cached "$DIR/data" manifest.json "$args"; then
    echo "[demo] reusing dataset $DIR/data (built with the same arguments; delete it to rebuild)"
    return
  fi
  rm -f "$DIR/data.args" "$DIR/base.args"  # a new dataset invalidates the base model's exclusions
  # shellcheck disable=SC2086
  $PY data_scripts/build_duplicated_dataset.py --output_dir "$DIR/data" --overwrite $args
  echo "$args" > "$DIR/data.args"
}

train() {
  rm -rf "$DIR/run"
  $PY -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
    --dynamo_backend no train/finetune.py --config "$CONFIG" \
    --pretrained_model_name_or_path "$DIR/base" --train_data_dir "$DIR/data" --output_dir "$DIR/run"
}

evaluate() {
  # shellcheck disable=SC2086
  $PY eval/evaluate_checkpoints.py --run_dir "$DIR/run" $(header evaluate)
}

publish() {  # the default demo's headline figures -> docs/demo_headline.md and the README's marked block
  $PY eval/report.py --eval_dir "$DIR/run/eval" --publish docs/demo_headline.md --readme README.md
}

[[ -f "$CONFIG" ]] || { echo "demo.sh: error: config $CONFIG not found; set DEMO_CONFIG to a YAML file" >&2; exit 1; }
mkdir -p "$DIR"
echo "[demo] config $CONFIG, outputs in $DIR, OMP_NUM_THREADS=$OMP_NUM_THREADS"
for name in ${DEMO_STAGES:-setup dataset base_model train evaluate}; do
  stage "$name" "$name"
done
if [[ $CONFIG == configs/demo_cpu.yaml && $DIR == runs/demo && -z ${DEMO_STAGES:-} ]]; then
  publish  # only the default `make demo` (every stage) writes the figures the README states
fi

echo "[demo] time by stage (wall s, CPU s):"
total=0 total_cpu=0
for entry in "${TIMINGS[@]}"; do
  read -r name wall cpu <<< "$entry"
  printf "[demo]   %-11s %7s %7s\n" "$name" "$wall" "$cpu"
  total=$(awk -v a="$total" -v b="$wall" 'BEGIN { print a + b }')
  total_cpu=$(awk -v a="$total_cpu" -v b="$cpu" 'BEGIN { print (b == "n/a" || a == "n/a") ? "n/a" : a + b }')
done
printf "[demo]   %-11s %7.1f %7s\n" total "$total" "$total_cpu"
GOAL_SECONDS=600  # issue 17: the demo should finish within 10 minutes on a fresh 2-core machine
awk -v t="$total" -v g="$GOAL_SECONDS" 'BEGIN { printf "[demo] %.1f min wall against the %d-minute goal: %s\n",
  t / 60, g / 60, (t <= g) ? "within it" : sprintf("%.1f min over (a busy machine or fewer cores also count)", (t - g) / 60) }'
printf "%s\n" "${TIMINGS[@]}" > "$DIR/timings.txt"
echo "[demo] report:      $DIR/run/eval/report.md (headline figures: $DIR/run/eval/headline.md)"
echo "[demo] TensorBoard: tensorboard --logdir $DIR/run/logs"
