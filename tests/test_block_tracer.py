"""The block tracer (glassbox.tracing.tracer.Tracer, nnsight 0.8's model-less Tracer) and custom
backends, plus what building it found in the capture every deferred block uses: a thread's own
tracer (a debugger's, coverage's) survives a skipped block, a block opening with ``try:`` is
refused instead of leaving the function, and ``python -c`` programs have their blocks' source."""

from __future__ import annotations

import linecache
import os
import subprocess
import sys
import textwrap
import traceback

import pytest
import torch

import glassbox
from glassbox.errors import TraceStateError, WithBlockNotFoundError
from glassbox.tracing.backend import Backend
from glassbox.tracing.globals import BLOCKS
from glassbox.tracing.tracer import Tracer, save

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


class Twice(Backend):
    """Runs the block twice and remembers where it came from."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, tracer: Tracer) -> None:
        self.seen.append((tracer.info.code.co_filename, tracer.info.code.co_name))
        super().__call__(tracer)
        super().__call__(tracer)


class Nowhere(Backend):
    def __call__(self, tracer: Tracer) -> None:
        pass  # e.g. a dry run: the block never runs


@pytest.fixture
def net() -> glassbox.NNsight:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    return glassbox.NNsight(module)


def test_the_block_runs_once_through_the_default_backend_and_its_names_are_the_callers():
    calls = []
    base = 4
    with Tracer() as tracer:
        calls.append("ran")
        doubled = save(base * 2)  # saving is allowed in a block tracer, as in a session
        base = 1
    assert calls == ["ran"] and doubled == 8 and base == 1
    assert tracer.info.frame is None  # released at exit: a kept tracer pins no frame
    assert tracer.info.code.co_name == sys._getframe().f_code.co_name  # the caller's, for tracebacks


def test_a_custom_backend_decides_how_the_block_runs(net):
    runs = []
    backend = Twice()
    x = torch.ones(1, 3)
    with Tracer(backend=backend):
        with net.trace(x):  # a model trace inside the captured block runs as usual
            runs.append(net[0].output.save())
    assert len(runs) == 2 and torch.equal(runs[0], runs[1]) and torch.equal(runs[0], net._module[0](x))
    assert backend.seen == [(__file__, "test_a_custom_backend_decides_how_the_block_runs")]
    with Tracer(backend=Nowhere()):
        never = 1
    assert "never" not in locals()


def test_blocks_are_compiled_once_per_site():
    codes = []
    for _ in range(3):
        with Tracer() as tracer:
            pass_through = 1  # noqa: F841
        codes.append(tracer.info.code)
    assert codes[0] is codes[1] is codes[2]
    key = next(k for k in BLOCKS if k[2] == "test_blocks_are_compiled_once_per_site")
    assert BLOCKS[key][1] is codes[0]


def test_an_error_in_the_block_points_at_the_users_line():
    with pytest.raises(KeyError) as caught:
        with Tracer():
            table = {}
            table["missing"]
    last = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert last.filename == __file__ and last.line == 'table["missing"]'
    assert caught.value.__context__ is None  # not "while handling" the skip


def test_shapes_that_cannot_be_skipped_are_refused_before_anything_runs():
    ran = []
    with pytest.raises(TraceStateError, match="own line"):
        with Tracer(): ran.append(1)  # noqa: E701
    with pytest.raises(TraceStateError, match="cannot start with `try:`"):
        with Tracer():
            try:
                ran.append(2)
            except KeyError:
                pass
    assert ran == []


def test_a_call_that_is_not_a_with_block_says_why():
    with pytest.raises(WithBlockNotFoundError, match="no `with` block starts at"):
        Tracer().capture()
    namespace = {"Tracer": Tracer}
    with pytest.raises(WithBlockNotFoundError, match="no source for <made up>"):
        exec(compile("with Tracer():\n    x = 1\n", "<made up>", "exec"), namespace)
    source = "with Tracer():\n    x = 6 * 7\n"  # the remedy the message names: register it
    linecache.cache["<registered>"] = (len(source), None, source.splitlines(True), "<registered>")
    try:
        exec(compile(source, "<registered>", "exec"), namespace)
    finally:
        linecache.cache.pop("<registered>", None)
    assert namespace["x"] == 42


def test_a_threads_own_tracer_survives_invokes_and_block_tracers(net):
    # a debugger or coverage owns sys.settrace; skipping a block borrows it and gives it back
    # (CPython unsets tracing when a trace function raises, which the skip does)
    def own_tracer(frame, event, arg):
        return None

    previous = sys.gettrace()
    sys.settrace(own_tracer)
    try:
        with net.trace() as tracer:
            with tracer.invoke(torch.ones(1, 3)):
                out = net.output.save()
        after_invoke = sys.gettrace()
        with Tracer():
            value = save(1)
        after_block = sys.gettrace()
    finally:
        sys.settrace(previous)
    assert after_invoke is own_tracer and after_block is own_tracer
    assert out.shape == (1, 2) and value == 1


def test_an_invoke_opening_with_try_is_refused_and_the_model_stays_clean(net):
    x = torch.ones(1, 3)

    def ported():
        with net.trace() as tracer:
            with tracer.invoke(x):
                try:
                    net.output.save()
                except KeyError:
                    pass

    with pytest.raises(TraceStateError, match="cannot start with `try:`"):
        ported()  # before: the skip left the whole function, with no error and nothing run
    with net.trace(x):
        out = net.output.save()
    assert torch.equal(out, net._module(x)) and "forward" not in net._module[0].__dict__


def test_python_dash_c_programs_batch_their_invokes_and_run_block_tracers():
    program = textwrap.dedent("""\
        import torch, glassbox
        from glassbox.tracing.tracer import Tracer, save
        torch.manual_seed(0)
        net = glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        widths = []
        net._module[0].register_forward_hook(lambda m, i, o: widths.append(o.shape[0]))
        with net.trace() as tracer:
            with tracer.invoke(torch.ones(1, 3)):
                a = net.output.save()
            with tracer.invoke(torch.zeros(1, 3)):
                b = net.output.save()
        with Tracer():
            answer = save(6 * 7)
        print(widths, tuple(a.shape), tuple(b.shape), answer)
    """)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=SRC), check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == "[2] (1, 2) (1, 2) 42"  # ONE forward of both rows


class Logged(Backend):
    def __init__(self) -> None:
        self.log: list[str] = []

    def __call__(self, tracer: Tracer) -> None:
        self.log.append(f"running {tracer.info.code.co_name}")
        super().__call__(tracer)  # once: a model trace's modules run once per forward
        self.log.append("done")


def test_a_model_trace_hands_its_block_to_a_backend(net):
    x = torch.ones(2, 3)
    backend = Logged()
    with net.trace(x, backend=backend) as tracer:
        hidden = net[0].output.save()
        net[2].output[:] = 0
    assert backend.log == ["running test_a_model_trace_hands_its_block_to_a_backend", "done"]
    assert torch.equal(hidden, net._module[0](x)) and torch.count_nonzero(tracer.result) == 0
    assert tracer.info.frame is None and "forward" not in net._module[0].__dict__

    with net.trace(x, backend=Nowhere()) as tracer:  # nothing asked for: the model still runs
        skipped = net[0].output.save()
    assert "skipped" not in locals() and torch.equal(tracer.result, net._module(x))

    with pytest.raises(KeyError, match="inside") as caught:
        with net.trace(x, backend=Backend()):
            net[0].output.save()
            raise KeyError("inside")
    assert caught.value.__context__ is None  # raised as the block raised it, not "while skipping"
    with net.trace(x):  # the failed trace left the model clean
        assert torch.equal(net.output.save(), net._module(x))
    with pytest.raises(ValueError, match="backend="):
        net.trace(x, backend=Backend(), remote=True)
