"""The glassbox server: an HTTP API in front of worker processes that run remote trace bodies.

Layout (dependencies point down; nothing imports upward)::

    api/        HTTP routes, auth, live events          (the API process)
      │
    workers/    feeders, the local process, Ray replicas (claim, batch, deadline, crash)
      │             ╎ imported by name, inside the worker process only
    jobs/       the executor: one job, co-tenant batches, served models, weight integrity
      │
    sandbox/    restricted compile, runtime guards, module whitelist

    config.py   ServerConfig (every knob; drives `glassbox serve --help` and the README table)
    store.py    JobStore: the durable job queue (SQLite, or any SQLAlchemy URL), built on
                keys.py (API keys), instances.py (servers sharing a database) and database.py

Engines: a catalog model is served by transformers (``engine = "hf"``, the default: the one worker
process, ``--isolation`` as set) or by vLLM (``engine = "vllm"``: a worker process of its own per model,
started with ``vllm_python``, running jobs in itself since vLLM's threads rule out forking and
confinement; its co-tenant generation jobs share one vLLM trace. docs/vllm.md, "On a server").

``api`` and ``workers`` both use ``config`` and ``store``; ``jobs`` and ``sandbox`` know nothing
of either (a job never sees keys or the database).
"""
