"""Shared fixtures: exported tiny models and the real EfficientNet-Lite0 (exported once)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import zoo  # noqa: E402


def export(module, shape, path, **kwargs):
    from pycompress.convert import export_to_onnx

    export_to_onnx(module.eval(), [tuple(shape)], path, **kwargs)
    return Path(path)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def efficientnet_torch():
    return zoo.efficientnet_lite0()


@pytest.fixture(scope="session")
def efficientnet_onnx(efficientnet_torch, model_cache):
    """EfficientNet-Lite0 as ONNX (legacy exporter, dynamic batch), exported once per session."""
    path = model_cache / "efficientnet_lite0.onnx"
    if not path.exists():
        export(efficientnet_torch, (1, 3, 224, 224), path)
    return path


@pytest.fixture(scope="session")
def crops():
    """24 held-out style crops of scikit-image photos (224x224, normalized)."""
    return zoo.skimage_crops(24, seed=1)


def pytest_report_header(config):
    import pycompress.kernels as k

    return f"pycompress kernels backend: {k.BACKEND}" + (f" ({k.IMPORT_ERROR})" if k.IMPORT_ERROR else "")


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Each test starts from the same global RNG state, whatever ran before it:
    torch modules draw their initial weights from the global generator."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
