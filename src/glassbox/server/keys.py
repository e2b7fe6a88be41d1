"""API keys: created once (only their sha256 is stored), authenticated, listed, revoked.

Offers:
    KeyStore(url)          the key half of ``store.JobStore`` (which is what servers and tools open)
      .create_key(name, operator=False) -> (KeyInfo, key)   the key is shown once, in the return value
      .list_keys(include_revoked=True) / .revoke_key(name_or_id) / .authenticate(key) -> KeyInfo | None
    KeyInfo                a plain snapshot of a key (no live database row leaks out)
    hash_key(key)          what is stored of a key

    store = JobStore("sqlite:///tmp/glassbox.db")
    info, key = store.create_key("alice")
    assert store.authenticate(key).name == "alice"
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, Float, String, false, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column

from .database import Database, TableBase

__all__ = ["KeyInfo", "KeyStore", "hash_key"]

KEY_PREFIX = "gbx_"


def hash_key(key: str) -> str:
    # Keys are 256 random bits, so a plain (unsalted, fast) hash cannot be brute-forced and
    # lets authentication be one indexed lookup.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class _ApiKey(TableBase):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[float] = mapped_column(Float)
    revoked: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Operators see every tenant's queue and replicas on the dashboard (never their code or values).
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created: float
    revoked: float | None
    operator: bool = False  # sees the whole server on the dashboard


def _key_info(row: Any, **changed: Any) -> KeyInfo:
    """A key as read (a row of api_keys), with ``changed`` columns as just written."""
    values = {**row._asdict(), **changed}
    return KeyInfo(values["id"], values["name"], values["created"], values["revoked"],
                   bool(values["operator"]))


class KeyStore(Database):
    """The API keys in the database at ``url`` (see the module docstring).

        keys = KeyStore("sqlite://")
        info, key = keys.create_key("bob", operator=True)
        assert keys.authenticate(key).operator
    """

    def create_key(self, name: str, *, operator: bool = False) -> tuple[KeyInfo, str]:
        """A new key for ``name`` (an operator's with ``operator``); the plain key is only ever in
        the return value."""
        name = name.strip()
        if not name:
            raise ValueError("a key needs a name (who or what uses it)")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        info = KeyInfo(secrets.token_hex(6), name, time.time(), None, bool(operator))
        with self._session() as session:
            session.execute(insert(_ApiKey).values(id=info.id, name=info.name, key_hash=hash_key(key),
                                                   created=info.created, operator=info.operator))
        return info, key

    def list_keys(self, include_revoked: bool = True) -> list[KeyInfo]:
        with self._session() as session:
            query = select(_ApiKey).order_by(_ApiKey.created)
            if not include_revoked:
                query = query.where(_ApiKey.revoked.is_(None))
            return [_key_info(row) for row in session.execute(query)]

    def revoke_key(self, name_or_id: str) -> list[KeyInfo]:
        """Revoke the key with this id, else every active key with this name; returns those revoked."""
        with self._session() as session:
            rows = session.execute(select(_ApiKey).where(_ApiKey.id == name_or_id,
                                                         _ApiKey.revoked.is_(None))).all()
            if not rows:
                rows = session.execute(select(_ApiKey).where(_ApiKey.name == name_or_id,
                                                             _ApiKey.revoked.is_(None))).all()
            now = time.time()
            revoked = [row.id for row in rows]
            session.execute(update(_ApiKey).where(_ApiKey.id.in_(revoked)).values(revoked=now))
            return [_key_info(row, revoked=now) for row in rows]

    def authenticate(self, key: str | None) -> KeyInfo | None:
        if not key:
            return None
        with self._session() as session:
            row = session.execute(select(_ApiKey).where(_ApiKey.key_hash == hash_key(key),
                                                        _ApiKey.revoked.is_(None))).first()
            return _key_info(row) if row is not None else None
