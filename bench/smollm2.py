"""A real model, side by side: SmolLM2-135M under plain HF, plain hooks, glassbox and nnsight 0.8.1.

    .venv/bin/python bench/smollm2.py                  # full run, 20-25 minutes on 2 busy cores
    .venv/bin/python bench/smollm2.py --quick          # smoke run in seconds: a tiny Llama, 2 rounds
    .venv/bin/python bench/smollm2.py --quick --model smollm2  # SmolLM2, 2 rounds: 3-6 minutes
    .venv/bin/python bench/smollm2.py --json out.json  # also write every number
    bash bench/setup_peers.sh                          # once: the nnsight virtualenv (optional)

Model: SmolLM2-135M-Instruct (Llama layout, 30 decoder layers, float32, CPU), prepared
offline by ``glassbox.offline.smollm2_path()``. Prompts: 16 tokens each, a clean one
(``CLEAN``) and a corrupted one (``CORRUPT``) for patching. ``--quick`` (2 rounds) runs on
``--model tiny`` unless told otherwise: a random-init Llama of the same layout (30 layers,
hidden 64, ``glassbox.offline.tiny_llama_path(n_layers=30)``; GPT-2's tokenizer, so the
prompts are 17 tokens), which checks in seconds that the bench runs; its numbers are not
SmolLM2's.

Cases (what one timed call does):
    save_all          one trace of CLEAN saving the 30 layer outputs
    sweep_31          31 traces: CLEAN saving the 30 layer outputs and the logits, then for
                      each layer j one trace of CORRUPT whose layer j output at the last
                      position is replaced by the clean value, saving the logits
    sweep_31_batched  the same 31 runs as ONE trace with 31 invokes (one batched forward
                      of 31 rows); for raw / hooks one forward of the [31, 16] batch with a
                      hook on layer j that copies row 0's last position into row j + 1
    generate_edit     greedy generation of 20 new tokens from CLEAN, multiplying layer 10's
                      last position by 1.1 at every step
Variants:
    raw       the bare Hugging Face model, nothing installed (``generate_edit``: plain
              ``generate`` without the edit)
    hooks     plain ``register_forward_hook`` doing the same work, registered and removed
              per trace (``generate_edit``: HF ``generate`` with the equivalent hook)
    glassbox  ``glassbox.LanguageModel``, the trace bodies written as a user writes them
    nnsight   the same bodies under nnsight 0.8.1 (``TransformersModel``, task
              text-generation) in a subprocess of ``.venv-peers``
              (``_nnsight_smollm2_worker.py``), which also re-times the raw variant
raw and hooks get pre-tokenized tensors; glassbox and nnsight get the prompt strings and
tokenize them per trace, which is what their users pay.

Timing reuses ``_cases.Rounds``: every call is timed alone with ``time.perf_counter``
after a warm-up; the variants of a case alternate call by call in rotated order, round
after round; this process and the nnsight worker take turns round by round, so both see
the same machine load. Reported: per-call medians (ms); glassbox/hooks is the median of
the paired ratios (each glassbox call over the hooks call of the same turn) with a
distribution-free 95% interval; nnsight/glassbox is the ratio of the two medians (two
processes, so no pairing; the nnsight process's own raw median shows whether it saw the
same load). All variants run under ``torch.no_grad()`` (grad mode disabled globally),
eval mode, one intra-op thread. Before timing, every variant's values (saved tensors,
logits, generated tokens) are checked equal to the hooks variant's (allclose, atol and
rtol 1e-5; tokens exactly), so the same work is timed.

Targets: glassbox within 1.03x of plain hooks on every case, which for ``generate_edit``
is: generation with an edit at every step within 1.03x of plain HF ``generate`` with an
equivalent hook. Marked "within noise" where the 95% interval straddles the target.
Nothing here asserts on time. Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _cases  # needs the path above
import _peer

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
WORKER = os.path.join(BENCH, "_nnsight_smollm2_worker.py")

CLEAN = "The Eiffel Tower is located in the city of Paris, which is the capital"
CORRUPT = "The Colosseum is located in the city of Rome, which is the capital"
N_LAYERS = 30
NEW_TOKENS = 20
EDIT_LAYER = 10
EDIT_SCALE = 1.1
CASES = ("save_all", "sweep_31", "sweep_31_batched", "generate_edit")

# A forward of 16 tokens takes ~0.2 s on one thread, a sweep ~31 of them: few, long calls.
FULL = _cases.Settings(rounds=15, round_s=2.0, warmup_s=0.0)
QUICK = _cases.Settings(rounds=2, round_s=0.0, warmup_s=0.0)
TARGET_VS_HOOKS = 1.03

Jobs = dict[str, Callable[[], Any]]


def configure_torch() -> None:
    """Same settings in both processes: one intra-op thread, grad mode off for every variant."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)


def settings_for(quick: bool) -> _cases.Settings:
    return QUICK if quick else FULL


# ---------------------------------------------------------------- inputs and variants


@dataclass
class Inputs:
    clean: dict[str, torch.Tensor]  # input_ids, attention_mask: [1, 16]
    corrupt: dict[str, torch.Tensor]
    batch: dict[str, torch.Tensor]  # [31, 16]: clean, then 30 x corrupt
    pad_id: int
    tokens: int  # of each prompt: 16 with SmolLM2's tokenizer


def make_inputs(tokenizer: Any) -> Inputs:
    def encode(text: str) -> dict[str, torch.Tensor]:
        ids = tokenizer(text, return_tensors="pt")
        return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}

    clean, corrupt = encode(CLEAN), encode(CORRUPT)
    tokens = clean["input_ids"].shape[1]
    if corrupt["input_ids"].shape[1] != tokens:  # the batched sweep stacks them unpadded
        raise SystemExit(f"{CLEAN!r} is {tokens} tokens but {CORRUPT!r} is "
                         f"{corrupt['input_ids'].shape[1]}: they must be as long")
    batch = {k: torch.cat([clean[k]] + [corrupt[k]] * N_LAYERS) for k in clean}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Inputs(clean, corrupt, batch, int(pad), tokens)


def generate_kwargs(inputs: Inputs) -> dict[str, Any]:
    return {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": inputs.pad_id}


def raw_cases(hf: torch.nn.Module, inputs: Inputs) -> Jobs:
    """The bare HF model: the forwards each case needs, nothing installed."""
    gen = generate_kwargs(inputs)

    def sweep() -> list[torch.Tensor]:
        logits = [hf(**inputs.clean).logits]
        for _ in range(N_LAYERS):
            logits.append(hf(**inputs.corrupt).logits)
        return logits

    return {
        "save_all": lambda: hf(**inputs.clean).logits,
        "sweep_31": sweep,
        "sweep_31_batched": lambda: hf(**inputs.batch).logits,
        "generate_edit": lambda: hf.generate(**inputs.clean, **gen),
    }


def hook_cases(hf: torch.nn.Module, inputs: Inputs) -> Jobs:
    """Plain forward hooks doing each case's work, registered and removed per run."""
    layers = list(hf.model.layers)
    gen = generate_kwargs(inputs)

    def with_hooks(pairs: list[tuple[torch.nn.Module, Callable]], run: Callable[[], Any]) -> Any:
        handles = [module.register_forward_hook(hook) for module, hook in pairs]
        try:
            return run()
        finally:
            for handle in handles:
                handle.remove()

    def save_all() -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []

        def hook(_module: Any, _args: Any, output: torch.Tensor) -> None:
            saved.append(output)

        with_hooks([(layer, hook) for layer in layers], lambda: hf(**inputs.clean))
        return saved

    def patch_hook(value: torch.Tensor) -> Callable:
        def hook(_module: Any, _args: Any, output: torch.Tensor) -> None:
            output[:, -1] = value

        return hook

    def sweep() -> list[torch.Tensor]:
        clean: list[torch.Tensor] = []

        def keep(_module: Any, _args: Any, output: torch.Tensor) -> None:
            clean.append(output)

        logits = [with_hooks([(layer, keep) for layer in layers], lambda: hf(**inputs.clean)).logits]
        for j, layer in enumerate(layers):
            hook = patch_hook(clean[j][:, -1])
            logits.append(with_hooks([(layer, hook)], lambda: hf(**inputs.corrupt)).logits)
        return logits

    def row_hook(j: int) -> Callable:
        def hook(_module: Any, _args: Any, output: torch.Tensor) -> None:
            output[j + 1, -1] = output[0, -1]

        return hook

    def batched() -> list[torch.Tensor]:
        pairs = [(layer, row_hook(j)) for j, layer in enumerate(layers)]
        logits = with_hooks(pairs, lambda: hf(**inputs.batch)).logits
        return list(logits.split(1))

    def edit(_module: Any, _args: Any, output: torch.Tensor) -> None:
        output[:, -1] *= EDIT_SCALE

    return {
        "save_all": save_all,
        "sweep_31": sweep,
        "sweep_31_batched": batched,
        "generate_edit": lambda: with_hooks([(layers[EDIT_LAYER], edit)], lambda: hf.generate(
            **inputs.clean, **gen)),
    }


def traced_cases(model: Any, library: str) -> Jobs:
    """The trace bodies as a user writes them; glassbox and nnsight run this same code, except
    where reading the generated tokens differs (noted below). ``model`` is a glassbox
    ``LanguageModel`` or an nnsight ``TransformersModel``."""
    layers = [model.model.layers[j] for j in range(N_LAYERS)]
    edited = layers[EDIT_LAYER]

    def save_all() -> list[Any]:
        saved = []
        with model.trace(CLEAN):
            for layer in layers:
                saved.append(layer.output.save())
        return saved

    # Names are bound before a trace and only appended to inside it: nnsight 0.8.1 does not
    # hand names first bound inside a trace back to an enclosing function.
    def sweep() -> list[Any]:
        clean, logits = [], []
        with model.trace(CLEAN):
            for layer in layers:
                clean.append(layer.output.save())
            logits.append(model.output.logits.save())
        for j, layer in enumerate(layers):
            with model.trace(CORRUPT):
                layer.output[:, -1] = clean[j][:, -1]
                logits.append(model.output.logits.save())
        return logits

    def batched() -> list[Any]:
        clean, logits = [], []
        with model.trace() as tracer:
            with tracer.invoke(CLEAN):
                # not `layer`: glassbox hands a name an earlier invoke sets to the later
                # invokes in place of the loop variable below
                for source in layers:
                    clean.append(source.output[:, -1])
                logits.append(model.output.logits.save())
            for j, layer in enumerate(layers):
                with tracer.invoke(CORRUPT):
                    # read the output first: at layer j invoke 0 has run before this one, so
                    # clean[j] exists (``layer.output[:, -1] = clean[j]`` would evaluate
                    # clean[j] before waiting for the layer)
                    hidden = layer.output
                    hidden[:, -1] = clean[j]
                    logits.append(model.output.logits.save())
        return logits

    def generate_glassbox() -> Any:
        with model.generate(CLEAN, max_new_tokens=NEW_TOKENS, do_sample=False) as tracer:
            for _step in tracer.iter[:]:
                edited.output[:, -1] *= EDIT_SCALE
        return tracer.result

    def generate_nnsight() -> Any:
        # nnsight serves tracer.result after the last step, and an open-ended iter[:] never
        # returns from its loop (its last request is left parked): name the step count.
        tokens = []
        with model.generate(CLEAN, max_new_tokens=NEW_TOKENS, do_sample=False) as tracer:
            for _step in tracer.iter[:NEW_TOKENS]:
                edited.output[:, -1] *= EDIT_SCALE
            tokens.append(tracer.result.save())
        return tokens[0]

    return {
        "save_all": save_all,
        "sweep_31": sweep,
        "sweep_31_batched": batched,
        "generate_edit": generate_nnsight if library == "nnsight" else generate_glassbox,
    }


# ---------------------------------------------------------------- checks


def _flat(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return [value]


def difference(expected: Any, got: Any) -> tuple[str | None, float]:
    """(None, max |difference|) if ``got`` holds the same tensors as ``expected`` (float:
    allclose with rtol = atol = 1e-5; integer: exactly equal), else (what differs, inf)."""
    a_list, b_list = _flat(expected), _flat(got)
    if len(a_list) != len(b_list):
        return f"expected {len(a_list)} tensors, got {len(b_list)}", float("inf")
    worst = 0.0
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            what = f"{type(b).__name__} {tuple(getattr(b, 'shape', ()))}"
            return f"tensor {i}: expected {a.dtype} {tuple(a.shape)}, got {what}", float("inf")
        if b.requires_grad:
            return f"tensor {i} requires grad: grad mode was not off", float("inf")
        if a.is_floating_point():
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
                return f"tensor {i} differs by up to {(a - b).abs().max().item():.3g}", float("inf")
            worst = max(worst, (a - b).abs().max().item())
        elif not torch.equal(a, b):
            return f"tensor {i} differs: {a.tolist()} != {b.tolist()}", float("inf")
    return None, worst


def check_variant(name: str, hooks: Jobs, variant: Jobs) -> None:
    """Raise SystemExit unless ``variant`` gives the hooks' values on every case."""
    for case in CASES:
        problem, worst = difference(hooks[case](), variant[case]())
        if problem:
            raise SystemExit(f"{name} differs from plain hooks on {case}: {problem}")
        _cases.log(f"  check {name} {case}: same values as hooks (max |diff| {worst:.2g})")


def check_cases_meaningful(raw: Jobs, hooks: Jobs, inputs: Inputs, hf: torch.nn.Module) -> None:
    """The hooks do what the cases claim: patches change the corrupted logits, the batched
    sweep matches the sequential one, the edit changes the generated tokens."""
    sequential, batched = hooks["sweep_31"](), hooks["sweep_31_batched"]()
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(sequential, batched)):
        raise SystemExit("sweep_31_batched does not match sweep_31 (rtol = atol = 1e-4)")
    corrupt = hf(**inputs.corrupt).logits[0, -1]
    unchanged = [j for j, logits in enumerate(sequential[1:]) if torch.allclose(logits[0, -1], corrupt)]
    if unchanged:
        raise SystemExit(f"patching layers {unchanged} did not change the corrupted logits")
    plain, edited = raw["generate_edit"](), hooks["generate_edit"]()
    if edited.shape != (1, inputs.tokens + NEW_TOKENS):
        raise SystemExit(f"generation gave shape {tuple(edited.shape)}, not {NEW_TOKENS} new tokens")
    if torch.equal(plain, edited):
        raise SystemExit(f"scaling layer {EDIT_LAYER} by {EDIT_SCALE} did not change the generated tokens")
    _cases.log("  check hooks: patches change the logits, batched == sequential, the edit changes tokens")


def paired_ratio(top: list[float], bottom: list[float]) -> tuple[float, float, float]:
    """Median of call-by-call ratios (same turn) and its distribution-free 95% interval."""
    ratios = sorted(t / b for t, b in zip(top, bottom))
    lo, hi = _cases.median_ci95(ratios)
    return statistics.median(ratios), lo, hi


class Rounds(_cases.Rounds):
    """``_cases.Rounds`` with a warm-up sized for calls of seconds: one untimed call per
    variant (after the value checks, which already ran each once), then one timed call to
    size the turns (``round_s`` per case and round, shared by its variants)."""

    def __init__(self, jobs: dict[str, Jobs], settings: _cases.Settings, label: str) -> None:
        self.jobs, self.settings, self.label = jobs, settings, label
        self.samples = {case: {v: [] for v in variants} for case, variants in jobs.items()}
        self.turns = {}
        for case, variants in jobs.items():
            per_turn = 0.0
            for fn in variants.values():
                fn()
                start = time.perf_counter()
                fn()
                per_turn += time.perf_counter() - start
            self.turns[case] = max(1, round(settings.round_s / per_turn))


# ---------------------------------------------------------------- this process


def model_path(name: str) -> str:
    """The checkpoint timed: ``smollm2`` or ``tiny`` (a random Llama of SmolLM2's depth)."""
    from glassbox.offline import smollm2_path, tiny_llama_path

    return str(smollm2_path() if name == "smollm2" else tiny_llama_path(n_layers=N_LAYERS))


def prepare_glassbox(settings: _cases.Settings, path: str) -> Rounds:
    from glassbox import LanguageModel

    model = LanguageModel(path, dispatch=True)
    hf = model._module
    hf.eval()
    inputs = make_inputs(model.tokenizer)
    raw, hooks = raw_cases(hf, inputs), hook_cases(hf, inputs)
    _cases.log("glassbox: checking values before timing")
    check_cases_meaningful(raw, hooks, inputs, hf)
    traced = traced_cases(model, "glassbox")
    check_variant("glassbox", hooks, traced)
    jobs = {case: {"raw": raw[case], "hooks": hooks[case], "glassbox": traced[case]} for case in CASES}
    _cases.log("glassbox: warming up")
    return Rounds(jobs, settings, "glassbox")


def run_all(settings: _cases.Settings, with_nnsight: bool, quick: bool,
            path: str) -> tuple[Rounds, dict | None]:
    # The worker prepares (loads, checks, warms up) while this process does the same; the
    # timed rounds then alternate.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = ["--model-path", path] + (["--quick"] if quick else [])
    peer = _peer.PeerProcess.launch(WORKER, args, env) if with_nnsight else None
    rounds = prepare_glassbox(settings, path)
    if peer is not None and not peer.wait_ready():
        peer = None
    for r in range(settings.rounds):
        rounds.run(r)
        if peer is not None and peer.ask({"round": r}) is None:
            peer = None
    nn = peer.ask({"results": True}) if peer is not None else None
    if peer is not None:
        peer.process.wait()
    return rounds, nn


# ---------------------------------------------------------------- report

INF = float("inf")


def build_rows(rounds: Rounds, nn: dict | None) -> list[dict[str, Any]]:
    gb = rounds.results()
    nn_results = nn["results"] if nn is not None else {}
    rows = []
    for case in CASES:
        ms = {v: gb[case][v]["median_us"] / 1e3 for v in ("raw", "hooks", "glassbox")}
        nn_ms = nn_results.get(case, {}).get("nnsight", {}).get("median_us")
        nn_raw_ms = nn_results.get(case, {}).get("raw", {}).get("median_us")
        samples = rounds.samples[case]
        rows.append({
            "case": case,
            "raw_ms": ms["raw"],
            "hooks_ms": ms["hooks"],
            "glassbox_ms": ms["glassbox"],
            "nnsight_ms": None if nn_ms is None else nn_ms / 1e3,
            "nnsight_process_raw_ms": None if nn_raw_ms is None else nn_raw_ms / 1e3,
            "hooks_over_raw": paired_ratio(samples["hooks"], samples["raw"]),
            "glassbox_over_hooks": paired_ratio(samples["glassbox"], samples["hooks"]),
            "nnsight_over_glassbox": None if nn_ms is None else nn_ms / 1e3 / ms["glassbox"],
            # load check: each process's traced median over its own raw median
            "glassbox_over_own_raw": ms["glassbox"] / ms["raw"],
            "nnsight_over_own_raw": None if nn_ms is None or not nn_raw_ms else nn_ms / nn_raw_ms,
            "n_calls": len(samples["glassbox"]),
        })
    return rows


def targets(rows: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    checks = []
    for row in rows:
        ratio, lo, hi = row["glassbox_over_hooks"]
        note = " (within noise: the 95% interval straddles the target)" if lo <= TARGET_VS_HOOKS <= hi else ""
        detail = f"{ratio:.3f}x [{lo:.3f}, {hi:.3f}]{note}"
        if row["case"] == "generate_edit":
            name = (f"generation with an edit at every step within {TARGET_VS_HOOKS:.2f}x of plain HF "
                    "generate with an equivalent hook")
        else:
            name = f"glassbox within {TARGET_VS_HOOKS:.2f}x of plain hooks ({row['case']})"
        checks.append((name, ratio <= TARGET_VS_HOOKS, detail))
    return checks


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def print_report(rows: list[dict[str, Any]], checks: list, nn: dict | None) -> None:
    print("\n## Detail (median ms per call; ratios: median of paired call-by-call ratios [95% interval])\n")
    for r in rows:
        g, h = r["glassbox_over_hooks"], r["hooks_over_raw"]
        print(f"{r['case']} ({r['n_calls']} calls per variant): raw {_fmt(r['raw_ms'])}, "
              f"hooks {_fmt(r['hooks_ms'])} ({h[0]:.3f}x raw [{h[1]:.3f}, {h[2]:.3f}]), "
              f"glassbox {_fmt(r['glassbox_ms'])} ({g[0]:.3f}x hooks [{g[1]:.3f}, {g[2]:.3f}]), "
              f"nnsight {_fmt(r['nnsight_ms'])} (its process's raw {_fmt(r['nnsight_process_raw_ms'])}; "
              f"median over own raw: nnsight {_fmt(r['nnsight_over_own_raw'], 3)}, "
              f"glassbox {_fmt(r['glassbox_over_own_raw'], 3)})")
    print("\n## Summary\n")
    print("| case | raw/HF ms | hooks ms | glassbox ms | nnsight ms | glassbox/hooks | nnsight/glassbox |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        g, nn_ratio = r["glassbox_over_hooks"], r["nnsight_over_glassbox"]
        print(f"| {r['case']} | {_fmt(r['raw_ms'])} | {_fmt(r['hooks_ms'])} | {_fmt(r['glassbox_ms'])} "
              f"| {_fmt(r['nnsight_ms'])} | {g[0]:.3f}x [{g[1]:.3f}, {g[2]:.3f}] "
              f"| {'n/a' if nn_ratio is None else f'{nn_ratio:.2f}x'} |")
    if nn is None:
        print("\n(nnsight not measured: see 'nnsight: SKIPPED' on stderr; "
              "`bash bench/setup_peers.sh` creates .venv-peers)")
    print("\n## Targets\n")
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="write every number to PATH")
    parser.add_argument("--no-nnsight", action="store_true", help="skip the nnsight subprocess")
    parser.add_argument("--model", choices=["smollm2", "tiny"],
                        help="smollm2 (the default), or tiny: a random Llama of the same layout "
                             "(the default with --quick)")
    args = parser.parse_args()
    args.model = args.model or ("tiny" if args.quick else "smollm2")

    from overhead import glassbox_source

    configure_torch()
    settings = settings_for(args.quick)
    source = glassbox_source()
    _cases.log(f"glassbox source: {source}")
    load_before = os.getloadavg()
    path = model_path(args.model)
    _cases.log(f"model: {path}")
    rounds, nn = run_all(settings, not args.no_nnsight, args.quick, path)
    load_after = os.getloadavg()
    rows = build_rows(rounds, nn)
    checks = targets(rows)

    import transformers

    print(f"glassbox source: {source}")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after (other processes add noise; compare within one run)")
    print(f"model: {os.path.basename(path)}"
          + (" (a random Llama of SmolLM2's layout: --quick checks that the bench runs, its numbers "
             "are not SmolLM2's)" if args.model == "tiny" else ""))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, grad off (no_grad)")
    if nn is not None:
        print(f"nnsight process: {nn['versions']}")
    print_report(rows, checks, nn)
    if args.json:
        document = {
            "settings": {"quick": args.quick, "model": path, **vars(settings),
                         "grad_mode": "disabled (no_grad)", "torch_threads": torch.get_num_threads(),
                         "clean": CLEAN, "corrupt": CORRUPT},
            "glassbox_source": source,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0], "nnsight_process": nn and nn["versions"]},
            "glassbox_process": rounds.results(),
            "nnsight_process": nn and nn["results"],
            "rows": rows,
            "targets": [{"target": n, "pass": ok, "value": d} for n, ok, d in checks],
            "load_average": {"before": load_before, "after": load_after},
        }
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)
        _cases.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
