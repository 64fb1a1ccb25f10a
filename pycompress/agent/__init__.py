"""The measuring agent for target devices, and the host's client for it.

``server`` runs on the device (``pycompress agent`` / ``python -m
pycompress.agent``) and needs only numpy and onnxruntime; ``client`` is what
``bench --device`` and ``compress --device`` use on the host; ``protocol`` is
the wire format both share. Nothing here imports the rest of pycompress
(beyond its error type), torch or gpytorch (import-linter checks it).
"""
