#!/usr/bin/env bash
# Build pycompress/_kernels*.so next to the sources, for working in a checkout
# (or a git worktree) without installing: then `PYTHONPATH=. pytest`.
# Users and CI install with pip instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/dev
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build"
cp "$build"/_kernels*.so pycompress/
python -c "import pycompress.kernels as k; print('kernels backend:', k.BACKEND)"
