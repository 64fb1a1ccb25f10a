"""Recovering accuracy after compression with the teacher.

- ``normal_equations``: ridge and reduced-rank least squares from streamed statistics;
- ``linear_view``: Gemm / MatMul / Conv nodes as linear maps on rows (im2col);
- ``layerwise``: the closed-form, front-to-back, teacher-guided refit;
- ``torch_graph`` / ``finetune``: gradient fine-tuning of the compressed ONNX
  graph itself (imported on demand: they import torch).
"""

from pycompress.recover.layerwise import RecoveryReport, RefitResult, RefitTarget, refit_layers
from pycompress.recover.normal_equations import LayerStatistics

__all__ = ["LayerStatistics", "RecoveryReport", "RefitResult", "RefitTarget", "refit_layers"]
