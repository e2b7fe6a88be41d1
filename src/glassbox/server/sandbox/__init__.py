"""The in-process sandbox remote code runs under (one layer of the server's isolation).

    compile.py     RestrictedPython transformer, ``compile_restricted_source``, ``make_globals``;
                   the policy, written out with the reasons for each rule
    guards.py      the runtime guards the compiled code calls (attribute, item, write, import)
    whitelist.py   the modules remote code may import, as read-only views

May import: ``glassbox`` (envoys, errors, the remote protocol's RemoteFunction). Imports nothing
else of ``server``.
"""
