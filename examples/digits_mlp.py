"""A 64-1000-1000-10 MLP trained on scikit-learn's real handwritten digits.

Build and export it yourself:
    pycompress convert examples/digits_mlp.py:build -o mlp.onnx --input-shape 1,64
"""

import numpy as np


def build(epochs: int = 15, seed: int = 0):
    from sklearn.datasets import load_digits

    from pycompress.cli.demo import train_digits_mlp

    data = load_digits()
    return train_digits_mlp((data.data / 16.0).astype(np.float32), data.target.astype(np.int64), epochs, seed)
