"""Low-rank factorization helpers shared by ``svd`` and ``lowrank_conv``
(ALGORITHMS.md 1.1-1.3): truncated SVD, the energy rule for a starting rank,
the data-aware output projection, rank checks and the node swap.

Shapes: a layer is seen as a matrix ``W`` (``in x out``) acting on rows,
``Y = X W (+ b)``. A factorization keeps rank ``K``: ``W ~= A B`` with ``A``
``in x K`` and ``B`` ``K x out``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import add_initializer, remove_if_unused, unique_name
from pycompress.kernels import CovarianceAccumulator
from pycompress.rewrites.base import ApplyContext, SearchRange, Site


def one_blas_thread() -> ContextManager:
    """Run the decompositions here on one BLAS thread (when threadpoolctl is installed).

    The matrices are at most a few thousand wide: one thread is close to many
    on an idle machine and several times faster when cores are shared
    (measured: 1000x1000 eigh 0.36 s on 1 thread, 1.1-2.1 s on 2 busy cores).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def r_max(rows: int, cols: int) -> int:
    """Largest rank whose factors ``K * (rows + cols)`` do not outgrow ``rows * cols``."""
    return (rows * cols) // (rows + cols)


def truncated_svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``M (m x n) ~= A @ B`` with ``A = U_K sqrt(S_K)`` (m x K), ``B = sqrt(S_K) V_K^T`` (K x n).

    Computed in float64 from the eigenvectors of the smaller Gram matrix
    (``M^T M = V S^2 V^T`` when ``n <= m``): ``A = M V_K S_K^-1/2``, so
    ``A @ B = M V_K V_K^T`` is exactly the rank-K truncation and, at full
    rank, ``M`` itself up to float64 rounding (``V`` is orthogonal) however
    ill-conditioned ``M`` is. LAPACK's SVD of ``M`` gives the same factors but
    is several times slower (and much slower with contended BLAS threads).
    Also returns all singular values (for reporting).
    """
    m = np.asarray(matrix, dtype=np.float64)
    wide = m.shape[0] < m.shape[1]
    basis, s = _gram_eig(m if not wide else m.T)
    basis = basis[:, :rank]
    # Any positive scale d_k gives the same product; sqrt(s_k) balances the factors.
    scale = np.sqrt(np.where(s[:rank] > s[0] * 1e-12, s[:rank], 1.0)) if s.size and s[0] > 0 else np.ones(rank)
    if not wide:   # M ~= (M V_K) V_K^T
        return (m @ basis) / scale, scale[:, None] * basis.T, s
    # M ~= U_K (U_K^T M)
    return basis * scale, (basis.T @ m) / scale[:, None], s


# Eigendecompositions by the weight's content: a search applies the same
# layer's factorization at many ranks (one decomposition, many truncations).
# Bounded in bytes, oldest dropped first; the arrays are read-only.
_EIG_CACHE: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray]]" = OrderedDict()
_EIG_CACHE_BYTES = 512 << 20


def _gram_eig(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right singular vectors (columns) and singular values of ``m`` (rows >= cols), largest first."""
    m = np.ascontiguousarray(m, dtype=np.float64)
    key = (m.shape, hashlib.blake2b(m.data, digest_size=20).digest())
    hit = _EIG_CACHE.get(key)
    if hit is not None:
        _EIG_CACHE.move_to_end(key)
        return hit
    with one_blas_thread():
        values, vectors = np.linalg.eigh(m.T @ m)
    order = np.argsort(values)[::-1]
    result = (vectors[:, order], np.sqrt(np.clip(values[order], 0.0, None)))
    for array in result:
        array.flags.writeable = False
    _EIG_CACHE[key] = result
    while sum(v.nbytes + s.nbytes for v, s in _EIG_CACHE.values()) > _EIG_CACHE_BYTES and len(_EIG_CACHE) > 1:
        _EIG_CACHE.popitem(last=False)
    return result


def singular_values(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    with one_blas_thread():
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        values = np.linalg.eigvalsh(gram)
    return np.sqrt(np.clip(np.sort(values)[::-1], 0.0, None))


def energy_rank(values: np.ndarray, energy: float) -> int:
    """Smallest ``K`` with ``sum(s_1..s_K ** 2) >= energy * sum(s ** 2)`` (at least 1)."""
    power = np.asarray(values, dtype=np.float64) ** 2
    total = power.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(power) / total
    # The tolerance keeps energy=1.0 from asking for components lost to rounding.
    return int(min(len(power), max(1, np.searchsorted(kept, energy - 1e-12) + 1)))


def energy_kept(values: np.ndarray, rank: int) -> float:
    power = np.asarray(values, dtype=np.float64) ** 2
    total = power.sum()
    return 1.0 if total <= 0 else float(power[:rank].sum() / total)


def check_rank(site: Site, params: dict[str, Any], full_rank: int, what: str = "") -> int:
    """The decision's ``rank`` as an int in ``1..full_rank`` (else an error naming the site)."""
    if "rank" not in params:
        raise PycompressError(f"site '{site.name}': '{site.action}' needs a 'rank' parameter")
    rank = params["rank"]
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise PycompressError(f"site '{site.name}': rank must be an integer, got {rank!r}")
    rank = int(rank)
    label = f" ({what})" if what else ""
    if rank < 1:
        raise PycompressError(f"site '{site.name}': rank {rank} is below 1")
    if rank > full_rank:
        raise PycompressError(f"site '{site.name}': rank {rank} is above the full rank {full_rank}{label}")
    return rank


def wants_data_aware(params: dict[str, Any], ctx: ApplyContext) -> bool:
    """The decision's ``data_aware`` if given, else the context's option (needs activations)."""
    if params.get("data_aware") is not None:
        return bool(params["data_aware"])
    return bool(ctx.options.get("data_aware")) and ctx.activations is not None


@dataclass
class OutputProjection:
    """Top-``K`` eigenvectors of the output second moment (ALGORITHMS.md 1.3).

    ``basis`` is ``out x K`` (orthonormal columns, ``U_K``). ``mean`` is the
    output mean when ``centered`` (the projection is of ``Y - mean`` and the
    bias absorbs ``mean (I - P)``), else ``None``.
    """

    basis: np.ndarray
    mean: np.ndarray | None
    rows: int
    variance_kept: float


def output_projection(site: Site, ctx: ApplyContext, value_name: str, features: int, axis: int, rank: int,
                      centered: bool) -> OutputProjection:
    """Stream the layer's outputs ``Y`` (feature axis ``axis``) and project on their top-``rank`` subspace.

    ``centered``: eigenvectors of ``cov(Y)`` (the layer has a bias to absorb
    the mean). Otherwise of the raw second moment ``E[y y^T]``: without a bias
    the best rank-``K`` map is ``Y P`` with ``P`` from the uncentred moment
    (Eckart-Young), so the guarantee over weight-only SVD still holds.
    """
    if ctx.activations is None:
        raise PycompressError(f"site '{site.name}': data-aware low rank needs calibration data (--data)")
    acc = CovarianceAccumulator(features)
    for batch in ctx.activations([value_name]):
        y = np.asarray(batch[value_name])
        acc.update(np.moveaxis(y, axis, -1).reshape(-1, features))
    if acc.count < 2:
        raise PycompressError(f"site '{site.name}': data-aware low rank needs at least 2 calibration rows, "
                              f"got {acc.count}")
    moment = acc.scatter
    mean = acc.mean
    if not centered:
        moment = moment + acc.count * np.outer(mean, mean)
    moment = (moment + moment.T) / 2
    with one_blas_thread():
        values, vectors = np.linalg.eigh(moment)
    order = np.argsort(values)[::-1]
    values, vectors = np.clip(values[order], 0.0, None), vectors[:, order]
    total = values.sum()
    kept = 1.0 if total <= 0 else float(values[:rank].sum() / total)
    return OutputProjection(vectors[:, :rank], mean if centered else None, int(acc.count), kept)


def factor_weight(w: np.ndarray, rank: int, *, site: Site, ctx: ApplyContext, params: dict[str, Any],
                  output: str, features: int, axis: int, bias: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    """``w`` (in x out) ~ ``a @ b`` at ``rank``: the data-aware output projection or the weight's SVD.

    ``bias``: the layer's bias over its ``features`` outputs (None: it has none).
    Returns ``(a, b, new_bias, facts)``; ``new_bias`` is None when the bias stays
    as it is, ``facts`` what the rewrite reports about the choice.
    """
    if wants_data_aware(params, ctx):
        proj = output_projection(site, ctx, output, features, axis, rank, centered=bias is not None)
        u = proj.basis
        new_bias = None
        if bias is not None:
            # b' = b P + mean (I - P), P = U_K U_K^T
            new_bias = (bias @ u) @ u.T + (proj.mean - (proj.mean @ u) @ u.T)
        return w @ u, u.T, new_bias, {"data_aware": True, "calibration_rows": proj.rows,
                                      "output_variance_kept": proj.variance_kept}
    a, b, s = truncated_svd(w, rank)
    return a, b, None, {"data_aware": False, "weight_energy_kept": energy_kept(s, rank)}


# A factorization replaces the layer; two of them cannot take one site.
CHANGES = "replace"
EXCLUDED_BY = {"replace": "already searched by another action"}


def rank_range(site: Site) -> SearchRange | str:
    """The ranks a search tries for a factorization: ``1..r_max`` (above, the layer would not shrink)."""
    high = int(site.info.get("r_max", 0) or 0)
    return SearchRange("rank", "rank", high) if high >= 1 else "nothing to reduce"


def refit_spec(output: str, rank: int) -> dict[str, Any]:
    """What closed-form recovery refits after a factorization: the pair of linear
    layers now producing tensor ``output`` (the original layer's output name, kept
    by ``replace_node``), at ``rank``. Recovery finds the nodes from the tensor,
    never from the names the rewrite gave them."""
    return {"output": output, "rank": int(rank)}


def replace_node(model: ir.Model, node: ir.Node, new_nodes: Sequence[ir.Node]) -> None:
    """Swap ``node`` for a chain whose last node produces the replacement of its (single) output.

    The original output name is kept, so graph outputs and later plan steps
    that read it by name still find it.
    """
    old_value = node.outputs[0]
    new_value = new_nodes[-1].outputs[0]
    weights = [v for v in node.inputs if v is not None]
    ir.convenience.replace_nodes_and_values(model.graph, node, [node], list(new_nodes), [old_value], [new_value])
    for value in weights:
        remove_if_unused(model.graph, value)  # shared weights stay for their other readers


def new_node(model: ir.Model, name: str, op_type: str, inputs: Sequence[ir.Value | None],
             attributes: Sequence[ir.Attr] = (), dtype: ir.DataType | None = None) -> ir.Node:
    """A node named ``name`` (made unique) with one fresh output value ``<name>/output``."""
    name = unique_name(model, name)
    output = ir.Value(name=unique_name(model, f"{name}/output"))
    if dtype is not None:
        output.dtype = dtype
    return ir.Node("", op_type, list(inputs), attributes=list(attributes), outputs=[output], name=name)


def weight(model: ir.Model, name: str, array: np.ndarray, dtype: np.dtype) -> ir.Value:
    return add_initializer(model, name, np.asarray(array, dtype=dtype, order="C"))


def skipped_after_shrink(site, decision, ctx) -> dict | None:
    """With ``ctx.options["skip_rank_beyond_r_max"]`` (set by searches that
    prune before factorizing), a rank that no longer shrinks the layer, because
    pruning made the layer smaller than the rank was chosen for, leaves the
    layer as it is instead of failing. A hand-written plan still fails loudly.
    """
    rank = int(decision.params.get("rank", 0))
    if ctx.options.get("skip_rank_beyond_r_max") and rank > int(site.info.get("r_max", rank)):
        return {"rank": rank, "r_max": site.info.get("r_max"), "skipped": "rank above r_max after pruning"}
    return None


def prepare(rewrite, model: ir.Model, decision, ctx: ApplyContext) -> tuple[Site, dict | None]:
    """The checked site of a factorization's ``apply``, and the result to return
    at once when the layer is left as it is (``skipped_after_shrink``)."""
    site = rewrite.site(model, decision.site)
    if not site.ok:
        raise PycompressError(f"site '{site.name}': cannot apply '{rewrite.action}': {site.reason}")
    skipped = skipped_after_shrink(site, decision, ctx)
    if skipped is None:
        rewrite.check_params(site, decision.params)
    return site, skipped
