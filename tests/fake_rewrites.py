"""A test double for a rank rewrite, so the search pipeline can be tested on its own.

``test_truncate`` keeps the first ``rank`` outputs of a ``Gemm(x, W, b, transB=1)``
(torch's Linear) and pads the rest with zeros: parameters ``rank * (in + 1)``,
linear in the rank like a factorization, and fidelity degrades as the rank
drops. Not a compression method: it only exercises the harness.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pycompress.ir import attr_int, constant_array
from pycompress.plan import LayerDecision
from pycompress.rewrites.base import ApplyContext, Rewrite, Site


class TruncateOutputs(Rewrite):
    action = "test_truncate"
    summary = "keep the first rank outputs of a Linear layer, zero the rest (test double)"
    params = {"rank": "outputs kept"}
    order = 60

    def sites(self, model: ir.Model) -> list[Site]:
        out = []
        for node in model.graph:
            if node.op_type != "Gemm":
                continue
            w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if w is None or w.ndim != 2 or attr_int(node, "transB", 0) != 1 or attr_int(node, "transA", 0) != 0:
                out.append(Site(node.name, self.action, [node.name], ok=False, reason="not a Linear Gemm"))
                continue
            n_out, n_in = w.shape
            out.append(Site(node.name, self.action, [node.name],
                            info={"r_max": max(1, n_out * n_in // (n_out + n_in)), "outputs": n_out}))
        return out

    def apply(self, model: ir.Model, decision: LayerDecision, ctx: ApplyContext) -> dict:
        node = next(n for n in model.graph if n.name == decision.site)
        rank = int(decision.params["rank"])
        w = constant_array(node.inputs[1])
        b = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        n_out = w.shape[0]
        w_value = ir.Value(name=f"{node.name}/trunc_w", const_value=ir.tensor(np.ascontiguousarray(w[:rank])))
        model.graph.register_initializer(w_value)
        inputs = [node.inputs[0], w_value]
        if b is not None:
            b_value = ir.Value(name=f"{node.name}/trunc_b", const_value=ir.tensor(np.ascontiguousarray(b[:rank])))
            model.graph.register_initializer(b_value)
            inputs.append(b_value)
        pads = ir.Value(name=f"{node.name}/trunc_pads",
                        const_value=ir.tensor(np.array([0, 0, 0, n_out - rank], dtype=np.int64)))
        model.graph.register_initializer(pads)
        gemm = ir.Node("", "Gemm", inputs, attributes=[ir.AttrInt64("transB", 1)], name=f"{node.name}/trunc")
        pad = ir.Node("", "Pad", [gemm.outputs[0], pads], name=f"{node.name}/trunc_pad")
        model.graph.insert_after(node, [gemm, pad])
        old = node.outputs[0]
        name = old.name
        old.replace_all_uses_with(pad.outputs[0], replace_graph_outputs=True)
        old.name = None
        pad.outputs[0].name = name  # keep the model's interface
        model.graph.remove(node, safe=True)
        for value in list(model.graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                del model.graph.initializers[value.name]
        return {"rank": rank}


REWRITE = TruncateOutputs()
