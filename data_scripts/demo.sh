#!/usr/bin/env bash
# `make demo`: the whole study on the built-in default, on a CPU, in minutes.
#   1 setup       .venv with the pinned requirements (make setup; reused when installed)
#   2 base model  tiny SD pipeline whose VAE never saw the study images   -> $DEMO_DIR/base
#   3 dataset     Twemoji with controlled duplication (factors 1..64)      -> $DEMO_DIR/data
#   4 train       accelerate launch train/finetune.py --config $DEMO_CONFIG -> $DEMO_DIR/run
#   5 evaluate    eval/evaluate_checkpoints.py on the base model and every checkpoint,
#                 which also writes the report                            -> $DEMO_DIR/run/eval
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

[[ -f "$CONFIG" ]] || { echo "demo.sh: error: config $CONFIG not found; set DEMO_CONFIG to a YAML file" >&2; exit 1; }
mkdir -p "$DIR"
echo "[demo] config $CONFIG, outputs in $DIR, OMP_NUM_THREADS=$OMP_NUM_THREADS"
for name in ${DEMO_STAGES:-setup dataset base_model train evaluate}; do
  stage "$name" "$name"
done

echo "[demo] time by stage (wall s, CPU s):"
total=0
for entry in "${TIMINGS[@]}"; do
  read -r name wall cpu <<< "$entry"
  printf "[demo]   %-11s %7s %7s\n" "$name" "$wall" "$cpu"
  total=$(awk -v a="$total" -v b="$wall" 'BEGIN { print a + b }')
done
printf "[demo]   %-11s %7.1f\n" total "$total"
printf "%s\n" "${TIMINGS[@]}" > "$DIR/timings.txt"
echo "[demo] report:      $DIR/run/eval/report.md"
echo "[demo] TensorBoard: tensorboard --logdir $DIR/run/logs"
