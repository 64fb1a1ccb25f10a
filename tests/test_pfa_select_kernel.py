"""The PFA "L1 max" selection kernel against its numpy reference (ALGORITHMS.md 3.3)."""

import time

import numpy as np
import pytest

from kernel_testing import compiled

import pycompress.kernels as kernels
from pycompress.kernels import reference

IMPLS = pytest.mark.parametrize("impl", [kernels, reference], ids=["backend", "reference"])

# The PFA authors' reference check (ALGORITHMS.md 3.3).
AUTHORS_MATRIX = np.array([[1, .7, .2, .3, .9],
                           [.7, 1, .1, .2, .6],
                           [.2, .1, 1, .8, .3],
                           [.3, .2, .8, 1, .3],
                           [.9, .6, .3, .3, 1]])


def naive_order(corr, n_remove):
    """Recompute every norm from scratch at each step (the O(C^3) definition)."""
    a = np.abs(np.asarray(corr, float))
    np.fill_diagonal(a, 0)
    alive = list(range(len(a)))
    order = []
    for _ in range(n_remove):
        sub = a[np.ix_(alive, alive)]
        norms = sub.sum(0)
        best = norms.max()
        cands = [j for j, v in zip(alive, norms) if v >= best - 1e-9 * max(1, best)]
        if len(cands) > 1:
            peaks = [a[alive, j].max() for j in cands]
            top = max(peaks)
            cands = [j for j, p in zip(cands, peaks) if p >= top - 1e-9 * max(1, top)]
        order.append(cands[0])
        alive.remove(cands[0])
    return order


def random_corr(c, n, seed):
    if c == 1:
        return np.ones((1, 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c)) @ rng.normal(size=(c, c)) * rng.uniform(0.1, 3, size=c)
    return np.corrcoef(x, rowvar=False)


@IMPLS
def test_authors_reference_check(impl):
    assert impl.l1max_removal_order(AUTHORS_MATRIX, 4).tolist() == [0, 3, 4, 1]
    # Removal is greedy: asking for fewer removals gives a prefix.
    assert impl.l1max_removal_order(AUTHORS_MATRIX, 2).tolist() == [0, 3]
    assert impl.l1max_removal_order(AUTHORS_MATRIX, 0).tolist() == []


@IMPLS
@pytest.mark.parametrize("c", [2, 7, 40])
def test_matches_the_from_scratch_definition(impl, c):
    corr = random_corr(c, 3 * c + 5, seed=c)
    assert impl.l1max_removal_order(corr, c - 1).tolist() == naive_order(corr, c - 1)


@pytest.mark.parametrize("c", [1, 16, 257, 1000])
def test_kernel_equals_reference(c):
    corr = random_corr(c, 2 * c + 3, seed=100 + c)
    n_remove = c - 1 if c > 1 else 1
    native = compiled().l1max_removal_order(corr, n_remove)
    ref = reference.l1max_removal_order(corr, n_remove)
    assert native.dtype == np.int64 and native.tolist() == ref.tolist()
    assert len(set(native.tolist())) == n_remove


@IMPLS
def test_signs_are_ignored_and_ties_go_to_larger_coefficient_then_lowest_index(impl):
    flipped = AUTHORS_MATRIX * np.where(np.random.default_rng(0).random((5, 5)) < 0.5, -1, 1)
    flipped = np.triu(flipped) + np.triu(flipped, 1).T
    assert impl.l1max_removal_order(flipped, 4).tolist() == [0, 3, 4, 1]
    # Columns 0 and 1 have the largest norm, 1.0; column 1 has the larger peak (0.8 vs 0.5).
    tie = np.eye(5)
    for (i, j), v in {(0, 2): .5, (0, 3): .5, (1, 2): .2, (1, 4): .8}.items():
        tie[i, j] = tie[j, i] = v
    assert impl.l1max_removal_order(tie, 1).tolist() == [1]
    assert impl.l1max_removal_order(tie[[1, 0, 2, 3, 4]][:, [1, 0, 2, 3, 4]], 1).tolist() == [0]
    # Identity: every norm is 0 and every peak 0: the lowest index goes first.
    assert impl.l1max_removal_order(np.eye(4), 3).tolist() == [0, 1, 2]


@IMPLS
def test_duplicated_filters_go_first(impl):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(500, 6))
    x = np.concatenate([base, base[:, [1, 4]] * [2.0, -0.5]], axis=1)  # 6, 7 copy 1, 4
    removed = impl.l1max_removal_order(np.corrcoef(x, rowvar=False), 2).tolist()
    assert len(removed) == 2
    assert sorted(removed) in ([1, 4], [1, 7], [6, 4], [6, 7])


@IMPLS
def test_bad_arguments_are_value_errors(impl):
    with pytest.raises(ValueError, match="square"):
        impl.l1max_removal_order(np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="n_remove"):
        impl.l1max_removal_order(np.eye(3), 4)
    with pytest.raises(ValueError, match="n_remove"):
        impl.l1max_removal_order(np.eye(3), -1)
    bad = np.eye(3)
    bad[0, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        impl.l1max_removal_order(bad, 1)


def test_native_is_quadratic_on_a_large_layer():
    if kernels.BACKEND != "native":
        pytest.skip("compiled kernels not built")
    corr = random_corr(3000, 400, seed=5)
    start = time.perf_counter()
    order = kernels.l1max_removal_order(corr, 2999)
    seconds = time.perf_counter() - start
    # O(C^2) = 9e6 updates take milliseconds; recomputing norms each step
    # (O(C^3) = 2.7e10) would take tens of seconds.
    assert len(set(order.tolist())) == 2999
    assert seconds < 3.0, seconds
