"""Where candidate evaluations run: in this process, in threads, or as Ray tasks.

The planners hand an executor a list of ``(theta, index)`` jobs and read the
results back in that order (``decisions.bo.Executor``); PAC-BO proposes as
many points per GP fit as the executor has workers (kriging believer).

An evaluation is a pure function of ``(theta, index, seed)``: the rewrites
are deterministic and the fidelity subsample of evaluation ``index`` is drawn
from ``(seed, index)`` alone (``FidelityEstimator.subsample``). So the same
search gives the same result whichever executor runs it, as long as the
points per fit and ``--threads`` are the same (onnxruntime's sums depend on
its thread count) and the objective is not a timing (``--objective latency``
is as noisy remotely as here).

- ``LocalExecutor`` (``decisions.bo``): one after the other, here.
- ``ThreadExecutor``: ``workers`` at once in this process; for
  ``--device A,B``, where most of an evaluation is waiting for a device.
- ``RayExecutor``: Ray tasks, on a local Ray or a cluster. Workers cannot
  share this process's objective (it holds onnxruntime sessions), so they
  rebuild it once each from an ``ObjectiveRecipe`` (the model's bytes, the
  data and the settings) and keep it for the next tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pycompress.errors import PycompressError

Job = tuple  # (theta, index) or (theta, index, target_sd)


class ThreadExecutor:
    """``workers`` evaluations at once in threads of this process (results in job order)."""

    def __init__(self, workers: int):
        if workers < 1:
            raise PycompressError(f"an executor needs at least one worker, got {workers}")
        self.workers = int(workers)

    def map(self, objective, jobs: Sequence[Job]) -> Iterator[Any]:
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pycompress-eval")
        try:
            futures = [pool.submit(objective, *job) for job in jobs]
            for future in futures:
                yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class ObjectiveRecipe:
    """What a worker needs to build the same ``CompressionObjective`` as the host."""

    model: bytes                          # the loaded (simplified) model, serialized
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    estimator: dict[str, Any]             # FidelityEstimator keywords: loss, samples, outputs, seed, threads
    space: dict[str, Any]                 # build_search_space keywords: actions, granularity, max_prune, align
    objective: str = "size"
    context_options: dict[str, Any] = field(default_factory=dict)
    latency: Any = None                   # a picklable latency probe (its baseline already timed)
    search_recovery: int = 0              # --search-recovery samples (0: off)
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = hashlib.sha256(self.model).hexdigest()[:16] + f"-{id(self)}"

    def build(self):
        import onnx
        import onnx_ir as ir

        from pycompress.fidelity import FidelityEstimator
        from pycompress.pipeline import CompressionObjective, build_search_space
        from pycompress.rewrites import ApplyContext

        model = ir.from_proto(onnx.ModelProto.FromString(self.model))
        estimator = FidelityEstimator(model, self.inputs, labels=self.labels, **self.estimator)
        actions = self.space["actions"]
        space, _ = build_search_space(model, actions, self.space.get("granularity", "layer"),
                                      max_prune=self.space.get("max_prune", 1.0), align=self.space.get("align", 1))
        recovery = None
        if self.search_recovery:
            from pycompress.pipeline.recovery import SearchRecovery

            recovery = SearchRecovery(model, self.inputs, self.search_recovery, self.estimator.get("seed", 0))
            estimator.reserve(recovery.reserved)
        return CompressionObjective(model, space, estimator, context=ApplyContext(options=dict(self.context_options)),
                                    objective=self.objective, latency=self.latency, search_recovery=recovery)


# On a Ray worker: the objectives built so far, by recipe key (a worker serves many tasks).
_BUILT: dict[str, Any] = {}


def built_objective(recipe: ObjectiveRecipe):
    """The recipe's objective on this worker, built on first use."""
    objective = _BUILT.get(recipe.key)
    if objective is None:
        _BUILT.clear()     # one search at a time per worker: drop an earlier search's model and data
        objective = _BUILT[recipe.key] = recipe.build()
    return objective


def evaluate_recipe(recipe: ObjectiveRecipe, gamma: float, theta: np.ndarray, index: int,
                    target_sd: float | None = None):
    """One evaluation on a worker: ``objective(theta, index, target_sd)`` of the recipe's objective at ``gamma``."""
    objective = built_objective(recipe)
    objective.gamma = float(gamma)
    return objective(np.asarray(theta, np.float64), int(index), target_sd)


def _warm_up(recipe: ObjectiveRecipe) -> None:
    built_objective(recipe)


class RayExecutor:
    """Evaluations as Ray tasks (one CPU each); results in job order.

    ``address``: a running cluster (``ray://HOST:10001`` or ``HOST:6379``), or
    None for a local Ray on this machine (``workers`` CPUs, default all).
    """

    def __init__(self, recipe: ObjectiveRecipe, address: str | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise PycompressError("--executor ray needs Ray: pip install 'pycompress[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                       "configure_logging": False}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers, **options)
        self.workers = int(workers or ray.cluster_resources().get("CPU", 1))
        self._recipe = ray.put(recipe)
        self._task = ray.remote(num_cpus=1, max_retries=2)(evaluate_recipe)
        # Start the workers and build their objectives now, while the host prepares the search
        # (not waited for: the first evaluations queue behind these).
        warm = ray.remote(num_cpus=1)(_warm_up)
        self._warming = [warm.remote(self._recipe) for _ in range(self.workers)]

    def map(self, objective, jobs: Sequence[Job]) -> Iterator[Any]:
        # A job is (theta, index) or (theta, index, target_sd): the noise the planner asks for.
        refs = [self._task.remote(self._recipe, objective.gamma, np.asarray(job[0]), int(job[1]), *job[2:])
                for job in jobs]
        done = 0
        try:
            for ref in refs:
                try:
                    result = self._ray.get(ref)
                except self._ray.exceptions.RayTaskError as exc:
                    # The user's error (a device that went away, ...) as it would read locally.
                    if isinstance(exc.cause, PycompressError):
                        raise PycompressError(str(exc.cause)) from None
                    raise
                done += 1
                yield result
        finally:
            # Stopped early (an error, an interrupt): drop the tasks not read. Only those: cancelling
            # a finished task trips an internal check in Ray 2.60.
            for ref in refs[done + 1:]:
                self._ray.cancel(ref)

    def shutdown(self) -> None:
        self._ray.shutdown()


def parse_executor(spec: str) -> tuple[str, str | None]:
    """``local`` or ``ray[:ADDRESS]`` -> (kind, address)."""
    kind, _, address = spec.partition(":")
    if kind not in ("local", "ray") or (kind == "local" and address):
        raise PycompressError(f"--executor {spec!r}: choose local or ray[:ADDRESS]")
    return kind, address or None
