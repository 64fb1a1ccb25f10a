"""Rewrites declare their parameters (``ParamSpec``): the specs are well formed, ``check_params``
enforces them naming the site and the parameter, and the search space built from the
``searchable`` flags has the dimensions it had when it guessed them from parameter names."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import export
from transformer_models import export_tiny_encoder
from zoo import MLP, ResidualCNN

from pycompress.cli import main
from pycompress.errors import PycompressError
from pycompress.ir import load_model
from pycompress.pipeline import build_search_space
from pycompress.rewrites import REGISTRY
from pycompress.rewrites.base import ParamSpec

ACTIONS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("specs")
    torch.manual_seed(0)
    return {"mlp": export(MLP(), (1, 64), folder / "mlp.onnx"),
            "cnn": export(ResidualCNN(width=8), (1, 1, 8, 8), folder / "cnn.onnx"),
            "encoder": export_tiny_encoder(folder / "encoder.onnx")}


@pytest.mark.parametrize("action", ACTIONS)
def test_specs_are_well_formed(action):
    rewrite = REGISTRY[action]
    assert rewrite.params and all(isinstance(s, ParamSpec) for s in rewrite.params.values())
    for name, spec in rewrite.params.items():
        assert spec.name == name and spec.help.strip()
        assert spec.type in (int, float, bool, str, list)
        if isinstance(spec.low, (int, float)) and isinstance(spec.high, (int, float)):
            assert spec.low < spec.high
        assert all(isinstance(c, spec.type) for c in spec.choices)
        assert not (spec.required and spec.default is not None)
        assert spec.line().startswith(f"{name} (")
    searchable = [s for s in rewrite.params.values() if s.searchable]
    assert len(searchable) == 1 and searchable[0].type is int and searchable[0].low is not None
    assert rewrite.searchable_param() is searchable[0]


@pytest.mark.parametrize("action", ACTIONS)
def test_searchable_is_the_parameter_the_search_space_used_to_guess(action):
    params = REGISTRY[action].params
    guessed = next(name for name in ("rank", "keep", "bits") if name in params)
    assert REGISTRY[action].searchable_param().name == guessed


def _site(models, action):
    rewrite = REGISTRY[action]
    for path in models.values():
        for site in rewrite.sites(load_model(path)):
            if site.ok:
                return site
    raise AssertionError(f"no applicable {action} site on the test models")


@pytest.mark.parametrize("action", ACTIONS)
def test_check_params_refuses_wrong_types_and_out_of_range_naming_site_and_parameter(models, action):
    rewrite, site = REGISTRY[action], _site(models, action)
    spec = rewrite.searchable_param()
    low, high = spec.bounds(site)
    if spec.name == "rank":   # the bound is the site's full rank (per structure for lowrank_conv)
        high = site.info["full_rank"]
    assert high is not None
    rewrite.check_params(site, {spec.name: low})
    rewrite.check_params(site, {spec.name: high})
    names = f"site '{re.escape(site.name)}'.*{spec.name}"
    for bad in ("2", True, 2.5, None, [3], low - 1, high + 1):
        with pytest.raises(PycompressError, match=names):
            rewrite.check_params(site, {spec.name: bad})
    with pytest.raises(PycompressError, match=f"site '{re.escape(site.name)}'.*unknown parameter.*'nope'"):
        rewrite.check_params(site, {spec.name: low, "nope": 1})


# (action, param, kind, low, high) per dimension, computed by build_search_space before the specs
# existed (it guessed the searched parameter from the names rank / keep / bits), commit 5251fc1.
BEFORE_SPECS = {
    ("mlp", "svd,share,quant"): [("svd", "rank", "rank", 1, 21), ("svd", "rank", "rank", 1, 10),
                                 ("svd", "rank", "rank", 1, 6)] + [("quant", "bits", "keep", 8, 9)] * 3,
    ("mlp", "share"): [("share", "bits", "keep", 2, 8)] * 3,
    ("cnn", "prune,lowrank_conv,svd,share,quant"): (
        [("prune", "keep", "keep", 1, w) for w in (8, 8, 16, 16)]
        + [("lowrank_conv", "rank", "rank", 1, r) for r in (2, 12, 12, 16, 24)]
        + [("svd", "rank", "rank", 1, 5), ("svd", "rank", "rank", 1, 9)]
        + [("quant", "bits", "keep", 8, 9)] * 7),
}


@pytest.mark.parametrize("model, actions", sorted(BEFORE_SPECS))
def test_search_space_dimensions_are_unchanged(models, model, actions):
    space, _ = build_search_space(load_model(models[model]), actions.split(","))
    got = [(d.action, d.param, d.kind, d.low, d.high) for d in space.dimensions]
    assert got == BEFORE_SPECS[(model, actions)]


def test_plan_help_and_explain_list_the_parameters_from_the_specs(models, capsys):
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    for action, rewrite in REGISTRY.items():
        assert f"  {action}: " in text
        for spec in rewrite.params.values():
            assert spec.line() in text
    assert main(["plan", str(models["mlp"]), "--actions", "svd", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "rank (an integer in [1, the site's full_rank]; required; searched by `compress`)" in out
    assert "data_aware (true or false)" in out and "prune_fraction" not in out
