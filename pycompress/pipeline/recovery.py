"""Closed-form recovery after compressing: what to refit (read from the rewrites), and the refit."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import token_mask_input
from pycompress.plan import Plan
from pycompress.rewrites import get_rewrite


def recovery_targets(teacher: ir.Model, student: ir.Model, plan: Plan) -> tuple[list, list[str]]:
    """The layers of ``student`` (``teacher`` compressed by ``plan``) that the
    closed-form recovery refits, front to back, and notes on what it skips.

    Each applied decision's rewrite says what to refit from what its ``apply``
    returned (``Rewrite.refit_spec``: the tensor a rewritten layer produces, its
    rank for a factored pair, the teacher channels a pruned tensor keeps, and
    notes on what it leaves alone); the nodes are found from that tensor in the
    student, never from the names a rewrite gave them (they may be renamed since):

    - a factored pair producing the tensor is refitted at its rank (reduced-rank
      regression) against the teacher's tensor of the same name;
    - a single layer (e.g. a consumer of pruned channels: Gemm, MatMul with a
      constant weight on either side, Conv with group 1) is refitted on its inputs.
    A MatMul followed by the Add of its bias is one layer (the bias is refitted
    too, the target is the teacher's tensor after it). Tai's vertical/horizontal
    pair is not a product of two matrices on the same rows and is not refitted.
    """
    from pycompress.recover import RefitTarget
    from pycompress.recover.linear_view import LinearView, check_refittable

    position = {id(node): i for i, node in enumerate(student.graph)}
    teacher_values = {v.name for node in teacher.graph for v in node.outputs if v is not None}
    producers = {v.name: node for node in student.graph for v in node.outputs if v is not None and v.name}
    notes: list[str] = []

    # Teacher channels still produced by a pruned producer, by its output tensor.
    kept_outputs: dict[str, list[int]] = {}
    specs: dict[str, int | None] = {}      # tensor -> rank (None: a single layer)
    for decision in plan.decisions:
        # What the rewrite's apply returned, read by the rewrite itself (no action named here).
        refit = get_rewrite(decision.action).refit_spec(decision.site, decision.result or {})
        kept_outputs.update(refit.teacher_channels)
        notes += refit.notes
        for spec in refit.layers:
            rank = spec.get("rank")
            if rank is not None or spec["output"] not in specs:
                specs[spec["output"]] = rank     # a factored pair wins over a single-layer refit

    targets: list[tuple[int, RefitTarget]] = []
    for output, rank in specs.items():
        node = producers.get(output)
        if node is None:
            notes.append(f"{output}: no node of the compressed model produces it; not refitted")
            continue
        reason = check_refittable(node)
        if reason:
            if rank is None and node.op_type in ("Conv",):
                continue   # a depthwise consumer is pruned with its group: nothing to refit
            notes.append(f"{node.name or output}: {reason}; not refitted")
            continue
        view = LinearView.of(node)
        nodes = [node]
        if rank is not None:
            first = view.activation.producer()
            if first is None or check_refittable(first) or LinearView.of(first).output is not view.activation:
                notes.append(f"{output}: the factored pair producing it was not found; not refitted")
                continue
            nodes = [first, node]
        target = view.output.name
        if target not in teacher_values:
            notes.append(f"{output}: the teacher has no tensor '{target}'; not refitted")
            continue
        channels = kept_outputs.get(output)
        width, teacher_width = _feature_width(node, output, student), _feature_width(node, output, teacher)
        if channels is not None and width is not None and len(channels) != width:
            notes.append(f"{node.name or output}: its kept output channels do not map one to one; not refitted")
            continue
        if channels is None and width is not None and teacher_width is not None and width != teacher_width:
            notes.append(f"{node.name or output}: output width changed by a coupled group; not refitted")
            continue
        targets.append((position[id(nodes[0])], RefitTarget([n.name for n in nodes], target, rank=rank,
                                                            target_channels=channels)))
    ordered = [t for _, t in sorted(targets, key=lambda item: item[0])]
    return ordered, notes


def _feature_width(node: ir.Node, output: str, model: ir.Model) -> int | None:
    """Static width of ``model``'s tensor ``output`` on ``node``'s feature axis (None: unknown)."""
    from pycompress.recover.linear_view import feature_axis

    value = next((v for n in model.graph for v in n.outputs if v is not None and v.name == output), None)
    if value is None or value.shape is None:
        return None
    dim = value.shape[feature_axis(node, len(value.shape))]
    return dim if isinstance(dim, int) else None


def recover(teacher: ir.Model, student: ir.Model, plan: Plan, inputs: dict[str, np.ndarray], *,
            samples: int = 512, batch_size: int = 64, seed: int = 0, lam: float = 1e-3,
            progress=None) -> dict[str, Any]:
    """Closed-form layer-wise recovery of ``student`` in place; returns the report's ``recovery`` part."""
    from pycompress.data import sample_groups
    from pycompress.recover import refit_layers

    targets, notes = recovery_targets(teacher, student, plan)
    n = len(next(iter(inputs.values())))
    idx = np.sort(np.random.default_rng(seed).choice(n, min(n, samples), replace=False))
    subset = {k: v[idx] for k, v in inputs.items()}
    # Where the data source knows each sample's source (the photo of a built-in crop), the
    # recovery validates on whole photos left out (recover/layerwise.py).
    groups = sample_groups(inputs)
    sample_groups = None
    if groups is not None and len(np.unique(groups[idx])) > 1:
        sample_groups = [groups[idx][start:start + batch_size] for start in range(0, len(idx), batch_size)]

    def batches():
        for start in range(0, len(idx), batch_size):
            yield {k: v[start:start + batch_size] for k, v in subset.items()}

    t0 = time.perf_counter()
    report = refit_layers(teacher, student, targets, batches, lam=lam, seed=seed, progress=progress,
                          token_mask=token_mask_input(teacher), sample_groups=sample_groups)
    return {"samples": int(len(idx)), "seconds": time.perf_counter() - t0, "notes": notes, **report.to_dict()}


class SearchRecovery:
    """The cheap closed-form recovery a search applies to each candidate before scoring it.

    Before recovery every structured candidate of a deep network looks about equally broken
    (issue 14): how broken is not what recovery can repair. Refitting each candidate on a few
    calibration samples first lets the search compare what the user will get. On the digits
    residual CNN (prune + low rank, 60 random points of the 0.3 band) the rank correlation of the
    candidates' quality with their held-out accuracy after the full recovery rose from 0.39
    (before recovery) to 0.77 (after a refit on 64 samples); docs/pipeline.md.

    The samples are drawn once per run (from the run seed), and the estimator never draws them
    (``FidelityEstimator.reserve``): a candidate is scored on samples it was not fitted to. Where
    the data knows each sample's source (the photo of a built-in crop), the refit samples come from
    whole sources and every sample of those sources is reserved: other crops of the photos it was
    fitted to would score a refit that learnt those photos, not one that generalises (on one
    EfficientNet-Lite0 candidate a refit on 32 crops scored better on other crops of the same 5
    photos than the cross-validated full recovery, at 0.02 top-1 agreement on other photos).
    The samples go in ``FOLDS`` batches, so the refit chooses each layer's ridge strength by
    cross-validation and keeps a refit only where it lowers the left-out error, as the final
    recovery does. With one batch (a fixed ridge, every refit kept) a refit on 64 of MiniLM's
    sentences made candidates *worse* on the other calibration sentences (output error 0.174
    before the refit, 0.283 after it); with the folds it makes them better (0.130). Each refit
    costs about 2x as much.
    """

    def __init__(self, teacher: ir.Model, inputs: dict[str, np.ndarray], samples: int, seed: int):
        from pycompress.data import sample_groups

        n = len(next(iter(inputs.values())))
        if not 2 <= samples < n:
            raise PycompressError(f"--search-recovery {samples}: give 2 to {n - 1} samples "
                                  f"(the calibration pool has {n})")
        rng = np.random.default_rng([seed, 7])
        groups = sample_groups(inputs)
        self.sources: list[str] = []         # the sources (group ids) the refit samples come from
        if groups is not None and len(np.unique(groups)) > 2:
            # Whole sources, in a seeded order, until they hold the samples; at most all but two sources.
            chosen: list = []
            for group in rng.permutation(np.unique(groups))[:-2]:
                chosen.append(group)
                if np.isin(groups, chosen).sum() >= samples:
                    break
            candidates = np.flatnonzero(np.isin(groups, chosen))
            self.sources = [str(g) for g in chosen]
        else:
            candidates = np.arange(n)
        self.indices = np.sort(rng.choice(candidates, min(samples, len(candidates)), replace=False))
        # What the scores never see: the refit samples, or every sample of their sources.
        self.reserved = candidates if self.sources else self.indices
        self.teacher = teacher
        # Plain arrays (no sample groups): the folds are the batches.
        self.inputs = {k: np.asarray(v[self.indices]) for k, v in inputs.items()}
        self.seed = seed

    def __call__(self, student: ir.Model, plan: Plan) -> None:
        """Refit ``student`` (compressed by ``plan``) in place."""
        from pycompress.recover.layerwise import FOLDS

        recover(self.teacher, student, plan, self.inputs, samples=len(self.indices),
                batch_size=max(1, -(-len(self.indices) // FOLDS)), seed=self.seed)
