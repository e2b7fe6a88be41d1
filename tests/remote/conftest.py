"""Fixtures shared by the remote tests: the offline models, and CONFIG pointed at the module's
``server`` fixture (each test module starts the server it needs)."""

from __future__ import annotations

import pytest

from glassbox import CONFIG, LanguageModel
from glassbox.offline import smollm2_path, tiny_gpt2_path


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return LanguageModel(tiny_gpt2_path())


@pytest.fixture(scope="module")
def smol() -> LanguageModel:
    return LanguageModel(smollm2_path())


@pytest.fixture
def remote(server, monkeypatch, request):
    """CONFIG (host, a fresh key, no status line) aimed at this module's running ``server``."""
    monkeypatch.setattr(CONFIG, "HOST", server.url)
    monkeypatch.setattr(CONFIG, "API_KEY", server.create_key(request.module.__name__.rpartition(".")[2][:40]))
    monkeypatch.setattr(CONFIG, "STATUS", False)
    return server
