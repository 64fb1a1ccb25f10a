"""``qk_rank``: fewer query/key dimensions per attention head (a low-rank attention score).

Head ``h`` of a multi-head attention block (``ir/heads.py``) scores query
token ``x`` against key token ``x'`` by the bilinear form
``s(x, x') = (x Wq_h + bq_h) . (x' Wk_h + bk_h) = [x 1] M_h [x' 1]^T`` with
``M_h = [Wq_h; bq_h] [Wk_h; bk_h]^T`` of rank ``d`` (the head width). This
rewrite replaces ``M_h`` by its best rank-``r`` approximation and writes it
back as ``r``-wide query and key columns: Q and K shrink from ``H d`` to
``H r`` outputs (their MACs and weights by ``r / d``, and the ``q k^T``
product too); V, O and the head count stay. The score scale (``1/sqrt(d)``,
a constant in the exported graphs) is left alone, so the scores keep their
scale. Why a separate action rather than ``svd`` of Q and K: factoring Q and
K one by one approximates each projection, while the attention only sees
their product, per head; ``d -> r`` also needs no extra node.

- **Softmax-invariant terms dropped.** With the Softmax over the keys (the
  last axis), terms that depend on the query only (``x Wq_h bk_h``,
  ``bq_h . bk_h``) shift every score of a row equally and do not change the
  attention: they are removed from ``M_h`` before the truncation, so no rank
  is spent on them (the new K has no bias).
- **Data-aware (whitened) truncation**, as SVD-LLM for a linear layer: with
  calibration data, the error that matters is that of the scores on real
  tokens, ``E (x~ (M - M_r) x~'^T)^2 = ||Sq^T (M - M_r) Sk||_F^2`` with
  ``Sq Sq^T = E[x~ x~^T]`` the second moment of the (bias-augmented) query
  input and ``Sk`` the key input's (padding tokens left out). The best
  rank-``r`` ``M_r`` is ``Sq^-T U_r S_r V_r^T Sk^-1`` from the SVD of
  ``Sq^T M Sk``. Without data, ``Sq = Sk = I`` (plain SVD of ``M_h``).
  Measured on all-MiniLM-L6-v2 (docs/transformers.md): rank 16 of 32 in
  every layer keeps held-out cosine 0.982 whitened, 0.890 plain.

Recovery refits what follows (O, the FFN) on the compressed model's own
inputs; the new Q and K columns have no teacher counterpart and are not
refitted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError
from pycompress.ir import (
    add_initializer,
    bias_add,
    constant_array,
    node_macs,
    opset_version,
    remove_unused_initializers,
)
from pycompress.ir.graph import attr_int, site_by_id
from pycompress.ir.heads import AttentionHeads, ShapeEntry, attention_heads, set_shape_entries
from pycompress.plan import LayerDecision
from pycompress.rewrites.base import (
    ApplyContext,
    ParamSpec,
    Rewrite,
    SearchRange,
    SearchSettings,
    Site,
    param_specs,
)
from pycompress.rewrites.factorization import new_node

PREFIX = "qk:"
JITTER = 1e-6           # of the moment's mean diagonal: a rank-deficient input stays invertible


def _softmax_over_keys(model: ir.Model, block: AttentionHeads) -> bool:
    softmax = next((n for n in block.nodes_between if n.op_type == "Softmax"), None)
    if softmax is None:
        return False
    axis = attr_int(softmax, "axis", -1 if opset_version(model) >= 13 else 1)
    return axis in (-1, 3)


def _why_not(model: ir.Model, block: AttentionHeads) -> str:
    """Why the block's query/key width cannot be changed ('' if it can)."""
    if len(block.qk_dims) != 2 or any(e is None for e in block.qk_dims):
        return "the head width of the query/key Reshapes is not a constant"
    for node in block.nodes_between:
        if node.op_type in ("Mul", "Div") and all(constant_array(v) is None for v in node.inputs):
            return f"the attention scores are scaled by a computed value ({node.name}); it would follow the width"
    return ""


def _split_columns(node: ir.Node, heads: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(W ``[D, H*d]``, bias ``[H*d]`` or None) of a projection, float64."""
    w = constant_array(node.inputs[1]).astype(np.float64)
    bias = bias_add(node)
    b = None
    if bias is not None:
        raw = constant_array(bias[0].inputs[bias[1]])
        if raw.size != w.shape[1]:
            raise PycompressError(f"node '{node.name}': its bias does not span the {w.shape[1]} outputs")
        b = raw.astype(np.float64).reshape(-1)
    return w, b


def _cholesky(moment: np.ndarray | None, size: int) -> np.ndarray:
    if moment is None:
        return np.eye(size)
    m = (moment + moment.T) / 2
    m = m + JITTER * float(np.mean(np.diag(m))) * np.eye(size)
    return np.linalg.cholesky(m)


def factor_scores(wq: np.ndarray, bq: np.ndarray | None, wk: np.ndarray, bk: np.ndarray | None, heads: int,
                  rank: int, moment_q: np.ndarray | None = None, moment_k: np.ndarray | None = None,
                  drop_query_terms: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """New ``(Wq [D, H r], bq [H r], Wk [D', H r], bk [H r])`` and the score energy kept per head.

    ``moment_*``: ``E[x~ x~^T]`` of the bias-augmented inputs (``[D+1, D+1]``), or None (plain SVD)."""
    d_in, width = wq.shape
    d = width // heads
    sq, sk = _cholesky(moment_q, d_in + 1), _cholesky(moment_k, wk.shape[0] + 1)
    zeros = np.zeros(width)
    aq = np.vstack([wq, (bq if bq is not None else zeros)[None]])
    ak = np.vstack([wk, (bk if bk is not None else zeros)[None]])
    cols_q, cols_k, bias_q, bias_k, kept = [], [], [], [], []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        m = aq[:, cols] @ ak[:, cols].T                       # [D+1, D'+1]
        if drop_query_terms:
            m[:, -1] = 0.0                                     # x~ Wq bk: the same for every key
        u, s, vt = np.linalg.svd(sq.T @ m @ sk, full_matrices=False)
        root = np.sqrt(s[:rank])
        new_q = np.linalg.solve(sq.T, u[:, :rank] * root)      # Sq^-T U_r S_r^1/2
        new_k = np.linalg.solve(sk.T, vt[:rank].T * root)      # Sk^-T V_r S_r^1/2
        cols_q.append(new_q[:-1]), bias_q.append(new_q[-1])
        cols_k.append(new_k[:-1]), bias_k.append(new_k[-1])
        total = float((s * s).sum())
        kept.append(1.0 if total <= 0 else float((s[:rank] ** 2).sum() / total))
    return (np.hstack(cols_q), np.concatenate(bias_q), np.hstack(cols_k), np.concatenate(bias_k), kept)


def augmented_moments(names: list[str], activations, token_mask: str | None) -> dict[str, np.ndarray]:
    """``E[[x 1]^T [x 1]]`` of each tensor (``[..., D]``), streamed once; padding tokens left out."""
    sums: dict[str, list] = {}
    for batch in activations(list(names) + ([token_mask] if token_mask else [])):
        mask = np.asarray(batch[token_mask]).reshape(-1) != 0 if token_mask else None
        for name in names:
            x = np.asarray(batch[name], dtype=np.float64)
            rows = x.reshape(-1, x.shape[-1])
            if mask is not None and x.ndim == 3 and rows.shape[0] == mask.size:
                rows = rows[mask]
            rows = np.hstack([rows, np.ones((rows.shape[0], 1))])
            acc = sums.setdefault(name, [0, 0.0])
            acc[0] += rows.shape[0]
            acc[1] = acc[1] + rows.T @ rows
    return {name: total / max(n, 1) for name, (n, total) in sums.items()}


def _inputs(block: AttentionHeads) -> tuple[str, str]:
    return block.projections[0].inputs[0].name, block.projections[1].inputs[0].name


def _own_shapes(model: ir.Model, block: AttentionHeads) -> list[ShapeEntry]:
    """Where the Q and K splits' head width lives, on a copy of a shape ``Concat`` that V (or anything
    else) also reads: only the query and key change width. (Loading merges the identical shape
    computations of Q, K and V into one.)"""
    qk = {id(n) for n in block.splits[:2]}
    copies: dict[int, ir.Node] = {}
    entries = []
    for reshape, entry in zip(block.splits[:2], block.qk_dims):
        if entry.node.op_type == "Concat" and any(id(u.node) not in qk for u in entry.node.outputs[0].uses()):
            copy = copies.get(id(entry.node))
            if copy is None:
                copy = new_node(model, f"{entry.node.name}/qk_rank", "Concat", list(entry.node.inputs),
                                list(entry.node.attributes.values()), entry.node.outputs[0].dtype)
                model.graph.insert_after(entry.node, copy)
                copies[id(entry.node)] = copy
            reshape.replace_input_with(1, copy.outputs[0])
            entry = ShapeEntry(copy, entry.index, entry.entry, entry.per_head)
        entries.append(entry)
    return entries


def _replace(model: ir.Model, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    node.replace_input_with(index, add_initializer(model, name, np.ascontiguousarray(array)))


class QueryKeyRank(Rewrite):
    action = "qk_rank"
    summary = "fewer query/key dimensions per attention head (best rank-r attention scores)"
    params = param_specs(
        ParamSpec("rank", int, "query/key dimensions kept per head (the head width: left as it is)",
                  low=1, high="head_dim", required=True, searchable=True),
        ParamSpec("data_aware", bool, "truncate in the norm of the calibration tokens' scores (needs data); "
                  "default: when the run has calibration data", nullable=True),
    )
    order = 20          # after pruning (heads may go first), before factorizations of Q / K
    changes = "shape"
    created_names = ("qk_rank",)
    reads_shapes = True         # the split Reshapes' shapes are computed from Shape(x)

    def sites(self, model: ir.Model) -> list[Site]:
        sites = []
        for block in attention_heads(model):
            reason = _why_not(model, block)
            q, k = block.projections[0], block.projections[1]
            info = {"heads": block.heads, "head_dim": block.head_dim, "full_rank": block.head_dim,
                    "macs": node_macs(q) + node_macs(k),
                    "params": int(constant_array(q.inputs[1]).size + constant_array(k.inputs[1]).size)}
            sites.append(Site(PREFIX + block.output.name, self.action, [q.name, k.name], ok=not reason,
                              reason=reason, info=info))
        return sites

    def _block(self, model: ir.Model, name: str) -> AttentionHeads:
        if not name.startswith(PREFIX):
            raise PycompressError(f"site '{name}': qk_rank sites are named '{PREFIX}<output projection>'")
        return site_by_id([_Named(PREFIX + b.output.name, b) for b in attention_heads(model)], name,
                          "attention block").block

    def search_dimension(self, model: ir.Model, site: Site, settings: SearchSettings) -> SearchRange | str:
        """Ranks ``d/8 .. d`` per head (``d``: untouched)."""
        d = int(site.info["head_dim"])
        if d < 2:
            return "nothing to reduce"
        return SearchRange("rank", "keep", d, max(1, d // 8), untouched_from=d)

    def prepare(self, model: ir.Model, decisions: list[LayerDecision] | None, activations, log) -> dict[str, Any]:
        """The query and key inputs' second moments, in one pass on the original model."""
        if decisions is not None and all(d.params.get("data_aware") is False for d in decisions):
            return {}
        from pycompress.ir.graph import token_mask_input

        names = sorted({n for block in attention_heads(model) for n in _inputs(block)})
        if not names:
            return {}
        log(f"qk_rank: second moments of {len(names)} attention input(s) (one pass)")
        return {"qk_moments": augmented_moments(names, activations, token_mask_input(model))}

    def _moments(self, model: ir.Model, block: AttentionHeads, decision: LayerDecision,
                 ctx: ApplyContext) -> dict[str, np.ndarray] | None:
        wanted = decision.params.get("data_aware")
        if wanted is False:
            return None
        names = list(dict.fromkeys(_inputs(block)))
        given = ctx.options.get("qk_moments")
        if given is not None and all(n in given for n in names):
            return given
        if ctx.activations is not None and (wanted or ctx.options.get("data_aware")):
            # One pass for every block of the model, kept for the plan's other qk_rank decisions.
            every = sorted({n for b in attention_heads(model) for n in _inputs(b)} | set(names))
            ctx.options["qk_moments"] = augmented_moments(every, ctx.activations, ctx.options.get("token_mask"))
            return ctx.options["qk_moments"]
        if wanted:
            raise PycompressError(f"site '{decision.site}': data-aware qk_rank needs calibration data (--data)")
        return None

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict[str, Any]:
        site = self.checked_site(model, decision)
        block = self._block(model, decision.site)
        rank, heads, d = int(decision.params["rank"]), block.heads, block.head_dim
        q_node, k_node = block.projections[0], block.projections[1]
        macs_before, params_before = site.info["macs"], site.info["params"]
        if rank >= d:       # the search measures costs at the range's ends: the top is the layer as it is
            return {"rank": rank, "head_dim": d, "heads": heads, "skipped": "rank equals the head width",
                    "params_before": params_before, "params_after": params_before,
                    "macs_before": macs_before, "macs_after": macs_before, "refit": []}
        wq, bq = _split_columns(q_node, heads)
        wk, bk = _split_columns(k_node, heads)
        moments = self._moments(model, block, decision, ctx)
        q_in, k_in = _inputs(block)
        new_wq, new_bq, new_wk, new_bk, kept = factor_scores(
            wq, bq, wk, bk, heads, rank, None if moments is None else moments[q_in],
            None if moments is None else moments[k_in], drop_query_terms=_softmax_over_keys(model, block))
        dtype = constant_array(q_node.inputs[1]).dtype
        for node, w, b, tag in ((q_node, new_wq, new_bq, "query"), (k_node, new_wk, new_bk, "key")):
            _replace(model, node, 1, w.astype(dtype), f"qk_rank_{tag}_weight")
            bias = bias_add(node)
            if bias is not None:
                add, slot = bias
                shape = constant_array(add.inputs[slot]).shape[:-1] + (heads * rank,)
                _replace(model, add, slot, b.reshape(shape).astype(dtype), f"qk_rank_{tag}_bias")
            elif np.abs(b).max(initial=0.0) > 1e-6 * max(1.0, float(np.abs(w).max(initial=0.0))):
                # Without biases in, the new ones are zero up to rounding; more needs an Add to hold it.
                raise PycompressError(f"site '{site.name}': '{node.name}' has no bias Add to take the new bias")
        set_shape_entries(model, [(entry, rank) for entry in _own_shapes(model, block)], lambda old: f"{old}_qk_rank")
        for node in block.nodes_between:          # shapes are re-inferred by apply_plan
            for out in node.outputs:
                if out is not None and not out.is_graph_output():
                    out.shape = None
        dead = [n for n in model.graph if n.op_type == "Constant"
                and all(not o.uses() and not o.is_graph_output() for o in n.outputs)]
        if dead:
            model.graph.remove(dead, safe=True)
        remove_unused_initializers(model)
        return {"rank": rank, "head_dim": d, "heads": heads, "data_aware": moments is not None,
                "score_energy_kept": float(np.mean(kept)),
                "params_before": params_before, "params_after": int(new_wq.size + new_wk.size),
                "macs_before": macs_before, "macs_after": macs_before * rank // d,
                "refit": []}

    def refit_spec(self, site: str, result: dict[str, Any]):
        spec = super().refit_spec(site, result)
        spec.notes.append(f"{site}: the rank-{result.get('rank')} query/key columns have no teacher "
                          "counterpart; the layers after them are refitted")
        return spec

    def search_seeds(self, model: ir.Model, options: dict[str, Any], target_macs: float | None) -> list:
        """With pruning in the same search of a token model: the global allocation (``rewrites/allocation.py``)
        at the MACs the query/key ranks leave to reach the target, ranks ``d/2`` and ``3d/8``."""
        from pycompress.rewrites.allocation import qk_seeds

        return qk_seeds(model, options, target_macs, [PREFIX + b.output.name for b in attention_heads(model)
                                                      if not _why_not(model, b)])

    def starting_decision(self, model: ir.Model, site: Site, **options: Any) -> LayerDecision | None:
        """Half the head width: measured on MiniLM, 0.982 held-out cosine whitened (docs/transformers.md)."""
        if not site.ok or int(site.info["head_dim"]) < 4:
            return None
        rank = int(site.info["head_dim"]) // 2
        return LayerDecision(site.name, self.action, {"rank": rank},
                             f"{rank} of {site.info['head_dim']} query/key dimensions per head")


class _Named:
    """An attention block under its qk_rank site id (for ``site_by_id``)."""

    def __init__(self, site_id: str, block: AttentionHeads):
        self.id, self.block = site_id, block


REWRITE = QueryKeyRank()

__all__ = ["REWRITE", "QueryKeyRank", "augmented_moments", "factor_scores"]
