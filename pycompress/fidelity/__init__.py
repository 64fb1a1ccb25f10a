"""Measuring a compressed model against its teacher: onnxruntime sessions,
activations, and (with the PAC-BO issue) subsampled U-statistic estimates."""

from pycompress.fidelity.session import collect_activations, iterate_batches, make_session, run_model, run_tensors

__all__ = ["collect_activations", "iterate_batches", "make_session", "run_model", "run_tensors"]
