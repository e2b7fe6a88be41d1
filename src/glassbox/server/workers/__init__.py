"""Where jobs run: feeders that take jobs from the store, and the processes that run them.

    pool.py          WorkerPool: every feeder of a server (one local, or one per Ray replica)
    feeder.py        Feeder: claim, batch, deadline, cancel, crash retries, for any channel
    channel.py       the Channel contract, its errors, error results
    local.py         the local backend: one spawned worker process (LocalProcess, worker_main)
    ray_replicas.py  the Ray backend: one actor per replica (RayBackend, RayReplica, GlassboxReplica)
    child.py         inside a worker process or actor: load the executor, run messages, limits
    forked.py        a fresh process per job or batch, forked from the local worker (isolation)
    confine.py       Landlock + seccomp for the processes that run user code

May import: ``server.config``, ``server.store``, ``server.jobs.batchable`` (API side), the
remote framing and protocol. The executor (``server.jobs.executor`` by default) is imported by
NAME inside the worker process only, so the API process never loads it.
"""
