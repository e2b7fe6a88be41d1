"""Trace bodies are ordinary Python: -c, exec, functions, lambdas, pdb."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

import glassbox
from waiting import HANG

SCRIPT_HEAD = """
import torch, glassbox
torch.manual_seed(0)
seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
net = glassbox.NNsight(seq)
x = torch.randn(3, 4)
"""


def _run_python(args, stdin=None):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, env=env, timeout=HANG
    )


def test_trace_in_python_dash_c():
    code = SCRIPT_HEAD + textwrap.dedent("""
        with net.trace(x):
            net[1].output[:] = 0
            out = net.output.save()
        assert torch.allclose(out, seq[2].bias.expand(3, 2))
        print("OK")
    """)
    result = _run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_invokes_without_source_fall_back_to_separate_forwards():
    code = SCRIPT_HEAD + textwrap.dedent("""
        with net.trace() as tracer:
            with tracer.invoke(x[:1]):
                a = net[0].output.save()
            with tracer.invoke(x[1:]):
                net[0].output[:] = a
                b = net.output.save()
        with net.trace(x[:1]):
            ref = net.output.save()
        assert torch.allclose(b, ref.expand(2, 2)), (b, ref)
        print("OK")
    """)
    result = _run_python(["-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


def test_trace_in_exec_string(net, x):
    namespace = {"net": net, "x": x}
    exec(
        "with net.trace(x):\n    h = net[0].output.save()\n",
        namespace,
    )
    assert torch.allclose(namespace["h"], net._module[0](x))


def test_trace_in_nested_function_and_lambda(net, x):
    def outer():
        scale = 3.0

        def inner():
            with net.trace(x):
                h = net[0].output * scale
                saved = h.save()
            return saved

        return inner()

    get_first = lambda: [net[0].output.save() for _ in range(1)]  # noqa: E731

    with net.trace(x):
        from_lambda = get_first()[0]
    assert torch.allclose(outer(), net._module[0](x) * 3)
    assert torch.allclose(from_lambda, net._module[0](x))


def test_pdb_breakpoint_inside_trace(tmp_path):
    script = tmp_path / "with_breakpoint.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent("""
        with net.trace(x):
            h = net[0].output.save()
            breakpoint()
            net[1].output[:] = 0
        print("shape", tuple(h.shape))
    """))
    result = _run_python([str(script)], stdin="p tuple(h.shape)\nc\n")
    assert result.returncode == 0, result.stderr
    assert "(Pdb)" in result.stdout
    assert "(3, 4)" in result.stdout.split("(Pdb)")[1]
    assert "shape (3, 4)" in result.stdout


def test_pdb_breakpoint_inside_invoke(tmp_path):
    script = tmp_path / "invoke_breakpoint.py"
    script.write_text(SCRIPT_HEAD + textwrap.dedent("""
        with net.trace() as tracer:
            with tracer.invoke(x):
                h = net[0].output.save()
                breakpoint()
        print("done", tuple(h.shape))
    """))
    result = _run_python([str(script)], stdin="p h.shape[0]\nc\n")
    assert result.returncode == 0, result.stderr
    assert "3" in result.stdout.split("(Pdb)")[1]
    assert "done (3, 4)" in result.stdout


def test_torch_grad_mode_is_kept_per_side(net, x):
    with net.trace(x):
        with torch.no_grad():
            # the model resumes under ITS grad mode (enabled), not the body's
            later = net[2].output
            body_value = later * 2
        out = net.output.save()
    assert later.requires_grad and out.requires_grad
    assert not body_value.requires_grad
    with torch.no_grad(), net.trace(x):
        with torch.enable_grad():
            frozen = net[2].output
    assert not frozen.requires_grad
    assert glassbox.NNsight  # the package under test
