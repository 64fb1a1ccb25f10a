"""pycompress: compress ONNX models for deployment.

A model flows in as ONNX, a planner turns data into a Plan, rewrites apply the
Plan to the graph, and evaluators measure the result.
"""

__version__ = "0.1.0"

from pycompress.errors import PycompressError

__all__ = ["PycompressError", "__version__"]
