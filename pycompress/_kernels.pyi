"""Type stub for the compiled module built from csrc/ (see pycompress.kernels)."""

import numpy as np
import numpy.typing as npt

class CovarianceAccumulator:
    def __init__(self, dim: int) -> None: ...
    def update(self, block: npt.NDArray[np.floating]) -> None: ...
    def merge(self, other: CovarianceAccumulator) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def mean(self) -> npt.NDArray[np.float64]: ...
    @property
    def scatter(self) -> npt.NDArray[np.float64]: ...
    @property
    def cov(self) -> npt.NDArray[np.float64]: ...
    def correlation(self, floor: float = 1e-8) -> npt.NDArray[np.float64]: ...

PFA_TIE_RTOL: float

def l1max_removal_order(corr: npt.ArrayLike, n_remove: int) -> npt.NDArray[np.int64]: ...
def gp_acquisition(
    candidates: npt.ArrayLike,
    train_x: npt.ArrayLike,
    lengthscales: npt.ArrayLike,
    outputscale: float,
    mean_constant: float,
    chol: npt.ArrayLike,
    beta: npt.ArrayLike,
    incumbent: npt.ArrayLike,
    delta: float,
    var_floor: float = 1e-12,
    threads: int = 0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
