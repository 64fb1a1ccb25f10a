"""A small BERT-like sentence encoder built in the tests (random weights: structure checks)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

VOCAB, HIDDEN, HEADS, FFN, LAYERS = 50, 32, 4, 64, 2


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.up, self.down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def heads(self, x):
        b, t, _ = x.shape
        return x.view(b, t, HEADS, HIDDEN // HEADS).transpose(1, 2)

    def forward(self, x, bias):
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5 + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2)
        b, t = x.shape[:2]
        x = self.norm1(x + self.out(context.reshape(b, t, HIDDEN)))
        return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))


class TinyEncoder(nn.Module):
    """(input_ids, attention_mask) -> L2-normalised mean-pooled embedding, like all-MiniLM-L6-v2."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Embedding(64, HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(t))
        mask = attention_mask.to(x.dtype)
        bias = (1.0 - mask)[:, None, None, :] * -10000.0
        for layer in self.layers:
            x = layer(x, bias)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=1)


def export_tiny_encoder(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = TinyEncoder().eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    buffer = io.BytesIO()
    torch.onnx.export(model, (ids, torch.ones_like(ids)), buffer, dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"}, "embedding": {0: "batch"}})
    Path(path).write_bytes(buffer.getvalue())
    return Path(path)


def token_batch(n: int, t: int = 12, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, t)).astype(np.int64)
    lengths = rng.integers(4, t + 1, size=n)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}
