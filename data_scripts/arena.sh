#!/usr/bin/env bash
# The arena: mitigations of memorization measured by the same instrument, side by side.
#   1 setup, dataset, base model  the stages of data_scripts/demo.sh (reused when built with the same arguments)
#   2 train     the config once per training-time mitigation, all at the config's step count -> $ARENA_DIR/<name>
#   3 evaluate  every run with constant guidance at every checkpoint (<name>/eval: the onset timeline), and
#               with delayed guidance at the last checkpoint (an inference-time mitigation leaves training
#               as it was): --guidance_schedule delay:$ARENA_DELAY --checkpoints last (<name>/eval_delay<T0>)
#   4 compare   eval/compare_runs.py over every run and schedule -> $ARENA_DIR/compare (table, figure, report.md);
#               the default arena (demo config, runs/arena, every mitigation) also publishes them to docs/arena and
#               the main table to the README's arena block
# Mitigations (name: flags of train/finetune.py): none; wen: --mitigation_wen_thresholds FILE, a threshold per
# timestep calibrated on the unmitigated run (trained first) by eval/wen_threshold.py --output FILE: at each probe
# timestep the $ARENA_WEN_QUANTILE (0.95) quantile of ||e_c - e_0|| of its never-duplicated probe samples at its last
# $ARENA_WEN_LAST_STEPS (1) probe steps ($ARENA_DIR/wen_thresholds.json; what it printed, with the share of each
# factor's probe values over the thresholds, in $ARENA_DIR/wen_threshold.txt); or --mitigation_wen_threshold
# $ARENA_WEN_THRESHOLD (one T for every timestep) when that is set;
# rand_word_add: --caption_augmentation rand_word_add (p 0.1, somepago/DCR's default);
# text_noise: --text_embedding_noise $ARENA_TEXT_NOISE; dedup: --dedup_sampling.
# Environment: ARENA_CONFIG (configs/demo_cpu.yaml), ARENA_DIR (runs/arena), ARENA_MITIGATIONS (names, default
# all), ARENA_DELAY (700), ARENA_WEN_THRESHOLD, ARENA_WEN_QUANTILE, ARENA_WEN_LAST_STEPS, ARENA_TEXT_NOISE (0.1),
# ARENA_SKIP_SETUP=1
# (use the Python as it is), ARENA_LAUNCH (accelerate launch flags; default one CPU process), ARENA_JOBS
# (mitigations trained and evaluated at once, default 1; each one's log is then $ARENA_DIR/<name>.log),
# PYTHON (.venv/bin/python), OMP_NUM_THREADS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${ARENA_CONFIG:-configs/demo_cpu.yaml}
DIR=${ARENA_DIR:-runs/arena}
DELAY=${ARENA_DELAY:-700}
LAUNCH=${ARENA_LAUNCH:---cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no}
JOBS=${ARENA_JOBS:-1}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
declare -A FLAGS=(
  [none]=""
  [wen]="--mitigation_wen_threshold ${ARENA_WEN_THRESHOLD:-calibrated}"
  [rand_word_add]="--caption_augmentation rand_word_add --caption_augmentation_p 0.1"
  [text_noise]="--text_embedding_noise ${ARENA_TEXT_NOISE:-0.1}"
  [dedup]="--dedup_sampling"
)
NAMES=${ARENA_MITIGATIONS:-none wen rand_word_add text_noise dedup}

seconds_since() {  # wall seconds since the EPOCHREALTIME value $1
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

[[ -f "$CONFIG" ]] || { echo "arena.sh: error: config $CONFIG not found; set ARENA_CONFIG to a YAML file" >&2; exit 1; }
for name in $NAMES; do
  [[ -v "FLAGS[$name]" ]] || { echo "arena.sh: error: unknown mitigation $name; choose from ${!FLAGS[*]}" >&2; exit 1; }
done
calibrate=0
if [[ " $NAMES " == *" wen "* && -z ${ARENA_WEN_THRESHOLD:-} ]]; then
  [[ " $NAMES " == *" none "* ]] || { echo "arena.sh: error: wen's threshold is calibrated on the run without \
mitigation; add none to ARENA_MITIGATIONS or set ARENA_WEN_THRESHOLD" >&2; exit 1; }
  calibrate=1
  NAMES="none ${NAMES//none/}"  # trained first: wen's threshold is read from its probes
fi
start=$EPOCHREALTIME
stages="dataset base_model"
[[ ${ARENA_SKIP_SETUP:-0} == 1 ]] || stages="setup $stages"
DEMO_CONFIG=$CONFIG DEMO_DIR=$DIR DEMO_STAGES=$stages bash data_scripts/demo.sh
evaluate_args=$(sed -n "s/^# evaluate: *//p" "$CONFIG" | head -n 1)

arena_run() {  # arena_run NAME: train with the mitigation's flags, evaluate under both schedules, time both
  local name=$1 run=$DIR/$1 t0 t1 train_s
  rm -rf "$run" "$DIR/$name.timing"
  t0=$EPOCHREALTIME
  echo "[arena] == train $name: ${FLAGS[$name]:-no mitigation}"
  # shellcheck disable=SC2086  # flag lists
  $PY -m accelerate.commands.launch $LAUNCH train/finetune.py --config "$CONFIG" \
    --pretrained_model_name_or_path "$DIR/base" --train_data_dir "$DIR/data" --output_dir "$run" ${FLAGS[$name]}
  train_s=$(seconds_since "$t0")
  t1=$EPOCHREALTIME
  echo "[arena] == evaluate $name, constant guidance, every checkpoint"
  # shellcheck disable=SC2086
  $PY eval/evaluate_checkpoints.py --run_dir "$run" $evaluate_args
  echo "[arena] == evaluate $name, delay:$DELAY guidance, last checkpoint"
  # shellcheck disable=SC2086
  $PY eval/evaluate_checkpoints.py --run_dir "$run" $evaluate_args --guidance_schedule "delay:$DELAY" --checkpoints last
  echo "$name train $train_s evaluate $(seconds_since "$t1")" > "$DIR/$name.timing"
}

calibrate_wen() {  # the wen flags from the finished unmitigated run's probes (eval/wen_threshold.py)
  $PY eval/wen_threshold.py --run_dir "$DIR/none" --quantile "${ARENA_WEN_QUANTILE:-0.95}" \
    --last_steps "${ARENA_WEN_LAST_STEPS:-1}" --output "$DIR/wen_thresholds.json" | tee "$DIR/wen_threshold.txt"
  FLAGS[wen]="--mitigation_wen_thresholds $DIR/wen_thresholds.json"
  echo "[arena] wen thresholds per timestep in $DIR/wen_thresholds.json (calibrated on $DIR/none)"
}

runs=()
for name in $NAMES; do
  runs+=("$DIR/$name")
  if [[ $name == none && $calibrate == 1 ]]; then  # the others wait for it
    ( set -e; arena_run none ) 2>&1 | tee "$DIR/none.log"
    calibrate_wen
  elif (( JOBS > 1 )); then
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    ( set -e; arena_run "$name" ) > "$DIR/$name.log" 2>&1 &
  else
    arena_run "$name"
  fi
done
wait
for name in $NAMES; do  # a run that finished wrote its .timing
  [[ -f "$DIR/$name.timing" ]] || { echo "arena.sh: error: mitigation $name failed (see $DIR/$name.log)" >&2; exit 1; }
done
publish=()
if [[ $CONFIG == configs/demo_cpu.yaml && $DIR == runs/arena && -z ${ARENA_MITIGATIONS:-} ]]; then
  publish=(--publish docs/arena --readme README.md)  # only the default arena writes the figures the README states
fi
$PY eval/compare_runs.py "${runs[@]}" --output_dir "$DIR/compare" "${publish[@]}"
for name in $NAMES; do cat "$DIR/$name.timing"; done > "$DIR/arena_timings.txt"
echo "arena total $(seconds_since "$start") (jobs $JOBS)" | tee -a "$DIR/arena_timings.txt"
if (( ${#publish[@]} )); then
  cp "$DIR/arena_timings.txt" docs/arena/arena_timings.txt
  [[ ! -f $DIR/wen_threshold.txt ]] || cp "$DIR/wen_threshold.txt" docs/arena/wen_threshold.txt
  [[ ! -f $DIR/wen_thresholds.json ]] || cp "$DIR/wen_thresholds.json" docs/arena/wen_thresholds.json
fi
echo "[arena] report: $DIR/compare/report.md (wall seconds per run: $DIR/arena_timings.txt)"
