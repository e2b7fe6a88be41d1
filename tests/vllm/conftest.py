"""Fixtures for glassbox on vLLM: one engine on SmolLM2 for the session, and its Hugging Face twin.

These tests run only where vLLM is installed: `.venv-vllm` (`bash scripts/setup_vllm.sh`), which
scripts/test.sh sets up and runs after the main suite. Elsewhere every module here is skipped, with
that reason, at collection. One torch thread: the machine's two cores are shared.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_spec = importlib.util.find_spec("vllm")
HAVE_VLLM = _spec is not None and _spec.origin is not None  # not this folder, seen as a namespace package

# Warnings vLLM itself raises on this CPU build, ignored by message and nothing else (pytest turns
# every other warning into an error, as in the main suite).
VLLM_WARNINGS = (
    "ignore:`torch.distributed.reduce_op` is deprecated:FutureWarning",
    "ignore:.*Triton is not installed.*",
    "ignore:.*does not officially support disabling chunked prefill.*",
    # torch modules that vLLM imports (torch.utils.mkldnn) on first use
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
)


def pytest_configure(config: pytest.Config) -> None:
    if HAVE_VLLM:
        for line in VLLM_WARNINGS:
            config.addinivalue_line("filterwarnings", line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed here: tests/vllm runs in .venv-vllm "
                                   "(bash scripts/setup_vllm.sh; scripts/test.sh runs it)")
    for item in items:
        if "tests/vllm/" in str(item.path).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2() -> str:
    from glassbox.offline import smollm2_path

    return str(smollm2_path())


@pytest.fixture(scope="session")
def vmodel(smollm2: str):
    """SmolLM2 on vLLM (float32, so that its values can be compared with Hugging Face's)."""
    from glassbox.vllm import VLLM

    return VLLM(smollm2, dtype="float32", max_model_len=256, dispatch=True)


@pytest.fixture(scope="session")
def hf(smollm2: str):
    """The same checkpoint as a Hugging Face LanguageModel."""
    from glassbox import LanguageModel

    return LanguageModel(smollm2, dispatch=True)
