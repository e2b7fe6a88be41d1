"""The report of ``bench/overhead.py``: rows, per-access cost, targets, the printed tables.

    rows = build_rows(glassbox_results, nnsight_answer, baseline_answer, "glassbox@REV")
    access = per_access(rows, layer_counts, "glassbox@REV")
    print_report(rows, access, targets(rows, access, "glassbox@REV"), nnsight_answer,
                 baseline_answer, "glassbox@REV")

Results come from ``_cases.Rounds.results()`` (here, or a worker's ``{"results": ...}``
answer). ``label`` None (no ``--baseline``) leaves out every glassbox@REV key, line and column;
``twin`` (today's checkout timed in a worker like glassbox@REV, variant ``TWIN``) adds its own,
and then "before/after" compares the two workers.
Values with an interval are (median, 95% low, 95% high) tuples. The targets are DESIGN.md §4's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TARGET_FIXED_US = 15.0
TARGET_PER_ACCESS_US = 3.0
TARGET_SAVE_ALL_VS_HOOKS = 1.10
TARGET_NNSIGHT_OVERHEAD_RATIO = 3.0
TWIN = "glassbox-worker"  # today's checkout, timed in a worker like glassbox@REV


Interval = tuple[float, float, float]  # (median, 95% CI low, 95% CI high), µs or ratio
INF = float("inf")


def _overhead(results: dict[str, Any] | None, model: str, case: str, variant: str) -> Interval | None:
    try:
        stats = results[model][case][variant]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    return stats["overhead_us"], stats["overhead_ci95_lo_us"], stats["overhead_ci95_hi_us"]


def _median(results: dict[str, Any] | None, model: str, case: str, variant: str) -> float | None:
    try:
        return results[model][case][variant]["median_us"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None


def _div(top: float, bottom: float) -> float:
    return top / bottom if bottom > 0 else INF


def _ratio(top: Interval | None, bottom: Interval | None) -> Interval | None:
    """Ratio of two positive quantities with a conservative interval."""
    if top is None or bottom is None:
        return None
    return _div(top[0], bottom[0]), _div(top[1], bottom[2]), _div(top[2], bottom[1])


def _slope(a: Interval | None, b: Interval | None, count: int) -> Interval | None:
    """(a - b) / count with a conservative interval."""
    if a is None or b is None:
        return None
    return (a[0] - b[0]) / count, (a[1] - b[2]) / count, (a[2] - b[1]) / count


def _shift(value: Interval, by: float) -> Interval:
    return value[0] + by, value[1] + by, value[2] + by


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return "inf" if value == INF else f"{value:,.{digits}f}"


def _fmt_ci(value: Interval | None, digits: int = 1, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{_fmt(value[0], digits)}{unit} [{_fmt(value[1], digits)}, {_fmt(value[2], digits)}]"


def build_rows(gb: dict[str, Any], nn: dict[str, Any] | None, base: dict[str, Any] | None = None,
               label: str | None = None, twin: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (model, case). Overheads are medians of paired differences with 95%
    intervals (see ``_cases.measure``); nnsight's are against its own process's raw forward,
    and so are those of ``base``, the glassbox@REV worker's results (``label``: its variant;
    None: no ``--baseline``, no baseline keys), and of ``twin``, today's glassbox in a worker
    (None: no twin keys; else "before/after" is glassbox@REV's overhead over the twin's)."""
    nn_results = nn["results"] if nn is not None else None
    base_results = base["results"] if base is not None else None
    twin_results = twin["results"] if twin is not None else None
    rows = []
    for model, cases in gb.items():
        for case in cases:
            raw = _median(gb, model, case, "raw")
            hooks, glassbox = _median(gb, model, case, "hooks"), _median(gb, model, case, "glassbox")
            hooks_over = _overhead(gb, model, case, "hooks")
            gb_over = _overhead(gb, model, case, "glassbox")
            nn_over = _overhead(nn_results, model, case, "nnsight")
            assert raw is not None and hooks is not None and glassbox is not None
            assert hooks_over is not None and gb_over is not None
            # glassbox/hooks interval: both paired overheads on top of the same raw time
            span = _ratio(_shift(gb_over, raw), _shift(hooks_over, raw))
            assert span is not None
            rows.append({
                "model": model,
                "case": case,
                "raw_us": raw,
                "hooks_us": hooks,
                "glassbox_us": glassbox,
                "nnsight_us": _median(nn_results, model, case, "nnsight"),
                "nnsight_raw_us": _median(nn_results, model, case, "raw"),
                "hooks_overhead": hooks_over,
                "glassbox_overhead": gb_over,
                "nnsight_overhead": nn_over,
                "glassbox_over_hooks": (glassbox / hooks, span[1], span[2]),
                "nnsight_over_glassbox_overhead": _ratio(nn_over, gb_over),
            })
            if label is not None:
                base_over = _overhead(base_results, model, case, label)
                twin_over = _overhead(twin_results, model, case, TWIN)
                if twin is not None:
                    rows[-1].update({
                        "twin_us": _median(twin_results, model, case, TWIN),
                        "twin_raw_us": _median(twin_results, model, case, "raw"),
                        "twin_overhead": twin_over,
                        "nnsight_over_twin_overhead": _ratio(nn_over, twin_over),
                    })
                rows[-1].update({
                    "baseline_us": _median(base_results, model, case, label),
                    "baseline_raw_us": _median(base_results, model, case, "raw"),
                    "baseline_overhead": base_over,
                    # like glassbox/hooks: both overheads on top of this process's raw time
                    "baseline_over_hooks": base_over and _ratio(_shift(base_over, raw),
                                                                _shift(hooks_over, raw)),
                    # two workers timed alike when the twin ran; else against this process
                    "before_over_after_overhead": _ratio(base_over, twin_over if twin else gb_over),
                    "nnsight_over_baseline_overhead": _ratio(nn_over, base_over),
                })
    return rows


def per_access(rows: list[dict[str, Any]], layer_counts: dict[str, int],
               label: str | None = None) -> dict[str, dict[str, Any]]:
    """Per model and variant (``label``: glassbox@REV's), µs of overhead per saved layer:
    (save_12 - empty) / 12, (save_12 - save_1) / 11 and, with more than 12 layers,
    (save_all - save_1) / (n - 1)."""
    by = {(r["model"], r["case"]): r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    twin = bool(rows) and "twin_overhead" in rows[0]
    variants = {"hooks": "hooks", "glassbox": "glassbox", **({label: "baseline"} if label else {}),
                **({TWIN: "twin"} if twin else {}), "nnsight": "nnsight"}  # name -> row key prefix
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant, prefix in variants.items():
            over = {case: by[model, case][f"{prefix}_overhead"] for (m, case) in by if m == model}
            out[f"{model}/{variant}"] = {
                "save12_minus_empty_per_access": _slope(over.get("save_12"), over.get("empty"), 12),
                "save12_minus_save1_per_added_access": _slope(over.get("save_12"), over.get("save_1"), 11),
                "saveall_minus_save1_per_added_access": _slope(
                    over.get("save_all"), over.get("save_1"), layer_counts[model] - 1
                ),
            }
    return out


def _verdict(value: Interval | None, limit: float, at_most: bool) -> tuple[bool | None, str]:
    if value is None:
        return None, "not measured"
    ok = value[0] <= limit if at_most else value[0] >= limit
    unsure = value[1] <= limit <= value[2]
    return ok, "(within noise: the 95% interval straddles the target)" if unsure else ""


def targets(rows: list[dict[str, Any]], access: dict[str, Any],
            label: str | None = None) -> list[tuple[str, bool | None, str]]:
    """Today's glassbox against DESIGN.md §4; with ``label`` (glassbox@REV), REV's value is
    quoted beside each, not judged."""
    checks: list[tuple[str, bool | None, str]] = []

    def add(name: str, value: Interval | None, before: Interval | None, limit: float, at_most: bool,
            unit: str, digits: int) -> None:
        ok, note = _verdict(value, limit, at_most)
        detail = f"{_fmt_ci(value, digits, unit)} {note}".rstrip()
        if label is not None:
            detail += f"; {label}: {_fmt_ci(before, digits, unit)}"
        checks.append((name, ok, detail))

    for row in rows:
        if row["case"] == "empty":
            add(f"fixed cost per trace <= {TARGET_FIXED_US:g} µs ({row['model']})",
                row["glassbox_overhead"], row.get("baseline_overhead"), TARGET_FIXED_US, True, " µs", 1)
    for key, values in access.items():
        if key.endswith("/glassbox"):
            model = key.split("/")[0]
            hooks = access[f"{model}/hooks"]["save12_minus_save1_per_added_access"]
            before = access.get(f"{model}/{label}", {}).get("save12_minus_save1_per_added_access")
            add(f"<= {TARGET_PER_ACCESS_US:g} µs per additional access, (save_12 - save_1) / 11 "
                f"({model}; plain hooks: {_fmt(hooks and hooks[0], 2)} µs)",
                values["save12_minus_save1_per_added_access"], before, TARGET_PER_ACCESS_US, True, " µs", 2)
    for row in rows:
        if row["case"] == "save_all" and row["model"].startswith("gpt2"):
            add(f"save-all within {TARGET_SAVE_ALL_VS_HOOKS:.2f}x of plain hooks ({row['model']})",
                row["glassbox_over_hooks"], row.get("baseline_over_hooks"), TARGET_SAVE_ALL_VS_HOOKS,
                True, "x", 3)
    for row in rows:
        where = f"{row['model']} {row['case']}"
        add(f">= {TARGET_NNSIGHT_OVERHEAD_RATIO:g}x less overhead than nnsight ({where})",
            row["nnsight_over_glassbox_overhead"], row.get("nnsight_over_baseline_overhead"),
            TARGET_NNSIGHT_OVERHEAD_RATIO, False, "x", 1)
    return checks


def _first(value: Interval | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else _fmt(value[0], digits) + unit


def _summary(rows: list[dict[str, Any]], label: str | None) -> None:
    """The markdown table; glassbox@REV's columns only with ``label``."""
    base = label is not None
    twin = bool(rows) and "twin_overhead" in rows[0]
    columns: list[tuple[str, Callable[[dict[str, Any]], str]] | None] = [
        ("model", lambda r: r["model"]),
        ("case", lambda r: r["case"]),
        ("raw µs", lambda r: _fmt(r["raw_us"])),
        ("hooks µs", lambda r: _fmt(r["hooks_us"])),
        ("glassbox µs", lambda r: _fmt(r["glassbox_us"])),
        (f"{label} µs", lambda r: _fmt(r["baseline_us"])) if base else None,
        ("nnsight µs", lambda r: _fmt(r["nnsight_us"])),
        ("glassbox overhead µs", lambda r: _first(r["glassbox_overhead"])),
        (f"{label} overhead µs", lambda r: _first(r["baseline_overhead"])) if base else None,
        (f"{TWIN} overhead µs", lambda r: _first(r["twin_overhead"])) if twin else None,
        ("nnsight overhead µs", lambda r: _first(r["nnsight_overhead"])),
        ("glassbox/hooks", lambda r: f"{r['glassbox_over_hooks'][0]:.3f}x"),
        ("before/after overhead", lambda r: _first(r["before_over_after_overhead"], 2, "x"))
        if base else None,
        ("nnsight/glassbox overhead", lambda r: _first(r["nnsight_over_glassbox_overhead"], 1, "x")),
        (f"nnsight/{TWIN} overhead", lambda r: _first(r["nnsight_over_twin_overhead"], 1, "x"))
        if twin else None,
    ]
    shown = [column for column in columns if column is not None]
    print("| " + " | ".join(header for header, _ in shown) + " |")
    print("|---|---|" + "---:|" * (len(shown) - 2))
    for r in rows:
        print("| " + " | ".join(cell(r) for _, cell in shown) + " |")


def _detail(r: dict[str, Any], width: int, name: str, key: str, extra: str | None = None) -> None:
    """One variant's detail line; ``extra`` (when not None) goes after its ratio to hooks."""
    us = r[f"{key}_us"]
    vs_hooks = "n/a" if us is None else f"{us / r['hooks_us']:.3f}x"
    note = "" if extra is None else f"  ({vs_hooks} hooks{extra})"
    print(f"    {name:{width}} {_fmt(us):>12}  overhead {_fmt_ci(r[f'{key}_overhead'])}{note}")


def print_report(rows: list[dict[str, Any]], access: dict[str, Any], checks: list, nn: dict | None,
                 base: dict | None = None, label: str | None = None, twin: dict | None = None) -> None:
    """Detail, per access, summary, targets; glassbox@REV's lines and columns only with ``label``,
    today's worker's (``TWIN``) only with ``twin``."""
    print("\n## Detail: median µs per trace (sweep rows: per 31-trace sweep); "
          "overhead = median paired difference to raw [95% interval]\n")
    width = max(8, len(label or ""), len(TWIN) if twin is not None else 0)
    for r in rows:
        print(f"{r['model']} {r['case']}: raw {_fmt(r['raw_us'])}")
        _detail(r, width, "hooks", "hooks")
        _detail(r, width, "glassbox", "glassbox", "")
        if "twin_us" in r:
            _detail(r, width, TWIN, "twin", f"; its own raw {_fmt(r['twin_raw_us'])}")
        if label is not None:
            _detail(r, width, label, "baseline", f"; its own raw {_fmt(r['baseline_raw_us'])}; "
                    f"before/after overhead {_fmt_ci(r['before_over_after_overhead'], 2, 'x')}")
        _detail(r, width, "nnsight", "nnsight", f"; its own raw {_fmt(r['nnsight_raw_us'])}")
    print("\n## Per-access cost: overhead µs per saved layer [95% interval]\n")
    key_width = max(22, *(len(key) for key in access))
    for key, values in access.items():
        for name, value in values.items():
            if value is not None:
                print(f"{key:{key_width}} {name:38} {_fmt_ci(value, 2)}")
    print("\n## Summary\n")
    _summary(rows, label)
    if nn is None:
        print("\n(nnsight not measured: see 'nnsight: SKIPPED' on stderr; "
              "`bash bench/setup_peers.sh` creates .venv-peers)")
    if label is not None:
        if base is None:
            print(f"\n({label} not measured: its worker stopped; see '{label}:' on stderr)")
        today = f"{TWIN}'s (today's checkout, in a worker like it)" if twin is not None else \
            "today's glassbox"
        print(f"\nbefore/after overhead = {label}'s overhead / {today} overhead "
              "(above 1: today's trace costs less)")
    quoted = f": today's glassbox judged, {label} quoted" if label else ""
    print(f"\n## Targets (DESIGN.md §4){quoted}\n")
    for name, ok, detail in checks:
        verdict = "n/a " if ok is None else ("PASS" if ok else "MISS")
        print(f"{verdict}  {name}: {detail}")


def finite(value: Any) -> Any:
    """JSON has no infinity: write it as the string "inf"."""
    if isinstance(value, float) and value == INF:
        return "inf"
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
