"""PAC Bayesian optimization (ALGORITHMS.md 3.1-3.2), split as in BoTorch:
``gp`` (the model), ``acquisition`` (the PAC criterion and certificate),
``optimize`` (maximizing it over many candidates), ``pacbo`` (the loop and its
resumable state), ``encoding`` (decisions <-> the unit cube), ``known_part``
(the part of the objective known without evaluating, e.g. 1/R). The objective is
injected: nothing here runs a model."""

from pycompress.decisions.bo.acquisition import (
    PACAcquisition,
    Posterior,
    certificate_probability,
    is_certified,
    pac_z,
    resolve_delta,
    select_incumbent,
)
from pycompress.decisions.bo.encoding import Dimension, SearchSpace
from pycompress.decisions.bo.gp import GaussianProcess, Hyperparameters
from pycompress.decisions.bo.optimize import CandidateSettings, maximize_acquisition
from pycompress.decisions.bo.pacbo import (
    PACBO,
    Executor,
    LocalExecutor,
    Observation,
    PACBOResult,
    PACBOSettings,
    RandomSearch,
    Step,
)

__all__ = ["PACBO", "CandidateSettings", "Dimension", "Executor", "GaussianProcess", "Hyperparameters",
           "LocalExecutor", "Observation", "PACAcquisition", "PACBOResult", "PACBOSettings", "Posterior",
           "RandomSearch", "SearchSpace", "Step", "certificate_probability", "is_certified", "maximize_acquisition", "pac_z",
           "resolve_delta", "select_incumbent"]
