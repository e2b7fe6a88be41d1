"""Fixtures for the server tests: ``postgres``, one private PostgreSQL server for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from postgres import PostgresServer, Unavailable, start_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL server (see ``postgres.py``); its tests skip, saying why, without one."""
    try:
        server = start_postgres()
    except Unavailable as why:
        pytest.skip(f"no PostgreSQL for the tests: {why}")
    try:
        yield server
    finally:
        server.stop()
