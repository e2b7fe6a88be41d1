"""Models, cases and the timing loop shared by ``overhead.py`` and its workers
(``_nnsight_worker.py``, ``_glassbox_worker.py``).

Offers:
    MODELS            name -> builder returning a ``Bench`` (bare module, input, layer count)
    case_names()      the cases of one model, in table order
    raw_cases()       case -> callable: the bare forward(s) a case needs, nothing else
    hook_cases()      case -> callable: the same values with plain torch forward hooks
                      (register, forward, remove: per trace, as a user pays it)
    traced_cases()    case -> callable: the same values with an nnsight-style wrapper;
                      glassbox and nnsight run this identical code
    check_same()      are two variants' results equal (so we time equal work)?
    Rounds            interleaved rounds of every (case, variant), one round per call:
                      per-call medians and paired overheads against the raw forward, in µs
    prepare_rounds()  build the models, wrap them, check every case against plain hooks,
                      warm up: each model's Rounds of raw [, hooks] and one traced variant
    measure()         all rounds of a Rounds at once
    FULL, QUICK       repetition settings; configure_torch(): the same torch settings
                      in both processes

This file imports only torch and transformers: it runs in the glassbox virtualenv and in
the nnsight one (``.venv-peers``), so all sides build bit-identical models and inputs and
run the same trace bodies (the wrapper is passed in).

Cases (``n`` = number of layers, ``k = n // 2``):
    empty       ``with net.trace(x): pass``
    save_1      save layer k's output
    save_12     save the outputs of 12 layers spread evenly over the model
    save_all    save every layer's output (only where n != 12)
    patch_1     zero layer k's output in place and save the model's output
    sweep_31    31 traces: one clean (save the output), then trace j = 1..30 zeroes layer
                (j - 1) % n and saves the output. On the 30-layer GPT-2 that is the classic
                clean-plus-every-layer sweep; on the 12-layer MLP it cycles the layers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

SWEEP_TRACES = 31


@dataclass
class Bench:
    name: str
    module: torch.nn.Module
    x: torch.Tensor
    n_layers: int
    layers: Callable[[Any], Any]  # wrapped net (or bare module) -> its container of layers
    description: str


def build_mlp() -> Bench:
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)]).eval()
    x = torch.randn(8, 64)
    return Bench("mlp12", module, x, 12, lambda net: net, "12 x Linear(64, 64), no ReLU, batch 8")


def build_gpt2() -> Bench:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=30, n_embd=64, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    module = GPT2LMHeadModel(config).eval()
    x = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    return Bench(
        "gpt2-tiny30", module, x, 30, lambda net: net.transformer.h,
        "GPT2LMHeadModel n_layer=30 n_embd=64 n_head=4 vocab=1000, input_ids [1, 16]",
    )


MODELS: dict[str, Callable[[], Bench]] = {"mlp12": build_mlp, "gpt2-tiny30": build_gpt2}


def case_names(bench: Bench) -> list[str]:
    names = ["empty", "save_1", "save_12"]
    if bench.n_layers != 12:
        names.append("save_all")
    return [*names, "patch_1", f"sweep_{SWEEP_TRACES}"]


def _spread(n_layers: int, count: int) -> list[int]:
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def _plan(bench: Bench) -> dict[str, Any]:
    n = bench.n_layers
    return {
        "save_1": [n // 2],
        "save_12": _spread(n, 12),
        "save_all": list(range(n)),
        "patch": n // 2,
        "sweep": [None] + [(j - 1) % n for j in range(1, SWEEP_TRACES)],
    }


def as_tensor(value: Any) -> Any:
    """Model outputs: GPT-2 returns a ModelOutput; compare its logits."""
    return value.logits if hasattr(value, "logits") else value


# ---------------------------------------------------------------- variants


def raw_cases(bench: Bench) -> dict[str, Callable[[], Any]]:
    module, x = bench.module, bench.x

    def forward() -> Any:
        return module(x)

    def sweep() -> Any:
        return [module(x) for _ in range(SWEEP_TRACES)]

    return {name: (sweep if name.startswith("sweep") else forward) for name in case_names(bench)}


def hook_cases(bench: Bench) -> dict[str, Callable[[], Any]]:
    module, x, plan = bench.module, bench.x, _plan(bench)
    layers = bench.layers(module)

    def save(indices: list[int]) -> Callable[[], Any]:
        mods = [layers[i] for i in indices]

        def run() -> Any:
            store: list[Any] = []

            def hook(_module: Any, _args: Any, output: Any) -> None:
                store.append(output)

            handles = [m.register_forward_hook(hook) for m in mods]
            try:
                module(x)
            finally:
                for handle in handles:
                    handle.remove()
            return store

        return run

    def zero_hook(_module: Any, _args: Any, output: Any) -> None:
        output[:] = 0

    def patched(layer: int | None) -> Any:
        if layer is None:
            return module(x)
        handle = layers[layer].register_forward_hook(zero_hook)
        try:
            return module(x)
        finally:
            handle.remove()

    def sweep() -> Any:
        return [patched(layer) for layer in plan["sweep"]]

    cases: dict[str, Callable[[], Any]] = {
        "empty": lambda: module(x),
        "save_1": save(plan["save_1"]),
        "save_12": save(plan["save_12"]),
        "save_all": save(plan["save_all"]),
        "patch_1": lambda: patched(plan["patch"]),
        f"sweep_{SWEEP_TRACES}": sweep,
    }
    return {name: cases[name] for name in case_names(bench)}


def traced_cases(bench: Bench, net: Any) -> dict[str, Callable[[], Any]]:
    """Trace bodies written as a user writes them; ``net`` is a glassbox or nnsight wrapper."""
    x, plan = bench.x, _plan(bench)
    layers = bench.layers(net)

    def empty() -> Any:
        with net.trace(x):
            pass
        return None

    def save(indices: list[int]) -> Callable[[], Any]:
        def run() -> Any:
            saved = []
            with net.trace(x):
                for i in indices:
                    saved.append(layers[i].output.save())
            return saved

        return run

    def patched(layer: int | None) -> Any:
        if layer is None:
            with net.trace(x):
                out = net.output.save()
            return out
        with net.trace(x):
            layers[layer].output[:] = 0
            out = net.output.save()
        return out

    def sweep() -> Any:
        return [patched(layer) for layer in plan["sweep"]]

    cases: dict[str, Callable[[], Any]] = {
        "empty": empty,
        "save_1": save(plan["save_1"]),
        "save_12": save(plan["save_12"]),
        "save_all": save(plan["save_all"]),
        "patch_1": lambda: patched(plan["patch"]),
        f"sweep_{SWEEP_TRACES}": sweep,
    }
    return {name: cases[name] for name in case_names(bench)}


def check_same(case: str, expected: Any, got: Any) -> str | None:
    """None if ``got`` holds the same tensors as ``expected``, else what differs."""
    if case == "empty":
        return None
    if not isinstance(expected, list):
        expected, got = [expected], [got]
    if not isinstance(got, list) or len(got) != len(expected):
        return f"{case}: expected {len(expected)} values, got {type(got).__name__} {got!r:.80}"
    for i, (a, b) in enumerate(zip(expected, got)):
        a, b = as_tensor(a), as_tensor(b)
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or not torch.allclose(a, b, atol=1e-6):
            return f"{case}: value {i} differs ({type(b).__name__})"
    return None


# ---------------------------------------------------------------- timing


@dataclass
class Settings:
    rounds: int
    round_s: float  # time each case gets per round, shared by its variants
    warmup_s: float


FULL = Settings(rounds=50, round_s=0.3, warmup_s=0.3)
QUICK = Settings(rounds=4, round_s=0.03, warmup_s=0.05)
BASELINE = "raw"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    n = len(ordered)

    def q(p: float) -> float:
        return ordered[min(n - 1, round(p * (n - 1)))]

    return q(0.25), q(0.5), q(0.75)


def median_ci95(samples: list[float]) -> tuple[float, float]:
    """Distribution-free 95% confidence interval of the median (binomial order statistics)."""
    ordered = sorted(samples)
    n = len(ordered)
    k = max(0, int(n / 2 - 0.98 * n**0.5))
    return ordered[k], ordered[n - 1 - k]


class Rounds:
    """Time ``jobs[case][variant]()`` one call at a time, one round per ``run(r)``.

    Every round visits every case; within a case the variants are called in turn, one call
    each, in an order rotated at every turn, so machine drift (this box is shared) hits all
    variants alike. Rounds are separate calls so that two processes can take turns round by
    round (``overhead.py`` alternates with the nnsight worker) and see the same load.

        rounds = Rounds({"empty": {"raw": f, "glassbox": g}}, QUICK, "demo")
        for r in range(QUICK.rounds): rounds.run(r)
        rounds.results()["empty"]["glassbox"]["overhead_us"]
    """

    def __init__(self, jobs: dict[str, dict[str, Callable[[], Any]]], settings: Settings, label: str):
        self.jobs, self.settings, self.label = jobs, settings, label
        self.samples = {case: {v: [] for v in variants} for case, variants in jobs.items()}
        self.turns: dict[str, int] = {}
        perf = time.perf_counter
        for case, variants in jobs.items():
            per_turn = 0.0
            for fn in variants.values():
                fn()  # first call: compile / cache whatever the variant caches
                start, calls = perf(), 0
                while calls < 3 or perf() - start < settings.warmup_s:
                    fn()
                    calls += 1
                per_turn += (perf() - start) / calls
            self.turns[case] = max(1, min(2000, round(settings.round_s / per_turn)))

    def run(self, r: int) -> None:
        if r % 10 == 0 or r == self.settings.rounds - 1:
            log(f"  {self.label}: round {r + 1}/{self.settings.rounds}")
        perf = time.perf_counter
        for case, variants in self.jobs.items():
            order = list(variants.items())
            out, turns = self.samples[case], self.turns[case]
            for turn in range(turns):
                shift = (r * turns + turn) % len(order)
                for variant, fn in order[shift:] + order[:shift]:
                    t0 = perf()
                    fn()
                    out[variant].append((perf() - t0) * 1e6)

    def results(self) -> dict[str, dict[str, dict[str, float]]]:
        """case -> variant -> median and quartiles of the calls (µs) and, except for the
        ``raw`` baseline, ``overhead_us``: the median of paired differences, each call minus
        the raw call of the same turn (robust to slow drift), with its 95% interval."""
        result: dict[str, dict[str, dict[str, float]]] = {}
        for case, by_variant in self.samples.items():
            base = by_variant.get(BASELINE)
            for variant, values in by_variant.items():
                p25, p50, p75 = _quartiles(values)
                stats = {"median_us": p50, "p25_us": p25, "p75_us": p75, "n": len(values)}
                if base is not None and variant != BASELINE:
                    diffs = [v - b for v, b in zip(values, base)]
                    o25, o50, o75 = _quartiles(diffs)
                    lo, hi = median_ci95(diffs)
                    stats.update(overhead_us=o50, overhead_p25_us=o25, overhead_p75_us=o75,
                                 overhead_ci95_lo_us=lo, overhead_ci95_hi_us=hi)
                result.setdefault(case, {})[variant] = stats
        return result


def measure(
    jobs: dict[str, dict[str, Callable[[], Any]]], settings: Settings, label: str
) -> dict[str, dict[str, dict[str, float]]]:
    """All rounds of ``Rounds(jobs, settings, label)`` in one go; its results."""
    rounds = Rounds(jobs, settings, label)
    for r in range(settings.rounds):
        rounds.run(r)
    return rounds.results()


def prepare_rounds(
    models: list[str], settings: Settings, wrap: Callable[[torch.nn.Module], Any], variant: str,
    with_hooks: bool = False,
) -> tuple[dict[str, Rounds], dict[str, int]]:
    """For each model: wrap it (``wrap``: glassbox's or nnsight's ``NNsight``), check that every
    traced case equals plain hooks' and that patch_1 changes the output (equal work is timed),
    warm up. Returns each model's Rounds of ``raw``, ``hooks`` (if ``with_hooks``) and
    ``variant``, and each model's layer count."""
    prepared: dict[str, Rounds] = {}
    layer_counts: dict[str, int] = {}
    for name in models:
        bench = MODELS[name]()
        layer_counts[name] = bench.n_layers
        log(f"{variant}: {name}: {bench.description}")
        raw, hooks = raw_cases(bench), hook_cases(bench)
        traced = traced_cases(bench, wrap(bench.module))
        for case, fn in traced.items():
            expected = hooks[case]()
            problem = check_same(case, expected, fn())
            if case == "patch_1" and check_same(case, raw[case](), expected) is None:
                problem = "patch_1: zeroing a layer did not change the output"
            if problem:
                raise SystemExit(f"{variant}: result differs from plain hooks: {name} {problem}")
        jobs = {case: {"raw": raw[case], **({"hooks": hooks[case]} if with_hooks else {}), variant: fn}
                for case, fn in traced.items()}
        prepared[name] = Rounds(jobs, settings, f"{variant} {name}")
    return prepared, layer_counts


def configure_torch() -> None:
    """Same settings in both processes: one intra-op thread (less noise on 2 cores),
    default grad mode (what a user's trace runs under)."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(True)
