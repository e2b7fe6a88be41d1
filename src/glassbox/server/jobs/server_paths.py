"""Server paths out of what a user is told: errors and warnings must not say where the server keeps
its models, packages or files.

Offers:
    without_server_paths(message) -> str   every absolute filesystem path replaced by SERVER_PATH
    SERVER_PATH                            "<server path>"
"""

from __future__ import annotations

import re

__all__ = ["SERVER_PATH", "without_server_paths"]

SERVER_PATH = "<server path>"
# A quoted absolute path (it may hold spaces): 'No such file: "/srv/my models/x"', File "/a/b.py".
_QUOTED_PATH = re.compile(r"""(?P<q>['"])/(?=[^\s'"/])[^'"\n]*(?P=q)""")
# An unquoted one: "/" starting a name (not a digit: "x /2"), not after a word, a dot, a colon or
# another slash, so "1/2", "a/b", "x.y/z" and URLs ("https://host/a") are left alone.
_BARE_PATH = re.compile(r"(?<![\w.:/~\\-])/[A-Za-z_.@+~-][\w.@+~=%-]*(?:/[\w.@+~=%-]+)*/?")
_FILE_URL = re.compile(r"file://[^\s'\",;]*")


def without_server_paths(message: str) -> str:
    """``message`` with every absolute filesystem path replaced by ``<server path>``: an error
    sent to a user must not tell where the server keeps its models, packages or files.

        without_server_paths("No such file: '/srv/models/gpt2/x.bin'")   # "No such file: '<server path>'"
    """
    message = _FILE_URL.sub(_unquoted, message)
    message = _QUOTED_PATH.sub(lambda m: m["q"] + SERVER_PATH + m["q"], message)
    return _BARE_PATH.sub(_unquoted, message)


def _unquoted(match: re.Match) -> str:
    # A sentence's full stop or colon after a path is not part of it: "... in /srv/x." keeps its "."
    path = match.group()
    return SERVER_PATH + path[len(path.rstrip(".:")):]
