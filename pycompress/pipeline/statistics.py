"""Data the rewrites read, made by the pipeline (which owns onnxruntime): values of the
original model measured once per run, and activation sources bound to a model."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pycompress.ir import token_mask_input

# Calibration samples (and batch) of the statistics measured once on the original model.
TEACHER_SAMPLES, TEACHER_BATCH = 512, 64


def teacher_activations(model: ir.Model, inputs: dict[str, np.ndarray], *, samples: int = TEACHER_SAMPLES,
                        batch_size: int = TEACHER_BATCH, seed: int = 0):
    """``names -> batches`` of the original model's values on a fixed calibration subsample
    (``Rewrite.prepare`` reads it; nothing runs until it is called)."""
    from pycompress.fidelity import collect_activations

    n = len(next(iter(inputs.values())))
    idx = np.sort(np.random.default_rng(seed).choice(n, min(n, samples), replace=False))

    def batches():
        for start in range(0, len(idx), batch_size):
            yield {k: v[idx[start:start + batch_size]] for k, v in inputs.items()}

    return lambda names: collect_activations(model, names, batches())


def teacher_channel_statistics(model: ir.Model, inputs: dict[str, np.ndarray], *, samples: int = TEACHER_SAMPLES,
                               batch_size: int = TEACHER_BATCH, seed: int = 0) -> dict:
    """FLAP statistics (``rewrites.prune_channels.channel_statistics``) of every prunable group,
    measured once on the original model: a search then prunes by fluctuation, with bias
    compensation, at no cost per evaluation (``ApplyContext.options["channel_statistics"]``).
    For tools and tests; compress gets them through ``Rewrite.prepare``."""
    from pycompress.ir.channels import channel_groups
    from pycompress.ir.heads import attention_heads
    from pycompress.rewrites.prune_channels import channel_statistics

    groups = [g for g in channel_groups(model) if g.prunable] + attention_heads(model)
    if not groups:
        return {}
    activations = teacher_activations(model, inputs, samples=samples, batch_size=batch_size, seed=seed)
    return channel_statistics(groups, activations, token_mask_input(model))


def model_activations(data, samples: int, seed: int):
    """``(model, names) -> batches`` of any model's values on a fixed calibration subset (made at
    the first call): for rewrites that calibrate the graph they rewrite (``ApplyContext.model_activations``)."""
    from pycompress.fidelity import collect_activations
    from pycompress.fidelity.session import upstream_of

    subset: dict[str, np.ndarray] = {}

    def activations(model, names):
        if not subset:
            n = len(data)
            index = np.sort(np.random.default_rng([seed, 7]).choice(n, min(n, samples), replace=False))
            subset.update({k: np.asarray(v[index]) for k, v in data.inputs.items()})
        count = len(next(iter(subset.values())))
        batches = ({k: v[i:i + 32] for k, v in subset.items()} for i in range(0, count, 32))
        yield from collect_activations(upstream_of(model, names), names, batches)

    return activations


def run_activations(model: ir.Model, data, batch_size: int = 32):
    """``names -> batches`` of ``model``'s values as it is being rewritten in place, on the whole
    calibration data (``ApplyContext.activations``; nothing runs until a rewrite asks)."""
    from pycompress.fidelity.session import activation_source

    return activation_source(model, data.inputs, batch_size)
