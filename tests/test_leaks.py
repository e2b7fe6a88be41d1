"""Nothing outlives a trace but the saved values; memory stays flat."""

from __future__ import annotations

import gc
import threading
import weakref

import greenlet
import psutil
import torch

import glassbox


def _live_greenlets():
    gc.collect()
    return [g for g in gc.get_objects() if type(g) is greenlet.greenlet and not g.dead]


def test_unsaved_activations_are_freed(net, x):
    refs = []
    with torch.no_grad(), net.trace(x):  # no autograd graph holding activations
        refs.append(weakref.ref(net[0].output))
        refs.append(weakref.ref(net[2].output))
        kept = net[4].output.save()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert kept.shape == (2, 8)


def test_only_saved_values_stay_alive(net, x):
    def run():
        with net.trace(x) as tracer:
            first = net[0].output
            ref_first = weakref.ref(first)
            del first
            kept = net[4].output.save()
        return ref_first, kept, tracer

    ref_first, kept, tracer = run()
    gc.collect()
    assert ref_first() is None
    assert kept.shape == (2, 8)
    assert tracer._interleaver is None


def test_no_greenlets_or_frames_left(net, x):
    before = len(_live_greenlets())
    for _ in range(3):
        with net.trace() as tracer:
            with tracer.invoke(x[:1]):
                net[2].output.save()
            with tracer.invoke(x[1:]):
                net[4].output
    try:
        with net.trace(x):
            net[4].output
            raise RuntimeError("interrupt a paused model")
    except RuntimeError:
        pass
    # pooled runners (at most 4 per thread) may remain parked; nothing else
    assert len(_live_greenlets()) - before <= 1


def test_thousand_traces_hold_memory_flat(net, x):
    process = psutil.Process()

    def burst():
        for _ in range(1000):
            with net.trace(x):
                net[2].output[:] = 0
                net.output.save()

    burst()
    gc.collect()
    start = process.memory_info().rss
    burst()
    gc.collect()
    grown = process.memory_info().rss - start
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 traces"


def test_two_threads_two_models():
    torch.manual_seed(3)
    models = [glassbox.NNsight(torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh())) for _ in range(2)]
    inputs = [torch.randn(4, 5), torch.randn(4, 5)]
    expected = [m._module[0](i) for m, i in zip(models, inputs)]
    errors, results = [], [[], []]
    barrier = threading.Barrier(2)

    def work(k):
        try:
            barrier.wait()
            for _ in range(200):
                with models[k].trace(inputs[k]):
                    results[k].append(models[k][0].output.save())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in range(2):
        assert len(results[k]) == 200
        assert all(torch.allclose(r, expected[k]) for r in results[k])
