"""Running jobs inside a worker: the executor contract and the default executor.

    executor.py    the default executor (``--executor`` default; the contract: remote/executor.py)
    execute.py     one job: decode, compile under the sandbox, trace, reply
    job_warnings.py  the warnings a block raised at its own lines, carried back to the client
    server_paths.py  server paths out of errors and warnings
    cotenant.py    several jobs in ONE forward pass, each on its own rows
    batchable.py   which requests may share a pass (runs in the API process; no torch models)
    served.py      the served models: hand out, verify and restore after each job
    loading.py     load and evict served models (read-only weights, paths hidden)
    inprocess.py   ``remote="local"``: one job run in the client's process, as a worker runs it
    integrity.py   WeightGuard: keyed weight checksums, snapshot and restore
    sealed.py      read-only weights: CPU parameters in mprotect(PROT_READ) memory
    weights_file.py  one read-only weights file shared by a machine's replicas (--share-weights)

May import: ``glassbox`` (the tracing core, models, remote protocol), ``server.sandbox``.
Never imports ``server.api`` or ``server.workers``: workers call into jobs, not the reverse.
"""
