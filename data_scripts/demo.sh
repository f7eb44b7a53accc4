#!/usr/bin/env bash
# `make demo`: build the default Twemoji duplicated dataset and a tiny base model that
# never saw its images under runs/demo/ (reused when already there), then say what was written where.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
RUN=${DEMO_DIR:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [[ -f "$RUN/data/manifest.json" ]]; then
  echo "[demo] reusing dataset $RUN/data (delete it to rebuild)"
else
  echo "[demo] building the duplicated Twemoji dataset -> $RUN/data"
  $PY data_scripts/build_duplicated_dataset.py --source twemoji --output_dir "$RUN/data" \
    --max_images 256 --dup_factors 1,4,16,64 --samples_per_factor 8 --resolution 32 --seed 0
fi

if [[ -f "$RUN/base/model_index.json" ]]; then
  echo "[demo] reusing base model $RUN/base (delete it to rebuild)"
else
  echo "[demo] building the tiny base model (VAE trained on other Twemoji) -> $RUN/base"
  $PY data_scripts/make_base_model.py --output_dir "$RUN/base" --preset tiny --seed 0 \
    --exclude_dataset "$RUN/data"  # the base model never sees the study images
fi

echo "[demo] base model: $RUN/base  (StableDiffusionPipeline.from_pretrained)"
echo "[demo] dataset:    $RUN/data  (datasets.load_from_disk; ground truth in $RUN/data/manifest.json)"
