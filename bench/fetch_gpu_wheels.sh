#!/usr/bin/env bash
# Download the wheels that bench/gpu_check.sh installs on the GPU machine into .whl/ (git-ignored).
#
#     bash bench/fetch_gpu_wheels.sh        # here, with network access to PyPI; then carry ".whl"
#
# The GPU machine (python 3.12, x86-64, no network) has torch, accelerate, transformers, tensorboard,
# pandas, pyarrow, scikit-image, scikit-learn, matplotlib, but not diffusers, datasets or deepspeed
# (/work/.library/device/KINDS.md). This fetches those at the versions pinned in requirements.txt,
# peft at its pin (the image's version is unknown), and each one's requirements that the image
# lacks, one version of each. deepspeed ships only as a source archive: it is built here into a
# pure-Python wheel with DS_BUILD_OPS=0 (its ops compile just in time where they are needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
MAX_MIB=32  # the whole working tree that travels with a device call must stay under 64 MiB

pin() {  # NAME -> NAME==VERSION as pinned in requirements.txt
    local line
    line=$(grep -iE "^$1==" requirements.txt | head -1)
    [ -n "$line" ] || { echo "fetch_gpu_wheels.sh: $1 is not pinned in requirements.txt" >&2; exit 1; }
    echo "$line"
}

# Requirements missing from the device image, at the versions that resolved with requirements.txt:
# diffusers needs importlib-metadata; datasets dill and multiprocess; deepspeed hjson and pydantic
# (pydantic 2.14 needs pydantic-core, annotated-types, typing-inspection, typing-extensions >= 4.16).
MISSING_DEPS=(importlib-metadata==10.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 pydantic==2.14.4
              pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$tmp" \
    "$(pin diffusers)" "$(pin datasets)" "$(pin peft)" "${MISSING_DEPS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp" "$(pin deepspeed)"

count=$(ls "$tmp"/*.whl | wc -l)
expected=$((4 + ${#MISSING_DEPS[@]}))
[ "$count" -eq "$expected" ] || { echo "fetch_gpu_wheels.sh: got $count wheels, expected $expected" >&2; exit 1; }
size_mib=$(du -sm "$tmp" | cut -f1)
[ "$size_mib" -le "$MAX_MIB" ] || { echo "fetch_gpu_wheels.sh: wheels take $size_mib MiB (> $MAX_MIB)" >&2; exit 1; }

# Replace .whl/ as a whole, so that no older version of a wheel stays beside the new one.
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
chmod 755 "$DEST"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"
ls -1 "$DEST"
echo "fetch_gpu_wheels.sh: $count wheels, $(du -sh "$DEST" | cut -f1) in $DEST/ (ignored via $exclude); carry [\"$DEST\"]"
