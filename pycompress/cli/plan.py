"""`pycompress plan MODEL.onnx --actions svd,lowrank_conv -o plan.json`: where each
action applies, and a starting plan the user can edit.

Generic over the rewrite registry: for each action it lists
``REWRITE.sites(model)`` and asks ``REWRITE.starting_decision(model, site,
**options)`` for a default decision; the options (``energy``, ``keep``,
``bits``, ``align``, ``data_aware``) are forwarded to every rewrite, each reads
the ones it understands. A rewrite that declines a site may say why in
``site.info["plan_note"]``. ``--explain`` prints each action's parameters from
its rewrite's ``ParamSpec``s (as ``--help`` does) and each site's ``info``
generically (numbers, names, lists), so a new rewrite explains itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pycompress.cli.common import (
    emit_json,
    human,
    model_inputs,
    output_policy,
    print_table,
)
from pycompress.errors import PycompressError
from pycompress.ir import infer_model_shapes, load_model
from pycompress.plan import Plan
from pycompress.rewrites import REGISTRY, ApplyContext, get_rewrite
from pycompress.rewrites.compose import _weight_only, check_plan_composes


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("plan", help="list the sites each action can take (and why not) and write a starting plan",
                       epilog=parameters_text(sorted(REGISTRY)), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="path to a .onnx file")
    p.add_argument("--actions", required=True,
                   help=f"comma-separated actions to plan (known: {', '.join(sorted(REGISTRY)) or 'none'})")
    p.add_argument("-o", "--output", help="the plan .json to write (edit it, then `pycompress apply`)")
    p.add_argument("--explain", action="store_true",
                   help="print every site: its size and cost, the starting decision, or why it is left alone")
    p.add_argument("--energy", type=float, default=0.9,
                   help="low rank: keep this fraction of each layer's weight spectral energy (default 0.9)")
    p.add_argument("--keep", type=float, default=0.75,
                   help="pruning: fraction of channels to keep (default 0.75)")
    p.add_argument("--bits", type=int, default=8, help="weight sharing / quantization: bits (default 8)")
    p.add_argument("--align", type=int, default=1,
                   help="pruning: round kept channel counts to a multiple of this (default 1)")
    p.add_argument("--data-aware", action="store_true",
                   help="low rank: start from data-aware decisions (apply then needs --data)")
    p.add_argument("--json", action="store_true", help="print the sites and the plan as JSON")
    p.set_defaults(func=run)


def parameters_text(actions: list[str]) -> str:
    """Each action's decision parameters, from its rewrite's specs (for --help and --explain)."""
    lines = ["decision parameters (the \"params\" of a plan's decisions):"]
    for action in actions:
        rewrite = get_rewrite(action)
        lines.append(f"  {action}: {rewrite.summary}")
        lines += [f"    {spec.line()}" for spec in rewrite.params.values()]
    return "\n".join(lines)


def parse_actions(text: str) -> list[str]:
    actions = [a.strip() for a in text.split(",") if a.strip()]
    if not actions:
        raise PycompressError("--actions: give at least one action, e.g. --actions svd,lowrank_conv")
    for action in actions:
        get_rewrite(action)  # one-line error listing the known actions
    return list(dict.fromkeys(actions))


def _check_options(args) -> None:
    import math

    for flag, value in (("--energy", args.energy), ("--keep", args.keep)):
        if not math.isfinite(value):
            raise PycompressError(f"{flag} {value}: must be a finite number")
    if not 0.0 < args.energy <= 1.0:
        raise PycompressError(f"--energy {args.energy}: must be in (0, 1]")
    if not 0.0 < args.keep <= 1.0:
        raise PycompressError(f"--keep {args.keep}: must be in (0, 1]")
    if not 1 <= args.bits <= 32:
        raise PycompressError(f"--bits {args.bits}: must be in 1..32")
    if args.align < 1:
        raise PycompressError(f"--align {args.align}: must be a positive integer")


def run(args) -> int:
    actions = parse_actions(args.actions)
    _check_options(args)
    with output_policy({"-o": args.output}, model_inputs("model", args.model), lock=[args.output] if args.output else []):
        return _run(args, actions)


def _run(args, actions: list[str]) -> int:
    model = load_model(args.model)
    options: dict[str, Any] = {"energy": args.energy, "keep": args.keep, "bits": args.bits,
                               "align": args.align, "data_aware": args.data_aware}
    plan = Plan(model=str(args.model), meta={"created_by": "pycompress plan", "actions": actions,
                                             "options": options})
    rows: list[dict[str, Any]] = []
    # Actions are planned in the order apply runs them, each on the model as the
    # earlier ones leave it (an svd rank for the pruned layer, not the original),
    # and one action per layer: the plan written is one `apply` accepts.
    ordered = sorted(actions, key=lambda a: get_rewrite(a).order)
    working, decided = model, {}
    for i, action in enumerate(ordered):
        rewrite = get_rewrite(action)
        original = {site.name for site in rewrite.sites(model)}
        chosen = []
        here = rewrite.sites(working)
        for name in sorted(original - {site.name for site in here}):
            if name in decided:  # replaced by an earlier action
                rows.append({"action": action, "site": name, "ok": True, "reason": "", "info": {},
                             "decision": None, "note": f"left to {decided[name]} (one action per layer)"})
        for site in here:
            if site.name not in original:
                continue  # a node an earlier action created: not a site of the model the plan names
            ok = site.ok and site.name not in decided
            decision = rewrite.starting_decision(working, site, **options) if ok else None
            if decision is not None:
                plan.add(decision)
                chosen.append(decision)
                decided[site.name] = action
            if site.ok and site.name in decided and decided[site.name] != action:
                note = f"left to {decided[site.name]} (one action per layer)"
            else:
                note = site.reason if not site.ok else (decision.note if decision else site.info.get("plan_note", ""))
            rows.append({"action": action, "site": site.name, "ok": site.ok, "reason": site.reason,
                         "info": {k: v for k, v in site.info.items() if k != "plan_note"},
                         "decision": decision.params if decision else None,
                         "note": note or ("left as is" if site.ok else "")})
        if chosen and i < len(ordered) - 1:
            working = working.clone() if working is model else working
            for decision in chosen:
                rewrite.apply(working, _weight_only(decision), ApplyContext(options={"data_aware": False}))
            if any(get_rewrite(a).reads_shapes for a in ordered[i + 1:]):
                infer_model_shapes(working, where="planned model")   # as apply_plan does
    # The guarantee: never write a plan `apply` would refuse.
    check_plan_composes(model, plan, where=str(args.output or "plan"))
    if args.output:
        plan.save(args.output)
    applicable = sum(r["ok"] for r in rows)
    if args.json:
        emit_json({"model": str(args.model), "actions": actions, "options": options, "sites": rows,
                   "decisions": len(plan.decisions), "applicable": applicable,
                   "plan": plan.to_dict(), "output": args.output})
        return 0
    if args.explain:
        print(parameters_text(actions))
        print()
        for row in rows:
            _explain(row)
        print()
    elif plan.decisions:
        shown = [r for r in rows if r["decision"]]
        print_table(["action", "site", "op", "r_max", "params", "MACs", "decision"],
                    [[r["action"], r["site"], r["info"].get("op", "-"), _cell(r["info"].get("r_max")),
                      _cell(r["info"].get("params")), _cell(r["info"].get("macs")), _describe(r)] for r in shown],
                    align="llrrrrl")
        print()
    print(f"{len(plan.decisions)} decisions over {applicable} applicable sites "
          f"({len(rows) - applicable} not applicable) for {', '.join(actions)}"
          + ("" if args.explain else "; --explain lists every site"))
    if args.output:
        print(f"wrote {Path(args.output)}")
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return human(value) if abs(value) >= 10_000 else (f"{value:.4g}" if isinstance(value, float) else str(value))


def _info_text(info: dict[str, Any], limit: int = 6) -> str:
    """``key value`` pairs of a site's info: numbers, strings, short lists (nested data as a count)."""
    parts = []
    for key, value in info.items():
        if key == "op" or value is None or value == [] or value == "":
            continue
        if isinstance(value, (list, tuple)):
            if value and isinstance(value[0], (dict, list, tuple)):
                text = f"{len(value)} entries"
            else:
                items = [_cell(v) for v in value[:limit]]
                text = ", ".join(items) + (f", ... (+{len(value) - limit})" if len(value) > limit else "")
                text = f"[{text}]"
        elif isinstance(value, dict):
            text = f"{len(value)} entries"
        else:
            text = _cell(value)
        parts.append(f"{key} {text}")
    return "; ".join(parts)


def _explain(row: dict[str, Any]) -> None:
    op = row["info"].get("op")
    print(f"{row['action']}  {row['site']}" + (f"  [{op}]" if op else ""))
    details = _info_text(row["info"])
    if details:
        print(f"    {details}")
    if not row["ok"]:
        print(f"    not applicable: {row['reason']}")
    elif row["decision"]:
        params = ", ".join(f"{k}={v}" for k, v in row["decision"].items())
        print(f"    decision: {params}" + (f" ({row['note']})" if row["note"] else ""))
    else:
        print(f"    no decision: {row['note']}")


def _describe(row: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in row["decision"].items())
    return f"{params} ({row['note']})" if row["note"] else params
