"""The ONNX model layer: safe load/save, graph queries, shapes, accounting.

Everything above this package works on ``onnx_ir.Model`` objects obtained
from ``load_model`` and written with ``save_model``.
"""

from pycompress.ir.accounting import (
    SEQUENCE_LENGTH,
    LayerCost,
    ModelCost,
    has_sequence_axis,
    model_cost,
    node_macs,
)
from pycompress.ir.graph import (
    add_initializer,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    constant_array,
    constant_inputs,
    consumers,
    embedding_vocabulary,
    is_codebook_lookup,
    node_by_name,
    node_display_name,
    node_label,
    opset_version,
    output_shapes,
    producer,
    remove_if_unused,
    remove_unused_initializers,
    shape_of,
    token_mask_input,
    truncated,
    unique_name,
)
from pycompress.ir.io import (
    atomic_write_bytes,
    atomic_write_text,
    check_external_data,
    check_model,
    infer_model_shapes,
    intermediate_shapes_hidden,
    load_model,
    model_nbytes,
    save_model,
    simplify_model,
)
from pycompress.ir.linear import (
    as_matrix,
    bias_add,
    from_matrix,
    matmul_weight_input,
    output_channel_axis,
    weight_input,
)

__all__ = [
    "SEQUENCE_LENGTH", "LayerCost", "ModelCost", "has_sequence_axis", "model_cost", "node_macs",
    "add_initializer", "attr_float", "attr_int", "attr_ints", "attr_str",
    "constant_array", "constant_inputs", "consumers", "embedding_vocabulary", "is_codebook_lookup", "node_by_name",
    "node_display_name", "node_label", "opset_version",
    "output_shapes", "producer", "remove_if_unused", "remove_unused_initializers", "shape_of", "token_mask_input", "truncated",
    "unique_name",
    "atomic_write_bytes", "atomic_write_text", "check_external_data", "check_model", "infer_model_shapes", "intermediate_shapes_hidden",
    "as_matrix", "bias_add", "from_matrix", "matmul_weight_input", "output_channel_axis", "weight_input",
    "load_model", "model_nbytes", "save_model", "simplify_model",
]
