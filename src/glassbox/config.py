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
"""

from __future__ import annotations

import os
from pathlib import Path


def _file_settings() -> dict[str, str]:
    path = Path(os.environ.get("GLASSBOX_CONFIG", Path.home() / ".config" / "glassbox" / "config"))
    settings: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.strip().startswith("#"):
                settings[key.strip().lower()] = value.strip()
    return settings


class Config:
    """Settings for remote execution (see the module docstring for sources)."""

    def __init__(self) -> None:
        file = _file_settings()
        self.HOST: str = os.environ.get("GLASSBOX_HOST", file.get("host", "http://127.0.0.1:8765"))
        self.API_KEY: str | None = os.environ.get("GLASSBOX_API_KEY", file.get("api_key"))
        status = os.environ.get("GLASSBOX_STATUS", file.get("status", "1"))
        self.STATUS: bool = status.lower() not in ("0", "false", "no", "off")
        self.TIMEOUT: float = float(os.environ.get("GLASSBOX_TIMEOUT", file.get("timeout", "300")))

    def __repr__(self) -> str:
        key = "set" if self.API_KEY else "not set"
        return f"Config(HOST={self.HOST!r}, API_KEY=<{key}>, STATUS={self.STATUS}, TIMEOUT={self.TIMEOUT})"


CONFIG = Config()
