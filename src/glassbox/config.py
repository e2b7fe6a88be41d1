"""Client settings: where remote traces go and how they report progress.

Offers:
    CONFIG   a process-wide Config; change its attributes in code, or set
             GLASSBOX_HOST / GLASSBOX_API_KEY / GLASSBOX_STATUS in the
             environment, or put ``host = ...`` / ``api_key = ...`` lines in
             ``~/.config/glassbox/config`` (environment wins over the file,
             assignments in code win over both).

        from glassbox import CONFIG
        CONFIG.HOST = "http://127.0.0.1:8765"
        CONFIG.API_KEY = "gbk_..."

nnsight 0.8's names work too, as views of the same settings: ``CONFIG.API.HOST``,
``CONFIG.API.APIKEY`` (= ``API_KEY``), ``CONFIG.APP.REMOTE_LOGGING`` (= ``STATUS``),
``CONFIG.APP.DEBUG`` (keep glassbox's own frames in a trace error's traceback; env
GLASSBOX_DEBUG), ``CONFIG.set_default_api_key(key)`` (sets it and writes it to the config
file). ``CONFIG.API.COMPRESS``, ``CONFIG.APP.PYMOUNT`` and ``CONFIG.APP.DISABLE_CPP_BACKTRACE``
are accepted and change nothing here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _path() -> Path:
    return Path(os.environ.get("GLASSBOX_CONFIG", Path.home() / ".config" / "glassbox" / "config"))


def _file_settings() -> dict[str, str]:
    path = _path()
    settings: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.strip().startswith("#"):
                settings[key.strip().lower()] = value.strip()
    return settings


def _flag(value: str) -> bool:
    return value.lower() not in ("0", "false", "no", "off", "")


class _Setting:
    """One of a section's names as a data descriptor on its class, so ``monkeypatch.setattr``
    (pytest >= 9 looks for an instance ``__dict__`` entry unless a data descriptor is in the
    way) records the value before and sets it back, instead of deleting the name at undo."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get__(self, section: _Section | None, owner: type) -> Any:
        return self if section is None else section.__getattr__(self.key)

    def __set__(self, section: _Section, value: Any) -> None:
        section.__setattr__(self.key, value)

    def __delete__(self, section: _Section) -> None:
        section.__delattr__(self.key)


def _section(config: Config, name: str, aliases: dict[str, str], inert: dict[str, Any]) -> _Section:
    cls = type(f"_{name}Section", (_Section,), {key: _Setting(key) for key in [*aliases, *inert]})
    return cls(config, name, aliases, inert)


class _Section:
    """``CONFIG.API`` / ``CONFIG.APP``: nnsight's names for settings of the flat Config (each
    read and written through to it), plus settings kept only for nnsight code to assign.
    ``del CONFIG.APP.DEBUG`` puts a setting back to its default (environment, file, built-in)."""

    def __init__(self, config: Config, name: str, aliases: dict[str, str], inert: dict[str, Any]) -> None:
        d = self.__dict__
        d["_config"], d["_section"], d["_aliases"], d["_inert"] = config, name, aliases, dict(inert)
        d["_inert_defaults"] = dict(inert)

    def __getattr__(self, key: str) -> Any:
        if key in self._aliases:
            return getattr(self._config, self._aliases[key])
        if key in self._inert:
            return self._inert[key]
        raise self._unknown(key)

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self._aliases:
            setattr(self._config, self._aliases[key], value)
        elif key in self._inert:
            self._inert[key] = value
        else:
            raise self._unknown(key)

    def __delattr__(self, key: str) -> None:
        if key in self._aliases:
            name = self._aliases[key]
            setattr(self._config, name, getattr(Config(), name))
        elif key in self._inert:
            self._inert[key] = self._inert_defaults[key]
        else:
            raise self._unknown(key)

    def _unknown(self, key: str) -> AttributeError:
        known = ", ".join(self._known())
        return AttributeError(f"CONFIG.{self._section} has no setting {key!r}; it has: {known}")

    def _known(self) -> list[str]:
        return [*self._aliases, *self._inert]

    def __repr__(self) -> str:
        shown = [f"{k}={'<set>' if k == 'APIKEY' and getattr(self, k) else repr(getattr(self, k))}"
                 for k in self._known()]
        return f"CONFIG.{self._section}({', '.join(shown)})"


class Config:
    """Settings for remote execution (see the module docstring for sources)."""

    def __init__(self) -> None:
        file = _file_settings()
        self.HOST: str = os.environ.get("GLASSBOX_HOST", file.get("host", "http://127.0.0.1:8765"))
        self.API_KEY: str | None = os.environ.get("GLASSBOX_API_KEY", file.get("api_key"))
        self.STATUS: bool = _flag(os.environ.get("GLASSBOX_STATUS", file.get("status", "1")))
        self.TIMEOUT: float = float(os.environ.get("GLASSBOX_TIMEOUT", file.get("timeout", "300")))
        self.DEBUG: bool = _flag(os.environ.get("GLASSBOX_DEBUG", file.get("debug", "0")))
        self.API = _section(self, "API", {"HOST": "HOST", "APIKEY": "API_KEY", "TIMEOUT": "TIMEOUT"},
                             {"COMPRESS": True})
        self.APP = _section(self, "APP", {"REMOTE_LOGGING": "STATUS", "DEBUG": "DEBUG"},
                             {"PYMOUNT": True, "DISABLE_CPP_BACKTRACE": True})

    def set_default_api_key(self, api_key: str) -> None:
        """Use ``api_key`` from now on and write it to the config file, for later sessions
        (nnsight's ``CONFIG.set_default_api_key``)."""
        self.API_KEY = api_key
        path = _path()
        lines = path.read_text().splitlines() if path.is_file() else []
        lines = [line for line in lines if line.partition("=")[0].strip().lower() != "api_key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join([*lines, f"api_key = {api_key}"]) + "\n")
        path.chmod(0o600)

    def __repr__(self) -> str:
        key = "set" if self.API_KEY else "not set"
        return f"Config(HOST={self.HOST!r}, API_KEY=<{key}>, STATUS={self.STATUS}, TIMEOUT={self.TIMEOUT})"


CONFIG = Config()
