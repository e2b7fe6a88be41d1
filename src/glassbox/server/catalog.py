"""The model catalog: what a server serves and how each model is loaded, as an operator writes it.

Offers:
    read_catalog(path) -> Catalog        parse and check a TOML catalog (``glassbox serve --models-file``)
    Catalog(server, models)              ``server``: ServerConfig values from ``[server]``;
                                         ``models``: name -> ModelEntry
    ModelEntry(name, path, options, load, pinned, replicas, resources, engine)
    LOAD_OPTIONS                         the per-model options passed on to ``LanguageModel(path, ...)``
    VLLM_OPTIONS                         those passed on to ``glassbox.VLLM(path, ...)`` (engine = "vllm")
    ENGINES                              "hf" (transformers, the default) and "vllm" (docs/vllm.md)
    LOAD_MODES                           "eager" (loaded at start) and "on_demand" (at its first job)
    parse_size("16GiB") -> bytes         sizes as operators write them (int bytes, KB/MB/GB, KiB/MiB/GiB)
    CatalogError                         a ValueError naming the file, the model, the option and the value

A catalog::

    [server]
    memory_budget = "16GiB"        # what loaded models may take on this host (on-demand evicts to stay under)
    max_seconds = 120              # any other `glassbox serve` setting, by its ServerConfig name

    [models.smollm2]
    path = "/models/smollm2"
    dtype = "bfloat16"             # every option a LanguageModel takes locally means the same here
    device_map = "auto"
    max_memory = { "0" = "75GiB", cpu = "100GiB" }
    load = "on_demand"             # or "eager" (the default); pinned = true: never evicted
    replicas = 2                   # --backend ray: replicas, and what each asks Ray for
    resources = { gpus = 1 }

    [models.smollm2-vllm]
    path = "/models/smollm2"
    engine = "vllm"                # its own worker process on vLLM (docs/vllm.md, "On a server")
    dtype = "float32"              # and the glassbox.VLLM options max_model_len, kv_cache_gib

Why checked here, before any weight is read: an operator's typo (``dtpye``, ``device_map =
"gpu"``) must fail at start with the model, the option and the value named, not as a
transformers traceback on the first job of the night.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, packaged
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["ENGINES", "LOAD_MODES", "LOAD_OPTIONS", "VLLM_OPTIONS", "Catalog", "CatalogError", "ModelEntry",
           "parse_size", "read_catalog"]

# The LanguageModel / from_pretrained options a catalog may set per model (the rest of a model's
# table is the server's: path, load, pinned, replicas, resources). A closed list so that a typo
# is an error, not an option silently passed to transformers and ignored.
LOAD_OPTIONS = ("dtype", "device_map", "max_memory", "offload_folder", "offload_buffers",
                "attn_implementation", "revision", "subfolder", "trust_remote_code", "low_cpu_mem_usage")
# A vLLM model takes these instead (glassbox.VLLM's own options; docs/vllm.md).
VLLM_OPTIONS = ("dtype", "max_model_len", "kv_cache_gib")
ENGINES = ("hf", "vllm")
_SERVER_KEYS = ("path", "load", "pinned", "replicas", "resources", "engine")
LOAD_MODES = ("eager", "on_demand")
_DTYPES = ("float32", "float16", "bfloat16", "float64", "auto")
_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|disk|meta|mps|cuda(:\d+)?|xpu(:\d+)?|\d+)$")
_RESOURCES = {"cpus": "num_cpus", "gpus": "num_gpus", "memory": "memory"}
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


class CatalogError(ValueError):
    """A catalog that cannot be served as written; the message names what and where."""


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes from ``1024``, ``"512MiB"``, ``"16GiB"``, ``"80GB"`` (case-insensitive)."""
    if isinstance(value, bool):
        raise CatalogError(f"{what}: {value!r} is not a size; write bytes or a size like '16GiB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise CatalogError(f"{what}: {value!r} is negative")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else ""
    if match is None or (unit and unit not in _UNITS):
        raise CatalogError(f"{what}: {value!r} is not a size; write bytes or a number with one of "
                           "KiB, MiB, GiB, TiB, KB, MB, GB, TB (for example '16GiB')")
    return int(float(match.group(1)) * _UNITS[unit or "b"])


@dataclass(frozen=True)
class ModelEntry:
    """One served model: where it is, how it loads (``options`` go to ``LanguageModel``), when."""

    name: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    load: str = "eager"
    pinned: bool = False
    replicas: int = 1
    resources: dict[str, float] = field(default_factory=dict)
    engine: str = "hf"

    def worker_spec(self) -> dict[str, Any]:
        """What a worker needs to load it (the executor's ``load_models`` takes these)."""
        spec = {"path": self.path, "options": dict(self.options)}
        return {**spec, "engine": self.engine} if self.engine != "hf" else spec


@dataclass(frozen=True)
class Catalog:
    server: dict[str, Any]
    models: dict[str, ModelEntry]


def read_catalog(path: str | Path) -> Catalog:
    """Parse the TOML catalog at ``path`` and check every entry (CatalogError otherwise).
    Relative model paths and offload folders are taken from the catalog's own folder."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CatalogError(f"cannot read the model catalog {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise CatalogError(f"the model catalog {path} is not valid TOML: {err}") from None
    unknown = sorted(set(data) - {"server", "models"})
    if unknown:
        raise CatalogError(f"{path}: unknown table(s) {unknown}; a catalog has [server] and [models.NAME]")
    models_table = data.get("models") or {}
    if not isinstance(models_table, dict) or not models_table:
        raise CatalogError(f"{path}: no models; add a table like [models.smollm2] with path = \"...\"")
    base = path.resolve().parent
    models = {name: _entry(path, base, name, table) for name, table in models_table.items()}
    return Catalog(server=_server(path, data.get("server") or {}), models=models)


def _server(path: Path, table: Any) -> dict[str, Any]:
    # Which names are server settings is ServerConfig's to say (config.py checks them).
    if not isinstance(table, dict):
        raise CatalogError(f"{path}: [server] must be a table")
    return {key: parse_size(value, f"{path}: [server] memory_budget") if key == "memory_budget" else value
            for key, value in table.items()}


def _entry(path: Path, base: Path, name: str, table: Any) -> ModelEntry:
    where = f"{path}: model {name!r}"
    if not name.replace("-", "_").replace(".", "_").isidentifier():
        raise CatalogError(f"{where}: a model name is letters, digits, '-', '_' or '.', "
                           "starting with a letter")
    if not isinstance(table, dict):
        raise CatalogError(f"{where}: must be a table ([models.{name}]) with at least path = \"...\"")
    engine = table.get("engine", "hf")
    if engine not in ENGINES:
        raise CatalogError(f"{where}: engine = {engine!r}; choose one of {list(ENGINES)} ('hf': "
                           "transformers, 'vllm': vLLM, docs/vllm.md)")
    takes = VLLM_OPTIONS if engine == "vllm" else LOAD_OPTIONS
    unknown = sorted(set(table) - set(takes) - set(_SERVER_KEYS))
    if unknown:
        kind = "glassbox.VLLM" if engine == "vllm" else "LanguageModel"
        raise CatalogError(f"{where}: unknown option(s) {unknown}; a model takes {list(_SERVER_KEYS)} and "
                           f"the {kind} options {list(takes)}")
    model_path = table.get("path")
    if not isinstance(model_path, str) or not model_path.strip():
        raise CatalogError(f"{where}: path = \"...\" (a model folder, or a hub id in the local cache) "
                           "is required")
    if _is_local(model_path, base):
        model_path = str((base / Path(model_path).expanduser()).resolve())
    if engine == "vllm":
        _check_vllm(where, table)
    load = table.get("load", "eager")
    if load not in LOAD_MODES:
        raise CatalogError(f"{where}: load = {load!r}; choose one of {list(LOAD_MODES)}")
    pinned = table.get("pinned", False)
    if not isinstance(pinned, bool):
        raise CatalogError(f"{where}: pinned = {pinned!r}; write true or false")
    replicas = table.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise CatalogError(f"{where}: replicas = {replicas!r}; a model needs a whole number >= 1")
    options = {key: table[key] for key in takes if key in table}
    _check_options(where, options, base)
    resources = _resources(where, table["resources"]) if "resources" in table else _gpus_named(options)
    return ModelEntry(name=name, path=model_path, options=options, load=load, pinned=pinned,
                      replicas=replicas, resources=resources, engine=engine)


def _check_vllm(where: str, table: dict) -> None:
    # A vLLM model runs in a worker process of its own for the server's whole life (docs/vllm.md).
    if table.get("load", "eager") != "eager":
        raise CatalogError(f"{where}: engine 'vllm' models load at start (load = 'eager'): each has a "
                           "worker process of its own, outside the on-demand memory budget")
    if table.get("replicas", 1) != 1:
        raise CatalogError(f"{where}: engine 'vllm' serves one replica (its own local worker process)")
    length = table.get("max_model_len")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise CatalogError(f"{where}: max_model_len = {length!r}; write a whole number of tokens")
    size = table.get("kv_cache_gib")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0):
        raise CatalogError(f"{where}: kv_cache_gib = {size!r}; write the KV cache's size in GiB (> 0)")


def _gpus_named(options: dict[str, Any]) -> dict[str, float]:
    """What a Ray replica asks for when the catalog does not say: as many GPUs as its placement
    names (max_memory's GPU numbers, or the GPUs of device_map); none for a CPU model."""
    gpus = {key for key in (options.get("max_memory") or {}) if isinstance(key, int)}
    device_map = options.get("device_map")
    devices = device_map.values() if isinstance(device_map, dict) else [device_map]
    for device in devices:
        text = str(device)
        if text.isdigit() or text.startswith("cuda"):
            gpus.add(int(text.partition(":")[2] or 0) if text.startswith("cuda") else int(text))
    return {"num_gpus": float(len(gpus))} if gpus else {}


def _is_local(path: str, base: Path) -> bool:
    # A hub id is "org/name" or "name"; a folder is absolute, relative with ./ or ../, or exists
    # beside the catalog.
    return path.startswith(("/", "./", "../", "~")) or (base / path).exists()


def _check_options(where: str, options: dict[str, Any], base: Path) -> None:
    dtype = options.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise CatalogError(f"{where}: dtype = {dtype!r}; choose one of {list(_DTYPES)}")
    device_map = options.get("device_map")
    if isinstance(device_map, str):
        if device_map not in _DEVICE_MAPS and not _DEVICE.match(device_map):
            raise CatalogError(f"{where}: device_map = {device_map!r}; choose one of {list(_DEVICE_MAPS)}, a "
                               "device ('cpu', 'cuda:0'), or a table of module -> device")
    elif isinstance(device_map, dict):
        for module, device in device_map.items():
            if not (isinstance(device, int) or (isinstance(device, str) and _DEVICE.match(device))):
                raise CatalogError(f"{where}: device_map[{module!r}] = {device!r} is not a device "
                                   "(cpu, disk, cuda:N or a GPU number)")
    elif device_map is not None:
        raise CatalogError(f"{where}: device_map = {device_map!r}; write a string or a table")
    max_memory = options.get("max_memory")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise CatalogError(f"{where}: max_memory must be a table like "
                               "{ \"0\" = \"75GiB\", cpu = \"100GiB\" }")
        checked: dict[Any, int] = {}
        for device, size in max_memory.items():
            if not _DEVICE.match(str(device)) or device in ("meta", "disk"):
                raise CatalogError(f"{where}: max_memory names {device!r}, which is not a device "
                                   "(cpu, or a GPU number such as \"0\")")
            key = int(device) if str(device).isdigit() else str(device)
            checked[key] = parse_size(size, f"{where}: max_memory[{device!r}]")
        options["max_memory"] = checked  # accelerate wants GPU numbers as ints, sizes in bytes
    offload = options.get("offload_folder")
    if offload is not None:
        if not isinstance(offload, str) or not offload:
            raise CatalogError(f"{where}: offload_folder must be a folder path")
        options["offload_folder"] = str((base / Path(offload).expanduser()).resolve())
    for flag in ("offload_buffers", "trust_remote_code", "low_cpu_mem_usage"):
        if flag in options and not isinstance(options[flag], bool):
            raise CatalogError(f"{where}: {flag} = {options[flag]!r}; write true or false")
    attn = options.get("attn_implementation")
    if attn is not None and not isinstance(attn, str):
        raise CatalogError(f"{where}: attn_implementation must be a string such as \"sdpa\" or \"glassbox\"")


def _resources(where: str, table: Any) -> dict[str, float]:
    if not isinstance(table, dict):
        raise CatalogError(f"{where}: resources must be a table like "
                           "{ gpus = 1, cpus = 2, memory = \"8GiB\" }")
    request: dict[str, float] = {}
    for key, value in table.items():
        if key not in _RESOURCES:
            raise CatalogError(f"{where}: resources.{key} is unknown; a replica asks for cpus, gpus "
                               "and memory")
        if key == "memory":
            request["memory"] = float(parse_size(value, f"{where}: resources.memory"))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise CatalogError(f"{where}: resources.{key} = {value!r}; write a number >= 0")
        else:
            request[_RESOURCES[key]] = float(value)
    return request
