"""Graph queries on onnx_ir: producers, consumers, constants, shapes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from pycompress.errors import PycompressError


def node_by_name(model: ir.Model, name: str) -> ir.Node:
    for node in model.graph:
        if node.name == name:
            return node
    raise PycompressError(f"node '{name}' not found in the model")


def node_label(node: ir.Node) -> str:
    """A node's key where nodes are matched by label: its name, else its first output's name, else its op type."""
    return node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)


def node_display_name(node: ir.Node) -> str:
    """A node's name for sites and messages: its name, or ``<unnamed Op -> output>`` when it has none."""
    return node.name or f"<unnamed {node.op_type} -> {node.outputs[0].name if node.outputs else '?'}>"


def site_by_id(sites, site_id: str, kind: str):
    """The item of ``sites`` (anything with an ``id``: channel groups, attention blocks) with
    this id; raises PycompressError naming the site and ``kind`` if there is none."""
    for site in sites:
        if site.id == site_id:
            return site
    raise PycompressError(f"site '{site_id}': no such {kind} in the model")


def producer(value: ir.Value | None) -> ir.Node | None:
    return None if value is None else value.producer()


def consumers(value: ir.Value) -> list[ir.Node]:
    """Nodes that read ``value``, each once, in graph order of their uses."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array if it is a constant (initializer or Constant node)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def constant_inputs(node: ir.Node) -> dict[int, np.ndarray]:
    """Input index -> array for the node's constant inputs."""
    out = {}
    for i, value in enumerate(node.inputs):
        array = constant_array(value)
        if array is not None:
            out[i] = array
    return out


def shape_of(value: ir.Value | None) -> tuple[int | None, ...] | None:
    """Static shape; symbolic or unknown dims are None; None if rank unknown."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def output_shapes(node: ir.Node) -> list[tuple[int | None, ...] | None]:
    return [shape_of(v) for v in node.outputs]


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def attr_ints(node: ir.Node, name: str, default: list[int] | None) -> list[int] | None:
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.value]


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else str(value)


def opset_version(model: ir.Model, domain: str = "") -> int:
    return int(model.opset_imports.get(domain, model.opset_imports.get("ai.onnx", 0)))


def unique_name(model: ir.Model, base: str) -> str:
    """A node/value name not used in the graph yet, readable: base, base_1, ..."""
    taken = model.meta.setdefault("pycompress.names", None)
    if taken is None:
        taken = set()
        for node in model.graph:
            taken.add(node.name)
            taken.update(v.name for v in node.outputs)
        taken.update(v.name for v in model.graph.inputs)
        taken.update(model.graph.initializers.keys())
        model.meta["pycompress.names"] = taken
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def add_initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """Register a new constant under a unique name derived from ``name``."""
    name = unique_name(model, name)
    # asarray, not ascontiguousarray: the latter turns a 0-d scalar into shape (1,).
    array = np.asarray(array, order="C")
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    model.graph.register_initializer(value)
    return value


def remove_unused_initializers(model: ir.Model) -> None:
    for name, value in list(model.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del model.graph.initializers[name]


def remove_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Drop a constant nobody reads any more (a rewrite replaced it): its initializer, or its
    Constant node. Values still read, graph inputs and graph outputs stay."""
    if value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if graph.initializers.get(value.name) is value:
        del graph.initializers[value.name]
        return
    node = value.producer()
    if node is not None and node.op_type == "Constant":
        graph.remove(node, safe=True)


def _const_meta(value: ir.Value | None) -> tuple[ir.DataType | None, int | None]:
    """(dtype, rank) of a constant value without materializing it; (None, None) if not constant."""
    if value is None:
        return None, None
    if value.const_value is not None:
        return value.const_value.dtype, len(value.const_value.shape)
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None:
            tensor = attr.as_tensor()
            return tensor.dtype, len(tensor.shape)
    return None, None


def is_codebook_lookup(node: ir.Node) -> bool:
    """True for the nodes of a shared weight: ``Gather(codebook, Cast(uint8 indices))``.

    Weight sharing (ALGORITHMS.md 1.5) stores a weight as a constant 1-D
    codebook and constant uint8 indices; ONNX Gather only takes int32/int64
    indices, hence the Cast. Both nodes have constant inputs, so a constant
    folder would turn them back into the float weight: loaders must keep them.
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Cast":
        dtype, _ = _const_meta(node.inputs[0])
        return dtype == ir.DataType.UINT8 and any(
            is_codebook_lookup(use.node) for use in node.outputs[0].uses() if use.node.op_type == "Gather")
    if node.op_type == "Gather" and len(node.inputs) == 2:
        data_dtype, data_rank = _const_meta(node.inputs[0])
        if data_rank != 1 or data_dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
            return False
        cast = node.inputs[1].producer() if node.inputs[1] is not None else None
        return (cast is not None and cast.op_type == "Cast" and cast.domain in ("", "ai.onnx")
                and _const_meta(cast.inputs[0])[0] == ir.DataType.UINT8)
    return False


def truncated(model: ir.Model, outputs: list[str]) -> ir.Model:
    """A copy of ``model`` that computes only ``outputs``: the nodes they depend on.

    onnxruntime runs every node of a graph whatever is fetched; a pass that
    needs an early tensor is that much cheaper on the truncated copy.
    """
    copy = model.clone()
    produced = {v.name: v for node in copy.graph for v in node.outputs}
    inputs = {v.name: v for v in copy.graph.inputs}
    missing = [name for name in outputs if name not in produced and name not in inputs]
    if missing:
        raise PycompressError(f"tensor '{missing[0]}' is not produced by any node of the model")
    needed: set[int] = set()
    stack = [produced[name].producer() for name in outputs if name in produced]
    while stack:
        node = stack.pop()
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(v.producer() for v in node.inputs if v is not None)
    copy.graph.outputs.clear()
    for node in reversed(list(copy.graph)):
        if id(node) not in needed:
            copy.graph.remove(node, safe=True)
    copy.graph.outputs.extend(produced.get(name) or inputs[name] for name in outputs)
    remove_unused_initializers(copy)
    return copy


def token_mask_input(model: ir.Model) -> str | None:
    """The attention-mask input of a token model: a 2-D integer (or bool) graph input named
    ``*mask*`` (1 = token, 0 = padding), as Hugging Face encoders are exported; None otherwise."""
    for value in model.graph.inputs:
        dtype = value.dtype.numpy() if value.dtype is not None else None
        if "mask" in value.name.lower() and value.shape is not None and len(value.shape) == 2 \
                and dtype is not None and np.dtype(dtype).kind in "iub":
            return value.name
    return None


# Ops an index tensor passes through unchanged in value on its way to an embedding Gather.
INDEX_PASS_OPS = frozenset({"Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Expand"})


def embedding_vocabulary(value: ir.Value, depth: int = 6) -> int | None:
    """Rows of the constant embedding table that ``value`` indexes (through value-preserving ops), or None."""
    frontier, seen = [value], set()
    for _ in range(depth):
        following = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op_type == "Gather" and use.idx == 1:
                    table = constant_array(node.inputs[0])
                    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
                    if table is not None and table.ndim >= 1:
                        return int(table.shape[axis])
                if node.op_type in INDEX_PASS_OPS and use.idx == 0:
                    following.extend(o for o in node.outputs if o is not None)
        frontier = following
        if not frontier:
            break
    return None
