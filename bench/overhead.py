"""What a trace costs: glassbox side by side with plain torch hooks and nnsight 0.8.1.

    .venv/bin/python bench/overhead.py                 # full run, about 10 minutes
    .venv/bin/python bench/overhead.py --quick         # smoke run, under a minute
    .venv/bin/python bench/overhead.py --json out.json # also write every number
    bash bench/setup_peers.sh                          # once: the nnsight virtualenv

Models and cases are defined in ``_cases.py`` (a 12-layer Linear MLP and a 30-layer tiny
GPT-2; empty trace, save 1 / 12 / all layers, zero one layer, a 31-trace patching sweep).
Variants, all in ONE process except nnsight:
    raw       the bare module's forward, nothing installed
    hooks     plain ``register_forward_hook`` saving / patching the same values; hooks are
              registered and removed per trace, since that is what a user pays
    glassbox  ``with NNsight(module).trace(x): ...``
    nnsight   the same trace bodies under nnsight 0.8.1, in a subprocess of the peers
              virtualenv (``_nnsight_worker.py``), which re-times the raw forward in its own
              process; its overhead is taken against that raw time. The two processes take
              turns round by round, so both see the same machine load
Every call is timed alone with ``time.perf_counter`` after a warm-up; the variants of a case
alternate call by call in rotated order, round after round, so drift in machine load hits
all of them alike. Reported per variant: the median µs per trace (per sweep for
``sweep_31``) and the overhead: the median of paired differences (each call minus the raw
call next to it) with a distribution-free 95% interval. All variants run in torch's default
grad mode, eval mode, one intra-op thread; before timing, every variant's results are
checked equal to the hooks' (the same work is timed).

Printed: per-variant detail, per-access cost, one markdown table, and PASS/MISS against
the targets of DESIGN.md §4, marked "within noise" where the 95% interval straddles the
target. On a shared machine compare numbers within one run only. Nothing here asserts on
time. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above
import _peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "bench", "_nnsight_worker.py")

TARGET_FIXED_US = 15.0
TARGET_PER_ACCESS_US = 3.0
TARGET_SAVE_ALL_VS_HOOKS = 1.10
TARGET_NNSIGHT_OVERHEAD_RATIO = 3.0


def prepare_glassbox(models: list[str], settings: _cases.Settings) -> tuple[dict[str, Any], dict[str, int]]:
    """Check raw / hooks / glassbox agree, warm up; return each model's Rounds and layer count."""
    from glassbox import NNsight

    prepared: dict[str, _cases.Rounds] = {}
    layer_counts: dict[str, int] = {}
    for name in models:
        bench = _cases.MODELS[name]()
        layer_counts[name] = bench.n_layers
        _cases.log(f"glassbox: {name}: {bench.description}")
        raw = _cases.raw_cases(bench)
        hooks = _cases.hook_cases(bench)
        traced = _cases.traced_cases(bench, NNsight(bench.module))
        for case in traced:
            expected = hooks[case]()
            problem = _cases.check_same(case, expected, traced[case]())
            if case == "patch_1" and _cases.check_same(case, raw[case](), expected) is None:
                problem = "patch_1: zeroing a layer did not change the output"
            if problem:
                raise SystemExit(f"glassbox result differs from plain hooks: {name} {problem}")
        jobs = {case: {"raw": raw[case], "hooks": hooks[case], "glassbox": traced[case]} for case in traced}
        prepared[name] = _cases.Rounds(jobs, settings, f"glassbox {name}")
    return prepared, layer_counts


def run_all(
    models: list[str], settings: _cases.Settings, with_nnsight: bool, quick: bool
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, int]]:
    """Alternate rounds: glassbox process, then nnsight worker, round after round."""
    args = ["--models", ",".join(models)] + (["--quick"] if quick else [])
    peer = _peer.PeerProcess.launch(WORKER, args) if with_nnsight else None
    if peer is not None and not peer.wait_ready():
        peer = None
    prepared, layer_counts = prepare_glassbox(models, settings)
    for name, rounds in prepared.items():
        for r in range(settings.rounds):
            rounds.run(r)
            if peer is not None and peer.ask({"round": [name, r]}) is None:
                peer = None
    nn = peer.ask({"results": True}) if peer is not None else None
    if peer is not None:
        peer.process.wait()
    return {name: rounds.results() for name, rounds in prepared.items()}, nn, layer_counts


def glassbox_source() -> str:
    """Which glassbox was timed: the commit, and the files under src/ that differ from it."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown commit"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    return f"{commit} + uncommitted {', '.join(changed)}" if changed else f"{commit} (clean)"


# ---------------------------------------------------------------- report

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


def build_rows(gb: dict[str, Any], nn: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per (model, case). Overheads are medians of paired differences with 95%
    intervals (see ``_cases.measure``); nnsight's are against its own process's raw forward."""
    nn_results = nn["results"] if nn is not None else None
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
    return rows


def per_access(rows: list[dict[str, Any]], layer_counts: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per model and variant, µs of overhead per saved layer: (save_12 - empty) / 12,
    (save_12 - save_1) / 11 and, with more than 12 layers, (save_all - save_1) / (n - 1)."""
    by = {(r["model"], r["case"]): r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in ("hooks", "glassbox", "nnsight"):
            over = {case: by[model, case][f"{variant}_overhead"] for (m, case) in by if m == model}
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


def targets(rows: list[dict[str, Any]], access: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    checks: list[tuple[str, bool | None, str]] = []

    def add(name: str, value: Interval | None, limit: float, at_most: bool, unit: str, digits: int) -> None:
        ok, note = _verdict(value, limit, at_most)
        checks.append((name, ok, f"{_fmt_ci(value, digits, unit)} {note}".rstrip()))

    for row in rows:
        if row["case"] == "empty":
            add(f"fixed cost per trace <= {TARGET_FIXED_US:g} µs ({row['model']})",
                row["glassbox_overhead"], TARGET_FIXED_US, True, " µs", 1)
    for key, values in access.items():
        if key.endswith("/glassbox"):
            model = key.split("/")[0]
            hooks = access[f"{model}/hooks"]["save12_minus_save1_per_added_access"]
            add(f"<= {TARGET_PER_ACCESS_US:g} µs per additional access, (save_12 - save_1) / 11 "
                f"({model}; plain hooks: {_fmt(hooks and hooks[0], 2)} µs)",
                values["save12_minus_save1_per_added_access"], TARGET_PER_ACCESS_US, True, " µs", 2)
    for row in rows:
        if row["case"] == "save_all" and row["model"].startswith("gpt2"):
            add(f"save-all within {TARGET_SAVE_ALL_VS_HOOKS:.2f}x of plain hooks ({row['model']})",
                row["glassbox_over_hooks"], TARGET_SAVE_ALL_VS_HOOKS, True, "x", 3)
    for row in rows:
        where = f"{row['model']} {row['case']}"
        add(f">= {TARGET_NNSIGHT_OVERHEAD_RATIO:g}x less overhead than nnsight ({where})",
            row["nnsight_over_glassbox_overhead"], TARGET_NNSIGHT_OVERHEAD_RATIO, False, "x", 1)
    return checks


def print_report(rows: list[dict[str, Any]], access: dict[str, Any], checks: list, nn: dict | None) -> None:
    print("\n## Detail: median µs per trace (sweep rows: per 31-trace sweep); "
          "overhead = median paired difference to raw [95% interval]\n")
    for r in rows:
        hooks = r["hooks_us"]
        nn_vs_hooks = "n/a" if r["nnsight_us"] is None else f"{r['nnsight_us'] / hooks:.3f}x"
        print(f"{r['model']} {r['case']}: raw {_fmt(r['raw_us'])}")
        print(f"    hooks    {_fmt(hooks):>12}  overhead {_fmt_ci(r['hooks_overhead'])}")
        print(f"    glassbox {_fmt(r['glassbox_us']):>12}  overhead {_fmt_ci(r['glassbox_overhead'])}"
              f"  ({r['glassbox_us'] / hooks:.3f}x hooks)")
        print(f"    nnsight  {_fmt(r['nnsight_us']):>12}  overhead {_fmt_ci(r['nnsight_overhead'])}"
              f"  ({nn_vs_hooks} hooks; its own raw {_fmt(r['nnsight_raw_us'])})")
    print("\n## Per-access cost: overhead µs per saved layer [95% interval]\n")
    for key, values in access.items():
        for name, value in values.items():
            if value is not None:
                print(f"{key:22} {name:38} {_fmt_ci(value, 2)}")
    print("\n## Summary\n")
    print("| model | case | raw µs | hooks µs | glassbox µs | nnsight µs | glassbox overhead µs "
          "| nnsight overhead µs | glassbox/hooks | nnsight/glassbox overhead |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        nn_over, ratio = r["nnsight_overhead"], r["nnsight_over_glassbox_overhead"]
        print(f"| {r['model']} | {r['case']} | {_fmt(r['raw_us'])} | {_fmt(r['hooks_us'])} "
              f"| {_fmt(r['glassbox_us'])} | {_fmt(r['nnsight_us'])} | {_fmt(r['glassbox_overhead'][0])} "
              f"| {_fmt(nn_over and nn_over[0])} | {r['glassbox_over_hooks'][0]:.3f}x "
              f"| {'n/a' if ratio is None else _fmt(ratio[0]) + 'x'} |")
    if nn is None:
        print("\n(nnsight not measured: see 'nnsight: SKIPPED' on stderr; "
              "`bash bench/setup_peers.sh` creates .venv-peers)")
    print("\n## Targets (DESIGN.md §4)\n")
    for name, ok, detail in checks:
        verdict = "n/a " if ok is None else ("PASS" if ok else "MISS")
        print(f"{verdict}  {name}: {detail}")


def _finite(value: Any) -> Any:
    """JSON has no infinity: write it as the string "inf"."""
    if isinstance(value, float) and value == INF:
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="write every number to PATH")
    parser.add_argument("--models", default=",".join(_cases.MODELS), help="comma-separated subset")
    parser.add_argument("--no-nnsight", action="store_true", help="skip the nnsight subprocess")
    args = parser.parse_args()
    models = args.models.split(",")
    for name in models:
        if name not in _cases.MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(_cases.MODELS)}")

    _cases.configure_torch()
    settings = _cases.QUICK if args.quick else _cases.FULL
    source = glassbox_source()
    _cases.log(f"glassbox source: {source}")
    load_before = os.getloadavg()
    gb, nn, layer_counts = run_all(models, settings, not args.no_nnsight, args.quick)
    load_after = os.getloadavg()
    rows = build_rows(gb, nn)
    access = per_access(rows, layer_counts)
    checks = targets(rows, access)
    print(f"glassbox source: {source}")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (other processes add noise; compare within one run)")
    if nn is not None:
        print(f"nnsight process: {nn['versions']}")
    print_report(rows, access, checks, nn)
    if args.json:
        import torch
        import transformers

        document = {
            "settings": {"quick": args.quick, **vars(settings), "grad_mode": "default (enabled)",
                         "torch_threads": torch.get_num_threads()},
            "glassbox_source": source,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0], "nnsight_process": nn and nn["versions"]},
            "glassbox": gb, "nnsight": nn and nn["results"], "rows": rows, "per_access": access,
            "targets": [{"target": n, "pass": ok, "value": d} for n, ok, d in checks],
            "load_average": {"before": load_before, "after": load_after},
        }
        with open(args.json, "w") as handle:
            json.dump(_finite(document), handle, indent=2)
        _cases.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
