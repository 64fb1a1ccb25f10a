"""Measuring a compressed model against its teacher: onnxruntime sessions,
activations, and subsampled U-statistic estimates (mean, variance of the mean)."""

from pycompress.fidelity.estimators import (
    LOSSES,
    Estimate,
    FidelityEstimator,
    cross_entropy_losses,
    function_norm_losses,
    mean_and_variance,
    top1_error_losses,
)
from pycompress.fidelity.session import collect_activations, iterate_batches, make_session, run_model, run_tensors

__all__ = ["LOSSES", "Estimate", "FidelityEstimator", "collect_activations", "cross_entropy_losses",
           "function_norm_losses", "iterate_batches", "make_session", "mean_and_variance", "run_model",
           "run_tensors", "top1_error_losses"]
