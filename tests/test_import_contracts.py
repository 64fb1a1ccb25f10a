"""The pipeline names no rewrite's action and none of the names rewrites give
the nodes they create: it reads what the rewrites declare and what ``apply``
returned. import-linter (the contracts in pyproject.toml) cannot see strings,
so this scans the pipeline's string literals (not its docstrings or comments)
for the names the registry's rewrites declare."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pycompress
from pycompress.rewrites import REGISTRY

PIPELINE = Path(pycompress.__file__).parent / "pipeline"


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def named_rewrite_strings(source: str, actions: set[str], fragments: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of every string literal (f-string parts included) that is an action
    name or holds a created-name fragment; docstrings and comments are not code."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                and (node.value in actions or any(f in node.value for f in fragments)):
            hits.append((node.lineno, node.value))
    return hits


def _names():
    actions = set(REGISTRY)
    fragments = {f for rewrite in REGISTRY.values() for f in rewrite.created_names}
    return actions, fragments


def test_the_registry_declares_created_names():
    """Factorizations and sharing create nodes: their declarations must not be empty (or the scan sees nothing)."""
    for action in ("svd", "lowrank_conv", "share", "prune"):
        assert REGISTRY[action].created_names, action


def test_the_scan_finds_names_in_code_but_not_in_docs():
    actions, fragments = _names()
    source = ('"""Refits what svd made (doc)."""\n'
              'def f(d, site):\n'
              '    """prune is fine in a docstring."""\n'
              '    # "lowrank_conv" in a comment is fine\n'
              '    if d.action == "prune":\n'
              '        return f"{site}/svd_a"\n')
    assert named_rewrite_strings(source, actions, fragments) == [(5, "prune"), (6, "/svd_a")]


# The other wiring places: the executor (remote evaluations) and the PFA module's old name.
WIRING = [*sorted(PIPELINE.glob("*.py")), PIPELINE.parent / "executor.py", PIPELINE.parent / "analysis.py"]


@pytest.mark.parametrize("path", WIRING, ids=lambda p: p.name)
def test_the_pipeline_names_no_action_or_created_node(path):
    actions, fragments = _names()
    hits = named_rewrite_strings(path.read_text(), actions, fragments)
    assert not hits, f"{path.name} names rewrites' actions / created nodes: {hits}"


def test_the_compress_cli_names_an_action_only_as_the_default_of_actions():
    """The CLI parses arguments and writes outputs; what an action does is the rewrite's."""
    actions, fragments = _names()
    source = (PIPELINE.parent / "cli" / "compress.py").read_text()
    hits = named_rewrite_strings(source, actions, fragments)
    assert [value for _, value in hits] == ["svd"]
    line = source.splitlines()[hits[0][0] - 1]
    assert "--actions" in line and 'default="svd"' in line


def test_kernel_comparisons_skip_without_the_compiled_module():
    """With the numpy reference forced (as without a build), the native-vs-reference tests
    are reported skipped, not passed: a comparison of the reference with itself proves nothing."""
    import os
    import subprocess
    import sys

    tests = ["tests/test_pfa_select_kernel.py::test_kernel_equals_reference",
             "tests/test_kmeans_huffman.py::test_kmeans_native_matches_reference_bit_for_bit",
             "tests/test_kmeans_huffman.py::test_huffman_round_trip_and_native_matches_reference",
             "tests/test_kernels_covariance.py::test_backend_equals_reference_and_pearson",
             "tests/test_gp_kernel.py::test_native_kernel_equals_reference"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYCOMPRESS_KERNELS": "reference"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 0, done.stdout[-2000:]
    assert "skipped" in summary and "passed" not in summary, summary
