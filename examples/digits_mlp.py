"""A 64-1000-1000-10 MLP trained on scikit-learn's real handwritten digits.

Used by the README's main-job command:
    pycompress convert examples/digits_mlp.py:build -o mlp.onnx --input-shape 1,64
"""

import numpy as np
import torch
from torch import nn


def build(epochs: int = 15, seed: int = 0) -> nn.Module:
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    data = load_digits()
    x = torch.from_numpy((data.data / 16.0).astype(np.float32))
    y = torch.from_numpy(data.target.astype(np.int64))
    model = nn.Sequential(nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
