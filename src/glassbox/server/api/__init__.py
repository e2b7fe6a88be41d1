"""The HTTP API process: routes, authentication, live job events.

    app.py            create_app: wires the routes, the store, the hub and the worker pool
    auth.py           API keys as a FastAPI dependency; the per-key rate limiter
    hub.py            Hub: live job events fanned out to websocket listeners
    jobs_routes.py    /v1/jobs...: submit, list, status, events (websocket), result, cancel
    models_routes.py  /v1/health, /v1/models, /v1/models/{name}/files

May import: ``server.config``, ``server.store``, ``server.workers`` (the pool), the remote
framing and protocol. Never imports ``server.jobs`` (except through the pool) or the sandbox:
the API process holds keys and the database, and runs no user code.
"""
