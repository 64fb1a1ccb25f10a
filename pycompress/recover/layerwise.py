"""Closed-form, layer-wise, teacher-guided recovery (ALGORITHMS.md 4).

For each compressed layer, front to back: stream its inputs from the
*compressed* model and its targets (the same layer's pre-activation outputs)
from the *teacher* over calibration data into ``LayerStatistics``, refit by
ridge least squares (a single linear layer, e.g. the consumer of pruned
channels, refitted on the kept channels) or by reduced-rank regression (a
factored pair A -> B at its rank), and keep the refit only if it lowers the
layer's output error; otherwise the layer is left as it was.

Fit and validation, by cross-validation over *sources*: the calibration
samples are split into folds (``sample_groups``: the photo each crop came
from, when the data source knows it; else the batches, dealt round-robin
into ``FOLDS`` folds). Each layer's statistics are kept per fold; the refit
of every ridge strength in ``RIDGE_GRID`` is fitted on all folds but one and
judged on the one left out (exact, from the pooled statistics: no second
pass), the strength with the lowest left-out error wins, and the refit
(then fitted on all folds) is kept only if that left-out error is below the
original layer's. The ridge shrinks toward the layer's *current* weights, not
toward 0: a strong ridge leaves the layer as it is (with its intercept
refitted), so the grid moves between "as compressed" and "fitted to the
calibration data". Why leave-one-*photo*-out: crops of one photo overlap and
share its statistics; judged on other crops of the fitted photos, a refit to
five photos looked better while its agreement on other photos fell (to 0 on
EfficientNet-Lite0). With a single fold there is nothing to hold out: fit and
judge on it, at the given ``lam``.

Why front to back, one pass per layer: each refit then sees the inputs that
the already-refitted earlier layers produce, so errors are corrected rather
than compounded (CramNet trains sub-problems from the output back with
gradient descent; the closed form needs the true inputs, hence this order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.fidelity.session import make_session, run_tensors
from pycompress.ir import node_by_name, truncated
from pycompress.recover.linear_view import (
    LinearView,
    check_refittable,
    feature_axis,
    output_pixels,
    rows,
    target_rows,
)
from pycompress.recover.normal_equations import LayerStatistics

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
FOLDS = 4                                            # batch folds when the samples' sources are unknown
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)   # relative strengths toward the current weights


@dataclass
class RefitTarget:
    """A layer to refit: one linear node, or a factored pair [first, second] at ``rank``.

    A MatMul followed by the Add of a constant bias is one linear layer (the
    Add is found from the MatMul: ``LinearView.of``); ``target`` is then the
    teacher's tensor after the bias.
    """

    nodes: list[str]
    target: str                  # the teacher's tensor this layer must reproduce
    rank: int | None = None      # pairs only
    # The teacher channels (feature axis) the layer still produces, when its
    # own outputs were pruned too; None: all of them.
    target_channels: list[int] | None = None


@dataclass
class RefitResult:
    nodes: list[str]
    error_before: float
    error_after: float
    kept: bool
    samples: int
    seconds: float
    note: str = ""
    validation_samples: int = 0     # rows the errors are measured on, left out of their fit (0: the fitted ones)
    folds: int = 1                  # cross-validation folds (photos or batch folds); 1: none
    lam: float | None = None        # the ridge strength chosen


@dataclass
class RecoveryReport:
    results: list[RefitResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": [r.__dict__ for r in self.results]}


def _token_rows(feeds: Mapping[str, np.ndarray], token_mask: str | None, node: ir.Node,
                shape: tuple[int, ...]) -> np.ndarray | None:
    """Rows of a ``B x T x D`` activation to fit: the tokens where the mask input is not 0
    (padding tokens do not reach a pooled output: fitting them wastes the refit on them).
    None: all rows (no mask, or the activation is not ``B x T x D`` with features last)."""
    if token_mask is None or token_mask not in feeds or node.op_type != "MatMul" or len(shape) != 3 \
            or feature_axis(node, 3) != 2:
        return None
    mask = np.asarray(feeds[token_mask])
    if mask.shape != tuple(shape[:2]):
        return None
    return mask.reshape(-1) != 0


def _teacher_rows(teacher: ir.Model, targets: list[RefitTarget], nodes: list[list[ir.Node]], batches: Batches,
                  max_pixels: int, seed: int,
                  token_mask: str | None = None) -> list[list[tuple[np.ndarray | None, np.ndarray]]]:
    """Per target, per batch: the output pixels drawn and the teacher's rows there (float32)."""
    session = make_session(teacher, extra_outputs=[t.target for t in targets])
    names = list(dict.fromkeys(t.target for t in targets))
    rngs = [np.random.default_rng([seed, i]) for i in range(len(targets))]
    out: list[list] = [[] for _ in targets]
    for feeds in batches():
        values = dict(zip(names, run_tensors(session, names, feeds)))
        for i, (target, pair) in enumerate(zip(targets, nodes)):
            y = values[target.target]
            if target.target_channels is not None:
                y = np.take(y, target.target_channels, axis=feature_axis(pair[-1], y.ndim))
            pix = output_pixels(pair[0], y.shape, max_pixels, rngs[i])
            yr = target_rows(pair[-1], y, pix)
            keep = _token_rows(feeds, token_mask, pair[-1], y.shape)
            if keep is not None:
                yr = yr[keep]
            out[i].append((pix, np.ascontiguousarray(yr, dtype=np.float32)))
    return out


def _validate(student: ir.Model, target: RefitTarget) -> list[ir.Node]:
    nodes = [node_by_name(student, name) for name in target.nodes]
    for node in nodes:
        reason = check_refittable(node)
        if reason:
            raise PycompressError(f"node '{node.name}': cannot refit: {reason}")
    if len(nodes) == 2:
        first, second = nodes
        if LinearView.of(second).activation is not LinearView.of(first).output:
            raise PycompressError(f"nodes '{first.name}' -> '{second.name}' are not a factored pair")
        if second.op_type == "Conv" and LinearView(second).weight_matrix().shape[0] != \
                LinearView(first).weight_matrix().shape[1]:
            raise PycompressError(f"node '{second.name}': second factor must be a 1x1 conv")
    elif len(nodes) != 1:
        raise PycompressError(f"refit target {target.nodes}: one node or a pair")
    return nodes


def _row_folds(fold_of_samples: np.ndarray, n_samples: int, n_rows: int, keep: np.ndarray | None) -> np.ndarray:
    """The fold of every row: rows are sample-major (``rows``/``target_rows``), then filtered by ``keep``."""
    folds = np.repeat(fold_of_samples, n_rows // max(n_samples, 1))
    return folds if keep is None else folds[keep]


def _cross_validated(parts: list[LayerStatistics], fit, w_now: np.ndarray, b_now: np.ndarray):
    """(left-out error, lam) of the best ridge strength, and the original layer's error on the same rows.

    ``fit(stats, lam) -> (W, b)``; each fold is judged on a fit to the others.
    """
    total = sum(p.count for p in parts)
    others = [LayerStatistics.pooled([q for j, q in enumerate(parts) if j != i]) for i in range(len(parts))]
    before = sum(p.count * p.error(w_now, b_now) for p in parts) / total
    scores = []
    for lam in RIDGE_GRID:
        err = 0.0
        for part, rest in zip(parts, others):
            w, b = fit(rest, lam)
            err += part.count * part.error(w, b)
        scores.append((err / total, lam))
    return min(scores), before


def refit_layers(teacher: ir.Model, student: ir.Model, targets: list[RefitTarget], batches: Batches, *,
                 lam: float = 1e-3, max_pixels: int = 64, seed: int = 0, token_mask: str | None = None,
                 sample_groups: Sequence[np.ndarray] | None = None,
                 progress: Callable[[str], None] | None = None) -> RecoveryReport:
    """Refit ``targets`` of ``student`` in place, in the given (front-to-back) order.

    The teacher never changes: one pass over the data collects the target rows
    of every layer (at most ``max_pixels`` output pixels per sample, drawn per
    layer and batch before any data is seen). The student changes after each
    refit, so each layer takes one pass of the student truncated at its input.
    ``token_mask``: the graph input (``B x T``, 0 at padding) of a token model;
    the rows of padding tokens are left out of the fits.
    ``sample_groups``: per batch, the source (e.g. photo) of each sample; the
    validation folds (module docstring). None: batches dealt into ``FOLDS`` folds.
    """
    report = RecoveryReport()
    checked = [_validate(student, target) for target in targets]
    teacher_rows = _teacher_rows(teacher, targets, checked, batches, max_pixels, seed, token_mask)
    graph_inputs = {v.name for v in student.graph.inputs}
    for t, (target, nodes) in enumerate(zip(targets, checked)):
        start = time.perf_counter()
        first, last = nodes[0], nodes[-1]
        views = [LinearView.of(n) for n in nodes]
        w_now = views[0].weight_matrix().astype(np.float64)
        b_now = views[0].bias()
        if len(views) == 2:
            w2 = views[1].weight_matrix().astype(np.float64)
            b_now = b_now @ w2 + views[1].bias()
            w_now = w_now @ w2
        intercept = views[-1].bias_slot     # a bare MatMul is refitted through the origin
        parts: dict[int, LayerStatistics] = {}
        source = views[0].activation.name
        student_session = None if source in graph_inputs else make_session(truncated(student, [source]))
        n_batches = len(teacher_rows[t])
        for b, (feeds, (pix, yr)) in enumerate(zip(batches(), teacher_rows[t])):
            x = feeds[source] if student_session is None else run_tensors(student_session, [source], feeds)[0]
            xr, _ = rows(first, x, pixels=pix)
            n_rows = xr.shape[0]
            keep = _token_rows(feeds, token_mask, first, x.shape)
            if keep is not None:
                xr = xr[keep]
            if xr.shape[0] != yr.shape[0]:
                raise PycompressError(f"node '{last.name}': teacher tensor '{target.target}' does not align "
                                      f"with the layer's outputs ({yr.shape[0]} vs {xr.shape[0]} rows)")
            n = x.shape[0]
            if sample_groups is not None:
                fold_rows = _row_folds(np.asarray(sample_groups[b]), n, n_rows, keep)
            else:
                fold_rows = np.full(xr.shape[0], b % min(FOLDS, n_batches))
            for fold in np.unique(fold_rows):
                sel = fold_rows == fold
                parts.setdefault(int(fold), LayerStatistics(*w_now.shape)).update(
                    np.ascontiguousarray(xr[sel]), np.ascontiguousarray(yr[sel]))
        folds = [parts[k] for k in sorted(parts)]
        stats = LayerStatistics.pooled(folds) if len(folds) > 1 else folds[0]
        rank = int(target.rank or w_now.shape[1])

        warm: dict[int, np.ndarray] = {}    # fold statistics -> its last fit's basis (the sweep's warm start)

        def fit(data: LayerStatistics, strength: float, views=views, intercept=intercept, w_now=w_now, rank=rank,
                warm=warm):
            if len(views) == 1:
                return data.ridge(strength, intercept, prior=w_now)
            a, bf, b = data.reduced_rank(rank, strength, intercept, prior=w_now, start=warm.get(id(data)))
            warm[id(data)] = bf.T
            return a @ bf, b

        note = ""
        chosen = lam
        try:
            if len(folds) > 1:
                (after, chosen), before = _cross_validated(folds, fit, w_now, b_now)
            else:
                before = stats.error(w_now, b_now)
                after = stats.error(*fit(stats, lam))
            if after < before:
                if len(views) == 1:
                    views[0].set(*stats.ridge(chosen, intercept, prior=w_now))
                else:
                    a, bf, b_new = stats.reduced_rank(rank, chosen, intercept, prior=w_now)
                    views[0].set(a, np.zeros(a.shape[1]) if views[0].has_bias else None)
                    views[1].set(bf, b_new)
        except np.linalg.LinAlgError as exc:
            before = after = float("nan")
            note = f"solve failed: {exc}"
        kept = bool(after < before)
        result = RefitResult(list(target.nodes), before, after if kept else before, kept, stats.count,
                             time.perf_counter() - start,
                             note or ("" if kept else "refit would not lower the left-out error"),
                             validation_samples=stats.count if len(folds) > 1 else 0, folds=len(folds),
                             lam=chosen if kept else None)
        report.results.append(result)
        if progress:
            progress(f"refit {'/'.join(target.nodes)}: error {before:.4g} -> {result.error_after:.4g}"
                     f"{'' if kept else ' (kept original)'}")
    return report
