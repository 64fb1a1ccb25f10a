"""How far a model's outputs are from a reference model's (ALGORITHMS.md 2 and 5).

Per sample ``j``: ``l_j = ||f~(x_j) - f*(x_j)||_2^2`` over the flattened
output. ``L^ = mean(l)`` with standard error ``sqrt(s^2 / m)`` (``s^2`` the
sample variance, ddof 1): a first-order U-statistic. For classifier-shaped
outputs (``[m, C]``, ``C > 1``) also the top-1 agreement
``mean(argmax f~(x_j) == argmax f*(x_j))`` and its standard error.

Embeddings get the mean cosine similarity ``cos(f~(x_j), f*(x_j))`` (with its
standard error) instead of a top-1 agreement, which means nothing over
embedding dimensions. An output is an embedding (``is_embedding``) when

- it has 3 or more axes (``[m, T, D]`` token states): the cosine is taken
  between the per-sample means over the middle axes (mean pooling), or
- it is ``[m, D]`` and every row of the reference has unit L2 norm (within
  1e-3): a normalised sentence / image embedding.

Classifier outputs also get the top-5 containment
``mean(argmax f*(x_j) in top5 f~(x_j))`` (the original's
answer is still among the candidate's five best) and the mean
``KL(p* || p~)`` of the class distributions (softmax of the outputs, or the
outputs themselves when every row is already a distribution).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class OutputComparison:
    samples: int
    max_abs_diff: float
    mean_sq_error: float           # L^ = mean_j ||f~(x_j) - f*(x_j)||^2
    sq_error_se: float             # sqrt(var(l) / m); nan with one sample
    relative_error: float          # ||f~ - f*||_F / ||f*||_F over all samples
    top1_agreement: float | None   # None when the output is not [m, C] or is an embedding
    top1_agreement_se: float | None
    cosine: float | None = None    # mean cosine similarity, for embeddings (see is_embedding)
    cosine_se: float | None = None
    top5_containment: float | None = None   # original's top-1 among the candidate's top 5
    kl_divergence: float | None = None      # mean KL(p_reference || p_candidate), nats

    def to_dict(self) -> dict:
        return asdict(self)


UNIT_NORM_TOLERANCE = 1e-3


def is_embedding(reference: np.ndarray) -> bool:
    """Whether an output ``[m, ...]`` is compared as an embedding (see the module docstring)."""
    ref = np.asarray(reference)
    if ref.ndim >= 3:
        return True
    if ref.ndim == 2 and ref.shape[1] > 1 and ref.shape[0] > 0:
        norms = np.linalg.norm(ref.astype(np.float64), axis=1)
        return bool(np.all(np.abs(norms - 1.0) < UNIT_NORM_TOLERANCE))
    return False


def pooled(output: np.ndarray) -> np.ndarray:
    """``[m, D]`` per-sample vectors: token states ``[m, T, ..., D]`` averaged over the middle axes."""
    out = np.asarray(output, np.float64)
    return out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1) if out.ndim >= 3 else out.reshape(len(out), -1)


def cosine_similarities(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per-sample cosine between the (pooled) outputs."""
    a, b = pooled(reference), pooled(candidate)
    denom = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return np.sum(a * b, axis=1) / denom


def _distributions(outputs: np.ndarray) -> np.ndarray:
    """Rows as class distributions: kept when they already are (non-negative, sum 1), else softmax."""
    if outputs.min() >= 0 and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def classifier_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Top-1 agreement (+ its standard error), top-5 containment and mean KL for ``[m, C]`` outputs."""
    ref = np.asarray(reference, np.float64)
    out = np.asarray(candidate, np.float64)
    m = ref.shape[0]
    truth = ref.argmax(axis=1)
    same = (truth == out.argmax(axis=1)).astype(np.float64)
    k = min(5, ref.shape[1])
    top = np.argpartition(-out, k - 1, axis=1)[:, :k]
    p, q = _distributions(ref), _distributions(out)
    kl = (p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))).sum(axis=1)
    return {"top1_agreement": float(same.mean()),
            "top1_agreement_se": float(math.sqrt(same.var(ddof=1) / m)) if m > 1 else math.nan,
            "top5_containment": float(np.mean((top == truth[:, None]).any(axis=1))),
            "kl_divergence": float(np.mean(kl))}


def compare_outputs(reference: np.ndarray, candidate: np.ndarray) -> OutputComparison:
    """Compare two outputs of shape ``[m, ...]`` (first axis = samples)."""
    ref = np.asarray(reference, np.float64)
    out = np.asarray(candidate, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {out.shape}")
    m = ref.shape[0] if ref.ndim else 1
    diff = (out - ref).reshape(m, -1)
    losses = (diff ** 2).sum(axis=1)
    se = float(math.sqrt(losses.var(ddof=1) / m)) if m > 1 else math.nan
    norm = float(np.linalg.norm(ref))
    cosine = cosine_se = None
    classes: dict[str, float] = {}
    if is_embedding(ref):
        cos = cosine_similarities(ref, out)
        cosine = float(cos.mean())
        cosine_se = float(math.sqrt(cos.var(ddof=1) / m)) if m > 1 else math.nan
    elif ref.ndim == 2 and ref.shape[1] > 1:
        classes = classifier_agreement(ref, out)
    return OutputComparison(
        samples=int(m),
        max_abs_diff=float(np.abs(diff).max()) if diff.size else 0.0,
        mean_sq_error=float(losses.mean()),
        sq_error_se=se,
        relative_error=float(np.linalg.norm(diff)) / norm if norm else float(np.linalg.norm(diff)),
        top1_agreement=classes.get("top1_agreement"),
        top1_agreement_se=classes.get("top1_agreement_se"),
        top5_containment=classes.get("top5_containment"),
        kl_divergence=classes.get("kl_divergence"),
        cosine=cosine,
        cosine_se=cosine_se,
    )


def heldout_comparison(original, candidate, inputs, *, threads: int | None = None) -> dict:
    """Both models (``ir.Model``) on held-out ``inputs``: the first output compared (``compare_outputs``)."""
    from pycompress.fidelity.session import run_model

    reference = run_model(original, inputs, threads=threads)[0]
    return compare_outputs(reference, run_model(candidate, inputs, threads=threads)[0]).to_dict()
