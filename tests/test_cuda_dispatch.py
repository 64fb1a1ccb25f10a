"""Backend selection by PYCOMPRESS_KERNELS, on any machine (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pycompress import kernels

PROBE = "import pycompress.kernels as k; print(k.BACKEND, k.cuda is not None)"


def backend_with(value: str) -> subprocess.CompletedProcess:
    # The same pycompress as this process (installed or checkout), whatever
    # the working directory would put first on sys.path.
    home = str(Path(kernels.__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (home, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYCOMPRESS_KERNELS=value, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=Path(home).anchor, capture_output=True,
                          text=True, timeout=120, check=False)


def test_cpu_and_reference_are_forced():
    cpu = backend_with("cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.split() == ["native" if kernels.native is not None else "reference", "False"]
    ref = backend_with("reference")
    assert ref.returncode == 0, ref.stderr
    assert ref.stdout.split() == ["reference", "False"]


def test_unknown_value_is_an_import_error_naming_it():
    out = backend_with("gpu-please")
    assert out.returncode != 0
    assert "PYCOMPRESS_KERNELS='gpu-please'" in out.stderr


def test_forcing_cuda_without_usable_kernels_says_why():
    if kernels.cuda is not None:
        pytest.skip("the CUDA kernels are usable here")
    out = backend_with("cuda")
    assert out.returncode != 0
    assert "PYCOMPRESS_KERNELS=cuda but the CUDA kernels are not usable" in out.stderr


def test_default_backend_reports_why_cuda_is_not_used():
    if kernels.cuda is None:
        assert kernels.CUDA_ERROR
        assert kernels.BACKEND in ("native", "reference")
    else:
        assert kernels.BACKEND == "cuda" and kernels.CUDA_ERROR is None
