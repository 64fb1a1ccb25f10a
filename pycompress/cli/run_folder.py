"""compress's run folder and outputs: where a run writes, and reading a run folder back safely.

A run folder (``OUT.run``) holds ``compress.json`` (the search settings) and
the planner's ``state.json``; both are untrusted on ``--resume`` (hand-edited,
truncated, of another model) and are refused with an error naming the file,
never half-read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pycompress.errors import PycompressError


def output_paths(args) -> dict[str, Path]:
    """Every path this run may write (the defaults sit beside -o)."""
    output = Path(args.output)
    return {"plan": Path(args.plan) if args.plan else output.with_name(output.stem + ".plan.json"),
            "trace": Path(args.trace) if args.trace else output.with_name(output.stem + ".trace.json"),
            "report": Path(args.report_dir) if args.report_dir else output.with_name(output.stem + ".report"),
            "run": Path(args.resume or args.run_dir or output.with_name(output.stem + ".run"))}


def read_run_config(path: Path) -> dict[str, Any]:
    """A run folder's compress.json, refused cleanly when it is not what compress wrote."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PycompressError(f"{path}: not a valid run configuration ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise PycompressError(f"{path}: not a valid run configuration (expected a JSON object)")
    missing = [k for k in ("method", "actions", "data", "seed", "model_sha256") if k not in config]
    if missing:
        raise PycompressError(f"{path}: not a valid run configuration (missing {', '.join(missing)})")
    types = {"method": str, "actions": list, "objective": str, "loss": str, "samples": int, "seed": int,
             "delta": (int, float), "epsilon": (int, float), "data": str, "model_sha256": str}
    for key, kind in types.items():
        if key in config and (not isinstance(config[key], kind) or isinstance(config[key], bool)):
            raise PycompressError(f"{path}: '{key}' has the wrong type ({type(config.get(key)).__name__})")
    return config


def check_state_file(path: Path) -> None:
    """The saved search, refused cleanly when damaged (the planner then reads it knowing its shape)."""
    if not path.exists():
        return  # the planner says there is nothing to resume
    if not path.is_file():
        raise PycompressError(f"{path}: not a regular file")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PycompressError(f"{path}: not a valid search state ({type(exc).__name__})") from None
    types = {"format": str, "version": int, "d": int, "settings": dict, "status": str, "observations": list,
             "pending": list, "rng": dict, "history": list, "elapsed": (int, float)}
    if not isinstance(state, dict):
        raise PycompressError(f"{path}: not a valid search state (expected a JSON object)")
    for key, kind in types.items():
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            raise PycompressError(f"{path}: '{key}' has the wrong type ({type(state[key]).__name__})")
    for i, obs in enumerate(state.get("observations", [])):
        if not isinstance(obs, dict) or not isinstance(obs.get("theta"), list) \
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in obs["theta"]):
            raise PycompressError(f"{path}: observation {i} is damaged")
    for i, item in enumerate(state.get("pending", [])):
        if not isinstance(item, dict) or not isinstance(item.get("theta"), list):
            raise PycompressError(f"{path}: pending point {i} is damaged")
