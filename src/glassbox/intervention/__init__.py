"""nnsight's module path ``nnsight.intervention``, so ported imports keep working with ``glassbox``
in place of ``nnsight``.

    envoy.Envoy                    glassbox.Envoy
    interleaver.OutOfOrderError    glassbox.OutOfOrderError
    interleaver.{Interleaver, Mediator, Event, Pending, EarlyStopException},
    barrier.Barrier, eproperty.eproperty
                                   stand-ins (_absent.py): importable, and any use raises
                                   NotImplementedError saying what glassbox does instead

Import rule: each module re-exports glassbox's own objects (from the modules above this package)
or makes a stand-in; nothing in glassbox imports this package. Only the paths that ported code
imports are mirrored (nnsight 0.8.1's own tests: bench/nnsight_suite.sh).
"""
