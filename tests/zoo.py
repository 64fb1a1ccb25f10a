"""Small torch models for the tests, and the real EfficientNet-Lite0.

Random weights serve graph-structure checks only; accuracy checks train on
sklearn digits (see ``train_digits_mlp``) or use the pretrained CNN.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, sizes=(64, 32, 16, 10)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class DepthwiseBlock(nn.Module):
    """conv 3->8 (3x3, stride 2), depthwise 3x3, pointwise 8->16, GAP, FC 16->10; no BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.pw(x))
        return self.fc(x.mean(dim=(2, 3)))


class ResidualCNN(nn.Module):
    """Conv-BN stem, one identity and one projection residual block, flatten -> FC."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.b2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w))
        self.proj = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.fc = nn.Linear(2 * w * 4 * 4, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.proj(x) + self.b2(x))
        return self.fc(torch.flatten(x, 1))


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module.eval()


def torch_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bn_channels(module: nn.Module) -> int:
    return sum(m.num_features for m in module.modules() if isinstance(m, nn.BatchNorm2d))


def conv_macs(co, ci_per_group, kh, kw, ho, wo) -> int:
    return co * ci_per_group * kh * kw * ho * wo


def digits():
    """sklearn's 1797 real 8x8 digits, scaled to [0, 1], split 1200/597."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    return (x[:1200], y[:1200]), (x[1200:], y[1200:])


def train(module: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30, lr: float = 1e-3, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(module(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return module.eval()


def train_one_thread(module: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30, **kwargs):
    """``train`` with torch on one thread: the same weights whatever the machine's core count
    (tests that compare two runs, or an agent's timings, need the very same model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(module, x, y, epochs=epochs, **kwargs)
    finally:
        torch.set_num_threads(threads)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == y))


def efficientnet_lite0() -> nn.Module:
    """The real pretrained EfficientNet-Lite0 (ImageNet weights from its package)."""
    from pycompress.pretrained import efficientnet_lite0 as pretrained

    return pretrained()


def skimage_crops(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    """n random crops of scikit-image's colour photos, ImageNet-normalized, NCHW float32."""
    from skimage import data as skdata
    from skimage.transform import resize

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"]
    images = []
    for name in names:
        img = getattr(skdata, name)()
        if img.ndim == 3 and img.shape[2] >= 3:
            images.append(img[..., :3].astype(np.float32) / 255.0)
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y0, x0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = resize(img[y0:y0 + side, x0:x0 + side], (size, size), anti_aliasing=True)
        out[i] = ((crop - mean) / std).transpose(2, 0, 1)
    return out
