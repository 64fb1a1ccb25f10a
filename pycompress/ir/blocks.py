"""Residual blocks and resolution stages of a graph, for grouped decisions.

A *cut* is a point of the (topologically ordered) graph where exactly one
activation tensor is alive: everything after it depends on everything before
it only through that tensor. Between two cuts lies a *segment*: a single node
on a plain chain, or a whole branching sub-graph (a residual block with its
skip, a squeeze-excitation). A *block* is a branching segment together with
the plain chain that leads into it (a stem, a stride-2 block without skip);
the plain nodes after the last branching segment (the head, the classifier)
are blocks of their own, one node each. So ResNet18 has 8 blocks plus the
classifier (the 9 parameters of the PAC-BO paper), an MLP has one block per
layer. Tensors that no weight contributes to (a transformer's attention
mask, computed from an input and read by every layer) do not count as alive,
so each encoder layer of a transformer is a block.

A *stage* is the set of nodes whose output has the same spatial size
(``H x W``): the resolution stages of a CNN. Nodes without spatial output
(Gemm, MatMul on vectors) are a stage of their own.
"""

from __future__ import annotations

import onnx_ir as ir

from pycompress.ir.graph import constant_array, output_shapes


def _is_activation(value: ir.Value) -> bool:
    """A floating-point tensor computed from the inputs: not a weight, a folded
    constant or a shape computation (an int64 ``Shape -> Gather -> Reshape``
    chain for a dynamic batch would otherwise span the whole network)."""
    dtype = value.dtype
    if dtype is not None and not dtype.is_floating_point():
        return False
    return value.const_value is None and constant_array(value) is None


def _weighted_values(nodes: list[ir.Node]) -> set[int]:
    """Ids of the tensors computed, directly or not, from a weight (a float constant of 2+ axes).

    Tensors computed from the graph inputs by weightless ops only (a
    transformer's additive attention mask, read by every layer) are side
    inputs: counting them alive would leave no cut between the encoder layers.
    """
    weighted: set[int] = set()
    for node in nodes:
        reads_weight = False
        for value in node.inputs:
            if value is None:
                continue
            if id(value) in weighted:
                reads_weight = True
                break
            array = constant_array(value)
            if array is not None and array.ndim >= 2 and array.dtype.kind == "f":
                reads_weight = True
                break
        if reads_weight:   # only float tensors: a Shape of the hidden state does not carry it
            weighted.update(id(out) for out in node.outputs if out is not None
                            and (out.dtype is None or out.dtype.is_floating_point()))
    return weighted


def block_labels(model: ir.Model) -> dict[str, str]:
    """``node name -> "block<k>"`` (see the module docstring)."""
    nodes = list(model.graph)
    if not nodes:
        return {}
    weighted = _weighted_values(nodes)
    position = {id(node): i for i, node in enumerate(nodes)}
    n = len(nodes)
    # alive[i]: activations produced at or before node i and read after it.
    alive = [0] * (n + 1)
    values = list(model.graph.inputs) + [out for node in nodes for out in node.outputs]
    graph_outputs = {id(v) for v in model.graph.outputs}
    for value in values:
        if not _is_activation(value) or (id(value) not in weighted and value.producer() is not None):
            continue
        node = value.producer()
        first = position[id(node)] if node is not None else 0
        last = max((position[id(use.node)] for use in value.uses() if id(use.node) in position), default=-1)
        if id(value) in graph_outputs:
            last = n
        if last > first:
            alive[first] += 1
            alive[last] -= 1
    segments: list[list[str]] = []
    current: list[str] = []
    running = 0
    for i, node in enumerate(nodes):
        running += alive[i]
        current.append(node.name)
        if running <= 1:
            segments.append(current)
            current = []
    if current:
        segments.append(current)

    labels: dict[str, str] = {}
    pending: list[str] = []
    count = 0
    for segment in segments:
        pending.extend(segment)
        if len(segment) > 1:             # branching: closes a block
            labels.update({name: f"block{count}" for name in pending})
            count += 1
            pending = []
    for name in pending:                 # the plain tail: one block per node
        labels[name] = f"block{count}"
        count += 1
    return labels


def stage_labels(model: ir.Model) -> dict[str, str]:
    """``node name -> "stage<H>x<W>"`` by output resolution; nodes without one get ``"node:<name>"``."""
    labels = {}
    for node in model.graph:
        shapes = output_shapes(node)
        shape = shapes[0] if shapes else None
        if shape is not None and len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]):
            labels[node.name] = f"stage{shape[2]}x{shape[3]}"
        else:
            labels[node.name] = f"node:{node.name}"
    return labels
