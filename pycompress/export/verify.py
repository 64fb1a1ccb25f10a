"""Load an exported model back, run it, and compare it with the model it came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pycompress.bench.runtime import open_session, random_inputs, run_all, token_vocabulary
from pycompress.errors import PycompressError
from pycompress.fidelity.compare import compare_outputs


def verify_export(source: Path, exported: Path | bytes, inputs: Mapping[str, np.ndarray] | None = None,
                  *, samples: int = 8, where: str = "exported model") -> dict[str, Any]:
    """Run both models once on the same inputs (``inputs``, else ``samples`` random ones).

    Returns ``{"inputs": "data"|"random", "samples": m, "outputs": [{name, max_abs_diff, ...}]}``.
    """
    reference = open_session(source)
    candidate = open_session(exported, where=where)
    kind = "data" if inputs is not None else "random"
    feeds = dict(inputs) if inputs is not None else random_inputs(reference, samples,
                                                                  vocabulary=token_vocabulary(source))
    expected = run_all(reference, feeds)
    got = run_all(candidate, feeds)
    names = [o.name for o in reference.get_outputs()]
    if len(got) != len(expected):
        raise PycompressError(f"{where}: has {len(got)} outputs, the input model {len(expected)}")
    outputs = []
    for name, a, b in zip(names, expected, got):
        if a.shape != b.shape:
            raise PycompressError(f"{where}: output '{name}' has shape {b.shape}, the input model {a.shape}")
        outputs.append({"name": name, **compare_outputs(a, b).to_dict()})
    return {"inputs": kind, "samples": int(len(next(iter(feeds.values())))), "outputs": outputs}
