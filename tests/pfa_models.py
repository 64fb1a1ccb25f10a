"""A small CNN trained on sklearn digits (8x8 -> 1x8x8), exported once per test process."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import zoo


class DigitsCNN(nn.Module):
    """conv 1->12 3x3, ReLU, conv 12->24 3x3, ReLU, maxpool 2, flatten, FC 384->48, ReLU, FC 48->10."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 24, 3, padding=1)
        self.fc1 = nn.Linear(24 * 4 * 4, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


@functools.lru_cache(maxsize=None)
def digits_cnn() -> tuple[DigitsCNN, Path, tuple[np.ndarray, np.ndarray]]:
    """(trained module, exported .onnx path, held-out (x as Nx1x8x8, y))."""
    from conftest import export

    (xtr, ytr), (xte, yte) = zoo.digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is ~10x faster than two on a busy machine
    try:
        module = zoo.train(DigitsCNN(), xtr.reshape(-1, 1, 8, 8), ytr, epochs=8, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    folder = Path(tempfile.mkdtemp(prefix="pfa_cnn_"))
    path = export(module, (1, 1, 8, 8), folder / "digits_cnn.onnx")
    return module, path, (xte.reshape(-1, 1, 8, 8), yte)


class RGBNet(nn.Module):
    """conv 3->8 (stride 2), ReLU, conv 8->16, ReLU, global average pool, FC 16->10 (random weights)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@functools.lru_cache(maxsize=None)
def rgb_net(size: int = 32) -> Path:
    from conftest import export

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="pfa_rgb_"))
    return export(RGBNet(), (1, 3, size, size), folder / "rgb_net.onnx")
