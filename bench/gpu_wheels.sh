#!/usr/bin/env bash
# The wheels bench/gpu.py needs on the lent GPU machine (Python 3.12, no network; it has torch, transformers,
# accelerate, peft, safetensors, pyarrow, pandas, fsspec, pyyaml, pillow, regex...): into .whl/, which git ignores.
#   bash bench/gpu_wheels.sh
# Then, in the device call: carry [".whl"], and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   && export PYTHONPATH=/tmp/site:$PWD || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==$(version diffusers)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "ftfy==$(version ftfy)" "wcwidth==$(version wcwidth)" "importlib-metadata==$(version importlib-metadata)"
du -sh .whl
