"""``compress(model, data, config) -> result``: the compress run as one explicit list of stages.

``STAGES``: decide + apply (the planner: PAC-BO, random search, PFA or a given
plan), closed-form recovery, fine-tuning, the decisions applied after recovery
(``Rewrite.after_recovery``: quantization sees the recovered weights), and the
final verification (fidelity on the calibration pool, held-out quality). The
CLI (``cli/compress.py``) parses arguments, keeps the run folder, prints
progress and writes the outputs; it calls this and nothing else of the pipeline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.pipeline.planners import Planner, planner_for
from pycompress.plan import Plan
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite

# Calibration samples of the whole-graph calibrations applied after recovery (int8 ranges).
FINAL_CALIBRATION_SAMPLES = 256
# The fidelity every stage reports is measured on the calibration pool's first samples.
POOL_SAMPLES = 5000


@dataclass
class Settings:
    """What a run takes besides its saved config (``compress.json``): how to run it, not what it searches."""

    resume: str | None = None
    threads: int | None = None
    executor: str = "local"
    device: str | None = None
    latency_runs: int = 10
    points_per_fit: int | None = None
    max_evals: int | None = None
    time_limit: float | None = None
    energy: float | None = None
    target_size: float | None = None
    recover_samples: int | None = None
    no_recover: bool = False
    finetune: bool = False
    finetune_epochs: int = 3
    finetune_lr: float | None = None
    finetune_batch: int = 64
    finetune_optimizer: str = "rmsprop"
    finetune_data: str | None = None        # fine-tune on this source instead of the calibration data
    finetune_hidden: bool = False           # also distil the hidden states (recover.finetune)
    finetune_augment: int = 0               # new token sequences per sample per epoch (recover.augment)
    heldout: str | None = None
    quiet: bool = False


@dataclass
class Run:
    """One compress run as the stages see it."""

    model: ir.Model
    data: Any                       # pycompress.data.Calibration
    estimator: Any                  # pycompress.fidelity.FidelityEstimator
    config: dict[str, Any]          # the saved, resumable settings (compress.json)
    settings: Settings
    run_dir: Path | None = None
    log: Callable[[str], None] = lambda line: None
    save_config: Callable[[], None] = lambda: None
    planner: Planner | None = None
    # Filled by the stages:
    compressed: ir.Model | None = None
    plan: Plan | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    trace: dict[str, Any] | None = None
    objective: Any = None
    after_recovery: list = field(default_factory=list)
    recovery: dict[str, Any] | None = None
    finetuned: dict[str, Any] | None = None
    final: Any = None
    heldout: dict[str, Any] | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    def fidelity_on_pool(self, candidate: ir.Model):
        """The fidelity on the calibration pool (its first POOL_SAMPLES samples), by every stage alike."""
        return self.estimator.evaluate_on(candidate, np.arange(min(self.estimator.pool, POOL_SAMPLES)))


def decide(run: Run) -> str:
    decided = run.planner.decide(run)
    run.compressed, run.plan, run.summary = decided.compressed, decided.plan, decided.summary
    run.trace, run.objective = decided.trace, decided.objective
    return "decide + apply"


def split_after_recovery(run: Run) -> None:
    """Rebuild the result without the decisions applied after recovery (a search's result holds
    them already); they wait for their stage."""
    late = [d for d in run.plan.decisions if get_rewrite(d.action).after_recovery]
    run.after_recovery = late
    if not late:
        return
    rest = [d for d in run.plan.decisions if not get_rewrite(d.action).after_recovery]
    compressed = run.model.clone()
    run.plan = apply_plan(compressed, Plan([type(d)(d.site, d.action, dict(d.params), d.note) for d in rest],
                                           run.plan.model,
                                           {k: v for k, v in run.plan.meta.items() if k != "finished"}),
                          ApplyContext(options={"skip_rank_beyond_r_max": True}))
    run.compressed = compressed


def recover_stage(run: Run) -> str | None:
    from pycompress.pipeline.recovery import recover

    config, settings = run.config, run.settings
    # What happens after the search is part of the run too: a resumed run writes the same bytes.
    if settings.recover_samples is not None or "recover_samples" not in config:
        config["recover_samples"] = settings.recover_samples if settings.recover_samples is not None else 512
    config["no_recover"] = bool(settings.no_recover or config.get("no_recover", False))
    run.save_config()
    if config["no_recover"]:
        return None
    run.log("recovery: closed-form layer-wise refit against the teacher")
    before = run.fidelity_on_pool(run.compressed)
    run.recovery = recover(run.model, run.compressed, run.plan, run.data.inputs, samples=config["recover_samples"],
                           seed=config["seed"], progress=run.log)
    run.recovery["fidelity_before"] = before.mean
    return "recover"


def finetune_stage(run: Run) -> str | None:
    settings = run.settings
    if not settings.finetune:
        return None
    from pycompress.data import load_data, sample_groups
    from pycompress.recover.finetune import finetune

    run.log("finetune: gradient fine-tuning of the compressed graph against the teacher")
    before = run.fidelity_on_pool(run.compressed)
    if run.recovery is not None:
        run.recovery["fidelity_after"] = before.mean
    source = run.data
    if settings.finetune_data:
        # More unlabeled samples of the same kind train better than the calibration pool alone
        # (docs/finetune.md); the held-out measurement stays on data neither has seen.
        source = load_data(settings.finetune_data, run.model)
        run.log(f"finetune: {len(source)} samples from {settings.finetune_data}")
    # Samples that come in groups (crops of one photo) are validated on whole groups left out: random
    # crops of the training photos track those photos, not new ones (docs/finetune.md, run D).
    groups = sample_groups(source.inputs)
    if groups is not None and len(np.unique(groups)) < 2:
        groups = None
    run.finetuned = finetune(run.model, run.compressed, source.inputs, source.labels, groups=groups,
                             epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                             batch_size=settings.finetune_batch,
                             optimizer=settings.finetune_optimizer, seed=run.config["seed"],
                             hidden=settings.finetune_hidden, augment=settings.finetune_augment,
                             progress=None if settings.quiet else run.log, threads=settings.threads).to_dict()
    run.finetuned["fidelity_before"] = before.mean
    return "finetune"


def after_recovery_stage(run: Run) -> str | None:
    """The decisions of rewrites applied after recovery, on the recovered weights, with a
    whole-graph calibration sample (``ApplyContext.model_activations``)."""
    from pycompress.pipeline.statistics import model_activations

    late = run.after_recovery
    if not late:
        return None
    for action in dict.fromkeys(d.action for d in late):
        run.log(get_rewrite(action).describe([d for d in late if d.action == action]))
    ctx = ApplyContext(model_activations=model_activations(run.data, FINAL_CALIBRATION_SAMPLES, run.config["seed"]))
    done = apply_plan(run.compressed, Plan([type(d)(d.site, d.action, dict(d.params), d.note) for d in late]), ctx)
    plan = run.plan
    run.plan = Plan(plan.decisions + done.decisions, plan.model, {**plan.meta, **done.meta}, plan.version)
    if run.objective is not None:
        # The search measured its own (unrecovered, smaller-sample) model: measure the result.
        run.summary["ratio"] = run.objective.ratio_of(run.compressed)
        if run.objective.latency is not None:
            run.summary["latency_ratio"], var = run.objective.latency.ratio(run.compressed)
            run.summary["latency_ratio_std_error"] = math.sqrt(var)
    # The report's stage name predates the hook (quantization is its one user).
    return "quantize"


def verify(run: Run) -> str:
    from pycompress.ir import model_cost

    final = run.final = run.fidelity_on_pool(run.compressed)
    if run.recovery is not None and run.finetuned is None:
        run.recovery["fidelity_after"] = final.mean
    if run.finetuned is not None:
        run.finetuned["fidelity_after"] = final.mean
    run.summary.update({"fidelity_loss": run.config["loss"], "fidelity": final.mean,
                        "fidelity_std_error": final.std_error, "fidelity_samples": final.samples,
                        **{f"final_{k}": v for k, v in final.extras.items()}})
    if run.objective is None:
        before, after = model_cost(run.model), model_cost(run.compressed)
        run.summary["ratio"] = after.params / max(before.params, 1)
    run.heldout = heldout_quality(run)
    return "verify"


def heldout_quality(run: Run) -> dict | None:
    """The result against the original on held-out data (``heldout``, or the source's own held-out split)."""
    from pycompress.data import default_heldout, load_data
    from pycompress.fidelity.compare import heldout_comparison

    spec = run.settings.heldout if run.settings.heldout is not None else default_heldout(run.config["data"])
    if not spec or spec == "none":
        return None
    data = load_data(spec, run.model)
    inputs = {k: np.asarray(v[:]) for k, v in data.inputs.items()}
    return {"source": spec, **heldout_comparison(run.model, run.compressed, inputs, threads=run.settings.threads)}


# The stages in order. A stage returns its name for the report's timings (None: it did nothing
# worth timing); `split_after_recovery` is bookkeeping, timed with nothing.
STAGES: tuple[Callable[[Run], str | None], ...] = (
    decide, split_after_recovery, recover_stage, finetune_stage, after_recovery_stage, verify)


def compress(model: ir.Model, data, config: dict[str, Any], *, estimator=None, settings: Settings | None = None,
             run_dir: Path | None = None, log: Callable[[str], None] | None = None,
             save_config: Callable[[], None] | None = None) -> Run:
    """Run every stage on ``model`` with calibration ``data`` as ``config`` says (the compress
    settings: method, actions, objective, ...); the run with the compressed model, the applied
    plan, the summary, the search trace, recovery/fine-tuning reports and stage timings."""
    from pycompress.fidelity import FidelityEstimator

    settings = settings or Settings()
    if estimator is None:
        estimator = FidelityEstimator(model, data.inputs, labels=data.labels if config["use_labels"] else None,
                                      loss=config["loss"], samples=config["samples"], outputs=config["outputs"],
                                      seed=config["seed"], threads=settings.threads)
    run = Run(model, data, estimator, config, settings, run_dir, log or (lambda line: None),
              save_config or (lambda: None), planner_for(config["method"]))
    for stage in STAGES:
        started = time.monotonic()
        name = stage(run)
        # decide + apply is timed from the end of loading (the CLI's first stage) like before.
        if name is not None:
            run.stages.append({"name": name, "seconds": time.monotonic() - started})
    return run
