"""Planners: what decides the plan of a compress run.

A ``Planner`` turns the run (model, data, settings) into a compressed model and
its applied plan. Four are wired: PAC-BO and random search (one ``SearchPlanner``
with the strategy as a parameter: random search is a strategy, not a kind of
PAC-BO), PFA (a one-shot plan from the spectra of the channel responses) and a
given plan (PLAN.json). A new decision method is a class here with ``decide``,
and one entry in ``PLANNERS``; its algorithm stays in ``decisions/``.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.plan import Plan
from pycompress.rewrites import ApplyContext, apply_plan, get_rewrite

if TYPE_CHECKING:
    from pycompress.pipeline.stages import Run

# Points the acquisition picks are evaluated until se(J) <= this * delta (docs/pacbo.md, "Noise").
NOISE_TARGET = 0.25
# --target-size is a constraint: the search (its initial design excepted), the incumbent and the
# certificate are restricted to points whose ratio is within this of the target (docs/pacbo.md;
# the --target-size help states the number).
TARGET_BAND = 0.04
# The initial design also evaluates the band's edges, at this fraction of the band from the target.
EDGE_FRACTION = 0.9
# Whole-graph calibrations (int8 ranges) of each candidate in a search use this many samples
# (ApplyContext.options["calibration_samples"]); the result's, after recovery, use more
# (pipeline.stages.FINAL_CALIBRATION_SAMPLES).
SEARCH_CALIBRATION_SAMPLES = 64


@dataclass
class Decided:
    """What a planner hands the later stages."""

    compressed: ir.Model
    plan: Plan                        # applied (with results)
    summary: dict[str, Any]
    trace: dict[str, Any] | None = None    # a search's evaluations (None: one-shot)
    objective: Any = None                  # a search's CompressionObjective (its cost model, latency probe)


class Planner(Protocol):
    name: str
    # Whether the planner keeps resumable state in the run folder (a search).
    searches: bool

    def actions(self, config: dict[str, Any]) -> list[str]:
        """The actions its plans use (the report's ``actions``)."""

    def decide(self, run: Run) -> Decided:
        """The compressed model and its applied plan (the ``decide + apply`` stage)."""


def planner_for(method: str) -> Planner:
    """The planner of ``compress --method`` (a name in ``PLANNERS`` or a PLAN.json path)."""
    if method in PLANNERS:
        return PLANNERS[method]
    if method.endswith(".json"):
        return GivenPlan(method)
    raise PycompressError(f"method {method!r}: choose {', '.join(PLANNERS)} or a PLAN.json file")


# -- data the rewrites read, prepared once per run --------------------------------

def prepared_options(run: Run, decisions: list | None, actions: list[str]) -> dict[str, Any]:
    """``ApplyContext`` options the rewrites compute once on the original model (``Rewrite.prepare``):
    for a search over ``actions`` (``decisions`` None) or for a plan's ``decisions``."""
    from pycompress.pipeline.statistics import teacher_activations

    options: dict[str, Any] = {}
    activations = teacher_activations(run.model, run.data.inputs, seed=run.config["seed"])
    for action in sorted(actions, key=lambda a: get_rewrite(a).order):
        mine = None if decisions is None else [d for d in decisions if d.action == action]
        options.update(get_rewrite(action).prepare(run.model, mine, activations, run.log))
    return options


def without_after_recovery(plan: Plan) -> tuple[Plan, list]:
    """The plan less the decisions applied after recovery (``Rewrite.after_recovery``), and those."""
    late = [d for d in plan.decisions if get_rewrite(d.action).after_recovery]
    return Plan([d for d in plan.decisions if not get_rewrite(d.action).after_recovery], plan.model,
                dict(plan.meta)), late


# -- one-shot planners ---------------------------------------------------------------

def apply_once(run: Run, plan_in: Plan) -> tuple[ir.Model, Plan]:
    """A plan applied to a copy of the model, its after-recovery decisions appended unapplied
    (the ``after recovery`` stage applies them). The rewrites get the run's activations
    (where a decision asks for data, e.g. ``data_aware``) and what they prepare once."""
    from pycompress.pipeline.statistics import run_activations

    compressed = run.model.clone()
    options = prepared_options(run, plan_in.decisions, sorted({d.action for d in plan_in.decisions}))
    # data_aware False: the rewrites' defaults stay weight-only as before; a decision that asks
    # for data (data_aware / bias_correction true) reads the activations.
    ctx = ApplyContext(activations=run_activations(compressed, run.data), options={"data_aware": False, **options})
    structure, late = without_after_recovery(plan_in)
    plan = apply_plan(compressed, structure, ctx)
    plan.decisions += late
    return compressed, plan


class GivenPlan:
    """A plan from a file (``--method PLAN.json``), checked as a whole before anything is applied."""

    searches = False

    def __init__(self, path: str):
        self.name = path
        self.path = path

    def actions(self, config: dict[str, Any]) -> list[str]:
        return config["actions"]

    def decide(self, run: Run) -> Decided:
        from pycompress.rewrites.compose import check_plan_composes

        plan_in = Plan.load(self.path).without_results()
        check_plan_composes(run.model, plan_in, where=self.path)
        compressed, plan = apply_once(run, plan_in)
        return Decided(compressed, plan, {"method": self.name, "decisions": {d.site: d.params for d in plan.decisions},
                                          "plan_meta": plan_in.meta})


class PfaPlanner:
    """Principal Filter Analysis: one pass over the data, spectra, a recipe (``decisions.pfa``)."""

    name = "pfa"
    searches = False

    def actions(self, config: dict[str, Any]) -> list[str]:
        from pycompress.decisions.pfa import ACTION

        return [ACTION]

    def decide(self, run: Run) -> Decided:
        from pycompress.pipeline.pfa import pfa_plan

        energy = run.settings.energy
        target = run.settings.target_size if energy is None else None
        run.log("PFA: responses of every prunable group, spectra, recipe "
                + (f"PFA-En tau={energy}" if energy is not None else
                   f"footprint target {target}" if target is not None else "PFA-KL"))
        plan_in = pfa_plan(run.model, run.data, energy=energy, target_size=target, progress=not run.settings.quiet,
                           threads=run.settings.threads)
        compressed, plan = apply_once(run, plan_in)
        return Decided(compressed, plan, {"method": self.name, "decisions": {d.site: d.params for d in plan.decisions},
                                          "plan_meta": plan_in.meta})


# -- searches ------------------------------------------------------------------------

class SearchPlanner:
    """A search over the space the rewrites declare, with a strategy from ``decisions.bo``:
    ``PACBO`` (stops with a certificate) or ``RandomSearch``. Resumable from the run folder."""

    searches = True

    def __init__(self, name: str, strategy: str, *, noise_target: bool):
        self.name = name
        self.strategy = strategy          # the class name in pycompress.decisions.bo (imported when run)
        self.noise_target = noise_target  # evaluate chosen points until se(J) <= NOISE_TARGET * delta

    def actions(self, config: dict[str, Any]) -> list[str]:
        return config["actions"]

    def decide(self, run: Run) -> Decided:
        return _search(run, self)


PLANNERS: dict[str, Planner] = {
    "pacbo": SearchPlanner("pacbo", "PACBO", noise_target=True),
    "random": SearchPlanner("random", "RandomSearch", noise_target=False),
    "pfa": PfaPlanner(),
}


def _search(run: Run, planner_kind: SearchPlanner) -> Decided:
    """PAC-BO or random search: the space, the objective, gamma, the search, the best plan applied."""
    from pycompress.decisions import bo
    from pycompress.decisions.bo import PACBOSettings
    from pycompress.executor import parse_executor
    from pycompress.pipeline.objective import (
        CompressionObjective,
        objective_from_extras,
    )
    from pycompress.pipeline.search_space import build_search_space, describe_point
    from pycompress.pipeline.statistics import model_activations

    config, settings, log = run.config, run.settings, run.log
    parse_executor(settings.executor)
    if settings.device and config.get("objective") != "latency":
        raise PycompressError("--device times candidates on a device: it needs --objective latency")
    if settings.points_per_fit is not None and settings.points_per_fit < 1:
        raise PycompressError(f"--points-per-fit must be at least 1, got {settings.points_per_fit}")
    if settings.resume and config.get("points_per_fit") is None:
        config["points_per_fit"] = 1           # runs saved before the option searched one point per fit
    if settings.resume and settings.points_per_fit not in (None, config["points_per_fit"]):
        raise PycompressError(f"--points-per-fit: the run in {settings.resume} proposes "
                              f"{config.get('points_per_fit')} points per fit; a resumed search keeps it")
    model, data = run.model, run.data
    space, skipped = build_search_space(model, config["actions"], config.get("granularity", "layer"),
                                        max_prune=config.get("max_prune", 1.0), align=config.get("align", 1))
    _log_skipped(skipped, log)

    latency = None
    if config.get("objective") == "latency":
        from pycompress.fidelity.latency import LatencyProbe

        log("timing the original model (the latency baseline)")
        feeds = {k: v[:1] for k, v in data.inputs.items()}
        if settings.device:
            from pycompress.bench.remote import RemoteLatencyProbe, parse_devices

            log(f"timing on {settings.device}")
            latency = RemoteLatencyProbe(model, feeds, parse_devices(settings.device), runs=settings.latency_runs,
                                         threads=settings.threads)
        else:
            latency = LatencyProbe(model, feeds, runs=settings.latency_runs, threads=settings.threads)
        log(f"original latency {latency.baseline.mean * 1e3:.3f} ms +- {latency.baseline.std_error * 1e3:.2g} "
            "(batch 1)")
    # Pruning runs before factorizing: a rank chosen for the full layer may no
    # longer shrink the pruned one; then the layer stays unfactored.
    options: dict[str, Any] = {"skip_rank_beyond_r_max": True,
                               "calibration_samples": SEARCH_CALIBRATION_SAMPLES,
                               **prepared_options(run, None, config["actions"])}
    # Each candidate's whole-graph calibrations run on a small fixed sample of its own values.
    activations = model_activations(data, SEARCH_CALIBRATION_SAMPLES, config["seed"])
    search_recovery = _search_recovery(run)
    objective = CompressionObjective(model, space, run.estimator,
                                     context=ApplyContext(options=options, model_activations=activations),
                                     objective=config.get("objective", "size"), latency=latency,
                                     search_recovery=search_recovery)
    space = objective.space
    if space.grouped:
        log(f"searching {space.d} coordinates over {len(space.dimensions)} sites: "
            + "; ".join(f"{name}: {', '.join(space.dimensions[i].site for i in idx)}"
                        for name, idx in zip(space.coordinate_names(), space.members)))
    else:
        log(f"searching {space.d} decisions: " + ", ".join(f"{d.site} ({d.action} {d.param} <= {d.high})"
                                                          for d in space.dimensions))

    executor = _executor(run, objective)
    if config.get("points_per_fit") is None:
        config["points_per_fit"] = getattr(executor, "workers", 1)
    # The budget: a resumed run keeps the saved one unless raised (a finished search is not silently extended).
    config["max_evals"] = settings.max_evals if settings.max_evals is not None else config.get("max_evals") or 100
    config["time_limit"] = settings.time_limit if settings.time_limit is not None else config.get("time_limit")
    config.setdefault("noise_target", NOISE_TARGET)
    bo_settings = PACBOSettings(delta=config["delta"], relative_delta=config["relative_delta"],
                                epsilon=config["epsilon"], initial=config["initial"], max_evals=config["max_evals"],
                                time_limit=config["time_limit"], seed=config["seed"],
                                batch_size=config["points_per_fit"],
                                noise_target=config["noise_target"] if planner_kind.noise_target else None)

    def progress(step, obs) -> None:
        ratio = obs.extras.get("ratio", float("nan"))
        line = (f"eval {len(planner.observations):3d}  J={obs.value:.5g} +- {math.sqrt(obs.variance):.2g}  "
                f"ratio={ratio:.3f}  L={obs.extras.get('fidelity', float('nan')):.4g}  "
                f"m={obs.extras.get('samples', 0)}")
        if step is not None:
            line += f"  | incumbent J={step.incumbent_value:.5g}"
            if math.isfinite(step.z_max):
                line += f"  z_max={step.z_max:.3f}  P={step.probability:.4f}"
        log(line)

    target_mode = config["gamma"] is None or config.get("gamma_from_target", False)
    feasible = None
    if target_mode and objective.objective != "latency":
        feasible, why = _target_domain(objective, config)
        if why:
            log(f"note: {why}")
    strategy = getattr(bo, planner_kind.strategy)
    # 1/R is counted from the plan (exact, no run): the GP models the rest of J (decisions/bo/known_part.py).
    known = None if objective.objective == "latency" else (lambda x: 1.0 / objective.predicted_ratio(x))
    planner = strategy(space.d, objective, bo_settings, run_dir=run.run_dir, snap=space.snap, progress=progress,
                       feasible=feasible, executor=executor, known=known)
    resumed = bool(settings.resume) and planner.state_path.is_file()
    if resumed:
        planner.load()
    else:
        # A kill before the first state was saved resumes from scratch: same seed, same design.
        seeds = _seed_points(run, space)
        target_macs = config["target_size"] if objective.objective == "macs" else None
        for action in config["actions"]:
            seeds += [space.encode(p, strict=False)
                      for p in get_rewrite(action).search_seeds(model, options, target_macs)]
        if feasible is not None:
            # The target point first, the seeds (informed guesses) next, then the band's edges.
            band = _band_points(objective, config["target_size"], feasible)
            seeds = band[:1] + seeds + band[1:]
        planner.seeds = [planner._point(p) for p in seeds]
    chosen_now = target_mode and "gamma" not in planner.meta
    if chosen_now:
        # Gamma for the target size, from the initial design: evaluated (and saved) by the planner like
        # any evaluation, so a kill here resumes without redoing it; the search reuses them.
        ceiling = config.get("target_max")
        log(f"choosing gamma for target size {config['target_size']:g}"
            + (f" (--target-max {ceiling:g}: the middle of [{ceiling - 2 * TARGET_BAND:g}, {ceiling:g}])"
               if ceiling is not None else "") + " on the initial design")
        stop = planner.evaluate_design()
        if len(planner.observations) < 2:
            raise PycompressError(f"the budget ({stop}) ran out before 2 points of the initial design were "
                                  "evaluated; raise --max-evals / --time-limit")
        planner.meta["gamma_choice"] = _choose_gamma(planner, config, log)
        planner.meta["gamma"] = planner.meta["gamma_choice"]["gamma"]
    gamma = float(planner.meta["gamma"] if target_mode else config["gamma"])
    objective.gamma = gamma
    if not resumed or chosen_now:
        # delta is meant in the unit of J's heavier term: of Q when gamma > 1 (Q = -log of the relative
        # error: delta 0.05 is a 5% difference in error), of 1/R otherwise. In units of J alone, a gamma
        # of 17 asked for 0.3% of error and no run on EfficientNet-Lite0 certified (docs/pacbo.md).
        # A resumed run keeps the scale it was saved with (1 for states saved before the scale).
        planner.delta_scale = max(1.0, gamma)
    if not config["relative_delta"]:
        unit = "Q" if planner.delta_scale > 1 else "1/R"
        log(f"certificate tolerance: delta {config['delta']:g} in units of {unit}, "
            f"{config['delta'] * planner.delta_scale:.4g} in units of J")
    # Every observation's J at this gamma, from its saved quality and ratio (the same arithmetic in an
    # uninterrupted and a resumed run); saved with the gamma choice in one write.
    planner.reweigh(lambda o: objective_from_extras(gamma, o.extras))

    try:
        result = planner.run()
    except KeyboardInterrupt:
        print(f"pycompress: search interrupted after {len(planner.observations)} evaluations; continue with "
              f"--resume {run.run_dir}", file=sys.stderr)
        raise
    finally:
        if hasattr(executor, "shutdown"):
            executor.shutdown()
    log(result.summary())
    if target_mode:
        config["gamma"] = gamma
        config["gamma_from_target"] = True
        config["gamma_predicted_ratio"] = planner.meta["gamma_choice"]["predicted_ratio"]
    run.save_config()

    compressed, plan = objective.compress(result.theta)
    summary = {
        "method": config["method"], "certified": result.certified,
        "probability": result.probability, "z_max": result.z_max, "stop_reason": result.stop_reason,
        "delta": result.history[-1].delta if result.history else config["delta"], "epsilon": config["epsilon"],
        "delta_scale": planner.delta_scale, "gamma": config["gamma"], "target_size": config["target_size"],
        "objective": objective.objective,
        "ratio": objective.ratio_of(compressed),
        "J": result.value, "evaluations": result.evaluations, "search_seconds": result.seconds,
        "decisions": describe_point(space, result.theta),
    }
    if latency is not None:
        summary["latency_ratio"], var = latency.ratio(compressed)
        summary["latency_ratio_std_error"] = math.sqrt(var)
        summary["latency_ms_before"] = latency.baseline.mean * 1e3
    if target_mode:
        summary["target_band"] = None if feasible is None else TARGET_BAND
        if config.get("target_max") is not None:
            summary["target_max"] = config["target_max"]
        # A latency target is checked against the timed ratio, not the counted one.
        timed = summary.get("latency_ratio")
        note = _target_note(config, result, summary["ratio"] if timed is None else timed,
                            "latency" if timed is not None else objective.counted.replace("_", " "))
        if note:
            summary["target_note"] = note
            log(f"note: {note}")
    if search_recovery is not None:
        # The certificate's J is on the pool less these samples (or these sources' samples).
        summary["search_recovery"] = {"samples": int(len(search_recovery.indices)),
                                      "sources": search_recovery.sources,
                                      "scored_on": int(run.estimator.drawable)}
    if space.grouped:
        summary["groups"] = {name: [space.dimensions[i].site for i in idx]
                             for name, idx in zip(space.coordinate_names(), space.members) if len(idx) > 1}
    return Decided(compressed, plan, summary, _trace(config, space, result, summary), objective)


def _search_recovery(run):
    """``--search-recovery N``: the refit each candidate gets before it is scored (None: off)."""
    from pycompress.pipeline.recovery import SearchRecovery

    samples = int(run.config.get("search_recovery") or 0)
    if not samples:
        return None
    if run.config.get("no_recover"):
        raise PycompressError("--search-recovery scores candidates after a refit that --no-recover turns off; "
                              "drop one of them")
    recovery = SearchRecovery(run.model, run.data.inputs, samples, run.config["seed"])
    run.estimator.reserve(recovery.reserved)
    sources = (f" from {len(recovery.sources)} of the data's sources (ids {', '.join(recovery.sources)}; "
               "their other samples are not scored either)") if recovery.sources else ""
    run.log(f"search recovery: each candidate is refitted on {len(recovery.indices)} calibration samples{sources}, "
            f"then scored on the other {run.estimator.drawable}")
    return recovery


def _executor(run: Run, objective):
    """The executor of ``--executor`` / ``--device`` (None: in process, one after the other)."""
    from pycompress.executor import (
        ObjectiveRecipe,
        RayExecutor,
        ThreadExecutor,
        parse_executor,
    )

    config, settings = run.config, run.settings
    kind, address = parse_executor(settings.executor)
    if kind == "ray":
        recipe = ObjectiveRecipe(
            ir.to_proto(run.model).SerializeToString(), run.data.inputs,
            run.data.labels if config["use_labels"] else None,
            {"loss": config["loss"], "samples": config["samples"], "outputs": config["outputs"],
             "seed": config["seed"], "threads": settings.threads},
            {"actions": config["actions"], "granularity": config.get("granularity", "layer"),
             "max_prune": config.get("max_prune", 1.0), "align": config.get("align", 1)},
            objective.objective, dict(objective.context.options), objective.latency,
            search_recovery=int(config.get("search_recovery") or 0))
        executor = RayExecutor(recipe, address)
        run.log(f"evaluations run as Ray tasks on {executor.workers} workers" + (f" ({address})" if address else ""))
        return executor
    devices = len(getattr(objective.latency, "devices", ()))
    return ThreadExecutor(devices) if devices > 1 else None


def _seed_points(run: Run, space) -> list:
    """The seed points of the initial design: seed plans, then PFA's (``init`` "pfa")."""
    config = run.config
    # A seed plan (e.g. PFA's) may decide sites this search leaves out: those decisions are dropped.
    seeds = [space.encode(Plan.load(p), strict=False) for p in config["seed_plans"]]
    if config.get("init") == "pfa":
        from pycompress.pipeline.pfa import pfa_plan

        run.log("PFA seed plan: " + (f"PFA-En tau={config['energy']}" if config.get("energy") is not None
                                     else "PFA-KL"))
        seeds.append(space.encode(pfa_plan(run.model, run.data, energy=config.get("energy"),
                                           progress=not run.settings.quiet, threads=run.settings.threads),
                                  strict=False))
    return seeds


def _choose_gamma(planner, config, log) -> dict[str, Any]:
    """Gamma for the target size from the evaluations so far (``gamma_from_observations``)."""
    from pycompress.pipeline.gamma import gamma_from_observations

    choice = gamma_from_observations([o.extras["quality"] for o in planner.observations],
                                     [o.extras["ratio"] for o in planner.observations], config["target_size"],
                                     [o.extras["quality_var"] for o in planner.observations], band=TARGET_BAND)
    for note in choice.notes:
        log(f"note: {note}")
    log(f"gamma = {choice.gamma:.6g} (the measured trade-off's slope at the target, from "
        f"{len(planner.observations)} evaluations)")
    return {"gamma": choice.gamma, "predicted_ratio": choice.predicted_ratio, "reachable": choice.reachable,
            "notes": choice.notes}


def _band_points(objective, target: float, feasible) -> list[np.ndarray]:
    """The first points of the initial design: the target point, then the points at the band's upper
    and lower edges (each with every coordinate at one fraction), those the band holds.

    Why the edges: the design's Sobol points mostly lie outside the band, and the GP reverts to its mean
    where it has seen nothing. On EfficientNet-Lite0's stage search the band's two edges are two basins
    (the upper edge a fifth less output error, the lower edge 0.14 more of 1/R), and 8 of 11 seeds
    certified the lower edge without having evaluated the upper one, 1.7-2.8 delta below it
    (docs/pacbo.md, "Certificate honesty")."""
    points = [_target_point(objective, target)]
    for edge in (target + EDGE_FRACTION * TARGET_BAND, target - EDGE_FRACTION * TARGET_BAND):
        point = _target_point(objective, edge)
        if feasible(point[None, :])[0] and not any(np.array_equal(point, p) for p in points):
            points.append(point)
    return points


def _target_point(objective, target: float) -> np.ndarray:
    """The point with every coordinate at one fraction u: the smallest u whose ratio reaches
    ``target`` (bisection on u)."""
    d = objective.space.d
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if objective.predicted_ratio(objective.space.snap(np.full(d, mid)))[0] < target:
            lo = mid
        else:
            hi = mid
    return objective.space.snap(np.full(d, hi))


def target_bounds(config: dict[str, Any]) -> tuple[float, float]:
    """The ratios a target search may return: --target-size +- TARGET_BAND, or [max - 2 TARGET_BAND, max]
    under --target-max (whose ``target_size`` is the band's middle, max - TARGET_BAND)."""
    ceiling = config.get("target_max")
    if ceiling is not None:
        return ceiling - 2 * TARGET_BAND, ceiling
    return config["target_size"] - TARGET_BAND, config["target_size"] + TARGET_BAND


def _target_domain(objective, config: dict[str, Any]):
    """(feasible, note): the points whose ratio is within ``target_bounds``, or (None, why) when no
    point the search can reach is there."""
    space = objective.space
    ceiling = config.get("target_max")
    target = f"--target-max {ceiling:g}" if ceiling is not None else f"target {config['target_size']:g}"
    bottom, top = target_bounds(config)
    low = objective.predicted_ratio(space.snap(np.zeros(space.d)))[0]
    high = objective.predicted_ratio(space.snap(np.ones(space.d)))[0]
    if top < low:
        return None, (f"{target} cannot be reached: the searched actions keep at least {low:.3f} "
                      f"of the {objective.counted.replace('_', ' ')} (every site at its smallest value)")
    if bottom > high:
        return None, (f"{target} cannot be reached: the searched sites keep at most {high:.3f} "
                      f"of the {objective.counted.replace('_', ' ')}")
    # A hair of slack: --target-max 0.7 must admit a ratio of exactly 0.7 despite float rounding.
    bottom, top = bottom - 1e-12, top + 1e-12

    def feasible(points: np.ndarray) -> np.ndarray:
        ratio = objective.predicted_ratio(np.atleast_2d(points))
        return (ratio >= bottom) & (ratio <= top)

    return feasible, None


def _target_note(config, result, ratio: float, counted: str) -> str | None:
    """A plain sentence when the result is above --target-max, or misses --target-size by more than
    0.05, saying why."""
    target, ceiling = config.get("target_size"), config.get("target_max")
    if target is None or (ratio <= ceiling + 1e-9 if ceiling is not None else abs(ratio - target) <= 0.05):
        return None
    why = ({"max_evals": "the evaluation budget ran out first (raise --max-evals)",
            "time_limit": "the time limit ran out first (raise --time-limit)"}.get(result.stop_reason)
           or "no gamma puts the optimum of J = gamma Q + 1/R there: the fidelity changes steeply around that "
              "ratio, so the best trade-off jumps past it (choose --gamma, or another target)")
    if ceiling is not None:
        return (f"--target-max {ceiling:g} not met: the result keeps {ratio:.3f} of the {counted} (no evaluated "
                f"point was at or under it); {why}")
    return f"target {target:g} not reached: the result keeps {ratio:.3f} of the {counted}; {why}"


def _log_skipped(notes: list[str], log, shown: int = 3) -> None:
    """Sites left out of the search: a few in full, the rest counted by reason (real networks have dozens)."""
    for note in notes[:shown]:
        log(f"skip {note}")
    if len(notes) > shown:
        reasons = Counter(note.split(": ", 1)[-1].split(" (group=")[0] for note in notes[shown:])
        log(f"skip {len(notes) - shown} more sites: " + "; ".join(f"{n} x {r}" for r, n in reasons.most_common()))


def _trace(config: dict[str, Any], space, result, summary: dict[str, Any]) -> dict[str, Any]:
    """The search as the report reads it (``search {gamma, certificate, ..., trace [...]}``)."""
    after = {step.evaluations: step for step in result.history}
    trace = []
    for i, obs in enumerate(result.observations):
        step = after.get(i + 1)      # the GP fit right after this evaluation
        trace.append({
            "eval": i + 1, "theta": list(obs.theta),
            "decisions": {d.site: v for d, v in zip(space.dimensions, space.values(obs.theta))},
            "ratio": obs.extras.get("ratio"), "fidelity_mean": obs.extras.get("fidelity"),
            "fidelity_se": obs.extras.get("fidelity_std_error"), "samples": obs.extras.get("samples"),
            "quality": obs.extras.get("quality"), "quality_scale": obs.extras.get("quality_scale"),
            "J": obs.value, "J_se": math.sqrt(obs.variance),
            "z": obs.z,                                   # acquisition value that chose it (None: design)
            "z_max": None if step is None else step.z_max,
            "probability": None if step is None else step.probability,
            "incumbent_J": None if step is None else step.incumbent_value,
            # the robust check's output-scale factor (None: MAP did not certify at that step)
            "robust_factor": None if step is None else getattr(step, "robust_factor", None),
            "seconds": obs.seconds,
            **{k: v for k, v in obs.extras.items() if k in ("agreement", "accuracy", "cosine")},
        })
    search = {"method": config["method"], "gamma": config["gamma"], "target_size": config["target_size"],
              "certificate": result.certified, "probability": result.probability, "z_max": result.z_max,
              "delta": summary["delta"], "delta_scale": summary["delta_scale"], "epsilon": config["epsilon"],
              "stop_reason": result.stop_reason,
              "evaluations": result.evaluations, "seconds": result.seconds, "trace": trace}
    return {"config": config,
            "dimensions": [{"site": d.site, "action": d.action, "r_max": d.high, "untouched_from": d.untouched_from,
                            "group": d.group} for d in space.dimensions],
            "result": summary, "search": search}
