"""The compress pipeline: the one place that wires the model layer, the rewrites,
the fidelity estimators, the planners and recovery together.

- ``search_space``: one coordinate per site, as each rewrite declares it;
- ``objective``: plan -> apply -> evaluate, ``J = gamma Q + 1/R`` (the planners' objective);
- ``gamma``: gamma for a target size;
- ``statistics``: what the rewrites read from the original model once per run;
- ``recovery``: closed-form refits of what the rewrites say they changed;
- ``pfa``: PFA on a model with data (the PFA planner's wiring);
- ``planners``: the ``Planner`` protocol and its implementations (PAC-BO and random
  search, PFA, a given plan);
- ``compress``: ``compress(model, data, config)``, the explicit list of stages.

It names no rewrite's action or created nodes (``tests/test_import_contracts.py``).
"""

from pycompress.pipeline.gamma import GammaChoice, gamma_from_observations, select_gamma
from pycompress.pipeline.objective import (
                                           COUNTED,
                                           LOG_QUALITY,
                                           OBJECTIVES,
                                           QUALITY,
                                           RELATIVE_FLOOR,
                                           CompressionObjective,
                                           Linear,
                                           Measurement,
                                           SiteCost,
                                           objective_from_extras,
                                           objective_value,
                                           quality_of,
                                           quality_scale,
                                           quality_target,
)
from pycompress.pipeline.planners import PLANNERS, Decided, Planner, planner_for
from pycompress.pipeline.recovery import recover, recovery_targets
from pycompress.pipeline.search_space import (
                                           GRANULARITIES,
                                           build_search_space,
                                           describe_point,
)
from pycompress.pipeline.stages import STAGES, Run, Settings, compress
from pycompress.pipeline.statistics import teacher_channel_statistics

__all__ = ["COUNTED", "GRANULARITIES", "LOG_QUALITY", "OBJECTIVES", "PLANNERS", "QUALITY", "RELATIVE_FLOOR",
           "STAGES", "CompressionObjective", "Decided", "GammaChoice", "Linear", "Measurement", "Planner", "Run",
           "Settings", "SiteCost", "build_search_space", "compress", "describe_point", "gamma_from_observations",
           "objective_from_extras", "objective_value", "planner_for", "quality_of", "quality_scale",
           "quality_target", "recover", "recovery_targets", "select_gamma", "teacher_channel_statistics"]
