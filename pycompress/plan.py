"""The Plan: the only contract between decisions and rewrites.

A Plan is a versioned JSON document listing, for each decision site (a node
name, or a coupled channel group id), an action (``svd``, ``lowrank_conv``,
``prune``, ``share``, ...), its parameters (``rank``, ``keep`` /
``keep_indices``, ``bits``) and, once applied, what it changed. It can be
written, read back, diffed and edited by hand. Reading is strict: an unknown
key is an error naming the site, so a typo never silently does nothing.
Which parameters an action accepts is the rewrite's business
(``Rewrite.params``), checked when the plan is applied to a model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycompress.errors import PycompressError

PLAN_VERSION = 1
_PLAN_KEYS = {"version", "model", "decisions", "meta"}
_DECISION_KEYS = {"site", "action", "params", "note", "result"}
# A plan lists one decision per layer: megabytes at most.
_MAX_PLAN_BYTES = 256 << 20


def _refuse_constant(name: str):
    """NaN / Infinity are not JSON numbers: a plan with them is refused, not half-applied."""
    raise ValueError(f"{name} is not a valid number in a plan")


@dataclass
class LayerDecision:
    """One action at one site, e.g. ``LayerDecision("fc1", "svd", {"rank": 32})``."""

    site: str
    action: str
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    # Filled in when applied: params/MACs before and after, etc.
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.site, "action": self.action, "params": dict(self.params)}
        if self.note:
            out["note"] = self.note
        if self.result is not None:
            out["result"] = self.result
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "LayerDecision":
        if not isinstance(data, dict):
            raise PycompressError(f"{where}: each decision must be an object, got {type(data).__name__}")
        site = data.get("site")
        label = f"{where}: decision for site '{site}'" if site else f"{where}: decision"
        unknown = set(data) - _DECISION_KEYS
        if unknown:
            raise PycompressError(f"{label}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_DECISION_KEYS)}")
        for key in ("site", "action"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise PycompressError(f"{label}: '{key}' must be a non-empty string")
        params = data.get("params", {})
        if not isinstance(params, dict):
            raise PycompressError(f"{label}: 'params' must be an object")
        return cls(site=data["site"], action=data["action"], params=dict(params),
                   note=str(data.get("note", "")), result=data.get("result"))


@dataclass
class Plan:
    decisions: list[LayerDecision] = field(default_factory=list)
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def add(self, decision: LayerDecision) -> None:
        self.decisions.append(decision)

    def for_site(self, site: str) -> list[LayerDecision]:
        return [d for d in self.decisions if d.site == site]

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "model": self.model, "meta": self.meta,
                "decisions": [d.to_dict() for d in self.decisions]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "plan") -> "Plan":
        if not isinstance(data, dict):
            raise PycompressError(f"{where}: a plan must be a JSON object")
        unknown = set(data) - _PLAN_KEYS
        if unknown:
            raise PycompressError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_PLAN_KEYS)}")
        version = data.get("version")
        if version != PLAN_VERSION:
            raise PycompressError(f"{where}: plan version {version!r} is not supported (expected {PLAN_VERSION})")
        decisions = data.get("decisions", [])
        if not isinstance(decisions, list):
            raise PycompressError(f"{where}: 'decisions' must be a list")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PycompressError(f"{where}: 'meta' must be an object")
        plan = cls([LayerDecision.from_dict(d, where) for d in decisions], str(data.get("model", "")), meta)
        seen = set()
        for d in plan.decisions:
            if (d.site, d.action) in seen:
                raise PycompressError(f"{where}: site '{d.site}' has two '{d.action}' decisions")
            seen.add((d.site, d.action))
        return plan

    @classmethod
    def from_json(cls, text: str, where: str = "plan") -> "Plan":
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise PycompressError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except RecursionError:
            raise PycompressError(f"{where}: not a plan (JSON nested too deeply)") from None
        except ValueError as exc:
            raise PycompressError(f"{where}: {exc}") from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        path = Path(path)
        if not path.exists():
            raise PycompressError(f"{path}: no such plan file")
        if not path.is_file():  # a folder, or a FIFO that would block the read
            raise PycompressError(f"{path}: not a regular file; a plan is a .json file")
        if path.stat().st_size > _MAX_PLAN_BYTES:
            raise PycompressError(f"{path}: {path.stat().st_size:,} bytes is too large for a plan")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PycompressError(f"{path}: not a plan (not UTF-8 text)") from None
        return cls.from_json(text, str(path))

    def save(self, path: str | os.PathLike) -> Path:
        # Local import keeps plan.py importable without onnx (it is a pure contract).
        from pycompress.ir.io import atomic_write_text

        return atomic_write_text(path, self.to_json())

    def without_results(self) -> "Plan":
        """The same decisions with the applied results stripped (to re-apply)."""
        return Plan([LayerDecision(d.site, d.action, dict(d.params), d.note) for d in self.decisions],
                    self.model, dict(self.meta), self.version)

    def diff(self, other: "Plan") -> list[str]:
        """Human-readable differences in decisions (site/action -> params)."""
        mine = {(d.site, d.action): d.params for d in self.decisions}
        theirs = {(d.site, d.action): d.params for d in other.decisions}
        lines = []
        for key in sorted(set(mine) | set(theirs)):
            a, b = mine.get(key), theirs.get(key)
            if a == b:
                continue
            site, action = key
            if a is None:
                lines.append(f"+ {site} {action} {json.dumps(b, sort_keys=True)}")
            elif b is None:
                lines.append(f"- {site} {action} {json.dumps(a, sort_keys=True)}")
            else:
                lines.append(f"~ {site} {action} {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}")
        return lines
