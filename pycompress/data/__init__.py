"""Calibration data: one interface over .npz/.npy files, image folders and
built-in sources (``builtin:digits``, ...).

``load_data(spec, model)`` returns a ``Calibration``: arrays keyed by the
model's input names (first axis = samples), optional labels, checked against
the model's input shapes and dtypes with a clear error.
"""

from pycompress.data.sources import BUILTIN, Calibration, load_data

__all__ = ["BUILTIN", "Calibration", "load_data"]
