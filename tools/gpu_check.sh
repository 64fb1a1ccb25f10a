#!/usr/bin/env bash
# Issue 18's checks on a GPU machine, in one command:
#   bash tools/gpu_check.sh
# Builds the CPU and CUDA kernels in place (build/cuda; set CUDA_ARCH=90 etc.
# to override the architectures), makes sure the CUDA backend is live, runs
# the gpu-marked tests (CUDA kernels against the CPU kernels), then both
# benchmarks with --device cuda (against torch.cuda doing the same work).
# Needs: nvcc, cmake, ninja, python with numpy, scipy, pybind11, pytest;
# torch with CUDA for the benchmarks and the device-tensor tests.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/cuda
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPYCOMPRESS_CUDA=ON \
  ${CUDA_ARCH:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH} \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build"
cp "$build"/_kernels*.so pycompress/
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "
import pycompress.kernels as k
print('kernels backend:', k.BACKEND, '' if k.CUDA_ERROR is None else k.CUDA_ERROR)
assert k.BACKEND == 'cuda', f'CUDA kernels not usable: {k.CUDA_ERROR}'
"
python -m pytest -q -m gpu -rs tests/test_cuda_kernels.py
python tools/bench_covariance.py --checkout --device cuda --dims 1024 4096 8192 --rows 400000 60000 20000
python tools/bench_acquisition.py --checkout --device cuda --n 100 500 --m 65536
