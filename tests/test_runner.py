"""The pooled runner greenlet: reused across traces, never holding a task's values."""

from __future__ import annotations

import gc
import weakref

import greenlet
import torch

from glassbox import runner


def test_traces_reuse_one_parked_runner(net, x):
    with net.trace(x):
        net[0].output.save()
    first = runner._pool.idle[-1]
    for _ in range(5):
        with net.trace(x):
            net[2].output.save()
    assert runner._pool.idle[-1] is first and len(runner._pool.idle) <= 4


def test_a_parked_runner_holds_no_activations(net, x):
    with torch.no_grad(), net.trace(x):
        ref = weakref.ref(net[2].output)
    gc.collect()
    assert ref() is None
    assert all(r.outcome is None and r.driver is None for r in runner._pool.idle)


def test_a_task_is_run_and_its_outcome_handed_back_once():
    worker = runner.acquire_runner()
    worker.driver = greenlet.getcurrent()  # who gets control back when the task ends
    assert worker.glet.switch(lambda: 41 + 1) is runner.TASK_ENDED
    assert worker.take_outcome() == ("done", 42) and worker.outcome is None
    runner.release_runner(worker)
