"""Models found by name: a local folder, the Hugging Face cache or hub, or a glassbox server.

Offers:
    HostedByName    mixin of LanguageModel and VLLM: ``_locate(model, remote_name)`` at
                    construction, ``_remote_name()`` (ModelContract), ``_refuse_server_only(advice)``
                    (their ``_ensure_ready``: a model whose weights stay on the server)
    resolves_locally(name, hf_kwargs)   whether ``name`` needs nobody's network to find
    load_config(source, hf_kwargs, server_said=None)   its transformers config, or an OSError that
                    says what was tried and what to do
    HUB_KEYS        the ``from_pretrained`` keywords that concern finding files (revision, token...)

How a name resolves (``_locate``), and the only case a constructor does network I/O of its own:
    1. a path that exists here (a folder with config.json...): local, no network;
    2. a hub id whose config.json is in the local Hugging Face cache: local, no network of ours
       (transformers loads it; ``HF_HUB_OFFLINE=1`` keeps it off the network too);
    3. anything else can be resolved only remotely. glassbox first asks the server at
       ``CONFIG.HOST`` for the model's config and tokenizer files, saying so on stderr: if it
       serves the name, the model is a server-only handle (weights stay there; ``remote=True``
       traces only), which a second stderr line says. If the server does not serve it or cannot
       be reached, the name is tried as a hub id (transformers downloads its config); if that
       fails too the error names both answers. Any other server failure is raised, never
       swallowed: a server that is there but broken is something to fix, not to route around.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ..errors import RemoteError, TraceStateError

__all__ = ["HUB_KEYS", "HostedByName", "load_config", "resolves_locally"]

# hf_kwargs that concern finding the files (the rest are for from_pretrained's model)
HUB_KEYS = frozenset({"revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder"})


class HostedByName:
    """Construction by name and the server-only stub, shared by LanguageModel and VLLM."""

    def _locate(self, model: str | os.PathLike, remote_name: str | None,
                hf_kwargs: dict | None = None) -> tuple[str, str | None]:
        """Record how the server knows this model (``_remote_as``; ``_server_only``: its weights
        stay there) and return ``(source, server_said)``: where its config and tokenizer load from
        (a folder or a hub id), and why the server did not serve it (None: it was not asked, or
        it did serve it)."""
        d = self.__dict__
        source = os.fspath(model)
        d["_remote_as"], d["_server_only"] = remote_name, False
        if resolves_locally(source, hf_kwargs or {}):
            return source, None
        served, said = _server_copy(source)
        if served is None:
            return source, said
        d["_remote_as"], d["_server_only"] = remote_name or source, True
        return str(served), None

    def _remote_name(self) -> str:
        """The name the server knows this model by: ``remote_name=``, else the folder name or
        hub id it was created from."""
        name = self.__dict__.get("_remote_as") or self.__dict__["_source"]
        return os.path.basename(os.path.normpath(name)) if os.path.isdir(str(name)) else str(name)

    def _refuse_server_only(self, advice: str = "") -> None:
        """Raise if this model is a server-only handle (its ``_ensure_ready`` would load weights)."""
        if self.__dict__.get("_server_only"):
            from ..config import CONFIG

            raise TraceStateError(
                f"{self._remote_name()!r} is served by the glassbox server at {CONFIG.HOST} and its "
                f"weights are not on this machine: trace it with remote=True{advice}"
            )


def resolves_locally(name: str, hf_kwargs: dict) -> bool:
    """Whether ``name`` is found here without asking anyone: a path that exists, or a hub id whose
    config.json is in the local Hugging Face cache."""
    if os.path.exists(name):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # no hub client: nothing is cached
        return False
    subfolder = hf_kwargs.get("subfolder")
    try:
        cached = try_to_load_from_cache(
            name, f"{subfolder}/config.json" if subfolder else "config.json",
            cache_dir=hf_kwargs.get("cache_dir"), revision=hf_kwargs.get("revision"),
        )
    except ValueError:  # not a valid hub id (HFValidationError): nothing to find in the cache
        return False
    return isinstance(cached, str)


def _server_copy(name: str) -> tuple[Path | None, str | None]:
    """Ask the server at CONFIG.HOST for ``name``'s config and tokenizer files (no weights); if it
    serves it, write them to the cache and return ``(folder, None)``. ``(None, why)`` when it does
    not serve it or cannot be reached; any other failure raises."""
    from ..config import CONFIG
    from ..offline import cache_root
    from ..remote import transport

    print(f"[glassbox] {name!r} is no folder here and not in the local Hugging Face cache: asking the "
          f"glassbox server at {CONFIG.HOST} for it", file=sys.stderr, flush=True)
    try:
        files = transport.model_files(CONFIG.HOST, name)
    except RemoteError as err:
        if err.status_code is None or err.status_code == 404:  # no server there / not served there
            return None, str(err)
        raise RemoteError(
            f"the glassbox server at {CONFIG.HOST} failed to hand out {name!r}: {err}. Fix the server "
            "(or point glassbox.CONFIG.HOST elsewhere), or pass a local folder with config.json",
            err.status_code,
        ) from err
    host = "".join(c if c.isalnum() else "_" for c in CONFIG.HOST)
    folder = cache_root() / "remote" / host / name.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    for filename, text in files.items():
        if os.path.basename(filename) != filename or filename.startswith("."):
            continue  # the server names plain files; never write elsewhere
        (folder / filename).write_text(text)
    print(f"[glassbox] {name!r} is served by {CONFIG.HOST}: its weights stay there, trace it with "
          "remote=True", file=sys.stderr, flush=True)
    return folder, None


def load_config(source: str, hf_kwargs: dict, server_said: str | None = None) -> Any:
    """``AutoConfig.from_pretrained(source)``; an OSError that says what was tried when it fails
    (``server_said``: the server's answer, when it was asked first)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **{k: v for k, v in hf_kwargs.items() if k in HUB_KEYS})
    except (OSError, ValueError) as exc:
        if server_said is not None:
            tried = f"the glassbox server said: {server_said}; as a hub id: {exc}"
        elif os.path.isdir(source):
            tried = f"as a local folder: {exc}"
        else:
            tried = f"as a hub id (checked the local HF cache and hub): {exc}"
        raise OSError(
            f"could not load a model config for {source!r}: {tried}. "
            "Pass a folder containing config.json (and weights), a reachable hub id, or the name "
            "of a model served by the glassbox server at glassbox.CONFIG.HOST."
        ) from exc
